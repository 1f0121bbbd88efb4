"""Issue 14: ``batchnorm.fold`` (SPEC 13), written from the spec.

Every model is trained a few steps first (moving statistics far from their initial values) and
gets non-trivial gamma/beta (some negative); ``fold(model)`` must then give ``model.eval()``'s
outputs within 1e-5 relative, with each folded BatchNormalization (ours or torch's) replaced by an
``nn.Identity``, and leave the original model exactly as it was (state, classes, training flags).

Covered: Conv1d/2d/3d, ConvTranspose1d/2d/3d (groups > 1 for one of each) and Linear, with or
without bias, x our layer (every center/scale combination) or torch's (affine or not); an
fx-traced residual model; a conv whose output also feeds another branch (not folded); a shared
conv (not folded); a channels-last dense model; a BN on another axis than the layer's channels
(not folded); a BN after a ReLU (not folded, listed in the one warning); a model torch.fx cannot
trace (its nn.Sequential children folded); a model passing ``mask=`` to our layer.
"""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

import batchnorm
from batchnorm import BatchNormalization

IN, OUT = 4, 6


def _batch(shape, seed) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.5


# name: (layer factory taking bias, input shape, torch BN class)
LAYERS = {
    "Conv1d": (lambda bias: nn.Conv1d(IN, OUT, 3, bias=bias), (3, IN, 9), nn.BatchNorm1d),
    "Conv2d": (lambda bias: nn.Conv2d(IN, OUT, 3, padding=1, bias=bias), (3, IN, 5, 6), nn.BatchNorm2d),
    "Conv2d-groups": (lambda bias: nn.Conv2d(IN, OUT, 3, groups=2, bias=bias), (3, IN, 5, 6), nn.BatchNorm2d),
    "Conv3d": (lambda bias: nn.Conv3d(IN, OUT, 2, bias=bias), (2, IN, 3, 4, 3), nn.BatchNorm3d),
    "ConvTranspose1d": (lambda bias: nn.ConvTranspose1d(IN, OUT, 3, stride=2, bias=bias), (3, IN, 5), nn.BatchNorm1d),
    "ConvTranspose2d": (
        lambda bias: nn.ConvTranspose2d(IN, OUT, 3, stride=2, bias=bias),
        (3, IN, 3, 4),
        nn.BatchNorm2d,
    ),
    "ConvTranspose2d-groups": (
        lambda bias: nn.ConvTranspose2d(IN, OUT, 3, groups=2, bias=bias),
        (3, IN, 3, 4),
        nn.BatchNorm2d,
    ),
    "ConvTranspose3d": (lambda bias: nn.ConvTranspose3d(IN, OUT, 2, bias=bias), (2, IN, 2, 3, 2), nn.BatchNorm3d),
    "Linear": (lambda bias: nn.Linear(IN, OUT, bias=bias), (8, IN), nn.BatchNorm1d),
}
NORMS = {
    "ours": {"center": True, "scale": True},
    "ours-no-center": {"center": False, "scale": True},
    "ours-no-scale": {"center": True, "scale": False},
    "ours-neither": {"center": False, "scale": False},
    "torch": {"affine": True},
    "torch-no-affine": {"affine": False},
}


def _norm(layer_name: str, norm: str) -> nn.Module:
    kwargs = NORMS[norm]
    if norm.startswith("ours"):
        return BatchNormalization(axis=-1 if layer_name == "Linear" else 1, momentum=0.5, epsilon=1e-3, **kwargs)
    return LAYERS[layer_name][2](OUT, momentum=0.5, eps=1e-3, **kwargs)


def _randomize_affine(model: nn.Module) -> None:
    """Non-trivial gamma/beta (weight/bias) on every BN, some gammas negative."""
    generator = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BatchNormalization):
                scale, shift = module.gamma, module.beta
            elif isinstance(module, _BatchNorm):
                scale, shift = module.weight, module.bias
            else:
                continue
            if scale is not None:
                scale.copy_(torch.randn(scale.shape, generator=generator) + 0.5)
            if shift is not None:
                shift.copy_(torch.randn(shift.shape, generator=generator))


def trained(model: nn.Module, shape, steps: int = 3, **call_kwargs) -> nn.Module:
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(_batch(shape, 100 + step) * (step + 1), **call_kwargs)
    _randomize_affine(model)
    return model


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, (BatchNormalization, _BatchNorm))


def description(model: nn.Module) -> list:
    return [(name, type(m), m.training) for name, m in model.named_modules()]


def snapshot(model: nn.Module) -> dict:
    """The state's values (``None`` for an uninitialized weight of an unbuilt layer)."""
    return {key: None if is_lazy(value) else value.detach().clone() for key, value in model.state_dict().items()}


def assert_untouched(model, state, modules) -> None:
    assert description(model) == modules
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert is_lazy(after[key]) if value is None else torch.equal(after[key], value), key


def fold_checked(model: nn.Module) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    """``fold(model)``, checking that the original is untouched; the folded copy and the warnings."""
    state, modules = snapshot(model), description(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = batchnorm.fold(model)
    assert folded is not model
    assert_untouched(model, state, modules)
    # every module in eval mode (the Folded identities have their own test)
    assert not any(m.training for m in folded.modules() if not isinstance(m, nn.Identity)), "a copy in eval mode"
    own = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    assert not any(id(t) in own for t in list(folded.parameters()) + list(folded.buffers())), "a copy"
    return folded, caught


def fold_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "fold" in str(w.message)]


def assert_outputs_equal(folded: nn.Module, model: nn.Module, *inputs, **kwargs) -> None:
    with torch.no_grad():
        expected = model.eval()(*inputs, **kwargs)
        actual = folded(*inputs, **kwargs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


# --------------------------------------------------------------------------------- matrix


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_fold_a_layer_and_its_batch_normalization(layer_name, bias, norm):
    factory, shape, _ = LAYERS[layer_name]
    torch.manual_seed(0)
    model = trained(nn.Sequential(factory(bias), _norm(layer_name, norm)), shape)
    bn = model[1]
    moving_variance = bn.moving_variance if isinstance(bn, BatchNormalization) else bn.running_var
    assert not torch.allclose(moving_variance, torch.ones(OUT), atol=0.1)  # trained statistics
    folded, caught = fold_checked(model)
    assert not fold_warnings(caught)
    assert isinstance(folded[1], nn.Identity)
    assert type(folded[0]) is type(model[0])
    assert not any(is_bn(m) for m in folded.modules())
    assert not torch.equal(folded[0].weight, model[0].weight)  # the BN went into the weights
    assert folded[0].bias is not None  # the BN's shift needs one, whatever the layer had
    assert folded[0].weight.dtype == torch.float32 and folded[0].bias.dtype == torch.float32
    assert_outputs_equal(folded, model, _batch(shape, 7))


@pytest.mark.parametrize("kwargs", [{"renorm": True}, {"virtual_batch_size": 3}], ids=["renorm", "ghost"])
def test_fold_our_layer_with_renorm_or_ghost_batches(kwargs):
    torch.manual_seed(0)
    model = trained(
        nn.Sequential(nn.Conv2d(IN, OUT, 3), BatchNormalization(axis=1, momentum=0.5, **kwargs)), (3, IN, 5, 6)
    )
    folded, caught = fold_checked(model)
    assert isinstance(folded[1], nn.Identity) and not fold_warnings(caught)
    assert_outputs_equal(folded, model, _batch((3, IN, 5, 6), 7))


# ------------------------------------------------------------------------------- models


class Residual(nn.Module):
    """conv -> bn -> relu -> conv -> bn, plus the input: traceable by torch.fx."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(IN, IN, 3, padding=1, bias=False)
        self.bn1 = BatchNormalization(axis=1, momentum=0.5)
        self.conv2 = nn.Conv2d(IN, IN, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(IN, momentum=0.5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


def test_fold_an_fx_traceable_residual_model():
    torch.manual_seed(0)
    model = trained(Residual(), (3, IN, 5, 5))
    folded, caught = fold_checked(model)
    assert not fold_warnings(caught)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert not any(is_bn(m) for m in folded.modules())
    assert_outputs_equal(folded, model, _batch((3, IN, 5, 5), 7))


class FanOut(nn.Module):
    """The conv's output feeds the BN and, also, the skip: the pair must not be folded."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(IN, IN, 1)
        self.bn = norm

    def forward(self, x):
        h = self.conv(x)
        return self.bn(h) + h


@pytest.mark.parametrize("norm", ["ours", "torch"])
def test_a_conv_whose_output_feeds_another_branch_is_not_folded(norm):
    torch.manual_seed(0)
    bn = BatchNormalization(axis=1, momentum=0.5) if norm == "ours" else nn.BatchNorm2d(IN, momentum=0.5)
    model = trained(FanOut(bn), (3, IN, 4, 4))
    folded, caught = fold_checked(model)
    assert type(folded.bn) is type(model.bn)
    assert torch.equal(folded.conv.weight, model.conv.weight)
    messages = fold_warnings(caught)
    assert len(messages) == 1 and re.search(r"\bbn\b", messages[0]), messages
    assert_outputs_equal(folded, model, _batch((3, IN, 4, 4), 7))


def test_a_shared_conv_is_not_folded():
    torch.manual_seed(0)
    conv = nn.Conv2d(IN, IN, 1)
    model = trained(
        nn.Sequential(conv, nn.BatchNorm2d(IN, momentum=0.5), conv, nn.BatchNorm2d(IN, momentum=0.5)), (3, IN, 4, 4)
    )
    folded, caught = fold_checked(model)
    assert isinstance(folded[1], nn.BatchNorm2d) and isinstance(folded[3], nn.BatchNorm2d)
    assert folded[0] is folded[2]
    messages = fold_warnings(caught)
    assert len(messages) == 1 and "fold left 2 " in messages[0], messages
    assert_outputs_equal(folded, model, _batch((3, IN, 4, 4), 7))


def test_a_shared_bn_is_not_folded():
    torch.manual_seed(0)
    bn = BatchNormalization(axis=1, momentum=0.5)
    model = trained(nn.Sequential(nn.Conv2d(IN, IN, 1), bn, nn.Conv2d(IN, IN, 1), bn), (3, IN, 4, 4))
    folded, caught = fold_checked(model)
    assert isinstance(folded[1], BatchNormalization) and folded[3] is folded[1]
    assert len(fold_warnings(caught)) == 1
    assert_outputs_equal(folded, model, _batch((3, IN, 4, 4), 7))


def test_fold_a_channels_last_dense_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN, OUT), BatchNormalization(axis=-1, momentum=0.5), nn.ReLU(), nn.Linear(OUT, 3, bias=False)
    )
    model.append(BatchNormalization(momentum=0.5, center=False))  # Keras's default axis=-1
    model = trained(model, (3, 7, IN))
    folded, caught = fold_checked(model)
    assert not fold_warnings(caught)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    assert not any(is_bn(m) for m in folded.modules())
    assert_outputs_equal(folded, model, _batch((3, 7, IN), 7))


# Each BN normalizes another axis than the layer's output channels, of the same size: a fold that
# matched sizes only would give wrong outputs.
OTHER_AXIS = {
    "Linear-ours-axis=1": (
        lambda: nn.Linear(OUT, OUT),
        lambda: BatchNormalization(axis=1, momentum=0.5),
        (3, OUT, OUT),
    ),
    "Conv2d-ours-axis=-1": (
        lambda: nn.Conv2d(IN, OUT, 1),
        lambda: BatchNormalization(axis=-1, momentum=0.5),
        (3, IN, 5, OUT),
    ),
    "Conv1d-ours-axis=2": (
        lambda: nn.Conv1d(IN, OUT, 1),
        lambda: BatchNormalization(axis=2, momentum=0.5),
        (3, IN, OUT),
    ),
}


@pytest.mark.parametrize("case", list(OTHER_AXIS))
def test_a_bn_on_another_axis_is_not_folded(case):
    layer, norm, shape = OTHER_AXIS[case]
    torch.manual_seed(0)
    model = trained(nn.Sequential(layer(), norm()), shape)
    folded, caught = fold_checked(model)
    assert isinstance(folded[1], BatchNormalization)
    assert torch.equal(folded[0].weight, model[0].weight)
    messages = fold_warnings(caught)
    assert len(messages) == 1 and "fold left 1 " in messages[0], messages
    assert_outputs_equal(folded, model, _batch(shape, 7))


def test_torch_batchnorm1d_after_linear_on_rank_3_inputs_is_never_silently_wrong():
    # BatchNorm1d normalizes dim 1 of (N, L, F): the sequence positions, not Linear's features.
    # With L == F the channel counts agree; fold cannot see the rank, but its output must not be
    # wrong: leaving the pair (or refusing the call) is fine, a folded Linear with wrong outputs not.
    torch.manual_seed(0)
    model = trained(nn.Sequential(nn.Linear(OUT, OUT), nn.BatchNorm1d(OUT, momentum=0.5)), (3, OUT, OUT))
    folded, _ = fold_checked(model)
    x = _batch((3, OUT, OUT), 7)
    try:
        with torch.no_grad():
            folded(x)
    except ValueError:  # a refusal when called is fine
        return
    assert_outputs_equal(folded, model, x)


def test_a_bn_after_a_relu_stays_and_is_listed_in_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(3, IN, 3),
                nn.BatchNorm2d(IN, momentum=0.5),
                nn.ReLU(),
                BatchNormalization(axis=1, momentum=0.5),
            ),
            head=nn.Sequential(nn.Flatten(), nn.Linear(IN * 9, 3)),
        )
    )
    model = trained(model, (3, 3, 5, 5))
    folded, caught = fold_checked(model)
    assert isinstance(folded.features[1], nn.Identity)
    assert isinstance(folded.features[3], BatchNormalization)
    messages = fold_warnings(caught)
    assert len(messages) == 1, messages
    assert "features.3" in messages[0] and "fold left 1 " in messages[0], messages
    assert "features.1" not in messages[0]
    assert_outputs_equal(folded, model, _batch((3, 3, 5, 5), 7))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, IN, 3), nn.BatchNorm2d(IN, momentum=0.5))
        self.b = nn.Sequential(nn.Conv2d(IN, IN, 1), BatchNormalization(axis=1, momentum=0.5))

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            return self.b(h)
        return -self.b(h)


def test_a_model_fx_cannot_trace_folds_inside_its_sequential_children():
    torch.manual_seed(0)
    model = trained(Untraceable(), (3, 3, 5, 5))
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.fx raises
        torch.fx.symbolic_trace(model)
    folded, _ = fold_checked(model)
    assert isinstance(folded.a[1], nn.Identity) and isinstance(folded.b[1], nn.Identity)
    assert not any(is_bn(m) for m in folded.modules())
    assert_outputs_equal(folded, model, _batch((3, 3, 5, 5), 7))
    assert_outputs_equal(folded, model, -_batch((3, 3, 5, 5), 7) * 5)
    assert_outputs_equal(folded, model, _batch((3, 3, 5, 5), 8) + 5)


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(IN, OUT)
        self.bn = BatchNormalization(momentum=0.5)

    def forward(self, x, mask):
        return self.bn(self.dense(x), mask=mask)


def test_a_model_calling_our_layer_with_a_mask_runs_after_folding():
    torch.manual_seed(0)
    mask = torch.arange(7) < torch.tensor([[7], [3], [5]])
    model = trained(Masked(), (3, 7, IN), mask=mask)
    folded, caught = fold_checked(model)
    assert not fold_warnings(caught)
    assert isinstance(folded.bn, nn.Identity)
    assert isinstance(folded.bn, batchnorm.convert.Folded)
    assert_outputs_equal(folded, model, _batch((3, 7, IN), 7), mask=mask)


def test_an_unbuilt_layer_stays_and_is_listed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT), BatchNormalization())
    folded, caught = fold_checked(model)
    assert isinstance(folded[1], BatchNormalization)
    messages = fold_warnings(caught)
    assert len(messages) == 1 and "fold left 1 " in messages[0], messages
    assert_outputs_equal(folded, model, _batch((3, IN), 7))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fold_of_a_model_in_either_mode_gives_an_eval_copy(training):
    torch.manual_seed(0)
    model = trained(nn.Sequential(nn.Conv2d(IN, OUT, 1), nn.BatchNorm2d(OUT, momentum=0.5)), (3, IN, 4, 4))
    model.train(training)
    folded, _ = fold_checked(model)
    assert isinstance(folded[1], nn.Identity)
    assert [name for name, m in folded.named_modules() if m.training] == []  # the Folded identity too
    assert_outputs_equal(folded, model, _batch((3, IN, 4, 4), 7))


# ------------------------------------------------------- producers whose weight fold cannot rewrite


class StandardizedConv(nn.Conv2d):
    """A convolution with its own forward (weight standardization): its weight is not what it applies."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return nn.functional.conv2d(x, weight, self.bias)


class UntraceableStandardized(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if float(x.mean()) > 100:  # data-dependent: torch.fx cannot trace it
            return x
        return self.body(x)


def _parametrized():
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4))


def _tied():
    first, second = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    second.weight = first.weight
    return nn.Sequential(first, nn.BatchNorm2d(3), second)


def _hooked():
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    return nn.Sequential(conv, nn.BatchNorm2d(4))


@pytest.mark.parametrize(
    "factory, reason",
    [
        (_parametrized, "parametrization"),
        (_tied, "shares a weight"),
        (_hooked, "hook"),
        (UntraceableStandardized, "its own forward"),
    ],
    ids=["weight_norm", "tied-weights", "pre-hook", "own-forward"],
)
def test_a_producer_whose_weight_is_not_what_it_applies_is_not_folded(factory, reason):
    torch.manual_seed(0)
    model = trained(factory(), (4, 3, 6, 6))
    folded, caught = fold_checked(model)
    [message] = fold_warnings(caught)
    assert "fold left 1 " in message and reason in message
    assert sum(is_bn(m) for m in folded.modules()) == 1
    assert_outputs_equal(folded, model, _batch((4, 3, 6, 6), 3))


def test_a_converted_batchnorm1d_after_linear_folds_for_its_rank():
    """from_torch's layer from BatchNorm1d has no rank until called: it folds as BatchNorm1d does,
    for (N, features) inputs, which its Folded checks."""
    torch.manual_seed(0)
    model = batchnorm.from_torch(trained(nn.Sequential(nn.Linear(IN, OUT), nn.BatchNorm1d(OUT)), (8, IN)))
    assert model[1]._built_shape is None
    folded, caught = fold_checked(model)
    assert fold_warnings(caught) == []
    assert isinstance(folded[1], batchnorm.convert.Folded) and folded[1].rank == 2
    assert_outputs_equal(folded, model, _batch((5, IN), 4))
    with pytest.raises(ValueError, match="rank 2"):
        folded(_batch((5, OUT, IN), 4))


def test_a_batch_normalization_called_twice_is_not_folded_and_the_reason_says_so():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.second(self.bn(self.first(x))))

    torch.manual_seed(0)
    model = trained(Twice(), (4, 3, 5, 5))
    folded, caught = fold_checked(model)
    assert fold_warnings(caught) == ["fold left 1 batch normalization layer(s) unfolded: bn (called 2 times)"]
    assert_outputs_equal(folded, model, _batch((4, 3, 5, 5), 5))
