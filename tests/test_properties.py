"""Hypothesis property tests: the layer equals the float64 reference of the SPEC formulas.

Random shapes (rank 1-5, small sizes including 1), any valid axis (negative too), optional masks
(random broadcast 1s, any mask dtype), input dtypes float32/float64/bfloat16/float16, weight dtypes
float32/float64/bfloat16, center/scale, momentum/epsilon, the mode rule (``training`` argument,
``train()``/``eval()``, ``trainable``) and non-contiguous inputs.

Tolerances follow the arithmetic the SPEC prescribes: the compute dtype is float64 for float64
inputs and float32 otherwise; outputs are rounded once to the input's dtype and moving statistics
once to the weights' dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import batch_moments, normalize, training_step

from batchnorm import BatchNormalization

INPUT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
WEIGHT_DTYPES = [None, torch.float64, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.int64, torch.float32, torch.uint8]

# Relative tolerance of a result computed in a dtype (reductions included) or rounded to it.
COMPUTE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}
ROUNDING = {
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float32: 2 * torch.finfo(torch.float32).eps,
    torch.float64: 2 * torch.finfo(torch.float64).eps,
}

# No derandomize here: the profile that tests/conftest.py loads decides (repeatable by default).
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compute_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype == torch.float64 else torch.float32


@st.composite
def cases(draw, *, max_rank=5, max_size=4):
    rank = draw(st.integers(1, max_rank))
    shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=rank, max_size=rank)))
    axis = draw(st.integers(-rank, rank - 1))
    mask_shape = None
    if draw(st.booleans()):
        other = [size for d, size in enumerate(shape) if d != axis % rank]
        mask_shape = tuple(1 if draw(st.booleans()) else size for size in other)
    return dict(
        shape=shape,
        axis=axis,
        mask_shape=mask_shape,
        mask_dtype=draw(st.sampled_from(MASK_DTYPES)),
        mask_density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        dtype=draw(st.sampled_from(INPUT_DTYPES)),
        weight_dtype=draw(st.sampled_from(WEIGHT_DTYPES)),
        center=draw(st.booleans()),
        scale=draw(st.booleans()),
        momentum=draw(st.one_of(st.sampled_from([0.0, 0.99, 1.0]), st.floats(0.0, 1.0))),
        epsilon=draw(st.one_of(st.sampled_from([1e-3, 1e-5]), st.floats(1e-5, 1.0))),
        x_scale=draw(st.floats(0.1, 10.0)),
        x_offset=draw(st.floats(-5.0, 5.0)),
        permutation=draw(st.permutations(range(rank))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_layer(case) -> BatchNormalization:
    bn = BatchNormalization(
        axis=case["axis"],
        momentum=case["momentum"],
        epsilon=case["epsilon"],
        center=case["center"],
        scale=case["scale"],
        dtype=case["weight_dtype"],
    )
    bn.build(case["shape"])
    channels = case["shape"][case["axis"]]
    g = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        if bn.gamma is not None:
            bn.gamma.copy_(
                (torch.rand(channels, generator=g) * 1.5 + 0.5) * torch.sign(torch.randn(channels, generator=g))
            )
        if bn.beta is not None:
            bn.beta.copy_(torch.randn(channels, generator=g))
        bn.moving_mean.copy_(torch.randn(channels, generator=g) * 2)
        bn.moving_variance.copy_(torch.rand(channels, generator=g) * 3 + 0.05)
    return bn


def make_input(case) -> torch.Tensor:
    """A random input of ``case["shape"]``, non-contiguous unless the permutation is the identity."""
    g = torch.Generator().manual_seed(case["seed"])
    perm = case["permutation"]
    stored_shape = [case["shape"][p] for p in perm]
    data = torch.randn(stored_shape, generator=g, dtype=torch.float64) * case["x_scale"] + case["x_offset"]
    inverse = [perm.index(d) for d in range(len(perm))]
    x = data.to(case["dtype"]).permute(inverse)
    assert x.shape == case["shape"]
    return x


def make_mask(case):
    if case["mask_shape"] is None:
        return None
    g = torch.Generator().manual_seed(case["seed"] + 2)
    keep = torch.rand(case["mask_shape"], generator=g) < case["mask_density"]
    dtype = case["mask_dtype"]
    if dtype == torch.bool:
        return keep
    values = torch.randint(1, 5, case["mask_shape"], generator=g).to(dtype)
    if dtype.is_floating_point:
        values = values * torch.where(torch.rand(case["mask_shape"], generator=g) < 0.5, -0.75, 1.0)
    return torch.where(keep, values, torch.zeros((), dtype=dtype))


def snapshot(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def channel_vector(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return v.reshape(shape)


def output_tolerance(case, x, mean, var, gamma, y_ref):
    """Absolute tolerance on the output.

    The compute dtype's relative tolerance on ``|y|``, plus the rounding of the statistics and of
    ``x`` in the compute dtype, magnified by ``|gamma| / sqrt(var + epsilon)`` (what any
    ``x * a + b`` kernel loses: ``|x| * |a| * eps``), plus the output's rounding to a 16-bit dtype.
    """
    cdt = compute_dtype(case["dtype"])
    axis = case["axis"] % x.dim()
    dims = [d for d in range(x.dim()) if d != axis]
    x64 = x.double()
    magnitude = x64.abs().amax(dims) if dims else x64.abs()
    magnitude = torch.maximum(magnitude, mean.double().abs())
    factor = 1 / torch.sqrt(var.double() + case["epsilon"])
    if gamma is not None:
        factor = factor * gamma.detach().double().abs()
    y_scale = y_ref.abs().max().item() if y_ref.numel() else 0.0
    finite = magnitude * factor
    amplified = finite[finite.isfinite()].max().item() if finite.numel() else 0.0
    tol = COMPUTE_RTOL[cdt] * max(y_scale, 1e-2) + 8 * ROUNDING[cdt] * amplified
    if case["dtype"] in (torch.float16, torch.bfloat16):
        tol += ROUNDING[case["dtype"]] * y_scale
    return tol


def check_close(got, expected, atol, rtol, what):
    torch.testing.assert_close(
        got.detach().double(),
        expected.detach().double(),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def stat_tolerance(case, expected):
    """(rtol, atol) for the moving statistics: computed in the compute dtype, stored in the weights'."""
    cdt = compute_dtype(case["dtype"])
    weight_dtype = case["weight_dtype"] or torch.float32
    rtol = max(COMPUTE_RTOL[cdt], ROUNDING[weight_dtype])
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return rtol, rtol * max(scale, 1e-3)


# ------------------------------------------------------------------------------ properties


@pytest.mark.slow  # ~3.7 s: 400 examples
@settings(max_examples=400, **SETTINGS)
@given(
    case=cases(),
    training_arg=st.sampled_from([True, False, None]),
    module_training=st.booleans(),
    trainable=st.booleans(),
)
def test_layer_matches_reference(case, training_arg, module_training, trainable):
    bn = make_layer(case)
    bn.train(module_training)
    bn.trainable = trainable
    x = make_input(case)
    mask = make_mask(case)
    axis = case["axis"]
    before = snapshot(bn)
    uses_batch_statistics = (module_training if training_arg is None else training_arg) and trainable

    gamma = None if bn.gamma is None else bn.gamma.detach()
    beta = None if bn.beta is None else bn.beta.detach()
    x64 = x.detach().double()
    if uses_batch_statistics:
        y_ref, mean_ref, var_ref = training_step(
            x64,
            axis,
            gamma,
            beta,
            before["moving_mean"],
            before["moving_variance"],
            case["momentum"],
            case["epsilon"],
            mask,
        )
        mean_used, var_used, count = batch_moments(x64, axis, mask)
        if bool((count == 0).all()):
            mean_used, var_used = before["moving_mean"], before["moving_variance"]
    else:
        mean_used, var_used = before["moving_mean"], before["moving_variance"]
        y_ref = normalize(x64, axis, mean_used, var_used, gamma, beta, case["epsilon"])

    y = bn(x, training=training_arg, mask=mask)

    assert y.shape == x.shape and y.dtype == x.dtype
    atol = output_tolerance(case, x, mean_used, var_used, gamma, y_ref)
    check_close(y, y_ref, atol, COMPUTE_RTOL[compute_dtype(case["dtype"])], "output")
    if uses_batch_statistics:
        for name, expected in (("moving_mean", mean_ref), ("moving_variance", var_ref)):
            got = getattr(bn, name)
            assert got.dtype == before[name].dtype
            rtol, stat_atol = stat_tolerance(case, expected)
            check_close(got, expected.to(got.dtype), stat_atol, rtol, name)
        assert bool((bn.moving_variance >= 0).all())
    else:
        # Inference never writes to any buffer (nor to the parameters).
        for key, value in before.items():
            assert torch.equal(bn.state_dict()[key], value), key


@settings(max_examples=200, **SETTINGS)
@given(
    case=cases().filter(lambda c: c["dtype"] in (torch.float32, torch.float64)),
    training=st.booleans(),
)
def test_gradients_match_reference(case, training):
    bn = make_layer(case)
    x = make_input(case)
    mask = make_mask(case)
    axis = case["axis"]
    g = torch.Generator().manual_seed(case["seed"] + 3)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)

    x64 = x.detach().double().requires_grad_()
    gamma64 = None if bn.gamma is None else bn.gamma.detach().double().requires_grad_()
    beta64 = None if bn.beta is None else bn.beta.detach().double().requires_grad_()
    if training:
        y_ref, _, _ = training_step(
            x64, axis, gamma64, beta64, bn.moving_mean, bn.moving_variance, case["momentum"], case["epsilon"], mask
        )
        mean_used, var_used, count = batch_moments(x64.detach(), axis, mask)
        if bool((count == 0).all()):
            mean_used, var_used = bn.moving_mean, bn.moving_variance
    else:
        mean_used, var_used = bn.moving_mean, bn.moving_variance
        y_ref = normalize(x64, axis, mean_used, var_used, gamma64, beta64, case["epsilon"])
    (y_ref * upstream).sum().backward()

    x_in = x.detach().clone().requires_grad_()
    y = bn(x_in, training=training, mask=mask)
    (y * upstream.to(y.dtype)).sum().backward()

    cdt = compute_dtype(case["dtype"])
    rtol = COMPUTE_RTOL[cdt]
    # Scale of the terms the gradient is made of: |gamma| / sqrt(var + eps) * |upstream| * (1 + |x_hat|)
    # -- the batch-norm gradient subtracts terms of that size.
    factor = 1 / torch.sqrt(var_used.double() + case["epsilon"])
    if gamma64 is not None:
        factor = factor * gamma64.detach().abs()
    x_hat = (x64.detach() - channel_vector(mean_used.double(), x, axis)) / torch.sqrt(
        channel_vector(var_used.double(), x, axis) + case["epsilon"]
    )
    x_hat_max = x_hat.abs().max().item() if x_hat.numel() else 0.0
    term = factor.max().item() * upstream.abs().max().item() * (1 + x_hat_max)
    assert x_in.grad.dtype == x.dtype
    check_close(x_in.grad, x64.grad, rtol * max(term, 1e-3), rtol, "grad x")
    assert bool(x_in.grad.isfinite().all())
    for param, ref in ((bn.gamma, gamma64), (bn.beta, beta64)):
        if param is not None:
            scale = ref.grad.abs().max().item()
            param_rtol = max(rtol, ROUNDING[param.dtype])
            check_close(param.grad, ref.grad, param_rtol * max(scale, 1e-2) * (1 + x_hat_max), param_rtol, "grad param")
    # Never any gradient into the moving statistics.
    assert not bn.moving_mean.requires_grad and not bn.moving_variance.requires_grad


@settings(max_examples=60, **SETTINGS)
@given(case=cases(max_rank=4), data=st.data())
def test_empty_batch_writes_nothing_and_keeps_shape(case, data):
    rank = len(case["shape"])
    non_channel = [d for d in range(rank) if d != case["axis"] % rank]
    if not non_channel:
        return  # a rank-1 input has no batch dimension to empty
    zero_dim = data.draw(st.sampled_from(non_channel))
    shape = list(case["shape"])
    shape[zero_dim] = 0
    case = dict(case, shape=tuple(shape))
    if case["mask_shape"] is not None:
        mask_shape = list(case["mask_shape"])
        mask_shape[non_channel.index(zero_dim)] = data.draw(st.sampled_from([0, 1]))
        case["mask_shape"] = tuple(mask_shape)
    bn = make_layer(case)
    before = snapshot(bn)
    x = torch.zeros(case["shape"], dtype=case["dtype"])
    y = bn(x, training=True, mask=make_mask(case))
    assert y.shape == x.shape and y.dtype == x.dtype
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key


@settings(max_examples=60, **SETTINGS)
@given(case=cases(), steps=st.integers(2, 4))
def test_repeated_inference_is_deterministic_and_consecutive_training_tracks_reference(case, steps):
    bn = make_layer(case)
    moving_mean = bn.moving_mean.detach().double()
    moving_var = bn.moving_variance.detach().double()
    gamma = None if bn.gamma is None else bn.gamma.detach()
    beta = None if bn.beta is None else bn.beta.detach()
    for step in range(steps):
        x = make_input(dict(case, seed=case["seed"] + 17 * step))
        mask = make_mask(dict(case, seed=case["seed"] + 17 * step))
        _, moving_mean, moving_var = training_step(
            x, case["axis"], gamma, beta, moving_mean, moving_var, case["momentum"], case["epsilon"], mask
        )
        # Follow the layer's own stored rounding (16-bit or float32 buffers) from step to step.
        bn(x, training=True, mask=mask)
        for name, expected in (("moving_mean", moving_mean), ("moving_variance", moving_var)):
            rtol, atol = stat_tolerance(case, expected)
            check_close(getattr(bn, name), expected.to(getattr(bn, name).dtype), atol * 2, rtol * 2, name)
        moving_mean, moving_var = bn.moving_mean.detach().double(), bn.moving_variance.detach().double()
    bn.eval()
    x = make_input(case)
    first = bn(x)
    before = snapshot(bn)
    assert torch.equal(bn(x, mask=make_mask(case)), first)
    for key, value in before.items():
        assert torch.equal(bn.state_dict()[key], value), key
