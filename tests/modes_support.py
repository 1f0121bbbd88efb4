"""Helpers shared by the tests of SPEC 10-12 (renorm, ghost batches, several channel axes).

A layer with every weight and buffer at a random, non-default value; the float64 reference of one
training call of that layer (``reference.mode_training_step``, with autograd for the gradients);
and a comparison with a norm-wise floor.
"""

from __future__ import annotations

import torch
from reference import mode_training_step, parameter_shape

from batchnorm import BatchNormalization

PLAIN_BUFFERS = ("moving_mean", "moving_variance")
RENORM_BUFFERS = ("moving_stddev", "renorm_mean", "renorm_stddev")
# The float32 tolerance of the existing reference tests (reductions: a few hundred ulps).
UNIT = {
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float32: 1e-4,
    torch.float64: 1e-10,
}


def buffer_names(bn: BatchNormalization) -> tuple[str, ...]:
    return PLAIN_BUFFERS + (RENORM_BUFFERS if bn.get_config().get("renorm") else ())


def make_layer(shape, axis, *, seed=0, **kwargs) -> BatchNormalization:
    """A built layer whose gamma, beta and buffers are random (none at its default)."""
    kwargs.setdefault("momentum", 0.8)
    if kwargs.get("renorm"):
        kwargs.setdefault("renorm_momentum", 0.6)
    bn = BatchNormalization(axis=axis, **kwargs)
    bn.build(shape)
    pshape = parameter_shape(shape, axis)
    g = torch.Generator().manual_seed(1000 + seed)
    values = {
        "gamma": torch.where(torch.rand(pshape, generator=g) < 0.3, -1.0, 1.0)
        * (0.5 + 1.5 * torch.rand(pshape, generator=g)),
        "beta": torch.randn(pshape, generator=g),
        "moving_mean": torch.randn(pshape, generator=g),
        "moving_variance": 0.5 + torch.rand(pshape, generator=g),
        "moving_stddev": 0.5 + torch.rand(pshape, generator=g),
        "renorm_mean": torch.randn(pshape, generator=g),
        "renorm_stddev": 0.5 + torch.rand(pshape, generator=g),
    }
    with torch.no_grad():
        for name, value in values.items():
            weight = getattr(bn, name, None)
            if weight is not None:
                weight.copy_(value)
    return bn


def random_input(shape, dtype=torch.float32, *, seed=0, scale=2.0, offset=1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def mask_shape(shape, axis, broadcast=()) -> list[int]:
    """``shape`` without the channel axes; the positions listed in ``broadcast`` become 1."""
    rank = len(shape)
    axes = {a % rank for a in ([axis] if isinstance(axis, int) else axis)}
    dims = [size for d, size in enumerate(shape) if d not in axes]
    return [1 if i in broadcast else size for i, size in enumerate(dims)]


def random_mask(shape, *, seed=0, density=0.6) -> torch.Tensor:
    """A boolean mask with True and False positions (when it has two or more)."""
    g = torch.Generator().manual_seed(500 + seed)
    keep = torch.rand(shape, generator=g) < density
    flat = keep.view(-1)
    if flat.numel():
        flat[0] = True
    if flat.numel() > 1:
        flat[-1] = False
    return keep


def assert_near(got, expected, rtol: float, what: str = "", atol: float = 0.0) -> None:
    """``|got - expected| <= rtol * (|expected| + max|expected|) + atol``: relative, with a norm-wise floor."""
    got, expected = got.detach().double(), expected.detach().double()
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(
        got, expected, rtol=rtol, atol=rtol * max(scale, 1e-3) + atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def reference_call(bn: BatchNormalization, x: torch.Tensor, mask=None, upstream=None):
    """The float64 reference of one training call of ``bn`` on ``x``: (y, buffers, grads).

    Computed from exactly what the layer sees (x and the layer's weights upcast to float64) and the
    layer's configuration as ``get_config`` reports it. ``grads`` = (dx, dgamma, dbeta) of
    ``sum(y * upstream)`` when ``upstream`` is given.
    """
    config = bn.get_config()
    wants_grad = upstream is not None
    x64 = x.detach().double().requires_grad_(wants_grad)
    gamma = None if bn.gamma is None else bn.gamma.detach().double().requires_grad_(wants_grad)
    beta = None if bn.beta is None else bn.beta.detach().double().requires_grad_(wants_grad)
    y, buffers = mode_training_step(
        x64,
        config["axis"],
        gamma,
        beta,
        {name: getattr(bn, name) for name in buffer_names(bn)},
        momentum=config["momentum"],
        epsilon=config["epsilon"],
        mask=mask,
        renorm=bool(config.get("renorm")),
        renorm_momentum=config.get("renorm_momentum", 0.99),
        renorm_clipping=config.get("renorm_clipping"),
        virtual_batch_size=config.get("virtual_batch_size"),
    )
    grads = None
    if wants_grad:
        (y * upstream.double()).sum().backward()
        grads = (x64.grad, None if gamma is None else gamma.grad, None if beta is None else beta.grad)
    return y.detach(), buffers, grads


def check_training_call(bn, x, mask=None, *, rtol, stat_rtol=None, grad=True, seed=0, dx_atol=0.0):
    """One training call of ``bn`` against the reference: output (dtype, shape, values), every
    buffer (dtype kept, values), and with ``grad`` the gradients of x, gamma and beta.

    ``dx_atol``: an absolute floor for the input gradient where the exact one vanishes (one
    element per channel: ``dy - dy``, whose rounding is scaled by ``|gamma| / sqrt(epsilon)``).
    """
    stat_rtol = rtol if stat_rtol is None else stat_rtol
    bn.zero_grad(set_to_none=True)  # gradients of this call only
    upstream = None
    if grad:
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(99 + seed), dtype=torch.float64)
        upstream = upstream.to(x.dtype)
    y_ref, buffers_ref, grads_ref = reference_call(bn, x, mask, upstream)
    dtypes = {name: getattr(bn, name).dtype for name in buffer_names(bn)}
    x_in = x.detach().clone().requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():
        y = bn(x_in, training=True, mask=mask)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_near(y, y_ref, rtol, "output")
    for name, expected in buffers_ref.items():
        got = getattr(bn, name)
        assert got.dtype == dtypes[name], name
        assert_near(got, expected, stat_rtol, name)
    if grad:
        (y * upstream).sum().backward()
        assert x_in.grad.dtype == x.dtype
        assert_near(x_in.grad, grads_ref[0], rtol, "grad x", dx_atol)
        for param, expected, what in ((bn.gamma, grads_ref[1], "grad gamma"), (bn.beta, grads_ref[2], "grad beta")):
            if param is not None:  # stored in the parameter's dtype: one rounding to it
                assert_near(param.grad, expected, max(rtol, torch.finfo(param.dtype).eps), what)
    return y, buffers_ref
