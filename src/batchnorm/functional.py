"""Pure tensor functions of batch normalization: views, statistics, normalization, updates.

Everything here works on a *channel view* of the input: a view in which the normalized axis is
dimension 1, so that PyTorch's native batch-norm kernels apply without moving data:

* channels last (``axis == rank - 1``), or only sizes 1 after the axis: ``(M, C)``, with ``M``
  the product of the other sizes;
* any other axis: ``(A, C, B)``, with ``A``/``B`` the products of the sizes before/after it.

For a contiguous input both are views (no copy). The statistics of channel ``c`` are taken over
every element of the view with index ``c`` on dimension 1, i.e. over every axis but ``axis``.

All statistics are computed in the *compute dtype*, ``promote_types(x.dtype, float32)``: 16-bit
inputs are normalized with float32 statistics and weights (PyTorch's mixed-dtype kernels), float64
inputs in float64.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "memory_order",
    "channel_view",
    "from_channel_view",
    "compute_dtype",
    "check_mask",
    "mask_view",
    "normalize",
    "normalize_input",
    "valid_statistics",
    "batch_statistics",
    "combine_statistics",
    "batch_norm_training",
    "masked_batch_norm_training",
    "update_moving_statistics",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: at least float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# PyTorch's named memory formats by rank, each with its order of dimensions in memory.
_NAMED_ORDERS = {4: (torch.channels_last, (0, 2, 3, 1)), 5: (torch.channels_last_3d, (0, 2, 3, 4, 1))}


def memory_order(x: Tensor) -> tuple[int, ...] | None:
    """The order of ``x``'s dimensions as laid out in memory, outermost first, where it is not the
    order of its shape; ``None`` for a contiguous ``x`` and where no such order is dense.

    ``(0, 2, 3, 1)`` for a ``torch.channels_last`` ``(N, C, H, W)`` tensor: ``x.permute(order)``
    is contiguous, so :func:`channel_view` reads it without a copy.
    """
    if x.is_contiguous():
        return None
    named = _NAMED_ORDERS.get(x.dim())
    if named is not None and x.is_contiguous(memory_format=named[0]):
        return named[1]  # known without sorting: this runs on every call
    order = tuple(sorted(range(x.dim()), key=lambda d: -x.stride(d)))  # stable: ties keep their order
    return order if x.permute(order).is_contiguous() else None


@functools.lru_cache
def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def channel_view(x: Tensor, axis: int, order: tuple[int, ...] | None = None) -> Tensor:
    """Reshape ``x`` so that ``axis`` (non-negative) becomes dimension 1: ``(M, C)`` or ``(A, C, B)``.

    The dimensions are taken in ``order`` (:func:`memory_order`; ``None``: as they are), and
    ``A``/``B`` are the products of the sizes before/after ``axis`` in it; ``(M, C)`` when every
    size after it is 1 (channels last, e.g. a ``torch.channels_last`` input with ``axis=1``).

    A view whenever ``x``'s strides allow one (always for a tensor dense in ``order``); a copy
    otherwise. :func:`from_channel_view` undoes it.
    """
    if order is not None:
        x, axis = x.permute(order), order.index(axis)
    shape = x.shape
    channels = shape[axis]
    after = math.prod(shape[axis + 1 :])
    if after == 1:  # channels last, or only size-1 dimensions after the axis: rows of channels
        return x.reshape(math.prod(shape[:axis]), channels)
    return x.reshape(math.prod(shape[:axis]), channels, after)


def from_channel_view(y: Tensor, shape: torch.Size, order: tuple[int, ...] | None = None) -> Tensor:
    """``y``, a channel view made by ``channel_view(x, axis, order)``, back in ``x``'s ``shape``
    and, for a contiguous ``y``, in ``x``'s memory layout (a view)."""
    if order is None:
        return y.reshape(shape)
    return y.reshape([shape[d] for d in order]).permute(_inverse(order))


def _per_channel(v: Tensor, view: Tensor) -> Tensor:
    """Shape a ``(C,)`` vector to broadcast against a channel view."""
    return v if view.dim() == 2 else v[:, None]


def _reduced_dims(view: Tensor) -> tuple[int, ...]:
    return (0,) if view.dim() == 2 else (0, 2)


def _kernel_layout(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` as PyTorch's batch-norm kernels read them fastest: contiguous ``(M, C)`` CPU
    tensors as the ``(1, C, 1, M)`` ``torch.channels_last`` tensors that they are in memory
    (views), others as they are; all or none, as the kernels want one layout for all.

    PyTorch's eager CPU kernels run their channels-last loops, vectorized over ``C``, on such
    tensors, and their 2-D loops on ``(M, C)``; the sums are the same. Single runs of the
    backward on a float32 ``(4096, 768)`` view measured from 1.05 to 2 times faster in this
    layout (the machine is noisy); side by side, 3 runs, see _LARGE_ROWS_MIN_ELEMENTS. (Given an
    output gradient in another layout than the input, their backward on this shape returns wrong
    values: never mix.) :func:`_from_kernel_layout` turns a kernel's output back.
    """
    if all(t.dim() == 2 and t.is_contiguous() for t in tensors) and _eager_cpu(tensors[0]):
        return tuple(t.T[None, :, None, :] for t in tensors)
    return tensors


def _from_kernel_layout(t: Tensor, view: Tensor) -> Tensor:
    """A kernel's output for :func:`_kernel_layout` ``(view, ...)``, shaped like ``view`` again."""
    return t[0, :, 0].T if t.dim() != view.dim() else t


def check_mask(mask: Tensor, shape: torch.Size, axis: int) -> None:
    """Raise ``ValueError`` unless ``mask`` fits ``shape`` without its channel axis.

    The mask must have rank ``len(shape) - 1`` and each of its dimensions must equal the matching
    non-channel dimension of ``shape`` or be 1 (broadcast).
    """
    expected = tuple(shape[:axis]) + tuple(shape[axis + 1 :])
    fits = mask.dim() == len(expected) and all(m in (1, e) for m, e in zip(mask.shape, expected))
    if not fits:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit inputs of shape {tuple(shape)} "
            f"with channel axis {axis}: expected shape {expected}, each dimension that size or 1"
        )


def mask_view(mask: Tensor, shape: torch.Size, axis: int, order: tuple[int, ...] | None = None) -> Tensor:
    """The mask as booleans shaped like ``channel_view(x, axis, order)`` with ``C`` replaced by 1.

    Non-zero mask values count as True (as Keras 3.15, which casts the mask to bool).
    """
    inside = (mask if mask.dtype == torch.bool else mask != 0).unsqueeze(axis)
    full = list(shape)
    full[axis] = 1
    if list(inside.shape) != full:  # size-1 dimensions broadcast
        inside = inside.expand(full)
    return channel_view(inside, axis, order)


def normalize(
    view: Tensor,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: float,
    out: Tensor | None = None,
) -> Tensor:
    """Inference normalization ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``.

    ``view`` is a channel view or any ``(N, C, ...)`` tensor (channels on dimension 1, in any
    memory format, which the output keeps). ``mean``/``var`` are constants (no gradient flows
    into them); gradients flow to ``view``, ``gamma`` and ``beta``. All ``(C,)`` tensors must be
    in ``compute_dtype(view.dtype)``.
    ``out`` (shaped and typed like ``view``, outside autograd) receives ``y`` instead of a new
    tensor; it may hold anything before, as it is only written.

    Where autograd records nothing on a large float ``(M, C)`` CPU view (``_large_rows``), the
    per-channel ``scale`` and ``shift`` are formed first and ``y = x * scale + shift`` runs as one
    ``addcmul``; elsewhere PyTorch's inference kernel runs (one pass over ``x``, mixed
    16-bit/float32 included; with ``training=False`` it only reads ``mean``/``var``), in
    :func:`_kernel_layout` where autograd records nothing, and autograd records its native backward.
    """
    records = _needs_grad(view, gamma, beta)
    if _large_rows(view) and not records:
        # The kernel computes exactly this, but addcmul streams faster (measured side by side,
        # 3 runs: case B inference 1.12 against 1.29 of F.batch_norm's time, case C 0.94 against 1.20).
        scale = torch.rsqrt(var + epsilon)
        if gamma is not None:
            scale.mul_(gamma)
        shift = torch.mul(mean, scale).neg_() if beta is None else torch.addcmul(beta, mean, scale, value=-1)
        return torch.addcmul(shift, view, scale, out=out)
    if out is None:
        # Where autograd records, its output gradient may come in another layout than the input:
        # the kernel then gets the view as it is (see _kernel_layout).
        (x,) = (view,) if records else _kernel_layout(view)
        y = torch.batch_norm(x, gamma, beta, mean, var, False, 0.0, epsilon, torch.backends.cudnn.enabled)
        return _from_kernel_layout(y, view)
    # The kernel's saved statistics: CPU leaves them empty in inference, CUDA fills both (in turn,
    # and the second from the first's storage if they were one tensor).
    x, y = _kernel_layout(view, out)
    torch.ops.aten.native_batch_norm.out(
        x, gamma, beta, mean, var, False, 0.0, epsilon,
        out=y, save_mean=mean.new_empty(0), save_invstd=mean.new_empty(0),
    )
    return out


def normalize_input(
    x: Tensor, axis: int, mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, epsilon: float
) -> Tensor:
    """:func:`normalize` of ``x`` along ``axis`` (non-negative), in ``x``'s shape and memory format."""
    if axis == 1 and not _needs_grad(x, gamma, beta):
        # PyTorch's own (N, C, ...) layout: its kernel reads x as it lies, in any memory format,
        # as F.batch_norm does. Not where autograd records: given a gradient in another layout
        # than a channels-last-like input, PyTorch's CPU backward permutes dx (torch 2.13).
        return normalize(x, mean, var, gamma, beta, epsilon)
    order = memory_order(x)
    y = normalize(channel_view(x, axis, order), mean, var, gamma, beta, epsilon)
    return from_channel_view(y, x.shape, order)


# Large float (M, C) views (channels last) on eager CPU: normalized by addcmul where autograd
# records nothing (see normalize), and in training the statistics come first (statistics kernel,
# then normalize) rather than from the fused kernel, whose autograd backward gets gradients in any
# layout and so cannot have the channels-last one (see _kernel_layout): _NormalizeByBatchStatistics'
# backward can (measured side by side with 35771d4, 3 runs: training forward+backward of case B
# 0.74 against 1.07 of F.batch_norm's time, case C 0.70 against 0.86). Below this many elements
# one fused call beats the few more small operations (measured crossover: 5e4 to 6.5e4 elements).
_LARGE_ROWS_MIN_ELEMENTS = 2**16


def _large_rows(view: Tensor) -> bool:
    """Whether ``view`` is a large float32/float64 ``(M, C)`` view on PyTorch's eager CPU kernels."""
    return (
        view.dim() == 2 and view.numel() >= _LARGE_ROWS_MIN_ELEMENTS and _eager_cpu(view)
        and view.dtype == compute_dtype(view.dtype)
    )


def valid_statistics(mean: Tensor, var: Tensor, count: Tensor | None = None) -> Tensor:
    """The channels whose batch statistics may update the moving ones (SPEC section 5).

    True where ``mean`` and ``var`` are finite and, when ``count`` (elements per channel) is
    given, ``count > 0``. A bool tensor on the statistics' device: no host synchronization.
    """
    valid = mean.isfinite() & var.isfinite()
    return valid if count is None else valid & (count > 0)


def combine_statistics(weights: Tensor, means: Tensor, variances: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of a union of groups from each group's, in float64 (Chan et al.).

    With ``n_k`` elements, mean ``m_k`` and biased variance ``v_k`` in group ``k`` (``means`` and
    ``variances`` ``(K, C)``) and ``weights`` the float64 ``(K,)`` shares ``w_k = n_k / sum(n)``::

        mean = sum_k w_k m_k        var = sum_k w_k (v_k + (m_k - mean)**2)

    Every term is non-negative, so nothing cancels. Groups without elements weigh nothing (their
    statistics must be finite); with no element at all (all weights 0), both are zeros.
    """
    means, variances = means.double(), variances.double()
    mean = weights @ means
    deviations = means - mean
    return mean, weights @ torch.addcmul(variances, deviations, deviations)


def _shares(counts: list[int], device: torch.device) -> Tensor:
    """The float64 weights ``n_k / sum(n)`` of :func:`combine_statistics` from counts the host knows."""
    total = sum(counts)
    return torch.tensor([count / total for count in counts], dtype=torch.float64, device=device)


# PyTorch's eager CPU kernels lose accuracy as the ratio mean^2 / variance grows. Measured worst
# relative errors of the variance over sizes 2..1e5: the statistics kernels (training and
# batch_norm_update_stats, one algorithm) stay near 1e-5 up to a ratio of 2^16; the float32 sums
# E[x^2] - E[x]^2 of the inference backward (used for masks on other axes) reach 5e-5 at a ratio
# of 4 and 3e-3 at 256, and grow with the length B of the (A, C, B) view's rows (3e-4 at a
# ratio of 4 with B = 2^22; 9e-7 with B = 2^16). Beyond these ratios the statistics are
# recomputed by a stable algorithm.
_TRUSTED_RATIO_STATISTICS_KERNEL = 2.0**16
# On an (M, C) view the same kernels add each channel up row after row in float32, so their errors
# grow with the rows and with the mean (2 threads, mean r standard deviations from 0: the mean's
# error about 1e-6 * r sd at 4096 rows, 2.5e-3 sd at 2^20 rows and r = 256; the variance's 1.3e-6
# at 4096 rows, 1.7e-4 at 2^20, whatever r). Views of more rows are taken in groups of at most
# this many rows, combined in float64 (see _row_group_statistics), and trusted up to this ratio
# (r = 4: the mean within 6e-6 sd).
_STATISTICS_BLOCK_ROWS = 4096
_TRUSTED_RATIO_STATISTICS_KERNEL_ROWS = 2.0**4  # float32 views; see _checked_statistics
# The mixed 16-bit training kernel's errors on an (A, C, B) view grow with the elements per
# channel too (bfloat16, mean 1 sd from 0: the variance's 4e-7 at 2^14 elements, 1.1e-5 at 2^18,
# 7e-5 at 2^20, 4e-4 at 2^22): larger views are taken in blocks (along A) of at most this many
# per channel. Each block's kernel also writes an output that is dropped, so a blocked training
# forward costs about 1.5 times the fused kernel's.
_STATISTICS_BLOCK_ELEMENTS_16_BIT = 2**18
_TRUSTED_RATIO_CHANNEL_SUMS = 4.0
# statistics_backward's one-pass term, x * slope + offset, keeps its accuracy up to this ratio.
_TRUSTED_RATIO_FOLDED_TERM = 4.0


def _native_training(view: Tensor, gamma, beta, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch's training kernel, with its batch statistics caught in scratch running buffers.

    Differentiable as PyTorch's own batch norm is: autograd records the kernel's native backward.
    """
    channels = view.shape[1]
    n = view.numel() // channels
    mean = torch.zeros(channels, dtype=compute_dtype(view.dtype), device=view.device)
    unbiased = torch.zeros_like(mean)
    # momentum=1: the "running" buffers receive exactly this batch's mean and unbiased variance.
    y = torch.batch_norm(view, gamma, beta, mean, unbiased, True, 1.0, epsilon, torch.backends.cudnn.enabled)
    # Keras's variance is the biased one, unbiased - unbiased / n; with a single element it is 0
    # (the kernel gives 0/0). Out of place: autograd keeps the running buffers for the backward.
    return y, mean, torch.sub(unbiased, unbiased, alpha=1.0 / n) if n > 1 else torch.zeros_like(unbiased)


def _block_size(view: Tensor) -> int | None:
    """The size along dimension 0 of the blocks PyTorch's CPU kernels take a 16-bit ``(A, C, B)``
    view's statistics in, or ``None`` where one call is accurate (``_STATISTICS_BLOCK_ELEMENTS_16_BIT``)."""
    if view.device.type != "cpu" or view.dim() == 2 or view.dtype == compute_dtype(view.dtype):
        return None
    size = max(1, _STATISTICS_BLOCK_ELEMENTS_16_BIT // view.shape[2])
    return size if view.shape[0] > size else None


def _taken_in_parts(view: Tensor) -> bool:
    """Whether one kernel call would lose accuracy on ``view`` (CPU): its statistics are then taken
    in row groups (``(M, C)``) or blocks (16-bit ``(A, C, B)``) by :func:`_kernel_statistics`."""
    rows = view.dim() == 2 and view.shape[0] > _STATISTICS_BLOCK_ROWS and view.device.type == "cpu"
    return rows or _block_size(view) is not None


def _row_group_statistics(view: Tensor) -> tuple[Tensor, Tensor]:
    """Statistics of an ``(M, C)`` view of more than ``_STATISTICS_BLOCK_ROWS`` rows, in one kernel call.

    With ``k = ceil(M / _STATISTICS_BLOCK_ROWS)`` groups of ``q = M // k`` rows, the first ``q * k``
    rows viewed as ``(q, k * C)`` (no copy) give the kernel ``k * C`` channels of ``q`` rows each:
    group ``g`` holds the rows ``g, g + k, g + 2k, ...``. Each sums few rows, so each is accurate,
    and the wider rows vectorize better (case A: faster than one call on the whole view). The
    ``M - q * k < k`` rows left over are one more group; :func:`combine_statistics` joins them all.
    """
    rows, channels = view.shape
    groups = -(-rows // _STATISTICS_BLOCK_ROWS)
    per_group = rows // groups
    means, variances = _kernel_statistics(view[: per_group * groups].reshape(per_group, groups * channels))
    means, variances = means.view(groups, channels), variances.view(groups, channels)
    counts = [per_group] * groups
    if rest := rows - per_group * groups:
        mean, var = _kernel_statistics(view[per_group * groups :])
        means, variances = torch.cat([means, mean[None]]), torch.cat([variances, var[None]])
        counts.append(rest)
    mean, var = combine_statistics(_shares(counts, view.device), means, variances)
    return mean.to(means.dtype), var.to(means.dtype)


def _kernel_statistics(view: Tensor) -> tuple[Tensor, Tensor]:
    """Biased mean and variance from PyTorch's native statistics kernel, in the compute dtype; no gradient.

    ``batch_norm_update_stats`` computes them alone. For 16-bit inputs it answers in 16 bits on
    CPU, so they come from the mixed-dtype training kernel instead (its output is dropped). Where
    one call would lose accuracy on CPU (``_taken_in_parts``), ``(M, C)`` views are taken in row
    groups (:func:`_row_group_statistics`) and 16-bit ``(A, C, B)`` views in blocks along
    dimension 0, joined by :func:`combine_statistics`.
    """
    if view.dim() == 2 and _taken_in_parts(view):
        return _row_group_statistics(view)
    if block_size := _block_size(view):
        blocks = view.split(block_size)
        means, variances = zip(*map(_kernel_statistics, blocks))
        shares = _shares([len(block) for block in blocks], view.device)
        mean, var = combine_statistics(shares, torch.stack(means), torch.stack(variances))
        return mean.to(means[0].dtype), var.to(means[0].dtype)
    if view.dtype == compute_dtype(view.dtype):
        return torch.batch_norm_update_stats(*_kernel_layout(view.detach()), None, None, 1.0)
    with torch.no_grad():
        _, mean, var = _native_training(view, None, None, 1.0)
    return mean, var


def _moments(view: Tensor, accumulate: torch.dtype) -> tuple[Tensor, Tensor]:
    """Biased mean and variance by Welford's algorithm, accumulated in ``accumulate``; no gradient."""
    var, mean = torch.var_mean(view.detach().to(accumulate), dim=_reduced_dims(view), correction=0)
    stats_dtype = compute_dtype(view.dtype)
    return mean.to(stats_dtype), var.to(stats_dtype)


def _transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) runs this call.

    Its batched tensors take no host reads and no in-place writes into unbatched scratch tensors,
    and an ``autograd.Function`` needs a ``setup_context``: :func:`_differentiable_training` runs
    instead of the kernels.
    """
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _differentiable_training(view, inside, gamma, beta, fallback_mean, fallback_var, epsilon: float):
    """``(y, mean, var, valid)`` as the training functions, in plain differentiable tensor operations.

    The statistics by ``var_mean`` (or the masked sums, with ``where`` so that masked-out values
    reach no sum), ``y = (x - mean) * gamma / sqrt(var + epsilon) + beta``, gradients through all
    of it by autograd. ``fallback_mean``/``fallback_var`` stand in where the mask leaves no element.
    """
    x = view.to(compute_dtype(view.dtype))
    dims = _reduced_dims(view)
    if inside is None:
        var, mean = torch.var_mean(x, dims, correction=0)
        used_mean, used_var, valid = mean, var, valid_statistics(mean, var)
    else:
        count = inside.sum(dims, dtype=x.dtype)
        mean = torch.where(inside, x, 0).sum(dims) / count
        var = torch.where(inside, x - _per_channel(mean, x), 0).square().sum(dims) / count
        used_mean = torch.where(count > 0, mean, fallback_mean)
        used_var = torch.where(count > 0, var, fallback_var)
        valid = valid_statistics(mean, var, count)
    scale = torch.rsqrt(used_var + epsilon)
    if gamma is not None:
        scale = scale * gamma
    y = (x - _per_channel(used_mean, x)) * _per_channel(scale, x)
    if beta is not None:
        y = y + _per_channel(beta, x)
    return y.to(view.dtype), mean.detach(), var.detach(), valid


def _eager_cpu(view: Tensor) -> bool:
    """Whether ``view`` meets PyTorch's eager CPU kernels, where reading a result on the host is free."""
    return view.device.type == "cpu" and not torch.compiler.is_compiling()


def _finite_and_accurate(mean: Tensor, var: Tensor, ratio: float) -> bool:
    """Whether every channel's statistics are finite and accurate: ``mean^2 <= ratio * var < inf``.

    One fused check read on the host: ``var - mean^2 / ratio`` is at least 0 and finite in every
    channel exactly then (a NaN fails both tests). ``ratio = inf`` asks for finiteness only.
    Only for CPU tensors, whose reading costs no synchronization.
    """
    lowest, highest = torch.addcmul(var, mean, mean, value=-1.0 / ratio).aminmax()
    return lowest.item() >= 0 and highest.item() < math.inf


def _checked_statistics(view: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor | bool]:
    """``(mean, var, valid)``: the kernel's statistics of ``view``, or stable ones where they may be inaccurate.

    On PyTorch's eager CPU kernels one host check tells whether the statistics are finite
    (``valid = True``) and the mean small enough for the kernel (``_TRUSTED_RATIO_STATISTICS_KERNEL``,
    ``_TRUSTED_RATIO_STATISTICS_KERNEL_ROWS`` on an ``(M, C)`` view).
    If not, the kernel runs again on the input shifted by its mean (one more pass and a
    temporary), and where even that fails, the moments come from Welford's algorithm
    (``torch.var_mean``, slow on CPU). Elsewhere the kernel's are kept (CUDA's use Welford already)
    and ``valid`` is :func:`valid_statistics`, a device tensor: no synchronization.
    """
    if not _eager_cpu(view):
        return mean, var, valid_statistics(mean, var)
    # A single element per channel has the exact variance 0: only finiteness is in question.
    if view.numel() == view.shape[1]:
        ratio = math.inf
    else:
        # float32 only: a 16-bit shifted retry would round (x - shift) in 16 bits; float64 sums are ample.
        rows = view.dim() == 2 and view.dtype == torch.float32
        ratio = _TRUSTED_RATIO_STATISTICS_KERNEL_ROWS if rows else _TRUSTED_RATIO_STATISTICS_KERNEL
    if _finite_and_accurate(mean, var, ratio):
        return mean, var, True
    # The kernel's mean errs by a small fraction of the offset. Shifted by it (exactly near the
    # mean, Sterbenz), the data has a small mean, the kernel's statistics are accurate, and the
    # variance is the same.
    shift = mean.to(view.dtype)
    shifted_mean, var = _kernel_statistics(view - _per_channel(shift, view))
    # A channel constant up to the data's resolution keeps a residual mean of some resolutions
    # (tens of them on an (M, C) view), whose error on the variance lies far below that
    # resolution squared: accepted, up to the kernel's general ratio.
    resolution = mean.abs() * torch.finfo(view.dtype).eps
    residual_ratio = max(ratio, _TRUSTED_RATIO_STATISTICS_KERNEL)
    if _finite_and_accurate(shifted_mean, torch.addcmul(var, resolution, resolution), residual_ratio):
        return shifted_mean + shift, var, True
    mean, var = _moments(view, compute_dtype(view.dtype))
    return mean, var, valid_statistics(mean, var)


def batch_statistics(view: Tensor) -> tuple[Tensor, Tensor, Tensor | bool]:
    """``(mean, var, valid)`` of ``view``'s channels without normalizing; no gradient.

    ``mean = mean_R(x)`` and ``var = mean_R((x - mean)**2)`` (biased) from PyTorch's statistics
    kernel, checked as in :func:`_checked_statistics`; ``valid`` as in :func:`batch_norm_training`.
    Under ``torch.compile`` the moments accumulate in float64.
    """
    if torch.compiler.is_compiling():
        # Inductor's float32 reductions accumulate sequentially and lose the mean of large-offset
        # data: accumulate in float64 inside the fused reduction (no float64 copy is made).
        mean, var = _moments(view, torch.float64)
        return mean, var, valid_statistics(mean, var)
    return _checked_statistics(view, *_kernel_statistics(view))


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (else a Function is overhead)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


class _NormalizeByBatchStatistics(torch.autograd.Function):
    """``normalize`` with statistics computed elsewhere, differentiated as if the kernel had taken them.

    Forward: :func:`normalize`. Backward: PyTorch's native training backward given these
    statistics, i.e. the gradient through them too, in :func:`_kernel_layout` (the output
    gradient made contiguous, like the view, so that both reach the kernel in one layout).
    """

    @staticmethod
    def forward(ctx, view: Tensor, gamma, beta, mean: Tensor, var: Tensor, epsilon: float):
        ctx.save_for_backward(view, gamma, mean, var)
        ctx.epsilon = epsilon
        return normalize(view, mean, var, gamma, beta, epsilon)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        view, gamma, mean, var = ctx.saved_tensors
        invstd = torch.rsqrt(var + ctx.epsilon)
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_y, x = _kernel_layout(grad_y.reshape(view.shape).contiguous(), view)
        grad_x, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, gamma, None, None, mean, invstd, True, ctx.epsilon, wanted
        )
        return None if grad_x is None else _from_kernel_layout(grad_x, view), grad_gamma, grad_beta, None, None, None


def _normalize_by_batch_statistics(view: Tensor, gamma, beta, mean: Tensor, var: Tensor, epsilon: float) -> Tensor:
    """:class:`_NormalizeByBatchStatistics`, or just :func:`normalize` where no gradient is wanted."""
    if not _needs_grad(view, gamma, beta):
        return normalize(view, mean, var, gamma, beta, epsilon)
    return _NormalizeByBatchStatistics.apply(view, gamma, beta, mean, var, epsilon)


def batch_norm_training(
    view: Tensor, gamma: Tensor | None, beta: Tensor | None, epsilon: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | bool]:
    """Normalize with the batch's own statistics; return ``(y, mean, var, valid)``.

    ``mean = mean_R(x)``, ``var = mean_R((x - mean)**2)`` (biased) and
    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``, with the full batch-norm gradient
    (through the statistics) to ``view``, ``gamma`` and ``beta``. ``mean``/``var`` carry no gradient.
    ``valid`` tells the channels whose statistics may update the moving ones: a bool tensor, or
    ``True`` when every channel's are (known without a synchronization, on CPU).

    PyTorch's training kernel gives the output and the statistics (for 16-bit inputs: float32
    statistics), and autograd its native backward; on large float32 ``(M, C)`` CPU views
    (``_large_rows``) and where the statistics are taken in parts (``_taken_in_parts``),
    PyTorch's statistics kernel and :func:`normalize` do, with PyTorch's native training backward.
    The statistics are checked as in :func:`_checked_statistics`; where they are recomputed, the
    output is :func:`normalize`'s, differentiated by PyTorch's native training backward.
    Under ``torch.compile`` the moments accumulate in float64.
    """
    if _transforms_active():
        return _differentiable_training(view, None, gamma, beta, None, None, epsilon)
    # Taken in parts, the statistics cannot come from the fused kernel, which takes them in one.
    if torch.compiler.is_compiling() or _taken_in_parts(view) or _large_rows(view):
        y = None
        mean, var, valid = batch_statistics(view)
    else:
        y, kernel_mean, var = _native_training(view, gamma, beta, epsilon)
        mean, var, valid = _checked_statistics(view, kernel_mean, var)
        if mean is not kernel_mean:  # recomputed: the kernel's output used the wrong statistics
            y = None
    if y is None:
        y = _normalize_by_batch_statistics(view, gamma, beta, mean, var, epsilon)
    return y, mean, var, valid


def _channel_sums(view: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_R(x), sum_R(x**2))`` per channel in one native pass, without a temporary.

    PyTorch's inference-mode batch-norm backward computes exactly these two reductions,
    ``sum(dy)`` and ``sum(dy * (x - mean) * invstd)``, fused and vectorized for every layout;
    with ``dy = x``, ``mean = 0`` and ``invstd = 1 / sqrt(0 + 1)`` they are the sums wanted.
    """
    zeros = torch.zeros(view.shape[1], dtype=compute_dtype(view.dtype), device=view.device)
    _, sum_squares, sums = torch.ops.aten.native_batch_norm_backward(
        view, view, None, zeros, zeros, None, None, False, 1.0, [False, True, True]
    )
    return sums, sum_squares


def _masked_moments(masked: Tensor, inside: Tensor, count: Tensor, accumulate: torch.dtype) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the masked-in elements by the corrected two-pass algorithm.

    ``masked`` holds the input with masked-out positions zeroed. The deviations from a rough mean,
    zeroed again outside the mask, give the correction of that mean's rounding error and the
    variance without cancellation, for any offset.
    """
    dims = _reduced_dims(masked)
    safe_count = count.clamp(min=1).to(accumulate)
    deviation = masked.to(accumulate)
    rough_mean = deviation.sum(dims) / safe_count
    deviation = (deviation - _per_channel(rough_mean, masked)) * inside
    correction = deviation.sum(dims) / safe_count
    var = (deviation.square_().sum(dims) / safe_count - correction.square()).clamp(min=0)
    stats_dtype = compute_dtype(masked.dtype)
    return (rough_mean + correction).to(stats_dtype), var.to(stats_dtype)


def _masked_forward(view, inside, gamma, beta, fallback_mean, fallback_var, epsilon: float):
    """``(y, mean, var, valid, count, used_mean, used_var)`` of a masked training call (see below).

    ``count`` is a number on the CPU paths that read it (channels last; the one-pass sums), else
    a 0-dim tensor.
    """
    dtype = compute_dtype(view.dtype)
    count = inside.sum(dtype=dtype)
    y = None
    if _eager_cpu(view) and (n := count.item()) > 0:
        if view.dim() == 2:
            # Channels last: the masked-in elements are whole rows of the (M, C) view. Gathered
            # into the output buffer (no other temporary) they are an ordinary batch, whose
            # statistics the unmasked path computes and checks; masked-out values never enter them.
            y = torch.empty_like(view, memory_format=torch.contiguous_format)
            positions = inside.reshape(-1).nonzero().reshape(-1)
            rows = torch.index_select(view, 0, positions, out=y[: len(positions)])
            mean, var, valid = batch_statistics(rows)
            y = normalize(view, mean, var, gamma, beta, epsilon, out=y)
            return y, mean, var, valid, len(positions), mean, var  # an exact count, whatever its size
        if view.is_contiguous():
            # Other axes: the output buffer holds the masked input first, and PyTorch's vectorized
            # CPU kernel sums it (its strided fallback accumulates 16-bit inputs in 16 bits). A
            # product with the 0/1 weights is far faster than where() on CPU, but lets a masked-out
            # NaN or Inf through (0 * NaN), which the check below sends, as a large offset, to the
            # stable path.
            y = torch.mul(view, inside, out=torch.empty_like(view))
            sums, sum_squares = _channel_sums(y)
            mean = sums / n
            var = torch.addcmul(sum_squares, sums, mean, value=-1).div_(n)  # may round below 0: not accepted
            if _finite_and_accurate(mean, var, _TRUSTED_RATIO_CHANNEL_SUMS):
                return normalize(view, mean, var, gamma, beta, epsilon, out=y), mean, var, True, n, mean, var
    # The stable path: no element, other devices (where a check would cost a synchronization),
    # non-contiguous inputs on other axes, and where the one-pass sums are inaccurate.
    accumulate = torch.float64 if torch.compiler.is_compiling() else dtype
    mean, var = _masked_moments(torch.where(inside, view, 0), inside, count, accumulate)
    has_elements = count > 0
    used_mean = torch.where(has_elements, mean, fallback_mean)
    used_var = torch.where(has_elements, var, fallback_var)
    y = normalize(view, used_mean, used_var, gamma, beta, epsilon, out=y)
    return y, mean, var, valid_statistics(mean, var, count), count, used_mean, used_var


class _MaskedBatchNormTraining(torch.autograd.Function):
    """Batch normalization with the statistics of the masked-in elements, explicit backward.

    Forward, on PyTorch's eager CPU kernels: for channels last, the masked-in rows gathered and
    given to the unmasked path's statistics; on other axes of a contiguous input, the input with
    masked-out positions zeroed (the one temporary) and one fused native pass for ``sum(x)`` and
    ``sum(x**2)``, with an accuracy check. The stable fallback, and the path for non-contiguous
    inputs on other axes and on other devices (where a check would cost a synchronization), is
    the corrected two-pass algorithm (in float64 under ``torch.compile``).
    Masked-out values never enter the statistics, whatever they hold (as Keras's
    ``where(mask, x, 0)``). The output is :func:`normalize`'s.

    Backward: :func:`statistics_backward`.
    """

    @staticmethod
    def forward(ctx, view, inside, gamma, beta, fallback_mean, fallback_var, epsilon: float):
        y, mean, var, valid, count, used_mean, used_var = _masked_forward(
            view, inside, gamma, beta, fallback_mean, fallback_var, epsilon
        )
        ctx.save_for_backward(view, inside, gamma, used_mean, used_var)
        ctx.count, ctx.epsilon = count, epsilon  # count: an intermediate (tensor) or a number
        # The backward's one-pass term needs mean^2 <= 4 var; on CPU the check is free.
        ctx.small_mean = valid is True and _finite_and_accurate(mean, var, _TRUSTED_RATIO_FOLDED_TERM)
        if valid is True:  # a Function returns tensors (torch.jit.trace replays it so)
            valid = torch.ones((), dtype=torch.bool, device=view.device)
        ctx.mark_non_differentiable(mean, var, valid)
        return y, mean, var, valid

    @staticmethod
    @once_differentiable  # its formulas take the statistics as constants: no second derivative
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_valid):
        view, inside, gamma, mean, var = ctx.saved_tensors
        grads = statistics_backward(
            grad_y, view, inside, gamma, mean, var, ctx.count, ctx.epsilon, ctx.needs_input_grad,
            small_mean=ctx.small_mean,
        )
        return grads[0], None, grads[1], grads[2], None, None, None


def _gradient_sums(grad_y: Tensor, view: Tensor, gamma, mean: Tensor, var: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """``(sum(dy * xhat), sum(dy))`` per channel, from PyTorch's native inference backward."""
    if view.numel() == 0:  # the native kernel does not accept an empty input
        return torch.zeros_like(mean), torch.zeros_like(mean)
    grad_y, x = _kernel_layout(grad_y, view)
    _, dot, grad_beta = torch.ops.aten.native_batch_norm_backward(
        grad_y, x, gamma, mean, var, None, None, False, epsilon, [False, True, True]
    )
    return dot, grad_beta


def statistics_backward(
    grad_y: Tensor,
    view: Tensor,
    inside: Tensor | None,
    gamma: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor | float,
    epsilon: float,
    needs_input_grad: tuple[bool, ...],
    all_reduce: Callable[[Tensor], Any] | None = None,
    small_mean: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dgamma, dbeta)`` of a normalization by (masked) batch statistics over ``count`` elements.

    With ``w`` the 0/1 mask (1 without one), ``xhat = (x - mean) * invstd`` and sums over every
    element of a channel (all are normalized, so all depend on the statistics)::

        dbeta  = sum(dy)                  dgamma = sum(dy * xhat)
        dx     = gamma * invstd * (dy - w * (dbeta + xhat * dgamma) / count)

    PyTorch's native inference backward gives both sums in one pass; the subtracted term, affine
    in ``xhat`` per channel, takes two more passes and one temporary (the gradient itself), or one
    pass with ``small_mean`` (the caller checked ``mean^2 <= 4 var``). ``count`` is a 0-dim tensor
    or, where the host knows it, a positive number; where ``count == 0`` the moving statistics
    were used and the term vanishes. ``all_reduce`` (in place, on the packed sums) makes them the
    sums of a whole process group, for synchronized statistics; ``dgamma``/``dbeta`` stay this
    process's share. ``needs_input_grad`` is indexed like the Functions' inputs:
    ``(view, inside, gamma, beta, ...)``.
    """
    grad_y = grad_y.reshape(view.shape)
    dot, grad_beta = _gradient_sums(grad_y, view, gamma, mean, var, epsilon)
    if inside is not None and not (_eager_cpu(view) and bool(dot.isfinite().all())):
        # 0 * NaN is NaN: a masked-out position that the loss does not read (dy = 0) must reach
        # no sum, whatever it holds, so it is read as the mean (xhat = 0). Checked on CPU, where
        # reading the sums is free; always done elsewhere.
        view = torch.where(inside | (grad_y != 0), view, _per_channel(mean, view))
        dot, grad_beta = _gradient_sums(grad_y, view, gamma, mean, var, epsilon)
    grad_x = None
    if needs_input_grad[0]:
        sum_dy, sum_dy_xhat = grad_beta, dot
        if all_reduce is not None:
            sums = torch.cat([grad_beta, dot]).to(mean.dtype)
            all_reduce(sums)
            sum_dy, sum_dy_xhat = sums.chunk(2)
        invstd = torch.rsqrt(var + epsilon)
        scale = invstd if gamma is None else gamma * invstd
        # dx = scale * dy + w * (constant + (x - mean) * slope) per channel, with
        # constant = factor * sum_dy, slope = factor * invstd * sum_dy_xhat, factor = -scale / count.
        if isinstance(count, Tensor):  # no element: the moving statistics were used, the term vanishes
            factor = torch.where(count > 0, scale / -count, 0.0)
        else:
            factor = scale * (-1.0 / count)
        constant = factor * sum_dy
        slope = factor * invstd * sum_dy_xhat
        if small_mean:
            # x * slope + (constant - mean * slope) in one pass: with mean^2 <= 4 var (checked by
            # the caller) the fold loses a few ulps of the term at most.
            offset = torch.addcmul(constant, mean, slope, value=-1)
            grad_x = torch.addcmul(_per_channel(offset, view), view, _per_channel(slope, view))
        else:
            # Formed from x - mean: folded, the term cancels catastrophically when the mean is far
            # from 0 against invstd (a large offset, or a variance far below epsilon).
            grad_x = view - _per_channel(mean, view)
            torch.addcmul(_per_channel(constant, view), grad_x, _per_channel(slope, view), out=grad_x)
        if inside is not None:
            grad_x.mul_(inside)
        grad_x = grad_x.addcmul_(grad_y, _per_channel(scale, view))
        if grad_x.dtype != view.dtype:
            grad_x = grad_x.to(view.dtype)
    grad_gamma = dot if gamma is not None and needs_input_grad[2] else None
    grad_beta = grad_beta if needs_input_grad[3] else None
    return grad_x, grad_gamma, grad_beta


def masked_batch_norm_training(
    view: Tensor,
    inside: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    fallback_mean: Tensor,
    fallback_var: Tensor,
    epsilon: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | bool]:
    """Normalize with the statistics of the masked-in elements; return ``(y, mean, var, valid)``.

    With ``inside`` the boolean mask view (broadcast over channels) and ``I`` the positions where
    it is True: ``count = |I|``, ``mean = sum_I(x) / count``, ``var = sum_I((x - mean)**2) / count``,
    and every element (masked-out ones included) is normalized with them. Values outside ``I``
    never enter the statistics, not even a NaN. Where ``count == 0`` there are no statistics:
    ``fallback_mean``/``fallback_var`` (the moving statistics) are used instead, and the returned
    ``mean``/``var`` are the unusable zeros of an empty sum. ``valid`` is as in
    :func:`batch_norm_training`, False where ``count == 0``. Gradients flow through the statistics
    to ``view``, ``gamma`` and ``beta``; ``mean`` and ``var`` carry none.
    """
    if _transforms_active():
        return _differentiable_training(view, inside, gamma, beta, fallback_mean, fallback_var, epsilon)
    if not _needs_grad(view, gamma, beta):
        return _masked_forward(view, inside, gamma, beta, fallback_mean, fallback_var, epsilon)[:4]
    return _MaskedBatchNormTraining.apply(view, inside, gamma, beta, fallback_mean, fallback_var, epsilon)


def update_moving_statistics(
    moving_mean: Tensor,
    moving_variance: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    valid: Tensor | bool,
) -> None:
    """Keras's moving-average update, in place, only for the channels where ``valid`` is True.

    ``moving = moving * momentum + batch * (1 - momentum)``, computed as
    ``moving + (1 - momentum) * (batch - moving)`` (one fused ``lerp``) in the wider of the
    buffer's and the statistics' dtypes and stored in the buffer's; a channel whose new value
    overflows the buffer's dtype keeps its old one. ``valid`` is ``True`` (every
    channel) or a bool tensor (``(C,)`` or a scalar), so that the decision can stay on the device:
    no host synchronization. No gradient flows: the batch statistics are detached if need be
    (the training functions' carry none), and the buffers must not require one.
    """
    for moving, batch in ((moving_mean, mean), (moving_variance, var)):
        if batch.requires_grad:
            batch = batch.detach()
        # An invalid channel blends with itself, which leaves it exactly as it was.
        target = batch if valid is True else torch.where(valid, batch, moving)
        if target.dtype != moving.dtype:  # blend in the wider dtype, store in the buffer's
            wide = torch.promote_types(moving.dtype, target.dtype)
            blended = moving.to(wide, copy=True).lerp_(target.to(wide), 1.0 - momentum).to(moving.dtype)
            # A value beyond the buffer's range (a float16 buffer and a variance above 65504)
            # would be stored as inf: that channel keeps its value (SPEC section 5).
            moving.copy_(torch.where(blended.isfinite(), blended, moving))
        else:
            moving.lerp_(target, 1.0 - momentum)
