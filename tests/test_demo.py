"""The ``python -m batchnorm demo`` command: a short run end to end, and its command line."""

from __future__ import annotations

import struct

import pytest

from batchnorm.__main__ import main
from batchnorm.demo import bn_buffers, buffers_equal, build_model, run_demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-out")
    return out, run_demo(epochs=1, seed=0, out_dir=out, progress=False)


def test_demo_writes_a_valid_png(one_epoch):
    out, result = one_epoch
    from pathlib import Path

    png = Path(result["png"])
    assert png.parent == out
    assert png.is_file()
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    # First chunk is IHDR: width and height of a real figure, not an empty canvas.
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 200
    import matplotlib.image

    pixels = matplotlib.image.imread(png)  # decodes the whole file
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.05  # something was drawn


def test_demo_frozen_backbone_keeps_its_moving_statistics(one_epoch):
    _, result = one_epoch
    assert result["frozen_unchanged"] is True
    assert result["frozen_weights_unchanged"] is True
    assert result["frozen_buffers_checked"] == 8  # 4 layers x (moving_mean, moving_variance)


def test_demo_learns(one_epoch):
    _, result = one_epoch
    # After one epoch the moving statistics still remember their initial values (momentum 0.99
    # averages over ~100 steps, an epoch is 84), so inference-mode accuracy may still be near
    # chance; the network's accuracy with batch statistics is the measure of learning here.
    assert result["train_mode_accuracy_full_batch"] > 0.6  # chance: 0.1
    assert result["history"]["train_loss"][0] < 2.2  # ln(10) = 2.30 at chance
    for key in ("test_accuracy", "train_mode_accuracy_small_batch", "finetune_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["epochs"] == 1 and len(result["history"]["test_accuracy"]) == 1


def test_buffers_equal_detects_a_one_ulp_change():
    import torch

    model = build_model()
    model(torch.rand(4, 8, 8, 1))  # builds, and (train mode) updates the buffers
    before = bn_buffers(model)
    assert buffers_equal(before, bn_buffers(model))
    layer = model[0][1]
    with torch.no_grad():
        layer.moving_variance[0] = torch.nextafter(layer.moving_variance[0], torch.tensor(2.0))
    assert not buffers_equal(before, bn_buffers(model))


def test_demo_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--seed", "--out"):
        assert option in text


def test_demo_cli_passes_its_arguments(monkeypatch, tmp_path):
    import batchnorm.demo

    calls = []
    monkeypatch.setattr(batchnorm.demo, "run_demo", lambda **kw: calls.append(kw) or {})
    assert main(["demo", "--epochs", "3", "--seed", "7", "--out", str(tmp_path)]) == 0
    assert calls == [{"epochs": 3, "seed": 7, "out_dir": str(tmp_path), "progress": True}]
    calls.clear()
    assert main(["demo"]) == 0
    assert calls[0]["epochs"] >= 1 and calls[0]["out_dir"] == "demo-out"


@pytest.mark.parametrize("argv", [[], ["demo", "--epochs", "0"], ["demo", "--epochs", "x"], ["nope"]])
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
