"""batchnorm.inspect: the per-layer health report (health.py), its table, PNG and command line."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNormalization
from batchnorm.__main__ import main
from batchnorm.health import MAX_MEAN_SHIFT, LayerHealth, format_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Net(nn.Module):
    """Linear -> ours (channels last) -> ReLU -> Linear -> torch's BatchNorm1d -> ours with renorm."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(5, 6)
        self.ours = BatchNormalization(axis=-1)
        self.head = nn.Linear(6, 4)
        self.theirs = nn.BatchNorm1d(4)
        self.renorm = BatchNormalization(axis=-1, renorm=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.ours(self.dense(x), mask=mask))
        return self.renorm(self.theirs(self.head(h)))


def _data(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 5, generator=generator) * 3 + 2 for n in (40, 25, 33)]


@pytest.fixture
def healthy() -> tuple[Net, list[torch.Tensor]]:
    """A model whose moving statistics are the exact population statistics of the data."""
    torch.manual_seed(0)
    model, batches = Net(), _data()
    model(batches[0])  # builds
    batchnorm.recalibrate(model, batches)
    return model, batches


def _by_path(report: list[LayerHealth]) -> dict[str, LayerHealth]:
    return {health.path: health for health in report}


def test_a_healthy_model_is_not_flagged(healthy):
    model, batches = healthy
    report = _by_path(batchnorm.inspect(model, batches, quiet=True))
    assert list(report) == ["ours", "theirs", "renorm"]
    for health in report.values():
        assert not health.stale, health
        assert health.max_mean_shift < 1e-5
        low, high = health.variance_ratio_range
        assert 1 - 1e-4 < low <= high < 1 + 1e-4 or health.kind == "BatchNorm1d"
    # torch keeps the unbiased variance; the report compares it with the unbiased population's
    low, high = report["theirs"].variance_ratio_range
    assert 1 - 1e-4 < low <= high < 1 + 1e-4
    assert report["ours"].count == sum(len(b) for b in batches)


@pytest.mark.parametrize("layer", ["ours", "theirs", "renorm"])
def test_a_stale_mean_flags_that_layer_only(healthy, layer):
    model, batches = healthy
    module = getattr(model, layer)
    moving_mean = module.moving_mean if layer != "theirs" else module.running_mean
    moving_variance = module.moving_variance if layer != "theirs" else module.running_var
    with torch.no_grad():
        moving_mean[1] += 3 * moving_variance[1].sqrt()
    report = _by_path(batchnorm.inspect(model, batches, quiet=True))
    # The pass normalizes each layer with its batches' statistics: the others see the same inputs
    assert [path for path, health in report.items() if health.stale] == [layer]
    shift = report[layer].mean_shift
    assert int(shift.argmax()) == 1 and 2.9 < float(shift[1]) < 3.1
    assert float(shift[0]) < 1e-5


def test_a_stale_variance_is_flagged(healthy):
    model, batches = healthy
    with torch.no_grad():
        model.ours.moving_variance[2] *= 10
    health = _by_path(batchnorm.inspect(model, batches, quiet=True))["ours"]
    assert health.stale and health.max_mean_shift < 1e-5
    low, high = health.variance_ratio_range
    assert low == pytest.approx(1, abs=1e-4) and 9 < high <= 10  # (10 var + eps) / (var + eps)


def test_the_mean_shift_and_variance_ratio_are_the_documented_formulas(healthy):
    model, batches = healthy
    with torch.no_grad():
        model.ours.moving_mean.add_(torch.linspace(-1, 1, 6))
        model.ours.moving_variance.mul_(torch.linspace(0.5, 3, 6))
    health = _by_path(batchnorm.inspect(model, batches, quiet=True))["ours"]
    inputs = torch.cat([model.dense(b) for b in batches]).detach().double()
    mean, var = inputs.mean(0), inputs.var(0, unbiased=False)
    eps = model.ours.epsilon
    expected_shift = (model.ours.moving_mean.double() - mean).abs() / torch.sqrt(var + eps)
    expected_ratio = (model.ours.moving_variance.double() + eps) / (var + eps)
    torch.testing.assert_close(health.mean_shift, expected_shift, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(health.variance_ratio, expected_ratio, rtol=1e-5, atol=1e-6)
    assert health.stale == (float(expected_shift.max()) > MAX_MEAN_SHIFT or float(expected_ratio.max()) > 2)


def test_masks_are_honoured(healthy):
    model, batches = healthy
    masks = [torch.arange(len(b)) % 3 != 0 for b in batches]
    poisoned = [torch.where(m[:, None], b, torch.full_like(b, 1e6)) for b, m in zip(batches, masks)]
    batchnorm.recalibrate(model, list(zip(poisoned, masks)))
    health = _by_path(batchnorm.inspect(model, list(zip(poisoned, masks)), quiet=True))["ours"]
    assert not health.stale and health.max_mean_shift < 1e-5
    inputs = torch.cat([model.dense(b[m]) for b, m in zip(poisoned, masks)]).detach().double()
    torch.testing.assert_close(model.ours.moving_mean.double(), inputs.mean(0), rtol=1e-5, atol=1e-5)


def test_non_finite_and_dead_channels(healthy):
    model, batches = healthy
    with torch.no_grad():
        model.ours.moving_mean[3] = math.nan
        model.dense.weight[4] = 0  # channel 4's input is the constant bias: dead
        model.ours.gamma[5] = 0  # scaled to nothing: dead
    health = _by_path(batchnorm.inspect(model, batches, quiet=True))["ours"]
    assert health.non_finite == [3] and health.stale
    assert health.dead == [4, 5]
    assert math.isinf(health.max_mean_shift)


def test_renorm_ranges_are_the_unclipped_r_and_d(healthy):
    model, batches = healthy
    layer = model.renorm
    with torch.no_grad():
        layer.renorm_stddev.mul_(torch.tensor([0.5, 1.0, 2.0, 4.0]))
        layer.renorm_mean.add_(torch.tensor([0.0, 1.0, -2.0, 0.5]))
    report = _by_path(batchnorm.inspect(model, batches, quiet=True))
    inputs = torch.cat([_renorm_inputs(model, b) for b in batches]).double()
    stddev = torch.sqrt(inputs.var(0, unbiased=False) + layer.epsilon)
    r = stddev / layer.renorm_stddev.double()
    d = (inputs.mean(0) - layer.renorm_mean.double()) / layer.renorm_stddev.double()
    assert report["renorm"].renorm_r == pytest.approx((float(r.min()), float(r.max())), rel=1e-4)
    assert report["renorm"].renorm_d == pytest.approx((float(d.min()), float(d.max())), rel=1e-4, abs=1e-5)
    assert report["ours"].renorm_r is None and report["theirs"].renorm_d is None


def _normalized(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, epsilon: float) -> torch.Tensor:
    return gamma * (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + epsilon) + beta


@torch.no_grad()
def _renorm_inputs(model: Net, batch: torch.Tensor) -> torch.Tensor:
    """The inputs of ``model.renorm`` in the pass: the layers before it normalize with the batch's statistics."""
    h = torch.relu(_normalized(model.dense(batch), model.ours.gamma, model.ours.beta, model.ours.epsilon))
    return _normalized(model.head(h), model.theirs.weight, model.theirs.bias, model.theirs.eps)


def test_frozen_layers_are_reported_as_frozen(healthy):
    model, batches = healthy
    batchnorm.set_trainable(model.ours, False)
    model.train()
    model.theirs.eval()  # torch's way of freezing a layer inside a training model
    report = _by_path(batchnorm.inspect(model, batches, quiet=True))
    assert report["ours"].frozen and report["theirs"].frozen and not report["renorm"].frozen
    assert model.training and not model.theirs.training and model.renorm.training  # modes restored


def test_the_model_is_not_changed(healthy):
    model, batches = healthy
    model.train()
    before = copy.deepcopy(model.state_dict())
    batchnorm.inspect(model, batches, quiet=True)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(m.training for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_table_is_printed_and_the_png_written(healthy, tmp_path, capsys):
    model, batches = healthy
    with torch.no_grad():
        model.theirs.running_mean += 5
    report = batchnorm.inspect(model, batches, plot=tmp_path / "sub" / "health.png")
    printed = capsys.readouterr().out
    assert printed.strip() == format_table(report)
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["layer", "kind", "ch"] and lines[0].split()[-1] == "status"
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["theirs"][-1] == "STALE" and rows["ours"][-1] == "ok" and rows["renorm"][-1] == "ok"
    assert (tmp_path / "sub" / "health.png").read_bytes()[:8] == PNG_SIGNATURE
    batchnorm.inspect(model, batches, quiet=True)
    assert capsys.readouterr().out == ""
    stream = io.StringIO()
    batchnorm.inspect(model, batches, file=stream)
    assert "STALE" in stream.getvalue()


def test_command_line(healthy, tmp_path, capsys):
    model, batches = healthy
    model_path, data_path = tmp_path / "model.pt", tmp_path / "data.pt"
    data = torch.cat(batches)
    batchnorm.recalibrate(model, data.split(32))
    torch.save(model, model_path)
    torch.save(data, data_path)
    assert main(["inspect", str(model_path), str(data_path), "--batch-size", "32"]) == 0
    assert "STALE" not in capsys.readouterr().out
    with torch.no_grad():
        model.ours.moving_variance.mul_(100)
    torch.save(model, model_path)
    plot = tmp_path / "cli.png"
    assert main(["inspect", str(model_path), str(data_path), "--batch-size", "32", "--plot", str(plot)]) == 1
    assert "STALE" in capsys.readouterr().out
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    # (inputs, mask) pairs and dicts cut into batches too
    torch.save((data, torch.ones(len(data), dtype=torch.bool)), data_path)
    assert main(["inspect", str(model_path), str(data_path)]) == 1
    torch.save({"x": data}, data_path)  # the model's arguments by name
    assert main(["inspect", str(model_path), str(data_path)]) == 1
    torch.save({"x": data, "mask": None}, data_path)  # values that are not tensors go to every batch
    assert main(["inspect", str(model_path), str(data_path), "--batch-size", "32"]) == 1
    torch.save({"y": data}, data_path)
    with pytest.raises(TypeError, match="y"):
        main(["inspect", str(model_path), str(data_path)])
    torch.save(model.state_dict(), model_path)
    with pytest.raises(ValueError, match="state_dict holds no architecture"):
        main(["inspect", str(model_path), str(data_path)])


def test_layers_not_reached_and_no_batches_are_said(capsys):
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.taken, self.skipped = nn.BatchNorm1d(3), BatchNormalization(axis=-1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.taken(x)

    report = batchnorm.inspect(Branch(), [torch.randn(8, 3)])
    assert [health.path for health in report] == ["taken"]
    assert "not reached by the batches, not inspected: skipped" in capsys.readouterr().out
    assert batchnorm.inspect(Branch(), []) == []
    printed = capsys.readouterr().out
    assert "no batch normalization reached" in printed and "taken, skipped" in printed
