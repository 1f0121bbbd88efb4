"""float64 reference tests for what Keras cannot check: the SPEC's "deliberately not as Keras" rules.

Every expected value comes from ``tests/reference.py`` (the SPEC formulas in float64, with
autograd for the gradients), computed from exactly the values the layer sees: the input upcast
to float64 and the layer's own weights upcast to float64.
"""

from __future__ import annotations

import pytest
import torch
from reference import batch_moments, normalize, training_step
from state import assert_state_equal, snapshot

from batchnorm import BatchNormalization

EPS32 = torch.finfo(torch.float32).eps
# Relative rounding of one value in each dtype (half an ulp at most, one ulp to be safe).
UNIT = {
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float32: 1e-4,  # the brief's float32 tolerance (a few hundred ulps: reductions)
    torch.float64: 1e-10,
}


# ----------------------------------------------------------------------------------- helpers


def make_layer(shape, axis, *, seed=0, **kwargs) -> BatchNormalization:
    """A built layer with random (non-default) gamma, beta and moving statistics."""
    kwargs.setdefault("momentum", 0.8)
    bn = BatchNormalization(axis=axis, **kwargs)
    bn.build(shape)
    channels = shape[axis]
    g = torch.Generator().manual_seed(1000 + seed)
    sign = torch.where(torch.rand(channels, generator=g) < 0.3, -1.0, 1.0)
    with torch.no_grad():
        if bn.gamma is not None:
            bn.gamma.copy_(sign * (0.5 + 1.5 * torch.rand(channels, generator=g)))
        if bn.beta is not None:
            bn.beta.copy_(torch.randn(channels, generator=g))
        bn.moving_mean.copy_(torch.randn(channels, generator=g))
        bn.moving_variance.copy_(0.5 + torch.rand(channels, generator=g))
    return bn


def random_input(shape, dtype=torch.float32, *, seed=0, scale=2.0, offset=1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def mask_shape(shape, axis, broadcast=()) -> list[int]:
    """The mask shape for ``shape`` without ``axis``; dimensions listed in ``broadcast`` become 1."""
    axis %= len(shape)
    dims = [size for d, size in enumerate(shape) if d != axis]
    return [1 if i in broadcast else size for i, size in enumerate(dims)]


def random_mask(shape, dtype=torch.bool, *, seed=0) -> torch.Tensor:
    """A mask with both True and False positions (when it has two or more), in ``dtype``.

    Non-bool masks use several non-zero values (negative and fractional ones too): all mean True.
    """
    g = torch.Generator().manual_seed(500 + seed)
    keep = torch.rand(shape, generator=g) < 0.6
    flat = keep.view(-1)
    if flat.numel():
        flat[0] = True
    if flat.numel() > 1:
        flat[-1] = False
    if dtype == torch.bool:
        return keep
    if dtype.is_floating_point:
        values = torch.tensor([0.5, -1.5, 1.0, 3.25], dtype=dtype)
    else:
        values = torch.tensor([1, 2, 7, -3] if dtype.is_signed else [1, 2, 7, 255], dtype=dtype)
    picks = values[torch.randint(0, 4, shape, generator=g)]
    return torch.where(keep, picks, torch.zeros((), dtype=dtype))


def assert_near(got: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """``|got - expected| <= rtol * (|expected| + max|expected|)``: relative, with a norm-wise floor."""
    got, expected = got.detach().double(), expected.detach().double()
    assert got.shape == expected.shape, what
    scale = expected[expected.isfinite()].abs().max().item() if expected.isfinite().any() else 0.0
    torch.testing.assert_close(
        got, expected, rtol=rtol, atol=rtol * max(scale, 1e-3), equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def reference_training(bn: BatchNormalization, x: torch.Tensor, mask=None, weights=None):
    """The reference (y, new moving mean, new moving variance, grads) for one training call of ``bn``.

    ``weights`` (the upstream gradient) makes it differentiate ``sum(y * weights)`` in float64.
    """
    x64 = x.detach().double().requires_grad_(weights is not None)
    gamma = None if bn.gamma is None else bn.gamma.detach().double().requires_grad_(weights is not None)
    beta = None if bn.beta is None else bn.beta.detach().double().requires_grad_(weights is not None)
    y, mean, var = training_step(
        x64, bn.axis, gamma, beta, bn.moving_mean.detach(), bn.moving_variance.detach(), bn.momentum, bn.epsilon, mask
    )
    grads = None
    if weights is not None:
        (y * weights.double()).sum().backward()
        grads = (x64.grad, None if gamma is None else gamma.grad, None if beta is None else beta.grad)
    return y.detach(), mean, var, grads


def check_training_call(bn, x, mask=None, *, rtol, stat_rtol=None, grad=True, seed=0, out_dtype=None):
    """Run one training call of ``bn`` and compare everything with the reference.

    ``grad=False`` runs the call under ``torch.no_grad()``, where the layer takes its paths for
    calls that autograd does not record.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    stat_rtol = rtol if stat_rtol is None else stat_rtol
    weights = None
    if grad:
        weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(99 + seed), dtype=torch.float64)
        weights = weights.to(x.dtype)
    y_ref, mean_ref, var_ref, grads_ref = reference_training(bn, x, mask, weights)
    before = snapshot(bn)
    x_in = x.detach().clone().requires_grad_(grad)
    with torch.enable_grad() if grad else torch.no_grad():
        y = bn(x_in, training=True, mask=mask)
    assert y.dtype == out_dtype and y.shape == x.shape
    assert_near(y, y_ref, rtol, "output")
    for name, expected in (("moving_mean", mean_ref), ("moving_variance", var_ref)):
        got = getattr(bn, name)
        assert got.dtype == before[name].dtype, name
        assert_near(got, expected, stat_rtol, name)
    if grad:
        (y * weights).sum().backward()
        assert x_in.grad.dtype == x.dtype
        assert_near(x_in.grad, grads_ref[0], rtol, "grad x")
        if bn.gamma is not None:
            assert_near(bn.gamma.grad, grads_ref[1], rtol, "grad gamma")
        if bn.beta is not None:
            assert_near(bn.beta.grad, grads_ref[2], rtol, "grad beta")
    return y


# ---------------------------------------------------------------------- masks on any axis

MASK_CASES = [
    ((6, 4), 0),
    ((5, 3, 4), 1),
    ((5, 3, 4), -2),
    ((5, 3, 4), 0),
    ((4, 3, 5, 2), 2),
    ((4, 3, 5, 2), -3),
    ((4, 3, 5, 2), 0),
    ((4, 3, 5, 2), 1),
    ((3, 4, 2, 3, 2), 2),
    ((3, 4, 2, 3, 2), -4),
]


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,axis", MASK_CASES + [((6, 4), -1), ((5, 3, 4), 2), ((3, 4, 2, 3, 2), -1)])
def test_full_mask_on_any_axis_matches_reference(shape, axis, dtype, grad):
    bn = make_layer(shape, axis, dtype=dtype)
    x = random_input(shape, dtype)
    mask = random_mask(mask_shape(shape, axis))
    check_training_call(bn, x, mask, rtol=UNIT[dtype], grad=grad)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((4, 3, 5, 2), 2), ((4, 3, 5, 2), -4)])
def test_mask_dtypes_nonzero_means_true(shape, axis, mask_dtype):
    bn = make_layer(shape, axis)
    x = random_input(shape, seed=1)
    mask = random_mask(mask_shape(shape, axis), mask_dtype, seed=1)
    y = check_training_call(bn, x, mask, rtol=UNIT[torch.float32], seed=1)
    # The same statistics as the boolean mask (non-zero values of any sign or size are True).
    bool_layer = make_layer(shape, axis)
    y_bool = bool_layer(x, training=True, mask=mask != 0)
    assert_near(y, y_bool, 1e-6, "bool vs non-bool mask")
    assert_near(bn.moving_mean, bool_layer.moving_mean, 1e-6)


@pytest.mark.parametrize("broadcast", [(0,), (1,), (0, 1), (0, 2), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_broadcast_mask_matches_reference(axis, broadcast, dtype):
    shape = (4, 3, 5, 2)
    bn = make_layer(shape, axis, dtype=dtype, seed=2)
    x = random_input(shape, dtype, seed=2)
    mask = random_mask(mask_shape(shape, axis, broadcast), torch.int32, seed=2)
    check_training_call(bn, x, mask, rtol=UNIT[dtype], seed=2)


def test_mask_changes_the_statistics_on_a_non_last_axis():
    # Guard against a mask that is silently ignored (the reference comparisons above would then
    # need the masked and unmasked statistics to coincide, which this shows they do not).
    shape, axis = (4, 3, 5, 2), 1
    x = random_input(shape, seed=3)
    mask = torch.zeros(4, 5, 2, dtype=torch.bool)
    mask[:2, :2] = True
    masked, plain = make_layer(shape, axis), make_layer(shape, axis)
    before = snapshot(masked)
    masked(x, training=True, mask=mask)
    plain(x, training=True)
    mean_masked = batch_moments(x, axis, mask)[0]
    assert not torch.allclose(masked.moving_mean, plain.moving_mean, rtol=1e-3)
    expected = 0.8 * before["moving_mean"].double() + 0.2 * mean_masked
    assert_near(masked.moving_mean, expected, 1e-5)


@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((4, 3, 5, 2), 2), ((6, 4), 0)])
def test_mask_in_inference_is_ignored_and_writes_nothing(shape, axis):
    bn = make_layer(shape, axis)
    x = random_input(shape, seed=4)
    before = snapshot(bn)
    y_masked = bn(x, training=False, mask=random_mask(mask_shape(shape, axis), seed=4))
    y_plain = bn(x, training=False)
    assert_state_equal(before, bn)
    assert torch.equal(y_masked, y_plain)
    expected = normalize(x, axis, bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta, bn.epsilon)
    assert_near(y_masked, expected, 1e-5)


# ----------------------------------------------------------------- SPEC 5: nothing lost


@pytest.mark.parametrize(
    "shape,axis",
    [((0, 4), -1), ((0, 3, 4), 1), ((2, 3, 0), 1), ((3, 0), 0), ((2, 0, 3, 2), -1), ((0, 3, 2, 2), 1)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_empty_batch_leaves_moving_statistics_and_normalizes_with_them(shape, axis, masked):
    bn = make_layer(shape, axis)
    before = snapshot(bn)
    x = torch.randn(shape, requires_grad=True)
    mask = torch.ones(mask_shape(shape, axis), dtype=torch.bool) if masked else None
    y = bn(x, training=True, mask=mask)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_state_equal(before, bn)
    y_ref = normalize(x, axis, bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta, bn.epsilon)
    assert torch.equal(y.detach().double(), y_ref.detach())  # both empty: same shape
    (y.sum() + 0.0).backward()
    assert x.grad.shape == x.shape
    assert bool(bn.gamma.grad.isfinite().all()) and bool((bn.gamma.grad == 0).all())
    assert bool(bn.beta.grad.isfinite().all()) and bool((bn.beta.grad == 0).all())
    assert_state_equal(before, bn)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize(
    "shape,axis,broadcast", [((5, 3, 4), 1, ()), ((5, 3, 4), -1, (0, 1)), ((4, 3, 5, 2), 2, (1,)), ((6, 4), 0, ())]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_false_mask_leaves_moving_statistics_and_normalizes_with_them(shape, axis, broadcast, mask_dtype, dtype):
    bn = make_layer(shape, axis, dtype=dtype, seed=5)
    before = snapshot(bn)
    x = random_input(shape, dtype, seed=5)
    mask = torch.zeros(mask_shape(shape, axis, broadcast), dtype=mask_dtype)
    y = check_training_call(bn, x, mask, rtol=UNIT[dtype], seed=5)
    assert_state_equal(before, bn)
    y_inference = bn(x, training=False)
    assert_near(y, y_inference, UNIT[dtype], "all-False mask vs inference")


def test_all_false_mask_gradients_are_finite():
    shape, axis = (4, 3, 5), 1
    bn = make_layer(shape, axis)
    x = random_input(shape).requires_grad_()
    y = bn(x, training=True, mask=torch.zeros(4, 5))
    (y**2).sum().backward()
    for grad in (x.grad, bn.gamma.grad, bn.beta.grad):
        assert grad is not None and bool(grad.isfinite().all())
    # Inference-style gradient: d y / d x = gamma / sqrt(moving_variance + epsilon).
    factor = (bn.gamma / torch.sqrt(bn.moving_variance + bn.epsilon)).detach()
    assert_near(x.grad, 2 * y.detach() * factor[:, None], 1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("shape,axis", [((6, 4), -1), ((4, 3, 5), 1), ((4, 3, 2, 2), 1), ((3, 2, 4), 0)])
@pytest.mark.parametrize("masked", [False, True])
def test_non_finite_channel_keeps_its_moving_statistics(shape, axis, bad, masked):
    bn = make_layer(shape, axis, seed=6)
    before = snapshot(bn)
    x = random_input(shape, seed=6)
    channel = 1
    index = [0] * len(shape)
    index[axis] = channel
    index[(axis + 1) % len(shape)] = shape[(axis + 1) % len(shape)] - 1
    x[tuple(index)] = bad
    mask = None
    if masked:
        mask = torch.ones(mask_shape(shape, axis), dtype=torch.bool)
        mask.view(-1)[1:][::2] = False  # some out, but the position holding `bad` stays in
        unmasked_index = [i for d, i in enumerate(index) if d != axis % len(shape)]
        mask[tuple(unmasked_index)] = True
    y_ref, mean_ref, var_ref, _ = reference_training(bn, x, mask)
    y = bn(x, training=True, mask=mask)
    others = [c for c in range(shape[axis]) if c != channel]
    # The faulty channel: moving statistics kept exactly; its output shows non-finite values.
    assert bn.moving_mean[channel] == before["moving_mean"][channel]
    assert bn.moving_variance[channel] == before["moving_variance"][channel]
    assert not bool(y.select(axis, channel).isfinite().all())
    # The other channels update and normalize as usual.
    assert not torch.equal(bn.moving_mean[others], before["moving_mean"][others])
    assert_near(bn.moving_mean[others], mean_ref[others], 1e-5, "moving_mean")
    assert_near(bn.moving_variance[others], var_ref[others], 1e-5, "moving_variance")
    y_others = y.index_select(axis, torch.tensor(others))
    assert bool(y_others.isfinite().all())
    assert_near(y_others, y_ref.index_select(axis, torch.tensor(others)), 1e-4, "output")
    assert bool(bn.moving_mean.isfinite().all()) and bool(bn.moving_variance.isfinite().all())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -3e38])
@pytest.mark.parametrize("shape,axis", [((6, 4), -1), ((4, 3, 5), 1)])
def test_padding_values_never_enter_the_statistics(shape, axis, value):
    # Padding never enters the statistics (Keras's where(mask, x, 0)), whatever it holds: NaN, Inf,
    # or a large sentinel whose square would overflow float32.
    bn = make_layer(shape, axis, seed=8)
    x = random_input(shape, seed=8)
    mask = torch.ones(mask_shape(shape, axis), dtype=torch.bool)
    mask.view(-1)[0] = False
    x[(0,) * len(shape)] = value
    _, mean_ref, var_ref, _ = reference_training(bn, x, mask)
    y = bn(x, training=True, mask=mask)
    assert bool(bn.moving_mean.isfinite().all()) and bool(bn.moving_variance.isfinite().all())
    assert_near(bn.moving_mean, mean_ref, 1e-5, "moving_mean")
    assert_near(bn.moving_variance, var_ref, 1e-5, "moving_variance")
    assert int((~y.isfinite()).sum()) <= 1  # only the padded value itself, if it is not finite


def test_non_finite_channel_then_clean_batch_resumes_updates():
    shape, axis = (8, 3), -1
    bn = make_layer(shape, axis)
    x = random_input(shape)
    x[2, 0] = float("nan")
    bn(x, training=True)
    clean = random_input(shape, seed=7)
    _, mean_ref, var_ref, _ = reference_training(bn, clean)
    bn(clean, training=True)
    assert_near(bn.moving_mean, mean_ref, 1e-5)
    assert_near(bn.moving_variance, var_ref, 1e-5)


# ----------------------------------------------------------------------- stable numerics

LARGE_MEAN_LAYOUTS = [((512, 8), -1), ((8, 512), 0), ((64, 8, 4, 4), 1), ((32, 4, 4, 8), -1), ((32, 4, 4, 8), 3)]


def _check_large_mean(x, axis, mask):
    bn = BatchNormalization(axis=axis, momentum=0.0)
    y = bn(x, training=True, mask=mask)
    mean, var, _ = batch_moments(x, axis, mask)  # float64 statistics of the same float32 data
    assert bool((bn.moving_variance >= 0).all())
    # Variance: accurate to float32 rounding of the data's spread.
    rel = ((bn.moving_variance.double() - var).abs() / var).max().item()
    assert rel < 1e-3, f"variance relative error {rel:.3g} (batch variance {var.mean().item():.3g})"
    # Mean: within one float32 ulp of the exact mean.
    ulps = ((bn.moving_mean.double() - mean).abs() / (EPS32 * mean.abs())).max().item()
    assert ulps <= 1.0, f"mean off by {ulps:.3g} ulp"
    # Output: the only error allowed is the float32 rounding of the mean, times gamma/std.
    y_ref = normalize(x, axis, mean, var, bn.gamma, bn.beta, bn.epsilon)
    invstd = 1 / torch.sqrt(var + bn.epsilon)
    bound = 4 * EPS32 * (mean.abs() * invstd).max().item() + 1e-5 * y_ref.abs().max().item()
    err = (y.double() - y_ref).abs().max().item()
    assert err <= bound, f"output error {err:.3g} > {bound:.3g} (max |y| {y_ref.abs().max().item():.3g})"


@pytest.mark.parametrize("base,spread", [(3000.7, 1e-3), (1e4, 1e-2)])
@pytest.mark.parametrize("shape,axis", LARGE_MEAN_LAYOUTS)
def test_large_mean_variance_is_accurate_unmasked(shape, axis, base, spread):
    g = torch.Generator().manual_seed(8)
    x = (base + spread * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    _check_large_mean(x, axis, None)


@pytest.mark.parametrize("base,spread", [(3000.7, 1e-3), (1e4, 1e-2)])
@pytest.mark.parametrize("shape,axis", LARGE_MEAN_LAYOUTS)
@pytest.mark.parametrize("mask_kind", ["all", "partial"])
def test_large_mean_variance_is_accurate_masked(shape, axis, base, spread, mask_kind):
    g = torch.Generator().manual_seed(9)
    x = (base + spread * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    mask = torch.ones(mask_shape(shape, axis), dtype=torch.bool)
    if mask_kind == "partial":
        mask = random_mask(mask.shape, seed=9)
    _check_large_mean(x, axis, mask)


@pytest.mark.parametrize("shape,axis", [((512, 8), -1), ((64, 8, 4, 4), 1)])
def test_large_mean_takes_the_shifted_kernel_not_welford(shape, axis, monkeypatch):
    # Beyond the kernel's accuracy limit the kernel runs again on the input shifted by its mean;
    # Welford (slow on CPU) is not needed, not even for a channel constant up to rounding.
    import batchnorm._kernels

    monkeypatch.setattr(batchnorm._kernels, "moments", lambda *a: pytest.fail("Welford fallback used"))
    _check_large_mean(random_input(shape, seed=12, scale=1e-2, offset=1e4), axis, None)
    bn = BatchNormalization(axis=axis, momentum=0.0)
    bn(torch.full(shape, 3000.7), training=True)
    assert bool((bn.moving_variance >= 0).all())
    assert bn.moving_variance.max().item() <= (EPS32 * 3000.7) ** 2


# PyTorch's CPU statistics kernels add each channel of an (M, C) view up row after row in float32:
# taken whole, 2**20 rows gave the variance 1.7e-4 off and, 256 standard deviations from 0, the
# mean 2.5e-3 sd off. Inputs with only size-1 dimensions after the axis are such views too, and so
# are channels_last inputs with axis=1; a row count that the row groups do not divide leaves rows over.
@pytest.mark.parametrize("offset", [2.0, 100.0])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(
    "shape,axis,memory_format",
    [
        ((2**20, 2), -1, torch.contiguous_format),
        ((2**18, 4, 1, 1), 1, torch.contiguous_format),
        ((2**20 + 3, 2), -1, torch.contiguous_format),
        ((2**14, 2, 8, 8), 1, torch.channels_last),
    ],
)
def test_many_rows_keep_float32_accuracy(shape, axis, memory_format, grad, masked, offset):
    x = random_input(shape, seed=40, scale=1.0, offset=offset).to(memory_format=memory_format)
    mask = random_mask(mask_shape(shape, axis), seed=40) if masked else None
    bn = BatchNormalization(axis=axis, momentum=0.0)
    with torch.set_grad_enabled(grad):
        y = bn(x.requires_grad_(grad), training=True, mask=mask)
    mean, var, _ = batch_moments(x.detach(), axis, mask)
    sd = var.sqrt()
    # The mean within 1e-5 sd beyond its own float32 rounding; the variance within 1e-5.
    mean_error = ((bn.moving_mean.double() - mean).abs() / sd).max().item()
    assert mean_error <= 1e-5 + EPS32 * (mean.abs() / sd).max().item(), f"mean off by {mean_error:.3g} sd"
    var_error = ((bn.moving_variance.double() - var).abs() / var).max().item()
    assert var_error <= 1e-5, f"variance relative error {var_error:.3g}"
    y_ref = normalize(x.detach(), axis, mean, var, bn.gamma, bn.beta, bn.epsilon)
    assert_near(y, y_ref, 2e-5, "output")


@pytest.mark.parametrize("rows", [4097, 3 * 4096 + 2, 5 * 4096])
def test_row_groups_count_every_row_once(rows):
    # Views of more than 4096 rows take their statistics in row groups plus the rows left over:
    # distinct values in the first and last rows show a row dropped or counted twice.
    x = random_input((rows, 3), seed=42, scale=1.0, offset=0.0)
    x[0], x[-2:] = 50.0, -30.0
    bn = BatchNormalization(momentum=0.0)
    bn(x, training=True)
    mean, var, _ = batch_moments(x, -1)
    assert ((bn.moving_mean.double() - mean).abs() / var.sqrt()).max().item() <= 1e-6
    assert_near(bn.moving_variance, var, 1e-6, "variance")


@pytest.mark.parametrize("grad", [False, True])
def test_many_16_bit_elements_per_channel_keep_float32_statistics(grad):
    # PyTorch's mixed 16-bit kernel on an (A, C, B) view: 2**20 elements per channel taken whole
    # gave the variance 7e-5 off.
    shape, axis = (256, 4, 64, 64), 1
    x = random_input(shape, torch.bfloat16, seed=41, scale=1.0, offset=1.0)
    bn = BatchNormalization(axis=axis, momentum=0.0)
    with torch.set_grad_enabled(grad):
        bn(x.requires_grad_(grad), training=True)
    mean, var, _ = batch_moments(x.detach(), axis)
    assert ((bn.moving_mean.double() - mean).abs() / var.sqrt()).max().item() <= 1e-5
    assert ((bn.moving_variance.double() - var).abs() / var).max().item() <= 2e-5


@pytest.mark.parametrize("value", [3000.7, 1e4, -12345.678, 0.1])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape,axis", [((64, 4), -1), ((16, 4, 3, 3), 1)])
def test_constant_channel_has_zero_variance_never_negative(value, masked, shape, axis):
    bn = BatchNormalization(axis=axis, momentum=0.0)
    x = torch.full(shape, value, dtype=torch.float32)
    mask = torch.ones(mask_shape(shape, axis)) if masked else None
    y = bn(x, training=True, mask=mask)
    assert bool((bn.moving_variance >= 0).all())
    # E[x^2] - E[x]^2 in float32 would give errors of the order of |x|^2 * 1e-7.
    assert bn.moving_variance.max().item() <= (EPS32 * abs(value)) ** 2
    assert bool((y.abs() <= 4 * EPS32 * abs(value) / bn.epsilon**0.5).all())  # output ~ beta = 0


# ------------------------------------------------------------------ one element per channel


@pytest.mark.parametrize(
    "shape,axis", [((1, 5), -1), ((1, 5), 1), ((1, 3, 1, 1), 1), ((5,), 0), ((1, 1, 4), -1), ((5,), -1)]
)
def test_one_element_per_channel_gives_beta_and_zero_variance(shape, axis):
    bn = make_layer(shape, axis, momentum=0.5)
    before = snapshot(bn)
    x = random_input(shape, seed=10).requires_grad_()
    y = bn(x, training=True)
    channel_shape = [1] * len(shape)
    channel_shape[axis] = shape[axis]
    beta = bn.beta.detach().reshape(channel_shape).expand(shape)
    torch.testing.assert_close(y.detach(), beta, rtol=0, atol=1e-4)
    torch.testing.assert_close(bn.moving_variance, 0.5 * before["moving_variance"], rtol=1e-6, atol=0)
    torch.testing.assert_close(
        bn.moving_mean, 0.5 * before["moving_mean"] + 0.5 * x.detach().reshape(-1), rtol=1e-6, atol=1e-7
    )
    y.sum().backward()
    assert bool(x.grad.isfinite().all())


def test_one_masked_in_element_per_channel_gives_beta():
    shape, axis = (3, 4, 2), 1
    bn = make_layer(shape, axis, momentum=0.0)
    x = random_input(shape, seed=11)
    mask = torch.zeros(3, 2, dtype=torch.bool)
    mask[1, 0] = True
    y = bn(x, training=True, mask=mask)
    torch.testing.assert_close(bn.moving_variance, torch.zeros(4), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.moving_mean, x[1, :, 0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y[1, :, 0], bn.beta.detach(), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,axis", [((16, 6), -1), ((4, 6, 3, 3), 1), ((3, 4, 6), 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_16_bit_inputs_return_their_dtype_with_float32_statistics(shape, axis, dtype, masked):
    bn = make_layer(shape, axis, seed=12)
    x = random_input(shape, dtype, seed=12)
    mask = random_mask(mask_shape(shape, axis), seed=12) if masked else None
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(13)).to(dtype)
    y_ref, mean_ref, var_ref, grads_ref = reference_training(bn, x, mask, weights)
    x_in = x.clone().requires_grad_()
    y = bn(x_in, training=True, mask=mask)
    assert y.dtype == dtype
    assert bn.moving_mean.dtype == torch.float32 and bn.moving_variance.dtype == torch.float32
    # Statistics from the exact upcast data, in float32.
    assert_near(bn.moving_mean, mean_ref, 1e-5, "moving_mean")
    assert_near(bn.moving_variance, var_ref, 1e-5, "moving_variance")
    # Output: the reference rounded once to the 16-bit dtype.
    unit = UNIT[dtype]
    torch.testing.assert_close(y.double(), y_ref, rtol=unit, atol=unit)
    (y * weights).sum().backward()
    assert x_in.grad.dtype == dtype
    assert_near(x_in.grad, grads_ref[0], 4 * unit, "grad x")
    assert_near(bn.gamma.grad, grads_ref[1], 4 * unit, "grad gamma")
    assert_near(bn.beta.grad, grads_ref[2], 4 * unit, "grad beta")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_input_inference_returns_its_dtype(dtype):
    shape, axis = (4, 5, 3), 1
    bn = make_layer(shape, axis)
    before = snapshot(bn)
    x = random_input(shape, dtype)
    y = bn(x, training=False)
    assert y.dtype == dtype
    expected = normalize(x, axis, bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta, bn.epsilon)
    torch.testing.assert_close(y.double(), expected, rtol=UNIT[dtype], atol=UNIT[dtype])
    assert_state_equal(before, bn)


@pytest.mark.parametrize("shape,axis", [((16, 6), -1), ((4, 6, 3, 3), 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_float64_inputs_compute_in_float64_with_float32_weights(shape, axis, masked):
    bn = make_layer(shape, axis, seed=14)
    assert bn.gamma.dtype == torch.float32
    # Data whose float32 rounding would be visible at a 1e-10 tolerance.
    x = random_input(shape, torch.float64, seed=14) + 1e-9 * random_input(shape, torch.float64, seed=15)
    mask = random_mask(mask_shape(shape, axis), seed=14) if masked else None
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    y_ref, mean_ref, var_ref, grads_ref = reference_training(bn, x, mask, weights)
    x_in = x.clone().requires_grad_()
    y = bn(x_in, training=True, mask=mask)
    assert y.dtype == torch.float64
    assert_near(y, y_ref, 1e-10, "output")
    assert bn.moving_mean.dtype == torch.float32
    assert_near(bn.moving_mean, mean_ref, 2 * EPS32, "moving_mean")  # float64 result stored in float32
    assert_near(bn.moving_variance, var_ref, 2 * EPS32, "moving_variance")
    (y * weights).sum().backward()
    assert x_in.grad.dtype == torch.float64
    assert_near(x_in.grad, grads_ref[0], 1e-10, "grad x")
    assert bn.gamma.grad.dtype == torch.float32
    assert_near(bn.gamma.grad, grads_ref[1], 2 * EPS32, "grad gamma")
    assert_near(bn.beta.grad, grads_ref[2], 2 * EPS32, "grad beta")


@pytest.mark.parametrize("input_dtype", [torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool])
@pytest.mark.parametrize(
    "layer_dtype,expected", [(None, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16)]
)
@pytest.mark.parametrize("training", [True, False])
def test_integer_and_bool_inputs_take_the_weights_dtype(input_dtype, layer_dtype, expected, training):
    shape, axis = (6, 4, 3), 1
    bn = make_layer(shape, axis, dtype=layer_dtype, seed=17)
    g = torch.Generator().manual_seed(17)
    low = 0 if input_dtype in (torch.uint8, torch.bool) else -5
    x = torch.randint(low, 6, shape, generator=g)
    x = (x > 2) if input_dtype == torch.bool else x.to(input_dtype)
    before = snapshot(bn)
    y_ref, mean_ref, var_ref, _ = reference_training(bn, x)
    y = bn(x, training=training)
    assert y.dtype == expected
    rtol = UNIT[expected]
    if training:
        assert_near(y, y_ref, rtol, "output")
        assert_near(bn.moving_mean, mean_ref, rtol, "moving_mean")
        assert_near(bn.moving_variance, var_ref, rtol, "moving_variance")
    else:
        assert_state_equal(before, bn)
        assert_near(y, normalize(x, axis, bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta, bn.epsilon), rtol)
    assert bn.moving_mean.dtype == expected


def test_integer_input_with_mask_on_non_last_axis():
    shape, axis = (5, 3, 4), 1
    bn = make_layer(shape, axis)
    x = torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(18))
    mask = random_mask((5, 4), torch.int64, seed=18)
    check_training_call(bn, x, mask, rtol=UNIT[torch.float32], grad=False, out_dtype=torch.float32)


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_16_bit_layer_dtype_keeps_16_bit_weights_but_computes_in_float32(weight_dtype, masked):
    shape, axis = (8, 5, 3), 1
    bn = make_layer(shape, axis, dtype=weight_dtype, seed=19)
    for tensor in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance):
        assert tensor.dtype == weight_dtype
    # Values chosen so that 16-bit arithmetic would be visibly off at a 1e-5 tolerance.
    x = random_input(shape, torch.float32, seed=19, scale=3.3, offset=7.1)
    mask = random_mask((8, 3), seed=19) if masked else None
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(20))
    y_ref, mean_ref, var_ref, grads_ref = reference_training(bn, x, mask, weights)
    x_in = x.clone().requires_grad_()
    y = bn(x_in, training=True, mask=mask)
    assert y.dtype == torch.float32
    assert_near(y, y_ref, 1e-5, "output")
    # Moving statistics: the float32 update, rounded once to the weights' dtype.
    for name, expected in (("moving_mean", mean_ref), ("moving_variance", var_ref)):
        got = getattr(bn, name)
        assert got.dtype == weight_dtype
        torch.testing.assert_close(got.double(), expected.to(weight_dtype).double(), rtol=UNIT[weight_dtype], atol=0)
    (y * weights).sum().backward()
    assert_near(x_in.grad, grads_ref[0], 1e-4, "grad x")
    assert bn.gamma.grad.dtype == weight_dtype
    assert_near(bn.gamma.grad, grads_ref[1], 2 * UNIT[weight_dtype], "grad gamma")
    # Inference also computes in float32 with the 16-bit weight values.
    y_inf = bn(x, training=False)
    expected = normalize(x, axis, bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta, bn.epsilon)
    assert y_inf.dtype == torch.float32
    assert_near(y_inf, expected, 1e-5, "inference output")


@pytest.mark.parametrize("masked", [False, True])
def test_16_bit_gamma_and_beta_beside_float32_buffers(masked):
    # FSDP's mixed precision casts parameters, not buffers: the call casts each weight it needs,
    # and computes as a float32 layer holding the same (16-bit-representable) values would.
    shape, axis = (8, 5, 3), 1
    bn = make_layer(shape, axis, seed=23)
    twin = make_layer(shape, axis, seed=23)
    with torch.no_grad():
        for layer in (bn, twin):
            layer.gamma.copy_(layer.gamma.bfloat16())
            layer.beta.copy_(layer.beta.bfloat16())
    bn.gamma.data, bn.beta.data = bn.gamma.data.bfloat16(), bn.beta.data.bfloat16()
    x = random_input(shape, torch.bfloat16, seed=23)
    mask = random_mask((8, 3), seed=23) if masked else None
    for training in (True, False):
        y, y_twin = bn(x, training=training, mask=mask), twin(x, training=training, mask=mask)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, y_twin), f"training={training}"
    assert torch.equal(bn.moving_mean, twin.moving_mean) and torch.equal(bn.moving_variance, twin.moving_variance)


@pytest.mark.parametrize("masked", [False, True])
def test_float64_layer_keeps_float64_moving_statistics_with_float32_inputs(masked):
    # momentum=1: moving = moving * 1 + batch * 0 = moving, exactly. A float64 buffer must not be
    # rounded to float32 on the way (dtype=float64 is honoured for the weights, SPEC 2).
    shape, axis = (6, 3, 4), 1
    bn = make_layer(shape, axis, dtype=torch.float64, momentum=1.0)
    with torch.no_grad():
        bn.moving_mean.copy_(torch.tensor([1 / 3, -2 / 7, 5 / 11], dtype=torch.float64))
        bn.moving_variance.copy_(torch.tensor([2 / 3, 1 / 7, 9 / 13], dtype=torch.float64))
    before = snapshot(bn)
    mask = random_mask((6, 4), seed=22) if masked else None
    y = bn(random_input(shape, torch.float32, seed=22), training=True, mask=mask)
    assert y.dtype == torch.float32
    assert_state_equal(before, bn)


# ------------------------------------------------------------------------- several steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,axis", [((6, 3, 4, 2), 1), ((6, 3, 4, 2), -1), ((5, 4), 0)])
def test_consecutive_training_steps_track_reference_statistics(shape, axis, dtype):
    bn = make_layer(shape, axis, momentum=0.7, dtype=dtype, seed=21)
    moving_mean = bn.moving_mean.double().clone()
    moving_var = bn.moving_variance.double().clone()
    gamma, beta = bn.gamma.detach().double(), bn.beta.detach().double()
    for step in range(6):
        x = random_input(shape, dtype, seed=100 + step, scale=1 + step, offset=step - 2.5)
        mask = random_mask(mask_shape(shape, axis), seed=step) if step % 2 else None
        y_ref, moving_mean, moving_var = training_step(
            x, axis, gamma, beta, moving_mean, moving_var, bn.momentum, bn.epsilon, mask
        )
        y = bn(x, training=True, mask=mask)
        assert_near(y, y_ref, UNIT[dtype], f"output, step {step}")
        assert_near(bn.moving_mean, moving_mean, UNIT[dtype], f"moving_mean, step {step}")
        assert_near(bn.moving_variance, moving_var, UNIT[dtype], f"moving_variance, step {step}")
    bn.eval()
    x = random_input(shape, dtype, seed=200)
    assert_near(bn(x), normalize(x, axis, moving_mean, moving_var, gamma, beta, bn.epsilon), UNIT[dtype], "inference")


# ----------------------------------------------------------------- fast paths and their fallbacks


# fast; fast at the masked check's limit (mean^2 ~ 3.6 var, folded backward); masked falls back
# on other axes; both fall back (the shifted kernel)
@pytest.mark.parametrize("offset", [0.0, 1.9, 3.0, 300.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("axis", [1, -1])
def test_fast_paths_and_fallbacks_match_the_reference(axis, grad, masked, layout, dtype, offset):
    # Sizes large enough for PyTorch's vectorized kernels and, on axis -1, for the folded
    # normalization (2**16 elements); a transposed input stays a strided view (axis -1: a strided
    # (M, C) view). grad=False: the paths for calls autograd does not record.
    shape, stored = ((64, 12, 32), (64, 32, 12)) if axis == 1 else ((6144, 12), (12, 6144))
    x = random_input(shape, dtype, seed=30, scale=1.0, offset=offset)
    if layout == "transposed":
        x = random_input(stored, dtype, seed=30, scale=1.0, offset=offset).transpose(-1, -2)
    mask = random_mask(mask_shape(shape, axis), seed=30) if masked else None
    bn = make_layer(shape, axis, seed=30, momentum=0.0)
    x = x.requires_grad_(grad)
    upstream = random_input(shape, torch.float64, seed=31, offset=0.0)
    y_ref, mean_ref, var_ref, grads_ref = reference_training(bn, x.detach(), mask, weights=upstream)
    with torch.enable_grad() if grad else torch.no_grad():
        y = bn(x, training=True, mask=mask)
    # Statistics are float32 arithmetic whatever the input's dtype; the output is rounded to it.
    assert_near(bn.moving_mean, mean_ref, 1e-5, "moving_mean")
    assert_near(bn.moving_variance, var_ref, 1e-4, "moving_variance")
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    assert_near(y, y_ref, tolerance, "output")
    if grad:
        (y.double() * upstream).sum().backward()
        assert_near(x.grad, grads_ref[0], tolerance * 5, "grad x")


@pytest.mark.parametrize("seed", range(6))
def test_masked_gradient_with_one_element_and_small_epsilon(seed):
    # The variance is 0, so invstd = 1/sqrt(epsilon) is large: the gradient's statistics term must
    # be formed from x - mean (PyTorch's folded x * a + b cancels catastrophically there).
    shape, axis = (1, 1, 3), 0
    bn = make_layer(shape, axis, seed=seed, epsilon=1e-5, momentum=0.0)
    x = random_input(shape, seed=seed, scale=10.0, offset=0.0)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    mask[0, seed % 3] = True
    upstream = random_input(shape, torch.float64, seed=seed + 50, offset=0.0)
    _, _, _, grads_ref = reference_training(bn, x, mask, weights=upstream)
    x = x.requires_grad_()
    (bn(x, training=True, mask=mask).double() * upstream).sum().backward()
    assert_near(x.grad, grads_ref[0], 1e-4, "grad x")


@pytest.mark.parametrize("shape,axis", [((6, 4), -1), ((3, 4, 5), 1), ((4100, 2), -1)])  # last: in blocks
def test_second_derivatives_match_the_reference(shape, axis):
    # Gradient penalties differentiate the gradient: the fused kernel's and the blocked path's
    # (PyTorch's native backward) are differentiable again.
    bn = make_layer(shape, axis, seed=60, dtype=torch.float64)
    x = random_input(shape, torch.float64, seed=60).requires_grad_()
    upstream, direction = (random_input(shape, torch.float64, seed=s, offset=0.0) for s in (61, 62))

    def second_derivative(y):
        (grad,) = torch.autograd.grad((y * upstream).sum(), x, create_graph=True)
        return torch.autograd.grad((grad * direction).sum(), x)[0]

    mean, var, _ = batch_moments(x, axis)
    expected = second_derivative(normalize(x, axis, mean, var, bn.gamma, bn.beta, bn.epsilon))
    assert_near(second_derivative(bn(x, training=True)), expected, 1e-8, "second derivative")


def test_masked_second_derivative_refuses_rather_than_being_wrong():
    # The masked backward's formulas take the statistics as constants: differentiating them again
    # would silently drop terms, so PyTorch is told it cannot be (once_differentiable).
    x = random_input((6, 4), torch.float64, seed=63).requires_grad_()
    bn = BatchNormalization(dtype=torch.float64)
    y = bn(x, training=True, mask=torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.bool))
    (grad,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_folded_normalization_without_gamma_or_beta(center, scale, training):
    # An (M, C) view of 2**16 elements or more, where autograd records nothing, folds the
    # normalization into one addcmul: the missing weight must count as 1, the missing bias as 0.
    shape, axis = (4096, 20), -1
    bn = make_layer(shape, axis, seed=40, center=center, scale=scale)
    x = random_input(shape, seed=40)
    if training:
        check_training_call(bn, x, rtol=UNIT[torch.float32], grad=False)
        return
    with torch.no_grad():
        y = bn(x, training=False)
    expected = normalize(x, axis, bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta, bn.epsilon)
    assert_near(y, expected, UNIT[torch.float32], "output")


# On CPU the (M, C) views of channels-last data reach PyTorch's kernels as (1, C, 1, M)
# channels-last tensors, where their backward goes wrong if the output gradient comes in another
# layout: every upstream gradient layout must give the reference's gradients.
UPSTREAM_LAYOUTS = {
    "contiguous": lambda g: g.contiguous(),
    "transposed": lambda g: g.transpose(0, 1).contiguous().transpose(0, 1),
    "expanded": lambda g: g[..., :1].expand_as(g),
    "channels sliced": lambda g: torch.cat([g, g], dim=-1)[..., : g.shape[-1]],
}


@pytest.mark.parametrize("layout", list(UPSTREAM_LAYOUTS))
@pytest.mark.parametrize("mode", ["training", "masked", "inference"])
@pytest.mark.parametrize("shape", [(6, 8, 40), (5000, 3)], ids=["rows", "row groups"])
def test_gradients_for_every_upstream_layout(layout, mode, shape):
    x = random_input(shape, seed=43)
    mask = random_mask(mask_shape(shape, -1), seed=43) if mode == "masked" else None
    bn = make_layer(shape, -1, seed=43)
    upstream = UPSTREAM_LAYOUTS[layout](torch.randn(shape, generator=torch.Generator().manual_seed(7)))
    x_in = x.clone().requires_grad_()
    y = bn(x_in, training=mode != "inference", mask=mask)
    y.backward(upstream)
    if mode == "inference":
        x64 = x.double().requires_grad_()
        gamma, beta = (w.detach().double().requires_grad_() for w in (bn.gamma, bn.beta))
        (
            normalize(x64, -1, bn.moving_mean, bn.moving_variance, gamma, beta, bn.epsilon) * upstream.double()
        ).sum().backward()
        expected = (x64.grad, gamma.grad, beta.grad)
    else:
        fresh = make_layer(shape, -1, seed=43)
        expected = reference_training(fresh, x, mask, upstream)[3]
    for name, got, want in zip(
        ("grad x", "grad gamma", "grad beta"), (x_in.grad, bn.gamma.grad, bn.beta.grad), expected
    ):
        assert_near(got, want, 1e-4, name)
