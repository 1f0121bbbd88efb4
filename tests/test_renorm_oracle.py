"""Oracle suite for batch renormalization (``renorm=True``) against Keras 3.15 itself (KERAS_BACKEND=torch).

Both layers get the same random gamma/beta and the same five buffers (``moving_mean``,
``moving_variance``, ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``; deliberately not
consistent with one another), then four training calls on different random batches (per-channel
non-zero means, spreads from 0.5 to 3, so that ``r`` and ``d`` are far from 1 and 0) and one inference
call. Compared in float32 at the plain oracle's ``rtol=1e-4, atol=1e-5``: the output of every call, the
five buffers after every call, and the gradients wrt input, gamma and beta of a random-weighted sum.

* a grid over ranks 2-5, channel axes (first after the batch, last as -1 and as rank-1, middle,
  negative, and 0), each of the 8 subsets of the clipping keys (values that bite: each given key is
  checked to clip some channel in some step), center/scale on and off, random momentum,
  renorm_momentum and epsilon, initial buffers random or with a ``renorm_stddev`` below
  ``sqrt(epsilon)``; pairwise rather than the full product (each rank meets each clipping subset, axis
  and center/scale combination), plus the ends of both momenta and a ``moving_variance`` that the
  relu in ``relu(moving_stddev**2 - epsilon)`` sets to 0;
* masked training (channels last, full and broadcast masks, bool and float masks), every subset of
  the clipping keys. Keras divides masked sums by ``count + 1e-7``, ours by ``count`` (SPEC 4): with
  at least 3 positions per channel that is a relative ``3.3e-8``, below float32's rounding, so the
  plain tolerances stay;
* configuration dicts with renorm keys: ours equal Keras's, each loads into the other, the loaded
  layers have the same initial buffers (deterministic initializers), the same weight order, and
  compute the same outputs and buffers.

The one-pass variance of Keras's torch backend (``E[x^2] - E[x]^2``) is why the data keep a modest
mean/spread ratio (at most 4), as in tests/test_keras_oracle.py.

Set ``BATCHNORM_RENORM_ORACLE_REPORT=/path/file.json`` to have the largest errors observed in this
file written there (per quantity: "rel" over elements with ``|keras| >= 1e-2``, "abs" over all).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random

import keras
import pytest
import torch
from reference import batch_moments
from test_keras_oracle import _ERRORS as ORACLE_ERRORS
from test_keras_oracle import (
    MASK_SHAPES,
    _seed,
    _shape,
    assert_agree,
    assert_config_equals_keras,
    assert_configs_match,
    compare_call,
    keras_param,
    make_pair,
    random_mask,
    random_state,
    set_state,
)

import batchnorm
from batchnorm import BatchNormalization

STEPS = 4
BUFFERS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
CLIP_KEYS = ("rmax", "rmin", "dmax")
CLIP_SUBSETS = [subset for size in range(4) for subset in itertools.combinations(CLIP_KEYS, size)]


@pytest.fixture(scope="module", autouse=True)
def _error_report():
    """This file's largest errors, apart from those of tests/test_keras_oracle.py's (same dictionary)."""
    saved = {kind: dict(errors) for kind, errors in ORACLE_ERRORS.items()}
    ORACLE_ERRORS.clear()
    yield
    path = os.environ.get("BATCHNORM_RENORM_ORACLE_REPORT")
    if path:
        with open(path, "w") as file:
            json.dump(dict(ORACLE_ERRORS), file, indent=2, sort_keys=True)
    for kind, errors in saved.items():
        for measure, value in errors.items():
            ORACLE_ERRORS[kind][measure] = max(ORACLE_ERRORS[kind][measure], value)


# ------------------------------------------------------------------------------------- helpers


def random_renorm_state(channels: int, generator: torch.Generator, init: str, epsilon: float) -> dict:
    """gamma, beta and the five buffers, random and independent of one another.

    ``init="tiny"``: channel 0 has ``renorm_stddev = 0`` (the ``max(., sqrt(epsilon))`` guard acts) and
    ``moving_stddev = 0.1 * sqrt(epsilon)`` (with momentum near 1, the relu of the variance acts).
    """
    state = random_state(channels, generator)
    state["moving_stddev"] = torch.rand(channels, generator=generator) * 1.5 + 0.5
    state["renorm_mean"] = torch.randn(channels, generator=generator)
    state["renorm_stddev"] = torch.rand(channels, generator=generator) * 1.5 + 0.5
    if init == "tiny":
        state["renorm_stddev"][0] = 0.0
        state["moving_stddev"][0] = 0.1 * math.sqrt(epsilon)
    return state


def channel_input(shape, axis: int, generator: torch.Generator) -> torch.Tensor:
    """Per-channel means in [-2, 2] and spreads in [0.5, 3] (mean/spread ratio at most 4)."""
    channels = shape[axis]
    view = [1] * len(shape)
    view[axis] = channels
    offset = (torch.rand(channels, generator=generator) * 4 - 2).reshape(view)
    spread = (torch.rand(channels, generator=generator) * 2.5 + 0.5).reshape(view)
    return torch.randn(shape, generator=generator) * spread + offset


def renorm_pair(shape, clipping, **kwargs):
    k_layer, o_layer = make_pair(shape, renorm=True, renorm_clipping=clipping, **kwargs)
    for name in BUFFERS:
        assert getattr(o_layer, name).shape == keras_param(k_layer, name).shape, name
    return k_layer, o_layer


def assert_same_buffers(k_layer, o_layer, what: str) -> None:
    for name in BUFFERS:
        assert_agree(getattr(o_layer, name), keras_param(k_layer, name), name, what=f"{name} {what}")
    for name in ("gamma", "beta"):
        o_var, k_var = getattr(o_layer, name), keras_param(k_layer, name)
        assert (o_var is None) == (k_var is None), name
        if o_var is not None:
            torch.testing.assert_close(o_var.detach(), k_var.detach(), rtol=0, atol=0)


def clipping_bites(k_layer, x, axis, mask, clipping, epsilon) -> set[str]:
    """The clipping keys that change ``r`` or ``d`` of some channel in this call (float64, Keras's buffers)."""
    mean, var, _ = batch_moments(x, axis, mask)
    renorm_mean = keras_param(k_layer, "renorm_mean").detach().double()
    safe = keras_param(k_layer, "renorm_stddev").detach().double().clamp(min=math.sqrt(epsilon))
    r = torch.sqrt(var + epsilon) / safe
    d = (mean - renorm_mean) / safe
    bites = set()
    if "rmax" in clipping and bool((r > clipping["rmax"] * 1.01).any()):
        bites.add("rmax")
    if "rmin" in clipping and bool((r < clipping["rmin"] * 0.99).any()):
        bites.add("rmin")
    if "dmax" in clipping and bool((d.abs() > clipping["dmax"] * 1.01).any()):
        bites.add("dmax")
    return bites


def run_steps(k_layer, o_layer, shape, axis, generator, clipping, epsilon, frozen=(), mask_of=None) -> set[str]:
    """STEPS training calls then one inference call, everything compared; returns the keys that bit.

    ``frozen``: buffers that must not move in training (a momentum of 1); the others must move.
    """
    bitten = set()
    for step in range(STEPS):
        x = channel_input(shape, axis, generator)
        mask = None if mask_of is None else mask_of()
        bitten |= clipping_bites(k_layer, x, axis, mask, clipping or {}, epsilon)
        before = {name: getattr(o_layer, name).clone() for name in BUFFERS}
        compare_call(k_layer, o_layer, x, generator, True, mask, "renorm_output", f"step {step}")
        assert_same_buffers(k_layer, o_layer, f"after step {step}")
        for name in ("moving_mean", "moving_stddev", "renorm_mean", "renorm_stddev"):
            moved = not torch.allclose(getattr(o_layer, name), before[name], rtol=0, atol=1e-6)
            assert moved == (name not in frozen), f"{name} step {step}: moved={moved}, frozen={frozen}"

    before = {name: getattr(o_layer, name).clone() for name in BUFFERS}
    x = channel_input(shape, axis, generator)
    mask = None if mask_of is None else mask_of()
    compare_call(k_layer, o_layer, x, generator, False, mask, "renorm_inference_output", "inference")
    assert_same_buffers(k_layer, o_layer, "after inference")
    for name, value in before.items():
        assert torch.equal(getattr(o_layer, name), value), f"inference changed {name}"
    return bitten


def random_clipping(subset, rng: random.Random, none_as_none: bool):
    """rmax in [1.05, 1.3], rmin in [0.75, 0.95], dmax in [0.05, 0.3]: each bites on channel_input."""
    if not subset:
        return None if none_as_none else {}
    bounds = {"rmax": (1.05, 1.3), "rmin": (0.75, 0.95), "dmax": (0.05, 0.3)}
    return {key: round(rng.uniform(*bounds[key]), 3) for key in subset}


# -------------------------------------------------------------------------------- the grid

AXES = {2: [1, -1, 0], 3: [1, -1, 2, -2, 0], 4: [1, -1, 3, 2, -3], 5: [1, -1, 4, 2, 3, -4]}
CENTER_SCALE = [(True, True), (True, False), (False, True), (False, False)]


def _grid():
    """Each rank with each clipping subset; axis, center/scale and init rotate (pairwise coverage)."""
    cases = []
    for rank in (2, 3, 4, 5):
        for index, subset in enumerate(CLIP_SUBSETS):
            rng = random.Random(_seed("renorm-grid", rank, index))
            axis = AXES[rank][(index + rank) % len(AXES[rank])]
            center, scale = CENTER_SCALE[(index + rank) % 4]
            init = "tiny" if (index + rank) % 3 == 0 else "random"
            clipping = random_clipping(subset, rng, none_as_none=rank % 2 == 0)
            momenta = round(rng.uniform(0, 1), 4), round(rng.uniform(0, 1), 4)
            epsilon = float(f"{10 ** rng.uniform(-5, -1):.2g}")
            name = "+".join(subset) or ("None" if clipping is None else "{}")
            flags = f"{'c' if center else 'noc'}-{'s' if scale else 'nos'}"
            case = (rank, axis, clipping, center, scale, init, *momenta, epsilon)
            cases.append(pytest.param(*case, id=f"rank{rank}-axis{axis}-{name}-{flags}-{init}"))
    # The ends of both momenta: a momentum of 1 freezes its buffers (moving_variance still becomes
    # relu(moving_stddev**2 - epsilon) of the initial, inconsistent moving_stddev).
    clip = {"rmax": 1.2, "rmin": 0.8, "dmax": 0.2}
    cases.append(pytest.param(3, -1, clip, True, True, "random", 0.0, 1.0, 1e-3, id="momentum0-renorm_momentum1"))
    cases.append(pytest.param(4, 1, clip, True, True, "tiny", 1.0, 0.0, 1e-3, id="momentum1-renorm_momentum0"))
    cases.append(pytest.param(2, -1, None, False, True, "tiny", 1.0, 1.0, 1e-2, id="both_momenta1"))
    return cases


@pytest.mark.parametrize("rank, axis, clipping, center, scale, init, momentum, renorm_momentum, epsilon", _grid())
def test_renorm_training_steps_then_inference_match_keras(
    rank, axis, clipping, center, scale, init, momentum, renorm_momentum, epsilon
):
    seed = (rank, axis, repr(clipping), center, scale, init, momentum)
    shape = _shape(rank, axis, random.Random(_seed("renorm-shape", *seed)))
    generator = torch.Generator().manual_seed(_seed("renorm-data", *seed))
    kwargs = dict(axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale)
    k_layer, o_layer = renorm_pair(shape, clipping, renorm_momentum=renorm_momentum, **kwargs)
    set_state(k_layer, o_layer, random_renorm_state(shape[axis], generator, init, epsilon))

    frozen = (("moving_mean", "moving_stddev") if momentum == 1 else ()) + (
        ("renorm_mean", "renorm_stddev") if renorm_momentum == 1 else ()
    )
    bitten = run_steps(k_layer, o_layer, shape, axis, generator, clipping, epsilon, frozen)
    assert bitten == set(clipping or {}), f"clipping keys {sorted(clipping or {})}, only {sorted(bitten)} clipped"


def test_relu_of_the_moving_variance_matches_keras():
    """``moving_stddev**2 < epsilon`` after the update: Keras's relu gives a moving variance of exactly 0."""
    shape, epsilon = (5, 4, 3), 0.1
    generator = torch.Generator().manual_seed(_seed("renorm-relu"))
    k_layer, o_layer = renorm_pair(shape, {"rmax": 1.5}, momentum=0.99, epsilon=epsilon, renorm_momentum=0.9)
    set_state(k_layer, o_layer, random_renorm_state(3, generator, "tiny", epsilon))
    x = channel_input(shape, -1, generator)
    compare_call(k_layer, o_layer, x, generator, True, None, "renorm_output", "relu step")
    assert keras_param(k_layer, "moving_variance")[0].item() == 0.0  # the relu acted
    assert bool((keras_param(k_layer, "moving_variance")[1:] > 0).all())
    assert_same_buffers(k_layer, o_layer, "after the relu step")
    assert o_layer.moving_variance[0].item() == 0.0
    compare_call(k_layer, o_layer, x, generator, False, None, "renorm_inference_output", "relu inference")


# ---------------------------------------------------------------------------------- masks


def _mask_cases():
    cases = []
    for index, (input_shape, mask_shape) in enumerate(MASK_SHAPES):
        subset = CLIP_SUBSETS[index % len(CLIP_SUBSETS)] if index < 8 else CLIP_SUBSETS[(3 * index) % 8]
        kind = ("bool", "float01", "float_nonbinary")[index % 3]
        name = "+".join(subset) or "noclip"
        cases.append(
            pytest.param(input_shape, mask_shape, kind, subset, id=f"{input_shape}-mask{mask_shape}-{kind}-{name}")
        )
    return cases


@pytest.mark.parametrize("input_shape, mask_shape, kind, subset", _mask_cases())
def test_masked_renorm_training_matches_keras(input_shape, mask_shape, kind, subset):
    seed = ("renorm-mask", input_shape, mask_shape, kind, subset)
    rng = random.Random(_seed(*seed))
    generator = torch.Generator().manual_seed(_seed(*seed))
    momentum, renorm_momentum, epsilon = rng.uniform(0, 1), rng.uniform(0, 1), 10 ** rng.uniform(-5, -1)
    clipping = random_clipping(subset, rng, none_as_none=False)
    init = "tiny" if len(input_shape) % 2 else "random"
    k_layer, o_layer = renorm_pair(
        input_shape, clipping, momentum=momentum, renorm_momentum=renorm_momentum, epsilon=epsilon
    )
    set_state(k_layer, o_layer, random_renorm_state(input_shape[-1], generator, init, epsilon))

    def mask_of():
        return random_mask(input_shape, mask_shape, kind, generator)

    bitten = run_steps(k_layer, o_layer, input_shape, -1, generator, clipping, epsilon, mask_of=mask_of)
    assert bitten == set(clipping or {}), f"clipping keys {sorted(clipping or {})}, only {sorted(bitten)} clipped"


# --------------------------------------------------------------------------------- configs


def _config_kwargs(variant: str, lib) -> dict:
    """Constructor arguments of a config variant, with objects from ``lib`` (keras or batchnorm)."""
    if variant == "renorm_defaults":
        return dict(renorm=True)
    if variant == "renorm_empty_clipping":
        return dict(renorm=True, renorm_clipping={}, renorm_momentum=0.5)
    if variant == "renorm_all_keys":
        return dict(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.25, "dmax": 5.0}, renorm_momentum=0.9)
    if variant == "renorm_int_values":
        return dict(renorm=True, renorm_clipping={"rmax": 2, "dmax": 0}, renorm_momentum=1)
    if variant == "renorm_rmin_equals_rmax":
        return dict(renorm=True, renorm_clipping={"rmin": 1.5, "rmax": 1.5}, renorm_momentum=0.0)
    if variant == "renorm_initializers_axis1":
        return dict(
            renorm=True,
            renorm_clipping={"dmax": 0.5},
            axis=1,
            momentum=0.7,
            epsilon=1e-2,
            center=False,
            moving_mean_initializer=lib.initializers.Constant(-1.5),
            moving_variance_initializer=lib.initializers.Constant(4.0),
        )
    if variant == "renorm_initializers_by_name":
        return dict(renorm=True, renorm_clipping={"rmin": 0.5}, moving_mean_initializer="ones", scale=False)
    if variant == "renorm_float64":
        return dict(renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 0.5}, dtype="float64", axis=-2)
    if variant == "renorm_not_trainable":
        return dict(renorm=True, renorm_clipping={"rmax": 1.1}, trainable=False, momentum=0.5)
    if variant == "no_renorm_with_clipping":
        # Keras stores renorm_clipping as given when renorm=False (unvalidated); valid values here.
        return dict(renorm=False, renorm_clipping={"rmax": 2.0, "rmin": 0.5}, renorm_momentum=0.75)
    raise AssertionError(variant)


CONFIG_VARIANTS = [
    "renorm_defaults",
    "renorm_empty_clipping",
    "renorm_all_keys",
    "renorm_int_values",
    "renorm_rmin_equals_rmax",
    "renorm_initializers_axis1",
    "renorm_initializers_by_name",
    "renorm_float64",
    "renorm_not_trainable",
    "no_renorm_with_clipping",
]
CONFIG_SHAPE = (6, 3, 4)


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_renorm_config_equals_keras_and_loads_across(variant):
    name = f"bn_{variant}"
    k_layer = keras.layers.BatchNormalization(name=name, **_config_kwargs(variant, keras))
    o_layer = BatchNormalization(name=name, **_config_kwargs(variant, batchnorm))
    ours, theirs = assert_config_equals_keras(k_layer, o_layer, CONFIG_SHAPE)

    # Keras loads ours and writes it back the same; we load Keras's (through JSON too) and ours.
    k_from_ours = keras.layers.BatchNormalization.from_config(ours)
    o_from_keras = BatchNormalization.from_config(json.loads(json.dumps(theirs)))
    assert_configs_match(ours, k_from_ours.get_config())
    assert_configs_match(o_from_keras.get_config(), theirs)
    assert BatchNormalization.from_config(ours).get_config() == ours
    assert k_from_ours.trainable == o_from_keras.trainable == o_layer.trainable

    # Same weights, in the same order, dtypes and (deterministic initializers) initial values.
    k_from_ours.build(CONFIG_SHAPE)
    o_from_keras.build(CONFIG_SHAPE)
    assert list(o_from_keras.state_dict()) == [variable.path.split("/")[-1] for variable in k_from_ours.weights]
    renorm = ours["renorm"]
    names = BUFFERS if renorm else BUFFERS[:2]
    for weight in BUFFERS[len(names) :]:
        assert not hasattr(k_from_ours, weight) and not hasattr(o_from_keras, weight), weight
    for weight in ("gamma", "beta", *names):
        k_var, o_var = keras_param(k_from_ours, weight), getattr(o_from_keras, weight)
        assert (k_var is None) == (o_var is None), weight
        if o_var is not None:
            assert o_var.dtype == k_var.dtype, f"{weight}: dtype {o_var.dtype} != keras {k_var.dtype}"
            torch.testing.assert_close(o_var.detach(), k_var.detach(), rtol=0, atol=0)

    # They compute the same: two training calls (frozen: inference) and one inference call.
    config = k_layer.get_config()
    axis, epsilon = config["axis"], config["epsilon"]
    dtype = torch.float64 if variant == "renorm_float64" else torch.float32
    generator = torch.Generator().manual_seed(_seed("renorm-config", variant))
    if renorm:
        state = random_renorm_state(CONFIG_SHAPE[axis], generator, "random", epsilon)
    else:
        state = random_state(CONFIG_SHAPE[axis], generator)
    set_state(k_from_ours, o_from_keras, state)
    before = {weight: getattr(o_from_keras, weight).clone() for weight in names}
    for index, training in enumerate((True, True, False)):
        x = channel_input(CONFIG_SHAPE, axis, generator).to(dtype)
        compare_call(k_from_ours, o_from_keras, x, generator, training, None, "renorm_config_output", f"call {index}")
        for weight in names:
            k_value = keras_param(k_from_ours, weight)
            assert_agree(getattr(o_from_keras, weight), k_value, f"config_{weight}", what=f"{weight} call {index}")
    if variant == "renorm_not_trainable":
        for weight, value in before.items():
            assert torch.equal(getattr(o_from_keras, weight), value), f"a frozen layer changed {weight}"


# ------------------------------------------------------------------------------- sanity


def test_keras_renorm_oracle_is_itself():
    """Guard: the oracle is Keras's own renorm (five buffers, in Keras's order, on the torch backend)."""
    assert keras.backend.backend() == "torch"
    k_layer = keras.layers.BatchNormalization(renorm=True)
    k_layer.build((2, 3))
    names = [variable.path.split("/")[-1] for variable in k_layer.non_trainable_weights]
    assert names == list(BUFFERS)
    assert k_layer.get_config()["renorm_clipping"] == {}
