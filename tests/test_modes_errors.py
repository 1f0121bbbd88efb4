"""Every bad argument of SPEC 10-12 (renorm, ghost batches, several axes), as ``test_errors.py``:
the named error type, a message naming the argument and the value received, and nothing changed
(a built layer keeps every buffer bit for bit; an unbuilt layer stays unbuilt).
"""

from __future__ import annotations

import re

import pytest
import torch
from modes_support import make_layer, random_input
from state import assert_state_equal, assert_unbuilt, snapshot

from batchnorm import BatchNormalization


def names(message: str, *parts) -> None:
    for part in parts:
        assert str(part) in message, f"{part!r} not named in: {message}"


# ------------------------------------------------------------------------ renorm_clipping


@pytest.mark.parametrize("renorm", [True, False])  # validated whether or not renorm is on
@pytest.mark.parametrize(
    "clipping,parts",
    [
        ({"rmax": 2.0, "bogus": 1.0}, ["bogus"]),
        ({"r_max": 2.0}, ["r_max"]),
        ({"RMAX": 2.0}, ["RMAX"]),
        ({"rmax": 0.5, "rmin": 0.9}, ["rmax", "rmin", "0.5", "0.9"]),
        ({"rmax": 1.0, "rmin": 1.0000001}, ["rmax", "rmin", "1.0000001"]),
        ({"dmax": -0.1}, ["dmax", "-0.1"]),
        ({"dmax": -1, "rmax": 3}, ["dmax", "-1"]),
    ],
)
def test_renorm_clipping_bad_key_or_value(clipping, parts, renorm):
    with pytest.raises(ValueError) as info:
        BatchNormalization(renorm=renorm, renorm_clipping=clipping)
    names(str(info.value), "renorm_clipping", *parts)


@pytest.mark.parametrize("clipping", [[("rmax", 2.0)], "rmax", 3.0, ("rmax",)])
def test_renorm_clipping_not_a_dict(clipping):
    with pytest.raises(TypeError, match=rf"renorm_clipping.*{re.escape(repr(clipping))}"):
        BatchNormalization(renorm=True, renorm_clipping=clipping)


@pytest.mark.parametrize("key", ["rmax", "rmin", "dmax"])
@pytest.mark.parametrize("value", ["2", [2.0], True, 1j])
def test_renorm_clipping_value_not_a_real_number(key, value):
    with pytest.raises(TypeError) as info:
        BatchNormalization(renorm=True, renorm_clipping={key: value})
    names(str(info.value), key, repr(value))


@pytest.mark.parametrize("clipping", [None, {}, {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}, {"rmin": 0.5}, {"dmax": 3}])
def test_renorm_clipping_accepted(clipping):
    bn = BatchNormalization(renorm=True, renorm_clipping=clipping)
    assert bn.get_config()["renorm_clipping"] == (clipping or {})


# ------------------------------------------------------------------ renorm_momentum, renorm


@pytest.mark.parametrize("momentum", [1.5, -0.1, 1.0000001, float("nan"), float("inf"), 2])
def test_renorm_momentum_outside_unit_interval(momentum):
    with pytest.raises(ValueError, match=rf"renorm_momentum.*{re.escape(repr(momentum))}"):
        BatchNormalization(renorm=True, renorm_momentum=momentum)


@pytest.mark.parametrize("momentum", ["0.9", None, [0.9], True])
def test_renorm_momentum_not_a_number(momentum):
    with pytest.raises(TypeError, match=rf"renorm_momentum.*{re.escape(repr(momentum))}"):
        BatchNormalization(renorm=True, renorm_momentum=momentum)


@pytest.mark.parametrize("momentum", [0, 0.0, 1, 1.0, 0.5])
def test_renorm_momentum_bounds_are_accepted(momentum):
    assert BatchNormalization(renorm=True, renorm_momentum=momentum).get_config()["renorm_momentum"] == momentum


@pytest.mark.parametrize("renorm", ["yes", 1, None])
def test_renorm_must_be_a_bool(renorm):
    with pytest.raises(TypeError, match=rf"renorm.*{re.escape(repr(renorm))}"):
        BatchNormalization(renorm=renorm)


# --------------------------------------------------------------------- virtual_batch_size


@pytest.mark.parametrize("size", [0, -1, -8])
def test_virtual_batch_size_must_be_positive(size):
    with pytest.raises(ValueError, match=rf"virtual_batch_size.*{re.escape(repr(size))}"):
        BatchNormalization(virtual_batch_size=size)


@pytest.mark.parametrize("size", [True, False, 2.0, "2", [2]])
def test_virtual_batch_size_must_be_an_int(size):
    with pytest.raises(TypeError, match=rf"virtual_batch_size.*{re.escape(repr(size))}"):
        BatchNormalization(virtual_batch_size=size)


@pytest.mark.parametrize("axis", [0, [0], (1, 0), [2, 0, 1]])
def test_virtual_batch_size_with_the_batch_axis_at_construction(axis):
    with pytest.raises(ValueError) as info:
        BatchNormalization(axis=axis, virtual_batch_size=2)
    names(str(info.value), "axis", "virtual_batch_size")


@pytest.mark.parametrize("axis,shape", [(-3, (4, 3, 5)), ([1, -4], (4, 3, 5, 2)), ((-2,), (4, 3))])
@pytest.mark.parametrize("how", ["build", "call"])
def test_virtual_batch_size_with_an_axis_resolving_to_0_at_build(axis, shape, how):
    bn = BatchNormalization(axis=axis, virtual_batch_size=2)
    with pytest.raises(ValueError) as info:
        if how == "build":
            bn.build(shape)
        else:
            bn(torch.randn(shape), training=True)
    names(str(info.value), "axis", "virtual_batch_size")
    assert_unbuilt(bn)


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("batch,size", [(6, 4), (5, 2), (2, 4), (7, 3)])
def test_ghost_size_not_dividing_the_batch_changes_nothing(batch, size, renorm):
    bn = make_layer((batch, 3, 5), 1, virtual_batch_size=size, renorm=renorm)
    before = snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(random_input((batch, 3, 5)), training=True)
    message = str(info.value)
    names(message, "virtual_batch_size")
    assert re.search(rf"\b{batch}\b", message) and re.search(rf"\b{size}\b", message), message
    assert_state_equal(before, bn)
    # With a mask, and masked out entirely, it is still an error.
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn(random_input((batch, 3, 5)), training=True, mask=torch.zeros(batch, 5))
    assert_state_equal(before, bn)
    # Inference takes any batch size.
    bn(random_input((batch, 3, 5)), training=False)
    assert_state_equal(before, bn)


def test_ghost_size_not_dividing_the_batch_on_an_unbuilt_layer_builds_nothing():
    bn = BatchNormalization(axis=1, virtual_batch_size=4)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn(torch.randn(6, 3, 5), training=True)
    assert_unbuilt(bn)
    bn(torch.randn(8, 3, 5), training=True)
    assert bn.built


# ------------------------------------------------------------------------- several axes


@pytest.mark.parametrize("axis", [[], ()])
def test_empty_axis_list(axis):
    # Not settled by the SPEC: ValueError (a bad value of the right type) or TypeError (not "an int
    # or a non-empty list/tuple of ints", the core's choice). Either, naming the argument and value.
    with pytest.raises((TypeError, ValueError), match=rf"axis.*{re.escape(repr(axis))}"):
        BatchNormalization(axis=axis)


@pytest.mark.parametrize("axis", [[1, 1], (2, 3, 2), [-1, -1]])
def test_duplicate_axes_given_literally_at_construction(axis):
    with pytest.raises(ValueError, match=rf"axis.*{re.escape(repr(axis))}"):
        BatchNormalization(axis=axis)


@pytest.mark.parametrize("axis", [[1, "2"], (1.0,), [True, 2], [1, None], [[1], 2], {1, 2}, {1: 2}])
def test_axis_list_of_non_ints(axis):
    with pytest.raises(TypeError, match=r"axis"):
        BatchNormalization(axis=axis)


@pytest.mark.parametrize(
    "axis,shape",
    [
        ([1, 4], (2, 3, 4, 5)),
        ([-5, 1], (2, 3, 4, 5)),
        ((1, 3), (2, 3, 4)),
        ([1, -3], (2, 3, 4, 5)),  # -3 is 1 at rank 4: a duplicate after normalizing
        ([3, -1], (2, 3, 4, 5)),
        ([0, -2], (4, 3)),
    ],
)
@pytest.mark.parametrize("how", ["build", "call", "call in inference"])
def test_list_axes_out_of_range_or_duplicate_at_build_build_nothing(axis, shape, how):
    bn = BatchNormalization(axis=axis, renorm=True)
    with pytest.raises(ValueError) as info:
        if how == "build":
            bn.build(shape)
        else:
            bn(torch.randn(shape), training=how == "call")
    message = str(info.value)
    names(message, "axis", repr(axis))
    if any(not -len(shape) <= a < len(shape) for a in axis):
        names(message, str(tuple(shape)))  # SPEC 2: out of range names the axis and the shape
    assert_unbuilt(bn)


@pytest.mark.parametrize(
    "mask_shape",
    [(4, 5, 2), (4, 3), (4,), (4, 2, 5), (2, 5), (4, 3, 5, 2), ()],
)
@pytest.mark.parametrize("training", [True, False])
def test_mask_that_does_not_fit_several_axes(mask_shape, training):
    shape, axis = (4, 3, 5, 2), (1, 3)  # the mask must be (4, 5) or broadcast to it
    bn = make_layer(shape, axis, renorm=True)
    before = snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(random_input(shape), training=training, mask=torch.ones(mask_shape, dtype=torch.bool))
    names(str(info.value), "mask", str(tuple(mask_shape)), str(tuple(shape)))
    assert_state_equal(before, bn)


@pytest.mark.parametrize("received", [(4, 3, 5, 3), (4, 2, 5, 2), (4, 3, 5), (4, 3, 5, 2, 1)])
def test_several_axes_call_with_other_sizes_after_build(received):
    bn = make_layer((4, 3, 5, 2), (1, 3), renorm=True, virtual_batch_size=2)
    before = snapshot(bn)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(received), training=True)
    names(str(info.value), str(tuple(received)))
    assert_state_equal(before, bn)


# ---------------------------------------------------------------------------- from_config


@pytest.mark.parametrize(
    "key,value,error",
    [
        ("renorm_clipping", {"rmax": 1.0, "bogus": 2.0}, ValueError),
        ("renorm_clipping", {"dmax": -1.0}, ValueError),
        ("renorm_momentum", 1.5, ValueError),
        ("renorm", "yes", TypeError),
        ("virtual_batch_size", 0, ValueError),
        ("virtual_batch_size", 2.5, TypeError),
        ("axis", [1, 1], ValueError),
        ("axis", [], (TypeError, ValueError)),
    ],
)
def test_from_config_bad_mode_values_raise_the_constructor_errors(key, value, error):
    config = {**BatchNormalization(axis=1, renorm=True).get_config(), key: value}
    with pytest.raises(error, match=key):
        BatchNormalization.from_config(config)


def test_a_clipping_bound_of_none_clips_nothing_and_nan_is_refused():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * 3 + 2
    with_none = BatchNormalization(renorm=True, renorm_clipping={"rmax": None, "dmax": 0.5})
    without = BatchNormalization(renorm=True, renorm_clipping={"dmax": 0.5})
    torch.testing.assert_close(with_none(x, training=True), without(x, training=True), rtol=0, atol=0)
    assert with_none.get_config()["renorm_clipping"] == {"rmax": None, "dmax": 0.5}  # as given, as Keras
    with pytest.raises(ValueError, match=r"renorm_clipping\['rmin'\] must not be NaN"):
        BatchNormalization(renorm=True, renorm_clipping={"rmin": float("nan")})


def test_channel_view_refuses_an_order_that_keeps_the_channel_axes_apart():
    from batchnorm import functional

    with pytest.raises(ValueError, match=r"not together.*channel_order"):
        functional.channel_view(torch.randn(2, 3, 4, 5), (1, 3), None)
