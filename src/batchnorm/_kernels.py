"""The kernel choices behind :func:`batchnorm.functional.batch_statistics`, and their tuned constants.

PyTorch's native batch-norm kernels are the fastest way to the statistics, but on CPU their
accuracy depends on the data: they add each channel up in float32, so the error grows with the
elements per channel and with ``mean**2 / var``. This module picks, per call, the kernel call
that is accurate for the view at hand, checks the result where reading it costs nothing (on the
CPU) and falls back to a stable algorithm where the check fails. Every threshold is in the one
table below, with the measurement behind it; ``docs/performance.md`` gives the details.

Views are channel views (``(M, C)`` or ``(A, C, B)``, channels on dimension 1); the statistics
are biased, in ``compute_dtype(view.dtype)``, and carry no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------- tuned constants
# Measured on CPU, torch 2.13, 2 threads (2026-12-03). "ratio" is mean**2 / var of a channel.
#
# (M, C) views of at least this many elements: statistics kernel, then addcmul (no autograd) or
# normalize + native backward, beat the fused training kernel (crossover 5e4 to 6.5e4 elements).
LARGE_ROWS_MIN_ELEMENTS = 2**16
# (M, C) views: the kernels' float32 row sums err by 1e-6 sd at 4096 rows, 2.5e-3 sd at 2**20
# rows (ratio 2**16); more rows are taken in groups of at most this many, combined in float64.
ROW_GROUP_ROWS = 4096
# 16-bit (A, C, B) views: the variance errs by 1.1e-5 at 2**18 elements per channel, 7e-5 at
# 2**20, 4e-4 at 2**22 (bfloat16); larger ones are taken in blocks of at most this many.
BLOCK_ELEMENTS_16_BIT = 2**18
# The statistics kernel's variance stays within about 1e-5 up to this ratio (sizes 2 to 1e5).
TRUSTED_RATIO_KERNEL = 2.0**16
# The same on float32 (M, C) row groups: at ratio 16 the mean is within 6e-6 sd.
TRUSTED_RATIO_ROW_GROUPS = 2.0**4
# The one-pass masked sums E[x**2] - E[x]**2: 5e-5 at ratio 4, 3e-3 at ratio 256 (rows of 2**16).
TRUSTED_RATIO_CHANNEL_SUMS = 4.0
# ... and they add each row of an (A, C, B) view up in float32: at ratio 0.56 the variance errs by
# 5e-7 with rows of 2**16, 3.3e-5 with 2**20, 2.6e-4 with 2**22; longer rows take the two-pass sums.
CHANNEL_SUMS_MAX_ROW = 2**16
# The masked backward's one-pass term x * slope + offset loses a few ulps at most up to this ratio.
TRUSTED_RATIO_FOLDED_TERM = 4.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: at least float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def eager_cpu(t: Tensor) -> bool:
    """Whether ``t`` meets PyTorch's eager CPU kernels, where reading a result on the host is free."""
    return t.is_cpu and not torch.compiler.is_compiling()


def large_rows(view: Tensor) -> bool:
    """Whether ``view`` is a float32/float64 ``(M, C)`` view of ``LARGE_ROWS_MIN_ELEMENTS`` or more, on eager CPU."""
    return (
        view.dim() == 2
        and view.numel() >= LARGE_ROWS_MIN_ELEMENTS
        and eager_cpu(view)
        and view.dtype in (torch.float32, torch.float64)
    )


def kernel_layout(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` as PyTorch's batch-norm kernels read them fastest: contiguous ``(M, C)`` CPU
    tensors as the ``(1, C, 1, M)`` ``torch.channels_last`` tensors that they are in memory
    (views), others as they are; all or none, as the kernels want one layout for all.

    The eager CPU kernels run their channels-last loops, vectorized over ``C``, on such tensors,
    and slower 2-D loops on ``(M, C)``; the sums are the same. (Given an output gradient in
    another layout than the input, their backward on this shape returns wrong values: never mix.)
    :func:`from_kernel_layout` turns a kernel's output back.
    """
    first = tensors[0]
    if first.dim() == 2 and eager_cpu(first) and all(map(Tensor.is_contiguous, tensors)):
        rows, channels = first.shape  # every tensor of one call has the view's shape
        return tuple(t.T.view(1, channels, 1, rows) for t in tensors)
    return tensors


def from_kernel_layout(t: Tensor, view: Tensor) -> Tensor:
    """A kernel's output for :func:`kernel_layout` ``(view, ...)``, shaped like ``view`` again."""
    return t.view(view.shape[1], view.shape[0]).T if t.dim() != view.dim() else t


def finite_and_accurate(mean: Tensor, var: Tensor, ratio: float) -> bool:
    """Whether every channel has ``mean**2 <= ratio * var < inf`` (CPU tensors only: one host read).

    ``var - mean**2 / ratio`` is at least 0 and finite in every channel exactly then (a NaN fails
    both tests). ``ratio = inf`` asks for finiteness only.
    """
    lowest, highest = torch.addcmul(var, mean, mean, value=-1.0 / ratio).aminmax()
    return lowest.item() >= 0 and highest.item() < math.inf


def reduced_dims(view: Tensor) -> tuple[int, ...]:
    """The dimensions of a channel view that the statistics reduce: all but dimension 1."""
    return (0,) if view.dim() == 2 else (0, 2)


def per_channel(v: Tensor, view: Tensor) -> Tensor:
    """Shape a ``(C,)`` vector to broadcast against a channel view."""
    return v if view.dim() == 2 else v[:, None]


def combine_statistics(counts: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of a union of groups from each group's, in float64 (Chan et al.).

    With ``n_k`` elements, mean ``m_k`` and biased variance ``v_k`` in group ``k`` (``counts``
    ``(K,)``, ``means``/``variances`` ``(K, C)``) and ``n = sum(n_k)``::

        mean = sum_k n_k m_k / n        var = sum_k n_k (v_k + (m_k - mean)**2) / n

    Every term is non-negative, so nothing cancels. Groups without elements weigh nothing (their
    statistics must be finite); with no element at all both are zeros.
    """
    shares = counts.double() / counts.sum().double().clamp(min=1)
    means, variances = means.double(), variances.double()
    mean = shares @ means
    deviations = means - mean
    return mean, shares @ torch.addcmul(variances, deviations, deviations)


# ------------------------------------------------------------------------- unmasked statistics


def moments(view: Tensor, accumulate: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean and biased variance by Welford's algorithm (``var_mean``), accumulated in ``accumulate``."""
    var, mean = torch.var_mean(view.to(accumulate), dim=reduced_dims(view), correction=0)
    dtype = compute_dtype(view.dtype)
    return mean.to(dtype), var.to(dtype)


def _blocks_16_bit(view: Tensor) -> list[Tensor] | None:
    """A 16-bit ``(A, C, B)`` CPU view in blocks of at most ``BLOCK_ELEMENTS_16_BIT`` elements per
    channel (along ``A``, and along ``B`` where one row is longer), or ``None`` where one call is accurate."""
    if not view.is_cpu or view.dim() == 2 or view.dtype not in (torch.float16, torch.bfloat16):
        return None
    if view.shape[0] * view.shape[2] <= BLOCK_ELEMENTS_16_BIT:
        return None
    length = min(view.shape[2], BLOCK_ELEMENTS_16_BIT)
    rows = max(1, BLOCK_ELEMENTS_16_BIT // length)
    return [block for part in view.split(rows) for block in part.split(length, dim=2)]


def _kernel_statistics(view: Tensor) -> tuple[Tensor, Tensor]:
    """PyTorch's statistics kernel (``batch_norm_update_stats``), in parts where one call loses accuracy.

    Given float32 scratch running buffers, it answers 16-bit inputs in float32. ``(M, C)`` CPU
    views of more than ``ROW_GROUP_ROWS`` rows go by :func:`_row_group_statistics`, 16-bit
    ``(A, C, B)`` CPU views in blocks of ``BLOCK_ELEMENTS_16_BIT`` elements per channel.
    """
    if view.dim() == 2 and view.shape[0] > ROW_GROUP_ROWS and view.is_cpu:
        return _row_group_statistics(view)
    if blocks := _blocks_16_bit(view):
        means, variances = zip(*map(_kernel_statistics, blocks))
        counts = torch.tensor([block[:, 0].numel() for block in blocks], dtype=torch.float64, device=view.device)
        mean, var = combine_statistics(counts, torch.stack(means), torch.stack(variances))
        return mean.to(means[0].dtype), var.to(means[0].dtype)
    scratch = None  # same-dtype inputs need no running buffers; 16-bit ones get float32 answers from them
    if view.dtype in (torch.float16, torch.bfloat16):
        scratch = torch.empty(view.shape[1], dtype=torch.float32, device=view.device)
    return torch.batch_norm_update_stats(*kernel_layout(view), scratch, scratch, 0.0)


def _row_group_statistics(view: Tensor) -> tuple[Tensor, Tensor]:
    """Statistics of an ``(M, C)`` view of more than ``ROW_GROUP_ROWS`` rows, in one kernel call.

    With ``k = ceil(M / ROW_GROUP_ROWS)`` groups of ``q = M // k`` rows, the first ``q * k`` rows
    viewed as ``(q, k * C)`` (no copy) give the kernel ``k * C`` channels of ``q`` rows each:
    group ``g`` holds the rows ``g, g + k, g + 2k, ...``. Each sums few rows, so each is accurate,
    and the wider rows vectorize better. The ``M - q * k < k`` rows left over are one more group.
    """
    rows, channels = view.shape
    groups = -(-rows // ROW_GROUP_ROWS)
    per_group = rows // groups
    means, variances = _kernel_statistics(view[: per_group * groups].reshape(per_group, groups * channels))
    means, variances = means.view(groups, channels), variances.view(groups, channels)
    counts = [per_group] * groups
    if rest := rows - per_group * groups:
        mean, var = _kernel_statistics(view[per_group * groups :])
        means, variances = torch.cat([means, mean[None]]), torch.cat([variances, var[None]])
        counts.append(rest)
    counts = torch.tensor(counts, dtype=torch.float64, device=view.device)
    mean, var = combine_statistics(counts, means, variances)
    return mean.to(means.dtype), var.to(means.dtype)


def statistics(view: Tensor) -> tuple[Tensor, Tensor, Tensor | bool]:
    """``(mean, var, valid)`` of a non-empty view: the kernel's, checked on eager CPU.

    Elsewhere (CUDA's kernels use Welford already) the kernel's statistics are kept and ``valid``
    is a device tensor: no synchronization. On eager CPU one host check tells whether they are
    finite (``valid = True``) and the mean small enough for the kernel. If not, the kernel runs
    again on the input shifted by its mean (one more pass and a temporary): near the mean the
    shift is exact (Sterbenz), and the shifted data has a small mean. Where even that fails,
    Welford's algorithm (``torch.var_mean``, slow on CPU) decides.
    """
    mean, var = _kernel_statistics(view)
    if not eager_cpu(view):
        return mean, var, valid_statistics(mean, var)
    if view.numel() == view.shape[1]:  # one element per channel: the variance is exactly 0
        ratio = math.inf
    elif view.dim() == 2 and view.dtype == torch.float32:
        ratio = TRUSTED_RATIO_ROW_GROUPS
    else:  # a 16-bit shifted retry would round x - shift in 16 bits; float64 sums are ample
        ratio = TRUSTED_RATIO_KERNEL
    if finite_and_accurate(mean, var, ratio):
        return mean, var, True
    shift = mean.to(view.dtype)
    shifted_mean, var = _kernel_statistics(view - per_channel(shift, view))
    # A channel constant up to the data's resolution keeps a residual mean of a few resolutions,
    # whose error on the variance lies far below that resolution squared: accepted.
    resolution = mean.abs() * torch.finfo(view.dtype).eps
    residual_ratio = max(ratio, TRUSTED_RATIO_KERNEL)
    if finite_and_accurate(shifted_mean, torch.addcmul(var, resolution, resolution), residual_ratio):
        return shifted_mean + shift, var, True
    mean, var = moments(view, mean.dtype)
    return mean, var, valid_statistics(mean, var)


def valid_statistics(mean: Tensor, var: Tensor, count: Tensor | None = None) -> Tensor:
    """Channels whose statistics are finite and, where ``count`` is given, have elements (a device tensor).

    ``mean * 0`` is 0 for a finite mean and NaN otherwise, and ``var >= 0``: ``mean * 0 + var``
    is below infinity exactly where both are finite (three operations; ``isfinite`` twice takes nine).
    """
    valid = torch.addcmul(var, mean, torch.zeros((), dtype=mean.dtype, device=mean.device)) < math.inf
    return valid if count is None else valid & (count > 0)


# --------------------------------------------------------------------------- masked statistics


def _channel_sums(view: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum(x), sum(x**2))`` per channel in one native pass, without a temporary.

    PyTorch's inference-mode batch-norm backward computes ``sum(dy)`` and
    ``sum(dy * (x - mean) * invstd)``, fused and vectorized for every layout; with ``dy = x``,
    ``mean = 0`` and ``invstd = 1`` they are the sums wanted.
    """
    zeros = torch.zeros(view.shape[1], dtype=compute_dtype(view.dtype), device=view.device)
    _, sum_squares, sums = torch.ops.aten.native_batch_norm_backward(
        view, view, None, zeros, zeros, None, None, False, 1.0, [False, True, True]
    )
    return sums, sum_squares


def masked_count(inside: Tensor, dtype: torch.dtype) -> Tensor:
    """Masked-in elements per channel of a mask view: 0-dim for a mask of every channel, else ``(C,)``."""
    if inside.shape[1] == 1:
        return inside.sum(dtype=dtype)
    return inside.sum(reduced_dims(inside), dtype=dtype)


def masked_moments(view: Tensor, inside: Tensor, count: Tensor, accumulate: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the masked-in elements by the corrected two-pass algorithm.

    The deviations from a rough mean, zeroed outside the mask, give the correction of that mean's
    rounding error and the variance without cancellation, for any offset. Masked-out values reach
    no sum, whatever they hold (``where``, not a product). Differentiable.
    """
    dims = reduced_dims(view)
    safe_count = count.clamp(min=1).to(accumulate)
    deviation = torch.where(inside, view, 0).to(accumulate)
    rough_mean = deviation.sum(dims) / safe_count
    deviation = torch.where(inside, deviation - per_channel(rough_mean, view), 0)
    correction = deviation.sum(dims) / safe_count
    var = (deviation.square().sum(dims) / safe_count - correction.square()).clamp(min=0)
    dtype = compute_dtype(view.dtype)
    return (rough_mean + correction).to(dtype), var.to(dtype)


def masked_statistics(view: Tensor, inside: Tensor) -> tuple[Tensor, Tensor, Tensor | int, Tensor | bool]:
    """``(mean, var, count, valid)`` of the masked-in elements of a non-empty view.

    On eager CPU, where the count is read for free:

    * channels last (``(M, C)``): the masked-in elements are whole rows; gathered, they are an
      ordinary batch for :func:`statistics`;
    * other axes of a contiguous view with rows of at most ``CHANNEL_SUMS_MAX_ROW``: the input
      times the 0/1 mask (one temporary; far faster than ``where`` on CPU) and one fused native
      pass for ``sum(x)`` and ``sum(x**2)``, checked (a masked-out NaN or Inf passes the
      product, and fails the check).

    Elsewhere, and where the check fails: :func:`masked_moments` (in float64 under
    ``torch.compile``). ``count`` is an int where the host knows it, else a tensor
    (:func:`masked_count`).
    """
    if eager_cpu(view) and inside.shape[1] == 1:  # one mask for every channel
        if view.dim() == 2:
            rows = torch.index_select(view, 0, inside.reshape(-1).nonzero().reshape(-1))
            if len(rows):
                mean, var, valid = statistics(rows)
                return mean, var, len(rows), valid
        elif view.is_contiguous() and view.shape[2] <= CHANNEL_SUMS_MAX_ROW and (n := int(inside.sum().item())) > 0:
            sums, sum_squares = _channel_sums(torch.mul(view, inside))
            mean = sums / n
            var = torch.addcmul(sum_squares, sums, mean, value=-1).div_(n)  # may round below 0: not accepted
            if finite_and_accurate(mean, var, TRUSTED_RATIO_CHANNEL_SUMS):
                return mean, var, n, True
    dtype = compute_dtype(view.dtype)
    count = masked_count(inside, dtype)
    accumulate = torch.float64 if torch.compiler.is_compiling() else dtype
    mean, var = masked_moments(view, inside, count, accumulate)
    return mean, var, count, valid_statistics(mean, var, count)
