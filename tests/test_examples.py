"""examples/renorm_small_batches.py, examples/port_keras_model.py and examples/convert_torch_model.py:
a --quick run of each end to end, and their command lines.

(examples/ddp_cpu.py runs under torchrun in test_distributed.py.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import struct
import warnings
import zipfile
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


KERAS_NUMPY_WARNING = "__array__ implementation doesn't accept a copy keyword"


def _quick_run(example, tmp_path_factory):
    """(out_dir, args, result, printed text) of one ``--quick`` run of ``example`` (Keras's NumPy 2
    deprecation warning, which the port's Keras side triggers, silenced)."""
    out = tmp_path_factory.mktemp("out")
    args = example.parse_args(["--quick", "--seed", "1", "--out-dir", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.filterwarnings("ignore", KERAS_NUMPY_WARNING, DeprecationWarning)
        result = example.run(args)
    return out, args, result, printed.getvalue()


@pytest.fixture(scope="module")
def quick_run(renorm_example, tmp_path_factory):
    return _quick_run(renorm_example, tmp_path_factory)


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


# ------------------------------------------------------------------------- port_keras_model.py


# Keras 3.15's torch backend converts tensors with np.array(x), which NumPy 2 warns about (Keras's own affair).


@pytest.fixture(scope="module")
def port_example():
    return _load("port_keras_model")


@pytest.fixture(scope="module")
def port_run(port_example, tmp_path_factory):
    """(out_dir, result, printed text) of one --quick run."""
    out, _, result, text = _quick_run(port_example, tmp_path_factory)
    return out, result, text


def test_port_quick_run_matches_keras(port_example, port_run):
    _, result, text = port_run
    assert result["logits_gap"] <= port_example.TOLERANCE == 1e-4
    assert result["softmax_gap"] <= result["logits_gap"] / 2 + 1e-6  # softmax: 1/2-Lipschitz in the max norm
    assert result["keras_accuracy"] == result["torch_accuracy"]
    assert result["same_predictions"] == result["n_test"] == 450
    assert 0.0 <= result["torch_accuracy"] <= 1.0
    assert f"largest |Keras - PyTorch| of the logits: {result['logits_gap']:.2e} (limit 0.0001)" in text
    assert f"Keras {100 * result['keras_accuracy']:.2f} %, PyTorch {100 * result['torch_accuracy']:.2f} %" in text


def test_port_writes_a_keras_archive(port_run):
    out, result, text = port_run
    path = Path(result["keras_path"])
    assert path.parent == out and path.suffix == ".keras" and f"saved {path}" in text
    with zipfile.ZipFile(path) as archive:
        assert {"config.json", "model.weights.h5"} <= set(archive.namelist())


@pytest.mark.filterwarnings(f"ignore:{KERAS_NUMPY_WARNING}:DeprecationWarning")
def test_port_takes_every_weight_from_the_file(port_run):
    """Module by module, the PyTorch model holds the Keras model's weights: BatchNormalization's as
    they are (renorm's five buffers, no beta without center), kernels transposed."""
    import keras

    _, result, text = port_run
    torch_model, keras_model = result["torch_model"], result["keras_model"]
    assert result["bn_pairs"] == [
        ("1", "layers/batch_normalization"),
        ("4", "layers/batch_normalization_1"),
        ("9", "layers/batch_normalization_2"),
    ]
    assert result["kernel_pairs"] == [
        ("0", "layers/conv2d"),
        ("3", "layers/conv2d_1"),
        ("8", "layers/dense"),
        ("11", "layers/dense_1"),
    ]
    assert "[ 9] BatchNormalization   <- layers/batch_normalization_2" in text
    keras_layers = [layer for layer in keras_model.layers if layer.weights]
    torch_modules = [torch_model.get_submodule(name) for name in ("0", "1", "3", "4", "8", "9", "11")]
    assert len(keras_layers) == len(torch_modules)
    for keras_layer, module in zip(keras_layers, torch_modules):
        weights = {v.name: torch.from_numpy(keras.ops.convert_to_numpy(v)) for v in keras_layer.weights}
        if isinstance(module, BatchNormalization):
            expected = {name: value for name, value in module.named_parameters()}
            expected.update(module.named_buffers())
            assert set(weights) == set(expected), keras_layer.name
            config = keras_layer.get_config()
            assert module.get_config() == {**config, "name": module.get_config()["name"]}
        else:
            kernel = weights.pop("kernel")
            kernel = kernel.permute(3, 2, 0, 1) if kernel.dim() == 4 else kernel.T
            expected = {"kernel": module.weight}
            weights["kernel"] = kernel
            if module.bias is not None:
                expected["bias"] = module.bias
        for name, value in weights.items():
            assert torch.equal(value, expected[name].detach()), (keras_layer.name, name)
    renorm, uncentered, dense_bn = (torch_model.get_submodule(name) for name in ("1", "4", "9"))
    assert renorm.renorm and len(list(renorm.buffers())) == 5
    assert not uncentered.center and uncentered.beta is None
    assert dense_bn.epsilon == 1e-5
    assert not torch.equal(dense_bn.moving_mean, torch.zeros_like(dense_bn.moving_mean))  # trained statistics


def test_port_kernel_loading_is_all_or_nothing(port_example, port_run):
    _, result, _ = port_run
    model = port_example.build_torch_model()
    model[8] = torch.nn.Linear(500, 64, bias=False)  # the Keras Dense kernel is (512, 64)
    model[11] = torch.nn.Linear(64, 10, bias=False)  # Keras's has a bias
    before = {
        name: value.clone() for name, value in model.named_parameters() if not name.startswith(("1.", "4.", "9."))
    }
    with pytest.raises(ValueError) as exc:
        port_example.load_keras_kernels(model, result["keras_path"])
    message = str(exc.value)
    assert result["keras_path"] in message and "layers/dense " in message and "layers/dense_1 " in message
    assert "layers/conv2d" not in message
    for name, value in model.named_parameters():
        if name in before:
            assert torch.equal(value, before[name]), name  # nothing written, the matching convs neither
    model = port_example.build_torch_model()[:3]  # one Conv2d against the file's two
    with pytest.raises(ValueError, match="2 conv2d layers in the file, 1 Conv2d"):
        port_example.load_keras_kernels(model, result["keras_path"])


def test_port_main_exit_status(port_example, monkeypatch, capsys):
    calls = []

    def fake_run(args, gap=0.0):
        calls.append(args)
        return {"logits_gap": gap}

    monkeypatch.setattr(port_example, "run", fake_run)
    assert port_example.main(["--quick", "--out-dir", "x", "--seed", "3"]) == 0
    assert (calls[0].quick, calls[0].epochs, calls[0].seed, calls[0].out_dir) == (True, 2, 3, "x")
    assert "OK" in capsys.readouterr().out
    port_example.main([])
    assert (calls[1].quick, calls[1].epochs, calls[1].seed, calls[1].out_dir) == (False, 5, 0, "port-out")
    monkeypatch.setattr(port_example, "run", lambda args: fake_run(args, gap=1.5e-4))
    assert port_example.main(["--quick"]) == 1
    assert "FAILED: the logits differ by 1.50e-04 > 0.0001" in capsys.readouterr().out


def test_port_help_and_bad_arguments(port_example, capsys):
    with pytest.raises(SystemExit) as exc:
        port_example.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--seed", "--out-dir", "--quick"):
        assert option in text
    for argv in (["--epochs", "0"], ["--epochs", "x"], ["--seed", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            port_example.parse_args(argv)
        assert exc.value.code == 2


# ----------------------------------------------------------------------- convert_torch_model.py


@pytest.fixture(scope="module")
def convert_example():
    return _load("convert_torch_model")


@pytest.fixture(scope="module")
def convert_run(convert_example, tmp_path_factory):
    """(out_dir, result, printed text) of one --quick run (seed 1, digits 0-4 pretrained)."""
    out, _, result, text = _quick_run(convert_example, tmp_path_factory)
    return out, result, text


def _quick_training_images(example) -> torch.Tensor:
    """The training images of the quick run, as the example feeds them: (N, 1, 8, 8)."""
    from batchnorm.demo import load_digits_images

    return load_digits_images(1).x_train[: example.QUICK["train_images"]].permute(0, 3, 1, 2)


def test_convert_quick_run_keeps_its_promises(convert_example, convert_run):
    _, result, text = convert_run
    assert convert_example.failures(result) == []
    assert result["conversion_relative_gap"] <= convert_example.CONVERSION_TOLERANCE == 1e-6
    assert result["converted_accuracy"] == result["pretrain_accuracy"]
    assert result["frozen_unchanged"] is True and result["frozen_unchanged_after_recalibration"] is True
    assert result["fold_gap"] <= convert_example.FOLD_TOLERANCE == 1e-5
    assert result["onnx_gap"] <= convert_example.ONNX_TOLERANCE == 1e-4
    assert result["folded_accuracy"] == result["recalibrated_accuracy"]
    assert result["recalibration_gain"] == result["recalibrated_accuracy"] - result["finetune_accuracy"]
    for key in ("pretrain_accuracy", "finetune_accuracy", "finetune_train_mode_accuracy", "onnx_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["finetune_steps"] == convert_example.QUICK["train_images"] // convert_example.BATCH_SIZE == 8
    assert f"largest |logit difference| to PyTorch's: {result['conversion_gap']:.2g}" in text
    assert "bit-identical after fine-tuning: YES" in text and "the frozen backbone untouched: YES" in text
    assert f"({100 * result['recalibration_gain']:+.1f} points)" in text
    assert f"of the test logits: {result['fold_gap']:.2g} (limit 1e-05)" in text
    assert f"largest |ONNX - eager| of the logits: {result['onnx_gap']:.2g} (limit 0.0001)" in text


def test_convert_the_models_layers(convert_run):
    """Converted: no torch BatchNorm left, the backbone's layers frozen with torch's momentum and eps;
    the new head's layer Keras's defaults; folded: no batch normalization at all."""
    _, result, _ = convert_run
    model, folded = result["model"], result["folded"]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = {name: m for name, m in model.named_modules() if isinstance(m, BatchNormalization)}
    assert list(norms) == ["backbone.1", "backbone.4", "backbone.8", "head.1"]
    for name in ("backbone.1", "backbone.4", "backbone.8"):
        layer = norms[name]
        assert (layer.axis, layer.momentum, layer.epsilon, layer.trainable) == (1, 0.9, 1e-5, False), name
    head = norms["head.1"]
    assert (head.axis, head.momentum, head.epsilon, head.trainable) == (-1, 0.99, 1e-3, True)
    assert not model.training and not folded.training
    from batchnorm.convert import Folded

    assert result["folded_layers"] == 4
    assert [name for name, m in folded.named_modules() if isinstance(m, Folded)] == list(norms)
    assert not any(isinstance(m, BatchNormalization) for m in folded.modules())


def test_convert_recalibration_gives_the_population_statistics(convert_example, convert_run):
    """After recalibrate, the head's moving statistics are the mean and biased variance of its inputs
    over the training images; inspect flagged the head before and not after, frozen layers aside."""
    _, result, text = convert_run
    model = result["model"]
    seen = []
    handle = model.head[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(_quick_training_images(convert_example))
    finally:
        handle.remove()
    (inputs,) = seen
    head = model.head[1]
    torch.testing.assert_close(head.moving_mean, inputs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.moving_variance, inputs.var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    assert "head.1" in result["stale_before"] and "head.1" not in result["stale_after"]
    assert set(result["stale_after"]) <= {"backbone.1", "backbone.4", "backbone.8"}  # frozen: left as they are
    tables = text.split("mean shift: max |moving mean - mean|")
    assert len(tables) == 3  # two inspect tables, printed where the run's stdout goes
    before, after = ([line for line in t.splitlines() if line.startswith("head.1 ")] for t in tables[:2])
    assert before[0].endswith("STALE") and after[0].endswith("ok")


def test_convert_writes_the_figures_and_the_onnx_model(convert_run):
    """The two inspect PNGs; the .onnx runs in onnxruntime at a batch size it was not exported with."""
    import onnxruntime

    out, result, _ = convert_run
    for png in map(Path, result["pngs"]):
        assert png.parent == out and png.read_bytes()[:8] == PNG_SIGNATURE
    path = Path(result["onnx_path"])
    assert path.parent == out and path.stat().st_size > 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (declared,) = session.get_inputs()
    assert isinstance(declared.shape[0], str) and declared.shape[1:] == [1, 8, 8]  # a symbolic batch dimension
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    (onnx_logits,) = session.run(None, {declared.name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_logits), result["folded"](x), rtol=1e-4, atol=1e-4)


def test_convert_times_both_models(convert_run):
    _, result, text = convert_run
    assert set(result["timings"]) == {256, 1}
    for timing in result["timings"].values():
        assert timing["unfolded"] > 0 and timing["folded"] > 0
        assert timing["speedup"] == timing["unfolded"] / timing["folded"]
    assert f"a batch of 256:  unfolded {1e3 * result['timings'][256]['unfolded']:6.2f} ms" in text
    assert f": {result['timings'][1]['speedup']:.2f}x" in text


def _passing_result() -> dict:
    return {
        "conversion_relative_gap": 0.0,
        "frozen_unchanged": True,
        "frozen_unchanged_after_recalibration": True,
        "fold_gap": 1e-5,
        "onnx_gap": 1e-4,
    }


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"conversion_relative_gap": 2e-6}, "from_torch changed the logits by 2.00e-06 (relative) > 1e-06"),
        ({"frozen_unchanged": False}, "fine-tuning changed the frozen backbone"),
        ({"frozen_unchanged_after_recalibration": False}, "recalibrate changed the frozen backbone"),
        ({"fold_gap": 1.5e-5}, "the folded logits differ by 1.50e-05 (relative) > 1e-05"),
        ({"onnx_gap": float("nan")}, "the ONNX logits differ by nan > 0.0001"),
    ],
)
def test_convert_main_exit_status(convert_example, monkeypatch, capsys, broken, message):
    calls = []

    def fake_run(args, result=None):
        calls.append(args)
        return result or _passing_result()

    monkeypatch.setattr(convert_example, "run", fake_run)
    assert convert_example.main(["--quick", "--out-dir", "x", "--seed", "3"]) == 0
    assert "OK" in capsys.readouterr().out
    assert (calls[0].quick, calls[0].epochs, calls[0].seed, calls[0].out_dir, calls[0].pretrain_classes) == (
        True,
        1,
        3,
        "x",
        5,
    )
    monkeypatch.setattr(convert_example, "run", lambda args: fake_run(args, {**_passing_result(), **broken}))
    assert convert_example.main([]) == 1
    assert f"FAILED: {message}" in capsys.readouterr().out
    assert (calls[1].quick, calls[1].epochs, calls[1].seed, calls[1].out_dir) == (False, 5, 0, "convert-out")


def test_convert_help_and_bad_arguments(convert_example, capsys):
    with pytest.raises(SystemExit) as exc:
        convert_example.parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--epochs", "--pretrain-classes", "--seed", "--out-dir", "--quick"):
        assert option in text
    assert convert_example.parse_args(["--pretrain-classes", "10"]).pretrain_classes == 10
    for argv in (["--epochs", "0"], ["--pretrain-classes", "1"], ["--pretrain-classes", "11"], ["--seed", "x"]):
        with pytest.raises(SystemExit) as exc:
            convert_example.parse_args(argv)
        assert exc.value.code == 2
