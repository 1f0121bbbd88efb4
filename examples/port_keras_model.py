"""Port a trained Keras model to PyTorch: the same predictions, BatchNormalization layers included.

    python examples/port_keras_model.py [--epochs N] [--seed S] [--out-dir DIR] [--quick]

1. Keras side: builds a small channels-last convnet with three ``keras.layers.BatchNormalization``
   layers (one with ``renorm=True``, one with ``center=False``, one with ``epsilon=1e-5``), trains
   it with ``model.fit`` on scikit-learn's 8x8 digits and saves it as ``.keras`` in ``--out-dir``.
2. PyTorch side: builds the same architecture with ``batchnorm.BatchNormalization`` taking the
   same constructor arguments as Keras's layer, channels-last like Keras (``(N, H, W, C)`` inputs,
   every normalization on the last axis), then reads the ``.keras`` file:
   ``batchnorm.load_keras_weights`` for the BatchNormalization weights (gamma, beta, the moving
   statistics and renorm's three extra buffers), and plain ``zipfile`` + ``h5py`` for the Conv2D and
   Dense kernels, transposed to PyTorch's layouts.
3. Prints the largest absolute difference between the two models' logits on the test set (and
   between their softmax probabilities), both test accuracies, and exits with status 1 if the
   logits differ by more than 1e-4.

Keras runs on its torch backend: the script sets ``KERAS_BACKEND=torch`` before importing
``keras`` (Keras reads it once, at import). Keras 3's ``.keras`` format is meant not to depend on
the backend, but only files written on the torch backend are tested here.

What the port has to get right, beside BatchNormalization:

    Keras                                     PyTorch
    inputs (N, H, W, C)                       nn.Conv2d wants (N, C, H, W): ChannelsLastConv2d
                                              permutes around it (no copy: the permuted tensor is
                                              a channels_last NCHW tensor)
    Conv2D kernel (kh, kw, in, out)           Conv2d weight (out, in, kh, kw): kernel.transpose(3, 2, 0, 1)
    Dense kernel (in, out)                    Linear weight (out, in): kernel.T
    Flatten of (N, 4, 4, 32): (h, w, c)       nn.Flatten of the channels-last tensor: the same order,
                                              so the Dense kernel's rows need no reordering
    padding="same", 3x3 kernel                padding="same" (1 on each side)
    BatchNormalization(momentum, epsilon,     batchnorm.BatchNormalization with the same arguments:
      center, renorm, ...), axis=-1           Keras's defaults and conventions (momentum 0.99 of the
                                              old value, epsilon 1e-3, axis=-1)

Inside the ``.keras`` archive (a zip), ``model.weights.h5`` holds each layer's variables at
``layers/<layer class in snake_case>[_k]/vars/<i>``: ``layers/conv2d/vars/0`` is the first Conv2D's
kernel, ``layers/conv2d_1/vars/0`` the second's, ``layers/dense_1/vars/1`` the second Dense layer's
bias. The counter ``k`` runs per class in the model's layer order, whatever the layers' names, so
the k-th Conv2D of the file goes to the k-th ``nn.Conv2d`` of the PyTorch model.

Measured (defaults: 5 epochs; seeds 0-4, 2026-12-03, torch 2.13, Keras 3.15.1): the logits agree to
2.0e-6-2.9e-6 (float32 rounding), the softmax probabilities to 5e-7, both models predict the same
class for all 450 test images, test accuracy 98.4-98.9% for both; about 10 s on 2 CPU cores, 7 of
them importing torch, Keras and scikit-learn. The limit of 1e-4 catches what accuracies hide: the
same port with a wrong epsilon in one of the three layers (1e-3 for 1e-5, or the reverse) moved the
logits by 4e-3 to 0.4, while the test accuracy moved by 0.2 points or not at all.

Needs Keras 3 and the ``demo`` extra (scikit-learn; h5py through the ``keras`` extra):
``pip install "batchnorm[demo]" keras``.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported: it reads the backend once

import argparse  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from batchnorm import BatchNormalization, load_keras_weights  # noqa: E402
from batchnorm.demo import load_digits_images, parse_example_args, quick_data, single_thread  # noqa: E402

TOLERANCE = 1e-4  # the largest |Keras logit - PyTorch logit| on the test set that counts as the same model
BATCH_SIZE = 32
LR = 1e-3  # Adam's learning rate
QUICK = {"epochs": 2, "train_images": 512}  # --quick: a smoke run, its accuracies mean nothing
FILE_NAME = "digits_convnet.keras"

# The constructor arguments of the three BatchNormalization layers, passed as they are to Keras's layer
# and to ours: the two take the same arguments with the same defaults (axis=-1, epsilon=1e-3, ...).
BN_ARGS = (
    {  # after the first convolution: batch renormalization, the paper's clipping
        "renorm": True,
        "renorm_clipping": {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0},
        "renorm_momentum": 0.9,
        "momentum": 0.9,
    },
    {"center": False, "momentum": 0.9},  # after the second convolution: no beta
    {"momentum": 0.9, "epsilon": 1e-5},  # after the first dense layer, on (N, 64) features
)


# ------------------------------------------------------------------------------------ Keras side


def build_keras_model() -> keras.Sequential:
    """Conv-BN-ReLU twice, max pooling, flatten, Dense-BN-ReLU, the classifier (logits)."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            layers.Conv2D(16, 3, padding="same", use_bias=False),  # -> (N, 8, 8, 16)
            layers.BatchNormalization(**BN_ARGS[0]),
            layers.ReLU(),
            layers.Conv2D(32, 3, padding="same", use_bias=False),  # -> (N, 8, 8, 32)
            layers.BatchNormalization(**BN_ARGS[1]),
            layers.ReLU(),
            layers.MaxPooling2D(2),  # -> (N, 4, 4, 32)
            layers.Flatten(),  # -> (N, 512)
            layers.Dense(64, use_bias=False),
            layers.BatchNormalization(**BN_ARGS[2]),
            layers.ReLU(),
            layers.Dense(10),  # logits
        ]
    )


def train_keras_model(data, epochs: int, seed: int) -> tuple[keras.Sequential, float]:
    """``build_keras_model()`` trained with ``model.fit`` (Adam, batches of 32); and the seconds it took."""
    keras.utils.set_random_seed(seed)  # Python's, NumPy's and the backend's generators
    model = build_keras_model()
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    started = time.perf_counter()
    model.fit(data.x_train.numpy(), data.y_train.numpy(), batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return model, time.perf_counter() - started


# ---------------------------------------------------------------------------------- PyTorch side


class ChannelsLastConv2d(nn.Conv2d):
    """``nn.Conv2d`` on ``(N, H, W, C)`` inputs and outputs, as Keras's Conv2D. The permuted input is
    an NCHW tensor in ``torch.channels_last`` memory format, which the convolution reads as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` on ``(N, H, W, C)`` inputs and outputs, as Keras's MaxPooling2D."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def build_torch_model() -> nn.Sequential:
    """``build_keras_model()``'s architecture, layer for layer, channels-last throughout."""
    return nn.Sequential(
        ChannelsLastConv2d(1, 16, 3, padding="same", bias=False),
        BatchNormalization(**BN_ARGS[0]),
        nn.ReLU(),
        ChannelsLastConv2d(16, 32, 3, padding="same", bias=False),
        BatchNormalization(**BN_ARGS[1]),
        nn.ReLU(),
        ChannelsLastMaxPool2d(2),
        nn.Flatten(),  # (N, 4, 4, 32) -> (N, 512) in (h, w, c) order, as Keras's Flatten
        nn.Linear(512, 64, bias=False),
        BatchNormalization(**BN_ARGS[2]),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


# The Keras layer classes whose variables are read with h5py, by their snake_case name in the file.
KERNEL_LAYERS = {"conv2d": nn.Conv2d, "dense": nn.Linear}


def read_keras_kernels(path: str | Path) -> dict[str, list[tuple[str, list[np.ndarray]]]]:
    """The variables of every Conv2D and Dense layer of a ``.keras`` archive (``[kernel]`` or
    ``[kernel, bias]``), by class (``"conv2d"``, ``"dense"``), each class's layers in the model's
    order: ``{"conv2d": [("layers/conv2d", [kernel]), ("layers/conv2d_1", [kernel]), ...], ...}``.

    Plain h5py, trusting the file (it is the one this script wrote): ``batchnorm.load_keras_weights``
    refuses links and data stored outside the file; a reader of files from elsewhere should too."""
    with zipfile.ZipFile(path) as archive:
        weights = io.BytesIO(archive.read("model.weights.h5"))
    found: dict[str, list[tuple[int, str, list[np.ndarray]]]] = {kind: [] for kind in KERNEL_LAYERS}
    with h5py.File(weights, "r") as h5:
        for name, group in h5["layers"].items():
            match = re.fullmatch(r"(conv2d|dense)(?:_(\d+))?", name)
            if match:
                variables = group["vars"]
                values = [variables[str(i)][()] for i in range(len(variables))]
                found[match[1]].append((int(match[2] or 0), f"layers/{name}", values))
    # h5py lists groups alphabetically (conv2d_10 before conv2d_2): sort by the counter instead.
    return {kind: [(path, values) for _, path, values in sorted(layers)] for kind, layers in found.items()}


def torch_layout(module: nn.Module, kernel: np.ndarray) -> torch.Tensor:
    """A Keras kernel in the layout of ``module.weight``."""
    if isinstance(module, nn.Conv2d):
        return torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())  # (kh, kw, in, out) -> (out, in, kh, kw)
    return torch.from_numpy(kernel.T.copy())  # Dense (in, out) -> Linear (out, in)


@torch.no_grad()
def load_keras_kernels(model: nn.Module, path: str | Path) -> list[tuple[str, str]]:
    """The Conv2D and Dense variables of the ``.keras`` file into ``model``'s ``nn.Conv2d`` and
    ``nn.Linear`` modules, the k-th Keras layer of a class into the k-th module of its kind.
    Returns the (module name, Keras path) pairs. All or nothing: ``ValueError`` listing every count
    or shape mismatch, and nothing written."""
    kernels = read_keras_kernels(path)
    pairs, copies, problems = [], [], []
    for kind, module_class in KERNEL_LAYERS.items():
        modules = [(name, m) for name, m in model.named_modules() if isinstance(m, module_class)]
        if len(modules) != len(kernels[kind]):
            problems.append(f"{len(kernels[kind])} {kind} layers in the file, {len(modules)} {module_class.__name__}")
            continue
        for (name, module), (keras_path, values) in zip(modules, kernels[kind]):
            tensors = [torch_layout(module, values[0]), *(torch.from_numpy(v) for v in values[1:])]
            targets = [module.weight] if module.bias is None else [module.weight, module.bias]
            if [t.shape for t in tensors] != [t.shape for t in targets]:
                problems.append(
                    f"{keras_path} holds {[v.shape for v in values]}, "
                    f"module {name} has {[tuple(t.shape) for t in targets]} (in PyTorch's layout)"
                )
            copies += zip(targets, tensors)
            pairs.append((name, keras_path))
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    for target, tensor in copies:
        target.copy_(tensor)
    return pairs


def ported_model(path: str | Path) -> tuple[nn.Sequential, list[tuple[str, str]], list[tuple[str, str]]]:
    """``build_torch_model()`` with every weight of the ``.keras`` file, in inference mode; and the
    (module name, Keras path) pairs of the BatchNormalization layers and of the kernels."""
    model = build_torch_model().eval()
    bn_pairs = load_keras_weights(model, path)  # also builds the lazy BatchNormalization layers
    kernel_pairs = load_keras_kernels(model, path)
    return model, bn_pairs, kernel_pairs


# ------------------------------------------------------------------------------------ comparison


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def run(args: argparse.Namespace) -> dict:
    """Train and save the Keras model, port it, compare; print the report. Returns ``keras_path``
    (str), ``train_seconds``, ``logits_gap`` and ``softmax_gap`` (largest absolute differences on the
    test set), ``keras_accuracy``, ``torch_accuracy``, ``same_predictions`` (how many test images
    get the same class), ``n_test``, ``bn_pairs``, ``kernel_pairs``, ``torch_model``, ``keras_model``."""
    with single_thread():  # see batchnorm.demo.single_thread
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    data = load_digits_images(args.seed)
    if args.quick:
        data = quick_data(data, QUICK)
    keras_model, train_seconds = train_keras_model(data, args.epochs, args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_path = out_dir / FILE_NAME
    keras_model.save(keras_path)
    print(
        f"Keras {keras.__version__} (backend {keras.backend.backend()}): trained on {len(data.y_train)} digits, "
        f"{args.epochs} epoch{'s' * (args.epochs != 1)}, in {train_seconds:.1f} s; saved {keras_path}"
    )

    torch_model, bn_pairs, kernel_pairs = ported_model(keras_path)
    print("PyTorch model, each weighted module and where its weights come from in the .keras file:")
    sources = {name: (keras_path_in_file, "load_keras_weights") for name, keras_path_in_file in bn_pairs}
    sources.update({name: (keras_path_in_file, "h5py, transposed") for name, keras_path_in_file in kernel_pairs})
    for name, module in torch_model.named_modules():
        if name in sources:
            print(f"  [{name:>2}] {type(module).__name__:<20} <- {sources[name][0]:<30} ({sources[name][1]})")

    keras_logits = keras_model.predict(data.x_test.numpy(), batch_size=256, verbose=0)
    with torch.no_grad():
        torch_logits = torch_model(data.x_test).numpy()
    y = data.y_test.numpy()
    result = {
        "keras_path": str(keras_path),
        "train_seconds": train_seconds,
        "logits_gap": float(np.abs(keras_logits - torch_logits).max()),
        "softmax_gap": float(np.abs(_softmax(keras_logits) - _softmax(torch_logits)).max()),
        "keras_accuracy": float((keras_logits.argmax(-1) == y).mean()),
        "torch_accuracy": float((torch_logits.argmax(-1) == y).mean()),
        "same_predictions": int((keras_logits.argmax(-1) == torch_logits.argmax(-1)).sum()),
        "n_test": len(y),
        "bn_pairs": bn_pairs,
        "kernel_pairs": kernel_pairs,
        "torch_model": torch_model,
        "keras_model": keras_model,
    }
    print(f"Test set, {len(y)} images, both models in inference mode:")
    print(
        f"  largest |Keras - PyTorch| of the logits: {result['logits_gap']:.2e} (limit {TOLERANCE:g}); "
        f"of the softmax probabilities: {result['softmax_gap']:.2e}"
    )
    print(
        f"  accuracy: Keras {100 * result['keras_accuracy']:.2f} %, PyTorch {100 * result['torch_accuracy']:.2f} %; "
        f"the same predicted class for {result['same_predictions']}/{len(y)} images"
    )
    print(f"Time: {time.perf_counter() - started:.1f} s (imports aside)")
    return result


# ------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="Keras training epochs (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="data split, initialization and batch order (default: %(default)s)"
    )
    parser.add_argument("--out-dir", default="port-out", help=f"directory for {FILE_NAME} (default: %(default)s)")
    return parse_example_args(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> int:
    result = run(parse_args(argv))
    if result["logits_gap"] > TOLERANCE:
        print(f"FAILED: the logits differ by {result['logits_gap']:.2e} > {TOLERANCE:g}")
        return 1
    print("OK: the PyTorch model reproduces the Keras model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
