"""Issue 13: reading Keras 3 files (``load_keras``, ``load_keras_weights``) and live-layer conversion
(``from_keras``, ``to_keras``), against files that real Keras 3 writes during the run (KERAS_BACKEND=torch).

The Keras models are built and saved once per module (``keras_files``); each gets random weights
(moving variances and standard deviations positive), so that no weight is at its initial value and
any mix-up of layers or variables shows. Expected names, orders and HDF5 paths are worked out here
from the live Keras models (``walk``), and checked against the files themselves
(``test_walk_matches_the_files``):

* ``.keras`` order: the models' layers depth first, nested models where they stand;
* ``.weights.h5`` order: within each model its BatchNormalization layers, then its nested models
  (an ``.h5`` file does not record how the two interleave);
* HDF5 groups are ``layers/<snake_case(class)>[_k]`` with ``k`` counted per class within a model.

Covered: ``load_keras`` (names, order, configs, weights bit for bit, inference outputs; Keras not
imported), ``load_keras_weights`` for both file kinds (pairs, weights, built and unbuilt modules;
count, shape and variable-count mismatches all listed, all or nothing), ``from_keras``/``to_keras``
round trips both ways (built and unbuilt, renorm and dtype variants) and what ``to_keras`` refuses,
bad files of every kind (ValueError naming the path; nothing written to the model or beside the
file), a missing file (FileNotFoundError, docs/behaviour.md section 15), and h5py or Keras missing.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import h5py
import keras
import numpy as np
import pytest
import torch
from state import assert_state_equal, assert_unbuilt, snapshot
from test_keras_oracle import _variant_kwargs, assert_configs_match

import batchnorm
from batchnorm import BatchNormalization

# Keras's torch backend converts its variables with np.array(variable) when saving (NumPy 2 warns).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept:DeprecationWarning")

WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
POSITIVE = {"gamma", "moving_variance", "moving_stddev", "renorm_stddev"}
ATOL = 1e-5


# ------------------------------------------------------------------------------------ helpers


def snake_case(name: str) -> str:
    """As keras.src.utils.naming.to_snake_case."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclass
class Entry:
    """A Keras BatchNormalization layer of a saved model."""

    name: str  # as load_keras keys it: nested model names joined by "/"
    layer: keras.layers.BatchNormalization
    h5: str  # its group in the weights file, e.g. "layers/sequential/layers/batch_normalization_1"


@dataclass
class Walk:
    keras_order: list[Entry] = field(default_factory=list)  # .keras: layer order, depth first
    h5_order: list[Entry] = field(default_factory=list)  # .weights.h5: own BN layers, then nested models


def walk(model, prefix: str = "", h5_prefix: str = "") -> Walk:
    result = Walk()
    counters: Counter = Counter()
    nested: list[Walk] = []
    for layer in model.layers:
        key = snake_case(type(layer).__name__)
        group = key if counters[key] == 0 else f"{key}_{counters[key]}"
        counters[key] += 1
        path = f"{h5_prefix}layers/{group}"
        if isinstance(layer, keras.layers.BatchNormalization):
            entry = Entry(prefix + layer.name, layer, path)
            result.keras_order.append(entry)
            result.h5_order.append(entry)
        elif isinstance(layer, keras.Model):
            inner = walk(layer, f"{prefix}{layer.name}/", f"{path}/")
            result.keras_order.extend(inner.keras_order)
            nested.append(inner)
    for inner in nested:
        result.h5_order.extend(inner.h5_order)
    return result


def to_torch(value) -> torch.Tensor:
    """A Keras variable's value or a Keras output (torch backend) as a plain CPU tensor."""
    value = getattr(value, "value", value)
    return torch.as_tensor(value).detach().cpu().clone()


def keras_weights(layer) -> dict[str, torch.Tensor]:
    return {name: to_torch(v) for name in WEIGHT_NAMES if (v := getattr(layer, name, None)) is not None}


def our_weights(layer: BatchNormalization) -> dict[str, torch.Tensor]:
    return {name: v.detach().clone() for name in WEIGHT_NAMES if (v := getattr(layer, name, None)) is not None}


def assert_same_weights(ours: dict, theirs: dict, what: str) -> None:
    assert set(ours) == set(theirs), f"{what}: weights {sorted(ours)} != keras {sorted(theirs)}"
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype, f"{what} {name}: dtype {ours[name].dtype} != keras {value.dtype}"
        assert torch.equal(ours[name], value), f"{what} {name}: {ours[name]} != keras {value}"


def randomize(variables, rng: np.random.Generator) -> None:
    """Random values for Keras variables: positive for scales and (standard) deviations."""
    for variable in variables:
        shape = tuple(variable.shape)
        name = variable.name.split("/")[-1]
        if name in POSITIVE:
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 1.0, shape)
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def randomize_ours(layer: BatchNormalization, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, value in our_weights(layer).items():
            fresh = torch.rand(value.shape, generator=generator) * 1.5 + 0.5
            if name not in POSITIVE:
                fresh = torch.randn(value.shape, generator=generator)
            getattr(layer, name).copy_(fresh.to(value.dtype))


def build_shape(layer) -> tuple[int, ...]:
    """The Keras layer's build input shape, with 3 for the batch (and any unknown) dimension."""
    return tuple(3 if d is None else d for d in layer.get_build_config()["input_shape"])


def channels(layer) -> int:
    shape = layer.get_build_config()["input_shape"]
    return shape[layer.axis]


# ------------------------------------------------------------------------------ the Keras files


BN = keras.layers.BatchNormalization
CLIPPING = {"rmax": 3.0, "rmin": 0.3, "dmax": 2.0}


def _functional():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5)(inputs)
    x = BN(name="f_bn0", momentum=0.9, epsilon=1e-2)(x)
    x = keras.layers.Dense(5)(x)
    x = BN(name="f_bn1", center=False)(x)
    x = BN(name="f_bn2", scale=False)(x)
    x = BN(name="f_bn3", center=False, scale=False)(x)
    x = keras.layers.Dense(4)(x)
    x = BN(name="f_bn4", renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.9)(x)
    x = BN(renorm=True, center=False)(x)  # default name
    x = BN(name="f_bn6", renorm=True, center=False, scale=False)(x)
    x = BN(name="f_bn7", gamma_regularizer="l2", beta_constraint="non_neg", moving_variance_initializer="zeros")(x)
    return keras.Model(inputs, x, name="functional_model")


def _conv():
    inputs = keras.Input((7, 7, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = BN(name="c_bn0")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 3)(x)
    x = BN(name="c_bn1", axis=1, scale=False)(x)  # channels on axis 1: 3 of them
    x = BN(name="c_bn2", renorm=True)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4)(x)
    x = BN(name="c_bn3", center=False, axis=-1)(x)
    return keras.Model(inputs, x, name="conv_model")


def _many():
    """A Sequential of 12 BatchNormalization layers of the same width (default names), after Dense layers."""
    layers = [keras.Input((4,))]
    for i in range(13):
        layers.append(keras.layers.Dense(4))
        if i == 12:
            break
        kwargs = [{}, {"center": False}, {"scale": False}, {"center": False, "scale": False}][i % 4]
        layers.append(BN(renorm=i in (5, 10), **kwargs))
    return keras.Sequential(layers, name="many_model")


def _nested():
    """Functional > Sequential "backbone" > Functional "block" (two levels), a second Sequential, and
    BatchNormalization layers before, between and after them."""
    block_in = keras.Input((6,))
    y = BN(name="bn_f1", center=False)(block_in)
    y = keras.layers.Dense(6)(y)
    y = BN(name="bn_f2", renorm=True)(y)
    block = keras.Model(block_in, y, name="block")
    backbone = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(6), BN(name="bn_s1"), block, BN(name="bn_s2", scale=False)],
        name="backbone",
    )
    neck = keras.Sequential([keras.Input((6,)), BN(name="bn_n1")], name="neck")
    inputs = keras.Input((6,))
    x = keras.layers.Dense(6)(inputs)
    x = BN(name="bn_top")(x)
    x = backbone(x)
    x = BN(name="bn_mid", center=False, scale=False)(x)
    x = neck(x)
    x = BN(name="bn_out")(x)
    return keras.Model(inputs, x, name="nested_model")


def _nested_sequential():
    """Sequential > Functional "head"."""
    head_in = keras.Input((5,))
    y = keras.layers.Dense(3)(head_in)
    y = BN(name="h_bn0")(y)
    y = BN(name="h_bn1", renorm=True, scale=False)(y)
    head = keras.Model(head_in, y, name="head")
    return keras.Sequential(
        [keras.Input((5,)), BN(name="s_bn0"), head, keras.layers.Dense(3), BN(name="s_bn1", center=False)],
        name="nested_sequential_model",
    )


def _no_bn():
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3)(keras.layers.Dense(4)(inputs))
    return keras.Model(inputs, x, name="no_bn_model")


BUILDERS = {
    "functional": _functional,
    "conv": _conv,
    "many": _many,
    "nested": _nested,
    "nested_sequential": _nested_sequential,
}
MODELS = list(BUILDERS)


@dataclass
class Saved:
    model: keras.Model
    keras_path: str
    weights_path: str
    walk: Walk


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory) -> dict[str, Saved]:
    directory = tmp_path_factory.mktemp("keras_files")
    rng = np.random.default_rng(13)
    files = {}
    for name, builder in {**BUILDERS, "no_bn": _no_bn}.items():
        model = builder()
        randomize(model.weights, rng)
        keras_path, weights_path = str(directory / f"{name}.keras"), str(directory / f"{name}.weights.h5")
        model.save(keras_path)
        model.save_weights(weights_path)
        files[name] = Saved(model, keras_path, weights_path, walk(model))
    return files


@pytest.fixture
def scratch(tmp_path):
    """A directory for edited copies, checked to hold nothing new after the test's call."""
    return tmp_path


def test_walk_matches_the_files(keras_files):
    """The harness's expectations agree with what Keras wrote (names, groups, counts, 12+ layers)."""
    for name in MODELS:
        saved = keras_files[name]
        entries = saved.walk.keras_order
        assert sorted(e.h5 for e in entries) == sorted(e.h5 for e in saved.walk.h5_order)
        with h5py.File(saved.weights_path, "r") as file:
            groups: list[str] = []
            file.visit(groups.append)
            bn_groups = [p for p in groups if re.search(r"(^|/)batch_normalization(_\d+)?$", p)]
            assert sorted(bn_groups) == sorted(e.h5 for e in entries), name
            for entry in entries:
                assert file[entry.h5 + "/vars"].attrs["name"] == entry.layer.name
                stored = [np.asarray(file[f"{entry.h5}/vars/{i}"]) for i in range(len(file[entry.h5 + "/vars"]))]
                expected = [to_torch(w).numpy() for w in entry.layer.weights]
                assert len(stored) == len(expected) and all(np.array_equal(a, b) for a, b in zip(stored, expected))
        with zipfile.ZipFile(saved.keras_path) as archive:
            assert {"config.json", "model.weights.h5"} <= set(archive.namelist())
    many = keras_files["many"].walk.h5_order
    assert len(many) == 12 and many[10].h5 == "layers/batch_normalization_10" and many[11].h5.endswith("_11")
    nested = keras_files["nested"].walk
    assert [e.name for e in nested.keras_order] == [
        "bn_top",
        "backbone/bn_s1",
        "backbone/block/bn_f1",
        "backbone/block/bn_f2",
        "backbone/bn_s2",
        "bn_mid",
        "neck/bn_n1",
        "bn_out",
    ]
    assert [e.h5 for e in nested.h5_order] == [
        "layers/batch_normalization",
        "layers/batch_normalization_1",
        "layers/batch_normalization_2",
        "layers/sequential/layers/batch_normalization",
        "layers/sequential/layers/batch_normalization_1",
        "layers/sequential/layers/functional/layers/batch_normalization",
        "layers/sequential/layers/functional/layers/batch_normalization_1",
        "layers/sequential_1/layers/batch_normalization",
    ]
    # Nothing is at its initial value (moving_variance_initializer="zeros" for f_bn7 included).
    for name in MODELS:
        for entry in keras_files[name].walk.keras_order:
            for weight_name, value in keras_weights(entry.layer).items():
                assert not torch.all(value == 0) and not torch.all(value == 1), (entry.name, weight_name)


# --------------------------------------------------------------------------------- load_keras


@pytest.mark.parametrize("model_name", MODELS)
def test_load_keras_names_order_configs(keras_files, model_name):
    saved = keras_files[model_name]
    loaded = batchnorm.load_keras(saved.keras_path)
    assert isinstance(loaded, dict)
    assert list(loaded) == [e.name for e in saved.walk.keras_order]
    for entry in saved.walk.keras_order:
        layer = loaded[entry.name]
        assert type(layer) is BatchNormalization, entry.name
        assert layer.built, entry.name
        assert_configs_match(layer.get_config(), entry.layer.get_config(), f"{entry.name}.config")


@pytest.mark.parametrize("model_name", MODELS)
def test_load_keras_weights_are_bit_for_bit(keras_files, model_name):
    saved = keras_files[model_name]
    loaded = batchnorm.load_keras(saved.keras_path)
    for entry in saved.walk.keras_order:
        assert_same_weights(our_weights(loaded[entry.name]), keras_weights(entry.layer), entry.name)


@pytest.mark.parametrize("model_name", MODELS)
def test_load_keras_inference_equals_keras(keras_files, model_name):
    saved = keras_files[model_name]
    loaded = batchnorm.load_keras(saved.keras_path)
    generator = torch.Generator().manual_seed(len(model_name))
    for entry in saved.walk.keras_order:
        x = torch.randn(build_shape(entry.layer), generator=generator)
        expected = to_torch(entry.layer(x, training=False))
        with torch.no_grad():
            ours = loaded[entry.name](x, training=False)
        torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL, msg=lambda m, n=entry.name: f"{n}: {m}")


def test_load_keras_does_not_import_keras(keras_files, monkeypatch):
    saved = keras_files["nested"]
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` raises ImportError now
    loaded = batchnorm.load_keras(saved.keras_path)
    assert list(loaded) == [e.name for e in saved.walk.keras_order]


def test_load_keras_accepts_path_objects(keras_files):
    import pathlib

    saved = keras_files["functional"]
    assert list(batchnorm.load_keras(pathlib.Path(saved.keras_path))) == [e.name for e in saved.walk.keras_order]


# ------------------------------------------------------------------------- load_keras_weights


class Net(torch.nn.Module):
    """Our layers in a given order, each in a block after a Linear layer (which must be left alone)."""

    def __init__(self, layers):
        super().__init__()
        self.stem = torch.nn.Linear(3, 3)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(2, 2), layer) for layer in layers)


def net_for(entries: list[Entry], changes: dict | None = None) -> Net:
    """``changes``: index -> ("channels", n) to build that layer with n channels, or constructor changes."""
    layers = []
    for i, entry in enumerate(entries):
        change = (changes or {}).get(i, {})
        config = {**entry.layer.get_config(), **{k: v for k, v in change.items() if k != "channels"}}
        layer = BatchNormalization.from_config(config)
        shape = list(build_shape(entry.layer))
        if "channels" in change:
            shape[entry.layer.axis] = change["channels"]
        layer.build(tuple(shape))
        layers.append(layer)
    return Net(layers)


def module_name(i: int) -> str:
    return f"blocks.{i}.1"


def file_order(saved: Saved, kind: str) -> tuple[str, list[Entry]]:
    return (saved.keras_path, saved.walk.keras_order) if kind == "keras" else (saved.weights_path, saved.walk.h5_order)


@pytest.mark.parametrize("kind", ["keras", "weights.h5"])
@pytest.mark.parametrize("model_name", MODELS)
def test_load_keras_weights_assigns_in_keras_order(keras_files, model_name, kind):
    path, entries = file_order(keras_files[model_name], kind)
    net = net_for(entries)
    others = {k: v.clone() for k, v in net.state_dict().items() if not k.endswith(tuple(WEIGHT_NAMES))}
    pairs = batchnorm.load_keras_weights(net, path)
    assert [tuple(p) for p in pairs] == [(module_name(i), e.h5) for i, e in enumerate(entries)]
    for i, entry in enumerate(entries):
        assert_same_weights(our_weights(net.blocks[i][1]), keras_weights(entry.layer), f"{module_name(i)} {entry.h5}")
    after = net.state_dict()
    for key, value in others.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("kind", ["keras", "weights.h5"])
def test_load_keras_weights_into_unbuilt_layers(keras_files, kind):
    """Unbuilt layers of ours take the file's weights (built by them) and then compute as Keras."""
    path, entries = file_order(keras_files["conv"], kind)
    layers = [BatchNormalization.from_config(e.layer.get_config()) for e in entries]
    pairs = batchnorm.load_keras_weights(Net(layers), path)
    assert [tuple(p) for p in pairs] == [(module_name(i), e.h5) for i, e in enumerate(entries)]
    generator = torch.Generator().manual_seed(5)
    for layer, entry in zip(layers, entries):
        assert layer.built
        assert_same_weights(our_weights(layer), keras_weights(entry.layer), entry.name)
        x = torch.randn(build_shape(entry.layer), generator=generator)
        with torch.no_grad():
            actual = layer(x, training=False)
        torch.testing.assert_close(actual, to_torch(entry.layer(x, training=False)), rtol=0, atol=ATOL)


def test_weights_h5_order_differs_from_keras_order(keras_files):
    """Guard: the nested models make the two orders differ, so each file kind is tested for its own."""
    for name in ("nested", "nested_sequential"):
        walked = keras_files[name].walk
        assert [e.h5 for e in walked.keras_order] != [e.h5 for e in walked.h5_order]


def test_load_keras_weights_without_keras_import(keras_files, monkeypatch):
    path, entries = file_order(keras_files["nested"], "weights.h5")
    net = net_for(entries)
    monkeypatch.setitem(sys.modules, "keras", None)
    assert len(batchnorm.load_keras_weights(net, path)) == len(entries)


def names(message: str, token: str) -> bool:
    """``token`` (a module name, a Keras path, a number) stands in ``message`` as a whole: not as a
    part of a longer name ("blocks.1.1" in "blocks.11.1", "layers/batch_normalization_1" in
    "layers/batch_normalization_10" or in "layers/functional/layers/batch_normalization_1")."""
    return re.search(rf"(?<![\w.])(?<!\w/){re.escape(token)}(?![\w]|\.\d)", message) is not None


def assert_refused(call, path: str, net: torch.nn.Module | None = None, mentions=()) -> str:
    """``call()`` raises ValueError naming ``path`` (and each of ``mentions``); ``net`` and the file's
    directory are left exactly as they were. Returns the message."""
    directory = os.path.dirname(path)
    listing = sorted(os.listdir(directory))
    before = snapshot(net) if net is not None else None
    with pytest.raises(ValueError) as raised:
        call()
    message = str(raised.value)
    assert path in message, f"the path is not named: {message}"
    for mention in mentions:
        alternatives = mention if isinstance(mention, tuple) else (mention,)
        assert any(names(message, m) for m in alternatives), f"none of {alternatives} in: {message}"
    if net is not None:
        assert_state_equal(before, net)
    assert sorted(os.listdir(directory)) == listing, "a file was written"
    return message


@pytest.mark.parametrize("kind", ["keras", "weights.h5"])
@pytest.mark.parametrize("extra", [-1, 1], ids=["one_too_few", "one_too_many"])
def test_load_keras_weights_count_mismatch(keras_files, kind, extra):
    path, entries = file_order(keras_files["many"], kind)
    model_entries = entries[:-1] if extra < 0 else [*entries, entries[0]]
    net = net_for(model_entries)
    assert_refused(
        lambda: batchnorm.load_keras_weights(net, path),
        path,
        net,
        mentions=[str(len(entries)), str(len(model_entries))],
    )


@pytest.mark.parametrize("kind", ["keras", "weights.h5"])
def test_load_keras_weights_shape_mismatches_are_all_listed(keras_files, kind):
    """Layer 2 has 5 channels instead of 4, layer 11 (the last, so a partial write would show) has
    beta where the file has none: both are listed, and nothing is written."""
    path, entries = file_order(keras_files["many"], kind)
    assert not entries[11].layer.center and channels(entries[2].layer) == 4
    net = net_for(entries, {2: {"channels": 5}, 11: {"center": True}})
    assert_refused(
        lambda: batchnorm.load_keras_weights(net, path),
        path,
        net,
        mentions=[(module_name(2), entries[2].h5 + "/"), (module_name(11), entries[11].h5)],
    )


@pytest.mark.parametrize("kind", ["keras", "weights.h5"])
def test_load_keras_weights_renorm_mismatch(keras_files, kind):
    """The file's renorm layer (7 variables) against a layer of ours without renorm (4), and the reverse."""
    path, entries = file_order(keras_files["nested_sequential"], kind)
    renorm = [i for i, e in enumerate(entries) if e.layer.renorm]
    plain = [i for i, e in enumerate(entries) if not e.layer.renorm]
    net = net_for(entries, {renorm[0]: {"renorm": False}, plain[-1]: {"renorm": True}})
    assert_refused(
        lambda: batchnorm.load_keras_weights(net, path),
        path,
        net,
        mentions=[(module_name(renorm[0]), entries[renorm[0]].h5), (module_name(plain[-1]), entries[plain[-1]].h5)],
    )


# ----------------------------------------------------------------------- from_keras / to_keras


RENORM_VARIANTS = {
    "renorm": dict(renorm=True),
    "renorm_clipped_no_center": dict(renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.8, center=False),
    "renorm_no_scale_no_center_axis1": dict(renorm=True, center=False, scale=False, axis=1),
}
ROUND_TRIP_VARIANTS = [
    "defaults",
    "axis1_momentum_epsilon",
    "no_center",
    "no_scale_no_center_axis0",
    "initializers_by_object",
    "regularizers",
    "constraints",
    "more_constraints",
    "not_trainable",
    "float64",
    "mixed_float16",
    *RENORM_VARIANTS,
]
DTYPE_VARIANTS = ("float64", "mixed_float16")
SHAPE = (4, 3, 5)


def variant_kwargs(variant: str, lib) -> dict:
    return dict(RENORM_VARIANTS[variant]) if variant in RENORM_VARIANTS else _variant_kwargs(variant, lib)


def assert_same_keras_layers(k_new, k_old) -> None:
    assert type(k_new) is keras.layers.BatchNormalization
    assert k_new.get_config() == k_old.get_config()
    assert k_new.built == k_old.built
    if k_old.built:
        new_shape, old_shape = k_new.get_build_config()["input_shape"], k_old.get_build_config()["input_shape"]
        assert tuple(new_shape) == tuple(old_shape)
    assert_same_weights(keras_weights(k_new), keras_weights(k_old), k_old.name)


def assert_same_our_layers(new: BatchNormalization, old: BatchNormalization) -> None:
    """Equal configs (floats to float32 rounding: through Keras, ``L1(0.2)`` comes back as
    ``L1(0.20000000298023224)``, Keras keeping the factor in float32), flags and weights."""
    assert type(new) is BatchNormalization
    assert_configs_match(new.get_config(), old.get_config())
    assert new.built == old.built
    if old.built:
        assert_same_weights(our_weights(new), our_weights(old), old.name)
    else:
        assert_unbuilt(new)


def assert_matches_keras(ours: BatchNormalization, k_layer, x: torch.Tensor | None) -> None:
    assert_configs_match(ours.get_config(), k_layer.get_config())
    assert ours.built == k_layer.built
    if not k_layer.built:
        assert_unbuilt(ours)
        return
    assert_same_weights(our_weights(ours), keras_weights(k_layer), k_layer.name)
    if x is None:  # dtype variants: their outputs are compared in test_keras_oracle
        return
    expected = to_torch(k_layer(x, training=False))
    with torch.no_grad():
        actual = ours(x, training=False)
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
@pytest.mark.parametrize("variant", ROUND_TRIP_VARIANTS)
def test_keras_to_ours_to_keras(variant, built):
    k_layer = keras.layers.BatchNormalization(name=f"k_{variant}", **variant_kwargs(variant, keras))
    x = None
    if built:
        k_layer.build(SHAPE)
        randomize(k_layer.weights, np.random.default_rng(len(variant)))
        x = None if variant in DTYPE_VARIANTS else torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ours = batchnorm.from_keras(k_layer)
    assert_matches_keras(ours, k_layer, x)
    assert_same_keras_layers(batchnorm.to_keras(ours), k_layer)


@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
@pytest.mark.parametrize("variant", ROUND_TRIP_VARIANTS)
def test_ours_to_keras_to_ours(variant, built):
    ours = BatchNormalization(name=f"o_{variant}", **variant_kwargs(variant, batchnorm))
    x = None
    if built:
        ours.build(SHAPE)
        randomize_ours(ours, torch.Generator().manual_seed(len(variant)))
        x = None if variant in DTYPE_VARIANTS else torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    k_layer = batchnorm.to_keras(ours)
    assert type(k_layer) is keras.layers.BatchNormalization
    assert_matches_keras(ours, k_layer, x)
    if built:
        assert tuple(k_layer.get_build_config()["input_shape"]) == SHAPE
    assert_same_our_layers(batchnorm.from_keras(k_layer), ours)


def test_from_keras_of_a_loaded_keras_model_layer(keras_files):
    """from_keras on the layers of a model Keras itself loaded equals load_keras of the same file."""
    saved = keras_files["conv"]
    reloaded = keras.saving.load_model(saved.keras_path)
    loaded = batchnorm.load_keras(saved.keras_path)
    for entry in walk(reloaded).keras_order:
        ours = batchnorm.from_keras(entry.layer)
        assert_same_our_layers(ours, loaded[entry.name])


@pytest.mark.parametrize(
    "kwargs",
    [dict(axis=[1, 2]), dict(axis=(1, -1)), dict(virtual_batch_size=2), dict(synchronized=True)],
    ids=["list_axis", "tuple_axis", "virtual_batch_size", "synchronized"],
)
@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
def test_to_keras_refuses_what_keras_cannot_hold(kwargs, built):
    ours = BatchNormalization(**kwargs)
    if built:
        ours.build((4, 3, 5))
    with pytest.raises(ValueError):
        batchnorm.to_keras(ours)


def test_to_keras_without_keras(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(ImportError, match="pip install keras"):
        batchnorm.to_keras(BatchNormalization())


# -------------------------------------------------------------------------------- bad files


def rezip(source: str, target, drop=(), replace=None) -> str:
    """A copy of the archive ``source`` without the members ``drop`` and with ``replace`` ({name: bytes})."""
    replace = replace or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            if name not in drop:
                new.writestr(name, replace.get(name, old.read(name)))
    return str(target)


def edited_keras(source: str, target, edit_h5=None, edit_config=None) -> str:
    """A copy of ``source`` whose model.weights.h5 went through ``edit_h5(h5py.File)`` and whose config
    through ``edit_config(dict)``."""
    with zipfile.ZipFile(source) as archive:
        weights, config = archive.read("model.weights.h5"), json.loads(archive.read("config.json"))
    if edit_h5 is not None:
        buffer = io.BytesIO(weights)
        with h5py.File(buffer, "r+") as file:
            edit_h5(file)
        weights = buffer.getvalue()
    if edit_config is not None:
        edit_config(config)
    return rezip(source, target, replace={"model.weights.h5": weights, "config.json": json.dumps(config)})


def edited_weights(source: str, target, edit_h5) -> str:
    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as file:
        edit_h5(file)
    return str(target)


def drop_variable(group: str, index: int, renumber: bool = True):
    """Delete ``vars/<index>``; renumbered, the keys are 0..n-2 (as a layer with one variable fewer
    has), else they have a gap."""

    def edit(file):
        variables = file[group + "/vars"]
        count = len(variables)
        del variables[str(index)]
        for i in range(index + 1, count if renumber else index + 1):
            variables.move(str(i), str(i - 1))

    return edit


def reshape_variable(group: str, index: int):
    def edit(file):
        variables = file[group + "/vars"]
        value = np.asarray(variables[str(index)])
        del variables[str(index)]
        variables[str(index)] = np.concatenate([value, value[:1]])

    return edit


def variable_as_group(group: str, index: int):
    def edit(file):
        del file[f"{group}/vars/{index}"]
        file[f"{group}/vars"].create_group(str(index))

    return edit


def drop_group(group: str):
    def edit(file):
        del file[group]

    return edit


def find_layer_config(config: dict, name: str) -> dict:
    """The config dict of the layer named ``name``, anywhere in a model config."""
    if isinstance(config, dict):
        if config.get("class_name") == "BatchNormalization" and config.get("config", {}).get("name") == name:
            return config["config"]
        values = config.values()
    elif isinstance(config, list):
        values = config
    else:
        return None
    for value in values:
        found = find_layer_config(value, name)
        if found is not None:
            return found
    return None


def strip_layer_config(name: str):
    """The serialized BatchNormalization ``name`` without its "config" (class_name only)."""

    def edit(config):
        def strip(node):
            if isinstance(node, dict):
                if node.get("class_name") == "BatchNormalization" and node.get("config", {}).get("name") == name:
                    del node["config"]
                    return True
                return any(strip(v) for v in node.values())
            return isinstance(node, list) and any(strip(v) for v in node)

        assert strip(config), name

    return edit


def set_layer_config(name: str, **changes):
    def edit(config):
        layer_config = find_layer_config(config, name)
        assert layer_config is not None, name
        layer_config.update(changes)

    return edit


def bad_file(kind: str, keras_files, directory) -> tuple[str, Saved]:
    """A bad file of ``kind`` in ``directory`` (or a real one without BatchNormalization), and the
    model whose intact file it was made from."""
    nested = keras_files["nested"]
    source, weights = nested.keras_path, nested.weights_path
    bn_f2 = "layers/sequential/layers/functional/layers/batch_normalization_1"  # backbone/block/bn_f2, renorm
    bn_s1 = "layers/sequential/layers/batch_normalization"
    assert next(e for e in nested.walk.keras_order if e.h5 == bn_f2).name == "backbone/block/bn_f2"
    if kind in ("not_a_zip", "empty_file", "not_hdf5", "truncated_keras", "truncated_weights_h5"):
        path = directory / ("bad.weights.h5" if "h5" in kind or kind == "not_hdf5" else "bad.keras")
        content = {
            "not_a_zip": b"this is not a zip archive\n" * 10,
            "empty_file": b"",
            "not_hdf5": b"this is not an HDF5 file\n" * 100,
            "truncated_keras": open(source, "rb").read(),
            "truncated_weights_h5": open(weights, "rb").read(),
        }[kind]
        path.write_bytes(content[: len(content) // 2] if kind.startswith("truncated") else content)
        return str(path), nested
    if kind == "zip_of_other_things":
        path = directory / "other.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
        return str(path), nested
    with zipfile.ZipFile(source) as archive:
        h5_bytes = archive.read("model.weights.h5")
    target = directory / f"{kind}.keras"
    edits = {
        "truncated_h5_in_keras": lambda: rezip(
            source, target, replace={"model.weights.h5": h5_bytes[: len(h5_bytes) // 2]}
        ),
        "h5_in_keras_not_hdf5": lambda: rezip(source, target, replace={"model.weights.h5": b"not hdf5" * 100}),
        "no_config": lambda: rezip(source, target, drop=["config.json"]),
        "config_not_json": lambda: rezip(source, target, replace={"config.json": b"{not json"}),
        "config_not_a_model": lambda: rezip(source, target, replace={"config.json": b"[1, 2]"}),
        "config_layer_without_config": lambda: edited_keras(source, target, edit_config=strip_layer_config("bn_s1")),
        "variable_is_a_group": lambda: edited_keras(source, target, edit_h5=variable_as_group(bn_s1, 0)),
        "no_weights": lambda: rezip(source, target, drop=["model.weights.h5"]),
        "variable_dropped": lambda: edited_keras(source, target, edit_h5=drop_variable(bn_s1, 3)),
        "renorm_variable_dropped": lambda: edited_keras(source, target, edit_h5=drop_variable(bn_f2, 6)),
        "variable_gap": lambda: edited_keras(source, target, edit_h5=drop_variable(bn_s1, 1, renumber=False)),
        "variable_reshaped": lambda: edited_keras(source, target, edit_h5=reshape_variable(bn_s1, 2)),
        "group_dropped": lambda: edited_keras(source, target, edit_h5=drop_group(bn_f2)),
        # The config says 3 variables, the file holds 4; 4 and 7.
        "config_center_off": lambda: edited_keras(source, target, edit_config=set_layer_config("bn_s1", center=False)),
        "config_renorm_off": lambda: edited_keras(source, target, edit_config=set_layer_config("bn_f2", renorm=False)),
    }
    if kind in edits:
        return edits[kind](), nested
    if kind == "config_axis_other":  # c_bn0's build shape (None, 5, 5, 4): 5 channels on axis 1, the file 4
        conv = keras_files["conv"]
        return edited_keras(conv.keras_path, target, edit_config=set_layer_config("c_bn0", axis=1)), conv
    if kind == "no_batch_normalization":
        return keras_files["no_bn"].keras_path, nested
    if kind == "weights_h5_no_batch_normalization":
        return keras_files["no_bn"].weights_path, nested
    raise AssertionError(kind)


KERAS_BAD = [
    "not_a_zip",
    "zip_of_other_things",
    "empty_file",
    "truncated_keras",
    "truncated_h5_in_keras",
    "h5_in_keras_not_hdf5",
    "no_config",
    "config_not_json",
    "config_not_a_model",
    "config_layer_without_config",
    "no_weights",
    "variable_dropped",
    "renorm_variable_dropped",
    "variable_gap",
    "variable_is_a_group",
    "variable_reshaped",
    "group_dropped",
    "config_center_off",
    "config_renorm_off",
    "config_axis_other",
    "no_batch_normalization",
]
WEIGHTS_BAD = ["not_hdf5", "truncated_weights_h5", "weights_h5_no_batch_normalization"]


@pytest.mark.parametrize("kind", KERAS_BAD)
def test_load_keras_refuses_bad_files(keras_files, scratch, kind):
    path, _ = bad_file(kind, keras_files, scratch)
    assert_refused(lambda: batchnorm.load_keras(path), path)


@pytest.mark.parametrize("kind", KERAS_BAD + WEIGHTS_BAD)
def test_load_keras_weights_refuses_bad_files(keras_files, scratch, kind):
    """Against a model that fits the intact file: nothing is written to it."""
    path, source = bad_file(kind, keras_files, scratch)
    net = net_for(source.walk.h5_order if path.endswith(".weights.h5") else source.walk.keras_order)
    assert_refused(lambda: batchnorm.load_keras_weights(net, path), path, net)


def test_bad_files_are_bad_only_where_edited(keras_files, scratch):
    """Guard: Keras itself loads the intact file; an edited copy of the same file with no edit loads."""
    nested = keras_files["nested"]
    path = edited_keras(nested.keras_path, scratch / "same.keras", edit_h5=lambda f: None, edit_config=lambda c: None)
    assert list(batchnorm.load_keras(path)) == [e.name for e in nested.walk.keras_order]
    copy = edited_weights(nested.weights_path, scratch / "same.weights.h5", lambda f: None)
    assert len(batchnorm.load_keras_weights(net_for(nested.walk.h5_order), copy)) == len(nested.walk.h5_order)


@pytest.mark.parametrize("name", ["absent.keras", "absent.weights.h5"])
def test_missing_file_is_file_not_found(keras_files, scratch, name):
    """docs/behaviour.md section 15: a missing file is a FileNotFoundError (for both functions)."""
    path = str(scratch / name)
    nested = keras_files["nested"]
    net = net_for(nested.walk.keras_order)
    before = snapshot(net)
    for call in (lambda: batchnorm.load_keras(path), lambda: batchnorm.load_keras_weights(net, path)):
        with pytest.raises(FileNotFoundError) as raised:
            call()
        assert path in str(raised.value)
    assert_state_equal(before, net)
    assert os.listdir(scratch) == []


# ------------------------------------------------------------------------------ without h5py


def test_without_h5py(keras_files, monkeypatch):
    saved = keras_files["functional"]
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` raises ImportError now
    with pytest.raises(ImportError, match=re.escape("batchnorm[keras]")):
        batchnorm.load_keras(saved.keras_path)
    net = net_for(saved.walk.keras_order)
    before = snapshot(net)
    for path in (saved.keras_path, saved.weights_path):
        with pytest.raises(ImportError, match=re.escape("batchnorm[keras]")):
            batchnorm.load_keras_weights(net, path)
    assert_state_equal(before, net)


# ----------------------------------------------------- files that Keras writes, read with care


def _save(model, path) -> str:
    for index, weight in enumerate(model.weights):  # every weight its own value, none at its start
        weight.assign(np.full(weight.shape, index + 1.5, "float32"))
    model.save(path)
    return str(path)


def test_a_shared_layer_is_read_once_where_keras_saved_it(tmp_path):
    shared = keras.layers.BatchNormalization(name="shared")
    inputs = keras.Input((4,))
    nested = keras.Sequential([keras.Input((4,)), shared], name="nested")
    path = _save(keras.Model(inputs, nested(shared(inputs))), tmp_path / "shared.keras")
    layers = batchnorm.load_keras(path)
    assert list(layers) == ["shared"]
    torch.testing.assert_close(layers["shared"].moving_mean, torch.from_numpy(shared.moving_mean.numpy()))


@pytest.mark.parametrize("policy", ["bfloat16", "float16", "mixed_bfloat16"])
def test_16_bit_layers_load_exactly(tmp_path, policy):
    layer = keras.layers.BatchNormalization(dtype=policy)
    path = _save(keras.Sequential([keras.Input((3,)), layer]), tmp_path / "m.keras")
    (ours,) = batchnorm.load_keras(path).values()
    for name in ours._weights():
        expected = torch.from_numpy(getattr(layer, name).numpy().astype("float32")).to(ours.weight_dtype)
        assert torch.equal(getattr(ours, name), expected), name


def test_a_wrapped_batch_normalization_and_a_subclassed_model_are_named(tmp_path):
    wrapped = keras.Sequential([keras.Input((2, 3)), keras.layers.TimeDistributed(keras.layers.BatchNormalization())])
    with pytest.raises(ValueError, match=r"wrapped\.keras.*TimeDistributed.*wraps a BatchNormalization"):
        batchnorm.load_keras(_save(wrapped, tmp_path / "wrapped.keras"))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    model = Subclassed()
    model(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match=r"lists no layers \(a subclassed model\?\).*load_keras_weights"):
        batchnorm.load_keras(_save(model, tmp_path / "subclassed.keras"))


def _weights_file(path, make_gamma) -> str:
    """A .weights.h5 file of one BatchNormalization of 3 channels whose gamma ``make_gamma(vars)`` writes."""
    with h5py.File(path, "w") as file:
        variables = file.create_group("layers/batch_normalization/vars")
        make_gamma(variables)
        for index in (1, 2, 3):
            variables[str(index)] = np.ones(3, "float32")
    return str(path)


def test_links_external_data_and_shape_bombs_are_refused_unread(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"API_KEY=hunter2!")
    other = _weights_file(tmp_path / "other.weights.h5", lambda v: v.create_dataset("0", data=np.ones(3, "float32")))
    attacks = {
        "external data": lambda v: v.create_dataset("0", (4,), "float32", external=[(str(secret), 0, 16)]),
        "soft link": lambda v: v.__setitem__("0", h5py.SoftLink("/layers/batch_normalization/vars/1")),
        "external link": lambda v: v.__setitem__("0", h5py.ExternalLink(other, "/layers/batch_normalization/vars/0")),
        "shape bomb": lambda v: v.create_dataset("0", (2**28,), "float32", chunks=(2**20,), compression="gzip"),
    }
    for kind, make_gamma in attacks.items():
        model = torch.nn.Sequential(BatchNormalization())
        model(torch.randn(2, 3))
        before = snapshot(model)
        path = _weights_file(tmp_path / f"{kind}.weights.h5", make_gamma)
        with pytest.raises(ValueError, match=r"refused"):
            batchnorm.load_keras_weights(model, path)
        assert_state_equal(before, model)


def test_an_unzipped_save_is_named(tmp_path):
    folder = tmp_path / "model_folder"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"model_folder: a directory"):
        batchnorm.load_keras(folder)


@pytest.mark.parametrize("axis", [1, -2])
def test_to_keras_of_a_layer_built_by_load_state_dict_asks_for_its_rank(axis):
    source = BatchNormalization(axis=axis, moving_mean_initializer="random_normal")
    source.build((2, 3, 4))
    loaded = BatchNormalization(axis=axis)
    loaded.load_state_dict(source.state_dict())  # built, its rank unknown: Keras would fix a guess
    with pytest.raises(ValueError, match=r"built by load_state_dict.*call layer.build"):
        batchnorm.to_keras(loaded)
    loaded.build((None, 3, 4))
    keras_layer = batchnorm.to_keras(loaded)
    assert np.array_equal(keras_layer.moving_mean.numpy(), source.moving_mean.numpy())
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    expected = source(torch.from_numpy(x), training=False).detach().numpy()
    got = keras.ops.convert_to_numpy(keras_layer(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
