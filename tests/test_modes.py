"""What Keras cannot check (SPEC 10-12): renorm beyond channels-last, ghost batches, several axes.

Every expected value comes from ``tests/reference.py``'s ``mode_training_step`` (the SPEC formulas
in float64, with autograd for the gradients), computed from exactly the values the layer sees.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modes_support import (
    PLAIN_BUFFERS,
    RENORM_BUFFERS,
    UNIT,
    assert_near,
    buffer_names,
    check_training_call,
    make_layer,
    mask_shape,
    random_input,
    random_mask,
    reference_call,
)
from reference import batch_moments, channel_axes, full_mask, inference, mode_training_step, parameter_shape
from state import assert_state_equal, assert_unbuilt, snapshot

from batchnorm import BatchNormalization, functional, initializers

CLIPPINGS = [None, {"rmax": 1.3, "rmin": 0.9, "dmax": 0.25}, {"rmin": 1.5}, {"dmax": 0.0}]


def inference_of(bn, x) -> torch.Tensor:
    return inference(x, bn.get_config()["axis"], bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance, bn.epsilon)


# --------------------------------------------------------------------- renorm, any axis, masks

RENORM_CASES = [
    ((5, 3, 4), 1),
    ((5, 3, 4), -1),
    ((4, 3, 5, 2), 2),
    ((4, 3, 5, 2), -3),
    ((4, 3, 5, 2), 0),
    ((4, 3, 5, 2), (1, 3)),
]


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("shape,axis", RENORM_CASES)
def test_renorm_with_mask_on_any_axis_matches_reference(shape, axis, clipping, grad):
    bn = make_layer(shape, axis, renorm=True, renorm_clipping=clipping)
    x = random_input(shape)
    mask = random_mask(mask_shape(shape, axis))
    check_training_call(bn, x, mask, rtol=UNIT[torch.float32], grad=grad)


@pytest.mark.parametrize("broadcast", [(0,), (1,), (0, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_renorm_with_broadcast_mask_matches_reference(broadcast, dtype):
    shape, axis = (4, 3, 5, 2), 2
    bn = make_layer(shape, axis, renorm=True, renorm_clipping=CLIPPINGS[1], dtype=dtype, seed=1)
    x = random_input(shape, dtype, seed=1)
    mask = random_mask(mask_shape(shape, axis, broadcast), seed=1)
    check_training_call(bn, x, mask, rtol=UNIT[dtype], seed=1)


def test_renorm_corrections_and_clipping_change_the_output():
    # Guards for the comparisons above: r/d are not 1/0 here, and the clipping bites.
    shape, axis = (5, 3, 4), 1
    x = random_input(shape, seed=2)
    outputs = {}
    for label, kwargs in {
        "plain": {},
        "renorm": {"renorm": True},
        "clipped": {"renorm": True, "renorm_clipping": CLIPPINGS[1]},
    }.items():
        outputs[label] = make_layer(shape, axis, seed=2, **kwargs)(x, training=True).detach()
    assert not torch.allclose(outputs["plain"], outputs["renorm"], atol=1e-3)
    assert not torch.allclose(outputs["renorm"], outputs["clipped"], atol=1e-3)


def test_renorm_with_zero_renorm_stddev_divides_by_sqrt_epsilon():
    shape, axis = (6, 3, 2), 1
    bn = make_layer(shape, axis, renorm=True, epsilon=0.01, seed=3)
    with torch.no_grad():
        bn.renorm_stddev.zero_()
    y, _ = check_training_call(bn, random_input(shape, seed=3), rtol=UNIT[torch.float32], seed=3)
    assert bool(y.isfinite().all())


@pytest.mark.parametrize("center,scale", [(False, False), (True, False), (False, True)])
def test_renorm_without_gamma_or_beta(center, scale):
    shape, axis = (5, 3, 4), 1
    bn = make_layer(shape, axis, renorm=True, renorm_clipping=CLIPPINGS[1], center=center, scale=scale, seed=4)
    check_training_call(bn, random_input(shape, seed=4), random_mask((5, 4), seed=4), rtol=1e-4, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_renorm_steps_then_inference_follow_the_reference(dtype):
    shape, axis = (6, 3, 4), 1
    bn = make_layer(shape, axis, renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5}, dtype=dtype, seed=5)
    for step in range(4):
        x = random_input(shape, dtype, seed=10 + step, offset=1.0 + step)
        mask = random_mask((6, 4), seed=step) if step % 2 else None
        check_training_call(bn, x, mask, rtol=UNIT[dtype], grad=False)
    x = random_input(shape, dtype, seed=20)
    before = snapshot(bn)
    y = bn(x, training=False)
    assert_state_equal(before, bn)
    assert_near(y, inference_of(bn, x), UNIT[dtype], "inference after renorm training")
    # moving_variance is relu(moving_stddev**2 - epsilon), as in Keras.
    expected = torch.relu(bn.moving_stddev.double() ** 2 - bn.epsilon)
    assert_near(bn.moving_variance, expected, 1e-6 if dtype == torch.float32 else 1e-12, "moving_variance")


# ------------------------------------------------------------------------------ SPEC 5, renorm


@pytest.mark.parametrize("virtual_batch_size", [None, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_renorm_non_finite_channel_keeps_all_five_buffers(bad, virtual_batch_size):
    shape, axis, channel = (6, 3, 4), 1, 1
    bn = make_layer(shape, axis, renorm=True, virtual_batch_size=virtual_batch_size, seed=6)
    before = snapshot(bn)
    x = random_input(shape, seed=6)
    x[5, channel, 2] = bad
    mask = random_mask((6, 4), seed=6)
    mask[5, 2] = True
    _, expected, _ = reference_call(bn, x, mask)
    y = bn(x, training=True, mask=mask)
    others = [0, 2]
    for name in PLAIN_BUFFERS + RENORM_BUFFERS:
        assert getattr(bn, name)[channel] == before[name][channel], name
        assert not torch.equal(getattr(bn, name)[others], before[name][others]), name
        assert_near(getattr(bn, name), expected[name], 1e-5, name)
        assert bool(getattr(bn, name).isfinite().all()), name
    assert not bool(y[:, channel].isfinite().all())
    assert bool(y[:, others].isfinite().all())


@pytest.mark.parametrize("virtual_batch_size", [None, 2])
@pytest.mark.parametrize("how", ["empty batch", "all masked out"])
def test_renorm_without_elements_writes_nothing_and_uses_moving_statistics(how, virtual_batch_size):
    shape = (0, 3, 4) if how == "empty batch" else (4, 3, 4)
    bn = make_layer(shape, 1, renorm=True, virtual_batch_size=virtual_batch_size, seed=7)
    before = snapshot(bn)
    x = random_input(shape, seed=7).requires_grad_()
    mask = None if how == "empty batch" else torch.zeros(4, 4, dtype=torch.bool)
    y = bn(x, training=True, mask=mask)
    assert_state_equal(before, bn)
    assert_near(y, inference_of(bn, x.detach()), 1e-5, "output")
    (y**2).sum().backward()
    assert bool(x.grad.isfinite().all()) and bool(bn.gamma.grad.isfinite().all())


@pytest.mark.parametrize("axis,virtual_batch_size", [(1, None), (1, 2), ((1, 2), None), ((1, 3), 2), ([-1, 1], None)])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_masked_out_non_finite_values_reach_no_sum_in_any_mode(axis, virtual_batch_size, value):
    # SPEC 4: whatever a masked-out position holds, the statistics, the masked-in outputs and every
    # gradient of a loss on masked-in outputs stay finite and equal to those of clean data.
    shape = (4, 3, 5, 2)
    msk = mask_shape(shape, axis)
    mask = torch.ones(msk, dtype=torch.bool)
    mask[(0,) * len(msk)] = False
    inside = full_mask(torch.zeros(shape), channel_axes(4, axis), mask)
    results = []
    for dirty in (False, True):
        bn = make_layer(shape, axis, renorm=True, virtual_batch_size=virtual_batch_size, seed=29)
        x = random_input(shape, seed=29)
        if dirty:
            x[~inside] = value
        x.requires_grad_()
        y = bn(x, training=True, mask=mask)
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(30))
        torch.where(inside, y * upstream, 0).sum().backward()
        results.append((y[inside], x.grad, bn.gamma.grad, bn.beta.grad, *(getattr(bn, n) for n in buffer_names(bn))))
    for clean, dirty in zip(*results):
        assert bool(dirty.isfinite().all())
        assert_near(dirty, clean, 1e-5)


# ---------------------------------------------------------------------------- ghost batches

GHOST_AXES = [-1, 1, (1, 2)]


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("virtual_batch_size", [1, 2, 4, 8])
@pytest.mark.parametrize("axis", GHOST_AXES)
def test_ghost_batches_match_reference(axis, virtual_batch_size, masked, renorm):
    shape = (8, 3, 4)
    kwargs = {"renorm": True, "renorm_clipping": CLIPPINGS[1]} if renorm else {}
    bn = make_layer(shape, axis, virtual_batch_size=virtual_batch_size, seed=8, **kwargs)
    x = random_input(shape, seed=8)
    mask = random_mask(mask_shape(shape, axis), seed=8) if masked else None
    check_training_call(bn, x, mask, rtol=UNIT[torch.float32], seed=8)


def test_ghost_batches_are_strided_as_tf_keras():
    # Ghost j holds samples j, j + B/v, ...: its output is plain batch normalization of those rows.
    shape, v = (6, 4), 3
    ghosts = shape[0] // v
    bn = make_layer(shape, -1, virtual_batch_size=v, seed=9)
    x = random_input(shape, seed=9)
    y = bn(x, training=True)
    for j in range(ghosts):
        plain = make_layer(shape, -1, seed=9)
        assert_near(y[j::ghosts], plain(x[j::ghosts], training=True), 1e-5, f"ghost {j}")
    contiguous = make_layer(shape, -1, seed=9)(x[:v], training=True)
    assert not torch.allclose(y[:v], contiguous, atol=1e-3)  # not contiguous chunks


def test_ghost_size_equal_to_batch_is_plain_batch_normalization():
    shape, axis = (8, 3, 4), 1
    ghost, plain = make_layer(shape, axis, virtual_batch_size=8, seed=10), make_layer(shape, axis, seed=10)
    x, mask = random_input(shape, seed=10), random_mask((8, 4), seed=10)
    assert_near(ghost(x, training=True, mask=mask), plain(x, training=True, mask=mask), 1e-6, "output")
    for name in PLAIN_BUFFERS:
        assert_near(getattr(ghost, name), getattr(plain, name), 1e-6, name)


def test_ghost_size_one_gives_beta_and_moves_the_variance_toward_zero():
    shape = (6, 4)
    bn = make_layer(shape, -1, virtual_batch_size=1, seed=11)
    before = snapshot(bn)
    x = random_input(shape, seed=11)
    y = bn(x, training=True)
    # float32 rounding of x - mean, times |gamma| / sqrt(epsilon): the atol of test_reference's
    # one-element-per-channel test.
    torch.testing.assert_close(y.detach(), bn.beta.detach().expand(shape), rtol=0, atol=1e-4)
    assert_near(bn.moving_variance, 0.8 * before["moving_variance"], 1e-6, "moving_variance")
    assert_near(bn.moving_mean, 0.8 * before["moving_mean"] + 0.2 * x.double().mean(0), 1e-6, "moving_mean")


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("axis", [-1, 1])
def test_ghost_fully_masked_out_uses_moving_statistics_and_is_left_out_of_the_update(axis, renorm):
    shape, v = (8, 3, 4), 2
    ghosts = shape[0] // v
    bn = make_layer(shape, axis, virtual_batch_size=v, renorm=renorm, seed=12)
    before = snapshot(bn)
    x = random_input(shape, seed=12)
    mask = random_mask(mask_shape(shape, axis), seed=12, density=0.9)
    mask[1::ghosts] = False  # ghost 1: no element
    mask[0::ghosts] = True
    y, expected = check_training_call(bn, x, mask, rtol=UNIT[torch.float32], seed=12)
    # Ghost 1 is normalized with the moving statistics, as in inference.
    frozen = BatchNormalization(axis=axis, momentum=0.8)
    frozen.build(shape)
    frozen.load_state_dict({name: before[name] for name in ("gamma", "beta") + PLAIN_BUFFERS})
    assert_near(y[1::ghosts], frozen(x[1::ghosts], training=False), 1e-5, "empty ghost")
    # The update is the mean over the three other ghosts only.
    means = torch.stack([batch_moments(x[j::ghosts], axis, mask[j::ghosts])[0] for j in (0, 2, 3)])
    assert_near(expected["moving_mean"], 0.8 * before["moving_mean"].double() + 0.2 * means.mean(0), 1e-9)


@pytest.mark.parametrize("renorm", [False, True])
def test_float64_ghost_batches_with_a_mask_keep_float64_accuracy(renorm):
    # Three ghosts, each with elements: the mean over them is a float64 division by 3.
    shape = (6, 3, 4)
    bn = make_layer(shape, 1, virtual_batch_size=2, renorm=renorm, dtype=torch.float64, seed=27)
    x = random_input(shape, torch.float64, seed=27)
    mask = random_mask((6, 4), seed=27)
    mask[:, 0] = True
    check_training_call(bn, x, mask, rtol=UNIT[torch.float64], seed=27)


def test_ghost_batches_in_inference_take_any_batch_size_and_write_nothing():
    shape = (5, 3, 4)
    bn = make_layer(shape, 1, virtual_batch_size=2, renorm=True, seed=13)
    before = snapshot(bn)
    x = random_input(shape, seed=13)
    for y in (bn(x, training=False), bn.eval()(x)):
        assert_near(y, inference_of(bn, x), 1e-5, "inference")
    assert_state_equal(before, bn)


# --------------------------------------------------------------------------- several axes

AXES_CASES = [
    ((4, 3, 5, 2), (1, 2)),
    ((4, 3, 5, 2), (1, 3)),
    ((4, 3, 5, 2), [-1, 1]),
    ((4, 3, 5, 2), [2, 3]),
    ((4, 3, 5, 2), (0, 2)),
    ((4, 3, 5, 2), [3, 0, 1]),
    ((5, 3, 4), [1, 2]),
    ((5, 3, 4), (-1, 0)),
    ((3, 4), (0, 1)),
    ((3, 4), [-1]),
]


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,axis", AXES_CASES)
def test_several_axes_match_reference(shape, axis, dtype, masked, renorm):
    kwargs = {"renorm": True, "renorm_clipping": CLIPPINGS[1]} if renorm else {}
    bn = make_layer(shape, axis, dtype=dtype, seed=14, **kwargs)
    pshape = parameter_shape(shape, axis)
    for name in ("gamma", "beta") + buffer_names(bn):
        assert tuple(getattr(bn, name).shape) == pshape, name
    x = random_input(shape, dtype, seed=14)
    mask = random_mask(mask_shape(shape, axis), seed=14) if masked else None
    # Every axis a channel axis: one element per channel, dx = gamma / sqrt(eps) * (dy - dy) = 0
    # exactly, and float32 rounds each term (|gamma| / sqrt(eps) * |dy|, about 60) to 1e-7 of it.
    single = len(parameter_shape(shape, axis)) == len(shape)
    dx_atol = 60 * 2 * torch.finfo(dtype).eps if single else 0.0
    check_training_call(bn, x, mask, rtol=UNIT[dtype], seed=14, dx_atol=dx_atol)


@pytest.mark.parametrize("broadcast", [(0,), (1,), (0, 1)])
@pytest.mark.parametrize("axis", [(1, 2), (1, 3), [3, 0]])
def test_several_axes_with_broadcast_masks(axis, broadcast):
    shape = (4, 3, 5, 2)
    bn = make_layer(shape, axis, seed=15)
    mask = random_mask(mask_shape(shape, axis, broadcast), seed=15)
    check_training_call(bn, random_input(shape, seed=15), mask, rtol=1e-4, seed=15)


def test_one_axis_in_a_list_is_the_int_axis():
    shape = (4, 3, 5)
    x, mask = random_input(shape, seed=16), random_mask((4, 5), seed=16)
    listed, plain = make_layer(shape, [1], seed=16), make_layer(shape, 1, seed=16)
    assert listed.moving_mean.shape == (3,)
    assert_near(listed(x, training=True, mask=mask), plain(x, training=True, mask=mask), 1e-6)
    assert_near(listed.moving_variance, plain.moving_variance, 1e-6)


@pytest.mark.parametrize("axis,expected", [((1, 3), [1, 3]), ([-1, 1], [-1, 1]), ([2], [2]), (2, 2), (-1, -1)])
def test_axis_is_kept_as_given_and_configured_as_a_list(axis, expected):
    bn = BatchNormalization(axis=axis)
    bn(torch.randn(2, 3, 4, 5), training=True)
    assert bn.axis == axis
    assert bn.get_config()["axis"] == expected
    assert type(bn.get_config()["axis"]) is type(expected)
    again = BatchNormalization.from_config(bn.get_config())
    again.build((2, 3, 4, 5))
    assert again.moving_mean.shape == bn.moving_mean.shape


def test_mode_configs_round_trip():
    plain = BatchNormalization().get_config()
    assert "virtual_batch_size" not in plain  # written only when set, as tf-keras
    assert (plain["renorm"], plain["renorm_clipping"], plain["renorm_momentum"]) == (False, None, 0.99)
    kwargs = dict(axis=(1, 3), renorm=True, renorm_clipping={"rmax": 2.0}, renorm_momentum=0.5, virtual_batch_size=2)
    config = BatchNormalization(**kwargs).get_config()
    assert config["axis"] == [1, 3] and config["virtual_batch_size"] == 2
    assert (config["renorm"], config["renorm_clipping"], config["renorm_momentum"]) == (True, {"rmax": 2.0}, 0.5)
    again = BatchNormalization.from_config(config)
    assert again.get_config() == config | {"name": again.name}
    source = make_layer((4, 3, 5, 2), kwargs.pop("axis"), seed=28, **kwargs)
    again = BatchNormalization.from_config(source.get_config())
    again.load_state_dict(source.state_dict())
    x = random_input((4, 3, 5, 2), seed=28)
    assert torch.equal(again(x, training=True), source(x, training=True))
    for key, value in source.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("renorm", [False, True])
def test_several_axes_steps_then_inference(renorm):
    shape, axis = (4, 3, 5, 2), [-1, 1]
    bn = make_layer(shape, axis, renorm=renorm, seed=17)
    for step in range(3):
        check_training_call(bn, random_input(shape, seed=30 + step), rtol=1e-4, grad=False)
    x = random_input(shape, seed=40)
    assert_near(bn(x, training=False), inference_of(bn, x), 1e-5, "inference")


# ------------------------------------------------------------------------ memory formats

LAYOUT_CASES = [
    # (shape, axis, virtual_batch_size, memory format)
    ((4, 3, 5, 2), (1, 2), None, torch.channels_last),
    ((4, 3, 5, 2), (1, 3), None, torch.channels_last),
    ((4, 3, 5, 2), [-1, 1], None, torch.channels_last),
    ((4, 3, 5, 2), (2, 3), None, torch.channels_last),
    ((4, 3, 5, 2), 1, 2, torch.channels_last),
    ((4, 3, 5, 2), (1, 3), 2, torch.channels_last),
    ((4, 3, 2, 3, 2), (1, 4), None, torch.channels_last_3d),
    ((4, 3, 2, 3, 2), 1, 2, torch.channels_last_3d),
]


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("shape,axis,virtual_batch_size,memory_format", LAYOUT_CASES)
def test_outputs_and_gradients_keep_the_memory_format(shape, axis, virtual_batch_size, memory_format, renorm):
    bn = make_layer(shape, axis, virtual_batch_size=virtual_batch_size, renorm=renorm, seed=18)
    x = random_input(shape, seed=18).to(memory_format=memory_format)
    assert not x.is_contiguous()
    mask = random_mask(mask_shape(shape, axis), seed=18)
    y, _ = check_training_call(bn, x, mask, rtol=1e-4, seed=18)
    assert y.is_contiguous(memory_format=memory_format), y.stride()
    x_in = x.detach().clone().requires_grad_()
    bn(x_in, training=True, mask=mask).sum().backward()
    assert x_in.grad.is_contiguous(memory_format=memory_format), x_in.grad.stride()
    assert bn(x, training=False).is_contiguous(memory_format=memory_format)


ADJACENT = [
    # (shape, axes, memory format or None): the channel axes are adjacent in memory, in increasing
    # order (the flattened channel index is row-major over the sorted axes, as the weights are).
    # Not here: channels_last with axes (1, 3), adjacent in memory as (W, C), i.e. in decreasing
    # order: the core gathers them by a copy (functional.channel_order's docstring).
    ((4, 3, 5, 2), (1, 2), None),
    ((4, 3, 5, 2), (2, 3), None),
    ((4, 3, 5, 2), (1, 2, 3), None),
    ((4, 3, 5, 2), 2, None),
    ((4, 3, 5, 2), (2, 3), torch.channels_last),
    ((4, 3, 5, 2), 1, torch.channels_last),
    ((4, 3, 2, 3, 2), (3, 4), torch.channels_last_3d),
]


@pytest.mark.parametrize("shape,axes,memory_format", ADJACENT)
def test_channel_view_of_adjacent_axes_is_a_view(shape, axes, memory_format):
    x = torch.randn(shape)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    # As the layer calls them: the channel axes non-negative and sorted.
    order = functional.channel_order(functional.memory_order(x), axes, x.dim())
    view = functional.channel_view(x, axes, order)
    assert view.data_ptr() == x.data_ptr()
    assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    channels = 1
    for a in [axes] if isinstance(axes, int) else axes:
        channels *= shape[a]
    assert view.shape[1] == channels
    assert view.numel() == x.numel()


# ----------------------------------------------------------------------- 16-bit inputs, renorm


@pytest.mark.parametrize("virtual_batch_size", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_renorm_returns_its_dtype_with_float32_statistics(dtype, virtual_batch_size):
    # 512 rows around 300 per channel: a 16-bit sum would overflow (float16) or lose about 1e-2
    # (bfloat16); float32 statistics match the float64 reference to float32 accuracy.
    shape, axis = (512, 3), -1
    bn = make_layer(shape, axis, renorm=True, virtual_batch_size=virtual_batch_size, seed=19)
    with torch.no_grad():
        bn.renorm_mean.fill_(300.0)
        bn.renorm_stddev.fill_(4.0)
    x = random_input(shape, dtype, seed=19, scale=4.0, offset=300.0)
    y_ref, expected, _ = reference_call(bn, x)
    x_in = x.clone().requires_grad_()
    y = bn(x_in, training=True)
    assert y.dtype == dtype
    assert_near(y, y_ref, UNIT[dtype], "output")
    for name, value in expected.items():
        assert getattr(bn, name).dtype == torch.float32, name
        assert_near(getattr(bn, name), value, 1e-5, name)
    y.float().sum().backward()
    assert x_in.grad.dtype == dtype and bool(x_in.grad.isfinite().all())


# --------------------------------------------------------------- trainable=False and renorm


@pytest.mark.parametrize("virtual_batch_size", [None, 2])
def test_frozen_renorm_layer_is_in_inference_and_writes_nothing(virtual_batch_size):
    shape = (4, 3, 5)
    bn = make_layer(shape, 1, renorm=True, virtual_batch_size=virtual_batch_size, seed=20)
    bn.trainable = False
    before = snapshot(bn)
    x = random_input(shape, seed=20)
    for y in (bn(x, training=True), bn.train()(x), bn(x, training=True, mask=random_mask((4, 5)))):
        assert_near(y, inference_of(bn, x), 1e-5, "frozen output")
    assert_state_equal(before, bn)


# ---------------------------------------------------------- renorm buffers: state_dict & co.

KEYS = ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]


@pytest.mark.parametrize("shape,axis", [((2, 3, 4), 1), ((2, 3, 4, 5), (1, 3))])
def test_renorm_state_dict_keys_order_shapes_and_initial_values(shape, axis):
    bn = BatchNormalization(
        axis=axis,
        renorm=True,
        moving_mean_initializer=initializers.Constant(0.5),
        moving_variance_initializer=initializers.Constant(4.0),
    )
    assert list(bn.state_dict()) == KEYS
    assert_unbuilt(bn)
    bn.build(shape)
    state = bn.state_dict()
    assert list(state) == KEYS
    pshape = parameter_shape(shape, axis)
    for key, value in state.items():
        assert tuple(value.shape) == pshape and value.dtype == torch.float32, key
    assert torch.equal(state["moving_stddev"], torch.full(pshape, 2.0))
    assert torch.equal(state["renorm_stddev"], torch.full(pshape, 2.0))
    assert torch.equal(state["renorm_mean"], torch.full(pshape, 0.5))
    assert torch.equal(state["moving_variance"], torch.full(pshape, 4.0))
    # Not trainable, no gradient: buffers.
    assert {name for name, _ in bn.named_buffers()} == set(KEYS[2:])


def test_plain_layer_has_no_renorm_buffers():
    bn = BatchNormalization()
    bn.build((2, 3))
    assert list(bn.state_dict()) == KEYS[:4]


@pytest.mark.parametrize("axis", [1, (1, 2)])
def test_renorm_state_dict_round_trips_into_unbuilt_layer_and_through_torch_save(axis):
    shape = (4, 3, 5)
    source = make_layer(shape, axis, renorm=True, seed=21)
    source(random_input(shape, seed=21), training=True)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    target = BatchNormalization(axis=axis, renorm=True)
    target.load_state_dict(state)
    assert target.built
    for key in KEYS:
        assert torch.equal(target.state_dict()[key], source.state_dict()[key]), key
    x = random_input(shape, seed=22)
    assert torch.equal(target(x, training=False), source(x, training=False))


def _renorm_checkpoint(pshape=(3,)):
    return {key: torch.full(pshape, float(i + 2)) for i, key in enumerate(KEYS)}


@pytest.mark.parametrize("missing", RENORM_BUFFERS)
def test_renorm_checkpoint_missing_a_renorm_buffer_changes_nothing(missing):
    bn = make_layer((4, 3, 5), 1, renorm=True, seed=23)
    before = snapshot(bn)
    state = _renorm_checkpoint()
    del state[missing]
    with pytest.raises((RuntimeError, ValueError), match=missing):
        bn.load_state_dict(state)
    assert_state_equal(before, bn)


@pytest.mark.parametrize("key", KEYS)
def test_renorm_checkpoint_with_one_wrong_shape_changes_nothing(key):
    bn = make_layer((4, 3, 5), 1, renorm=True, seed=24)
    before = snapshot(bn)
    state = _renorm_checkpoint()
    state[key] = torch.ones(4)
    with pytest.raises((RuntimeError, ValueError)) as info:
        bn.load_state_dict(state)
    message = str(info.value)
    assert key in message and re.search(r"\b4\b", message) and re.search(r"\b3\b", message), message
    assert_state_equal(before, bn)


@pytest.mark.parametrize("key", ["moving_stddev", "renorm_stddev"])
def test_renorm_checkpoint_with_one_wrong_shape_leaves_an_unbuilt_layer_unbuilt(key):
    bn = BatchNormalization(axis=1, renorm=True)
    state = _renorm_checkpoint()
    state[key] = torch.ones(4)
    with pytest.raises((RuntimeError, ValueError), match=key):
        bn.load_state_dict(state)
    assert_unbuilt(bn)


def test_several_axes_checkpoint_with_a_transposed_shape_changes_nothing():
    bn = make_layer((4, 3, 5, 2), (1, 3), renorm=True, seed=25)
    before = snapshot(bn)
    state = _renorm_checkpoint((3, 2))
    state["renorm_mean"] = torch.ones(2, 3)
    with pytest.raises((RuntimeError, ValueError), match="renorm_mean"):
        bn.load_state_dict(state)
    assert_state_equal(before, bn)
    bn.load_state_dict(_renorm_checkpoint((3, 2)))
    assert torch.equal(bn.renorm_stddev, torch.full((3, 2), 8.0))


def test_plain_checkpoint_into_renorm_layer_and_back_change_nothing():
    renorm = make_layer((4, 3, 5), 1, renorm=True, seed=26)
    before = snapshot(renorm)
    with pytest.raises((RuntimeError, ValueError), match="moving_stddev"):
        renorm.load_state_dict({key: value for key, value in _renorm_checkpoint().items() if key in KEYS[:4]})
    assert_state_equal(before, renorm)
    plain = make_layer((4, 3, 5), 1, seed=26)
    before = snapshot(plain)
    with pytest.raises((RuntimeError, ValueError), match="renorm_stddev"):
        plain.load_state_dict(_renorm_checkpoint())  # unexpected keys: strict loads are all or nothing
    assert_state_equal(before, plain)


# ------------------------------------------------------------------ hypothesis properties

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mode_cases(draw):
    ghost = draw(st.booleans())
    rank = draw(st.integers(2, 4))
    shape = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    v = None
    if ghost:
        v = draw(st.integers(1, 3))
        shape[0] = v * draw(st.integers(1, 3))
    candidates = list(range(1 if ghost else 0, rank))
    axes = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=len(candidates), unique=True))
    axes = [a - rank if draw(st.booleans()) else a for a in axes]
    axis = axes[0] if len(axes) == 1 and draw(st.booleans()) else draw(st.sampled_from([list, tuple]))(axes)
    mask = None
    if draw(st.booleans()):
        mask = tuple(1 if draw(st.booleans()) else size for size in mask_shape(shape, axis))
    renorm = draw(st.booleans())
    clipping = None
    if renorm and draw(st.booleans()):
        clipping = {}
        for key, low, high in (("rmin", 0.5, 1.0), ("rmax", 1.0, 2.0), ("dmax", 0.0, 1.0)):
            if draw(st.booleans()):
                clipping[key] = draw(st.floats(low, high))
    return dict(
        shape=tuple(shape),
        axis=axis,
        virtual_batch_size=v,
        mask=mask,
        density=draw(st.sampled_from([0.0, 0.5, 1.0])),
        renorm=renorm,
        clipping=clipping,
        momentum=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
        renorm_momentum=draw(st.sampled_from([0.0, 0.3, 0.99])),
        epsilon=draw(st.sampled_from([1e-3, 0.1])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**16)),
    )


def _case_layer(case):
    kwargs = dict(momentum=case["momentum"], epsilon=case["epsilon"], virtual_batch_size=case["virtual_batch_size"])
    if case["renorm"]:
        kwargs.update(renorm=True, renorm_clipping=case["clipping"], renorm_momentum=case["renorm_momentum"])
    return make_layer(case["shape"], case["axis"], seed=case["seed"], **kwargs)


def _case_mask(case):
    if case["mask"] is None:
        return None
    g = torch.Generator().manual_seed(case["seed"] + 7)
    return torch.rand(case["mask"], generator=g) < case["density"]


@settings(max_examples=100, **SETTINGS)
@given(case=mode_cases())
def test_property_training_then_inference_match_reference(case):
    bn = _case_layer(case)
    x = random_input(case["shape"], case["dtype"], seed=case["seed"])
    rtol = UNIT[case["dtype"]]
    # float32 buffers: one float32 rounding of the float64 statistics.
    check_training_call(bn, x, _case_mask(case), rtol=rtol, stat_rtol=max(rtol, 1e-6), grad=False)
    x2 = random_input(case["shape"], case["dtype"], seed=case["seed"] + 1)
    before = snapshot(bn)
    assert_near(bn(x2, training=False), inference_of(bn, x2), rtol, "inference after training")
    assert_state_equal(before, bn)


@settings(max_examples=50, **SETTINGS)
@given(case=mode_cases())
def test_property_gradients_match_reference(case):
    case = dict(case, dtype=torch.float64)
    bn = _case_layer(case)
    x = random_input(case["shape"], torch.float64, seed=case["seed"])
    # Gradient terms of size |gamma| * r / sqrt(var + eps): 1e-8 relative to their norm in float64.
    check_training_call(bn, x, _case_mask(case), rtol=1e-8, stat_rtol=1e-6, grad=True, seed=case["seed"])


def test_reference_helpers_agree_with_themselves():
    # The reference's own consistency: ghost size B = no ghosts, a list of one axis = the int.
    x = random_input((6, 3, 2), torch.float64, seed=50)
    buffers = {"moving_mean": torch.zeros(3), "moving_variance": torch.ones(3)}
    base = mode_training_step(x, 1, None, None, buffers, momentum=0.5, epsilon=1e-3)
    for kwargs in ({"virtual_batch_size": 6}, {}):
        y, new = mode_training_step(x, [1], None, None, buffers, momentum=0.5, epsilon=1e-3, **kwargs)
        assert torch.equal(y, base[0]) and all(torch.equal(new[k], base[1][k]) for k in new)
    assert channel_axes(4, [-1, 1]) == [1, 3]
