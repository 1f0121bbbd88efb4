"""The layer's life cycle and policy: build, state_dict, modes, trainable, tree helpers, compile."""

from __future__ import annotations

import io

import pytest
import torch
from reference import batch_moments
from state import assert_state_equal, assert_unbuilt, snapshot
from torch import nn

import batchnorm
from batchnorm import BatchNormalization, layer_batch_normalization, set_trainable
from batchnorm.constraints import NonNeg
from batchnorm.regularizers import L2

# ------------------------------------------------------------------------------------------ build


def test_lazy_build_creates_channel_sized_weights_on_first_call():
    bn = BatchNormalization(axis=1)
    assert_unbuilt(bn)
    bn(torch.randn(4, 3, 5), training=False)
    assert bn.built
    for tensor in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance):
        assert tensor.shape == (3,) and tensor.dtype == torch.float32
    assert isinstance(bn.gamma, nn.Parameter) and isinstance(bn.beta, nn.Parameter)
    assert torch.equal(bn.moving_variance, torch.ones(3)) and torch.equal(bn.beta.detach(), torch.zeros(3))


def test_center_and_scale_off_leave_no_parameters():
    bn = BatchNormalization(center=False, scale=False)
    bn.build((2, 7))
    assert bn.gamma is None and bn.beta is None
    assert list(bn.parameters()) == []
    assert list(bn.state_dict()) == ["moving_mean", "moving_variance"]


def test_explicit_build_fixes_rank_and_keeps_negative_axis():
    bn = BatchNormalization(axis=-2)
    bn.build((2, 6, 3))
    assert bn.moving_mean.shape == (6,) and bn.axis == -2
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        bn(torch.randn(2, 6))


def test_weights_never_take_a_16_bit_dtype_from_the_input():
    bn = BatchNormalization()
    y = bn(torch.randn(4, 3).bfloat16(), training=True)
    assert y.dtype == torch.bfloat16
    assert bn.gamma.dtype == bn.moving_mean.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, "float16", "mixed_bfloat16"])
def test_explicit_dtype_is_honoured_for_weights(dtype):
    expected = {"float16": torch.float16, "mixed_bfloat16": torch.float32}.get(dtype, dtype)
    bn = BatchNormalization(dtype=dtype)
    y = bn(torch.randn(8, 3), training=True)
    assert bn.gamma.dtype == bn.moving_variance.dtype == expected
    assert y.dtype == torch.float32  # the output keeps the input's dtype


def test_state_dict_keys_are_the_keras_weight_names():
    bn = BatchNormalization()
    bn.build((2, 4))
    assert list(bn.state_dict()) == ["gamma", "beta", "moving_mean", "moving_variance"]


def test_load_state_dict_builds_an_unbuilt_layer_and_rank_is_fixed_by_first_call():
    source = BatchNormalization()
    source(torch.randn(16, 5) * 2 + 1, training=True)
    target = BatchNormalization()
    target.load_state_dict(source.state_dict())
    assert target.built
    assert_state_equal(snapshot(source), target)
    x = torch.randn(3, 4, 5)
    assert torch.equal(target(x, training=False), source(x.reshape(12, 5), training=False).reshape(3, 4, 5))
    with pytest.raises(ValueError):
        target(torch.randn(2, 5), training=False)


def test_load_state_dict_shape_mismatch_names_key_and_shapes():
    source, target = BatchNormalization(), BatchNormalization()
    source.build((2, 3))
    target.build((2, 4))
    with pytest.raises(RuntimeError, match=r"gamma.*\(3,\).*\(4,\)"):
        target.load_state_dict(source.state_dict())


def test_torch_save_and_weights_only_load_round_trip():
    bn = BatchNormalization(axis=1)
    bn(torch.randn(6, 3, 4), training=True)
    buffer = io.BytesIO()
    torch.save(bn.state_dict(), buffer)
    buffer.seek(0)
    restored = BatchNormalization(axis=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_state_equal(snapshot(bn), restored)


# ----------------------------------------------------------------------------------------- modes


def test_training_none_follows_module_mode_and_explicit_training_wins():
    x = torch.randn(32, 4) * 3 + 2
    bn = BatchNormalization(momentum=0.5)
    bn.build(x.shape)
    before = snapshot(bn)
    bn.eval()
    inference = bn(x)
    assert_state_equal(before, bn)
    assert torch.allclose(inference, (x - 0) / torch.sqrt(torch.tensor(1 + 1e-3)))
    training = bn(x, training=True)  # explicit training wins over eval()
    assert torch.allclose(training.mean(0), torch.zeros(4), atol=1e-5)
    bn.train()
    moved = snapshot(bn)
    bn(x, training=False)  # explicit inference wins over train()
    assert_state_equal(moved, bn)
    bn(x)  # training=None follows train()
    assert not torch.equal(moved["moving_mean"], bn.moving_mean)


def test_moving_statistics_follow_the_keras_update_with_biased_variance():
    x = torch.randn(10, 3) * 2 + 1
    bn = BatchNormalization(momentum=0.8)
    bn(x, training=True)
    mean, var, _ = batch_moments(x, -1)
    torch.testing.assert_close(bn.moving_mean, (0 * 0.8 + mean * 0.2).float())
    torch.testing.assert_close(bn.moving_variance, (1 * 0.8 + var * 0.2).float())


def test_trainable_false_means_inference_and_frozen_parameters():
    x = torch.randn(16, 3) + 4
    bn = BatchNormalization()
    bn.build(x.shape)
    bn.trainable = False
    assert not bn.gamma.requires_grad and not bn.beta.requires_grad
    before = snapshot(bn)
    bn.train()  # does not unfreeze
    assert bn.trainable is False
    y = bn(x, training=True)
    assert_state_equal(before, bn)
    torch.testing.assert_close(y, x / torch.sqrt(torch.tensor(1 + 1e-3)))
    bn.trainable = True
    assert bn.gamma.requires_grad


def test_constructed_frozen_layer_builds_frozen_parameters():
    bn = BatchNormalization(trainable=False)
    bn(torch.randn(4, 2), training=True)
    assert not bn.gamma.requires_grad and torch.equal(bn.moving_mean, torch.zeros(2))


def test_gradients_flow_to_input_and_parameters_never_to_moving_statistics():
    x = torch.randn(8, 3, requires_grad=True)
    bn = BatchNormalization()
    bn(x, training=True).pow(2).sum().backward()
    assert x.grad is not None and bn.gamma.grad is not None and bn.beta.grad is not None
    assert not bn.moving_mean.requires_grad and bn.moving_mean.grad is None


def test_inference_is_safe_from_several_threads():
    from concurrent.futures import ThreadPoolExecutor

    bn = BatchNormalization().eval()
    bn.build((1, 6))
    before = snapshot(bn)
    inputs = [torch.randn(64, 6) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(bn, inputs))
    for x, y in zip(inputs, outputs):
        torch.testing.assert_close(y, bn(x))
    assert_state_equal(before, bn)


def test_synchronized_without_distributed_is_local_statistics():
    x = torch.randn(12, 4) * 2 - 1
    local, synced = BatchNormalization(), BatchNormalization(synchronized=True)
    assert torch.equal(local(x, training=True), synced(x, training=True))
    assert_state_equal(snapshot(local), synced)


# ---------------------------------------------------------------------------------- tree helpers


def make_model() -> nn.Sequential:
    model = nn.Sequential(
        nn.Linear(5, 4),
        BatchNormalization(gamma_regularizer=L2(0.1), beta_constraint=NonNeg()),
        nn.Sequential(nn.Linear(4, 3), BatchNormalization(beta_regularizer="l1")),
    )
    model(torch.randn(6, 5))
    return model


def test_set_trainable_freezes_a_whole_tree_and_back():
    model = make_model()
    set_trainable(model, False)
    layers = [m for m in model.modules() if isinstance(m, BatchNormalization)]
    assert all(layer.trainable is False for layer in layers)
    assert not any(p.requires_grad for p in model.parameters())
    before = snapshot(model)
    model.train()
    model(torch.randn(6, 5) * 10)
    assert_state_equal(before, model)
    set_trainable(model, True)
    assert all(layer.trainable for layer in layers) and all(p.requires_grad for p in model.parameters())


def test_regularization_loss_sums_the_tree_and_is_zero_without_regularizers():
    model = make_model()
    first, second = model[1], model[2][1]
    expected = 0.1 * first.gamma.pow(2).sum() + 0.01 * second.beta.abs().sum()
    total = batchnorm.regularization_loss(model)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert first.gamma.grad is not None
    zero = batchnorm.regularization_loss(nn.Sequential(BatchNormalization()))
    assert zero.shape == () and zero.item() == 0.0


def test_apply_constraints_through_an_optimizer_hook():
    model = make_model()
    with torch.no_grad():
        model[1].beta.fill_(-1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.register_step_post_hook(lambda *_: batchnorm.apply_constraints(model))
    optimizer.step()
    assert torch.equal(model[1].beta.detach(), torch.zeros(4))


def test_layer_batch_normalization_three_forms():
    layer = layer_batch_normalization(axis=1, momentum=0.5)
    assert isinstance(layer, BatchNormalization) and layer.axis == 1 and layer.momentum == 0.5
    sequential = nn.Sequential(nn.Linear(3, 2))
    assert layer_batch_normalization(sequential, epsilon=0.1) is sequential
    assert isinstance(sequential[1], BatchNormalization) and sequential[1].epsilon == 0.1
    x = torch.randn(10, 2) * 5 + 3
    y = layer_batch_normalization(x)
    mean, var, _ = batch_moments(x, -1)
    torch.testing.assert_close(y, ((x - mean) / torch.sqrt(var + 1e-3)).float())


# --------------------------------------------------------------------------------------- compile


@pytest.mark.slow  # torch.compile: ~5 s for the first compile in a process
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_layer_has_no_graph_breaks_and_matches_eager(masked):
    torch._dynamo.reset()
    x = torch.randn(6, 5, 4) * 2 + 1
    mask = (torch.rand(6, 5) > 0.3) if masked else None
    eager = BatchNormalization(momentum=0.7)
    eager.build(x.shape)
    compiled_layer = BatchNormalization(momentum=0.7)
    compiled_layer.build(x.shape)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for training in (True, False, True):
        xg = x.clone().requires_grad_()
        xe = x.clone().requires_grad_()
        y_compiled = compiled(xg, training=training, mask=mask)
        y_eager = eager(xe, training=training, mask=mask)
        torch.testing.assert_close(y_compiled, y_eager)
        y_compiled.square().sum().backward()
        y_eager.square().sum().backward()
        torch.testing.assert_close(xg.grad, xe.grad)
    # Inductor fuses the update differently: equal up to rounding, not bit for bit.
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_layer.state_dict()[key], value)
    assert not torch.equal(compiled_layer.moving_mean, torch.zeros(4))


# --------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "dtype,weight_dtype,policy",
    [
        ("float64", torch.float64, "float64"),
        (torch.bfloat16, torch.bfloat16, "bfloat16"),
        (
            {
                "module": "keras",
                "class_name": "DTypePolicy",
                "config": {"name": "mixed_float16"},
                "registered_name": None,
            },
            torch.float32,
            "mixed_float16",
        ),
    ],
)
def test_from_config_accepts_dtype_as_name_torch_dtype_or_policy_dict(dtype, weight_dtype, policy):
    config = {**BatchNormalization(name="bn").get_config(), "dtype": dtype}
    layer = BatchNormalization.from_config(config)
    layer.build((2, 3))
    assert layer.gamma.dtype == weight_dtype
    assert layer.get_config()["dtype"]["config"]["name"] == policy


def test_config_is_json_and_round_trips():
    import json

    layer = BatchNormalization(
        axis=1, momentum=0.9, epsilon=0.01, gamma_regularizer="l2", beta_constraint="non_neg", name="x"
    )
    config = json.loads(json.dumps(layer.get_config()))
    assert BatchNormalization.from_config(config).get_config() == layer.get_config()
