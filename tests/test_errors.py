"""Every bad input in the SPEC: the named error, a message naming the argument and the value, and
nothing changed (a built layer keeps every buffer and parameter bit for bit; an unbuilt layer
stays unbuilt).
"""

from __future__ import annotations

import re

import pytest
import torch
from state import assert_state_equal, assert_unbuilt, snapshot

from batchnorm import BatchNormalization


def built_layer(shape=(2, 3, 4, 5), axis=1, **kwargs) -> BatchNormalization:
    """A built layer whose weights and moving statistics are not the defaults."""
    bn = BatchNormalization(axis=axis, **kwargs)
    bn.build(shape)
    channels = shape[axis]
    with torch.no_grad():
        bn.gamma.copy_(torch.linspace(0.5, 2.0, channels))
        bn.beta.copy_(torch.linspace(-1.0, 1.0, channels))
        bn.moving_mean.copy_(torch.linspace(-3.0, 3.0, channels))
        bn.moving_variance.copy_(torch.linspace(0.25, 4.0, channels))
    return bn


def shape_text(shape) -> str:
    return re.escape(str(tuple(shape)))


# ------------------------------------------------------------------------------ constructor


@pytest.mark.parametrize("axis", [True, False, "1", "-1", 1.7, 1.0, [1.0], (True,), None, torch.tensor(1)])
def test_axis_must_be_an_int(axis):
    with pytest.raises(TypeError, match=rf"axis.*{re.escape(repr(axis))}"):
        BatchNormalization(axis=axis)


@pytest.mark.parametrize("momentum", [1.5, -0.1, 1.0000001, -1e-9, float("nan"), float("inf"), -float("inf"), 2])
def test_momentum_outside_unit_interval(momentum):
    with pytest.raises(ValueError, match=rf"momentum.*{re.escape(repr(momentum))}"):
        BatchNormalization(momentum=momentum)


@pytest.mark.parametrize("momentum", ["0.9", None, [0.9], True, False, 0.9j])
def test_momentum_not_a_number(momentum):
    with pytest.raises(TypeError, match=rf"momentum.*{re.escape(repr(momentum))}"):
        BatchNormalization(momentum=momentum)


@pytest.mark.parametrize("momentum", [0, 0.0, 1, 1.0, 0.5])
def test_momentum_bounds_are_accepted(momentum):
    assert BatchNormalization(momentum=momentum).momentum == momentum


@pytest.mark.parametrize("epsilon", [0, 0.0, -0.0, -1e-3, -1, float("nan"), -float("inf")])
def test_epsilon_must_be_positive(epsilon):
    with pytest.raises(ValueError, match=rf"epsilon.*{re.escape(repr(epsilon))}"):
        BatchNormalization(epsilon=epsilon)


@pytest.mark.parametrize("epsilon", ["1e-3", None, True, [1e-3]])
def test_epsilon_not_a_number(epsilon):
    with pytest.raises(TypeError, match=rf"epsilon.*{re.escape(repr(epsilon))}"):
        BatchNormalization(epsilon=epsilon)


def test_tiny_positive_epsilon_is_accepted():
    assert BatchNormalization(epsilon=1e-12).epsilon == 1e-12


@pytest.mark.parametrize(
    "argument",
    ["beta_initializer", "gamma_initializer", "moving_mean_initializer", "moving_variance_initializer"],
)
@pytest.mark.parametrize(
    "identifier",
    [
        "no_such_initializer",
        "l2",
        "Zeros ",
        {"class_name": "NoSuchInitializer", "config": {}},
        {"class_name": "Constant", "config": {"value": 1.0, "bogus": 2}},
        {"module": "os", "class_name": "Constant", "config": {}},
        {"class_name": "Zeros", "config": {}, "registered_name": "my_package>Zeros"},
    ],
)
def test_unknown_initializer(argument, identifier):
    label = identifier if isinstance(identifier, str) else identifier["class_name"]
    with pytest.raises(ValueError, match=rf"{argument}.*{re.escape(label)}"):
        BatchNormalization(**{argument: identifier})


@pytest.mark.parametrize("argument", ["beta_regularizer", "gamma_regularizer"])
@pytest.mark.parametrize(
    "identifier",
    [
        "no_such_regularizer",
        "zeros",
        "max_norm",
        {"class_name": "NoSuchRegularizer", "config": {}},
        {"class_name": "L2", "config": {"l2": 0.1, "bogus": 1}},
        {"module": "subprocess", "class_name": "L2", "config": {}},
    ],
)
def test_unknown_regularizer(argument, identifier):
    label = identifier if isinstance(identifier, str) else identifier["class_name"]
    with pytest.raises(ValueError, match=rf"{argument}.*{re.escape(label)}"):
        BatchNormalization(**{argument: identifier})


@pytest.mark.parametrize("argument", ["beta_constraint", "gamma_constraint"])
@pytest.mark.parametrize(
    "identifier",
    [
        "no_such_constraint",
        "l2",
        "ones",
        {"class_name": "NoSuchConstraint", "config": {}},
        {"class_name": "MaxNorm", "config": {"max_value": 2.0, "bogus": 1}},
        {"module": "builtins", "class_name": "NonNeg", "config": {}},
    ],
)
def test_unknown_constraint(argument, identifier):
    label = identifier if isinstance(identifier, str) else identifier["class_name"]
    with pytest.raises(ValueError, match=rf"{argument}.*{re.escape(label)}"):
        BatchNormalization(**{argument: identifier})


@pytest.mark.parametrize(
    "dtype",
    [
        torch.int32,
        torch.int64,
        torch.bool,
        torch.complex64,
        "int32",
        "float8",
        "complex64",
        "Float32",
        {"class_name": "DTypePolicy", "config": {"name": "int8"}},
        {"class_name": "NotAPolicy", "config": {"name": "float32"}},
    ],
)
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match=rf"dtype.*{re.escape(repr(dtype))}"):
        BatchNormalization(dtype=dtype)


# --------------------------------------------------------------------------------- call: axis


@pytest.mark.parametrize(
    "axis,shape", [(2, (3, 4)), (-3, (3, 4)), (1, (5,)), (-2, (5,)), (4, (2, 3, 4, 5)), (-5, (2, 3, 4, 5))]
)
@pytest.mark.parametrize("training", [True, False])
def test_axis_out_of_range_names_axis_and_shape_and_builds_nothing(axis, shape, training):
    bn = BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=rf"axis\D*{axis}\b") as info:
        bn(torch.randn(shape), training=training)
    assert str(tuple(shape)) in str(info.value)
    assert_unbuilt(bn)
    # The same layer still works on an input of a suitable rank.
    good = tuple(shape) + (3,) * (abs(axis) + 1)
    bn(torch.randn(good), training=training)
    assert bn.built


@pytest.mark.parametrize("axis,shape", [(2, (3, 4)), (-3, (3, 4))])
def test_build_with_axis_out_of_range_names_axis_and_shape(axis, shape):
    bn = BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=rf"axis\D*{axis}\b.*{shape_text(shape)}"):
        bn.build(shape)
    assert not bn.built


# -------------------------------------------------------------------- call: shape after build


def assert_names_built_and_received(message: str, received, built_shape, channels: int) -> None:
    """The message names the received shape and the shape the layer was built for (that shape
    itself, or its rank and channel count, however phrased)."""
    assert str(tuple(received)) in message, message
    rest = message.replace(str(tuple(received)), "")
    if str(tuple(built_shape)) in rest:
        return
    rank = len(built_shape)
    assert re.search(rf"\b{rank}\b", rest), f"built shape {built_shape} (rank {rank}) not named: {message}"
    assert re.search(rf"\b{channels}\b", rest), f"built shape {built_shape} ({channels} channels) not named: {message}"


@pytest.mark.parametrize(
    "received",
    [(6, 7, 8), (6, 3, 8), (6, 3, 8, 9, 7), (6, 7, 8, 9), (6, 3), (6, 9, 8, 9)],
)
@pytest.mark.parametrize("training", [True, False])
def test_call_with_other_rank_or_channels_after_build(received, training):
    bn = built_layer((2, 3, 4, 5), axis=1)  # rank 4, 3 channels
    before = snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(received), training=training)
    assert_names_built_and_received(str(info.value), received, (2, 3, 4, 5), 3)
    assert_state_equal(before, bn)


@pytest.mark.parametrize("received", [(6, 7), (7,)])
def test_call_whose_rank_puts_the_axis_out_of_range_after_build(received):
    # Built for rank 4 with 5 channels on axis 3; a rank-2 input makes axis 3 out of range too.
    # SPEC 2: once built, a call whose rank differs raises ValueError naming both shapes.
    bn = built_layer((2, 3, 4, 5), axis=3)
    before = snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(received), training=True)
    assert_names_built_and_received(str(info.value), received, (2, 3, 4, 5), 5)
    assert_state_equal(before, bn)


@pytest.mark.parametrize("training", [True, False])
def test_channel_change_on_negative_axis_after_lazy_build(training):
    bn = BatchNormalization(axis=-1)
    bn(torch.randn(4, 6), training=True)
    before = snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(4, 7), training=training)
    assert_names_built_and_received(str(info.value), (4, 7), (4, 6), 6)
    assert_state_equal(before, bn)


# ---------------------------------------------------------------------------------- call: mask


BAD_MASKS = [
    # (input shape, axis, mask shape): wrong rank or a non-broadcastable dimension.
    ((4, 3), -1, (4, 3)),  # the input's own shape
    ((4, 3), -1, ()),
    ((4, 3), 0, (4,)),  # channel size where the other axis (3) belongs
    ((5, 3, 4), 1, (5, 3, 4)),
    ((5, 3, 4), 1, (5,)),
    ((5, 3, 4), 1, (5, 3)),  # the channel axis kept instead of the last
    ((5, 3, 4), 1, (4, 5)),  # transposed
    ((5, 3, 4), 1, (2, 4)),
    ((5, 3, 4), -1, (5, 4)),
    ((5, 3, 4), 0, (5, 4)),
    ((4, 3, 5, 2), 2, (4, 3, 2, 1)),
    ((4, 3, 5, 2), 2, (4, 3, 5)),
    ((4, 3, 5, 2), -3, (4, 3, 2)),  # the mask for axis 2, not for axis -3 (= 1)
    ((4, 3, 5, 2), 0, (3, 5, 3)),
    ((4, 3, 5, 2), 1, (1, 1, 1, 1)),
]


@pytest.mark.parametrize("shape,axis,mask_shape", BAD_MASKS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_bad_mask_names_both_shapes_in_training_and_inference(shape, axis, mask_shape, training, mask_dtype):
    bn = built_layer(shape, axis)
    before = snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(shape), training=training, mask=torch.ones(mask_shape, dtype=mask_dtype))
    message = str(info.value)
    assert "mask" in message
    assert str(tuple(mask_shape)) in message, message
    assert str(tuple(shape)) in message, message
    assert_state_equal(before, bn)


@pytest.mark.parametrize("shape,axis,mask_shape", BAD_MASKS[:6])
def test_bad_mask_on_unbuilt_layer_builds_nothing(shape, axis, mask_shape):
    bn = BatchNormalization(axis=axis)
    with pytest.raises(ValueError, match=r"mask"):
        bn(torch.randn(shape), training=True, mask=torch.ones(mask_shape, dtype=torch.bool))
    assert not bn.built
    assert_unbuilt(bn)


def test_bad_mask_in_eval_mode_with_training_none():
    bn = built_layer((5, 3, 4), 1).eval()
    before = snapshot(bn)
    with pytest.raises(ValueError, match=re.escape("(4, 5)")):
        bn(torch.randn(5, 3, 4), mask=torch.ones(4, 5))
    assert_state_equal(before, bn)


def test_bad_mask_on_frozen_layer_still_raises():
    bn = built_layer((5, 3, 4), 1)
    bn.trainable = False
    before = snapshot(bn)
    with pytest.raises(ValueError, match=re.escape("(5, 3)")):
        bn(torch.randn(5, 3, 4), training=True, mask=torch.ones(5, 3))
    assert_state_equal(before, bn)


# ----------------------------------------------------------------------------- load_state_dict


def checkpoint(channels=3, **overrides):
    state = {
        "gamma": torch.full((channels,), 2.0),
        "beta": torch.full((channels,), 0.5),
        "moving_mean": torch.full((channels,), 7.0),
        "moving_variance": torch.full((channels,), 9.0),
    }
    state.update(overrides)
    return state


@pytest.mark.parametrize("key", ["gamma", "beta", "moving_mean", "moving_variance"])
def test_load_state_dict_wrong_shape_into_built_layer_names_key_and_shapes(key):
    bn = built_layer((2, 3, 4, 5), axis=1)
    before = snapshot(bn)
    with pytest.raises((RuntimeError, ValueError)) as info:
        bn.load_state_dict(checkpoint(**{key: torch.ones(4)}))
    message = str(info.value)
    assert key in message
    assert re.search(r"\b4\b", message) and re.search(r"\b3\b", message), message
    # The other three entries, well shaped, must not have been loaded either.
    assert_state_equal(before, bn)


def test_load_state_dict_all_wrong_shapes_into_built_layer_changes_nothing():
    bn = built_layer((2, 3, 4, 5), axis=1)
    before = snapshot(bn)
    with pytest.raises((RuntimeError, ValueError), match=r"moving_variance"):
        bn.load_state_dict(checkpoint(channels=5))
    assert_state_equal(before, bn)


def test_load_state_dict_missing_key_into_built_layer_names_it_and_changes_nothing():
    bn = built_layer((2, 3, 4, 5), axis=1)
    before = snapshot(bn)
    state = checkpoint()
    del state["moving_variance"]
    with pytest.raises((RuntimeError, ValueError), match=r"moving_variance"):
        bn.load_state_dict(state)
    assert_state_equal(before, bn)


def test_load_state_dict_inconsistent_shapes_into_unbuilt_layer_leaves_it_unbuilt():
    bn = BatchNormalization(axis=1)
    with pytest.raises((RuntimeError, ValueError)) as info:
        bn.load_state_dict(checkpoint(gamma=torch.ones(4)))
    message = str(info.value)
    # Which entry is "wrong" is a matter of choice here (4 channels or 3?): the message must name
    # an entry and both sizes.
    assert any(key in message for key in ("gamma", "beta", "moving_mean", "moving_variance")), message
    assert re.search(r"\b4\b", message) and re.search(r"\b3\b", message), message
    assert not bn.built
    assert_unbuilt(bn)


def test_load_state_dict_non_vector_into_unbuilt_layer_names_key_and_shape():
    bn = BatchNormalization(axis=1)
    state = {key: torch.ones(3, 2) for key in ("gamma", "beta", "moving_mean", "moving_variance")}
    with pytest.raises((RuntimeError, ValueError)) as info:
        bn.load_state_dict(state)
    message = str(info.value)
    assert "moving_variance" in message
    assert re.search(r"3, 2", message), f"the checkpoint's shape (3, 2) is not named: {message}"
    assert not bn.built


# ----------------------------------------------------------------------------- from_config


def test_from_config_unknown_keys_are_named():
    config = BatchNormalization(axis=1).get_config()
    config.update(frobnicate=1, zzz_extra="x")
    with pytest.raises(ValueError, match=r"frobnicate") as info:
        BatchNormalization.from_config(config)
    assert "zzz_extra" in str(info.value)


def test_from_config_unknown_key_in_keras_wrapper():
    config = {"class_name": "BatchNormalization", "config": {**BatchNormalization().get_config(), "bogus_key": 3}}
    with pytest.raises(ValueError, match=r"bogus_key"):
        BatchNormalization.from_config(config)


@pytest.mark.parametrize("extra", [{}, {"renorm_clipping": {"rmax": 3.0}, "renorm_momentum": 0.9}])
def test_from_config_renorm_round_trips(extra):
    config = {**BatchNormalization().get_config(), "renorm": True, **extra}
    layer = BatchNormalization.from_config(config)
    assert layer.renorm and layer.get_config() == {**config, "renorm_clipping": extra.get("renorm_clipping", {})}


def test_from_config_renorm_false_is_accepted():
    config = {**BatchNormalization().get_config(), "renorm": False, "renorm_clipping": None, "renorm_momentum": 0.5}
    assert isinstance(BatchNormalization.from_config(config), BatchNormalization)


@pytest.mark.parametrize("extra", [{"fused": True}, {"fused": None}, {"adjustment": None}])
def test_from_config_accepts_tf_keras_choices_that_change_nothing(extra):
    config = {**BatchNormalization().get_config(), **extra}
    assert BatchNormalization.from_config(config).get_config() == BatchNormalization().get_config() | {
        "name": config["name"]
    }


def test_from_config_refuses_an_adjustment():
    config = {**BatchNormalization().get_config(), "adjustment": "my_module.adjust"}
    with pytest.raises(ValueError, match=r"adjustment"):
        BatchNormalization.from_config(config)


def test_from_config_takes_tf_keras_list_axis_and_virtual_batch_size():
    config = {**BatchNormalization().get_config(), "axis": [1, 3], "virtual_batch_size": 4}
    layer = BatchNormalization.from_config(config)
    assert layer.axis == [1, 3] and layer.virtual_batch_size == 4 and layer.get_config() == config


@pytest.mark.parametrize(
    "key,value,error",
    [
        ("axis", "1", TypeError),
        ("axis", 1.5, TypeError),
        ("momentum", 2.0, ValueError),
        ("epsilon", 0.0, ValueError),
        ("dtype", "int32", ValueError),
        ("dtype", {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "int8"}}, ValueError),
        ("gamma_initializer", "no_such_initializer", ValueError),
        ("beta_regularizer", {"class_name": "NoSuchRegularizer", "config": {}}, ValueError),
        ("gamma_constraint", "no_such_constraint", ValueError),
    ],
)
def test_from_config_bad_values_raise_the_constructor_errors(key, value, error):
    config = {**BatchNormalization().get_config(), key: value}
    with pytest.raises(error, match=key):
        BatchNormalization.from_config(config)


# ----------------------------------------------------------------- a failed call keeps state


def test_failed_calls_in_sequence_leave_a_trained_layer_intact():
    bn = built_layer((5, 3, 4), 1)
    bn(torch.randn(5, 3, 4), training=True)  # some real training state first
    before = snapshot(bn)
    failures = [
        lambda: bn(torch.randn(5, 4, 4), training=True),
        lambda: bn(torch.randn(5, 3), training=True),
        lambda: bn(torch.randn(5, 3, 4), training=True, mask=torch.ones(5, 3)),
        lambda: bn(torch.randn(5, 3, 4), training=False, mask=torch.ones(5, 4, 1)),
    ]
    for failure in failures:
        with pytest.raises(ValueError):
            failure()
        assert_state_equal(before, bn)
    # Still usable afterwards.
    bn(torch.randn(5, 3, 4), training=True, mask=torch.ones(5, 4))
    assert not torch.equal(bn.moving_mean, before["moving_mean"])


def test_build_on_a_built_layer_checks_the_shape_and_writes_nothing():
    layer = BatchNormalization(axis=1, moving_mean_initializer="random_normal")
    layer.build((2, 3, 4))
    before = snapshot(layer)
    for shape in [(2, 5, 4), (2, 3, 4, 4)]:
        with pytest.raises(ValueError, match=r"built for channel sizes \(3,\) and rank 3"):
            layer.build(shape)
    layer.build((7, 3, 9))  # the same channels and rank: nothing to do
    assert_state_equal(before, layer)
    loaded = BatchNormalization(axis=1)
    loaded.load_state_dict(layer.state_dict())  # built, its rank not fixed yet
    with pytest.raises(ValueError, match=r"built for channel sizes \(3,\), received"):
        loaded.build((2, 4))
    loaded.build((2, 3, 5, 5))
    assert loaded(torch.randn(2, 3, 5, 5)).shape == (2, 3, 5, 5)


def test_from_config_reads_keras_3_4_float_dtype_policies():
    policy = {"module": "keras", "class_name": "FloatDTypePolicy", "config": {"name": "mixed_float16"}}
    layer = BatchNormalization.from_config({**BatchNormalization().get_config(), "dtype": policy})
    assert layer.weight_dtype == torch.float32 and layer.get_config()["dtype"]["config"]["name"] == "mixed_float16"
