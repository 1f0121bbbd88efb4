"""``batchnorm.recalibrate`` against its contract (SPEC section 13, ``batchnorm.population``'s docstring).

Every expected statistic comes from a float64 reference written here, independently of the
package: the model's layers run in float64 copies; each batch normalization the pass measures
normalizes with its own batch's statistics (the plain formula, whole batch), frozen layers of ours
with their moving statistics, torch's layers without running statistics with the batch's; the
population of a layer is the mean and biased variance of all its inputs' rows over all batches,
concatenated (not Chan's combination, which the package uses), masked-out positions dropped.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm import BatchNormalization, recalibrate
from batchnorm.testing import run_local_group

TOLERANCE = 2e-6  # relative to the channel's standard deviation (mean) or variance: float32 roundings
FIRST_TOLERANCE = 1e-6  # a layer right after one Linear: one float32 product-sum away from float64
MOVING = (
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
    "running_mean",
    "running_var",
)
HUGE = 1e15  # what masked-out positions hold: it would dominate any statistic it entered


# ----------------------------------------------------------------------------------- models


class Net(nn.Module):
    """Layers in a row; ``mask=`` goes to our layers (as a model that honours masks passes it)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask=mask) if isinstance(layer, BatchNormalization) else layer(x)
        return x


class Cast(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def _ours(shape: tuple[int, ...], **config) -> BatchNormalization:
    """One of our layers, built, with moving statistics and weights away from their defaults."""
    layer = BatchNormalization(**config)
    layer.build(shape)
    channels = layer.moving_mean.numel()
    with torch.no_grad():
        for name, values in (
            ("gamma", torch.linspace(0.5, 2.0, channels)),
            ("beta", torch.linspace(-1.0, 1.0, channels)),
            ("moving_mean", torch.linspace(-0.3, 0.3, channels)),
            ("moving_variance", torch.linspace(0.6, 1.6, channels)),
        ):
            if getattr(layer, name) is not None:
                getattr(layer, name).copy_(values.view_as(getattr(layer, name)))
    return layer


def _torch_bn(kind: type[_BatchNorm], channels: int, **config) -> _BatchNorm:
    layer = kind(channels, **config)
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
        if layer.track_running_stats:
            layer.running_mean.copy_(torch.linspace(-0.3, 0.3, channels))
            layer.running_var.copy_(torch.linspace(0.6, 1.6, channels))
            layer.num_batches_tracked.fill_(7)
    return layer


def _dense_net() -> Net:
    torch.manual_seed(0)
    return Net(
        nn.Linear(4, 6),
        _ours((1, 6)),
        nn.ReLU(),
        nn.Dropout(p=0.9),  # off during the pass: with it on, the next layers' statistics change completely
        nn.Linear(6, 5),
        _torch_bn(nn.BatchNorm1d, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
        _ours((1, 3)),
    )


def _batches(sizes, features, *, offset=3.0, scale=2.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *features, generator=generator) * scale + offset for n in sizes]


# -------------------------------------------------------------------------- float64 reference


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, (BatchNormalization, _BatchNorm))


def _measured(module: nn.Module, model: nn.Module) -> bool:
    """Whether the contract has recalibration set this layer's moving statistics: not frozen (ours
    with trainable=False; torch's in eval() inside a model in train()), and torch's tracking."""
    if isinstance(module, BatchNormalization):
        return module.trainable
    frozen = model.training and not module.training
    return isinstance(module, _BatchNorm) and module.track_running_stats and not frozen


def _axes(layer: nn.Module, rank: int) -> tuple[int, ...]:
    if isinstance(layer, BatchNormalization):
        given = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
        return tuple(sorted(a % rank for a in given))
    return (1,)


def _rows(x: torch.Tensor, axes: tuple[int, ...], mask: torch.Tensor | None) -> torch.Tensor:
    """``x``'s elements as float64 rows ``(M, C)``: channel axes last (row-major), masked-out positions dropped."""
    rest = [d for d in range(x.dim()) if d not in axes]
    channels = math.prod(x.shape[a] for a in axes)
    rows = x.double().permute(rest + list(axes)).reshape(-1, channels)
    if mask is not None:
        rows = rows[(mask != 0).expand([x.shape[d] for d in rest]).reshape(-1)]
    return rows


def _normalize(layer, x, mean, var):
    """The float64 formula with ``layer``'s gamma/beta/epsilon and the given per-channel statistics."""
    ours = isinstance(layer, BatchNormalization)
    axes = _axes(layer, x.dim())
    shape = [x.shape[d] if d in axes else 1 for d in range(x.dim())]
    gamma, beta = (layer.gamma, layer.beta) if ours else (layer.weight, layer.bias)
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + (layer.epsilon if ours else layer.eps))
    if gamma is not None:
        y = y * gamma.detach().double().reshape(shape)
    if beta is not None:
        y = y + beta.detach().double().reshape(shape)
    return y


def _moving(layer) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, BatchNormalization):
        return layer.moving_mean.double().reshape(-1), layer.moving_variance.double().reshape(-1)
    return layer.running_mean.double(), layer.running_var.double()


def _unpack(batch):
    if isinstance(batch, dict):
        return batch["x"], batch.get("mask")
    if isinstance(batch, (tuple, list)):
        return batch[0], batch[1]
    return batch, None


def _reference(net: Net, batches, populations=None):
    """Float64 run of ``net``'s layers over ``batches``.

    ``populations=None``: the recalibration pass; returns ``{index: (mean, biased var, count)}``
    for each measured layer that saw an element. Else inference with those populations in place of
    the moving statistics (torch's layers hold the unbiased variance); returns the outputs.
    """
    copies = [None if _is_bn(layer) else copy.deepcopy(layer).double().eval() for layer in net.layers]
    rows, outputs = defaultdict(list), []
    for batch in batches:
        x, mask = _unpack(batch)
        x = x.double()
        for index, (layer, copied) in enumerate(zip(net.layers, copies)):
            if copied is not None:
                x = copied(x).double()  # a Cast: its rounding, then float64 again
                continue
            ours = isinstance(layer, BatchNormalization)
            layer_rows = _rows(x, _axes(layer, x.dim()), mask if ours else None)
            batch_stats = (layer_rows.mean(0), layer_rows.var(0, unbiased=False)) if len(layer_rows) else None
            if not _measured(layer, net):  # frozen: moving statistics; torch's untracked: the batch's
                mean, var = _moving(layer) if ours or layer.track_running_stats else batch_stats
            elif populations is not None:
                mean, var, count = populations[index]
                var = var if ours else var * count / (count - 1)
            else:
                rows[index].append(layer_rows)
                mean, var = batch_stats if len(layer_rows) else _moving(layer)
            x = _normalize(layer, x, mean, var)
        outputs.append(x)
    if populations is not None:
        return outputs
    result = {}
    for index, pieces in rows.items():
        every = torch.cat(pieces)
        if len(every):
            result[index] = every.mean(0), every.var(0, unbiased=False), len(every)
    return result


# ----------------------------------------------------------------------------------- checks


def _assert_population(layer, population, tolerance=TOLERANCE, where=""):
    """``layer``'s moving statistics are ``population`` (torch's: unbiased variance; renorm's too)."""
    mean, var, count = population
    std = var.sqrt()
    if isinstance(layer, BatchNormalization):
        expected = {"moving_mean": mean, "moving_variance": var}
        if layer.renorm:
            stddev = torch.sqrt(var + layer.epsilon)
            expected.update(moving_stddev=stddev, renorm_mean=mean, renorm_stddev=stddev)
    else:
        expected = {"running_mean": mean, "running_var": var * count / (count - 1)}
    for name, value in expected.items():
        actual = getattr(layer, name).double().reshape(-1)
        # a mean is compared against the spread (it may be near 0); the rest relatively
        atol = tolerance * std if name in ("moving_mean", "renorm_mean", "running_mean") else 0.0
        error = (actual - value).abs()
        bound = tolerance * value.abs() + atol
        assert bool((error <= bound).all()), f"{where}{name}: {actual} != {value} (errors {error}, bounds {bound})"


def _state(model: nn.Module):
    """Every parameter and buffer (values and objects), every module's mode, and its gradients."""
    return {
        "tensors": {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()},
        "parameters": dict(model.named_parameters()),
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "modes": {name: m.training for name, m in model.named_modules()},
    }


def _assert_nothing_else_changed(model: nn.Module, before, *, moved=()):
    """Only the moving statistics of the layers at paths ``moved`` may differ; everything else as before."""
    after = _state(model)
    allowed = {f"{path}.{name}" for path in moved for name in MOVING}
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, value in before["tensors"].items():
        if name not in allowed:
            new = after["tensors"][name]
            assert new.dtype == value.dtype and torch.equal(new.nan_to_num(), value.nan_to_num()), name
            assert torch.equal(new.isnan(), value.isnan()), name
    assert after["parameters"].keys() == before["parameters"].keys()
    assert all(after["parameters"][name] is p for name, p in before["parameters"].items())
    assert after["requires_grad"] == before["requires_grad"]
    assert all(p.grad is None for p in model.parameters())
    assert after["modes"] == before["modes"]
    assert not [name for name, m in model.named_modules() if "forward" in vars(m)], "a forward left behind"


def _recalibrated(model: Net, batches, *, moved=None, **options) -> dict:
    """The float64 populations, then ``recalibrate``, then the checks that nothing else changed."""
    populations = _reference(model, batches)
    before = _state(model)
    if moved is None:
        moved = [f"layers.{i}" for i, layer in enumerate(model.layers) if _measured(layer, model)]
    assert recalibrate(model, batches, **options) is model
    _assert_nothing_else_changed(model, before, moved=moved)
    return populations


def _set_modes(model: Net, modes: str) -> None:
    if modes == "eval":
        model.eval()
    else:
        model.train()
    if modes == "mixed":  # a torch BN and one of ours in eval inside a training model
        model.layers[5].eval()
        model.layers[1].eval()


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("modes", ["train", "eval", "mixed"])
def test_dense_model_gets_the_exact_population_over_unequal_batches(modes):
    """Linear -> ours -> ReLU -> Dropout(0.9) -> Linear -> BatchNorm1d -> ReLU -> Linear -> ours."""
    model = _dense_net()
    _set_modes(model, modes)
    batches = _batches([5, 17, 2, 9], (4,))
    populations = _recalibrated(model, batches)
    frozen_torch_layer = modes == "mixed"  # torch's idiom: in eval() inside a model in train()
    assert sorted(populations) == ([1, 8] if frozen_torch_layer else [1, 5, 8])
    _assert_population(model.layers[1], populations[1], FIRST_TOLERANCE, "first layer ")
    if not frozen_torch_layer:
        _assert_population(model.layers[5], populations[5], where="torch's BatchNorm1d ")
    _assert_population(model.layers[8], populations[8], where="last layer ")
    assert populations[1][2] == 33 and int(model.layers[5].num_batches_tracked) == 7


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_model_gets_the_exact_population(memory_format):
    """Conv2d -> BatchNorm2d -> ReLU -> Conv2d -> ours (axis=1) -> ours (axis=1), channels_last inputs too."""
    torch.manual_seed(1)
    model = Net(
        nn.Conv2d(3, 4, 3, padding=1),
        _torch_bn(nn.BatchNorm2d, 4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        _ours((1, 5, 1, 1), axis=1),
        _ours((1, 5, 1, 1), axis=1, epsilon=0.5),
    ).train()
    batches = [x.contiguous(memory_format=memory_format) for x in _batches([3, 1, 5], (3, 6, 5), offset=1.0)]
    populations = _recalibrated(model, batches)
    assert sorted(populations) == [1, 4, 5]
    _assert_population(model.layers[1], populations[1], FIRST_TOLERANCE, "BatchNorm2d ")
    _assert_population(model.layers[4], populations[4], where="ours after the second conv ")
    _assert_population(model.layers[5], populations[5], where="ours after ours ")


def _masked_batches(style: str, seed: int = 2):
    """(N, T, 4) sequences, masks (N, T); masked-out positions hold HUGE (first feature -HUGE)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index, (n, t) in enumerate([(3, 5), (6, 2), (1, 7), (4, 4)]):
        x = torch.randn(n, t, 4, generator=generator) * 2 + 1
        mask = torch.rand(n, t, generator=generator) > 0.4
        mask[0, 0] = True
        x[~mask] = HUGE
        x[..., 0][~mask] = -HUGE
        if index == 1:
            mask = mask.to(torch.uint8)  # non-zero counts as True
        if style == "dicts":
            batches.append({"x": x, "mask": mask})
        else:
            batches.append([x, mask] if index == 2 else (x, mask))
    return batches


@pytest.mark.parametrize("style", ["pairs", "dicts"])
def test_masked_out_positions_do_not_enter_the_statistics(style):
    torch.manual_seed(3)
    model = Net(nn.Linear(4, 6), _ours((1, 1, 6)), nn.ReLU(), nn.Linear(6, 5), _ours((1, 1, 5)))
    batches = _masked_batches(style)
    populations = _recalibrated(model, batches)
    counts = sum(int((_unpack(b)[1] != 0).sum()) for b in batches)
    assert populations[1][2] == populations[4][2] == counts < sum(_unpack(b)[0].shape[:2].numel() for b in batches)
    _assert_population(model.layers[1], populations[1], FIRST_TOLERANCE, "first layer ")
    _assert_population(model.layers[4], populations[4], where="second layer ")
    assert model.layers[4].moving_variance.abs().max() < 1e3  # nothing HUGE got in


def test_several_axes_renorm_and_ghost_batch_layers():
    """axis=(1, 2); renorm (stale renorm statistics and tight clipping that would bite); virtual_batch_size.

    The layers after renorm's and the ghost one's see the plain whole-batch normalization."""
    generator = torch.Generator().manual_seed(4)
    several = Net(_ours((1, 3, 4, 5), axis=(1, 2)), _ours((1, 3, 4, 5), axis=-1))
    batches = [torch.randn(n, 3, 4, 5, generator=generator) * 3 + torch.arange(12.0).view(3, 4, 1) for n in (2, 7, 3)]
    populations = _recalibrated(several, batches)
    assert several.layers[0].moving_mean.shape == (3, 4)
    _assert_population(several.layers[0], populations[0], FIRST_TOLERANCE, "axis=(1, 2) ")
    _assert_population(several.layers[1], populations[1], where="after axis=(1, 2) ")

    torch.manual_seed(5)
    renorm = _ours((1, 6), renorm=True, renorm_clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.1})
    with torch.no_grad():
        renorm.renorm_mean.fill_(10.0)
        renorm.renorm_stddev.fill_(0.1)
        renorm.moving_stddev.fill_(0.1)
    ghost = _ours((1, 5), virtual_batch_size=4)
    model = Net(nn.Linear(4, 6), renorm, nn.ReLU(), nn.Linear(6, 5), ghost, nn.ReLU(), nn.Linear(5, 3), _ours((1, 3)))
    model.train()
    # rows far apart within a batch: ghost batches (any split) have statistics unlike the whole batch's
    batches = [x + 4 * torch.arange(len(x)).unsqueeze(1) for x in _batches([8, 12, 4], (4,), seed=6)]
    populations = _recalibrated(model, batches)
    _assert_population(renorm, populations[1], FIRST_TOLERANCE, "renorm ")
    _assert_population(ghost, populations[4], where="virtual_batch_size ")
    _assert_population(model.layers[7], populations[7], where="after the ghost layer ")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs(dtype):
    model = Net(Cast(dtype), _ours((1, 3, 5), axis=1))
    batches = _batches([4, 9], (3, 5), offset=5.0, seed=7)
    populations = _recalibrated(model, batches)
    assert model.layers[1].moving_mean.dtype == torch.float32
    _assert_population(model.layers[1], populations[1], where=f"{dtype} inputs ")


def test_frozen_layer_and_untracked_torch_bn_are_untouched_and_keep_their_behaviour():
    """Frozen ours: inference with its moving statistics during the pass (the next layer's
    population shows it); torch's without running statistics: its batch statistics."""
    torch.manual_seed(8)
    frozen = _ours((1, 6), trainable=False)
    with torch.no_grad():
        frozen.moving_mean.copy_(torch.linspace(-2.0, 2.0, 6))
        frozen.moving_variance.copy_(torch.linspace(0.1, 9.0, 6))
    untracked = _torch_bn(nn.BatchNorm1d, 5, track_running_stats=False)
    model = Net(nn.Linear(4, 6), frozen, _ours((1, 6)), nn.Linear(6, 5), untracked, _ours((1, 5))).train()
    batches = _batches([6, 3, 10], (4,), seed=9)
    populations = _recalibrated(model, batches, moved=["layers.2", "layers.5"])
    assert sorted(populations) == [2, 5]
    _assert_population(model.layers[2], populations[2], where="after the frozen layer ")
    _assert_population(model.layers[5], populations[5], where="after the untracked BatchNorm1d ")
    # The frozen layer in training mode would give the next layer inputs of mean beta, variance gamma**2.
    assert (populations[2][0] - frozen.beta.double()).abs().max() > 0.5
    assert untracked.running_mean is None and untracked.running_var is None


def test_poisoned_moving_statistics_are_repaired_and_non_finite_inputs_keep_them():
    torch.manual_seed(10)
    model = Net(nn.Linear(4, 5), _ours((1, 5)), nn.Linear(5, 3), _torch_bn(nn.BatchNorm1d, 3))
    with torch.no_grad():
        model.layers[1].moving_mean[0] = float("nan")
        model.layers[1].moving_variance[1] = float("inf")
        model.layers[1].moving_variance[2] = float("nan")
        model.layers[3].running_mean[1] = float("-inf")
        model.layers[3].running_var[0] = float("nan")
    populations = _recalibrated(model, _batches([4, 7], (4,), seed=11))
    _assert_population(model.layers[1], populations[1], FIRST_TOLERANCE, "ours ")
    _assert_population(model.layers[3], populations[3], where="BatchNorm1d ")

    # Inputs whose statistics are not finite on one channel: that channel keeps its values.
    layer = _ours((1, 4))
    model = Net(layer)
    batches = _batches([3, 5], (4,), seed=12)
    batches[1][2, 1] = float("inf")
    old = layer.moving_mean.clone(), layer.moving_variance.clone()
    before = _state(model)
    recalibrate(model, batches)
    _assert_nothing_else_changed(model, before, moved=["layers.0"])
    every, finite = torch.cat(batches).double(), [0, 2, 3]
    for name, value, expected in zip(("mean", "variance"), old, (every.mean(0), every.var(0, unbiased=False))):
        moving = getattr(layer, f"moving_{name}")
        assert moving[1] == value[1], f"moving_{name} of the channel with an inf"
        torch.testing.assert_close(moving[finite].double(), expected[finite], rtol=FIRST_TOLERANCE, atol=1e-6)


def test_a_layer_with_every_position_masked_out_keeps_its_statistics():
    """No element in any batch: the layer keeps its moving statistics, normalizes with them in the
    pass (the next layer's population shows it)."""
    torch.manual_seed(13)
    masked = _ours((1, 5))
    model = Net(nn.Linear(4, 5), masked, nn.Linear(5, 3), _torch_bn(nn.BatchNorm1d, 3))
    batches = [(x, torch.zeros(len(x), dtype=torch.bool)) for x in _batches([3, 6], (4,), seed=14)]
    old = masked.moving_mean.clone(), masked.moving_variance.clone()
    populations = _recalibrated(model, batches, moved=["layers.3"])
    assert sorted(populations) == [3]
    assert torch.equal(masked.moving_mean, old[0]) and torch.equal(masked.moving_variance, old[1])
    _assert_population(model.layers[3], populations[3], where="after the masked-out layer ")


def test_a_torch_channel_with_a_single_element_keeps_its_running_statistics():
    one = _torch_bn(nn.BatchNorm1d, 3)
    two = _torch_bn(nn.BatchNorm1d, 3)
    old = one.running_mean.clone(), one.running_var.clone()
    x = torch.tensor([[1.0, 2.0, 3.0]])
    recalibrate(Net(one), [x])
    assert torch.equal(one.running_var, old[1]) and torch.equal(one.running_mean, old[0])
    recalibrate(Net(two), [x, 2 * x])  # two batches of one element: two elements, an unbiased variance
    torch.testing.assert_close(two.running_mean, 1.5 * x[0])
    torch.testing.assert_close(two.running_var, (x[0] / 2) ** 2 * 2)
    assert int(one.num_batches_tracked) == int(two.num_batches_tracked) == 7


def test_recalibration_repairs_inference_after_training_with_slow_moving_statistics():
    torch.manual_seed(15)
    model = Net(
        nn.Linear(4, 8),
        BatchNormalization(momentum=0.999),
        nn.ReLU(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6, momentum=0.001),
        nn.ReLU(),
        nn.Linear(6, 2),
    )
    data = _batches([16] * 5, (4,), offset=4.0, scale=3.0, seed=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for x in data:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    populations = _reference(model, data)
    expected = _reference(model, data, populations)
    with torch.no_grad():
        stale = [model(x) for x in data]
    assert max((s.double() - e).abs().max().item() for s, e in zip(stale, expected)) > 0.5
    recalibrate(model, data)
    assert not model.training
    with torch.no_grad():
        for x, e in zip(data, expected):
            torch.testing.assert_close(model(x).double(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_progress_bar_and_a_one_pass_iterator(capsys):
    model = _dense_net().train()
    batches = _batches([5, 8, 3], (4,), seed=17)
    populations = _recalibrated(model, batches, progress=True)
    err = capsys.readouterr().err
    assert "recalibrate" in err and "3/3" in err, err
    for index in (1, 5, 8):
        _assert_population(model.layers[index], populations[index], where=f"layer {index} ")
    model = _dense_net().train()
    before = _state(model)
    assert recalibrate(model, iter(batches)) is model  # an iterator: one pass is all there is
    _assert_nothing_else_changed(model, before, moved=["layers.1", "layers.5", "layers.8"])
    for index in (1, 5, 8):
        _assert_population(model.layers[index], populations[index], where=f"layer {index}, iterator ")


@pytest.mark.parametrize("modes", ["train", "mixed"])
def test_an_invalid_batch_raises_and_restores_the_model(modes):
    model = _dense_net()
    _set_modes(model, modes)
    x = torch.randn(4, 4)
    before = _state(model)
    with pytest.raises(ValueError):
        recalibrate(model, [x, (x, torch.ones(4, dtype=torch.bool), x)])
    _assert_nothing_else_changed(model, before)  # the pass failed: no statistics written either


# ------------------------------------------------------------------------- two gloo processes

SHARDS = ((3, 1), (3, 0))  # batches on rank 0 and rank 1
SIZES = (5, 9, 6, 7)


def _sync_net() -> Net:
    torch.manual_seed(18)
    return Net(
        nn.Linear(4, 6),
        _ours((1, 6), synchronized=True),
        nn.ReLU(),
        nn.Linear(6, 5),
        _torch_bn(nn.SyncBatchNorm, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
        _ours((1, 3)),  # not synchronized: its own rank's batches only
    ).train()


def _distributed_worker() -> int:
    rank, checked = dist.get_rank(), 0
    for shards in SHARDS:
        model = _sync_net()
        generator = torch.Generator().manual_seed(sum(shards))
        batches = []
        for n in SIZES[: sum(shards)]:
            x = torch.randn(n, 4, generator=generator) * 2 + 1
            batches.append((x, torch.rand(n, generator=generator) > 0.3))
        mine = batches[: shards[0]] if rank == 0 else batches[shards[0] :]
        union, own = _reference(model, batches), _reference(model, mine)
        old = model.layers[7].moving_mean.clone(), model.layers[7].moving_variance.clone()
        before = _state(model)
        assert recalibrate(model, mine) is model
        _assert_nothing_else_changed(model, before, moved=["layers.1", "layers.4", "layers.7"])
        where = f"rank {rank}, shards {shards}: "
        _assert_population(model.layers[1], union[1], FIRST_TOLERANCE, where + "synchronized ours ")
        _assert_population(model.layers[4], union[4], where=where + "SyncBatchNorm ")
        if mine:
            _assert_population(model.layers[7], own[7], where=where + "unsynchronized ours ")
        else:
            assert torch.equal(model.layers[7].moving_mean, old[0]), where
            assert torch.equal(model.layers[7].moving_variance, old[1]), where
        # the synchronized layers hold the same numbers on every rank
        for name in (
            "layers.1.moving_mean",
            "layers.1.moving_variance",
            "layers.4.running_mean",
            "layers.4.running_var",
        ):
            mine_value = model.state_dict()[name]
            gathered = [torch.empty_like(mine_value) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, mine_value)
            assert all(torch.equal(g, mine_value) for g in gathered), where + name
        checked += 1
    return checked


@pytest.mark.distributed
def test_two_processes_with_unequal_shards_combine_synchronized_layers_only():
    """Rank 0: 3 batches, rank 1: 1 batch, then none (its layers built); masks on our layers."""
    assert run_local_group(_distributed_worker, 2, timeout_s=60, deadline_s=240) == [len(SHARDS)] * 2


# ----------------------------------------------------------------- batch forms and patched forwards


def test_one_tuples_are_inputs_and_a_labels_pair_is_refused():
    """A DataLoader over TensorDataset(x) yields [x]: the inputs. (x, labels) would pass the labels as
    the mask of a model that takes one: refused unless the second item holds only 0/1 or booleans."""
    model = _dense_net()
    batches = _batches([5, 17, 2, 9], (4,))
    expected = copy.deepcopy(model)
    recalibrate(expected, batches)
    recalibrate(model, [[x] for x in batches])
    for layer, reference in zip(model.layers, expected.layers):
        if _is_bn(layer):
            torch.testing.assert_close(_moving(layer), _moving(reference), rtol=0, atol=0)
    labels = torch.tensor([0, 3, 1, 2, 9])
    before = _state(model)
    with pytest.raises(ValueError, match="the second item of a batch pair is the mask.*up to 9"):
        recalibrate(model, [(batches[0], labels)])
    _assert_nothing_else_changed(model, before)


def test_a_forward_set_on_the_instance_is_kept():
    model = _dense_net()
    layer = model.layers[1]
    patched = layer.forward  # e.g. a hook library wrapping it
    layer.forward = patched
    recalibrate(model, _batches([5, 7], (4,)))
    assert vars(layer)["forward"] is patched
    assert not [m for m in model.modules() if m is not layer and "forward" in vars(m)]
