"""The statistics of each batch normalization's inputs over a dataset, and recalibration (SPEC section 13).

Moving averages only estimate the statistics that inference needs: they lag behind the weights
while training, and they are stale after fine-tuning, pruning or weight averaging. Recalibration
replaces them by the exact statistics of each layer's inputs over given batches, as fvcore's
"precise BN" and ``torch.optim.swa_utils.update_bn`` estimate them. With ``n_b``, ``m_b`` and
``v_b`` the count, mean and biased variance of a layer's inputs in batch ``b`` (per channel,
masked-out positions excluded), Chan's combination gives the population's, whatever the sizes::

    n = sum_b n_b        mean = sum_b n_b m_b / n        var = sum_b n_b (v_b + (m_b - mean)**2) / n

**The pass.** One forward pass over the batches, without gradients, with the model in ``eval()``
(dropout and the like off). Each layer being measured normalizes with its own batch's statistics
(the plain formula, over the whole batch: no ghost batches, no renorm correction, no per-call
synchronization), so that the layers after it see inputs distributed as inference will give them
once it holds the population statistics. Frozen layers (:func:`frozen_layers`: ours with
``trainable=False``, torch's in ``eval()`` inside a model in ``train()``) keep inference mode and
their moving statistics, as Keras's fine-tuning rule says; torch's layers that track no running
statistics keep their own behaviour. Synchronized layers (ours with ``synchronized=True``,
torch's ``SyncBatchNorm``) combine their populations across their process group once, after the
pass: the ranks may hold different numbers of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed, functional
from .functional import Statistics
from .layer import BatchNormalization

__all__ = [
    "recalibrate",
    "population_statistics",
    "is_batch_normalization",
    "inference_parameters",
    "batch_normalizations",
    "frozen_layers",
    "is_measured",
]


def is_batch_normalization(module: nn.Module) -> bool:
    """Ours, or torch's (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and their lazy forms)."""
    return isinstance(module, (BatchNormalization, _BatchNorm))


def batch_normalizations(model: nn.Module) -> dict[str, nn.Module]:
    """Every batch normalization of ``model`` by module path (``""``: the model itself)."""
    return {path: m for path, m in model.named_modules() if is_batch_normalization(m)}


class InferenceParameters(NamedTuple):
    """A batch normalization's inference parameters by Keras's names (torch's: ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``eps``)."""

    gamma: Tensor | None
    beta: Tensor | None
    moving_mean: Tensor
    moving_variance: Tensor
    epsilon: float


def inference_parameters(layer: nn.Module) -> InferenceParameters:
    """``layer``'s (ours or torch's) scale, offset, moving statistics and epsilon, the tensors themselves."""
    if isinstance(layer, BatchNormalization):
        return InferenceParameters(layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance, layer.epsilon)
    return InferenceParameters(layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.eps)


def frozen_layers(model: nn.Module) -> set[nn.Module]:
    """The batch normalizations of ``model`` that are frozen: ours with ``trainable=False`` (Keras's
    rule), and torch's in ``eval()`` inside a model in ``train()`` (torch's idiom for freezing them)."""
    return {
        m
        for m in model.modules()
        if isinstance(m, BatchNormalization)
        and not m.trainable
        or isinstance(m, _BatchNorm)
        and model.training
        and not m.training
    }


def is_measured(module: nn.Module, frozen: set[nn.Module]) -> bool:
    """Whether recalibration sets ``module``'s moving statistics: a batch normalization that is not
    ``frozen`` (:func:`frozen_layers`) and, for torch's, tracks running statistics."""
    if module in frozen:
        return False
    return isinstance(module, BatchNormalization) or isinstance(module, _BatchNorm) and module.track_running_stats


class _Population:
    """The count-weighted statistics of one layer's inputs so far, in float64 (module docstring)."""

    def __init__(self) -> None:
        self.statistics: Statistics | None = None

    def add(self, batch: Statistics) -> None:
        count = torch.as_tensor(batch.count, dtype=torch.float64, device=batch.mean.device).reshape(())
        batch = Statistics(batch.mean.double(), batch.var.double(), count, True)
        if self.statistics is None:
            self.statistics = batch
            return
        so_far = self.statistics
        counts = torch.stack([so_far.count, count])
        mean, var = functional.combine_statistics(
            counts, torch.stack([so_far.mean, batch.mean]), torch.stack([so_far.var, batch.var])
        )
        self.statistics = Statistics(mean, var, counts.sum(), True)


def _input_statistics(x: Tensor, axes: tuple[int, ...], mask: Tensor | None) -> Statistics:
    """The batch statistics of ``x``'s channels on ``axes`` (sorted, non-negative), masked-out positions excluded."""
    order = functional.channel_order(functional.memory_order(x), axes, x.dim())
    inside = None if mask is None else functional.mask_view(mask, x.shape, axes, order)
    return functional.batch_statistics(functional.channel_view(x, axes, order), inside)


def _measuring_forward(module: nn.Module, population: _Population, measured: bool) -> Callable[..., Tensor]:
    """``module``'s forward for the pass: adds its input's statistics to ``population``, then normalizes
    with them (a ``measured`` layer) or runs as it is (module docstring)."""
    original = module.forward

    def forward(inputs: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if isinstance(module, BatchNormalization):
            training = kwargs.get("training", args[0] if args else None)
            axes, mask = module._check_call(inputs, training, kwargs.get("mask", args[1] if len(args) > 1 else None))
            if module._built_shape is None:  # built by load_state_dict: the call fixes the rank
                module.initialize_parameters(inputs, training, mask)
            x = inputs if inputs.is_floating_point() else inputs.to(module.weight_dtype)
        else:
            module._check_input_dim(inputs)
            x, axes, mask = inputs, (1,), None
        statistics = _input_statistics(x, axes, mask)
        population.add(statistics)
        if not measured:
            return original(inputs, *args, **kwargs)
        dtype = functional.compute_dtype(x.dtype)
        *weights, epsilon = inference_parameters(module)
        gamma, beta, moving_mean, moving_variance = (None if w is None else w.to(dtype).reshape(-1) for w in weights)
        if not isinstance(statistics.count, Tensor) and statistics.count == 0:  # no element: the moving ones
            mean, var = moving_mean, moving_variance
        else:
            count = torch.as_tensor(statistics.count, device=x.device)
            mean, var, _, _ = functional.fill_empty(statistics._replace(count=count), moving_mean, moving_variance)
        return functional.normalize_input(x, axes, mean, var, gamma, beta, epsilon)

    return forward


@torch.no_grad()
def population_statistics(
    model: nn.Module, batches: Iterable[Any], *, progress: bool = False, description: str = "batches"
) -> dict[str, tuple[nn.Module, Statistics]]:
    """The statistics of every batch normalization's inputs over ``batches`` (the pass of the module docstring).

    A batch is a tensor (``model(batch)``), a 1-tuple ``(inputs,)`` (``model(inputs)``: a
    ``DataLoader`` over ``TensorDataset(x)``), a pair ``(inputs, mask)`` (``model(inputs,
    mask=mask)``: the model passes the mask to its layers; the mask must hold booleans or 0 and 1,
    so that ``(inputs, labels)`` batches raise ``ValueError`` instead of masking by labels) or a
    dict (``model(**batch)``). Returns, by module
    path, each layer called during the pass with its population: float64 ``mean`` and biased
    ``var`` per channel, the 0-dim element ``count`` and ``valid`` (the channels with elements
    and finite statistics). Synchronized layers' populations are their process group's. The
    model's and its modules' modes are restored; nothing in the model is written.
    """
    layers = batch_normalizations(model)
    populations = {path: _Population() for path in layers}
    frozen = frozen_layers(model)
    modes = [(m, m.training) for m in model.modules()]
    own_forwards = {path: vars(layer)["forward"] for path, layer in layers.items() if "forward" in vars(layer)}
    try:
        model.eval()
        for path, layer in layers.items():
            layer.forward = _measuring_forward(layer, populations[path], is_measured(layer, frozen))
        for batch in _progress(batches, progress, description):
            _call(model, batch)
    finally:
        for path, layer in layers.items():
            if path in own_forwards:  # one set on the instance (a patch, a hook library): kept
                layer.forward = own_forwards[path]
            else:
                del layer.forward  # the class's forward again
        for module, training in modes:
            module.training = training
    result = {}
    for path, layer in layers.items():
        statistics = populations[path].statistics
        if _synchronizes(layer):
            statistics = distributed.combine_across(
                _empty(layer) if statistics is None else statistics, layer.process_group
            )
        if statistics is not None:
            valid = functional.valid_statistics(statistics.mean, statistics.var, statistics.count)
            result[path] = (layer, statistics._replace(valid=valid))
    return result


def _call(model: nn.Module, batch: Any) -> Any:
    """``model`` called on one batch: a tensor, ``(inputs,)``, ``(inputs, mask)`` or a dict of arguments."""
    if isinstance(batch, dict):
        return model(**batch)
    if not isinstance(batch, (tuple, list)):
        return model(batch)
    if len(batch) == 1:  # e.g. a DataLoader over TensorDataset(x)
        return model(batch[0])
    if len(batch) != 2:
        raise ValueError(
            f"a batch is a tensor, an (inputs, mask) pair or a dict of the model's arguments, received a "
            f"{type(batch).__name__} of {len(batch)} items"
        )
    inputs, mask = batch
    if isinstance(mask, Tensor) and mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):
        # (inputs, labels) from a DataLoader would otherwise pass the labels as the mask
        raise ValueError(
            "the second item of a batch pair is the mask, which holds only 0 and 1 (or booleans); received "
            f"values up to {mask.max().item()}: for (inputs, labels) batches, pass the inputs alone, "
            "e.g. (x for x, _ in loader)"
        )
    return model(inputs, mask=mask)


def _progress(batches: Iterable[Any], progress: bool, description: str) -> Iterable[Any]:
    if not progress:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError("progress=True needs tqdm: pip install tqdm") from error
    return tqdm(batches, desc=description, unit="batch")


def _synchronizes(layer: nn.Module) -> bool:
    synchronized = layer.synchronized if isinstance(layer, BatchNormalization) else isinstance(layer, nn.SyncBatchNorm)
    return synchronized and distributed.is_synchronizing(layer.process_group)


def _empty(layer: nn.Module) -> Statistics:
    """The statistics of no element, for a rank whose batches never reached ``layer``."""
    moving_variance = inference_parameters(layer).moving_variance
    zeros = torch.zeros(moving_variance.shape, dtype=torch.float64, device=moving_variance.device).reshape(-1)
    return Statistics(zeros, zeros, zeros.new_zeros(()), True)


def recalibrate(model: nn.Module, batches: Iterable[Any], *, progress: bool = False) -> nn.Module:
    """Set every batch normalization's moving statistics to the exact statistics of its inputs over ``batches``.

    One pass (module docstring) over ``batches``: tensors, ``(inputs, mask)`` pairs or dicts of
    the model's arguments (see :func:`population_statistics`); masks count where the model passes
    them to its layers. Then, per layer and channel: ours take ``moving_mean = mean`` and
    ``moving_variance = var`` (biased, as Keras), under renorm also ``moving_stddev =
    renorm_stddev = sqrt(var + epsilon)`` and ``renorm_mean = mean``; torch's take
    ``running_mean = mean`` and ``running_var = var * n / (n - 1)`` (unbiased, as torch keeps it;
    ``num_batches_tracked`` unchanged). A channel without elements (one for torch's) or with
    non-finite statistics keeps its values, as does every frozen layer (:func:`frozen_layers`).
    Nothing else in the model changes and its mode is restored.

    Collective for synchronized layers: every rank of their group calls it, with its own batches
    (any number, none included). ``progress=True`` shows a tqdm bar. Returns ``model``.
    """
    frozen = frozen_layers(model)
    measured = population_statistics(model, batches, progress=progress, description="recalibrate")
    for layer, statistics in measured.values():
        if not is_measured(layer, frozen):
            continue
        mean, var, count, valid = statistics
        if isinstance(layer, BatchNormalization):
            targets = {"moving_mean": mean, "moving_variance": var}
            if layer.renorm:
                stddev = torch.sqrt(var + layer.epsilon)
                targets.update(moving_stddev=stddev, renorm_mean=mean, renorm_stddev=stddev)
        else:
            targets = {"running_mean": mean, "running_var": var * count / (count - 1).clamp(min=1)}
            valid = valid & (count > 1)
        for name, value in targets.items():
            functional.assign(getattr(layer, name).view(-1), value, valid)
    return model
