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

import datetime
import gc
import os
import socket
import time
import weakref
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import functional

__all__ = ["is_synchronizing", "synchronized_batch_norm_training", "run_local_group"]

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


def synchronized_batch_norm_training(
    view: Tensor,
    inside: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    fallback_mean: Tensor,
    fallback_var: Tensor,
    epsilon: float,
    process_group: Any = None,
    key: Any = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize this rank's shard with the global batch's statistics; return ``(y, mean, var, valid)``.

    ``view`` is the channel view of this rank's input (``(M, C)`` or ``(A, C, B)``, possibly
    empty) and ``inside`` ``None`` or its boolean mask view (``C`` replaced by 1). The statistics
    are those of the masked-in elements of every rank's shard (module docstring). ``valid`` (a
    bool tensor) tells the channels whose statistics may update the moving ones: finite ones of a
    global batch with at least one element. With no element at all nothing has statistics: ``y``
    is normalized with ``fallback_mean``/``fallback_var`` and ``mean``/``var`` are unusable zeros. ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` has ``view``'s
    shape and dtype; input gradients are those of the global batch, ``gamma``/``beta`` gradients
    this rank's share of them (their sum over ranks, as DDP forms it, is the global batch's).
    Collective: must be called by every rank of the group.

    ``key`` (weakly referenced; the layer) scopes the layout check: it runs on the first call of
    each key on a group. Without a key it runs once per layout and group, which misses a layer
    that differs across ranks when both of its channel counts were agreed on by other layers.
    """
    group = dist.group.WORLD if process_group is None else process_group
    layout = (view.shape[1], functional.compute_dtype(view.dtype), view.device)
    _check_layout(group, _ANY_CALLER if key is None else key, *layout)
    return _SynchronizedBatchNormTraining.apply(
        view, inside, gamma, beta, fallback_mean, fallback_var, epsilon, group
    )


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


def _local_statistics(view: Tensor, inside: Tensor | None) -> Tensor:
    """This shard's packed ``[n_r, m_r (C), e_r (C), v_r (C)]`` in the compute dtype.

    ``m_r`` and ``v_r`` are the local paths' own statistics (stable; masked-out values never
    enter them): :func:`functional.batch_statistics`, which normalizes nothing, or the masked
    training path, whose normalized output is dropped. ``e_r`` is the rounding
    error of ``m_r`` (``m_r + e_r`` is the mean to about twice the precision), measured where the
    mean is large against the spread, and on devices where deciding would cost a host
    synchronization; else 0. An empty shard sends zeros, which weigh nothing (not ``0 * NaN``).
    """
    channels = view.shape[1]
    dtype = functional.compute_dtype(view.dtype)
    if view.numel() == 0:  # the native kernels do not accept an empty input
        return torch.zeros(1 + 3 * channels, dtype=dtype, device=view.device)
    with torch.no_grad():
        if inside is None:
            mean, var, _ = functional.batch_statistics(view)
            count = torch.full((1,), view.numel() // channels, dtype=dtype, device=view.device)
        else:
            zeros = torch.zeros(channels, dtype=dtype, device=view.device)
            _, mean, var, _ = functional.masked_batch_norm_training(view, inside, None, None, zeros, zeros, 1.0)
            count = inside.sum(dtype=dtype)
        rounding = torch.zeros_like(mean)
        if view.device.type != "cpu" or bool((mean.square() > _ROUNDING_RATIO * var).any()):
            rounding = _rounding_of_mean(view, inside, mean, count)
    return torch.cat([count.reshape(1), mean, rounding, var])


def _rounding_of_mean(view: Tensor, inside: Tensor | None, mean: Tensor, count: Tensor) -> Tensor:
    """``sum_I(x - mean) / count``: what rounding ``mean`` lost.

    Near a large mean ``x - mean`` is exact (Sterbenz), and the deviations sum to a small number
    whose own rounding is relative to the spread, not to the mean.
    """
    deviation = view - functional._per_channel(mean, view)
    if inside is not None:
        deviation = torch.where(inside, deviation, 0)
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
    shares = counts[:, 0] / counts.sum().clamp(min=1)
    mean, var = functional.combine_statistics(shares, means + roundings, variances)
    return counts.sum().to(gathered.dtype), mean.to(gathered.dtype), var.to(gathered.dtype)


def _all_gather(local: Tensor, group: Any) -> Tensor:
    """``(world, len(local))``: row ``r`` is rank ``r``'s ``local``."""
    world = dist.get_world_size(group)
    gathered = local.new_empty(world * local.numel())  # flat: gloo wants the concatenation
    # torch >= 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, local, group=group)
    return gathered.view(world, local.numel())


class _SynchronizedBatchNormTraining(torch.autograd.Function):
    r"""Batch normalization with the global batch's statistics; explicit backward.

    Backward: :func:`functional.statistics_backward` with its two per-channel sums all-reduced
    over the group, so that the input gradient is the global batch's (as PyTorch's
    ``SyncBatchNorm``), while ``dgamma``/``dbeta`` stay this rank's share (DDP sums them).
    """

    @staticmethod
    def forward(ctx, view, inside, gamma, beta, fallback_mean, fallback_var, epsilon: float, group):
        count, mean, var = _combine(_all_gather(_local_statistics(view, inside), group))
        has_elements = count > 0
        used_mean = torch.where(has_elements, mean, fallback_mean)
        used_var = torch.where(has_elements, var, fallback_var)
        y = functional.normalize(view, used_mean, used_var, gamma, beta, epsilon)
        ctx.save_for_backward(view, inside, gamma, used_mean, used_var, count)
        ctx.epsilon, ctx.group = epsilon, group
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var, functional.valid_statistics(mean, var, count)

    @staticmethod
    @once_differentiable  # its formulas take the statistics as constants: no second derivative
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_valid):
        view, inside, gamma, mean, var, count = ctx.saved_tensors
        # Every rank whose input needs a gradient joins the all-reduce, an empty one too.
        grads = functional.statistics_backward(
            grad_y, view, inside, gamma, mean, var, count, ctx.epsilon, ctx.needs_input_grad,
            all_reduce=lambda sums: dist.all_reduce(sums, group=ctx.group),
        )
        return grads[0], None, grads[1], grads[2], None, None, None, None


# ------------------------------------------------------------------------- local process groups


def run_local_group(
    worker: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 60.0,
    deadline_s: float | None = None,
    threads: int | None = None,
) -> list[Any]:
    """Run ``worker(*args)`` in ``world_size`` new processes joined by a gloo group; return the results.

    Each process joins ``torch.distributed`` (gloo, rendezvous on 127.0.0.1 at a free port, the
    group's collective timeout ``timeout_s``), uses ``threads`` CPU threads (default: the CPUs
    shared out), calls ``worker(*args)`` (``dist.get_rank()`` tells it which it is) and leaves the
    group. For trying synchronized layers on one machine, for tests and for benchmarks; real jobs
    start with ``torchrun``. ``worker`` must be a module-level function and its result small and
    picklable. Returns the results in rank order (``None`` for a process that exited without
    returning); raises the first failure, with the worker's traceback, or ``TimeoutError`` when the
    processes are not done after ``deadline_s`` seconds (they are killed).
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    context = torch.multiprocessing.start_processes(
        _run_rank, args=(world_size, _free_port(), timeout_s, threads, worker, args, results),
        nprocs=world_size, join=False, start_method="spawn",
    )
    stop = None if deadline_s is None else time.monotonic() + deadline_s
    while not context.join(timeout=0.1):
        if stop is not None and time.monotonic() > stop:
            for process in context.processes:
                process.kill()
                process.join()
            raise TimeoutError(f"the {world_size} processes of the local group were not done after {deadline_s} s")
    by_rank = {}
    while not results.empty():  # every process has exited: whatever they sent is here
        rank, result = results.get()
        by_rank[rank] = result
    return [by_rank.get(rank) for rank in range(world_size)]


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the system's choice; another process may take it later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(
    rank: int, world_size: int, port: int, timeout_s: float, threads: int, worker: Callable, args: tuple, results
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        results.put((rank, worker(*args)))
    finally:
        # Whatever the worker left in reference cycles (a DistributedDataParallel wrapper) goes
        # while its group exists: torn down after it, gloo can abort the process.
        gc.collect()
        dist.destroy_process_group()
