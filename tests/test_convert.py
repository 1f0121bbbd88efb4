"""Issue 14: ``batchnorm.from_torch`` and ``batchnorm.to_torch`` (SPEC 13), written from the spec.

Every torch case is a module trained a few steps first (non-trivial running statistics) with
non-trivial ``weight``/``bias``; it is compared with a deep copy taken before the conversion (the
converted layer shares the torch module's tensors, so the original itself moves with it).

Covered: one layer of each kind (BatchNorm1d on rank 2 and 3, BatchNorm2d also channels-last,
BatchNorm3d, an initialized LazyBatchNorm2d, SyncBatchNorm without a process group) x affine x
default / non-default eps and momentum: eval outputs (1e-6), training outputs (1e-4), the moving
statistics after one step (mean equal to torch's, variance the biased one); models (nested
Sequential / ModuleList / ModuleDict, a shared BN, the root a BN, in place, shared parameters with an
optimizer made before); what each direction refuses (ValueError naming the path); round trips both
ways; and PyTorch's conventions on a converted model (state_dict, load_state_dict, .double(),
deepcopy, torch.compile).
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm import BatchNormalization

C = 5


def _batch(shape, seed, memory_format=None) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 3
    return x if memory_format is None else x.contiguous(memory_format=memory_format)


# name: (factory of the torch module, input shape, memory format)
TORCH_CASES = {
    "BatchNorm1d-rank2": (nn.BatchNorm1d, (16, C), None),
    "BatchNorm1d-rank3": (nn.BatchNorm1d, (4, C, 6), None),
    "BatchNorm2d": (nn.BatchNorm2d, (4, C, 3, 5), None),
    "BatchNorm2d-channels_last": (nn.BatchNorm2d, (4, C, 3, 5), torch.channels_last),
    "BatchNorm3d": (nn.BatchNorm3d, (2, C, 3, 2, 4), None),
    "LazyBatchNorm2d": (lambda c, **kw: nn.LazyBatchNorm2d(**kw), (4, C, 3, 5), None),
    "SyncBatchNorm": (nn.SyncBatchNorm, (4, C, 3, 5), None),
}
CONFIGS = {"default": {}, "eps-momentum": {"eps": 1e-2, "momentum": 0.3}}


def trained_torch(case: str, affine: bool, config: str) -> tuple[nn.Module, torch.Tensor]:
    """The torch module of ``case`` after three training steps, with random weight/bias; and a batch."""
    factory, shape, memory_format = TORCH_CASES[case]
    torch.manual_seed(0)
    module = factory(C, affine=affine, **CONFIGS[config])
    module.train()
    with torch.no_grad():
        for step in range(3):
            module(_batch(shape, 100 + step, memory_format))
    assert type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # lazy: initialized
    if affine:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(-1.5, 2.0, C))
            module.bias.copy_(torch.linspace(0.5, -1.0, C))
    assert not torch.allclose(module.running_mean, torch.zeros(C))
    assert not torch.allclose(module.running_var, torch.ones(C))
    return module, _batch(shape, 7, memory_format)


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


cases = pytest.mark.parametrize("case", list(TORCH_CASES))
affines = pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
configs = pytest.mark.parametrize("config", list(CONFIGS))


# ------------------------------------------------------------------------------- one layer


@cases
@affines
@configs
def test_from_torch_gives_our_layer_with_the_torch_configuration(case, affine, config):
    module, _ = trained_torch(case, affine, config)
    converted = batchnorm.from_torch(module)
    assert type(converted) is BatchNormalization
    assert converted.axis == 1
    momentum, eps = module.momentum, module.eps
    assert converted.momentum == pytest.approx(1 - momentum, abs=1e-12)
    assert converted.epsilon == eps
    assert converted.center is affine and converted.scale is affine
    assert converted.synchronized is isinstance(module, nn.SyncBatchNorm)
    assert converted.process_group is None
    assert converted.trainable and converted.renorm is False and converted.virtual_batch_size is None
    if affine:
        assert converted.gamma is module.weight and converted.beta is module.bias
    else:
        assert converted.gamma is None and converted.beta is None
    assert converted.moving_mean is module.running_mean
    assert converted.moving_variance is module.running_var


@cases
@affines
@configs
def test_eval_outputs_equal_torchs_right_after_from_torch(case, affine, config):
    module, x = trained_torch(case, affine, config)
    reference = copy.deepcopy(module).eval()
    converted = batchnorm.from_torch(module.eval())
    with torch.no_grad():
        assert_close(converted(x), reference(x), 1e-6)
        assert_close(converted(x, training=False), reference(x), 1e-6)


@cases
@affines
@configs
def test_training_outputs_and_one_step_of_moving_statistics(case, affine, config):
    module, x = trained_torch(case, affine, config)
    reference = copy.deepcopy(module).train()
    converted = batchnorm.from_torch(module)
    assert converted.training  # the flag is copied
    m = reference.momentum
    variance_before = reference.running_var.clone()
    with torch.no_grad():
        expected = reference(x)
        actual = converted(x)
    assert_close(actual, expected, 1e-4)
    # Keras's moving mean is torch's running mean: the same average of the same batch means.
    assert_close(converted.moving_mean, reference.running_mean, 1e-6)
    # The moving variance takes the biased batch variance (documented difference): torch's update
    # m * unbiased, times (n - 1) / n.
    n = x.numel() // C
    torch_step = reference.running_var - (1 - m) * variance_before
    assert_close(converted.moving_variance, (1 - m) * variance_before + torch_step * (n - 1) / n, 1e-6)
    channels_first = x.movedim(1, 0).reshape(C, -1).double()
    biased = channels_first.var(dim=1, correction=0)
    assert_close(converted.moving_variance.double(), (1 - m) * variance_before.double() + m * biased, 1e-6)
    assert not torch.allclose(converted.moving_variance, reference.running_var, rtol=1e-6, atol=1e-6)


@cases
def test_the_mode_is_copied(case):
    module, _ = trained_torch(case, True, "default")
    assert batchnorm.from_torch(copy.deepcopy(module).train()).training
    assert not batchnorm.from_torch(copy.deepcopy(module).eval()).training


def test_batchnorm2d_and_3d_fix_the_rank():
    torch.manual_seed(0)
    for module, good, bad in [
        (nn.BatchNorm2d(3), (2, 3, 4, 4), (2, 3, 4)),
        (nn.BatchNorm3d(3), (2, 3, 2, 2, 2), (2, 3, 4, 4)),
    ]:
        converted = batchnorm.from_torch(module.eval())
        converted(torch.randn(good))
        with pytest.raises(ValueError):
            converted(torch.randn(bad))


@pytest.mark.parametrize("rank", [2, 3])
def test_batchnorm1d_takes_its_rank_from_the_first_call(rank):
    converted = batchnorm.from_torch(nn.BatchNorm1d(3).eval())
    converted(torch.randn((4, 3, 5)[:rank]))
    with pytest.raises(ValueError):
        converted(torch.randn((4, 3, 5)[: 5 - rank]))


def test_our_layers_are_left_alone():
    ours = BatchNormalization(axis=1, momentum=0.7)
    model = nn.Sequential(nn.Linear(3, 3), ours, nn.BatchNorm1d(3))
    assert batchnorm.from_torch(model) is model
    assert model[1] is ours
    assert type(model[2]) is BatchNormalization


# ---------------------------------------------------------------------------------- models


class _Chain(nn.Module):
    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Sum(nn.Module):
    def __init__(self, branches: nn.ModuleDict):
        super().__init__()
        self.branches = branches

    def forward(self, x):
        return sum(branch(x) for branch in self.branches.values())


def nested_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            body=nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))
            ),
            blocks=_Chain(nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.BatchNorm2d(4)])),
            heads=_Sum(
                nn.ModuleDict(
                    {
                        "a": nn.BatchNorm2d(4, momentum=0.3, eps=1e-4),
                        "b": nn.Sequential(nn.Identity(), nn.SyncBatchNorm(4, affine=False)),
                    }
                )
            ),
        )
    )


def _train(model: nn.Module, shape, steps: int = 3) -> None:
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(_batch(shape, 200 + step))


def test_a_nested_model_is_converted_in_place():
    model = nested_model()
    shape = (4, 3, 5, 5)
    _train(model, shape)
    reference = copy.deepcopy(model)
    torch_paths = {name for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    assert torch_paths == {"body.1", "body.2.1", "blocks.layers.0.1", "blocks.layers.1", "heads.branches.a"} | {
        "heads.branches.b.1"
    }
    originals = dict(model.named_modules())
    assert batchnorm.from_torch(model) is model
    ours = {name: m for name, m in model.named_modules() if isinstance(m, BatchNormalization)}
    assert set(ours) == torch_paths
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    for name, layer in ours.items():
        original = originals[name]
        assert layer.moving_mean is original.running_mean
        assert layer.momentum == pytest.approx(1 - original.momentum, abs=1e-12)
        assert layer.epsilon == original.eps
        assert layer.synchronized is isinstance(original, nn.SyncBatchNorm)
    assert type(model.body[0]) is nn.Conv2d and model.body[0] is originals["body.0"]
    x = _batch(shape, 9)
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(x), 1e-5)
        assert_close(model.train()(x), reference.train()(x), 1e-4)
    for name, layer in ours.items():
        assert_close(layer.moving_mean, dict(reference.named_modules())[name].running_mean, 1e-6)


def test_a_shared_module_gets_one_shared_replacement():
    torch.manual_seed(0)
    shared = nn.BatchNorm1d(4)
    # at two places under one parent, and under another parent
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Sequential(nn.Linear(4, 4), shared), shared)
    _train(model, (8, 4))
    reference = copy.deepcopy(model)
    batchnorm.from_torch(model)
    assert type(model[1]) is BatchNormalization
    assert model[2][1] is model[1] and model[3] is model[1]
    assert len([m for m in model.modules() if isinstance(m, BatchNormalization)]) == 1  # modules() dedups
    x = _batch((8, 4), 3)
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(x), 1e-5)
        assert_close(model.train()(x), reference.train()(x), 1e-4)
    assert_close(model[1].moving_mean, reference[1].running_mean, 1e-6)


def test_the_root_itself_is_returned_replaced():
    module, x = trained_torch("BatchNorm2d", True, "default")
    reference = copy.deepcopy(module).eval()
    converted = batchnorm.from_torch(module.eval())
    assert converted is not module and type(converted) is BatchNormalization
    assert type(module) is nn.BatchNorm2d  # the torch module itself is not changed into another class
    with torch.no_grad():
        assert_close(converted(x), reference(x), 1e-6)


def test_an_optimizer_made_before_conversion_steps_the_converted_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    original = model[1]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batchnorm.from_torch(model)
    converted = model[1]
    assert converted.gamma is original.weight and converted.beta is original.bias
    assert converted.moving_mean is original.running_mean and converted.moving_variance is original.running_var
    assert {id(p) for p in model.parameters()} == {id(p) for p in optimizer.param_groups[0]["params"]}
    gamma, beta = converted.gamma.detach().clone(), converted.beta.detach().clone()
    x = _batch((8, 4), 1)
    (model.train()(x) * torch.linspace(-1, 1, 4)).square().sum().backward()
    assert converted.gamma.grad is not None and converted.gamma.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(converted.gamma.detach(), gamma)
    assert not torch.equal(converted.beta.detach(), beta)
    assert converted.gamma is original.weight


# ------------------------------------------------------------------------------ refusals


def _inside(bad: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(stem=nn.Identity(), body=nn.Sequential(nn.Identity(), nn.ReLU(), bad)))


FROM_TORCH_REFUSED = {
    "momentum=None": lambda: nn.BatchNorm2d(3, momentum=None),
    "track_running_stats=False": lambda: nn.BatchNorm2d(3, track_running_stats=False),
    "uninitialized-lazy": lambda: nn.LazyBatchNorm2d(),
    "uninitialized-lazy-1d": lambda: nn.LazyBatchNorm1d(),
}


@pytest.mark.parametrize("kind", list(FROM_TORCH_REFUSED))
def test_from_torch_refuses_what_has_no_keras_meaning(kind):
    with pytest.raises(ValueError, match=r"body\.2"):
        batchnorm.from_torch(_inside(FROM_TORCH_REFUSED[kind]()))


def test_a_refused_from_torch_leaves_the_model_as_it_was():
    good = nn.BatchNorm2d(3)
    model = nn.Sequential(
        OrderedDict(stem=good, body=nn.Sequential(nn.Identity(), nn.ReLU(), nn.BatchNorm2d(3, momentum=None)))
    )
    with pytest.raises(ValueError, match=r"body\.2"):
        batchnorm.from_torch(model)
    assert model.stem is good and type(model.body[2]) is nn.BatchNorm2d


@pytest.mark.parametrize("kind", list(FROM_TORCH_REFUSED))
def test_from_torch_refuses_a_root_naming_it(kind):
    with pytest.raises(ValueError, match="<root>"):
        batchnorm.from_torch(FROM_TORCH_REFUSED[kind]())


def _built(shape, **kwargs) -> BatchNormalization:
    layer = BatchNormalization(**kwargs)
    layer.build(shape)
    return layer


RANK4 = (2, 3, 4, 5)
TO_TORCH_REFUSED = {
    "unbuilt": (lambda: BatchNormalization(axis=1), "built"),
    "axis=-1-rank4": (lambda: _built(RANK4, axis=-1), "axis"),
    "axis=2-rank4": (lambda: _built(RANK4, axis=2), "axis"),
    "axis=-1-rank3": (lambda: _built((2, 3, 4), axis=-1), "axis"),
    "several-axes": (lambda: _built(RANK4, axis=(1, 2)), "axis"),
    "renorm": (lambda: _built(RANK4, axis=1, renorm=True), "renorm"),
    "virtual_batch_size": (lambda: _built(RANK4, axis=1, virtual_batch_size=2), "virtual_batch_size"),
    "trainable=False": (lambda: _built(RANK4, axis=1, trainable=False), "trainable"),
    "gamma_regularizer": (lambda: _built(RANK4, axis=1, gamma_regularizer="l2"), "regulari"),
    "beta_regularizer": (lambda: _built(RANK4, axis=1, beta_regularizer="l1"), "regulari"),
    "gamma_constraint": (lambda: _built(RANK4, axis=1, gamma_constraint="non_neg"), "constraint"),
    "beta_constraint": (lambda: _built(RANK4, axis=1, beta_constraint="max_norm"), "constraint"),
    "rank6": (lambda: _built((2, 3, 2, 2, 2, 2), axis=1), "rank"),
}


@pytest.mark.parametrize("kind", list(TO_TORCH_REFUSED))
def test_to_torch_refuses_what_torch_cannot_hold(kind):
    factory, word = TO_TORCH_REFUSED[kind]
    with pytest.raises(ValueError, match=r"body\.2") as error:
        batchnorm.to_torch(_inside(factory()))
    assert word in str(error.value)
    with pytest.raises(ValueError, match="<root>"):
        batchnorm.to_torch(factory())


def test_a_refused_to_torch_leaves_the_model_as_it_was():
    good = _built(RANK4, axis=1)
    model = _inside(_built(RANK4, axis=1, renorm=True))
    model.stem = good
    with pytest.raises(ValueError, match=r"body\.2"):
        batchnorm.to_torch(model)
    assert model.stem is good and type(model.body[2]) is BatchNormalization


# ---------------------------------------------------------------------------- round trips


ROUND_TRIP_CASES = [case for case in TORCH_CASES if case != "BatchNorm2d-channels_last"]


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
@affines
@configs
def test_torch_to_ours_to_torch(case, affine, config):
    module, x = trained_torch(case, affine, config)
    reference = copy.deepcopy(module)
    expected_class = type(module)
    ours = batchnorm.from_torch(module)
    back = batchnorm.to_torch(ours)
    assert type(back) is expected_class
    assert back.num_features == C and back.affine is affine and back.track_running_stats
    assert back.momentum == pytest.approx(reference.momentum, abs=1e-12)
    assert back.eps == reference.eps
    assert back.training is reference.training
    assert back.running_mean is ours.moving_mean and back.running_var is ours.moving_variance  # shared back
    if affine:
        assert back.weight is ours.gamma and back.bias is ours.beta
    expected_state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in back.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert state.keys() == expected_state.keys()
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        assert_close(back.eval()(x), reference.eval()(x), 1e-6)
        assert_close(back.train()(x), reference.train()(x), 1e-6)
    # both torch now: the same update of the running statistics
    assert_close(back.running_mean, reference.running_mean, 1e-6)
    assert_close(back.running_var, reference.running_var, 1e-6)


# (constructor kwargs, build shape, torch class)
OURS_CASES = {
    "axis=1-rank4": ({"axis": 1}, (4, C, 3, 5), nn.BatchNorm2d),
    "axis=-3-rank4": ({"axis": -3}, (4, C, 3, 5), nn.BatchNorm2d),
    "axis=1-rank2": ({"axis": 1}, (16, C), nn.BatchNorm1d),
    "axis=-1-rank2": ({"axis": -1}, (16, C), nn.BatchNorm1d),
    "axis=1-rank3": ({"axis": 1}, (4, C, 6), nn.BatchNorm1d),
    "axis=1-rank5": ({"axis": 1}, (2, C, 3, 2, 4), nn.BatchNorm3d),
    "synchronized-rank4": ({"axis": 1, "synchronized": True}, (4, C, 3, 5), nn.SyncBatchNorm),
    "no-center": ({"axis": 1, "center": False}, (4, C, 3, 5), nn.BatchNorm2d),
    "no-scale": ({"axis": 1, "scale": False}, (4, C, 3, 5), nn.BatchNorm2d),
    "neither": ({"axis": 1, "center": False, "scale": False}, (4, C, 3, 5), nn.BatchNorm2d),
}


def trained_ours(kind: str) -> tuple[BatchNormalization, torch.Tensor]:
    kwargs, shape, _ = OURS_CASES[kind]
    layer = BatchNormalization(momentum=0.6, epsilon=1e-2, **kwargs).train()
    with torch.no_grad():
        for step in range(3):
            layer(_batch(shape, 300 + step))
        if layer.gamma is not None:
            layer.gamma.copy_(torch.linspace(-1.5, 2.0, C))
        if layer.beta is not None:
            layer.beta.copy_(torch.linspace(0.5, -1.0, C))
    return layer, _batch(shape, 8)


@pytest.mark.parametrize("kind", list(OURS_CASES))
def test_ours_to_torch_to_ours(kind):
    layer, x = trained_ours(kind)
    reference = copy.deepcopy(layer)
    torch_module = batchnorm.to_torch(layer)
    assert type(torch_module) is OURS_CASES[kind][2]
    assert torch_module.num_features == C and torch_module.track_running_stats
    assert torch_module.momentum == pytest.approx(1 - layer.momentum, abs=1e-12)
    assert torch_module.eps == layer.epsilon
    assert torch_module.affine is (layer.center or layer.scale)
    assert torch_module.running_mean is layer.moving_mean and torch_module.running_var is layer.moving_variance
    if layer.scale:
        assert torch_module.weight is layer.gamma
    if layer.center:
        assert torch_module.bias is layer.beta
    if torch_module.affine and not layer.scale:  # the missing one: a frozen constant
        assert torch.equal(torch_module.weight.detach(), torch.ones(C)) and not torch_module.weight.requires_grad
    if torch_module.affine and not layer.center:
        assert torch.equal(torch_module.bias.detach(), torch.zeros(C)) and not torch_module.bias.requires_grad
    with torch.no_grad():
        assert_close(torch_module.eval()(x), reference.eval()(x), 1e-6)
    back = batchnorm.from_torch(torch_module)
    assert type(back) is BatchNormalization and back.axis == 1
    assert back.momentum == pytest.approx(layer.momentum, abs=1e-12) and back.epsilon == layer.epsilon
    assert back.synchronized is layer.synchronized
    with torch.no_grad():
        assert_close(back.eval()(x), reference.eval()(x), 1e-6)
        assert_close(back.train()(x), reference.train()(x), 1e-4)
    assert_close(back.moving_mean, reference.moving_mean, 1e-6)
    assert_close(back.moving_variance, reference.moving_variance, 1e-6)  # ours again: biased both


@pytest.mark.parametrize("kind", ["axis=1-rank4", "axis=1-rank2", "neither"])
def test_to_torch_training_outputs_equal_ours(kind):
    layer, x = trained_ours(kind)
    reference = copy.deepcopy(layer).train()
    torch_module = batchnorm.to_torch(layer).train()
    with torch.no_grad():
        assert_close(torch_module(x), reference(x), 1e-4)
    assert_close(torch_module.running_mean, reference.moving_mean, 1e-6)


def test_to_torch_of_a_layer_built_by_load_state_dict_is_batchnorm1d():
    source, _ = trained_ours("axis=1-rank4")
    layer = BatchNormalization(axis=1, momentum=0.6, epsilon=1e-2)
    layer.load_state_dict(source.state_dict())
    assert layer.built
    torch_module = batchnorm.to_torch(layer)
    assert type(torch_module) is nn.BatchNorm1d
    assert torch.equal(torch_module.running_var, source.moving_variance)


def test_to_torch_of_a_model_is_in_place():
    torch.manual_seed(0)
    shared = BatchNormalization(axis=1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        BatchNormalization(axis=1, momentum=0.8),
        nn.Sequential(nn.ReLU(), shared, nn.Identity(), shared),
        nn.BatchNorm2d(4),  # torch's own: left as it is
    )
    _train(model, (4, 3, 3, 3))
    reference = copy.deepcopy(model)
    torch_bn = model[3]
    assert batchnorm.to_torch(model) is model
    assert type(model[1]) is nn.BatchNorm2d and model[1].momentum == pytest.approx(0.2, abs=1e-12)
    assert type(model[2][1]) is nn.BatchNorm2d and model[2][3] is model[2][1]
    assert model[3] is torch_bn
    assert not any(isinstance(m, BatchNormalization) for m in model.modules())
    x = _batch((4, 3, 3, 3), 5)
    with torch.no_grad():
        assert_close(model.eval()(x), reference.eval()(x), 1e-5)


# --------------------------------------------------------------- PyTorch conventions after


def small_torch_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    _train(model, (4, 3, 5, 5))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.5, -0.5, 2.0, 0.7]))
        model[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3, 1.0]))
    return model


def test_state_dict_keys_of_a_converted_model():
    model = batchnorm.from_torch(small_torch_model())
    assert list(model.state_dict()) == [
        "0.weight",
        "0.bias",
        "1.gamma",
        "1.beta",
        "1.moving_mean",
        "1.moving_variance",
        "3.weight",
        "3.bias",
    ]


def test_load_state_dict_round_trip_of_a_converted_model():
    model = batchnorm.from_torch(small_torch_model())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)
    fresh = batchnorm.from_torch(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    )
    fresh.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = _batch((4, 3, 5, 5), 11)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
        assert torch.equal(fresh.train()(x), model.train()(x))
    assert torch.equal(fresh[1].moving_variance, model[1].moving_variance)


def test_double_of_a_converted_model():
    model = small_torch_model()
    reference = copy.deepcopy(model).double().eval()
    converted = batchnorm.from_torch(model).double().eval()
    assert converted[1].moving_mean.dtype == converted[1].gamma.dtype == torch.float64
    x = _batch((4, 3, 5, 5), 12).double()
    with torch.no_grad():
        y = converted(x)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, reference(x), rtol=1e-12, atol=1e-12)


def test_deepcopy_of_a_converted_model():
    converted = batchnorm.from_torch(small_torch_model())
    clone = copy.deepcopy(converted)
    assert clone[1].gamma is not converted[1].gamma and clone[1].moving_mean is not converted[1].moving_mean
    x = _batch((4, 3, 5, 5), 13)
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), converted.eval()(x))
        before = converted[1].moving_mean.clone()
        clone.train()(x)
    assert torch.equal(converted[1].moving_mean, before)
    assert not torch.equal(clone[1].moving_mean, before)


@pytest.mark.slow  # torch.compile: 5-20 s for the first compile in a process on 2 cores
def test_torch_compile_of_a_converted_model_in_eval():
    converted = batchnorm.from_torch(small_torch_model()).eval()
    x = _batch((4, 3, 5, 5), 14)
    with torch.no_grad():
        expected = converted(x)
        compiled = torch.compile(converted, fullgraph=True)
        assert_close(compiled(x), expected, 1e-6)
