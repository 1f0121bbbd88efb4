"""Export stays working (issue 14): inference models with our layers, through ``torch.export`` and ONNX.

Each model is trained a few steps first (the masked one with masks), so that its moving statistics,
gamma and beta are far from their initial values; then, in ``eval()``:

- ``torch.export.export`` with a static and with a dynamic batch dimension: the program's outputs
  equal eager ``model(x)`` within 1e-5 relative, and the program writes no buffer;
- ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch dimension, run in onnxruntime on
  the CPU at two batch sizes: outputs within 1e-5 relative of eager.

The ghost-batch layer is run at batch sizes that its ``virtual_batch_size`` does not divide:
inference takes any batch size. The models whose layers follow a Conv/Linear are also folded
(``batchnorm.fold``) and exported the same way: the folded program's outputs are compared with the
original (unfolded) model's eager outputs, at the same tolerance.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import onnxruntime  # a missing package fails the file: the test extra installs it
import pytest
import torch
from torch import nn

from batchnorm import BatchNormalization, fold
from batchnorm.convert import Folded

# Two notices from torch's own exporter code about itself, nothing about the model: pytree's
# deprecated LeafSpec check, and the mask's batch axis named like the input's (it is the same Dim).
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:# The axis name. batch will not be used:UserWarning"),
]

RTOL, ATOL = 1e-5, 1e-6  # "within 1e-5 of eager": outputs are O(1), so atol only matters near 0
EXPORT_BATCH, OTHER_BATCHES = 4, (7, 1)


class MaskedDense(nn.Module):
    """A sequence model whose normalization takes the padding mask (used only in training)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 6)
        self.norm = BatchNormalization(axis=-1, momentum=0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(self.linear(x), mask=mask)


def conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        BatchNormalization(axis=1, momentum=0.5),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
        BatchNormalization(axis=1, momentum=0.5),
    )


def dense() -> nn.Module:  # channels-last: (batch, time, features)
    return nn.Sequential(
        nn.Linear(6, 8),
        BatchNormalization(axis=-1, momentum=0.5),
        nn.ReLU(),
        nn.Linear(8, 5),
        BatchNormalization(axis=-1, momentum=0.5),
    )


def renorm() -> nn.Module:
    clipping = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}
    layer = BatchNormalization(axis=1, momentum=0.5, renorm=True, renorm_clipping=clipping, renorm_momentum=0.9)
    return nn.Sequential(nn.Conv1d(3, 4, 1), layer)


def ghost() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), BatchNormalization(axis=-1, momentum=0.5, virtual_batch_size=2))


def axes(axis: tuple[int, ...]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(BatchNormalization(axis=axis, momentum=0.5))


# name: (builder, the input's shape without the batch, whether training passes masks)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "conv": (conv, (3, 8, 8), False),
    "dense": (dense, (7, 6), False),
    "masked": (MaskedDense, (7, 5), True),
    "renorm": (renorm, (3, 5), False),
    "ghost": (ghost, (5, 3), False),
    "axes-adjacent": (axes((1, 2)), (3, 2, 5), False),
    "axes-apart": (axes((1, 3)), (3, 2, 5), False),
}
FOLDABLE = ("conv", "dense", "masked", "renorm", "ghost")  # every layer directly after a Conv/Linear
# A case is a model's name, "-folded" added for its folded copy.
cases = pytest.mark.parametrize("case", [*MODELS, *(f"{name}-folded" for name in FOLDABLE)])


def inputs(name: str, batch: int, seed: int) -> tuple[tuple[torch.Tensor], dict[str, torch.Tensor]]:
    """``(args, kwargs)`` for a call: offset inputs, and a padding mask for the masked model."""
    generator = torch.Generator().manual_seed(seed)
    _, shape, masked = MODELS[name]
    x = torch.randn((batch, *shape), generator=generator) * 2 + 1
    kwargs = {"mask": torch.rand((batch, *shape[:-1]), generator=generator) > 0.3} if masked else {}
    return (x,), kwargs


@functools.cache
def trained(name: str) -> nn.Module:
    """The model after a few SGD steps in training mode (with masks where it takes them), in eval()."""
    build, _, masked = MODELS[name]
    torch.manual_seed(0)
    model = build()
    model(*inputs(name, EXPORT_BATCH, 100)[0])  # builds the lazy layers before the optimizer sees them
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(4):
        (x,), kwargs = inputs(name, EXPORT_BATCH, step)
        if masked:  # padding far off the data: statistics that read it would be far off too
            x = torch.where(kwargs["mask"].unsqueeze(-1), x, torch.full_like(x, 50.0))
        error = (model(x, **kwargs) - 0.5 * x.mean()).square()
        if masked:  # the loss of the masked-in positions only, as a sequence model's
            error = error * kwargs["mask"].unsqueeze(-1)
        loss = error.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, BatchNormalization)]
    assert layers
    for layer in layers:  # trained: inference is not the identity of the initial weights
        assert not torch.allclose(layer.moving_mean, torch.zeros_like(layer.moving_mean))
        assert not torch.allclose(layer.moving_variance, torch.ones_like(layer.moving_variance))
        assert not torch.allclose(layer.gamma, torch.ones_like(layer.gamma))
        if layer.renorm:
            assert not torch.allclose(layer.renorm_mean, layer.moving_mean)
        if masked:
            assert layer.moving_mean.abs().max() < 10, "the padding reached the moving mean"
    return model


@functools.cache
def folded(name: str) -> nn.Module:
    model = trained(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copy = fold(model)
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]  # nothing left unfolded
    layers = sum(isinstance(m, BatchNormalization) for m in model.modules())
    assert sum(isinstance(m, Folded) for m in copy.modules()) == layers
    assert not any(isinstance(m, BatchNormalization) for m in copy.modules())
    return copy


def under_test(case: str) -> tuple[str, nn.Module, nn.Module]:
    """The case's model name, the model to export and the eager model to compare with (the original)."""
    name = case.removesuffix("-folded")
    return name, folded(name) if case.endswith("-folded") else trained(name), trained(name)


def eager(model: nn.Module, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(*args, **kwargs)


def dynamic_batch(name: str):
    """``dynamic_shapes`` for ``(x,)`` and the mask: one symbolic batch dimension shared by both."""
    batch = torch.export.Dim("batch")
    masked = MODELS[name][2]
    return {"x": {0: batch}, "mask": {0: batch}} if masked else ({0: batch},)


# ----------------------------------------------------------------------------------- torch.export


def check_program(program: torch.export.ExportedProgram, model: nn.Module) -> None:
    # Inference: the program reads the moving statistics (folded: none) and writes nothing back.
    assert program.graph_signature.buffers_to_mutate == {}
    assert len(program.graph_signature.inputs_to_buffers) == len(list(model.buffers()))


@cases
def test_torch_export_matches_eager(case):
    name, model, original = under_test(case)
    args, kwargs = inputs(name, EXPORT_BATCH, 10)
    program = torch.export.export(model, args, kwargs)
    check_program(program, model)
    torch.testing.assert_close(program.module()(*args, **kwargs), eager(original, args, kwargs), rtol=RTOL, atol=ATOL)


@cases
def test_torch_export_with_a_dynamic_batch_matches_eager_at_other_batch_sizes(case):
    name, model, original = under_test(case)
    args, kwargs = inputs(name, EXPORT_BATCH, 10)
    program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_batch(name))
    check_program(program, model)
    (symbol,) = program.range_constraints  # the batch dimension stayed symbolic: one symbol, no guard on it
    assert program.range_constraints[symbol].upper > 1000
    module = program.module()
    for batch in (EXPORT_BATCH, *OTHER_BATCHES):
        args, kwargs = inputs(name, batch, 20 + batch)
        torch.testing.assert_close(module(*args, **kwargs), eager(original, args, kwargs), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------ ONNX


def onnx_session(model: nn.Module, name: str, path) -> onnxruntime.InferenceSession:
    args, kwargs = inputs(name, EXPORT_BATCH, 10)
    torch.onnx.export(
        model, args, str(path), kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_batch(name), verbose=False
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(session: onnxruntime.InferenceSession, args, kwargs) -> torch.Tensor:
    feeds = [*args, *kwargs.values()]
    declared = session.get_inputs()
    assert [i.name for i in declared][1:] == list(kwargs)  # the mask stays an input, though unused
    (output,) = session.run(None, {i.name: t.numpy() for i, t in zip(declared, feeds, strict=True)})
    return torch.from_numpy(output)


@cases
def test_onnx_export_runs_in_onnxruntime_like_eager(case, tmp_path):
    name, model, original = under_test(case)
    session = onnx_session(model, name, tmp_path / f"{case}.onnx")
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch dimension
    for batch in (EXPORT_BATCH, *OTHER_BATCHES):
        args, kwargs = inputs(name, batch, 30 + batch)
        torch.testing.assert_close(run(session, args, kwargs), eager(original, args, kwargs), rtol=RTOL, atol=ATOL)
