"""PyTorch's conventions with the statistics modes of issue 12 (renorm, ghost batches, several axes).

A user's ordinary code, tried on layers in each mode as ``test_torch_conventions.py`` tries it on
the plain layer: optimizers made before the first call, state_dicts of unbuilt models, dtype
moves and meta-device initialization before the build, deepcopy, ``torch.compile(fullgraph=True)``,
``torch.export``, ``torch.func`` ensembling and channels_last inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from batchnorm import BatchNormalization

# Inputs are (8, 3, 4, 2): every mode normalizes them, each its own way.
MODES = {
    "renorm": {"axis": 1, "renorm": True, "renorm_clipping": {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}},
    "ghost": {"axis": 1, "virtual_batch_size": 4},
    "axes": {"axis": [1, 3]},
    "all": {"axis": (3, 1), "renorm": True, "renorm_momentum": 0.5, "virtual_batch_size": 2},
}
SHAPE = (8, 3, 4, 2)


def layer(mode: str, **kwargs) -> BatchNormalization:
    return BatchNormalization(momentum=0.5, **MODES[mode], **kwargs)


def batch(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def assert_same_state(module: nn.Module, expected: nn.Module, **tolerance) -> None:
    state, expected_state = module.state_dict(), expected.state_dict()
    assert list(state) == list(expected_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, msg=key, **(tolerance or {"rtol": 0, "atol": 0}))


def weight_shape(mode: str) -> tuple[int, ...]:
    return (3, 2) if mode in ("axes", "all") else (3,)


@pytest.fixture(params=list(MODES))
def mode(request) -> str:
    return request.param


def test_an_optimizer_made_before_the_first_call_trains_the_weights(mode):
    bn = layer(mode)
    optimizer = torch.optim.SGD(bn.parameters(), lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        (bn(batch(step), training=True) * batch(10 + step)).sum().backward()
        optimizer.step()
    assert bn.gamma.shape == weight_shape(mode) and bn.gamma is optimizer.param_groups[0]["params"][0]
    assert not torch.equal(bn.gamma.detach(), torch.ones(weight_shape(mode)))
    assert not torch.equal(bn.beta.detach(), torch.zeros(weight_shape(mode)))


def test_an_unbuilt_state_dict_loads_into_an_unbuilt_layer_and_both_train_alike(mode):
    first, second = layer(mode), layer(mode)
    second.load_state_dict(first.state_dict())
    expected_keys = ["gamma", "beta", "moving_mean", "moving_variance"]
    if MODES[mode].get("renorm"):
        expected_keys += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    assert list(first.state_dict()) == expected_keys
    for step in range(2):
        torch.testing.assert_close(first(batch(step), training=True), second(batch(step), training=True))
    assert_same_state(first, second)
    third = layer(mode)
    third.load_state_dict(first.state_dict())  # a built checkpoint builds an unbuilt layer
    assert_same_state(first, third)
    assert third.moving_mean.shape == weight_shape(mode)


def test_double_before_the_build_and_deepcopy(mode):
    bn = layer(mode).double()
    twin = copy.deepcopy(bn)
    x = batch(0).double()
    y = bn(x, training=True)
    assert y.dtype == torch.float64 and all(t.dtype == torch.float64 for t in bn.state_dict().values())
    assert not twin.built  # the copy builds apart
    torch.testing.assert_close(twin(x, training=True), y)


def test_meta_device_initialization_then_to_empty_and_reset_parameters(mode):
    with torch.device("meta"):
        bn = layer(mode, moving_variance_initializer="constant")  # Keras's "constant" is 0
        bn.build(SHAPE)
    assert all(t.is_meta for t in bn.state_dict().values())
    bn.to_empty(device="cpu")
    bn.reset_parameters()
    expected = layer(mode, moving_variance_initializer="constant")
    expected.build(SHAPE)
    assert_same_state(bn, expected)


def test_compile_fullgraph_matches_eager_in_training_and_inference(mode):
    torch._dynamo.reset()  # each layer's modes compile anew; the recompile limit is per code object
    eager, compiled_layer = layer(mode), layer(mode)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for step in range(2):
        x = batch(step).requires_grad_()
        xc = x.detach().clone().requires_grad_()
        y, yc = eager(x, training=True), compiled(xc, training=True)
        torch.testing.assert_close(yc, y)
        weights = batch(20 + step)
        (y * weights).sum().backward()
        (yc * weights).sum().backward()
        torch.testing.assert_close(xc.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_layer.gamma.grad, eager.gamma.grad, rtol=1e-4, atol=1e-5)
    assert_same_state(compiled_layer, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled(batch(5), training=False), eager(batch(5), training=False))


def test_export_of_inference(mode):
    bn = layer(mode)
    bn(batch(0), training=True)
    program = torch.export.export(bn.eval(), (batch(1),))
    torch.testing.assert_close(program.module()(batch(2)), bn(batch(2)))


def test_vmap_ensembling_in_training_mode_matches_each_layer(mode):
    layers = [layer(mode) for _ in range(3)]
    for index, each in enumerate(layers):
        each(batch(index), training=True)
    references = copy.deepcopy(layers)
    params, buffers = stack_module_state(layers)
    base = copy.deepcopy(layers[0]).to("meta")
    x = batch(7)

    def call(p, b, x):
        return functional_call(base, {**p, **b}, (x,), {"training": True})

    y = torch.vmap(call, in_dims=(0, 0, None))(params, buffers, x)
    for index, reference in enumerate(references):
        torch.testing.assert_close(y[index], reference(x, training=True))
        for name, value in reference.named_buffers():
            torch.testing.assert_close(buffers[name][index], value, msg=name)


@pytest.mark.parametrize("masked", [False, True])
def test_channels_last_inputs_keep_their_layout_and_match_the_contiguous_result(mode, masked):
    plain, last = layer(mode), layer(mode)
    x = batch(0)
    x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    kwargs = {}
    if masked:  # the input's shape without the channel axes
        mask_shape = (8, 4) if mode in ("axes", "all") else (8, 4, 2)
        kwargs["mask"] = torch.rand(mask_shape, generator=torch.Generator().manual_seed(1)) > 0.3
    y, y_last = plain(x, training=True, **kwargs), last(x_last, training=True, **kwargs)
    assert y_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_last, y)
    y_last.backward(batch(3).contiguous(memory_format=torch.channels_last))
    assert x_last.grad.is_contiguous(memory_format=torch.channels_last)
    assert_same_state(plain, last, rtol=1e-6, atol=1e-7)


def test_adjacent_axes_are_read_without_a_copy():
    from batchnorm import functional

    x = batch(0)
    order = functional.channel_order(None, (2, 3), x.dim())  # a contiguous x
    assert functional.channel_view(x, (2, 3), order).data_ptr() == x.data_ptr()
    apart = functional.channel_order(None, (1, 3), x.dim())
    assert functional.channel_view(x, (1, 3), apart).shape == (8, 3 * 2, 4)  # one copy: (8, 3, 2, 4)
    bn = BatchNormalization(axis=(2, 3))
    assert bn(x, training=True).is_contiguous()


def test_ghost_batches_are_a_view_of_the_input():
    from batchnorm import functional

    x = batch(0)
    split, axes, _, memory = functional.ghost_batches(x, 4, (1,), None, None)
    assert split.data_ptr() == x.data_ptr() and split.shape == (4, 2, 3, 4, 2) and axes == (1, 2) and memory is None
    last = x.contiguous(memory_format=torch.channels_last)
    split, _, _, memory = functional.ghost_batches(last, 4, (1,), None, functional.memory_order(last))
    assert memory == (0, 1, 3, 4, 2) and split.permute(memory).is_contiguous()  # derived, not sorted
    assert torch.equal(split[:, 1], x[1::2])  # ghost batch 1: samples 1, 3, 5, 7 (strided, as tf-keras)


def test_a_module_tree_with_every_mode_trains_under_ddp_style_state_dict_round_trip():
    model = nn.Sequential(*(layer(mode) for mode in ("renorm", "ghost", "axes")))
    model(batch(0))
    restored = nn.Sequential(*(layer(mode) for mode in ("renorm", "ghost", "axes")))
    restored.load_state_dict(model.state_dict())
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(batch(1)), model(batch(1)))


def test_compiled_masked_ghost_batches_with_an_empty_one_match_eager():
    # The moving statistics normalize the empty ghost batch and are updated by the same call: a
    # compiled backward must see them from before the update (functional._saved_for_backward;
    # the renorm case of test_compile_fullgraph_matches_eager_... failed without it).
    mask = torch.ones(8, 4, 2, dtype=torch.bool)
    mask[1::4] = False  # ghost batch 1 of 4 (samples 1 and 5) has no element
    torch._dynamo.reset()
    eager, compiled_layer = (layer("all", moving_mean_initializer="ones") for _ in range(2))
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = batch(0).requires_grad_()
    xc = x.detach().clone().requires_grad_()
    weights = batch(1)
    (eager(x, training=True, mask=mask[:, :, 0]) * weights).sum().backward()
    (compiled(xc, training=True, mask=mask[:, :, 0]) * weights).sum().backward()
    torch.testing.assert_close(xc.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_layer.gamma.grad, eager.gamma.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_layer.beta.grad, eager.beta.grad, rtol=1e-4, atol=1e-5)
