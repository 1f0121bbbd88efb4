"""Cross-process batch statistics over ``torch.distributed`` (SPEC section 8).

A synchronized layer in training normalizes with the statistics of the *global* batch, the union
of the shards that the ranks of its process group hold, so that ``N`` processes give the outputs,
input gradients and moving statistics of one process holding the whole batch. With ``n_r``,
``m_r`` and ``v_r`` the element count, mean and biased variance of rank ``r``'s shard (per
channel, masked-out positions excluded), Chan et al.'s parallel combination gives::

    n = sum_r n_r        mean = sum_r n_r m_r / n        var = sum_r n_r (v_r + (m_r - mean)**2) / n

Protocol, per layer call, on every rank of the group (an empty shard too):

* **forward**: one ``all_gather`` of the packed ``[n_r, m_r (C), e_r (C), v_r (C)]`` (``e_r``: the
  rounding error of ``m_r``, see ``_local_statistics``); every rank combines the same gathered
  numbers in the same order, so all take bit-for-bit the same statistics and the same decisions
  ("no element", "not finite", SPEC section 5).
* **backward** (only when the input needs a gradient): one ``all_reduce(SUM)`` of the packed
  ``[sum(dy) (C), sum(dy * xhat) (C)]``, which turns the local input gradient into the global one.
* **inference**: no collective.
* **layout check**, once per process group, (channel count, statistics dtype) and caller key
  (the layer, when it passes itself): one small ``all_reduce(MAX)`` of a fixed-size header, read
  on the host. Ranks that disagree on the channel count get a ``ValueError`` naming both counts
  instead of a collective whose buffers differ in size (gloo aborts the process on that, NCCL
  hangs or mixes data).

Every rank must run the same synchronized layers in the same order, as with ``SyncBatchNorm`` and
DDP. A rank that does not join (it died, or does not synchronize that call) makes the others fail
with the process group's own error: a closed connection, or its timeout.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional

__all__ = ["is_synchronizing", "batch_statistics", "summing", "combine_across"]

# First value of the layout header: tells this module's check from another collective of its size.
_HEADER_TAG = 0x42_4E_53_59_4E_43  # "BNSYNC"

# Per process group and caller key, the (channel count, statistics dtype, device type) layouts
# that all ranks agreed on. Weak keys: a destroyed group or layer takes its entries with it.
_agreed_layouts: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, set[tuple]]]
_agreed_layouts = weakref.WeakKeyDictionary()


class _AnyCaller:
    """The key of the layouts agreed for callers that give none."""


_ANY_CALLER = _AnyCaller()


def is_synchronizing(process_group: Any = None) -> bool:
    """Whether a synchronized layer must combine statistics across processes.

    True when ``torch.distributed`` is initialized and ``process_group`` (default: every rank)
    has more than one process. Otherwise statistics stay local: no error, no collective.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def batch_statistics(
    view: Tensor, mask: Tensor | None = None, process_group: Any = None, key: Any = None
) -> functional.Statistics:
    """The statistics of the global batch: every rank's shard of it, combined (module docstring).

    ``view`` is the channel view of this rank's input (``(M, C)`` or ``(A, C, B)``, possibly
    empty) and ``mask`` ``None`` or its boolean mask view, as for
    :func:`functional.batch_statistics`, whose result this is for the union of the shards. The
    count is a 0-dim tensor (the same on every rank), ``valid`` a bool tensor. Collective: every
    rank of the group calls it, one with an empty shard too. Normalize with
    :func:`functional.normalize_by_batch` and ``all_reduce=summing(process_group)``, so that the
    input gradient is the global batch's.

    ``key`` (weakly referenced; the layer) scopes the layout check: it runs on the first call of
    each key on a group. Without a key it runs once per layout and group, which misses a layer
    that differs across ranks when both of its channel counts were agreed on by other layers.
    """
    group = dist.group.WORLD if process_group is None else process_group
    layout = (view.shape[1], functional.compute_dtype(view.dtype), view.device)
    _check_layout(group, _ANY_CALLER if key is None else key, *layout)
    count, mean, var = _combine(_all_gather(_local_statistics(view, mask), group))
    return functional.Statistics(mean, var, count, functional.valid_statistics(mean, var, count))


def combine_across(statistics: functional.Statistics, process_group: Any = None) -> functional.Statistics:
    """The union over the ranks of ``process_group`` (default: every rank) of each rank's statistics.

    ``statistics`` holds this rank's 0-dim ``count`` and per-channel ``mean`` and biased ``var``
    (e.g. a dataset's, :mod:`batchnorm.population`), zeros for no element. Returns the union's,
    in float64, by the combination of the module docstring; ``valid`` as given. Collective: every
    rank calls it with the same channel count.
    """
    group = dist.group.WORLD if process_group is None else process_group
    mean = statistics.mean.double()
    local = torch.cat([statistics.count.double().reshape(1), mean, torch.zeros_like(mean), statistics.var.double()])
    count, mean, var = _combine(_all_gather(local, group))
    return functional.Statistics(mean, var, count, statistics.valid)


def summing(process_group: Any = None) -> Callable[[Tensor], None]:
    """An in-place sum over ``process_group`` (default: every rank), for ``normalize_by_batch``'s backward.

    Every rank whose input needs a gradient joins it, one with an empty shard too.
    """
    group = dist.group.WORLD if process_group is None else process_group
    return lambda sums: dist.all_reduce(sums, group=group)


def _check_layout(group: Any, key: Any, channels: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``ValueError`` on every rank unless all ranks exchange buffers of the same layout.

    Runs once per group, key and layout, not per call: the buffers' sizes depend on nothing
    else, and a host read per call would stall a GPU's queue. Every field ``f`` is sent as
    ``(f, -f)`` under ``MAX``: each field's maximum and minimum over the ranks in one fixed-size
    all-reduce.
    """
    agreed = _agreed_layouts.setdefault(group, weakref.WeakKeyDictionary()).setdefault(key, set())
    layout = (channels, dtype, device.type)
    if layout in agreed:
        return
    fields = {"tag": _HEADER_TAG, "channel count": channels, "statistics bits": dtype.itemsize * 8}
    header = torch.tensor([*fields.values(), *(-v for v in fields.values())], dtype=torch.int64, device=device)
    dist.all_reduce(header, op=dist.ReduceOp.MAX, group=group)
    reduced = header.tolist()
    highest, lowest = reduced[: len(fields)], [-v for v in reduced[len(fields) :]]
    if highest[0] != _HEADER_TAG or lowest[0] != _HEADER_TAG:
        raise RuntimeError(
            "synchronized BatchNormalization: another rank ran a different collective in place of "
            "the layout check; every rank must run the same synchronized layers in the same order"
        )
    differences = [
        f"{name} from {low} to {high} (this rank: {mine})"
        for name, mine, low, high in zip(fields, fields.values(), lowest, highest)
        if low != high
    ]
    if differences:
        raise ValueError(
            "synchronized BatchNormalization: the ranks of the process group disagree on the "
            f"{'; '.join(differences)}. Every rank must run the same synchronized layers, built "
            "for the same channel count, in the same order, on inputs of the same precision class."
        )
    agreed.add(layout)


# A shard's mean comes rounded to the statistics dtype, an error of up to |mean| * 2**-24 that the
# combination's (m_r - mean)**2 turns into a relative variance error of about
# 2**-23 * |mean| / (std * sqrt(n_r)): 2e-4 for a 3-element shard whose mean is 5000 std, where one
# process is exact to 1e-7. Beyond this ratio mean**2 / var the rounding is measured and sent too.
_ROUNDING_RATIO = 2.0**10


@torch.no_grad()
def _local_statistics(view: Tensor, mask: Tensor | None) -> Tensor:
    """This shard's packed ``[n_r, m_r (C), e_r (C), v_r (C)]`` in the compute dtype.

    ``n_r``, ``m_r`` and ``v_r`` are :func:`functional.batch_statistics` (stable; masked-out
    values never enter them; zeros for an empty shard, which weigh nothing). ``e_r`` is the
    rounding error of ``m_r`` (``m_r + e_r`` is the mean to about twice the precision), measured
    where the mean is large against the spread, and on devices where deciding would cost a host
    synchronization; else 0.
    """
    count, mean, var = _count_mean_var(view, mask)
    rounding = torch.zeros_like(mean)
    if view.device.type != "cpu" or bool((mean.square() > _ROUNDING_RATIO * var).any()):
        rounding = _rounding_of_mean(view, mask, mean, count)
    return torch.cat([count.reshape(1), mean, rounding, var])


def _count_mean_var(view: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    statistics = functional.batch_statistics(view, mask)
    count = statistics.count
    if not isinstance(count, Tensor):
        count = torch.tensor(count, dtype=statistics.mean.dtype, device=view.device)
    return count, statistics.mean, statistics.var


def _rounding_of_mean(view: Tensor, mask: Tensor | None, mean: Tensor, count: Tensor) -> Tensor:
    """``sum_I(x - mean) / count``: what rounding ``mean`` lost.

    Near a large mean ``x - mean`` is exact (Sterbenz), and the deviations sum to a small number
    whose own rounding is relative to the spread, not to the mean.
    """
    deviation = view - functional.per_channel(mean, view)
    if mask is not None:
        deviation = torch.where(mask, deviation, 0)
    return deviation.sum([d for d in range(view.dim()) if d != 1]) / count.clamp(min=1)


def _combine(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(count, mean, var)`` from the gathered ``(world, 1 + 3C)`` local statistics.

    Chan's combination (module docstring), in float64 with the shard means ``m_r + e_r``: each
    term is non-negative, so nothing cancels, unlike ``sum(x**2) - n * mean**2`` from summed
    moments. That is why the ranks gather their statistics rather than all-reduce sums:
    ``torch.distributed`` reduces only by sum, product, min or max, and a sum over ranks of
    centred moments would need a centre known beforehand. Where ``count == 0`` the mean and
    variance are zeros. Every rank computes the same numbers from the same gathered buffer.
    """
    channels = (gathered.shape[1] - 1) // 3
    counts, means, roundings, variances = gathered.double().split([1, channels, channels, channels], dim=1)
    mean, var = functional.combine_statistics(counts[:, 0], means + roundings, variances)
    return counts.sum().to(gathered.dtype), mean.to(gathered.dtype), var.to(gathered.dtype)


def _all_gather(local: Tensor, group: Any) -> Tensor:
    """``(world, len(local))``: row ``r`` is rank ``r``'s ``local``."""
    world = dist.get_world_size(group)
    gathered = local.new_empty(world * local.numel())  # flat: gloo wants the concatenation
    # torch >= 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    return gathered.view(world, local.numel())
