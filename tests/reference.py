"""A float64 reference of the SPEC formulas, written as plainly as possible, for comparisons.

Deliberately independent of batchnorm's implementation: plain autograd-able tensor arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _broadcast_shape(x: Tensor, axis: int) -> list[int]:
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return shape


def batch_moments(x: Tensor, axis: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, count) per channel in float64; ``mask`` has ``x``'s shape without ``axis``.

    Masked-out values never enter the statistics (not even a NaN), as Keras's ``where(mask, x, 0)``.
    """
    axis = axis % x.dim()
    x = x.double()
    inside = torch.ones_like(x, dtype=torch.bool) if mask is None else (mask != 0).unsqueeze(axis).expand_as(x)
    dims = [d for d in range(x.dim()) if d != axis]
    count = inside.double().sum(dims) if dims else inside.double()
    mean = torch.where(inside, x, 0).sum(dims) / count if dims else x.clone()
    centred = torch.where(inside, x - mean.reshape(_broadcast_shape(x, axis)), 0)
    var = (centred**2).sum(dims) / count if dims else torch.zeros_like(x)
    return mean, var, count


def normalize(
    x: Tensor, axis: int, mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, epsilon: float
) -> Tensor:
    """``gamma * (x - mean) / sqrt(var + epsilon) + beta`` in float64, per channel along ``axis``."""
    axis = axis % x.dim()
    shape = _broadcast_shape(x, axis)
    y = (x.double() - mean.double().reshape(shape)) / torch.sqrt(var.double().reshape(shape) + epsilon)
    if gamma is not None:
        y = y * gamma.double().reshape(shape)
    if beta is not None:
        y = y + beta.double().reshape(shape)
    return y


def training_step(x, axis, gamma, beta, moving_mean, moving_var, momentum, epsilon, mask=None):
    """One SPEC training call: returns (y, new_moving_mean, new_moving_var), all float64.

    Implements SPEC section 5: no element -> moving statistics used and kept; non-finite channel
    statistics -> that channel's moving statistics kept (the output still uses the batch ones).
    """
    mean, var, count = batch_moments(x, axis, mask)
    moving_mean, moving_var = moving_mean.double(), moving_var.double()
    if x.numel() == 0 or bool((count == 0).all()):
        return normalize(x, axis, moving_mean, moving_var, gamma, beta, epsilon), moving_mean, moving_var
    y = normalize(x, axis, mean, var, gamma, beta, epsilon)
    finite = mean.isfinite() & var.isfinite()
    new_mean = torch.where(finite, moving_mean * momentum + mean * (1 - momentum), moving_mean)
    new_var = torch.where(finite, moving_var * momentum + var * (1 - momentum), moving_var)
    return y, new_mean, new_var
