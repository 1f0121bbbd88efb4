"""examples/renorm_small_batches.py: a --quick run end to end, and its command line.

(examples/ddp_cpu.py runs under torchrun in test_distributed.py.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import struct
from pathlib import Path

import pytest
import torch

from batchnorm import BatchNormalization

EXAMPLES = Path(__file__).parent.parent / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RENORM_BUFFERS = ["moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def renorm_example():
    return _load("renorm_small_batches")


@pytest.fixture(scope="module")
def quick_run(renorm_example, tmp_path_factory):
    """(out_dir, args, result, printed text) of one --quick run."""
    out = tmp_path_factory.mktemp("renorm-out")
    args = renorm_example.parse_args(["--quick", "--seed", "1", "--out-dir", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = renorm_example.run(args)
    return out, args, result, printed.getvalue()


def test_quick_run_writes_the_png(quick_run):
    out, _, result, _ = quick_run
    png = Path(result["png"])
    assert png.parent == out and png.is_file()
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 400 and height > 300
    import matplotlib.image

    assert matplotlib.image.imread(png).std() > 0.05  # decodes, and something was drawn


def test_quick_run_prints_the_table(quick_run):
    out, _, _, text = quick_run
    assert "plain BatchNormalization" in text and "renorm=True" in text
    assert "inference mode" in text and "training mode on batches of 4" in text and "precise BN" in text
    epoch_rows = [line for line in text.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(epoch_rows) == 2 and all(len(row.split()) == 5 for row in epoch_rows)
    assert f"Figure: {out}" in text


def test_main_runs_with_its_arguments(renorm_example, monkeypatch):
    calls = []
    monkeypatch.setattr(renorm_example, "run", calls.append)
    assert renorm_example.main(["--quick", "--batch-size", "3", "--out-dir", "x"]) == 0
    (args,) = calls
    assert (args.quick, args.epochs, args.batch_size, args.out_dir) == (True, 2, 3, "x")
    calls.clear()
    renorm_example.main([])
    assert (calls[0].epochs, calls[0].batch_size, calls[0].seed, calls[0].out_dir) == (10, 4, 0, "renorm-out")


def test_quick_run_accuracies(quick_run):
    _, args, result, _ = quick_run
    for name in ("plain", "renorm"):
        history, test = result[name]["history"], result[name]["test"]
        assert len(history["inference"]) == len(history["train_mode"]) == args.epochs == 2
        for accuracy in [*history["inference"], *history["train_mode"], *test.values()]:
            assert 0.0 <= accuracy <= 1.0
        assert test["inference"] == history["inference"][-1]


def test_the_renorm_model_has_renorm_layers(quick_run):
    _, _, result, _ = quick_run
    plain = [m for m in result["plain"]["model"].modules() if isinstance(m, BatchNormalization)]
    renorm = [m for m in result["renorm"]["model"].modules() if isinstance(m, BatchNormalization)]
    assert len(plain) == len(renorm) == 4
    for layer in plain:
        assert [name for name, _ in layer.named_buffers()] == ["moving_mean", "moving_variance"]
    for layer in renorm:
        assert layer.renorm is True
        assert [name for name, _ in layer.named_buffers()] == RENORM_BUFFERS
        # Trained: the moving statistics left their initial values, and the variance follows the stddev.
        assert not torch.equal(layer.moving_stddev, torch.ones_like(layer.moving_stddev))
        assert not torch.equal(layer.renorm_mean, torch.zeros_like(layer.renorm_mean))
        expected = (layer.moving_stddev**2 - layer.epsilon).clamp(min=0)
        torch.testing.assert_close(layer.moving_variance, expected)
        # renorm_momentum == momentum (the example's choice): the renorm statistics are the moving ones.
        assert layer.renorm_momentum == layer.momentum
        torch.testing.assert_close(layer.renorm_mean, layer.moving_mean)
        torch.testing.assert_close(layer.renorm_stddev, layer.moving_stddev)


def test_both_variants_start_from_the_same_weights(renorm_example):
    x = torch.rand(2, 8, 8, 1)
    plain = renorm_example.built_model(False, 3, x).state_dict()
    renorm = renorm_example.built_model(True, 3, x).state_dict()
    assert set(plain) < set(renorm)
    for key, value in plain.items():
        assert torch.equal(value, renorm[key]), key


def test_help_and_bad_arguments(renorm_example, capsys):
    with pytest.raises(SystemExit) as exc:
        renorm_example.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--batch-size", "--seed", "--out-dir", "--quick"):
        assert option in text
    for argv in (["--epochs", "0"], ["--batch-size", "1"], ["--epochs", "x"]):
        with pytest.raises(SystemExit) as exc:
            renorm_example.parse_args(argv)
        assert exc.value.code == 2
