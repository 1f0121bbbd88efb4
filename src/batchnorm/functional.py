"""Pure tensor functions of batch normalization: views, statistics, normalization, updates.

Everything here works on a *channel view* of the input: a view in which the normalized axis is
dimension 1, so that PyTorch's native batch-norm kernels apply without moving data:

* channels last (``axis == rank - 1``): ``(M, C)``, with ``M`` the product of the other sizes;
* any other axis: ``(A, C, B)``, with ``A``/``B`` the products of the sizes before/after it.

For a contiguous input both are views (no copy). The statistics of channel ``c`` are taken over
every element of the view with index ``c`` on dimension 1, i.e. over every axis but ``axis``.

All statistics are computed in the *compute dtype*, ``promote_types(x.dtype, float32)``: 16-bit
inputs are normalized with float32 statistics and weights (PyTorch's mixed-dtype kernels), float64
inputs in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "channel_view",
    "compute_dtype",
    "check_mask",
    "mask_view",
    "normalize",
    "batch_norm_training",
    "masked_batch_norm_training",
    "update_moving_statistics",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: at least float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def channel_view(x: Tensor, axis: int) -> Tensor:
    """Reshape ``x`` so that ``axis`` (non-negative) becomes dimension 1: ``(M, C)`` or ``(A, C, B)``.

    A view whenever ``x``'s strides allow one (always for a contiguous ``x``); a copy otherwise.
    """
    shape = x.shape
    channels = shape[axis]
    if axis == x.dim() - 1:
        return x.reshape(math.prod(shape[:axis]), channels)
    return x.reshape(math.prod(shape[:axis]), channels, math.prod(shape[axis + 1 :]))


def _per_channel(v: Tensor, view: Tensor) -> Tensor:
    """Shape a ``(C,)`` vector to broadcast against a channel view."""
    return v if view.dim() == 2 else v[:, None]


def _reduced_dims(view: Tensor) -> tuple[int, ...]:
    return (0,) if view.dim() == 2 else (0, 2)


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


def mask_view(mask: Tensor, shape: torch.Size, axis: int) -> Tensor:
    """The mask as booleans shaped like the channel view of ``shape`` with ``C`` replaced by 1.

    Non-zero mask values count as True (as Keras 3.15, which casts the mask to bool).
    """
    full = list(shape)
    full[axis] = 1
    return channel_view((mask != 0).unsqueeze(axis).expand(full), axis)


def normalize(
    view: Tensor, mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, epsilon: float
) -> Tensor:
    """Inference normalization ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``.

    ``mean``/``var`` are constants (no gradient flows into them); gradients flow to ``view``,
    ``gamma`` and ``beta``. All ``(C,)`` tensors must be in ``compute_dtype(view.dtype)``.
    """
    # PyTorch's inference kernel: one pass over x for any layout, mixed 16-bit/float32 included;
    # with training=False it only reads mean/var.
    return torch.batch_norm(
        view, gamma, beta, mean, var, False, 0.0, epsilon, torch.backends.cudnn.enabled
    )


class _BatchNormTraining(torch.autograd.Function):
    """Batch normalization with batch statistics: stable moments, native kernels both ways.

    Forward: biased mean and variance by Welford's algorithm (``torch.var_mean``), never by
    ``E[x^2] - E[x]^2`` (PyTorch's CPU channels-last training kernel uses the latter and loses
    every digit when ``|mean| >> std``), then the native inference kernel with those statistics.
    Backward: PyTorch's own training backward, given the same statistics.
    """

    @staticmethod
    def forward(ctx, view: Tensor, gamma, beta, epsilon: float):
        stats_dtype = compute_dtype(view.dtype)
        stats_input = view if view.dtype == stats_dtype else view.to(stats_dtype)
        var, mean = torch.var_mean(stats_input, dim=_reduced_dims(view), correction=0)
        y = normalize(view, mean, var, gamma, beta, epsilon)
        invstd = torch.rsqrt(var + epsilon)
        ctx.save_for_backward(view, gamma, mean, invstd)
        ctx.epsilon = epsilon
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean, _grad_var):
        view, gamma, mean, invstd = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_x, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_y.reshape(view.shape), view, gamma, None, None, mean, invstd, True, ctx.epsilon, wanted
        )
        return grad_x, grad_gamma, grad_beta, None


def batch_norm_training(
    view: Tensor, gamma: Tensor | None, beta: Tensor | None, epsilon: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize with the batch's own statistics; return ``(y, mean, var)``.

    ``mean = mean_R(x)``, ``var = mean_R((x - mean)**2)`` (biased) and
    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``, with the full batch-norm gradient
    (through the statistics) to ``view``, ``gamma`` and ``beta``. ``mean``/``var`` carry no gradient.
    """
    return _BatchNormTraining.apply(view, gamma, beta, epsilon)


def masked_batch_norm_training(
    view: Tensor,
    inside: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    fallback_mean: Tensor,
    fallback_var: Tensor,
    epsilon: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize with the statistics of the masked-in elements; return ``(y, mean, var, count)``.

    With ``inside`` the boolean mask view (broadcast over channels) and ``I`` the positions where
    it is True: ``count = |I|``, ``mean = sum_I(x) / count``, ``var = sum_I((x - mean)**2) / count``,
    and every element (masked-out ones included) is normalized with them. Values outside ``I``
    never enter the statistics, not even a NaN. Where ``count == 0`` there are no statistics:
    ``fallback_mean``/``fallback_var`` (the moving statistics) are used instead, and the returned
    ``mean``/``var`` are the unusable zeros of an empty sum. Gradients flow through the statistics
    to ``view``, ``gamma`` and ``beta``.
    """
    dtype = compute_dtype(view.dtype)
    x = view.to(dtype)
    dims = _reduced_dims(view)
    count = inside.sum(dtype=dtype)
    # Dividing by max(count, 1) keeps an empty mask's statistics (and their gradients) finite zeros.
    safe_count = count.clamp(min=1)
    # Corrected two-pass algorithm: the first mean carries the rounding error of a float sum of
    # large values; the mean of the deviations from it corrects both the mean and the variance.
    rough_mean = torch.where(inside, x, 0).sum(dims) / safe_count
    deviation = torch.where(inside, x - _per_channel(rough_mean, view), 0)
    correction = deviation.sum(dims) / safe_count
    mean = rough_mean + correction
    var = (deviation.square().sum(dims) / safe_count - correction.square()).clamp(min=0)
    has_elements = count > 0
    used_mean = torch.where(has_elements, mean, fallback_mean)
    used_var = torch.where(has_elements, var, fallback_var)
    inv = torch.rsqrt(used_var + epsilon)
    if gamma is not None:
        inv = inv * gamma
    y = (x - _per_channel(used_mean, view)) * _per_channel(inv, view)
    if beta is not None:
        y = y + _per_channel(beta, view)
    return y.to(view.dtype), mean.detach(), var.detach(), count


@torch.no_grad()
def update_moving_statistics(
    moving_mean: Tensor,
    moving_variance: Tensor,
    mean: Tensor,
    var: Tensor,
    momentum: float,
    valid: Tensor,
) -> None:
    """Keras's moving-average update, in place, only for the channels where ``valid`` is True.

    ``moving = moving * momentum + batch * (1 - momentum)``, computed in the wider of the buffer's
    and the statistics' dtypes and stored in the buffer's. ``valid`` is a bool tensor (``(C,)`` or a scalar) so that the
    decision stays on the device: no host synchronization.
    """
    for moving, batch in ((moving_mean, mean), (moving_variance, var)):
        # In the wider of the two dtypes: a float64 buffer is not rounded through float32.
        dtype = torch.promote_types(moving.dtype, batch.dtype)
        old, batch = moving.to(dtype), batch.to(dtype)
        moving.copy_(torch.where(valid, old * momentum + batch * (1.0 - momentum), old))
