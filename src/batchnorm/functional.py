"""Pure tensor functions of batch normalization: views, statistics, normalization, updates.

Everything here works on a *channel view* of the input: a view in which the normalized axis is
dimension 1, so that PyTorch's native batch-norm kernels apply without moving data:

* channels last (``axis == rank - 1``), or only sizes 1 after the axis: ``(M, C)``, with ``M``
  the product of the other sizes;
* any other axis: ``(A, C, B)``, with ``A``/``B`` the products of the sizes before/after it.

For a contiguous input both are views (no copy). The statistics of channel ``c`` are taken over
every element of the view with index ``c`` on dimension 1, i.e. over every axis but ``axis``.

Several channel axes (``axis=(1, 3)``) are one channel dimension of the view, their product,
indexed in row-major order of the sorted axes: a view where they are adjacent in memory, one copy
where they are not (:func:`channel_order`). Ghost batches (:func:`ghost_batches`) are one more
channel axis: each ghost batch has its own statistics.

All statistics are computed in the *compute dtype*, ``promote_types(x.dtype, float32)``: 16-bit
inputs are normalized with float32 statistics and weights (PyTorch's mixed-dtype kernels), float64
inputs in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _kernels
from ._kernels import combine_statistics, compute_dtype, per_channel, valid_statistics

__all__ = [
    "compute_dtype",
    "memory_order",
    "channel_order",
    "channel_view",
    "from_channel_view",
    "per_channel",
    "check_mask",
    "full_mask",
    "mask_view",
    "ghost_batches",
    "Statistics",
    "batch_statistics",
    "fill_empty",
    "mean_over_ghosts",
    "combine_statistics",
    "valid_statistics",
    "normalize",
    "normalize_input",
    "normalize_by_batch",
    "renorm_correction",
    "renorm_affine",
    "update_moving_statistics",
    "update_renorm_statistics",
    "assign",
]

Axes = int | Sequence[int]


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


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def _as_axes(axis: Axes) -> tuple[int, ...]:
    return (axis,) if isinstance(axis, int) else tuple(axis)


def channel_order(memory: tuple[int, ...] | None, axis: Axes, rank: int) -> tuple[int, ...] | None:
    """The order of dimensions in which :func:`channel_view` reads an input of rank ``rank``, laid out
    in ``memory`` (its :func:`memory_order`), for the channel axes ``axis`` (non-negative, sorted).

    ``memory`` itself where the channel axes lie together in it, in increasing order (the view is
    then a view); otherwise ``memory`` with the channel axes gathered at the place of the first of
    them (the view is a copy, and :func:`from_channel_view` copies the output back).
    """
    axes = _as_axes(axis)
    if len(axes) == 1:
        return memory
    current = memory if memory is not None else tuple(range(rank))
    first = current.index(axes[0])
    if current[first : first + len(axes)] == axes:
        return memory
    others = [d for d in current if d not in axes]
    at = sum(d not in axes for d in current[: min(map(current.index, axes))])
    return (*others[:at], *axes, *others[at:])


def channel_view(x: Tensor, axis: Axes, order: tuple[int, ...] | None = None) -> Tensor:
    """Reshape ``x`` so that ``axis`` (non-negative) becomes dimension 1: ``(M, C)`` or ``(A, C, B)``.

    The dimensions are taken in ``order`` (:func:`channel_order`; ``None``: as they are), and
    ``A``/``B`` are the products of the sizes before/after ``axis`` in it; ``(M, C)`` when every
    size after it is 1 (channels last, e.g. a ``torch.channels_last`` input with ``axis=1``).
    Several channel axes (sorted, together in ``order``) make one of their product.

    A view whenever ``x``'s strides allow one (always for a tensor dense in ``order`` with one
    channel axis); a copy otherwise. :func:`from_channel_view` undoes it.
    """
    axes = _as_axes(axis)
    if order is not None:
        x = x.permute(order)
        axes = tuple(map(order.index, axes))
    start, stop = axes[0], axes[0] + len(axes)
    if len(axes) > 1 and axes != tuple(range(start, stop)):
        raise ValueError(f"the channel axes {_as_axes(axis)} are not together in the order {order}: see channel_order")
    shape = x.shape
    channels = math.prod(shape[start:stop])
    after = math.prod(shape[stop:])
    if after == 1:  # channels last, or only size-1 dimensions after the axis: rows of channels
        return x.reshape(math.prod(shape[:start]), channels)
    return x.reshape(math.prod(shape[:start]), channels, after)


def from_channel_view(
    y: Tensor, shape: torch.Size, order: tuple[int, ...] | None = None, memory: tuple[int, ...] | None = None
) -> Tensor:
    """``y``, a channel view made by ``channel_view(x, axis, order)``, back in ``x``'s ``shape``, laid
    out in ``memory`` (``x``'s :func:`memory_order`; ``None``: contiguous).

    A view where ``order`` is ``memory`` (for a contiguous ``y``); where :func:`channel_order`
    gathered channel axes apart in memory, the output is copied back into ``memory``'s layout.
    """
    y = y.reshape(shape) if order is None else y.reshape([shape[d] for d in order]).permute(_inverse(order))
    if order == memory:
        return y
    if memory is None:
        return y.contiguous()
    return y.permute(memory).contiguous().permute(_inverse(memory))


def check_mask(mask: Tensor, shape: torch.Size, axis: Axes) -> None:
    """Raise ``ValueError`` unless ``mask`` fits ``shape`` without its channel axes.

    The mask must have rank ``len(shape) - len(axes)`` and each of its dimensions must equal the
    matching non-channel dimension of ``shape`` or be 1 (broadcast).
    """
    axes = _as_axes(axis)
    expected = tuple(size for d, size in enumerate(shape) if d not in axes)
    fits = mask.dim() == len(expected) and all(m in (1, e) for m, e in zip(mask.shape, expected))
    if not fits:
        named = f"channel axis {axes[0]}" if len(axes) == 1 else f"channel axes {axes}"
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit inputs of shape {tuple(shape)} "
            f"with {named}: expected shape {expected}, each dimension that size or 1"
        )


def full_mask(mask: Tensor, shape: torch.Size, axis: Axes) -> Tensor:
    """The mask as booleans of the input's rank: size 1 on the channel axes, ``shape``'s sizes elsewhere.

    Non-zero mask values count as True (as Keras 3.15, which casts the mask to bool). A view of
    the mask where it is boolean (size-1 dimensions are expanded, not copied).
    """
    inside = mask if mask.dtype == torch.bool else mask != 0
    axes = _as_axes(axis)
    full = list(shape)
    for a in axes:  # sorted: each lands where it belongs
        inside = inside.unsqueeze(a)
        full[a] = 1
    return inside if list(inside.shape) == full else inside.expand(full)


def mask_view(mask: Tensor, shape: torch.Size, axis: Axes, order: tuple[int, ...] | None = None) -> Tensor:
    """The mask as booleans shaped like ``channel_view(x, axis, order)`` with ``C`` replaced by 1."""
    return channel_view(full_mask(mask, shape, axis), axis, order)


def ghost_batches(
    x: Tensor, virtual_batch_size: int, axis: Axes, inside: Tensor | None, memory: tuple[int, ...] | None
) -> tuple[Tensor, tuple[int, ...], Tensor | None, tuple[int, ...] | None]:
    """``x`` split into ghost batches as tf-keras splits it, with the channel axes that give each its own statistics.

    ``x`` of shape ``(B, ...)`` is viewed as ``(v, B / v, ...)`` (``v = virtual_batch_size``,
    which must divide ``B``): ghost batch ``j`` holds the samples ``j, j + B/v, j + 2B/v, ...``
    (strided, as tf-keras's row-major reshape). Returns that view; the channel axes ``(1, *axis
    + 1)`` (the ghost index first); ``inside`` (a :func:`full_mask` of ``x``, or ``None``)
    likewise split and expanded over the channel axes, since it differs from ghost to ghost; and
    the view's memory order from ``x``'s, ``memory`` (derived, not read from strides: under
    ``torch.compile`` the split's strides depend on ``B``, and sorting them breaks the graph).
    """
    axes = _as_axes(axis)
    split_shape = (virtual_batch_size, x.shape[0] // virtual_batch_size)
    split = x.unflatten(0, split_shape)
    if inside is not None:  # a full mask: its batch dimension is expanded already
        inside = inside.unflatten(0, split_shape).expand(split.shape)
    if memory is not None:  # the batch dimension becomes two, in its place
        memory = tuple(e for d in memory for e in ((0, 1) if d == 0 else (d + 1,)))
    return split, (1, *(a + 1 for a in axes)), inside, memory


def normalize(
    view: Tensor,
    mean: Tensor,
    var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: float,
) -> Tensor:
    """Inference normalization ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``.

    ``view`` is a channel view or any ``(N, C, ...)`` tensor (channels on dimension 1, in any
    memory format, which the output keeps). ``mean``/``var`` are constants (no gradient flows
    into them); gradients flow to ``view``, ``gamma`` and ``beta``. All ``(C,)`` tensors must be
    in ``compute_dtype(view.dtype)``.

    PyTorch's inference kernel runs (one pass, mixed 16-bit/float32 included), and autograd
    records its native backward. Where autograd records nothing, the kernel reads an ``(M, C)``
    view in its fastest layout, and on large float rows (``_kernels.large_rows``) the per-channel
    ``scale`` and ``shift`` come first and ``y = x * scale + shift`` is one ``addcmul``, which
    streams faster than the kernel (docs/performance.md).
    """
    if _needs_grad(view, gamma, beta):
        # Its output gradient may come in another layout than the input: the view as it is.
        return torch.batch_norm(view, gamma, beta, mean, var, False, 0.0, epsilon, torch.backends.cudnn.enabled)
    if _kernels.large_rows(view):
        scale = torch.rsqrt(var + epsilon)
        if gamma is not None:
            scale.mul_(gamma)
        shift = torch.mul(mean, scale).neg_() if beta is None else torch.addcmul(beta, mean, scale, value=-1)
        return torch.addcmul(shift, view, scale)
    (x,) = _kernels.kernel_layout(view)
    y = torch.batch_norm(x, gamma, beta, mean, var, False, 0.0, epsilon, torch.backends.cudnn.enabled)
    return _kernels.from_kernel_layout(y, view)


def normalize_input(
    x: Tensor, axis: Axes, mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, epsilon: float
) -> Tensor:
    """:func:`normalize` of ``x`` along ``axis`` (non-negative, or several sorted), in ``x``'s shape
    and memory format. The ``(C,)`` tensors run over the channel axes' indices in row-major order."""
    if axis in (1, (1,)) and not _needs_grad(x, gamma, beta):
        # PyTorch's own (N, C, ...) layout: its kernel reads x as it lies, in any memory format,
        # as F.batch_norm does. Not where autograd records: given a gradient in another layout
        # than a channels-last-like input, PyTorch's CPU backward permutes dx (torch 2.13).
        return normalize(x, mean, var, gamma, beta, epsilon)
    memory = memory_order(x)
    order = channel_order(memory, axis, x.dim())
    y = normalize(channel_view(x, axis, order), mean, var, gamma, beta, epsilon)
    return from_channel_view(y, x.shape, order, memory)


# ------------------------------------------------------------------------------ batch statistics


class Statistics(NamedTuple):
    """Batch statistics of a channel view, per channel, in ``compute_dtype(view.dtype)``.

    ``mean`` and ``var`` (biased) are ``(C,)``; ``count`` is the number of elements each channel
    was taken over: an ``int`` where the host knows it for free (CPU, no mask or a mask read on
    CPU), else a 0-dim tensor (no synchronization), or a ``(C,)`` one where the mask differs
    between channels (ghost batches). ``valid`` tells the channels whose statistics
    may update the moving ones (finite, with ``count > 0``, SPEC section 5): ``True`` for every
    channel where the host knows it, else a bool tensor.
    """

    mean: Tensor
    var: Tensor
    count: Tensor | int
    valid: Tensor | bool


def batch_statistics(view: Tensor, mask: Tensor | None = None) -> Statistics:
    """The batch statistics of ``view``'s channels, over the positions where ``mask`` is True.

    With ``I`` the masked-in positions (every position without a mask) and ``count = |I|``::

        mean = sum_I(x) / count        var = sum_I((x - mean)**2) / count

    ``view`` is a channel view (``(M, C)`` or ``(A, C, B)``, any dtype, possibly empty) and
    ``mask`` ``None`` or a boolean tensor shaped like it, with ``C`` replaced by 1
    (:func:`mask_view`) unless the mask differs between channels (:func:`ghost_batches`). Values
    outside ``I`` never enter the statistics, not even a NaN. With no element (``count == 0``)
    ``mean``/``var`` are zeros and no channel is valid.

    Stable for any offset (never ``E[x**2] - E[x]**2`` unchecked): PyTorch's native kernels,
    checked on CPU, with stable fallbacks (``_kernels``); under ``torch.compile``, ``var_mean``
    or the masked two-pass sums accumulated in float64. The statistics carry no gradient, except
    under ``torch.func`` transforms (``vmap``, ``grad``), where plain differentiable operations
    compute them and :func:`normalize_by_batch` differentiates through them.
    """
    if _transforms_active():
        return _differentiable_statistics(view, mask)
    view = view.detach()
    if mask is not None and view.numel() > 0:
        return Statistics(*_kernels.masked_statistics(view, mask))
    if view.numel() == 0:
        zeros = view.new_zeros(view.shape[1], dtype=compute_dtype(view.dtype))
        return Statistics(zeros, zeros, 0, False)
    count = view.numel() // view.shape[1]
    if torch.compiler.is_compiling():
        # Inductor's float32 reductions accumulate sequentially and lose the mean of
        # large-offset data: float64 inside the fused reduction (no float64 copy is made).
        mean, var = _kernels.moments(view, torch.float64)
        return Statistics(mean, var, count, valid_statistics(mean, var))
    mean, var, valid = _kernels.statistics(view)
    return Statistics(mean, var, count, valid)


def _transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) runs this call.

    Its batched tensors take no host reads, no in-place writes into unbatched tensors, and an
    ``autograd.Function`` needs a ``setup_context``: plain tensor operations run instead.
    """
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _differentiable_statistics(view: Tensor, mask: Tensor | None) -> Statistics:
    """:func:`batch_statistics` in plain differentiable operations (for ``torch.func`` transforms)."""
    x = view.to(compute_dtype(view.dtype))
    if mask is None:
        var, mean = torch.var_mean(x, _kernels.reduced_dims(x), correction=0)
        return Statistics(mean, var, view.numel() // view.shape[1], valid_statistics(mean, var))
    count = _kernels.masked_count(mask, x.dtype)
    mean, var = _kernels.masked_moments(x, mask, count, x.dtype)
    return Statistics(mean, var, count, valid_statistics(mean, var, count))


def fill_empty(statistics: Statistics, mean: Tensor, var: Tensor) -> Statistics:
    """``statistics`` (with a tensor ``count``) with ``mean``/``var`` in place of the statistics of
    the channels that have no element: a ``where`` on the device, no synchronization."""
    has_elements = statistics.count > 0
    filled = _saved_for_backward(
        torch.where(has_elements, statistics.mean, mean), torch.where(has_elements, statistics.var, var)
    )
    return statistics._replace(mean=filled[0], var=filled[1])


def _saved_for_backward(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors``, which the backward reads and which come from buffers that the call updates in place.

    Under ``torch.compile`` (torch 2.13), AOTAutograd may recompute such a value in the backward
    from the buffer instead of saving it, and then reads the *updated* buffer: silently wrong
    gradients (pytorch/pytorch#197039). It never recomputes a ``cat``: made by one, the values
    are saved. Eager autograd saves them anyway.
    """
    if not torch.compiler.is_compiling():
        return tensors
    return torch.cat(tensors).split([t.numel() for t in tensors])


def mean_over_ghosts(statistics: Statistics, ghosts: int) -> Statistics:
    """The statistics that update the moving ones after a call in ghost batches (as tf-keras).

    ``statistics`` are those of the channel view of :func:`ghost_batches` (``ghosts * C``
    channels, ghost-major). Per channel: the mean over the ghost batches of their means and of
    their (biased) variances, one update per call. Deliberately beyond tf-keras: ghost batches
    without an element (all masked out) are left out of both means; a channel is valid when
    some ghost batch has elements and every one that has them is valid.
    """
    mean, var = statistics.mean.view(ghosts, -1), statistics.var.view(ghosts, -1)
    count, valid = statistics.count, statistics.valid
    if isinstance(valid, Tensor):
        valid = valid.view(ghosts, -1)
    if not isinstance(count, Tensor):  # every ghost batch has `count` elements
        return Statistics(mean.mean(0), var.mean(0), count * ghosts, valid if valid is True else valid.all(0))
    has_elements = (count > 0).expand(statistics.mean.shape).view(ghosts, -1)
    shares = has_elements.to(mean.dtype) / has_elements.sum(0).clamp(min=1)
    valid = (valid | ~has_elements).all(0) & has_elements.any(0)
    totals = count.expand(statistics.mean.shape).view(ghosts, -1).sum(0)
    # Empty ghost batches have zero statistics: weighing nothing, they add nothing.
    return Statistics((shares * mean).sum(0), (shares * var).sum(0), totals, valid)


# -------------------------------------------------------------------------- training normalization


def normalize_by_batch(
    view: Tensor,
    statistics: Statistics,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: float,
    mask: Tensor | None = None,
    all_reduce: Callable[[Tensor], object] | None = None,
) -> Tensor:
    """Training normalization: :func:`normalize` with batch statistics, differentiated through them.

    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` with ``statistics``' mean and var,
    which :func:`batch_statistics` computed from ``view`` over ``mask`` (the same mask here). The
    gradient is the full batch-norm gradient: through the statistics to every element of ``I``
    (see :func:`_statistics_backward`). Where ``statistics.count`` is 0 the caller put other
    constants (the moving statistics) in their place, and the gradient through them vanishes.

    ``all_reduce`` (in place, on a packed float tensor) sums the backward's two per-channel sums
    over a process group, for statistics that a group took together: the input gradient is then
    the whole group's; ``dgamma``/``dbeta`` stay this process's share.
    """
    if _transforms_active():
        x = view.to(statistics.mean.dtype)
        scale = torch.rsqrt(statistics.var + epsilon)
        if gamma is not None:
            scale = scale * gamma
        y = (x - per_channel(statistics.mean, x)) * per_channel(scale, x)
        return (y if beta is None else y + per_channel(beta, x)).to(view.dtype)
    if not _needs_grad(view, gamma, beta):
        return normalize(view, statistics.mean, statistics.var, gamma, beta, epsilon)
    mean, var, count, _ = statistics
    return _NormalizeByBatch.apply(view, gamma, beta, mean, var, count, epsilon, mask, all_reduce)


def _needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will want gradients of any of ``tensors`` (else a Function is overhead)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _NormalizeByBatch(torch.autograd.Function):
    """:func:`normalize` forward; the backward of a normalization by batch statistics.

    Without a mask or a group, PyTorch's native training backward, given these statistics, in
    ``_kernels.kernel_layout`` (one kernel). Otherwise :func:`_statistics_backward`.
    """

    @staticmethod
    def forward(ctx, view, gamma, beta, mean, var, count, epsilon: float, mask, all_reduce):
        counted = isinstance(count, Tensor)  # a tensor is saved; a number the host knows is kept on ctx
        ctx.save_for_backward(view, gamma, mean, var, mask, count if counted else None)
        ctx.count, ctx.epsilon, ctx.all_reduce = None if counted else count, epsilon, all_reduce
        return normalize(view, mean, var, gamma, beta, epsilon)

    @staticmethod
    def backward(ctx, grad_y):
        view, gamma, mean, var, mask, count = ctx.saved_tensors
        if mask is not None or ctx.all_reduce is not None:
            return _masked_or_group_backward(ctx, grad_y)
        # Differentiable again (gradient penalties): autograd knows this kernel's derivative.
        invstd = torch.rsqrt(var + ctx.epsilon)
        grad_y, x = _kernels.kernel_layout(grad_y.reshape(view.shape).contiguous(), view)  # one layout for both
        grad_x, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, gamma, None, None, mean, invstd, True, ctx.epsilon, list(ctx.needs_input_grad[:3])
        )
        grad_x = None if grad_x is None else _kernels.from_kernel_layout(grad_x, view)
        return grad_x, grad_gamma, grad_beta, None, None, None, None, None, None


@once_differentiable  # its formulas take the statistics as constants: no second derivative
def _masked_or_group_backward(ctx, grad_y):
    view, gamma, mean, var, mask, count = ctx.saved_tensors
    grads = _statistics_backward(
        grad_y.reshape(view.shape),
        view,
        mask,
        gamma,
        mean,
        var,
        ctx.count if count is None else count,
        ctx.epsilon,
        ctx.needs_input_grad[:3],
        ctx.all_reduce,
    )
    return *grads, None, None, None, None, None, None


def _gradient_sums(
    grad_y: Tensor, view: Tensor, gamma, mean: Tensor, var: Tensor, epsilon: float
) -> tuple[Tensor, Tensor]:
    """``(sum(dy * xhat), sum(dy))`` per channel, from PyTorch's native inference backward."""
    if view.numel() == 0:  # the native kernel does not accept an empty input
        return torch.zeros_like(mean), torch.zeros_like(mean)
    grad_y, x = _kernels.kernel_layout(grad_y, view)
    _, dot, grad_beta = torch.ops.aten.native_batch_norm_backward(
        grad_y, x, gamma, mean, var, None, None, False, epsilon, [False, True, True]
    )
    return dot, grad_beta


def _statistics_backward(grad_y, view, mask, gamma, mean, var, count, epsilon: float, wanted, all_reduce):
    """``(dx, dgamma, dbeta)`` of a normalization by (masked) batch statistics over ``count`` elements.

    With ``w`` the 0/1 mask (1 without one), ``xhat = (x - mean) * invstd`` and sums over every
    element of a channel (all are normalized, so all depend on the statistics)::

        dbeta  = sum(dy)                  dgamma = sum(dy * xhat)
        dx     = gamma * invstd * (dy - w * (dbeta + xhat * dgamma) / count)

    PyTorch's native inference backward gives both sums in one pass; ``all_reduce`` makes them
    the group's. The subtracted term, affine in ``xhat`` per channel, takes two more passes and
    the gradient as its one temporary, or one pass where the mean is small against the spread
    (``_kernels.TRUSTED_RATIO_FOLDED_TERM``, checked on eager CPU). Where ``count == 0`` the term vanishes.
    """
    dot, grad_beta = _gradient_sums(grad_y, view, gamma, mean, var, epsilon)
    if mask is not None and not (_kernels.eager_cpu(view) and math.isfinite(dot.sum().item())):
        # 0 * NaN is NaN: a masked-out position that the loss does not read (dy = 0) must reach
        # no sum, whatever it holds, so it is read as the mean (xhat = 0). Checked on CPU, where
        # reading the sums is free; always done elsewhere.
        view = torch.where(mask | (grad_y != 0), view, per_channel(mean, view))
        dot, grad_beta = _gradient_sums(grad_y, view, gamma, mean, var, epsilon)
    grad_x = None
    if wanted[0]:
        sum_dy, sum_dy_xhat = grad_beta, dot
        if all_reduce is not None:
            sums = torch.cat([grad_beta, dot]).to(mean.dtype)
            all_reduce(sums)
            sum_dy, sum_dy_xhat = sums.chunk(2)
        invstd = torch.rsqrt(var + epsilon)
        scale = invstd if gamma is None else gamma * invstd
        # dx = scale * dy + w * (constant + (x - mean) * slope) per channel, with
        # constant = factor * sum_dy, slope = factor * invstd * sum_dy_xhat, factor = -scale / count.
        factor = torch.where(count > 0, scale / -count, 0.0) if isinstance(count, Tensor) else scale * (-1.0 / count)
        constant = factor * sum_dy
        slope = factor * invstd * sum_dy_xhat
        if _kernels.eager_cpu(view) and _kernels.finite_and_accurate(mean, var, _kernels.TRUSTED_RATIO_FOLDED_TERM):
            # x * slope + (constant - mean * slope): one pass, a few ulps of the term lost at most.
            offset = torch.addcmul(constant, mean, slope, value=-1)
            grad_x = torch.addcmul(per_channel(offset, view), view, per_channel(slope, view))
        else:
            # From x - mean: folded, the term cancels catastrophically when the mean is far from
            # 0 against invstd (a large offset, or a variance far below epsilon).
            grad_x = view - per_channel(mean, view)
            torch.addcmul(per_channel(constant, view), grad_x, per_channel(slope, view), out=grad_x)
        if mask is not None:
            grad_x.mul_(mask)
        grad_x = grad_x.addcmul_(grad_y, per_channel(scale, view))
        if grad_x.dtype != view.dtype:
            grad_x = grad_x.to(view.dtype)
    grad_gamma = dot if gamma is not None and wanted[1] else None
    return grad_x, grad_gamma, grad_beta if wanted[2] else None


# ----------------------------------------------------------------------------------- updates


def renorm_correction(
    statistics: Statistics,
    renorm_mean: Tensor,
    renorm_stddev: Tensor,
    epsilon: float,
    clipping: dict[str, float | None],
) -> tuple[Tensor, Tensor]:
    """Batch renormalization's ``r`` and ``d`` (Ioffe, 2017), as Keras 3.15 computes them.

    From the batch statistics and the renorm statistics before this call's update::

        s = sqrt(var + epsilon)         sd = max(renorm_stddev, sqrt(epsilon))
        r = clip(s / sd, rmin, rmax)    d = clip((mean - renorm_mean) / sd, -dmax, dmax)

    A bound absent from ``clipping``, or ``None``, clips nothing. Constants for the gradients.
    """
    mean, var = _constant(statistics.mean), _constant(statistics.var)
    safe_stddev = renorm_stddev.to(mean.dtype).clamp(min=math.sqrt(epsilon))
    r = torch.sqrt(var + epsilon) / safe_stddev
    d = (mean - renorm_mean.to(mean.dtype)) / safe_stddev
    rmin, rmax, dmax = (clipping.get(key) for key in ("rmin", "rmax", "dmax"))
    if rmin is not None or rmax is not None:
        r = r.clamp(rmin, rmax)
    if dmax is not None:
        d = d.clamp(-dmax, dmax)
    return r, d


def renorm_affine(
    r: Tensor, d: Tensor, gamma: Tensor | None, beta: Tensor | None, valid: Tensor | bool
) -> tuple[Tensor, Tensor]:
    """The scale and offset that batch renormalization puts in place of ``gamma`` and ``beta``.

    Normalizing with ``(r * gamma, d * gamma + beta)`` gives ``((x - mean) / s * r + d) * gamma
    + beta`` (``gamma``/``beta`` absent: 1/0), as Keras composes them. A channel that is not
    ``valid`` (no element: the caller normalizes it with the moving statistics, as in inference)
    takes ``r = 1``, ``d = 0``.
    """
    if valid is not True:
        r, d = torch.where(valid, r, 1.0), torch.where(valid, d, 0.0)
    r, d = _saved_for_backward(r, d)
    if gamma is None:
        return r, (d if beta is None else d + beta)
    return r * gamma, (d * gamma if beta is None else torch.addcmul(beta, d, gamma))


def update_moving_statistics(
    moving_mean: Tensor, moving_variance: Tensor, statistics: Statistics, momentum: float
) -> None:
    """Keras's moving-average update, in place, only for the channels of ``statistics.valid``.

    ``moving = moving * momentum + batch * (1 - momentum)``, computed as
    ``moving + (1 - momentum) * (batch - moving)`` (one fused ``lerp``) in the wider of the
    buffer's and the statistics' dtypes and stored in the buffer's; a channel whose new value
    overflows the buffer's dtype keeps its old one. The decision stays on the device (no host
    synchronization); no gradient flows (the statistics are detached where they carry one).
    """
    _move_toward(moving_mean, statistics.mean, statistics.valid, 1.0 - momentum)
    _move_toward(moving_variance, statistics.var, statistics.valid, 1.0 - momentum)


def update_renorm_statistics(
    moving_mean: Tensor,
    moving_variance: Tensor,
    moving_stddev: Tensor,
    renorm_mean: Tensor,
    renorm_stddev: Tensor,
    statistics: Statistics,
    momentum: float,
    renorm_momentum: float,
    epsilon: float,
) -> None:
    """Batch renormalization's five updates (Keras 3.15), in place, only for ``statistics.valid``.

    With ``s = sqrt(var + epsilon)``: ``renorm_mean``/``renorm_stddev`` move toward ``mean``/``s``
    with ``renorm_momentum``, ``moving_mean``/``moving_stddev`` with ``momentum`` (each as in
    :func:`update_moving_statistics`), then ``moving_variance = relu(moving_stddev**2 - epsilon)``.
    """
    valid = statistics.valid
    mean = _constant(statistics.mean)
    batch_stddev = torch.sqrt(_constant(statistics.var) + epsilon)
    _move_toward(renorm_mean, mean, valid, 1.0 - renorm_momentum)
    _move_toward(renorm_stddev, batch_stddev, valid, 1.0 - renorm_momentum)
    _move_toward(moving_mean, mean, valid, 1.0 - momentum)
    _move_toward(moving_stddev, batch_stddev, valid, 1.0 - momentum)
    # From the stored value (Keras takes it before storing: the same in float32 buffers, an ulp
    # apart in 16-bit ones); relu: rounding may take the square below epsilon (Keras's comment).
    stored = moving_stddev.to(torch.promote_types(moving_stddev.dtype, mean.dtype))
    assign(moving_variance, (stored * stored - epsilon).relu_(), valid)


def _move_toward(moving: Tensor, batch: Tensor, valid: Tensor | bool, weight: float) -> None:
    """``moving += weight * (batch - moving)`` in place, for the ``valid`` channels (module docstring)."""
    batch = _constant(batch)
    # An invalid channel blends with itself, which leaves it exactly as it was.
    target = batch if valid is True else torch.where(valid, batch, moving)
    if target.dtype == moving.dtype:
        moving.lerp_(target, weight)
    else:  # blend in the wider dtype, store in the buffer's
        wide = torch.promote_types(moving.dtype, target.dtype)
        assign(moving, moving.to(wide, copy=True).lerp_(target.to(wide), weight), True)


def _constant(t: Tensor) -> Tensor:
    """``t`` without its autograd history, where it has one (under ``torch.func`` transforms)."""
    return t.detach() if t.requires_grad else t


def assign(moving: Tensor, value: Tensor, valid: Tensor | bool) -> None:
    """``moving = value`` in place for the ``valid`` channels whose value is finite in ``moving``'s dtype.

    A value beyond the buffer's range (a float16 buffer and a variance above 65504) would be
    stored as inf: that channel keeps its value (SPEC section 5). Unlike a moving average at
    momentum 0, this also replaces a non-finite value (recalibration repairs poisoned statistics).
    """
    if value.dtype != moving.dtype:
        value = value.to(moving.dtype)
        valid = value.isfinite() if valid is True else valid & value.isfinite()
    moving.copy_(value if valid is True else torch.where(valid, value, moving))
