"""PyTorch's conventions around the layer, tried as a user's ordinary code does, side by side with
torch's own lazy module (``nn.LazyBatchNorm1d``) wherever it has the same behaviour.

Each test here failed before the lazy weights, the layout-preserving views and the call checks
(issue 10): optimizers and state_dicts of unbuilt models, dtype and device moves before the build,
meta-device initialization, channels_last inputs, 16-bit buffers, argument types, zero channels,
NaN padding under a mask, ``torch.jit.trace``, ``torch.func`` ensembling and legacy ONNX export.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from reference import batch_moments, normalize
from state import assert_state_equal, assert_unbuilt, snapshot
from torch import nn
from torch.func import functional_call, stack_module_state
from torch.nn.parameter import is_lazy

from batchnorm import BatchNormalization


def ours() -> nn.Module:
    return BatchNormalization(momentum=0.9)


def torchs() -> nn.Module:
    return nn.LazyBatchNorm1d(momentum=0.1)


def mlp(norm) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), norm())


# ----------------------------------------------------------------------------------- lazy weights


@pytest.mark.parametrize("norm", [ours, torchs], ids=["ours", "torch"])
def test_an_optimizer_made_before_the_first_call_trains_the_weights(norm):
    model = mlp(norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert len(optimizer.param_groups[0]["params"]) == 4  # Linear's 2 and the norm's 2
    before = [id(p) for p in model.parameters()]
    for step in range(3):
        optimizer.zero_grad()
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        (model(x)[:, 0] * torch.arange(8.0)).sum().backward()
        optimizer.step()
    assert [id(p) for p in model.parameters()] == before  # the very objects the optimizer holds
    norm_parameters = list(model[1].parameters())
    assert all(not is_lazy(p) for p in norm_parameters)
    assert any(p.detach().abs().sum() > 0 and not torch.equal(p.detach(), torch.ones(4)) for p in norm_parameters)


@pytest.mark.distributed  # a one-process gloo group
def test_ddp_refuses_an_unbuilt_layer_and_takes_a_built_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for norm in (ours, torchs):
            with pytest.raises(RuntimeError, match="uninitialized parameters"):
                nn.parallel.DistributedDataParallel(mlp(norm))
        model = mlp(ours)
        model[1].build((1, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(torch.randn(5, 3)).sum().backward()
        assert model[1].gamma.grad is not None
        del ddp
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("norm", [ours, torchs], ids=["ours", "torch"])
def test_an_unbuilt_models_state_dict_loads_into_an_identical_unbuilt_model(norm):
    source, target = mlp(norm), mlp(norm)
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert is_lazy(target[1].weight if norm is torchs else target[1].gamma)
    # ... and the unbuilt target still builds and trains at its first call.
    target(torch.randn(5, 3)).sum().backward()
    assert not any(is_lazy(t) for t in target.state_dict().values())


def test_an_unbuilt_checkpoint_does_not_load_into_a_built_layer():
    built = mlp(ours)
    built(torch.randn(5, 3))
    before = snapshot(built[1])
    with pytest.raises(RuntimeError, match="uninitialized in the checkpoint"):
        built.load_state_dict(mlp(ours).state_dict())
    assert_state_equal(before, built[1])


def test_deepcopy_of_an_unbuilt_layer_builds_apart_from_the_original():
    layer = BatchNormalization(axis=1)
    twin = copy.deepcopy(layer)
    assert_unbuilt(twin)
    twin(torch.randn(4, 3, 2), training=True)
    assert twin.built and twin.gamma.shape == (3,)
    assert_unbuilt(layer)
    layer(torch.randn(4, 5), training=True)
    assert layer.gamma.shape == (5,)


def test_strict_false_loads_the_keys_present_and_reports_the_rest():
    trained = BatchNormalization(momentum=0.5)
    trained(torch.randn(16, 3) * 2 + 4, training=True)
    state = trained.state_dict()
    del state["beta"]
    for target in (BatchNormalization(), BatchNormalization()):  # unbuilt, then built
        result = target.load_state_dict(state, strict=False)
        assert result.missing_keys == ["beta"] and not result.unexpected_keys
        for key, value in state.items():
            assert torch.equal(target.state_dict()[key], value), key
        assert torch.equal(target.beta.detach(), torch.zeros(3))  # the initializer's, as built
    # torch's own module under strict=False: the same keys load, the same key is reported.
    reference = nn.BatchNorm1d(3)
    reference_state = {"weight": torch.full((3,), 2.0), "running_mean": torch.ones(3)}
    torch_result = reference.load_state_dict(reference_state, strict=False)
    assert "bias" in torch_result.missing_keys and torch.equal(reference.running_mean, torch.ones(3))


@pytest.mark.parametrize("built", [False, True])
def test_strict_true_with_a_key_missing_loads_nothing(built):
    trained = BatchNormalization(momentum=0.5)
    trained(torch.randn(16, 3) * 2 + 4, training=True)
    state = trained.state_dict()
    del state["moving_variance"]
    target = BatchNormalization()
    if built:
        target.build((2, 3))
        before = snapshot(target)
    with pytest.raises(RuntimeError, match="moving_variance"):
        target.load_state_dict(state)
    if built:
        assert_state_equal(before, target)
    else:
        assert_unbuilt(target)


# ------------------------------------------------------------------------- placement before build


@pytest.mark.parametrize(
    "move,dtype",
    [
        (lambda m: m.double(), torch.float64),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.to(dtype=torch.float64), torch.float64),
    ],
)
def test_dtype_moves_before_the_first_call_are_honoured(move, dtype):
    for norm in (ours, torchs):
        model = move(mlp(norm))
        model(torch.randn(5, 3, dtype=dtype))
        assert all(t.dtype == dtype for t in model[1].state_dict().values() if t.is_floating_point())
    ours_layer = move(BatchNormalization())
    assert ours_layer.weight_dtype == dtype
    ours_layer.build((2, 3))
    assert ours_layer.get_config()["dtype"]["config"]["name"] == str(dtype).removeprefix("torch.")


def test_meta_device_initialization_then_to_empty_and_reset_parameters():
    initializers = {"gamma_initializer": "random_normal", "moving_variance_initializer": "constant"}
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), BatchNormalization(**initializers))
        model[1].build((2, 4))
        reference = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d())
        reference[1].initialize_parameters(torch.empty(2, 4))
    assert model[1].gamma.is_meta and model[1].moving_mean.is_meta and reference[1].weight.is_meta
    for m in (model, reference):
        m.to_empty(device="cpu")
        m[1].reset_parameters()
    torch.manual_seed(3)
    model[1].reset_parameters()
    torch.manual_seed(3)
    expected = model[1].gamma_initializer((4,))
    assert torch.equal(model[1].gamma.detach(), expected)
    assert torch.equal(model[1].moving_variance, torch.zeros(4)) and torch.equal(model[1].beta.detach(), torch.zeros(4))
    assert torch.equal(reference[1].running_var, torch.ones(4))


def test_a_placed_layer_builds_where_it_was_placed():
    # (.to("meta") itself turns torch's uninitialized parameters into plain ones, for torch's
    # lazy modules too: device= and a device context are the ways to the meta device.)
    placed = BatchNormalization(device="meta")
    placed.build((2, 3))
    assert all(t.is_meta for t in placed.state_dict().values())
    # An unplaced layer follows its first input's device (CPU here; CUDA in the GPU runs).


def test_reset_parameters_restores_the_initial_weights_and_is_a_no_op_before_build():
    layer = BatchNormalization(momentum=0.0)
    layer.reset_parameters()
    assert_unbuilt(layer)
    layer(torch.randn(8, 3) * 5 + 2, training=True)
    with torch.no_grad():
        layer.gamma.mul_(3)
    layer.reset_parameters()
    for key, value in {"gamma": 1, "beta": 0, "moving_mean": 0, "moving_variance": 1}.items():
        assert torch.equal(layer.state_dict()[key], torch.full((3,), float(value))), key


# ---------------------------------------------------------------------------------- channels_last


FORMATS = [
    (torch.channels_last, (4, 8, 10, 10)),
    (torch.channels_last_3d, (2, 8, 3, 5, 4)),
]
UNIT = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("memory_format,shape", FORMATS, ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_channels_last_inputs_keep_their_layout_and_match_the_contiguous_result(
    memory_format, shape, dtype, masked, training
):
    torch.manual_seed(1)
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    mask = (torch.rand(shape[:1] + shape[2:]) > 0.3) if masked else None
    upstream = torch.randn(shape).to(dtype)
    results = []
    for layout in (torch.contiguous_format, memory_format):
        leaf = x.to(memory_format=layout).detach().requires_grad_()
        layer = BatchNormalization(axis=1, momentum=0.5)
        layer.build(shape)
        with torch.no_grad():
            layer.moving_mean.fill_(0.5)
        y = layer(leaf, training=training, mask=mask)
        y.backward(upstream.to(memory_format=layout))
        assert y.is_contiguous(memory_format=layout) and leaf.grad.is_contiguous(memory_format=layout)
        assert y.dtype == dtype and leaf.grad.dtype == dtype
        results.append((y, leaf.grad, layer.gamma.grad, layer.beta.grad, layer.moving_mean, layer.moving_variance))
    for name, plain, last in zip(("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"), *results):
        torch.testing.assert_close(last.float(), plain.float(), rtol=4 * UNIT[dtype], atol=4 * UNIT[dtype], msg=name)
    # float64 reference of the gradients from the same (rounded) data: 16-bit inputs accumulate in float32.
    if training:
        x64 = x.double().requires_grad_()
        gamma = torch.ones(8, dtype=torch.float64, requires_grad=True)
        beta = torch.zeros(8, dtype=torch.float64, requires_grad=True)
        mean, var, _ = batch_moments(x64, 1, mask)
        normalize(x64, 1, mean, var, gamma, beta, 1e-3).backward(upstream.double())
        _, _, dgamma, dbeta, _, _ = results[1]
        torch.testing.assert_close(dbeta.double(), beta.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dgamma.double(), gamma.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("memory_format,shape", FORMATS, ids=["2d", "3d"])
def test_channels_last_is_read_without_a_copy(memory_format, shape):
    from batchnorm import functional

    x = torch.randn(shape).to(memory_format=memory_format)
    order = functional.memory_order(x)
    view = functional.channel_view(x, 1, order)
    assert view.shape == (x.numel() // 8, 8) and view.data_ptr() == x.data_ptr() and view.is_contiguous()
    back = functional.from_channel_view(view, x.shape, order, order)
    assert back.stride() == x.stride() and back.data_ptr() == x.data_ptr()
    # A channels_last tensor normalized on another axis: an (A, C, B) view, no copy either.
    view = functional.channel_view(x, 2, order)
    assert view.data_ptr() == x.data_ptr() and view.shape[1] == shape[2]


def test_channels_last_on_another_axis_matches_the_contiguous_result():
    x = torch.randn(4, 6, 5, 3) * 3 + 2
    mask = torch.rand(4, 6, 3) > 0.4
    outputs = [
        BatchNormalization(axis=2)(x.to(memory_format=layout), training=True, mask=mask)
        for layout in (torch.contiguous_format, torch.channels_last)
    ]
    torch.testing.assert_close(outputs[1], outputs[0])
    assert outputs[1].is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------ dtypes


def test_a_float16_layer_never_stores_an_overflowed_moving_variance():
    layer = BatchNormalization(dtype=torch.float16, momentum=0.0)
    layer(torch.randn(64, 3) * 1000, training=True)  # variance 1e6: beyond float16's 65504
    assert torch.equal(layer.moving_variance, torch.ones(3, dtype=torch.float16))
    assert torch.equal(layer.moving_mean, layer.moving_mean.clamp(-65504, 65504))
    layer(torch.randn(64, 3) + 2, training=True)
    assert layer.moving_variance.isfinite().all() and (layer.moving_mean > 1).all()


# --------------------------------------------------------------------------------- call arguments


@pytest.mark.parametrize("training", ["False", 0, 1.0, torch.tensor(True)])
def test_training_must_be_none_or_a_bool(training):
    layer = BatchNormalization()
    with pytest.raises(TypeError, match="training"):
        layer(torch.randn(4, 3), training=training)
    assert_unbuilt(layer)


def test_a_mask_passed_where_training_goes_is_named():
    layer = BatchNormalization()
    with pytest.raises(TypeError, match=r"training.*mask="):
        layer(torch.randn(4, 3), torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("training", [False, True])
def test_zero_channels_give_an_empty_output(training):
    layer = BatchNormalization()
    y = layer(torch.randn(4, 0), training=training)
    assert y.shape == (4, 0) and y.dtype == torch.float32 and layer.moving_mean.shape == (0,)


def test_bad_device_and_process_group_are_named():
    with pytest.raises(ValueError, match="device.*bogus"):
        BatchNormalization(device="bogus")
    with pytest.raises(TypeError, match="process_group.*'ranks'"):
        BatchNormalization(process_group="ranks")


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("padding", [float("nan"), float("inf"), -1e30])
def test_masked_out_padding_reaches_no_gradient(axis, padding):
    torch.manual_seed(2)
    shape = (6, 7, 5)  # axis -1: (N, T, C); axis 1: (N, C, T)
    time_axis = 1 if axis == -1 else 2
    x = torch.randn(shape)
    mask = torch.ones(6, 7 if axis == -1 else 5, dtype=torch.bool)
    mask[:, 3:] = False
    padded = x.clone()
    padded.narrow(time_axis, 3, shape[time_axis] - 3).fill_(padding)
    results = []
    for data in (x, padded):
        leaf = data.clone().requires_grad_()
        layer = BatchNormalization(axis=axis)
        y = layer(leaf, training=True, mask=mask)
        y.narrow(time_axis, 0, 3).square().sum().backward()  # a loss on the masked-in outputs only
        results.append((y.narrow(time_axis, 0, 3), leaf.grad, layer.gamma.grad, layer.beta.grad))
    for name, clean, dirty in zip(("y (masked in)", "dx", "dgamma", "dbeta"), *results):
        assert dirty.isfinite().all(), name
        torch.testing.assert_close(dirty, clean, msg=name)


# ------------------------------------------------------------------------------- tracing, func, onnx


class _MaskedTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = BatchNormalization(momentum=0.5)

    def forward(self, x, mask):
        return self.norm(x, training=True, mask=mask)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_jit_trace_of_a_masked_training_call_replays_like_eager(requires_grad):
    torch.manual_seed(4)
    traced_model = _MaskedTraining()
    x, mask = torch.randn(6, 4, 3, requires_grad=requires_grad), torch.rand(6, 4) > 0.3
    traced_model(x, mask)
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(traced_model, (x, mask), check_trace=False)
    eager = _MaskedTraining()
    eager.load_state_dict(traced_model.state_dict())
    x2, mask2 = torch.randn(6, 4, 3) * 2 + 1, torch.rand(6, 4) > 0.3
    torch.testing.assert_close(traced(x2, mask2), eager(x2, mask2))
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(traced_model.state_dict()[key], value, msg=key)


@pytest.mark.parametrize(
    "norm,masked", [(ours, False), (ours, True), (torchs, False)], ids=["ours", "ours-masked", "torch"]
)
def test_vmap_ensembling_in_training_mode_matches_each_model(norm, masked):
    models = [mlp(norm) for _ in range(3)]
    for index, model in enumerate(models):
        torch.manual_seed(index)
        model(torch.randn(2, 3))
        with torch.no_grad():
            model[0].weight.normal_()
    references = copy.deepcopy(models)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(8, 3)
    kwargs = {"mask": torch.rand(8) > 0.3} if masked else {}

    def call(p, b, x):
        hidden = functional_call(base[0], {k[2:]: v for k, v in p.items() if k.startswith("0.")}, (x,))
        state = {k[2:]: v for k, v in {**p, **b}.items() if k.startswith("1.")}
        return functional_call(base[1], state, (hidden,), kwargs)

    y = torch.vmap(call, in_dims=(0, 0, None))(params, buffers, x)
    y.square().sum().backward()
    mean_key = "1.moving_mean" if norm is ours else "1.running_mean"
    for index, reference in enumerate(references):
        expected = reference[1](reference[0](x), **kwargs)
        expected.square().sum().backward()
        torch.testing.assert_close(y[index], expected)
        torch.testing.assert_close(buffers[mean_key][index], reference.state_dict()[mean_key])
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(params[name].grad[index], parameter.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_func_grad_in_training_mode_matches_autograd():
    # As with torch's BatchNorm, the buffers that a training call updates are the transformed
    # function's inputs (a captured buffer cannot be written under torch.func.grad).
    model = mlp(ours)
    model(torch.randn(2, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn(8, 3) * 2 + 1

    def loss(p, b, x):
        return functional_call(model, (p, b), (x,)).square().mul(torch.arange(4.0)).sum()

    grads = torch.func.grad(loss)(params, buffers, x)
    eager = copy.deepcopy(model)
    loss(dict(eager.named_parameters()), dict(eager.named_buffers()), x).backward()
    for name, parameter in eager.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(buffers["1.moving_mean"], eager[1].moving_mean)


def test_legacy_onnx_export_in_training_mode_is_refused_clearly():
    model = mlp(ours)
    model(torch.randn(5, 3))
    with pytest.raises(RuntimeError, match=r"TorchScript-based ONNX exporter.*inference mode"):
        torch.onnx.export(
            model, (torch.randn(5, 3),), io.BytesIO(), dynamo=False, training=torch.onnx.TrainingMode.TRAINING
        )


@pytest.mark.parametrize("how", ["build", "load_state_dict"])
def test_a_built_layers_first_call_from_several_threads(how):
    from concurrent.futures import ThreadPoolExecutor

    layer = BatchNormalization().eval()
    if how == "build":
        layer.build((1, 6))
    else:
        layer.load_state_dict(
            {
                "gamma": torch.ones(6),
                "beta": torch.zeros(6),
                "moving_mean": torch.zeros(6),
                "moving_variance": torch.ones(6),
            }
        )
    # Nothing left for a first call to do (torch's lazy hook would remove itself there: a race).
    assert not layer._forward_pre_hooks and not hasattr(layer, "_initialize_hook")
    inputs = [torch.randn(64, 6) for _ in range(16)]
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(layer, inputs))
    for x, y in zip(inputs, outputs):
        torch.testing.assert_close(y, layer(x))


def test_inference_gradient_of_a_channels_last_like_input():
    # PyTorch's CPU batch-norm backward permutes dx when the gradient's layout differs from an
    # input whose strides look channels-last (torch 2.13): this one is (1, 2, 2, 1), strides (1, 1, 2, 1).
    torch.manual_seed(0)
    x = torch.randn(2, 2, 1, 1).permute(2, 1, 0, 3).detach().requires_grad_()
    upstream = torch.randn(1, 2, 2, 1)
    layer = BatchNormalization(axis=1).eval()
    layer(x).backward(upstream)
    torch.testing.assert_close(x.grad, upstream / (1 + 1e-3) ** 0.5)


@pytest.mark.parametrize("norm", [ours, torchs], ids=["ours", "torch"])
def test_compile_fullgraph_builds_an_unbuilt_layer(norm):
    torch._dynamo.reset()
    model, twin = mlp(norm), mlp(norm)  # the same seed: the same Linear weights
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 3) * 2 + 1
    torch.testing.assert_close(compiled(x), twin(x))
    assert not any(is_lazy(t) for t in model.state_dict().values())
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    model.eval(), twin.eval()
    torch.testing.assert_close(compiled(x), twin(x))


@pytest.mark.slow  # one inductor compilation
def test_compiling_a_channels_last_training_call_warns_nothing(recwarn):
    # A user's compiled channels_last model must not print Dynamo warnings about our code (an
    # lru_cache-wrapped helper once did) and must match eager, moving statistics included.
    model, twin = (nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormalization(axis=1)) for _ in range(2))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last)
    model(x), twin(x)  # build
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(torch.compile(model)(x), twin(x))
    torch.testing.assert_close(model[1].moving_variance, twin[1].moving_variance)
    assert not [w for w in recwarn if "batchnorm" in str(w.message) or "batchnorm" in w.filename], [
        str(w.message) for w in recwarn
    ]
