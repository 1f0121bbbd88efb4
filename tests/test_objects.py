"""Initializers, regularizers and constraints, compared against Keras 3 itself."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import json
import math
import sys

import keras
import numpy as np
import pytest
import torch
from keras.src.constraints import ALL_OBJECTS_DICT as KERAS_CONSTRAINT_NAMES
from keras.src.initializers import ALL_OBJECTS_DICT as KERAS_INITIALIZER_NAMES
from keras.src.initializers.random_initializers import compute_fans as keras_compute_fans
from keras.src.regularizers import ALL_OBJECTS_DICT as KERAS_REGULARIZER_NAMES

from batchnorm import constraints as C
from batchnorm import initializers as I
from batchnorm import regularizers as R

KINDS = {
    "initializers": (I, keras.initializers, KERAS_INITIALIZER_NAMES),
    "regularizers": (R, keras.regularizers, KERAS_REGULARIZER_NAMES),
    "constraints": (C, keras.constraints, KERAS_CONSTRAINT_NAMES),
}
# Keras cannot resolve these names itself (Constant.from_config needs "value").
KERAS_CANNOT = {("initializers", "constant"), ("initializers", "Constant")}
LARGE = (200_000,)


def canonical(obj):
    """JSON text with sorted keys: equal only if keys, values and JSON types match."""
    return json.dumps(obj, sort_keys=True)


def as_keras_writes(config_dict):
    """Keras stores L1's factor as a float32 tensor, so its config shows it rounded."""
    if config_dict["class_name"] == "L1":
        config = dict(config_dict["config"], l1=float(np.float32(config_dict["config"]["l1"])))
        return dict(config_dict, config=config)
    return config_dict


def all_names():
    return [(kind, name) for kind, (ours, _, _) in KINDS.items() for name in ours._REGISTRY.names]


# -- names and serialization ------------------------------------------------------


@pytest.mark.parametrize("kind,name", all_names())
def test_every_name_serializes_as_keras(kind, name):
    ours, theirs, _ = KINDS[kind]
    mine = ours.serialize(ours.get(name))
    assert mine["module"] == f"keras.{kind}"
    if (kind, name) in KERAS_CANNOT:
        assert mine == {
            "module": "keras.initializers",
            "class_name": "Constant",
            "config": {"value": 0.0},
            "registered_name": None,
        }
        with pytest.raises(KeyError):
            theirs.get(name)
        return
    assert canonical(as_keras_writes(mine)) == canonical(theirs.serialize(theirs.get(name)))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_names_are_exactly_keras_names_for_implemented_classes(kind):
    ours, _, keras_names = KINDS[kind]
    implemented = {cls.__name__ for cls in ours._REGISTRY.classes}
    keras_side = {n for n, cls in keras_names.items() if cls.__name__ in implemented}
    assert keras_side == set(ours._REGISTRY.names)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_public_classes_are_bound_under_their_own_names(kind):
    ours, _, _ = KINDS[kind]
    for name in ours.__all__:
        obj = getattr(ours, name)
        if isinstance(obj, type):
            assert (obj.__module__, obj.__qualname__) == (ours.__name__, name)


@pytest.mark.parametrize(
    "name", ["GlorotUniform", "GlorotNormal", "HeNormal", "HeUniform", "LecunNormal", "LecunUniform"]
)
def test_variance_scaling_presets_are_keras_presets(name):
    ours, theirs = getattr(I, name)(), getattr(keras.initializers, name)()
    assert isinstance(ours, I.VarianceScaling)
    assert (ours.scale, ours.mode, ours.distribution) == (theirs.scale, theirs.mode, theirs.distribution)


KERAS_OBJECTS = [
    ("initializers", keras.initializers.Constant(3.5)),
    ("initializers", keras.initializers.Constant(2)),
    ("initializers", keras.initializers.RandomNormal(mean=1, stddev=2.5, seed=5)),
    ("initializers", keras.initializers.TruncatedNormal(mean=-1.0, stddev=0.5, seed=0)),
    ("initializers", keras.initializers.RandomUniform(minval=-2, maxval=3.0, seed=9)),
    (
        "initializers",
        keras.initializers.VarianceScaling(
            scale=2, mode="fan_out", distribution="uniform", seed=1, input_axes=[0], output_axes=[1]
        ),
    ),
    ("initializers", keras.initializers.VarianceScaling(distribution="normal")),
    ("initializers", keras.initializers.GlorotNormal(seed=4)),
    ("initializers", keras.initializers.HeUniform(input_axes=[0, 1], output_axes=[2])),
    ("regularizers", keras.regularizers.L1(0.5)),
    ("regularizers", keras.regularizers.L2(0.3)),
    ("regularizers", keras.regularizers.L1L2(l1=1, l2=None)),
    ("constraints", keras.constraints.MaxNorm(3, axis=[0, 1])),
    ("constraints", keras.constraints.MinMaxNorm(0.5, 2.0, 0.7, 1)),
    ("constraints", keras.constraints.UnitNorm(axis=-1)),
    ("constraints", keras.constraints.NonNeg()),
]


@pytest.mark.parametrize("kind,keras_obj", KERAS_OBJECTS, ids=lambda x: repr(x)[:40])
def test_keras_dicts_round_trip(kind, keras_obj):
    ours, theirs, _ = KINDS[kind]
    keras_dict = json.loads(json.dumps(theirs.serialize(keras_obj)))  # as read from a file
    mine = ours.serialize(ours.get(keras_dict))
    assert canonical(mine) == canonical(keras_dict)
    # ... and Keras loads ours back to the same object.
    assert canonical(theirs.serialize(theirs.get(mine))) == canonical(keras_dict)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({"class_name": "RandomNormal", "config": {"stddev": 1.0}}, I.RandomNormal(stddev=1.0)),
        ({"class_name": "random_normal", "config": {"mean": 2.0}}, I.RandomNormal(mean=2.0)),
        ({"class_name": "Ones"}, I.Ones()),
        ({"class_name": "Zeros", "config": None, "module": "keras.initializers"}, I.Zeros()),
        (
            {
                "class_name": "Zeros",
                "config": {},
                "module": "keras.src.initializers.constant_initializers",
                "registered_name": "Zeros",
            },
            I.Zeros(),
        ),
        ({"class_name": "l2", "config": {}}, R.L2(0.01)),
        ({"class_name": "L1L2", "config": {"l2": 0.5}, "shared_object_id": 1}, R.L1L2(0.0, 0.5)),
        ({"class_name": "max_norm", "config": {"axis": 1}}, C.MaxNorm(2, axis=1)),
    ],
)
def test_short_dicts(spec, expected):
    kind = {I.Initializer: I, R.Regularizer: R, C.Constraint: C}
    module = next(m for base, m in kind.items() if isinstance(expected, base))
    got = module.get(spec)
    assert type(got) is type(expected)
    assert got.get_config() == expected.get_config()


def test_none():
    assert R.get(None) is None and C.get(None) is None
    assert I.serialize(None) is None and R.serialize(None) is None and C.serialize(None) is None
    with pytest.raises(TypeError, match="beta_initializer=None"):
        I.get(None, argument="beta_initializer")


# -- objects and callables as identifiers -------------------------------------------


class Doubler:
    """A callable object with a config, foreign to batchnorm."""

    def __call__(self, weight):
        return 2 * weight

    def get_config(self):
        return {"factor": 2}


def half_weights(weight):
    return weight / 2


def test_instances_callables_and_classes():
    init = I.Constant(1.5)
    assert I.get(init) is init
    assert R.get(half_weights) is half_weights
    doubler = Doubler()
    assert C.get(doubler) is doubler
    assert type(I.get(I.HeNormal)) is I.HeNormal  # a class means its default instance
    assert type(R.get(Doubler)) is Doubler
    keras_init = keras.initializers.Ones()
    assert I.get(keras_init) is keras_init


def test_foreign_callables_serialize_as_records_that_do_not_load():
    record = C.serialize(Doubler())
    name = f"{__name__}.Doubler"
    assert record == {"module": None, "class_name": name, "config": {"factor": 2}, "registered_name": name}
    fn_record = R.serialize(half_weights)
    assert fn_record["class_name"] == fn_record["registered_name"] == f"{__name__}.half_weights"
    assert fn_record["config"] == {} and fn_record["module"] is None
    json.dumps([record, fn_record])
    for module, rec in ((C, record), (R, fn_record)):
        with pytest.raises(ValueError, match="nothing named in a config is imported"):
            module.get(rec)


def test_foreign_config_must_be_json():
    class Odd:
        def __call__(self, w):
            return w

        def get_config(self):
            return {"tensor": torch.ones(1)}

    with pytest.raises(TypeError, match="not JSON-serializable"):
        C.serialize(Odd())
    with pytest.raises(TypeError, match="'keras'"):
        C.serialize("keras")


def test_objects_of_another_kind_are_refused():
    with pytest.raises(TypeError, match="L2"):
        I.get(R.L2())
    with pytest.raises(TypeError, match="MaxNorm"):
        R.get(C.MaxNorm)


# -- bad identifiers ---------------------------------------------------------------

VALID = {"initializers": "Zeros", "regularizers": "L2", "constraints": "NonNeg"}
BAD = [  # "VALID" stands for a valid class name of the kind under test
    (ValueError, "no_such_thing", "no_such_thing"),
    (ValueError, "ZEROS", "ZEROS"),
    (ValueError, {"class_name": "Nope", "config": {}}, "Nope"),
    (ValueError, {"module": "os", "class_name": "system", "config": {"command": "true"}}, "os"),
    (ValueError, {"module": "builtins", "class_name": "VALID", "config": {}}, "builtins"),
    (ValueError, {"module": None, "class_name": "VALID", "config": {}}, "None"),
    (ValueError, {"class_name": "VALID", "registered_name": "pkg>Thing"}, "pkg>Thing"),
    (ValueError, {"config": {}}, "class_name"),
    (ValueError, {"class_name": "VALID", "config": {}, "extra": 1}, "extra"),
    (ValueError, {"class_name": "VALID", "config": {"bogus_key": 1}}, "bogus_key"),
    (TypeError, {"class_name": "VALID", "config": [1]}, "[1]"),
    (TypeError, 3, "3"),
    (TypeError, 1.5, "1.5"),
    (TypeError, ["zeros"], "['zeros']"),
]


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("error,identifier,shown", BAD, ids=lambda x: repr(x)[:30])
def test_bad_identifiers_name_the_value(kind, error, identifier, shown):
    ours = KINDS[kind][0]
    if isinstance(identifier, dict) and identifier.get("class_name") == "VALID":
        identifier = dict(identifier, class_name=VALID[kind])
    with pytest.raises(error) as info:
        ours.get(identifier, argument="gamma_thing")
    message = str(info.value)
    assert shown in message and "gamma_thing" in message


@pytest.mark.parametrize(
    "module,name",
    [
        (I, "orthogonal"),
        (I, "Identity"),
        (R, "orthogonal_regularizer"),
    ],
)
def test_keras_names_not_implemented_say_so(module, name):
    with pytest.raises(ValueError, match=f"'{name}' is a Keras .* does not implement"):
        module.get(name)


def test_string_of_another_kind_is_unknown():
    with pytest.raises(ValueError, match="unknown regularizer name 'zeros'"):
        R.get("zeros")


def test_config_errors_name_the_key_and_the_argument():
    with pytest.raises(ValueError, match="stdev"):
        I.get({"class_name": "RandomNormal", "config": {"stdev": 1.0}})
    with pytest.raises(ValueError, match=r"beta_regularizer=.*l2=-1"):
        R.get({"class_name": "L2", "config": {"l2": -1}}, argument="beta_regularizer")


def test_nothing_named_in_a_config_is_imported(tmp_path, monkeypatch):
    (tmp_path / "planted_module.py").write_text("raise SystemExit('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = [
        {"module": "planted_module", "class_name": "Zeros", "config": {}},
        {"module": None, "class_name": "planted_module.Thing", "config": {}, "registered_name": "planted_module.Thing"},
        {"class_name": "planted_module.Thing", "config": {}},
        "planted_module",
    ]
    for spec in specs:
        with pytest.raises(ValueError):
            I.get(spec)
    assert "planted_module" not in sys.modules


@pytest.mark.parametrize(
    "make,shown",
    [
        (lambda: R.L2(-1), "l2=-1"),
        (lambda: R.L1(float("nan")), "l1=nan"),
        (lambda: R.L1L2(l1=math.inf), "l1=inf"),
        (lambda: R.L1("0.1"), "l1='0.1'"),
        (lambda: C.MaxNorm(-0.5), "max_value=-0.5"),
        (lambda: C.MinMaxNorm(min_value=2.0, max_value=1.0), "max_value=1.0"),
        (lambda: C.MinMaxNorm(rate=1.5), "rate=1.5"),
        (lambda: C.UnitNorm(axis=1.0), "axis=1.0"),
        (lambda: C.UnitNorm(axis=[]), "axis=[]"),
        (lambda: I.VarianceScaling(scale=0), "scale=0"),
        (lambda: I.VarianceScaling(mode="fan"), "mode='fan'"),
        (lambda: I.VarianceScaling(distribution="cauchy"), "distribution='cauchy'"),
        (lambda: I.RandomUniform(1.0, 0.0), "maxval=0.0"),
        (lambda: I.RandomNormal(seed=True), "seed=True"),
        (lambda: I.RandomNormal(stddev=-1.0), "stddev=-1.0"),
        (lambda: I.Constant("2"), "value='2'"),
        (lambda: I.Zeros()((2,), "no_such_dtype"), "no_such_dtype"),
        (lambda: I.RandomNormal()((2,), torch.int32), "torch.int32"),
        (lambda: C.MaxNorm(axis=2)(torch.ones(3)), "axis=2"),
    ],
)
def test_invalid_arguments_are_named(make, shown):
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    assert shown in str(info.value)


def test_keras_style_defaults_for_none_factors():
    assert R.L1(None).l1 == 0.01 and R.L2(None).l2 == 0.01
    assert R.L1L2(None, None).get_config() == {"l1": 0.0, "l2": 0.0}
    assert I.VarianceScaling(distribution="Normal").distribution == "truncated_normal"


# -- regularizers --------------------------------------------------------------------

REGULARIZERS = [R.L1(0.3), R.L2(0.2), R.L1L2(0.1, 0.05), R.L1L2(l2=0.7), "l1", "l2", "l1l2"]


@pytest.mark.parametrize("reg", REGULARIZERS, ids=repr)
def test_regularizer_values_and_gradients_equal_keras(reg):
    mine = R.get(reg)
    theirs = keras.regularizers.get(R.serialize(mine))
    weight = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3
    w1 = weight.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    value, expected = mine(w1), theirs(w2)
    assert value.shape == () and value.dtype == torch.float32
    torch.testing.assert_close(value, torch.as_tensor(expected), rtol=1e-6, atol=0)
    if value.requires_grad:
        value.backward()
        torch.as_tensor(expected).backward()
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=0)
    else:
        assert float(value) == float(expected) == 0.0


def test_regularizer_formulas_and_dtypes():
    w = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    assert R.L1(0.5)(w).item() == pytest.approx(0.5 * 5.5)
    assert R.L2(0.5)(w).item() == pytest.approx(0.5 * 13.25)
    assert R.L1L2(0.5, 0.5)(w).dtype == torch.float64
    half = R.L2(1.0)(torch.full((4,), 200.0, dtype=torch.float16))
    assert half.dtype == torch.float32 and half.item() == 160_000.0  # no fp16 overflow


# -- constraints ---------------------------------------------------------------------

CONSTRAINTS = [
    (C.MaxNorm(1.5), (6,)),
    (C.MaxNorm(axis=[0, 1]), (3, 4, 5)),
    (C.MaxNorm(0.5, axis=1), (4, 3)),
    (C.MinMaxNorm(0.5, 1.0, 0.5, axis=1), (4, 6)),
    (C.MinMaxNorm(), (6,)),
    (C.UnitNorm(), (6,)),
    (C.UnitNorm(axis=-1), (2, 3, 4)),
    (C.NonNeg(), (4, 5)),
]


@pytest.mark.parametrize("constraint,shape", CONSTRAINTS, ids=repr)
def test_constraint_projection_equals_keras(constraint, shape):
    theirs = keras.constraints.get(C.serialize(constraint))
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2
    weight[0] = 0.0  # zero slices meet the epsilon in the denominator
    projected = constraint(weight)
    assert projected.shape == weight.shape and projected.dtype == weight.dtype
    torch.testing.assert_close(projected, torch.as_tensor(theirs(weight)), rtol=1e-6, atol=1e-7)


def test_constraint_formulas():
    gamma = torch.tensor([3.0, 4.0])  # norm 5
    torch.testing.assert_close(C.MaxNorm(1.0)(gamma), gamma * (1.0 / (1e-7 + 5.0)))
    torch.testing.assert_close(C.UnitNorm()(gamma), gamma / (1e-7 + 5.0))
    small = torch.tensor([0.3, 0.4])  # norm 0.5: MinMaxNorm(1, 2, rate 0.5) wants 0.75
    torch.testing.assert_close(C.MinMaxNorm(1.0, 2.0, 0.5)(small), small * 0.75 / (1e-7 + 0.5))
    assert C.NonNeg()(torch.tensor([-1.0, 2.0])).tolist() == [0.0, 2.0]
    half = C.MaxNorm(1.0)(gamma.half())
    assert half.dtype == torch.float16


# -- constant initializers -----------------------------------------------------------


@pytest.mark.parametrize(
    "name,args",
    [
        ("Zeros", ()),
        ("Ones", ()),
        ("Constant", (2.5,)),
        ("Constant", (-3,)),
        ("Constant", (0.1,)),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
def test_constant_initializers_equal_keras(name, args, dtype):
    shape = (3, 4)
    mine = getattr(I, name)(*args)(shape, getattr(torch, dtype))
    theirs = torch.as_tensor(getattr(keras.initializers, name)(*args)(shape, dtype))
    assert mine.dtype == theirs.dtype == getattr(torch, dtype)
    assert torch.equal(mine, theirs.cpu())


def test_default_dtype_and_shapes():
    assert I.Ones()(3).dtype == torch.float32 and I.Ones()(3).shape == (3,)
    assert I.Zeros()(torch.Size([2, 0])).shape == (2, 0)
    assert I.Constant(7)((), "float64").item() == 7.0


# -- random initializers -------------------------------------------------------------

RANDOM = [
    I.RandomNormal(mean=0.3, stddev=2.0),
    I.TruncatedNormal(mean=1.0, stddev=0.5),
    I.RandomUniform(-1.0, 3.0),
    I.VarianceScaling(scale=3.0, mode="fan_avg", distribution="untruncated_normal"),
    I.VarianceScaling(scale=0.5, mode="fan_out", distribution="uniform"),
    I.VarianceScaling(),
    I.GlorotUniform(),
    I.GlorotNormal(),
    I.HeNormal(),
    I.HeUniform(),
    I.LecunNormal(),
    I.LecunUniform(),
]


def theoretical(init, size):
    """Mean, std and bounds of the distribution, from Keras's formulas."""
    if isinstance(init, I.RandomNormal):
        return init.mean, init.stddev, None
    if isinstance(init, I.TruncatedNormal):
        return init.mean, 0.87962566103423978 * init.stddev, 2 * init.stddev
    if isinstance(init, I.RandomUniform):
        mid, half = (init.minval + init.maxval) / 2, (init.maxval - init.minval) / 2
        return mid, half / math.sqrt(3), half
    std = math.sqrt(init.scale / size)  # shape (C,): fan_in = fan_out = C
    bound = {
        "uniform": math.sqrt(3) * std,
        "untruncated_normal": None,
        "truncated_normal": 2 * std / 0.87962566103423978,
    }[init.distribution]
    return 0.0, std, bound


@pytest.mark.parametrize("init", RANDOM, ids=repr)
def test_random_moments_and_bounds(init):
    torch.manual_seed(0)
    sample = init(LARGE).double()
    mean, std, bound = theoretical(init, LARGE[0])
    assert abs(sample.mean().item() - mean) < 5 * std / math.sqrt(LARGE[0])
    assert sample.std().item() == pytest.approx(std, rel=0.01)
    if bound is not None:
        assert (sample - mean).abs().max().item() <= bound * (1 + 1e-6)
    # Keras's own sample of the same distribution agrees.
    theirs = keras.initializers.get(I.serialize(init))
    theirs_sample = torch.as_tensor(theirs(LARGE)).double()
    assert theirs_sample.std().item() == pytest.approx(sample.std().item(), rel=0.02)


@pytest.mark.parametrize(
    "init_class",
    [
        I.RandomNormal,
        I.TruncatedNormal,
        I.RandomUniform,
        I.VarianceScaling,
        I.HeUniform,
    ],
)
def test_seeds_dtypes_and_shapes(init_class):
    seeded = init_class(seed=7)
    first = seeded((4, 5))
    assert first.shape == (4, 5) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.equal(first, seeded((4, 5)))
    assert torch.equal(first, init_class.from_config(seeded.get_config())((4, 5)))
    assert not torch.equal(first, init_class(seed=8)((4, 5)))
    for dtype in (torch.float16, torch.bfloat16):  # drawn in float32, then cast
        assert torch.equal(seeded((4, 5), dtype), first.to(dtype))
    double = seeded((4, 5), "float64")  # drawn in float64
    assert double.dtype == torch.float64 and torch.equal(double, seeded((4, 5), torch.float64))
    unseeded = init_class()
    torch.manual_seed(123)
    a = unseeded((50,))
    b = unseeded((50,))
    torch.manual_seed(123)
    assert torch.equal(a, unseeded((50,))) and not torch.equal(a, b)


@pytest.mark.parametrize(
    "shape,axes",
    [
        ((), (None, None)),
        ((7,), (None, None)),
        ((3, 5), (None, None)),
        ((3, 3, 4, 8), (None, None)),
        ((2, 3, 4), ([0, 1], [2])),
        ((2, 3, 4), ([0], None)),
    ],
)
def test_fans_equal_keras(shape, axes):
    assert I.compute_fans(shape, *axes) == keras_compute_fans(shape, *axes)


def test_variance_scaling_uses_fans_for_matrices():
    init = I.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal", seed=0)
    sample = init((400, 500))
    assert sample.std().item() == pytest.approx(math.sqrt(2.0 / 500), rel=0.01)
    axes = I.VarianceScaling(mode="fan_in", distribution="uniform", seed=0, input_axes=[1], output_axes=[0])
    limit = math.sqrt(3.0 / 500)
    assert axes((400, 500)).abs().max().item() == pytest.approx(limit, rel=0.01)


@pytest.mark.parametrize(
    "obj",
    [
        I.Constant(0.25),
        I.RandomUniform(-1, 2, seed=3),
        I.GlorotNormal(seed=2, input_axes=[0], output_axes=[1]),
        R.L1L2(0.1, 0.2),
        C.MinMaxNorm(0.1, 0.9, 0.5, axis=(0, 1)),
    ],
    ids=repr,
)
def test_from_config_round_trip(obj):
    again = type(obj).from_config(obj.get_config())
    assert again.get_config() == obj.get_config()
    assert repr(again) == repr(obj)
