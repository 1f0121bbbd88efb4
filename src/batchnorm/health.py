"""A per-layer health report of a model's batch normalizations: :func:`inspect`.

For the model that is worse in ``eval()`` than in ``train()``: inference normalizes with the
moving statistics, training with the batch's, and where the two disagree the layer's inference
outputs are off. For every batch normalization (ours or torch's) reached by the given batches,
in the pass of :mod:`batchnorm.population` (the layers normalizing as :func:`recalibrate` would
measure them), the report compares the moving statistics with the population of its inputs
(``mean``, ``var``, per channel)::

    mean shift      = |moving_mean - mean| / sqrt(var + epsilon)    (in standard deviations)
    variance ratio  = (moving_variance + epsilon) / (var + epsilon)  (1 when they agree)

(the ratio of the squared denominators of inference and training: finite for constant
channels too), and lists the channels whose statistics are not finite, the dead channels (constant input:
``var <= 1e-6 * epsilon``, or ``gamma == 0``) and, under batch renormalization, the unclipped
range of ``r`` and ``d`` against the renorm statistics. A layer is *stale* when a channel's
mean shift exceeds :data:`MAX_MEAN_SHIFT`, its variance ratio leaves
:data:`VARIANCE_RATIO_RANGE`, or a statistic is not finite; :func:`recalibrate` repairs such
a layer (unless it is frozen, which Keras leaves alone).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from . import functional
from .layer import BatchNormalization
from .population import batch_normalizations, frozen_layers, inference_parameters, population_statistics

__all__ = ["inspect", "inspect_files", "LayerHealth", "format_table", "MAX_MEAN_SHIFT", "VARIANCE_RATIO_RANGE"]

MAX_MEAN_SHIFT = 0.5  # standard deviations
VARIANCE_RATIO_RANGE = (0.5, 2.0)
_DEAD_VARIANCE = 1e-6  # times epsilon


@dataclass
class LayerHealth:
    """One layer's health (module docstring): per-channel tensors and their summary."""

    path: str
    kind: str
    frozen: bool
    count: int  # input elements per channel over the batches
    mean_shift: Tensor  # (C,) float64
    variance_ratio: Tensor  # (C,) float64
    non_finite: list[int]
    dead: list[int]
    renorm_r: tuple[float, float] | None  # (min, max) over the channels, unclipped
    renorm_d: tuple[float, float] | None

    @property
    def max_mean_shift(self) -> float:
        return float(self.mean_shift.nan_to_num(math.inf).max()) if self.mean_shift.numel() else 0.0

    @property
    def variance_ratio_range(self) -> tuple[float, float]:
        ratio = self.variance_ratio.nan_to_num(math.inf)
        return (float(ratio.min()), float(ratio.max())) if ratio.numel() else (1.0, 1.0)

    @property
    def stale(self) -> bool:
        low, high = self.variance_ratio_range
        lowest, highest = VARIANCE_RATIO_RANGE
        return bool(self.non_finite) or self.max_mean_shift > MAX_MEAN_SHIFT or not lowest <= low <= high <= highest


def inspect(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    plot: str | Path | None = None,
    progress: bool = False,
    quiet: bool = False,
    file: TextIO | None = None,
) -> list[LayerHealth]:
    """Each batch normalization's health over ``batches`` (module docstring), printed and returned.

    ``batches`` as for :func:`batchnorm.recalibrate` (tensors, ``(inputs, mask)`` pairs, dicts).
    The table is printed to ``file`` (default: ``sys.stdout``) unless ``quiet``; ``plot=PATH``
    also writes a PNG of each layer's mean shifts and variance ratios (needs matplotlib). Nothing in the model
    changes. Collective where the model has synchronized layers, as :func:`recalibrate`.
    """
    frozen = frozen_layers(model)
    measured = population_statistics(model, batches, progress=progress, description="inspect")
    report = [_health(path, layer, statistics, layer in frozen) for path, (layer, statistics) in measured.items()]
    if not quiet:
        layers = [path or "<root>" for path in batch_normalizations(model)]
        unreached = [path for path in layers if path not in {h.path for h in report}]
        print(format_table(report, unreached), file=sys.stdout if file is None else file)
    if plot is not None:
        _plot(report, Path(plot))
    return report


@torch.no_grad()
def _health(path: str, layer: nn.Module, population: functional.Statistics, frozen: bool) -> LayerHealth:
    mean, var, count, _ = population
    gamma, _, moving_mean, moving_variance, epsilon = inference_parameters(layer)
    if not isinstance(layer, BatchNormalization):  # torch keeps the unbiased variance: compare like with like
        var = var * count / (count - 1).clamp(min=1)
    moving_mean, moving_variance = moving_mean.double().reshape(-1), moving_variance.double().reshape(-1)
    not_finite = ~(mean.isfinite() & var.isfinite() & moving_mean.isfinite() & moving_variance.isfinite())
    dead = var <= _DEAD_VARIANCE * epsilon
    if gamma is not None:
        dead |= gamma.detach().reshape(-1) == 0
    renorm_r = renorm_d = None
    if isinstance(layer, BatchNormalization) and layer.renorm:
        r, d = functional.renorm_correction(
            population, layer.renorm_mean.reshape(-1), layer.renorm_stddev.reshape(-1), epsilon, {}
        )
        renorm_r, renorm_d = _range(r), _range(d)
    return LayerHealth(
        path=path or "<root>",
        kind=type(layer).__name__,
        frozen=frozen,
        count=int(count),
        mean_shift=(moving_mean - mean).abs() / torch.sqrt(var + epsilon),
        variance_ratio=(moving_variance + epsilon) / (var + epsilon),
        non_finite=not_finite.nonzero().flatten().tolist(),
        dead=dead.nonzero().flatten().tolist(),
        renorm_r=renorm_r,
        renorm_d=renorm_d,
    )


def _range(t: Tensor) -> tuple[float, float]:
    return (float(t.min()), float(t.max())) if t.numel() else (math.nan, math.nan)


def _channels(indices: list[int]) -> str:
    if not indices:
        return "-"
    shown = ",".join(map(str, indices[:4]))
    return f"{len(indices)} ({shown}{',...' if len(indices) > 4 else ''})"


def format_table(report: list[LayerHealth], unreached: list[str] = ()) -> str:
    """The report as a text table, one row per layer, the stale ones marked; then the ``unreached``
    layers (paths of those no batch reached), if any."""
    header = (
        "layer",
        "kind",
        "ch",
        "frozen",
        "mean shift",
        "var ratio",
        "non-finite",
        "dead",
        "renorm r",
        "renorm d",
        "status",
    )
    rows = [header]
    for h in report:
        low, high = h.variance_ratio_range
        rows.append(
            (
                h.path,
                h.kind,
                str(h.mean_shift.numel()),
                "yes" if h.frozen else "no",
                f"{h.max_mean_shift:.3g}",
                f"{low:.3g}-{high:.3g}",
                _channels(h.non_finite),
                _channels(h.dead),
                "-" if h.renorm_r is None else "{:.3g}-{:.3g}".format(*h.renorm_r),
                "-" if h.renorm_d is None else "{:.3g}-{:.3g}".format(*h.renorm_d),
                "STALE" if h.stale else "ok",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths).rstrip())
    if not report:
        lines.append("(no batch normalization reached: no layer, or no batch)")
    if unreached:
        lines.append(f"not reached by the batches, not inspected: {', '.join(unreached)}")
    lowest, highest = VARIANCE_RATIO_RANGE
    lines.append(
        f"mean shift: max |moving mean - mean| / std over channels (stale above {MAX_MEAN_SHIFT}); "
        f"var ratio: (moving + eps) / (input variance + eps), min-max (stale outside {lowest}-{highest})"
    )
    return "\n".join(lines)


def _plot(report: list[LayerHealth], path: Path) -> None:
    """Per layer, the channels' mean shifts and variance ratios (log scale), thresholds dashed, stale layers red."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot= needs matplotlib: pip install matplotlib") from error
    figure, (shift_axes, ratio_axes) = plt.subplots(2, 1, figsize=(max(6.0, 0.6 * len(report) + 2), 6), sharex=True)
    for index, health in enumerate(report):
        color = "tab:red" if health.stale else "tab:blue"
        shifts = health.mean_shift.nan_to_num(math.inf).clamp(max=1e6).cpu().numpy()
        ratios = health.variance_ratio.nan_to_num(math.inf).clamp(1e-6, 1e6).cpu().numpy()
        shift_axes.scatter([index] * len(shifts), shifts, s=8, color=color, alpha=0.6)
        ratio_axes.scatter([index] * len(ratios), ratios, s=8, color=color, alpha=0.6)
    shift_axes.axhline(MAX_MEAN_SHIFT, linestyle="--", color="gray")
    shift_axes.set_ylabel("mean shift (std)")
    shift_axes.set_title("moving vs. batches' statistics (red: stale)", fontsize=10)
    for bound in VARIANCE_RATIO_RANGE:
        ratio_axes.axhline(bound, linestyle="--", color="gray")
    ratio_axes.set_yscale("log")
    ratio_axes.set_ylabel("variance ratio (moving / input)")
    ratio_axes.set_xticks(range(len(report)), [h.path for h in report], rotation=45, ha="right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def inspect_files(
    model_path: str | Path, data_path: str | Path, *, batch_size: int, plot: str | Path | None = None
) -> list[LayerHealth]:
    """:func:`inspect` of a model saved whole with ``torch.save(model)`` over the data of another
    ``torch.save`` file: a tensor, an ``(inputs, mask)`` pair or a dict of the model's arguments,
    cut into batches of ``batch_size`` along dimension 0 (``python -m batchnorm inspect``).

    The model file is a pickle, loaded with ``weights_only=False``: it can run code, so load only
    files you trust (as ``torch.load`` warns). The data loads with ``weights_only=True``.
    """
    model = torch.load(model_path, map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{model_path} holds a {type(model).__name__}, not a model: save the model itself with "
            "torch.save(model) (a state_dict holds no architecture to run)"
        )
    data = torch.load(data_path, map_location="cpu", weights_only=True)
    return inspect(model, _batches(data, batch_size), plot=plot)


def _batches(data: Any, batch_size: int) -> list[Any]:
    """``data`` (a tensor, a pair of tensors or a dict of arguments) cut along dimension 0; a dict's
    values that are not tensors (``scale=2.0``) go to every batch as they are."""
    if isinstance(data, Tensor):
        return list(data.split(batch_size))
    if isinstance(data, (tuple, list)):
        return list(zip(*(part.split(batch_size) for part in data)))
    if isinstance(data, dict):
        tensors = {key: value.split(batch_size) for key, value in data.items() if isinstance(value, Tensor)}
        count = min(map(len, tensors.values()), default=1)
        return [{**data, **{key: parts[i] for key, parts in tensors.items()}} for i in range(count)]
    raise ValueError(
        f"the data must be a tensor, an (inputs, mask) pair or a dict of tensors, received a {type(data).__name__}"
    )
