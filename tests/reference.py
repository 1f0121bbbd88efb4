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


# ------------------------------------------------ SPEC 10-12: renorm, ghost batches, several axes
#
# One function, ``mode_training_step``, written as a loop over ghost batches with plain float64
# arithmetic. Shapes: ``axes`` are the channel axes (an int or a list, negative allowed); every
# per-channel tensor (gamma, beta, the buffers, the returned statistics) has the *parameter shape*
# ``tuple(x.shape[a] for a in sorted(axes))``. Internally statistics keep x's rank ("keepdim").


def channel_axes(rank: int, axis) -> list[int]:
    """``axis`` (an int or a list/tuple of ints) as the sorted non-negative channel axes."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % rank for a in axes)


def parameter_shape(shape, axis) -> tuple[int, ...]:
    return tuple(shape[a] for a in channel_axes(len(shape), axis))


def _keepdim_shape(shape, axes: list[int]) -> list[int]:
    return [size if d in axes else 1 for d, size in enumerate(shape)]


def full_mask(x: Tensor, axes: list[int], mask: Tensor | None) -> Tensor:
    """The mask (x's shape without the channel axes, sizes 1 broadcast; non-zero = True) as a bool
    tensor of x's own shape."""
    if mask is None:
        return torch.ones(x.shape, dtype=torch.bool)
    inside = mask != 0
    for a in axes:  # ascending: each insertion puts a channel axis where it is in x
        inside = inside.unsqueeze(a)
    return inside.expand(x.shape)


def keepdim_moments(x: Tensor, axes: list[int], inside: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, count) over every axis but ``axes``, over the True positions of ``inside``,
    each of shape ``_keepdim_shape(x.shape, axes)``. No element: count 0 and mean/var NaN."""
    # A leading size-1 dimension, always reduced, so that the list of reduced dims is never empty
    # (torch's sum(dim=[]) would reduce everything).
    x, inside = x.double().unsqueeze(0), inside.unsqueeze(0)
    dims = [0] + [d + 1 for d in range(x.dim() - 1) if d not in axes]
    count = inside.double().sum(dims, keepdim=True)
    mean = torch.where(inside, x, 0).sum(dims, keepdim=True) / count
    var = (torch.where(inside, x - mean, 0) ** 2).sum(dims, keepdim=True) / count
    return mean.squeeze(0), var.squeeze(0), count.squeeze(0)


def ghost_batches(batch: int, virtual_batch_size: int | None) -> list[Tensor]:
    """The sample indices of each ghost batch, as tf-keras: x viewed as (v, B/v, ...), ghost j holds
    samples j, j + B/v, j + 2B/v, ... (strided). No ghosts: one group, the whole batch."""
    if virtual_batch_size is None or batch == 0:
        return [torch.arange(batch)]
    ghosts = batch // virtual_batch_size
    assert ghosts * virtual_batch_size == batch, "the reference needs v to divide B"
    return [torch.arange(j, batch, ghosts) for j in range(ghosts)]


def renorm_correction(mean, var, renorm_mean, renorm_stddev, epsilon, clipping):
    """Keras's r and d (pre-update renorm statistics, clipped), as constants."""
    stddev = torch.sqrt(var + epsilon)
    safe = torch.clamp(renorm_stddev, min=epsilon**0.5)  # max(renorm_stddev, sqrt(epsilon))
    r = stddev / safe
    d = (mean - renorm_mean) / safe
    clipping = clipping or {}
    if clipping.get("rmin") is not None:
        r = torch.clamp(r, min=clipping["rmin"])
    if clipping.get("rmax") is not None:
        r = torch.clamp(r, max=clipping["rmax"])
    if clipping.get("dmax") is not None:
        d = torch.clamp(d, -clipping["dmax"], clipping["dmax"])
    return r.detach(), d.detach()


def updated_buffers(buffers, mean, var, momentum, epsilon, renorm_momentum=None):
    """The new buffers after one update toward (mean, var): Keras's five renorm updates when
    ``buffers`` holds the renorm ones, else the two plain ones. No masking of channels here."""
    new = {
        "moving_mean": buffers["moving_mean"] * momentum + mean * (1 - momentum),
        "moving_variance": buffers["moving_variance"] * momentum + var * (1 - momentum),
    }
    if "moving_stddev" in buffers:
        stddev = torch.sqrt(var + epsilon)
        new["renorm_mean"] = buffers["renorm_mean"] * renorm_momentum + mean * (1 - renorm_momentum)
        new["renorm_stddev"] = buffers["renorm_stddev"] * renorm_momentum + stddev * (1 - renorm_momentum)
        new["moving_stddev"] = buffers["moving_stddev"] * momentum + stddev * (1 - momentum)
        new["moving_variance"] = torch.relu(new["moving_stddev"] ** 2 - epsilon)
    return new


def mode_training_step(
    x: Tensor,
    axis,
    gamma: Tensor | None,
    beta: Tensor | None,
    buffers: dict[str, Tensor],
    *,
    momentum: float,
    epsilon: float,
    mask: Tensor | None = None,
    renorm: bool = False,
    renorm_momentum: float = 0.99,
    renorm_clipping: dict | None = None,
    virtual_batch_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One SPEC training call with renorm / ghost batches / several axes: (y, new buffers), float64.

    ``buffers``: moving_mean and moving_variance, plus moving_stddev, renorm_mean and renorm_stddev
    when ``renorm``. Rules (SPEC 5, 10, 11, 12):

    * each ghost batch (the whole batch without ghosts) is normalized with its own statistics over
      its masked-in elements; with renorm, ``((x - mean_g) / sqrt(var_g + eps) * r + d) * gamma + beta``;
    * a ghost with no element (empty, or all masked out) is normalized with the moving statistics
      (the inference formula, no r/d: there are no batch statistics to correct);
    * one update per call toward the mean over ghosts *that have elements* of the ghost means and of
      the ghost variances; with renorm, r and d come from those averaged statistics too (tf-keras);
    * a channel with no element in the call, or whose averaged mean or variance is not finite,
      keeps every buffer (all five with renorm).
    """
    axes = channel_axes(x.dim(), axis)
    pshape = parameter_shape(x.shape, axis)
    kshape = _keepdim_shape(x.shape, axes)
    x = x.double()
    inside = full_mask(x, axes, mask)
    old = {name: buffer.detach().double().reshape(kshape) for name, buffer in buffers.items()}
    gamma_k = None if gamma is None else gamma.double().reshape(kshape)
    beta_k = None if beta is None else beta.double().reshape(kshape)

    ghosts = []
    for index in ghost_batches(x.shape[0], virtual_batch_size):
        mean, var, count = keepdim_moments(x[index], axes, inside[index])
        ghosts.append((index, mean, var, count > 0))

    # The statistics the buffers move toward: the mean over the ghosts that have elements (0 where
    # none has: those channels keep their buffers, and a finite stand-in keeps NaN out of gradients).
    having = sum(has.double() for _, _, _, has in ghosts)
    mean_avg = sum(torch.where(has, mean, 0) for _, mean, _, has in ghosts) / having.clamp(min=1)
    var_avg = sum(torch.where(has, var, 0) for _, _, var, has in ghosts) / having.clamp(min=1)
    if renorm:
        r, d = renorm_correction(mean_avg, var_avg, old["renorm_mean"], old["renorm_stddev"], epsilon, renorm_clipping)

    y = torch.zeros(x.shape, dtype=torch.float64)
    for index, mean, var, has in ghosts:
        # A ghost with no element: the moving statistics, and no r/d.
        mean = torch.where(has, mean, old["moving_mean"])
        var = torch.where(has, var, old["moving_variance"])
        x_hat = (x[index] - mean) / torch.sqrt(var + epsilon)
        if renorm:
            x_hat = torch.where(has, x_hat * r + d, x_hat)
        if gamma_k is not None:
            x_hat = x_hat * gamma_k
        if beta_k is not None:
            x_hat = x_hat + beta_k
        y[index] = x_hat

    new = updated_buffers(old, mean_avg, var_avg, momentum, epsilon, renorm_momentum)
    moves = (having > 0) & mean_avg.isfinite() & var_avg.isfinite()
    new = {name: torch.where(moves, value, old[name]).reshape(pshape) for name, value in new.items()}
    return y, new


def inference(x: Tensor, axis, gamma, beta, moving_mean, moving_variance, epsilon: float) -> Tensor:
    """The inference formula for any channel axes (parameter-shaped weights), float64."""
    kshape = _keepdim_shape(x.shape, channel_axes(x.dim(), axis))
    y = (x.double() - moving_mean.double().reshape(kshape)) / torch.sqrt(
        moving_variance.double().reshape(kshape) + epsilon
    )
    if gamma is not None:
        y = y * gamma.double().reshape(kshape)
    if beta is not None:
        y = y + beta.double().reshape(kshape)
    return y
