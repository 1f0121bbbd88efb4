"""The kernel choices of ``batchnorm._kernels``: each tuned constant pinned at its boundary, and
the gradients, synchronized statistics and compiled statistics on the paths those choices open.

Each boundary test observes the route taken just below and at/above the constant through the
calls it makes (spies on PyTorch's kernels and on ``_kernels``' private routes, looked up at call
time), and checks the result against the float64 reference of ``tests/reference.py`` on both
sides. The data of the ratio tests is standardized in float64 so that ``mean**2 / var`` of each
channel (over its masked-in elements) is the ratio asked for, 1 % below or above the constant:
far more than the kernels' own errors (1e-5 at most up to the largest trusted ratio), so the
side is certain.

Tolerances, each justified where it is used: a bound from the arithmetic or from the
measurements behind ``_kernels``' constants, 3 to 50 times the error measured here. Results are
compared relative to each tensor's largest magnitude (``_assert_near``), means relative to the
spread. Where the data's offset is large against its spread, every float32 implementation rounds
the mean to a float32 number: an error ``delta`` of up to half an ulp (1e4: 2**-11) that no
algorithm avoids. It moves ``xhat`` by ``delta * invstd``, hence the output by
``|gamma| * invstd * delta``, ``dgamma = sum(dy * xhat)`` by ``invstd * delta * |dbeta|``, and
``dx`` through both; those first-order bounds are added as absolute slack (``_rounding_slack``).
Nothing else is loosened, and float32 gradients are also compared, tightly, with the same
formulas in float64 at the layer's own statistics (``_check_backward_at_own_statistics``),
where that rounding does not enter.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.distributed as dist
from reference import batch_moments, normalize, training_step

from batchnorm import BatchNormalization, _kernels, functional
from batchnorm.testing import run_local_group

# The boundaries pinned, written out rather than read from ``_kernels``: retuning a constant
# there fails its tests here until they are updated with the new measurement.
LARGE_ROWS_MIN_ELEMENTS = 2**16
ROW_GROUP_ROWS = 4096
BLOCK_ELEMENTS_16_BIT = 2**18
TRUSTED_RATIO_KERNEL = 2.0**16
TRUSTED_RATIO_ROW_GROUPS = 16.0
TRUSTED_RATIO_CHANNEL_SUMS = 4.0
TRUSTED_RATIO_FOLDED_TERM = 4.0
CHANNEL_SUMS_MAX_ROW = 2**16

BELOW, ABOVE = 0.99, 1.01  # the ratio tests' data: 1 % below or above the constant
LARGE_OFFSET = 1e4  # with spread 1: mean**2 / var = 1e8


# ----------------------------------------------------------------------------------- helpers


def _spy(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` by a wrapper that records each call's ``args``, ``kwargs`` and ``result``."""
    original = getattr(owner, name)
    calls = []

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(types.SimpleNamespace(args=args, kwargs=kwargs, result=result))
        return result

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.fixture
def routes(monkeypatch) -> types.SimpleNamespace:
    """Spies on every route of the statistics and the normalization.

    ``kernel``: PyTorch's statistics kernel (one per pass over the data, or per part of it);
    ``row_groups``, ``channel_sums``, ``masked_moments``, ``moments``: ``_kernels``' routes;
    ``checks``: ``finite_and_accurate`` (its ratio is ``args[2]``); ``batch_norm``/``addcmul``:
    the inference kernel and the ``x * scale + shift`` of ``functional.normalize``.
    """
    return types.SimpleNamespace(
        kernel=_spy(monkeypatch, torch, "batch_norm_update_stats"),
        row_groups=_spy(monkeypatch, _kernels, "_row_group_statistics"),
        channel_sums=_spy(monkeypatch, _kernels, "_channel_sums"),
        masked_moments=_spy(monkeypatch, _kernels, "masked_moments"),
        moments=_spy(monkeypatch, _kernels, "moments"),
        checks=_spy(monkeypatch, _kernels, "finite_and_accurate"),
        batch_norm=_spy(monkeypatch, torch, "batch_norm"),
        addcmul=_spy(monkeypatch, torch, "addcmul"),
    )


def _per_channel_elements(call) -> int:
    """Elements per channel that one statistics-kernel call summed (channels on dimension 1)."""
    x = call.args[0]
    return x.numel() // x.shape[1]


def _random(shape, dtype=torch.float32, *, seed=0, spread=2.0, offset=1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * spread + offset).to(dtype)


def _random_mask(shape, *, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + seed)
    mask = torch.rand(shape, generator=g) < 0.6
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    return mask


def _with_ratios(shape, axis, ratios, dtype=torch.float32, *, mask=None, seed=0) -> torch.Tensor:
    """Random data whose channel ``c`` (along ``axis``) has, over the positions where ``mask`` is
    True, mean ``sqrt(ratios[c])`` and biased variance 1 in float64, i.e. ``mean**2 / var ==
    ratios[c]`` before the rounding to ``dtype``. Masked-out positions keep other random values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    channels_last = x.movedim(axis, -1)  # a view: writes reach x
    for c, ratio in enumerate(ratios):
        channel = channels_last[..., c]
        inside = torch.ones(channel.shape, dtype=torch.bool) if mask is None else mask
        values = channel[inside]
        channel[inside] = (values - values.mean()) / values.std(correction=0) + math.sqrt(ratio)
    return x.to(dtype)


def _ratios_of(x, axis, mask=None) -> torch.Tensor:
    mean, var, _ = batch_moments(x, axis, mask)
    return mean.square() / var


def _assert_near(got, expected, rtol: float, what: str = "", atol: float = 0.0) -> None:
    """``|got - expected| <= rtol * (|expected| + max|expected|) + atol``."""
    got, expected = got.detach().double(), expected.detach().double()
    assert got.shape == expected.shape, what
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale + atol, msg=lambda m: f"{what}: {m}")


def _layer(shape, axis, *, momentum=0.0, seed=0, synchronized=False) -> BatchNormalization:
    """A built float32 layer with random gamma (both signs), beta and moving statistics.

    ``momentum=0`` makes the moving statistics after one training call the batch's own (torch's
    ``lerp`` with weight 1 returns its end exactly): their accuracy is the statistics' accuracy.
    """
    bn = BatchNormalization(axis=axis, momentum=momentum, synchronized=synchronized)
    bn.build(shape)
    channels = shape[axis]
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        sign = torch.where(torch.rand(channels, generator=g) < 0.3, -1.0, 1.0)
        bn.gamma.copy_(sign * (0.5 + 1.5 * torch.rand(channels, generator=g)))
        bn.beta.copy_(torch.randn(channels, generator=g))
        bn.moving_mean.copy_(torch.randn(channels, generator=g))
        bn.moving_variance.copy_(0.5 + torch.rand(channels, generator=g))
    return bn


def _reference(bn, x, mask, upstream):
    """Float64 reference of one training call of ``bn``: ``(y, moving_mean, moving_variance,
    (dx, dgamma, dbeta))`` for the loss ``sum(y * upstream)``."""
    x64 = x.detach().double().requires_grad_()
    gamma = bn.gamma.detach().double().requires_grad_()
    beta = bn.beta.detach().double().requires_grad_()
    y, mean, var = training_step(
        x64, bn.axis, gamma, beta, bn.moving_mean.detach(), bn.moving_variance.detach(), bn.momentum, bn.epsilon, mask
    )
    (y * upstream.double()).sum().backward()
    return y.detach(), mean, var, (x64.grad, gamma.grad, beta.grad)


def _closed_form(x, axis, mask, upstream, gamma, beta, epsilon, mean, var):
    """``(y, dx, dgamma, dbeta)`` in float64 of a normalization by the given ``mean`` and ``var``,
    differentiated as batch statistics over the masked-in positions (``w``, ``n`` per channel)::

        y = gamma * xhat + beta     dbeta = sum(dy)     dgamma = sum(dy * xhat)
        dx = gamma * invstd * (dy - w * (dbeta + xhat * dgamma) / n)

    (sums over every position of a channel: every output depends on the statistics).
    """
    axis %= x.dim()
    x, dy = x.double().movedim(axis, -1), upstream.double().movedim(axis, -1)
    w = torch.ones(x.shape[:-1], dtype=torch.float64) if mask is None else mask.double()
    w = w.expand(x.shape[:-1])[..., None]
    n = w.reshape(-1, 1).sum(0)
    gamma, beta = gamma.detach().double(), beta.detach().double()
    invstd = torch.rsqrt(var.double() + epsilon)
    xhat = (x - mean.double()) * invstd
    dims = tuple(range(x.dim() - 1))
    dbeta, dgamma = dy.sum(dims), (dy * xhat).sum(dims)
    dx = gamma * invstd * (dy - w * (dbeta + xhat * dgamma) / n)
    return (gamma * xhat + beta).movedim(-1, axis), dx.movedim(-1, axis), dgamma, dbeta


def _rounding_slack(x, axis, mask, gamma, epsilon, dgamma, dbeta) -> tuple[float, float, float]:
    """Slack for the float32 rounding of a large mean (module docstring): ``(output, dx, dgamma)``.

    ``delta``, half an ulp of each channel's mean, is taken as a whole ulp (``|mean| * 2**-23``)
    for the rounding of the shifted retry's ``shifted_mean + shift`` too. To first order it moves
    ``y`` by ``|gamma| * invstd * delta``, ``dgamma`` by ``invstd * delta * |dbeta|``, and
    ``dx = gamma * invstd * (dy - w * (dbeta + xhat * dgamma) / n)`` by
    ``|gamma| * invstd**2 * delta * (|dgamma| + max|xhat| * |dbeta|) / n``.
    """
    mean, var, count = batch_moments(x, axis, mask)
    axis %= x.dim()
    delta = mean.abs() * 2.0**-23
    invstd = torch.rsqrt(var + epsilon)
    gamma = gamma.detach().double().abs()
    deviations = (x.double().movedim(axis, -1) - mean).abs().reshape(-1, len(mean))
    xhat = deviations.max(0).values * invstd
    output = (gamma * invstd * delta).max().item()
    dx = (gamma * invstd**2 * delta * (dgamma.double().abs() + xhat * dbeta.double().abs()) / count).max().item()
    return output, dx, (invstd * delta * dbeta.double().abs()).max().item()


def _check_training(bn, x, mask, *, rtol, stat_rtol, seed=0, large_offset=False):
    """One training call of ``bn`` with a random upstream gradient, against the float64 reference:
    output, moving statistics, and the gradients of the input, gamma and beta."""
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(99 + seed), dtype=torch.float64)
    upstream = upstream.to(x.dtype)
    y_ref, mean_ref, var_ref, (dx_ref, dgamma_ref, dbeta_ref) = _reference(bn, x, mask, upstream)
    y_slack = dx_slack = dgamma_slack = mean_slack = 0.0
    if large_offset:
        y_slack, dx_slack, dgamma_slack = _rounding_slack(x, bn.axis, mask, bn.gamma, bn.epsilon, dgamma_ref, dbeta_ref)
        mean_slack = mean_ref.abs().max().item() * 2.0**-24  # half an ulp
    x_in = x.clone().requires_grad_()
    y = bn(x_in, training=True, mask=mask)
    y.backward(upstream)
    assert y.dtype == x.dtype and x_in.grad.dtype == x.dtype
    _assert_near(y, y_ref, rtol, "output", y_slack)
    _check_moving_statistics(bn, mean_ref, var_ref, stat_rtol, mean_slack)
    _assert_near(x_in.grad, dx_ref, rtol, "grad x", dx_slack)
    _assert_near(bn.gamma.grad, dgamma_ref, rtol, "grad gamma", dgamma_slack)
    _assert_near(bn.beta.grad, dbeta_ref, rtol, "grad beta")
    if x.dtype == torch.float32:
        _check_backward_at_own_statistics(bn, x, mask, upstream, x_in.grad, bn.gamma.grad, bn.beta.grad)


def _check_backward_at_own_statistics(bn, x, mask, upstream, dx, dgamma, dbeta, rows=slice(None)) -> None:
    """The gradients against the same formulas in float64 at the layer's own statistics (its
    moving ones after one call with momentum 0; ``dx`` of the ``rows`` of ``x`` given, ``dgamma``
    and ``dbeta`` of all of it), so without the rounding of the mean: only the
    float32 arithmetic of the backward remains. dx: measured below 2e-7 of its largest magnitude,
    where a masked backward folded into x * slope + offset at a large mean errs by 5e-6 to 9e-6.
    dgamma, dbeta: float32 sums of up to 1.2e4 products, measured below 2.5e-6.

    (Not the output: PyTorch's inference kernel folds it into x * alpha + beta too, which loses
    about as much as the float32 rounding of the mean does, eps * |mean| * |gamma| * invstd.)
    """
    assert bn.momentum == 0.0
    own = _closed_form(x, bn.axis, mask, upstream, bn.gamma, bn.beta, bn.epsilon, bn.moving_mean, bn.moving_variance)
    expected_grads = own[1][rows], own[2], own[3]
    for got, expected, rtol, what in zip(
        (dx, dgamma, dbeta), expected_grads, (1e-6, 1e-5, 1e-5), ("dx", "dgamma", "dbeta")
    ):
        _assert_near(got, expected, rtol, f"{what} at the layer's own statistics")


def _check_moving_statistics(bn, mean_ref, var_ref, rtol: float, mean_slack: float = 0.0) -> None:
    """The moving statistics of a ``momentum=0`` layer, i.e. its batch statistics: the variance
    within ``rtol`` of itself, the mean within ``rtol`` standard deviations (plus ``mean_slack``,
    its float32 rounding) -- not relative to a large mean, which would hide any error."""
    torch.testing.assert_close(
        bn.moving_variance.double(), var_ref, rtol=rtol, atol=0.0, msg=lambda m: f"moving_variance: {m}"
    )
    torch.testing.assert_close(
        bn.moving_mean.double(),
        mean_ref,
        rtol=0.0,
        atol=rtol * var_ref.sqrt().max().item() + mean_slack,
        msg=lambda m: f"moving_mean: {m}",
    )


def _check_statistics(view, expected_view, axis, mask=None, *, rtol, mean_atol=0.0):
    """``functional.batch_statistics`` of ``view`` against ``batch_moments`` of ``expected_view``.

    The mean is compared relative to the channel's standard deviation (``mean_atol`` in units of
    it), the variance relative to itself.
    """
    inside = None if mask is None else functional.mask_view(mask, expected_view.shape, axis)
    statistics = functional.batch_statistics(view, inside)
    mean, var, count = batch_moments(expected_view, axis, mask)
    assert int(statistics.count) == int(count[0])
    torch.testing.assert_close(statistics.var.double(), var, rtol=rtol, atol=0.0, msg=lambda m: f"var: {m}")
    torch.testing.assert_close(
        statistics.mean.double(),
        mean,
        rtol=0.0,
        atol=(mean_atol * var.sqrt()).max().item(),
        msg=lambda m: f"mean: {m}",
    )
    return statistics


# ---------------------------------------------------------------- LARGE_ROWS_MIN_ELEMENTS


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("rows", [LARGE_ROWS_MIN_ELEMENTS // 16 - 1, LARGE_ROWS_MIN_ELEMENTS // 16])
def test_large_rows_min_elements_chooses_addcmul_over_the_inference_kernel(routes, rows, training):
    # (M, 16) float32 views of 2**16 - 16 and 2**16 elements, called without autograd: below the
    # constant PyTorch's inference kernel normalizes; from it on, y = x * scale + shift is one
    # addcmul over the whole view (and the kernel does not run).
    shape = (rows, 16)
    bn = _layer(shape, -1, momentum=0.5)
    x = _random(shape)
    expected, expected_mean, expected_var = training_step(
        x, -1, bn.gamma.detach(), bn.beta.detach(), bn.moving_mean, bn.moving_variance, bn.momentum, bn.epsilon
    )
    if not training:
        expected = normalize(x, -1, bn.moving_mean, bn.moving_variance, bn.gamma.detach(), bn.beta.detach(), bn.epsilon)
    with torch.no_grad():
        y = bn(x, training=training)
    whole_view = [c for c in routes.addcmul if c.result.shape == shape]
    if rows * 16 < LARGE_ROWS_MIN_ELEMENTS:
        assert len(routes.batch_norm) == 1 and not whole_view
    else:
        assert not routes.batch_norm and len(whole_view) == 1
    # Inference: a few float32 roundings per value (measured 9e-8). Training: the statistics'
    # float32 sums over 4096 rows too, which err by about 1e-6 sd (_kernels; measured 9e-7).
    rtol = 1e-5 if training else 1e-6
    _assert_near(y, expected, rtol, "output")
    if training:
        _assert_near(bn.moving_mean, expected_mean, rtol, "moving_mean")
        _assert_near(bn.moving_variance, expected_var, rtol, "moving_variance")


def test_large_rows_min_elements_applies_only_to_float32_and_float64_rows_without_autograd(routes):
    shape = (LARGE_ROWS_MIN_ELEMENTS // 16, 16)
    bn = _layer(shape, -1)
    x = _random(shape)
    bn.eval()
    y = bn(x)  # autograd records (gamma and beta need gradients): the kernel, and its backward
    assert len(routes.batch_norm) == 1
    with torch.no_grad():
        bn(x.bfloat16())  # 16-bit rows: the kernel's mixed-dtype loop
    assert len(routes.batch_norm) == 2
    expected = normalize(x, -1, bn.moving_mean, bn.moving_variance, bn.gamma.detach(), bn.beta.detach(), bn.epsilon)
    _assert_near(y, expected, 1e-6, "output")


# ------------------------------------------------------------------------- ROW_GROUP_ROWS


@pytest.mark.parametrize("rows", [ROW_GROUP_ROWS, ROW_GROUP_ROWS + 1])
def test_row_group_rows_splits_longer_views_into_groups(routes, rows):
    # An (M, 3) float32 view of small ratio (0.56: no retry): one kernel call over the 4096 rows;
    # one more row and the view goes in row groups, none of which sums more than 4096 rows
    # (4097 rows: two groups of 2048 side by side as 6 channels, and the row left over).
    x = _random((rows, 3))
    # float32 sums of up to 4096 rows: about 1e-6 sd (_kernels; measured 3e-7 and 6e-7 sd).
    _check_statistics(x, x, -1, rtol=1e-5, mean_atol=1e-5)
    assert all(_per_channel_elements(call) <= ROW_GROUP_ROWS for call in routes.kernel)
    if rows <= ROW_GROUP_ROWS:
        assert not routes.row_groups
        assert [_per_channel_elements(call) for call in routes.kernel] == [rows]
    else:
        assert len(routes.row_groups) == 1
        assert [tuple(call.args[0].shape[1:2]) + (_per_channel_elements(call),) for call in routes.kernel] == [
            (6, 2048),
            (3, 1),
        ]


# ------------------------------------------------------------------ BLOCK_ELEMENTS_16_BIT


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bfloat16", "float16", "float32"]
)
@pytest.mark.parametrize("extra", [0, 1], ids=["2**18", "2**18+B"])
def test_block_elements_16_bit_splits_larger_16_bit_views_into_blocks(routes, dtype, extra):
    # (A, 2, B) views with B = 1024: A * B = 2**18 elements per channel take one kernel call,
    # 2**18 + B take two blocks (256 rows of A, then 1), combined in float64. float32 never blocks.
    b = 1024
    a = BLOCK_ELEMENTS_16_BIT // b + extra
    x = _random((a, 2, b), dtype)
    # The kernel's float32 variance of 2**18 16-bit values errs by about 1.1e-5 (_kernels;
    # measured 1.5e-5 for bfloat16), its mean by 1.4e-7 sd.
    _check_statistics(x, x, 1, rtol=1e-4, mean_atol=1e-5)
    blocked = dtype != torch.float32 and extra
    assert [_per_channel_elements(call) for call in routes.kernel] == ([2**18, b] if blocked else [a * b])


# -------------------------------------------------- TRUSTED_RATIO_KERNEL / _ROW_GROUPS


RATIO_VIEWS = [
    pytest.param((256, 3), -1, torch.float32, TRUSTED_RATIO_ROW_GROUPS, id="float32-rows"),
    pytest.param((8, 3, 32), 1, torch.float32, TRUSTED_RATIO_KERNEL, id="float32-axis"),
    pytest.param((256, 3), -1, torch.float64, TRUSTED_RATIO_KERNEL, id="float64-rows"),
    pytest.param((5000, 3), -1, torch.float32, TRUSTED_RATIO_ROW_GROUPS, id="float32-row-groups"),
]


@pytest.mark.parametrize("side", [BELOW, ABOVE], ids=["below", "above"])
@pytest.mark.parametrize("shape,axis,dtype,trusted", RATIO_VIEWS)
def test_trusted_ratio_decides_the_shifted_retry(routes, shape, axis, dtype, trusted, side):
    # Channel 1 has mean**2 / var 1 % below or above the ratio that the view's kernel is trusted
    # to (float32 (M, C): TRUSTED_RATIO_ROW_GROUPS = 16; (A, C, B) and float64: 2**16); channels
    # 0 and 2 stay far below it. Below: one pass, accepted. Above: one more pass over the input
    # shifted by the first mean; never Welford's fallback. Right on both sides.
    ratios = [0.0, trusted * side, trusted / 4]
    x = _with_ratios(shape, axis, ratios, dtype)
    actual = _ratios_of(x, axis)
    assert (actual[1] > trusted) == (side > 1) and actual[1] == pytest.approx(trusted * side, rel=1e-3)
    # Up to ratio 2**16 the kernel's variance errs by 1e-5 at most (_kernels; measured 2.4e-7);
    # the mean, 257 sd at ratio 2**16, is rounded to float32: half an ulp is 1.5e-5 sd.
    rtol = 1e-10 if dtype == torch.float64 else 5e-5
    _check_statistics(x, x, axis, rtol=rtol, mean_atol=rtol)
    passes = len(routes.kernel) if not routes.row_groups else len(routes.row_groups)
    assert passes == (1 if side < 1 else 2)
    # The first pass is accepted or not; the retry's (its mean is small) is.
    assert [call.result for call in routes.checks] == ([True] if side < 1 else [False, True])
    assert not routes.moments


# ---------------------------------------------------------------- TRUSTED_RATIO_CHANNEL_SUMS


@pytest.mark.parametrize("side", [BELOW, ABOVE], ids=["below", "above"])
def test_trusted_ratio_channel_sums_decides_the_masked_two_pass_fallback(routes, side):
    # A masked (A, C, B) view (axis 1): the one-pass sum(x), sum(x**2) are kept while every
    # channel has mean**2 / var <= 4 over its masked-in elements, else the corrected two-pass
    # sums decide. Masked-out positions hold 1e30, which reaches no statistic either way.
    shape, axis = (8, 3, 16), 1
    mask = _random_mask((8, 16))
    ratio = TRUSTED_RATIO_CHANNEL_SUMS * side
    x = _with_ratios(shape, axis, [ratio, 0.0, 1.0], mask=mask)
    x = torch.where(mask[:, None, :], x, 1e30)
    assert (_ratios_of(x, axis, mask)[0] > TRUSTED_RATIO_CHANNEL_SUMS) == (side > 1)
    # The one-pass variance errs by 5e-5 at ratio 4 at most (_kernels); measured 2.3e-7 here.
    statistics = _check_statistics(x, x, axis, mask, rtol=5e-5, mean_atol=1e-6)
    assert statistics.count == int(mask.sum())
    assert len(routes.channel_sums) == 1
    assert len(routes.masked_moments) == (0 if side < 1 else 1)


# ----------------------------------------------------------------- TRUSTED_RATIO_FOLDED_TERM


@pytest.mark.parametrize("side", [BELOW, ABOVE], ids=["below", "above"])
@pytest.mark.parametrize("shape,axis", [((48, 3), -1), ((6, 3, 8), 1)], ids=["rows", "axis"])
def test_trusted_ratio_folded_term_decides_the_masked_backward(routes, shape, axis, side):
    # The masked backward's term dbeta + xhat * dgamma, affine in x per channel: folded into one
    # x * slope + offset pass while mean**2 / var <= 4 in every channel, from x - mean beyond
    # (the only addcmul with out= of the backward). Right on both sides.
    mask = _random_mask([size for d, size in enumerate(shape) if d != axis % len(shape)])
    ratio = TRUSTED_RATIO_FOLDED_TERM * side
    x = _with_ratios(shape, axis, [0.5, ratio, 1.0], mask=mask)
    bn = _layer(shape, axis)
    upstream = _random(shape, seed=7, offset=0.0, spread=1.0)
    y_ref, _, _, grads_ref = _reference(bn, x, mask, upstream)
    x_in = x.clone().requires_grad_()
    y = bn(x_in, training=True, mask=mask)
    checks = len(routes.checks)
    addcmuls = len(routes.addcmul)
    y.backward(upstream)
    assert [call.result for call in routes.checks[checks:]] == [side < 1]  # the backward's one check
    assert not [call for call in routes.addcmul[:addcmuls] if "out" in call.kwargs]
    with_out = [call for call in routes.addcmul[addcmuls:] if "out" in call.kwargs]
    assert len(with_out) == (0 if side < 1 else 1)
    # float32 arithmetic at a small mean, a few ulps lost at most when folded: measured 2.4e-7.
    _assert_near(y, y_ref, 1e-5, "output")
    for got, expected, what in zip((x_in.grad, bn.gamma.grad, bn.beta.grad), grads_ref, ("dx", "dgamma", "dbeta")):
        _assert_near(got, expected, 1e-5, what)


# -------------------------------------------------------- gamma/beta gradients on each path


def _blocked(routes):
    assert len(routes.kernel) == 2 and all(_per_channel_elements(c) <= BLOCK_ELEMENTS_16_BIT for c in routes.kernel)


def _retried(routes):
    assert len(routes.kernel) == 2 and not routes.moments and not routes.masked_moments


def _row_groups(routes):
    assert routes.row_groups and all(_per_channel_elements(c) <= ROW_GROUP_ROWS for c in routes.kernel)


def _row_groups_retried(routes):
    assert len(routes.row_groups) == 2 and not routes.moments


def _masked_two_pass(routes):
    assert len(routes.channel_sums) == 1 and len(routes.masked_moments) == 1


GRADIENT_CASES = [
    # id, shape, axis, dtype, offset, spread, masked, route
    ("blocked-bfloat16", (257, 2, 1024), 1, torch.bfloat16, 1.5, 2.0, False, _blocked),
    ("retried-axis", (16, 3, 32), 1, torch.float32, LARGE_OFFSET, 1.0, False, _retried),
    ("retried-rows", (64, 8, 3), -1, torch.float32, LARGE_OFFSET, 1.0, False, _retried),
    ("row-groups", (4097, 3), -1, torch.float32, 1.5, 2.0, False, _row_groups),
    ("row-groups-retried", (4100, 3), -1, torch.float32, LARGE_OFFSET, 1.0, False, _row_groups_retried),
    ("masked-rows-large-mean", (64, 8, 3), -1, torch.float32, LARGE_OFFSET, 1.0, True, _retried),
    ("masked-axis1-large-mean", (16, 3, 8, 4), 1, torch.float32, LARGE_OFFSET, 1.0, True, _masked_two_pass),
    ("masked-axis0-large-mean", (3, 16, 8), 0, torch.float32, LARGE_OFFSET, 1.0, True, _masked_two_pass),
    ("masked-axis2-large-mean", (4, 6, 3, 5), 2, torch.float32, LARGE_OFFSET, 1.0, True, _masked_two_pass),
]


@pytest.mark.parametrize(
    "shape,axis,dtype,offset,spread,masked,route", [pytest.param(*case[1:], id=case[0]) for case in GRADIENT_CASES]
)
def test_gamma_beta_and_input_gradients_on_each_path(routes, shape, axis, dtype, offset, spread, masked, route):
    # A training call of the layer and a random upstream gradient: output, moving statistics and
    # dx, dgamma, dbeta against the float64 reference, on the path named (checked by `route`).
    # Masked large means also take the unfolded masked backward (ratio 1e8 > 4).
    x = _random(shape, dtype, offset=offset, spread=spread)
    mask = _random_mask([size for d, size in enumerate(shape) if d != axis % len(shape)]) if masked else None
    bn = _layer(shape, axis)
    if dtype == torch.bfloat16:
        # The output and dx are rounded to bfloat16 (half an ulp: 2**-8 of the value; measured
        # 2.9e-3 of the largest); the statistics are float32 from the blocks (1.5e-5, as above).
        rtol, stat_rtol = 2.0**-8, 1e-4
    else:
        # float32: a few ulps per value, sums of up to 1.2e4 terms: measured 2.3e-6 at most (the
        # row groups' dgamma), besides the rounding of a large mean (slack, module docstring).
        rtol, stat_rtol = 2e-5, 2e-5
    _check_training(bn, x, mask, rtol=rtol, stat_rtol=stat_rtol, large_offset=offset == LARGE_OFFSET)
    route(routes)
    # The unfolded masked backward (x - mean, then the only addcmul with out=) where masked.
    assert any("out" in call.kwargs for call in routes.addcmul) == masked


# ------------------------------------------------------------------------------- known gaps
# Both split only what the constants name (rows along dimension 0), not a long inner dimension B;
# strict: each fails once fixed, so that its mark goes.


def test_block_elements_16_bit_bounds_every_call_also_for_a_long_inner_dimension(routes):
    # A bfloat16 (1, 1, 2**22) view (e.g. batch 1, one channel, 2048 x 2048, axis 1) has no rows
    # to split along A: its blocks run along B. Taken in one call its variance errs by 3.3e-4 (the
    # "4e-4 at 2**22" of _kernels); wanted: what the constant promises for 2**18 elements, 1.1e-5.
    x = _random((1, 1, 2**22), torch.bfloat16)
    _check_statistics(x, x, 1, rtol=5e-5, mean_atol=1e-5)
    assert len(routes.kernel) == 16
    assert all(_per_channel_elements(call) <= BLOCK_ELEMENTS_16_BIT for call in routes.kernel)


# ---------------------------------------------------------------------- CHANNEL_SUMS_MAX_ROW


@pytest.mark.parametrize("length", [CHANNEL_SUMS_MAX_ROW, CHANNEL_SUMS_MAX_ROW + 1])
def test_channel_sums_max_row_sends_long_rows_to_the_two_pass_sums(routes, length):
    # The one-pass masked sums add each row of an (A, C, B) view up in float32: rows of up to
    # 2**16 take them, longer ones the corrected two-pass sums. Right on both sides.
    x = _random((2, 1, length))
    mask = torch.rand(2, length, generator=torch.Generator().manual_seed(1)) < 0.9
    _check_statistics(x, x, 1, mask, rtol=5e-5, mean_atol=1e-5)
    assert len(routes.channel_sums) == (1 if length <= CHANNEL_SUMS_MAX_ROW else 0)
    assert len(routes.masked_moments) == (0 if length <= CHANNEL_SUMS_MAX_ROW else 1)


def test_masked_statistics_stay_accurate_for_a_long_inner_dimension(routes):
    # A masked float32 (1, 1, 2**22) view of ratio 0.56, far below TRUSTED_RATIO_CHANNEL_SUMS: the
    # one-pass float32 sums along B would give a variance 2.6e-4 off (unmasked: 4e-8). Wanted: the
    # 5e-5 that the constant's measurement promises up to ratio 4.
    x = _random((1, 1, 2**22))
    mask = torch.rand(1, 2**22, generator=torch.Generator().manual_seed(1)) < 0.9
    _check_statistics(x, x, 1, mask, rtol=5e-5, mean_atol=1e-5)
    assert not routes.channel_sums and len(routes.masked_moments) == 1


# ------------------------------------------------- masked large-offset synchronized statistics

SYNC_TIMEOUT_S, SYNC_DEADLINE_S = 60, 180  # the group's collective timeout; the whole run's
SYNC_STEPS, SYNC_CHANNELS = 6, 3


def _synchronized_case(axis: int, sizes: list[int]) -> None:
    """On this rank: a synchronized layer on its shard of a masked batch of offset 1e4, spread 1,
    against one unsynchronized process on the whole batch and against the float64 reference.

    Tolerances: sums in another order, 1e-5 of each tensor's largest magnitude; plus, for the
    rounding of each mean to float32 (module docstring), ``_rounding_slack`` against the
    reference, and twice it between the two processes' results, each of which carries its own.
    """
    total = sum(sizes)
    generator = torch.Generator().manual_seed(100 * axis + total)
    shape = (total, SYNC_STEPS, SYNC_CHANNELS) if axis == -1 else (total, SYNC_CHANNELS, SYNC_STEPS)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) + LARGE_OFFSET).float()
    upstream = torch.randn(shape, generator=generator)
    mask = torch.rand(total, SYNC_STEPS, generator=generator) < 0.6
    one, synchronized = _layer(shape, axis), _layer(shape, axis, synchronized=True)
    y_ref, mean_ref, var_ref, (dx_ref, dgamma_ref, dbeta_ref) = _reference(one, x, mask, upstream)
    y_slack, dx_slack, dgamma_slack = _rounding_slack(x, axis, mask, one.gamma, one.epsilon, dgamma_ref, dbeta_ref)

    x_all = x.clone().requires_grad_()
    y_all = one(x_all, training=True, mask=mask)
    y_all.backward(upstream)

    start = sum(sizes[: dist.get_rank()])
    shard = slice(start, start + sizes[dist.get_rank()])
    x_mine = x[shard].clone().requires_grad_()
    y_mine = synchronized(x_mine, training=True, mask=mask[shard])
    y_mine.backward(upstream[shard])
    parameter_grads = torch.stack([synchronized.gamma.grad, synchronized.beta.grad])
    dist.all_reduce(parameter_grads)  # what DDP does to them (as a sum)
    dgamma, dbeta = parameter_grads

    where = f"rank {dist.get_rank()}, axis {axis}, shards {sizes}"
    rtol = 1e-5
    for got, one_process, expected, slack, what in (
        (y_mine, y_all[shard], y_ref[shard], y_slack, "output"),
        (x_mine.grad, x_all.grad[shard], dx_ref[shard], dx_slack, "dx"),
        (dgamma, one.gamma.grad, dgamma_ref, dgamma_slack, "dgamma"),
        (dbeta, one.beta.grad, dbeta_ref, 0.0, "dbeta"),
    ):
        _assert_near(got, one_process, rtol, f"{what} vs one process ({where})", 2 * slack)
        _assert_near(got, expected, rtol, f"{what} vs float64 reference ({where})", slack)
    mean_slack = mean_ref.abs().max().item() * 2.0**-24  # half an ulp
    _check_moving_statistics(synchronized, mean_ref, var_ref, rtol, mean_slack)
    _check_moving_statistics(synchronized, one.moving_mean.double(), one.moving_variance.double(), rtol, 2 * mean_slack)
    _check_backward_at_own_statistics(synchronized, x, mask, upstream, x_mine.grad, dgamma, dbeta, shard)


def _synchronized_worker(cases: list[tuple[int, list[int]]]) -> int:
    for axis, sizes in cases:
        _synchronized_case(axis, sizes)
    return len(cases)


@pytest.mark.distributed
def test_masked_large_offset_synchronized_statistics_equal_one_process():
    # Two gloo processes, synchronized layers, a mask, offset 1e4 and spread 1: the masked shard
    # statistics take their stable paths (gathered rows and the shifted retry for channels last,
    # the two-pass sums for axis 1), each shard's mean goes with its rounding, the combination is
    # in float64, and the backward (sums all-reduced) takes the unfolded masked term. Equal shards,
    # unequal ones, and an empty one.
    cases = [(axis, sizes) for axis in (-1, 1) for sizes in ([8, 8], [3, 13], [16, 0])]
    results = run_local_group(_synchronized_worker, 2, cases, timeout_s=SYNC_TIMEOUT_S, deadline_s=SYNC_DEADLINE_S)
    assert results == [len(cases)] * 2


# ------------------------------------------------------------------ compiled large-mean case


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_compiled_layer_statistics_of_large_mean_data_match_the_reference(masked):
    # torch.compile (inductor, the default backend) in training on data of offset 1e4, spread 1,
    # 8192 elements per channel: the moving statistics after one step (momentum 0: the batch's)
    # within 1e-4 of the variance and half an ulp (plus 1e-4 sd) of the mean, and the output and
    # gradients checked as in the eager tests above. Unmasked, inductor's own float32 reductions
    # would miss both: var_mean accumulated in float32 errs here by 5.7e-4 of the variance and
    # 1.5e-2 on the mean (measured). Masked: the corrected two-pass sums, accumulated in float64
    # under compile (in float32 they would pass too, 5.6e-6).
    torch._dynamo.reset()
    shape = (128, 64, 4)
    x = _random(shape, offset=LARGE_OFFSET, spread=1.0)
    mask = _random_mask(shape[:-1]) if masked else None
    bn = _layer(shape, -1)
    compiled = torch.compile(bn)
    _check_training(compiled, x, mask, rtol=2e-5, stat_rtol=1e-4, large_offset=True)


# ------------------------------------------------------- the route of other devices (CUDA), on CPU


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("shape,axis", [((64, 6), -1), ((8, 5, 12), 1), ((4, 3, 5, 6), 2)])
def test_the_route_of_other_devices_matches_the_reference(monkeypatch, routes, shape, axis, masked):
    # Off the CPU nothing is read on the host: no accuracy check, the masked two-pass sums always,
    # `valid` and the count stay tensors, the masked backward always guards masked-out positions.
    # `_kernels.eager_cpu` False sends CPU tensors down that route (CUDA's kernels aside).
    monkeypatch.setattr(_kernels, "eager_cpu", lambda t: False)
    x = _random(shape, offset=3.0)
    mask = _random_mask(tuple(s for d, s in enumerate(shape) if d != axis % len(shape))) if masked else None
    bn = _layer(shape, axis)
    statistics = functional.batch_statistics(*_views(x, axis, mask))
    assert isinstance(statistics.valid, torch.Tensor) and not routes.checks
    assert isinstance(statistics.count, torch.Tensor) == masked
    _check_training(bn, x, mask, rtol=1e-5, stat_rtol=1e-5)
    assert not routes.checks and not routes.channel_sums
    assert len(routes.masked_moments) == (2 if masked else 0)


def _views(x, axis, mask):
    axis = axis % x.dim()
    view = functional.channel_view(x, axis)
    return view, None if mask is None else functional.mask_view(mask, x.shape, axis)
