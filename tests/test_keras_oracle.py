"""Oracle suite: batchnorm.BatchNormalization against Keras 3 itself (KERAS_BACKEND=torch).

Both layers get the same random initial weights and moving statistics, then the same inputs and
the same random upstream gradients. Compared in float32 at ``rtol=1e-4, atol=1e-5``:

* a grid over ranks 2-5, channel axes (first, last as -1 and as rank-1, middle, negative),
  center/scale on and off, random momentum and epsilon: three consecutive training steps (outputs,
  moving statistics after each step, gradients wrt input, gamma and beta), then inference;
* masked training (channels-last, full and broadcast masks, bool and float masks);
* inference with a mask equals inference without it (both libraries);
* ``trainable=False`` (constructor and attribute): ``training=True`` is inference, nothing moves;
* configuration dicts: ours equal Keras's, each loads into the other, and the loaded layers compute
  the same outputs;
* regularization losses and constraint projections.

Deliberate differences (SPEC) are avoided, not tested here: Keras's torch backend computes the
variance as ``E[x^2] - E[x]^2`` (the data keep a modest mean/spread ratio), divides masked sums by
``count + 1e-7`` (far below the tolerance), mishandles all-False masks, masks with ``C == 1``, and
masks on an axis other than the last.

Set ``BATCHNORM_ORACLE_REPORT=/path/file.json`` to have the largest errors observed written there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import zlib
from collections import defaultdict

import pytest
import torch

try:  # a missing Keras fails the run: the oracle is part of the suite, not optional
    import keras
except ImportError as error:
    raise ImportError("the Keras oracle tests need Keras 3: `pip install -e .[test]`, or run `make test`") from error

import batchnorm  # noqa: E402
from batchnorm import BatchNormalization  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
STEPS = 3

# Largest errors seen, per kind of quantity: "rel" is |ours - keras| / |keras| over the elements
# with |keras| >= 1e-2 and "abs" is max |ours - keras| over all elements.
_ERRORS: dict[str, dict[str, float]] = defaultdict(lambda: {"rel": 0.0, "abs": 0.0})


@pytest.fixture(scope="module", autouse=True)
def _error_report():
    yield
    path = os.environ.get("BATCHNORM_ORACLE_REPORT")
    if path:
        with open(path, "w") as file:
            json.dump(dict(_ERRORS), file, indent=2, sort_keys=True)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def assert_agree(ours, theirs, kind: str, rtol: float = RTOL, atol: float = ATOL, what: str = "") -> None:
    """``assert_close(ours, keras)``, recording the error reached under ``kind``."""
    assert ours is not None and theirs is not None, f"{kind} {what}: ours={ours!r}, keras={theirs!r}"
    ours = torch.as_tensor(ours).detach()
    theirs = torch.as_tensor(theirs).detach()
    assert ours.shape == theirs.shape, f"{kind} {what}: shape {tuple(ours.shape)} != keras {tuple(theirs.shape)}"
    if ours.numel():
        diff = (ours.double() - theirs.double()).abs()
        big = theirs.double().abs() >= 1e-2
        errors = _ERRORS[kind]
        errors["abs"] = max(errors["abs"], diff.max().item())
        if big.any():
            errors["rel"] = max(errors["rel"], (diff[big] / theirs.double().abs()[big]).max().item())
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, msg=lambda m: f"{kind} {what}: {m}")


# ------------------------------------------------------------------------------------- helpers


def make_pair(shape, ours_kwargs=None, keras_kwargs=None, **kwargs):
    """A built Keras layer and a built layer of ours for ``shape``, with the same arguments."""
    k_layer = keras.layers.BatchNormalization(**kwargs, **(keras_kwargs or {}))
    o_layer = BatchNormalization(**kwargs, **(ours_kwargs or {}))
    k_layer.build(tuple(shape))
    o_layer.build(tuple(shape))
    return k_layer, o_layer


def keras_param(k_layer, name):
    variable = getattr(k_layer, name)
    return None if variable is None else variable.value


def random_state(channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random, non-trivial gamma/beta/moving statistics (moving variance > 0)."""
    return {
        "gamma": torch.rand(channels, generator=generator) * 1.5 + 0.25,
        "beta": torch.randn(channels, generator=generator),
        "moving_mean": torch.randn(channels, generator=generator),
        "moving_variance": torch.rand(channels, generator=generator) * 1.5 + 0.5,
    }


def set_state(k_layer, o_layer, state: dict[str, torch.Tensor]) -> None:
    """Give both layers the same weights (skipping the ones a layer lacks)."""
    for name, value in state.items():
        k_var, o_var = getattr(k_layer, name), getattr(o_layer, name)
        assert (k_var is None) == (o_var is None), f"{name}: keras has it {k_var is not None}, ours {o_var is not None}"
        if k_var is None:
            continue
        k_var.assign(value.to(k_var.value.dtype))
        with torch.no_grad():
            o_var.copy_(value.to(o_var.dtype))


def assert_same_state(k_layer, o_layer, what: str) -> None:
    for name in ("moving_mean", "moving_variance"):
        assert_agree(getattr(o_layer, name), keras_param(k_layer, name), "moving_stats", what=f"{name} {what}")
    for name in ("gamma", "beta"):
        o_var, k_var = getattr(o_layer, name), keras_param(k_layer, name)
        assert (o_var is None) == (k_var is None)
        if o_var is not None:
            torch.testing.assert_close(o_var.detach(), k_var.detach(), rtol=0, atol=0)


def random_input(shape, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Non-zero mean, non-unit spread, a modest mean/spread ratio (Keras's variance is one-pass)."""
    offset = torch.rand((), generator=generator) * 4 - 2
    spread = torch.rand((), generator=generator) * 2 + 1
    return (torch.randn(shape, generator=generator) * spread + offset).to(dtype)


def compare_call(k_layer, o_layer, x, generator, training, mask=None, kind="output", what="", rtol=RTOL, atol=ATOL):
    """Call both layers on ``x``; compare outputs and gradients wrt x, gamma, beta. Returns ours."""
    x_k = x.clone().requires_grad_(True)
    x_o = x.clone().requires_grad_(True)
    y_k = k_layer(x_k, training=training, mask=mask)
    y_o = o_layer(x_o, training=training, mask=mask)
    assert y_o.dtype == y_k.dtype, f"{what}: output dtype {y_o.dtype} != keras {y_k.dtype}"
    assert_agree(y_o, y_k, kind, rtol=rtol, atol=atol, what=what)

    k_targets, o_targets, names = [x_k], [x_o], ["x"]
    for name in ("gamma", "beta"):
        k_var, o_var = keras_param(k_layer, name), getattr(o_layer, name)
        assert (k_var is None) == (o_var is None), name
        if k_var is not None and k_var.requires_grad:
            assert o_var.requires_grad, f"{name}: keras's requires grad, ours does not"
            k_targets.append(k_var)
            o_targets.append(o_var)
            names.append(name)
        elif o_var is not None:
            assert not o_var.requires_grad, f"{name}: ours requires grad, keras's does not"
    upstream = torch.randn(y_k.shape, generator=generator).to(y_k.dtype)
    grads_k = torch.autograd.grad(y_k, k_targets, upstream)
    grads_o = torch.autograd.grad(y_o, o_targets, upstream)
    for name, g_o, g_k in zip(names, grads_o, grads_k):
        assert_agree(g_o, g_k, f"grad_{name}", rtol=rtol, atol=atol, what=what)
    return y_o


# -------------------------------------------------------------------------------- the grid


def _axes(rank: int) -> list[int]:
    """First, last (both spellings), a middle one and a negative non-last one, without repeats."""
    middle = {2: [], 3: [1], 4: [2], 5: [2]}[rank]
    negative = {2: [-2], 3: [-2], 4: [-3], 5: [-4]}[rank]
    return [0, rank - 1, -1, *middle, *negative]


def _grid():
    cases = []
    for rank in (2, 3, 4, 5):
        for axis in _axes(rank):
            for center in (True, False):
                for scale in (True, False):
                    rng = random.Random(_seed("grid", rank, axis, center, scale))
                    momentum = rng.uniform(0.0, 1.0)
                    epsilon = 10 ** rng.uniform(-5, -1)
                    cases.append(
                        pytest.param(
                            rank,
                            axis,
                            center,
                            scale,
                            momentum,
                            epsilon,
                            id=f"rank{rank}-axis{axis}-{'c' if center else 'noc'}-{'s' if scale else 'nos'}",
                        )
                    )
    # The ends of the momentum range.
    cases.append(pytest.param(3, -1, True, True, 0.0, 1e-3, id="momentum0"))
    cases.append(pytest.param(4, 1, True, True, 1.0, 1e-3, id="momentum1"))
    return cases


def _shape(rank: int, axis: int, rng: random.Random) -> tuple[int, ...]:
    """Small sizes, 2-5 channels, at least 6 elements per channel."""
    low, high = (6, 9) if rank == 2 else (2, 4)
    while True:
        shape = [rng.randint(low, high) for _ in range(rank)]
        shape[axis] = rng.randint(2, 5)
        if math.prod(shape) // shape[axis] >= 6:
            return tuple(shape)


@pytest.mark.parametrize("rank, axis, center, scale, momentum, epsilon", _grid())
def test_training_steps_then_inference_match_keras(rank, axis, center, scale, momentum, epsilon):
    rng = random.Random(_seed("shape", rank, axis, center, scale))
    generator = torch.Generator().manual_seed(_seed("data", rank, axis, center, scale, momentum))
    shape = _shape(rank, axis, rng)
    k_layer, o_layer = make_pair(shape, axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale)
    assert (o_layer.gamma is None) == (not scale) and (o_layer.beta is None) == (not center)
    set_state(k_layer, o_layer, random_state(shape[axis], generator))

    for step in range(STEPS):
        x = random_input(shape, generator)
        previous = o_layer.moving_mean.clone()
        y = compare_call(k_layer, o_layer, x, generator, training=True, what=f"step {step}")
        assert_same_state(k_layer, o_layer, f"after step {step}")
        if momentum < 0.999:  # the moving statistics moved: the comparison is not of constants
            assert not torch.allclose(o_layer.moving_mean, previous, rtol=0, atol=1e-6)
        else:
            assert torch.equal(o_layer.moving_mean, previous)
        # Training output is normalized with the batch statistics: per channel mean beta (or 0).
        reduce = [d for d in range(rank) if d != axis % rank]
        expected_mean = o_layer.beta.detach() if center else torch.zeros(shape[axis])
        torch.testing.assert_close(y.detach().mean(reduce), expected_mean, rtol=1e-4, atol=1e-4)

    before = {name: getattr(o_layer, name).clone() for name in ("moving_mean", "moving_variance")}
    x = random_input(shape, generator)
    compare_call(k_layer, o_layer, x, generator, training=False, kind="inference_output", what="inference")
    assert_same_state(k_layer, o_layer, "after inference")
    for name, value in before.items():
        assert torch.equal(getattr(o_layer, name), value), f"inference changed {name}"


def test_moving_statistics_actually_change():
    """Guard for the grid: with momentum < 1 a training step moves both moving statistics."""
    generator = torch.Generator().manual_seed(0)
    k_layer, o_layer = make_pair((6, 3), momentum=0.5)
    set_state(k_layer, o_layer, random_state(3, generator))
    before = o_layer.moving_mean.clone(), o_layer.moving_variance.clone()
    compare_call(k_layer, o_layer, random_input((6, 3), generator), generator, training=True)
    assert not torch.allclose(o_layer.moving_mean, before[0])
    assert not torch.allclose(o_layer.moving_variance, before[1])
    assert_same_state(k_layer, o_layer, "after one step")


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_non_contiguous_inputs_match_keras(axis):
    generator = torch.Generator().manual_seed(_seed("non-contiguous", axis))
    x = random_input((3, 5, 4), generator).transpose(0, 2)  # (4, 5, 3), not contiguous
    k_layer, o_layer = make_pair(tuple(x.shape), axis=axis, momentum=0.3, epsilon=1e-3)
    set_state(k_layer, o_layer, random_state(x.shape[axis], generator))
    assert not x.clone().is_contiguous()
    compare_call(k_layer, o_layer, x, generator, training=True)
    assert_same_state(k_layer, o_layer, "after a non-contiguous step")
    compare_call(k_layer, o_layer, x, generator, training=False, kind="inference_output")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_inputs_match_keras(dtype):
    """Both convert them to float32 (Keras: its compute dtype; ours: the weights' dtype)."""
    generator = torch.Generator().manual_seed(_seed("integer", str(dtype)))
    k_layer, o_layer = make_pair((8, 3), momentum=0.5, epsilon=1e-2)
    set_state(k_layer, o_layer, random_state(3, generator))
    for step in range(2):
        x = (
            torch.randint(0, 2, (8, 3), generator=generator)
            if dtype == torch.bool
            else torch.randint(0, 7, (8, 3), generator=generator) - (0 if dtype == torch.uint8 else 3)
        )
        x = x.to(dtype)
        with torch.no_grad():
            y_o, y_k = o_layer(x, training=True), k_layer(x, training=True)
        assert y_o.dtype == y_k.dtype == torch.float32
        assert_agree(y_o, y_k, "output", what=f"{dtype} step {step}")
        assert_same_state(k_layer, o_layer, f"{dtype} step {step}")
    with torch.no_grad():
        assert_agree(o_layer(x, training=False), k_layer(x, training=False), "inference_output", what=str(dtype))


# ---------------------------------------------------------------------------------- masks

# (input shape, mask shape): channels last; broadcast masks have size-1 dimensions.
MASK_SHAPES = [
    ((8, 3), (8,)),
    ((3, 4, 3), (3, 4)),
    ((3, 4, 3), (1, 4)),
    ((3, 4, 3), (3, 1)),
    ((2, 3, 4, 5), (2, 3, 4)),
    ((2, 3, 4, 5), (2, 1, 4)),
    ((2, 3, 4, 5), (1, 3, 1)),
    ((2, 3, 4, 5), (1, 1, 1)),
    ((2, 2, 3, 2, 3), (2, 2, 3, 2)),
    ((2, 2, 3, 2, 3), (2, 1, 3, 1)),
    ((2, 2, 3, 2, 3), (1, 2, 1, 2)),
]
MASK_KINDS = ["bool", "float01", "float_nonbinary"]


def random_mask(input_shape, mask_shape, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A mask whose broadcast covers at least 3 positions per channel (never all False)."""
    per_position = math.prod(input_shape[:-1]) // math.prod(mask_shape)
    while True:
        keep = torch.rand(mask_shape, generator=generator) < 0.6
        if keep.sum().item() * per_position >= 3:
            break
    if kind == "bool":
        return keep
    if kind == "float01":
        return keep.float()
    # Non-zero means True in both libraries (Keras 3.15 casts the mask to bool).
    values = torch.tensor([0.5, 2.0, -1.0])[torch.randint(0, 3, mask_shape, generator=generator)]
    return torch.where(keep, values, torch.zeros(()))


MASK_CASES = [
    pytest.param(input_shape, mask_shape, kind, id=f"{input_shape}-mask{mask_shape}-{kind}")
    for input_shape, mask_shape in MASK_SHAPES
    for kind in MASK_KINDS
    if kind == "bool" or len(input_shape) in (3, 4)  # float masks: ranks 3 and 4 suffice
]


@pytest.mark.parametrize("input_shape, mask_shape, kind", MASK_CASES)
def test_masked_training_matches_keras(input_shape, mask_shape, kind):
    generator = torch.Generator().manual_seed(_seed("mask", input_shape, mask_shape, kind))
    rng = random.Random(_seed("mask", input_shape, mask_shape, kind))
    momentum, epsilon = rng.uniform(0, 1), 10 ** rng.uniform(-5, -1)
    k_layer, o_layer = make_pair(input_shape, momentum=momentum, epsilon=epsilon)
    set_state(k_layer, o_layer, random_state(input_shape[-1], generator))
    for step in range(STEPS):
        x = random_input(input_shape, generator)
        mask = random_mask(input_shape, mask_shape, kind, generator)
        compare_call(
            k_layer, o_layer, x, generator, training=True, mask=mask, kind="masked_output", what=f"step {step}"
        )
        assert_same_state(k_layer, o_layer, f"after masked step {step}")
    # The mask matters (unless it is all True): masked statistics differ from unmasked ones.
    x = random_input(input_shape, generator)
    mask = random_mask(input_shape, mask_shape, kind, generator)
    masked, unmasked = copy.deepcopy(o_layer), copy.deepcopy(o_layer)
    with torch.no_grad():
        masked(x, training=True, mask=mask)
        unmasked(x, training=True)
    moved_the_same = torch.allclose(masked.moving_mean, unmasked.moving_mean, rtol=0, atol=1e-6)
    assert moved_the_same == bool((mask != 0).all())


@pytest.mark.parametrize(
    "input_shape, mask_shape", MASK_SHAPES[1::2], ids=[f"{i}-mask{m}" for i, m in MASK_SHAPES[1::2]]
)
def test_inference_with_mask_equals_inference_without(input_shape, mask_shape):
    generator = torch.Generator().manual_seed(_seed("inference-mask", input_shape, mask_shape))
    k_layer, o_layer = make_pair(input_shape, momentum=0.7, epsilon=1e-3)
    set_state(k_layer, o_layer, random_state(input_shape[-1], generator))
    x = random_input(input_shape, generator)
    mask = random_mask(input_shape, mask_shape, "bool", generator)
    with torch.no_grad():
        for training in (False, None):
            if training is None:
                # Ours follows module.training (PyTorch's convention); Keras's direct-call None is
                # inference, which eval() gives.
                o_layer.eval()
            o_masked, o_plain = o_layer(x, training=training, mask=mask), o_layer(x, training=training)
            k_masked, k_plain = k_layer(x, training=training, mask=mask), k_layer(x, training=training)
            assert torch.equal(k_masked, k_plain)  # the oracle's own rule
            assert torch.equal(o_masked, o_plain)
            assert_agree(o_masked, k_masked, "inference_output")
    compare_call(k_layer, o_layer, x, generator, training=False, mask=mask, kind="inference_output")
    assert_same_state(k_layer, o_layer, "after masked inference")


# ------------------------------------------------------------------------------- trainable


@pytest.mark.parametrize("how", ["constructor", "attribute"])
@pytest.mark.parametrize("shape, axis, masked", [((6, 3), -1, False), ((2, 3, 4), 1, False), ((2, 3, 4, 3), -1, True)])
def test_not_trainable_trains_as_inference(how, shape, axis, masked):
    generator = torch.Generator().manual_seed(_seed("frozen", how, shape, axis, masked))
    kwargs = dict(axis=axis, momentum=0.6, epsilon=3e-3)
    if how == "constructor":
        k_layer, o_layer = make_pair(shape, trainable=False, **kwargs)
    else:
        k_layer, o_layer = make_pair(shape, **kwargs)
        k_layer.trainable = False
        o_layer.trainable = False
    assert o_layer.trainable is False and k_layer.trainable is False
    set_state(k_layer, o_layer, random_state(shape[axis], generator))
    before = o_layer.moving_mean.clone(), o_layer.moving_variance.clone()
    mask = random_mask(shape, shape[:-1], "bool", generator) if masked else None
    for step in range(2):
        x = random_input(shape, generator)
        y = compare_call(
            k_layer, o_layer, x, generator, training=True, mask=mask, kind="frozen_output", what=f"step {step}"
        )
        with torch.no_grad():
            torch.testing.assert_close(y.detach(), o_layer(x, training=False), rtol=0, atol=0)
        assert_same_state(k_layer, o_layer, f"frozen step {step}")
        assert torch.equal(o_layer.moving_mean, before[0]) and torch.equal(o_layer.moving_variance, before[1])


# --------------------------------------------------------------------------------- configs


def assert_configs_match(ours, theirs, path: str = "config") -> None:
    """Equal dicts, except that floats need only agree to float32 rounding.

    Keras's ``L1`` keeps its factor as a float32 tensor, so ``L1(0.2).get_config()`` says
    ``{"l1": 0.20000000298023224}`` (and ``"l1"`` by name says 0.009999999776482582); we keep the
    Python float. Everything else (keys, strings, bools, ints, None, nesting) must be identical.
    """
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {ours!r} is not a dict like keras's {theirs!r}"
        assert set(ours) == set(theirs), f"{path}: keys {sorted(ours)} != keras {sorted(theirs)}"
        for key in theirs:
            assert_configs_match(ours[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), f"{path}: {ours!r} != keras {theirs!r}"
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_configs_match(a, b, f"{path}[{index}]")
    elif isinstance(theirs, float) and not isinstance(ours, bool) and isinstance(ours, (int, float)):
        assert math.isclose(ours, theirs, rel_tol=1e-7, abs_tol=0.0), f"{path}: {ours!r} != keras {theirs!r}"
    else:
        assert type(ours) is type(theirs) or {type(ours), type(theirs)} == {int, float}, (
            f"{path}: {ours!r} ({type(ours).__name__}) != keras {theirs!r} ({type(theirs).__name__})"
        )
        assert ours == theirs, f"{path}: {ours!r} != keras {theirs!r}"


def _variant_kwargs(variant: str, lib) -> dict:
    """Constructor arguments of a config variant, with objects from ``lib`` (keras or batchnorm)."""
    if variant == "defaults":
        return {}
    if variant == "axis1_momentum_epsilon":
        return dict(axis=1, momentum=0.9, epsilon=1e-2)
    if variant == "no_center":
        return dict(center=False)
    if variant == "no_scale_no_center_axis0":
        return dict(axis=0, center=False, scale=False)
    if variant == "initializers_by_name":
        return dict(
            gamma_initializer="random_normal",
            beta_initializer="random_uniform",
            moving_mean_initializer="ones",
            moving_variance_initializer="zeros",
        )
    if variant == "more_initializers_by_name":
        return dict(
            gamma_initializer="glorot_uniform",
            beta_initializer="he_normal",
            moving_mean_initializer="truncated_normal",
            moving_variance_initializer="lecun_uniform",
        )
    if variant == "more_initializers_by_object":
        return dict(
            gamma_initializer=lib.initializers.RandomUniform(minval=0.5, maxval=2.0, seed=3),
            beta_initializer=lib.initializers.TruncatedNormal(mean=1.0, stddev=0.2, seed=4),
            moving_mean_initializer=lib.initializers.VarianceScaling(
                scale=2.0, mode="fan_avg", distribution="uniform", seed=5
            ),
            moving_variance_initializer=lib.initializers.Ones(),
        )
    if variant == "initializers_by_object":
        return dict(
            gamma_initializer=lib.initializers.Constant(2.0),
            beta_initializer=lib.initializers.RandomNormal(seed=1),
            moving_mean_initializer=lib.initializers.Constant(-0.5),
            moving_variance_initializer=lib.initializers.Constant(1.5),
        )
    if variant == "regularizers":
        return dict(gamma_regularizer="l2", beta_regularizer=lib.regularizers.L1L2(l1=0.01, l2=0.02))
    if variant == "constraints":
        return dict(gamma_constraint="max_norm", beta_constraint=lib.constraints.NonNeg())
    if variant == "more_constraints":
        return dict(
            gamma_constraint=lib.constraints.MinMaxNorm(min_value=0.5, max_value=3.0, rate=0.5),
            beta_constraint="unit_norm",
            gamma_regularizer=lib.regularizers.L1(0.2),
            beta_regularizer="l1l2",
        )
    if variant == "float64":
        return dict(dtype="float64", axis=-2)
    if variant in ("mixed_float16", "mixed_bfloat16", "float16"):
        return dict(dtype=variant)
    if variant == "not_trainable":
        return dict(trainable=False, momentum=0.5)
    raise AssertionError(variant)


CONFIG_VARIANTS = [
    "defaults",
    "axis1_momentum_epsilon",
    "no_center",
    "no_scale_no_center_axis0",
    "initializers_by_name",
    "initializers_by_object",
    "more_initializers_by_name",
    "more_initializers_by_object",
    "regularizers",
    "constraints",
    "more_constraints",
    "float64",
    "mixed_float16",
    "mixed_bfloat16",
    "float16",
    "not_trainable",
]
CONFIG_SHAPE = (4, 3, 5)


def config_pair(variant: str):
    name = f"bn_{variant}"
    k_layer = keras.layers.BatchNormalization(name=name, **_variant_kwargs(variant, keras))
    o_layer = BatchNormalization(name=name, **_variant_kwargs(variant, batchnorm))
    return k_layer, o_layer


def _input_dtype(variant: str) -> tuple[torch.dtype, float, float]:
    """The input dtype to compare a variant's outputs with, and the tolerances to use."""
    if variant == "float64":
        # Keras 3.15 computes float64 inputs in float32 on its non-TensorFlow backends
        # (backend.result_type demotes 64-bit types); ours computes them in float64 (SPEC §3), see
        # test_float64_inputs_compute_in_float64.
        return torch.float64, RTOL, ATOL
    if variant in ("mixed_float16", "float16"):  # Keras casts inputs to, and outputs from, float16
        return torch.float16, 2e-3, 2e-3
    if variant == "mixed_bfloat16":
        return torch.bfloat16, 1.6e-2, 1e-2
    return torch.float32, RTOL, ATOL


def assert_config_equals_keras(k_layer, o_layer, shape=CONFIG_SHAPE) -> tuple[dict, dict]:
    """Our config equals Keras's, is JSON, and building (with ``shape``) changes neither; returns both."""
    ours, theirs = o_layer.get_config(), k_layer.get_config()
    assert_configs_match(ours, theirs)
    assert json.loads(json.dumps(ours)) == ours
    # Building does not change it (Keras 3 keeps axis as given).
    k_layer.build(shape)
    o_layer.build(shape)
    assert o_layer.get_config() == ours
    assert_configs_match(o_layer.get_config(), k_layer.get_config())
    return ours, theirs


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_equals_keras(variant):
    assert_config_equals_keras(*config_pair(variant))


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_configs_load_across_and_compute_the_same(variant):
    k_layer, o_layer = config_pair(variant)
    # Keras loads ours; we load Keras's (also through JSON).
    k_from_ours = keras.layers.BatchNormalization.from_config(o_layer.get_config())
    o_from_keras = BatchNormalization.from_config(json.loads(json.dumps(k_layer.get_config())))
    assert_configs_match(o_layer.get_config(), k_from_ours.get_config())
    assert_configs_match(o_from_keras.get_config(), k_layer.get_config())
    # Our own round trip is exact.
    assert BatchNormalization.from_config(o_layer.get_config()).get_config() == o_layer.get_config()
    assert k_from_ours.trainable == o_from_keras.trainable == o_layer.trainable

    dtype, rtol, atol = _input_dtype(variant)
    k_from_ours.build(CONFIG_SHAPE)
    o_from_keras.build(CONFIG_SHAPE)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        k_var, o_var = keras_param(k_from_ours, name), getattr(o_from_keras, name)
        assert (k_var is None) == (o_var is None), name
        if o_var is not None:
            assert o_var.dtype == k_var.dtype, f"{name}: dtype {o_var.dtype} != keras {k_var.dtype}"
    # Deterministic initializers give the same initial weights.
    config = k_layer.get_config()
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        initializer = config[f"{name}_initializer"]["class_name"]
        o_var = getattr(o_from_keras, name)
        if o_var is not None and initializer in ("Zeros", "Ones", "Constant"):
            torch.testing.assert_close(o_var.detach(), keras_param(k_from_ours, name).detach(), rtol=0, atol=0)

    generator = torch.Generator().manual_seed(_seed("config", variant))
    axis = config["axis"]
    set_state(k_from_ours, o_from_keras, random_state(CONFIG_SHAPE[axis], generator))

    def step(training: bool, what: str) -> None:
        x = random_input(CONFIG_SHAPE, generator, dtype)
        compare_call(
            k_from_ours, o_from_keras, x, generator, training, None, f"config_output_{dtype}", what, rtol, atol
        )

    for index in range(2):
        step(True, f"{variant} step {index}")
        for name in ("moving_mean", "moving_variance"):
            k_value = keras_param(k_from_ours, name)
            assert_agree(getattr(o_from_keras, name), k_value, "moving_stats", rtol=rtol, atol=atol)
    step(False, f"{variant} inference")


@pytest.mark.parametrize("axis", [-1, 1])
def test_float64_inputs_compute_in_float64(axis):
    """Ours agrees with Keras at float32 tolerance and with a float64 reference to float64 rounding.

    (Keras's own float64 result is only float32-accurate on the torch backend: its
    ``backend.result_type("float64", "float32")`` is "float32".)
    """
    from reference import batch_moments, normalize

    shape = (4, 3, 5)
    generator = torch.Generator().manual_seed(_seed("float64", axis))
    k_layer, o_layer = make_pair(shape, axis=axis, dtype="float64", momentum=0.8, epsilon=1e-3)
    state = {name: value.double() for name, value in random_state(shape[axis], generator).items()}
    set_state(k_layer, o_layer, state)
    x = (
        random_input(shape, generator, torch.float64)
        + torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-3
    )
    y = compare_call(k_layer, o_layer, x, generator, training=True, kind="float64_output")
    assert y.dtype == torch.float64
    mean, var, _ = batch_moments(x, axis)
    expected = normalize(x, axis, mean, var, state["gamma"], state["beta"], 1e-3)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        o_layer.moving_variance, state["moving_variance"] * 0.8 + var * 0.2, rtol=1e-12, atol=1e-12
    )


def test_config_of_keras_wrapper_loads():
    """Keras's serialized layer ({"class_name": ..., "config": ...}) loads too."""
    k_layer = keras.layers.BatchNormalization(name="wrapped", axis=1, momentum=0.8, center=False)
    serialized = keras.layers.serialize(k_layer)
    assert_configs_match(BatchNormalization.from_config(serialized).get_config(), k_layer.get_config())


def test_config_comparison_is_strict():
    """Guard for assert_configs_match: it does catch differences."""
    base = keras.layers.BatchNormalization(name="strict", gamma_regularizer="l1").get_config()
    assert_configs_match(BatchNormalization(name="strict", gamma_regularizer="l1").get_config(), base)
    for change in ({"axis": 1}, {"center": 1}, {"epsilon": 1.0001e-3}, {"name": "other"}, {"gamma_regularizer": None}):
        with pytest.raises(AssertionError):
            assert_configs_match({**base, **change}, base)
    with pytest.raises(AssertionError):
        assert_configs_match({k: v for k, v in base.items() if k != "renorm"}, base)


# ------------------------------------------------------------------------------ regularizers


def _regularizer(spec, lib):
    if spec is None or isinstance(spec, str):
        return spec
    cls, kwargs = spec
    return getattr(lib.regularizers, cls)(**kwargs)


REGULARIZER_CASES = [
    ("l1", "l2", True, True),
    (("L1", {"l1": 0.03}), ("L2", {"l2": 0.2}), True, True),
    (("L1L2", {"l1": 0.01, "l2": 0.05}), "l1l2", True, True),
    ("l1l2", ("L1L2", {"l1": 0.3}), True, True),
    (None, ("L1", {"l1": 0.1}), True, True),
    (("L2", {"l2": 0.3}), None, True, True),
    ("l2", "l1", False, True),  # no gamma: its regularizer contributes nothing
    ("l2", "l1", True, False),
]


@pytest.mark.parametrize("gamma_reg, beta_reg, scale, center", REGULARIZER_CASES)
def test_regularization_losses_equal_keras(gamma_reg, beta_reg, scale, center):
    shape = (4, 5)
    k_layer, o_layer = make_pair(
        shape,
        scale=scale,
        center=center,
        keras_kwargs=dict(
            gamma_regularizer=_regularizer(gamma_reg, keras), beta_regularizer=_regularizer(beta_reg, keras)
        ),
        ours_kwargs=dict(
            gamma_regularizer=_regularizer(gamma_reg, batchnorm), beta_regularizer=_regularizer(beta_reg, batchnorm)
        ),
    )
    generator = torch.Generator().manual_seed(_seed("reg", repr(gamma_reg), repr(beta_reg), scale, center))
    state = random_state(5, generator)
    state["gamma"] = torch.randn(5, generator=generator) * 2  # both signs, for l1
    set_state(k_layer, o_layer, state)

    k_losses, o_losses = k_layer.losses, o_layer.losses
    assert len(o_losses) == len(k_losses)
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for loss in o_losses)
    if not k_losses:
        return
    k_total, o_total = sum(k_losses), sum(o_losses)
    assert k_total.item() > 0
    assert_agree(o_total, k_total, "regularization", rtol=1e-6, atol=0)
    for o_loss, k_loss in zip(o_losses, k_losses):  # gamma's then beta's, as Keras
        assert_agree(o_loss, k_loss, "regularization", rtol=1e-6, atol=0)

    names = [name for name in ("gamma", "beta") if getattr(o_layer, name) is not None]
    grads_o = torch.autograd.grad(o_total, [getattr(o_layer, name) for name in names], allow_unused=True)
    grads_k = torch.autograd.grad(k_total, [keras_param(k_layer, name) for name in names], allow_unused=True)
    for name, g_o, g_k in zip(names, grads_o, grads_k):
        assert (g_o is None) == (g_k is None), name
        if g_k is not None:
            assert_agree(g_o, g_k, "regularization_grad", rtol=1e-6, atol=1e-9, what=name)
    # Recomputed on access: a new weight value gives a new loss.
    with torch.no_grad():
        for name in names:
            getattr(o_layer, name).mul_(2)
    assert not torch.allclose(sum(o_layer.losses), o_total)


# ------------------------------------------------------------------------------- constraints


def _constraint(spec, lib):
    if spec is None or isinstance(spec, str):
        return spec
    cls, kwargs = spec
    return getattr(lib.constraints, cls)(**kwargs)


CONSTRAINT_CASES = [
    ("max_norm", "non_neg"),
    (("MaxNorm", {"max_value": 1.5}), ("NonNeg", {})),
    ("min_max_norm", "unit_norm"),
    (("MinMaxNorm", {"min_value": 0.5, "max_value": 1.0, "rate": 0.7}), ("UnitNorm", {})),
    (("MinMaxNorm", {"min_value": 20.0, "max_value": 30.0}), ("MaxNorm", {"max_value": 0.5})),
    ("unit_norm", None),
    (None, "max_norm"),
]


@pytest.mark.parametrize("gamma_c, beta_c", CONSTRAINT_CASES)
def test_constraint_projections_equal_keras(gamma_c, beta_c):
    shape = (3, 6)
    k_layer, o_layer = make_pair(
        shape,
        keras_kwargs=dict(gamma_constraint=_constraint(gamma_c, keras), beta_constraint=_constraint(beta_c, keras)),
        ours_kwargs=dict(
            gamma_constraint=_constraint(gamma_c, batchnorm), beta_constraint=_constraint(beta_c, batchnorm)
        ),
    )
    generator = torch.Generator().manual_seed(_seed("constraint", repr(gamma_c), repr(beta_c)))
    state = random_state(6, generator)
    state["gamma"] = torch.randn(6, generator=generator) * 3  # norm well above 2, both signs
    state["beta"] = torch.randn(6, generator=generator) * 3
    state["beta"][0] = -abs(state["beta"][0]) - 0.1  # at least one negative entry
    set_state(k_layer, o_layer, state)

    o_layer.apply_constraints()
    for name, spec in (("gamma", gamma_c), ("beta", beta_c)):
        k_var = getattr(k_layer, name)
        if spec is None:
            assert k_var.constraint is None
            assert torch.equal(getattr(o_layer, name).detach(), state[name]), f"{name} without constraint changed"
            continue
        expected = k_var.constraint(k_var.value.detach())
        assert not torch.allclose(expected, state[name]), f"{name}: the constraint should act on these weights"
        assert_agree(getattr(o_layer, name), expected, "constraint", rtol=1e-6, atol=1e-7, what=name)
        assert isinstance(getattr(o_layer, name), torch.nn.Parameter)


# ------------------------------------------------------------------------------- sanity


def test_keras_runs_on_the_torch_backend():
    assert keras.backend.backend() == "torch"
    y = keras.layers.BatchNormalization()(torch.ones(2, 3), training=True)
    assert isinstance(y, torch.Tensor)
