"""A trained PyTorch model converted with from_torch, fine-tuned, inspected, recalibrated, folded, exported to ONNX.

    python examples/convert_torch_model.py [--epochs N] [--pretrain-classes K] [--seed S] [--out-dir DIR] [--quick]

1. PyTorch: a small convnet with three ``nn.BatchNorm2d`` (PyTorch's defaults: momentum 0.1, eps
   1e-5), NCHW, trained with Adam (one-cycle schedule) on scikit-learn's 8x8 digits 0-4 (the old
   task; ``--pretrain-classes 10``: all ten).
2. ``batchnorm.from_torch(model)``: each ``BatchNorm2d`` becomes ``BatchNormalization(axis=1,
   momentum=0.9, epsilon=1e-5)`` in place, sharing its weights and running statistics: the test
   logits are unchanged (largest difference printed; limit 1e-6 relative).
3. A new task, all ten digits, Keras's recipe: ``batchnorm.set_trainable(model.backbone, False)``
   (our frozen layers run in inference mode even under ``model.train()``: their moving statistics
   stay bit-identical, checked) and a new head ``Linear -> BatchNormalization() -> ReLU -> Linear``
   whose layer has Keras's defaults (momentum 0.99, epsilon 1e-3), trained for one epoch (42 steps).
   Momentum 0.99 averages over ~100 steps: after 42 the moving statistics have moved
   ``1 - 0.99**42 = 34 %`` of the way from their initial 0 and 1, and the test accuracy in
   ``model.eval()`` is far below the same model's in ``model.train()`` (batch statistics).
4. ``batchnorm.inspect(model, batches)`` over the training images: the head's layer is STALE
   (moving means up to 3-3.7 standard deviations off, moving variances 0.45-14x the inputs'),
   the frozen backbone's are ok. Writes ``inspect_stale.png`` to ``--out-dir``.
5. ``batchnorm.recalibrate(model, batches)``: the head's moving statistics become the exact
   statistics of its inputs over the training images (the frozen layers are left alone, checked);
   the eval accuracy recovers. ``inspect`` again: nothing stale (``inspect_recalibrated.png``).
6. ``batchnorm.fold(model)``: a copy with the four layers folded into the Conv2d/Linear before them
   (limit 1e-5 relative), timed against the unfolded model on one thread, interleaved, medians.
7. ``torch.onnx.export(folded, dynamo=True)`` with a dynamic batch dimension, run in onnxruntime
   (limit 1e-4 against eager).

The exit status is 1 if an invariant breaks: conversion changed the logits, the frozen backbone
changed (fine-tuning or recalibration), the folded or ONNX logits are off.

Measured (defaults: 5 pretraining epochs on digits 0-4, seeds 0-4, 2026-12-03, torch 2.13 CPU,
onnxruntime 1.32, 2 shared CPU cores). Test accuracies (%); step 1-2 on the 226 test images of
digits 0-4, the others on all 450:

    seed                                               0       1       2       3       4
    1. PyTorch model (digits 0-4)                   99.6    99.6   100.0   100.0   100.0
    2. converted (largest |logit diff|: 0)          99.6    99.6   100.0   100.0   100.0
    3. new head, model.eval()                       50.9    50.9    51.1    50.9    60.2
       new head, model.train() (batches of 256)     83.3    88.0    85.8    85.1    83.1
    4. head's largest mean shift (std)               3.1     3.0     3.3     3.7     3.6
       head's largest variance ratio                10.5    10.6     8.4    11.6    14.0
    5. recalibrated, model.eval()                   83.6    88.4    86.2    86.0    83.6
       recalibration gain (points)                 +32.7   +37.6   +35.1   +35.1   +23.3
    6. fold: relative gap of the logits           4.0e-7  4.7e-7  4.7e-7  4.1e-7  3.1e-7
       speed-up, a batch of 256                     1.28    1.26    1.23    1.33    1.30
       speed-up, one image                          1.61    1.54    1.50    1.52    1.64
    7. ONNX: largest |logit diff| to eager        2.9e-6  3.1e-6  2.6e-6  2.4e-6  3.6e-6
       ONNX accuracy                                83.6    88.4    86.2    86.0    83.6
    wall time (s), imports included                 11.8    12.5    10.9    10.2    13.1

The recalibrated model reaches the train-mode accuracy (+0.3 to +0.9 points): recalibration
gives the head, at inference, what it trained on. The frozen backbone's last layer shows a mean
shift of 0.29-0.32 standard deviations in step 4 (ok: below 0.5): its statistics are those of
digits 0-4 and the batches hold all ten. Fold: 9-13 ms -> 7-10 ms for 256 images (the four
normalizations are a small part of the convolutions' work), 0.25-0.6 ms -> 0.17-0.37 ms for one
image (where each module's call overhead counts). Timings on shared cores vary from run to run:
a second series of the five seeds, on busier cores, gave 1.13-1.22x for 256 images, 1.55-1.66x for
one image, in 13-16 s each (the same accuracies and gaps to the digit).

Where recalibration does not pay: pretrained on all ten digits (``--pretrain-classes 10``), the same
fine-tuning leaves the head's layer as stale by inspect's rule (mean shift 0.53-0.77, variance
ratio down to 0.5) but the eval accuracy is 99.1-99.8 % before recalibration and 99.1-99.8 % after
(gain -0.2 to +0.7 points, seeds 0-4): features that already separate the ten digits leave a margin
that the stale statistics do not cross. The stale layer costs accuracy where the features are new
to the task, as after transfer to new classes.

Needs the ``demo`` extra (matplotlib, scikit-learn) and, for step 7, onnx, onnxscript and
onnxruntime (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm import BatchNormalization
from batchnorm.convert import Folded
from batchnorm.demo import accuracy, load_digits_images, parse_example_args, quick_data, shuffled_batches, single_thread

BATCH_SIZE = 32  # training batches, pretraining and fine-tuning alike
PRETRAIN_LR = 3e-3  # peak of the pretraining's one-cycle schedule (Adam): annealed to ~0 at the end
FINETUNE_LR = 1e-2  # Adam's constant learning rate for the new head
FINETUNE_EPOCHS = 1  # one pass over the training images: 42 steps of 32
EVAL_BATCH = 256  # test-time batches, the batches of the inspect/recalibrate pass and the timed batch
TIMING = {256: 30, 1: 200}  # batch size -> interleaved repetitions of each model (--quick: a tenth)
QUICK = {"epochs": 1, "train_images": 256}  # --quick: a smoke run (seconds), its accuracies mean nothing
CONVERSION_TOLERANCE = 1e-6  # the largest |logit difference| / the largest |logit| that counts as unchanged
FOLD_TOLERANCE = 1e-5  # idem, folded against unfolded (SPEC 13's promise)
ONNX_TOLERANCE = 1e-4  # the largest |onnxruntime logit - eager logit|
ONNX_NAME = "digits_folded.onnx"
FIGURES = ("inspect_stale.png", "inspect_recalibrated.png")


# --------------------------------------------------------------------------------------- model


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    # PyTorch's defaults: momentum 0.1 (of the new value), eps 1e-5, an unbiased running variance.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


def build_torch_model(classes: int) -> nn.Sequential:
    """A plain PyTorch convnet on (N, 1, 8, 8) images: ``backbone`` (three Conv2d-BatchNorm2d-ReLU
    blocks, global average pooling) and ``head`` (a Linear classifier over ``classes``)."""
    backbone = nn.Sequential(
        *_conv_block(1, 32),  # -> (N, 32, 8, 8)
        *_conv_block(32, 64),  # -> (N, 64, 8, 8)
        nn.MaxPool2d(2),  # -> (N, 64, 4, 4)
        *_conv_block(64, 64),  # -> (N, 64, 4, 4)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # -> (N, 64)
    )
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(64, classes)))


def build_new_head(classes: int = 10) -> nn.Sequential:
    """The fine-tuning's head: Linear, a fresh BatchNormalization with Keras's defaults (axis=-1,
    momentum 0.99, epsilon 1e-3), ReLU, the classifier. Built for (N, 64) features, so that the
    optimizer sees its gamma and beta."""
    norm = BatchNormalization()
    norm.build((None, 64))
    return nn.Sequential(nn.Linear(64, 64, bias=False), norm, nn.ReLU(), nn.Linear(64, classes))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of ``module`` (a frozen backbone's whole state)."""
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def bit_identical(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    """Whether ``module``'s state is ``before``, bit for bit."""
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def relative_gap(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``: a difference on the scale of the outputs."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[start : start + EVAL_BATCH]) for start in range(0, len(x), EVAL_BATCH)])


# ------------------------------------------------------------------------------------ training


def train(model, x, y, optimizer, epochs: int, generator: torch.Generator, schedule=None) -> int:
    """``epochs`` shuffled passes in batches of BATCH_SIZE, in ``model.train()``, stepping
    ``schedule`` (if any) after each step. Returns the number of steps."""
    model.train()
    steps = 0
    for _ in range(epochs):
        for idx in shuffled_batches(len(y), BATCH_SIZE, generator):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            steps += 1
    return steps


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, generator: torch.Generator) -> float:
    """Adam under a one-cycle schedule peaking at PRETRAIN_LR (:func:`train`). Returns the seconds it took.

    The schedule ends near 0, so the last steps barely move the weights and PyTorch's moving
    averages (momentum 0.1: ~10 steps) end on the final weights' statistics."""
    optimizer = torch.optim.Adam(model.parameters())
    steps = epochs * (len(y) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, PRETRAIN_LR, total_steps=steps)
    started = time.perf_counter()
    train(model, x, y, optimizer, epochs, generator, schedule)
    return time.perf_counter() - started


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> int:
    """FINETUNE_EPOCHS passes of Adam (lr FINETUNE_LR) over the parameters that require a gradient
    (:func:`train`). Returns the number of steps."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=FINETUNE_LR)
    return train(model, x, y, optimizer, FINETUNE_EPOCHS, generator)


# -------------------------------------------------------------------------------- deployment


@torch.inference_mode()
def median_seconds(models: dict[str, nn.Module], x: torch.Tensor, repetitions: int) -> dict[str, float]:
    """The median time of one call of each model on ``x``: the models take turns within each
    repetition (the first alternating), so that both meet the same machine load."""
    for model in models.values():  # warm-up: allocator, first-call work
        model(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models.items())
    for repetition in range(repetitions):
        for name, model in order if repetition % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's exporter logs a warning per torchvision operator it cannot register (torchvision
    is not installed: nothing here uses it) and torch.export emits a FutureWarning about its own
    pytree internals; neither concerns this model."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path):
    """``model`` exported with ``torch.onnx.export(..., dynamo=True)`` (a symbolic batch dimension)
    to ``path``, and an onnxruntime session on it (CPU, one thread)."""
    import onnxruntime

    with _quiet_exporter():
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict:
    """The seven steps (module docstring), printed as they go. Returns a dict:

    ``pretrain_accuracy`` (the PyTorch model, test images of the pretraining's classes),
    ``converted_accuracy`` (idem after ``from_torch``), ``conversion_gap`` (largest |logit
    difference|), ``conversion_relative_gap``, ``finetune_steps``, ``finetune_accuracy`` (the new
    head, eval), ``finetune_train_mode_accuracy`` (a copy in train mode), ``frozen_unchanged`` and
    ``frozen_unchanged_after_recalibration`` (bools: the backbone's state bit-identical),
    ``stale_before`` / ``stale_after`` (paths of the layers ``inspect`` flags),
    ``recalibrated_accuracy``, ``recalibration_gain`` (the two accuracies' difference),
    ``folded_layers``, ``fold_gap`` (relative), ``folded_accuracy``, ``timings`` ({batch size:
    {"unfolded": s, "folded": s, "speedup": x}}), ``onnx_path``, ``onnx_gap`` (largest
    |ONNX - eager| of the logits), ``onnx_accuracy``, ``pngs``, ``seconds``, ``model``, ``folded``."""
    with single_thread():  # one thread: stable timings, and see batchnorm.demo.single_thread
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = load_digits_images(args.seed)
    if args.quick:
        data = quick_data(data, QUICK)
    # load_digits_images gives channels-last (N, 8, 8, 1) images; PyTorch's Conv2d takes (N, 1, 8, 8).
    x_train, y_train = data.x_train.permute(0, 3, 1, 2).contiguous(), data.y_train
    x_test, y_test = data.x_test.permute(0, 3, 1, 2).contiguous(), data.y_test
    k = args.pretrain_classes
    old_train, old_test = y_train < k, y_test < k
    task = "digits 0-9" if k == 10 else f"digits 0-{k - 1}"
    print(
        f"scikit-learn's 8x8 digits: {len(y_train)} training / {len(y_test)} test images; seed {args.seed}", flush=True
    )
    result: dict = {}

    # 1. A PyTorch model, trained.
    model = build_torch_model(k)
    seconds = pretrain(model, x_train[old_train], y_train[old_train], args.epochs, generator)
    torch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.eval()
    reference = logits_of(model, x_test[old_test])
    result["pretrain_accuracy"] = accuracy(model, x_test[old_test], y_test[old_test], EVAL_BATCH)
    print(
        f"\n1. PyTorch: a convnet with {torch_norms} nn.BatchNorm2d (momentum 0.1, eps 1e-5) trained on {task} "
        f"({int(old_train.sum())} images), {args.epochs} epoch{'s' * (args.epochs != 1)} in {seconds:.1f} s\n"
        f"   test accuracy on {task} ({int(old_test.sum())} images): {_pct(result['pretrain_accuracy'])}"
    )

    # 2. Converted in place: the same tensors, the same inference outputs.
    batchnorm.from_torch(model)
    converted = logits_of(model, x_test[old_test])
    result["conversion_gap"] = (converted - reference).abs().max().item()
    result["conversion_relative_gap"] = relative_gap(converted, reference)
    result["converted_accuracy"] = accuracy(model, x_test[old_test], y_test[old_test], EVAL_BATCH)
    first = next(m for m in model.modules() if isinstance(m, BatchNormalization))
    print(
        f"\n2. batchnorm.from_torch(model): each BatchNorm2d -> {type(first).__name__}(axis=1, "
        f"momentum={first.momentum:g}, epsilon={first.epsilon:g}), sharing its tensors\n"
        f"   test accuracy {_pct(result['converted_accuracy'])}; largest |logit difference| to PyTorch's: "
        f"{result['conversion_gap']:.2g} (relative {result['conversion_relative_gap']:.2g}, limit "
        f"{CONVERSION_TOLERANCE:g})"
    )

    # 3. A new head on the frozen backbone, for all ten digits.
    backbone = model.backbone
    batchnorm.set_trainable(backbone, False)
    model.head = build_new_head(10)
    head_norm = model.head[1]
    frozen = snapshot(backbone)
    result["finetune_steps"] = fine_tune(model, x_train, y_train, generator)
    result["frozen_unchanged"] = bit_identical(frozen, backbone)
    model.eval()
    result["finetune_accuracy"] = accuracy(model, x_test, y_test, EVAL_BATCH)
    result["finetune_train_mode_accuracy"] = accuracy(copy.deepcopy(model).train(), x_test, y_test, EVAL_BATCH)
    steps, momentum = result["finetune_steps"], head_norm.momentum
    print(
        f"\n3. Fine-tuning for all ten digits: batchnorm.set_trainable(model.backbone, False), a new head\n"
        f"   Linear(64, 64) -> BatchNormalization() (Keras's momentum {momentum:g}, epsilon {head_norm.epsilon:g}) "
        f"-> ReLU -> Linear(64, 10),\n"
        f"   {steps} steps (Adam, lr {FINETUNE_LR:g}) under model.train()\n"
        f"   test accuracy, model.eval() (moving statistics):                         "
        f"{100 * result['finetune_accuracy']:5.1f} %\n"
        f"   test accuracy, a copy in model.train() (batch statistics, batches of {EVAL_BATCH}): "
        f"{100 * result['finetune_train_mode_accuracy']:5.1f} %\n"
        f"   the head's moving statistics moved {100 * (1 - momentum**steps):.0f} % of the way from their initial "
        f"0 and 1 (1 - {momentum:g}**{steps})\n"
        f"   the frozen backbone ({len(frozen)} tensors: weights and moving statistics) bit-identical after "
        f"fine-tuning: {_yes(result['frozen_unchanged'])}"
    )

    # 4. What is wrong: inspect.
    batches = list(x_train.split(EVAL_BATCH))
    pngs = [out_dir / name for name in FIGURES]
    print(f"\n4. batchnorm.inspect(model, the training images in batches of {EVAL_BATCH}, plot={str(pngs[0])!r}):")
    report = batchnorm.inspect(model, batches, plot=pngs[0])
    result["stale_before"] = [h.path for h in report if h.stale]

    # 5. Recalibrate: exact population statistics for the layers that train; the frozen ones stay.
    batchnorm.recalibrate(model, batches)
    result["frozen_unchanged_after_recalibration"] = bit_identical(frozen, backbone)
    result["recalibrated_accuracy"] = accuracy(model, x_test, y_test, EVAL_BATCH)
    result["recalibration_gain"] = result["recalibrated_accuracy"] - result["finetune_accuracy"]
    print(
        f"\n5. batchnorm.recalibrate(model, the same batches): test accuracy {_pct(result['finetune_accuracy'])} -> "
        f"{_pct(result['recalibrated_accuracy'])} ({100 * result['recalibration_gain']:+.1f} points); the frozen "
        f"backbone untouched: {_yes(result['frozen_unchanged_after_recalibration'])}\n"
        f"   batchnorm.inspect again (plot={str(pngs[1])!r}):"
    )
    report = batchnorm.inspect(model, batches, plot=pngs[1])
    result["stale_after"] = [h.path for h in report if h.stale]
    result["pngs"] = [str(p) for p in pngs]

    # 6. Fold for deployment.
    folded = batchnorm.fold(model)
    result["folded_layers"] = sum(isinstance(m, Folded) for m in folded.modules())
    unfolded_logits, folded_logits = logits_of(model, x_test), logits_of(folded, x_test)
    result["fold_gap"] = relative_gap(folded_logits, unfolded_logits)
    result["folded_accuracy"] = accuracy(folded, x_test, y_test, EVAL_BATCH)
    print(
        f"\n6. batchnorm.fold(model): {result['folded_layers']} BatchNormalization layers folded into the "
        f"Conv2d/Linear before them\n"
        f"   largest |folded - unfolded| / largest |unfolded| of the test logits: {result['fold_gap']:.2g} "
        f"(limit {FOLD_TOLERANCE:g}); test accuracy {_pct(result['folded_accuracy'])}\n"
        f"   inference time, one thread, medians of interleaved repetitions:"
    )
    result["timings"] = {}
    for batch, repetitions in TIMING.items():
        repetitions = max(3, repetitions // 10) if args.quick else repetitions
        times = median_seconds({"unfolded": model, "folded": folded}, x_test[:batch], repetitions)
        times["speedup"] = times["unfolded"] / times["folded"]
        result["timings"][batch] = times
        what = "one image" if batch == 1 else f"a batch of {batch}"
        print(
            f"     {what + ':':<16} unfolded {1e3 * times['unfolded']:6.2f} ms, folded {1e3 * times['folded']:6.2f} ms"
            f" ({repetitions} repetitions): {times['speedup']:.2f}x"
        )

    # 7. ONNX.
    import onnxruntime

    onnx_path = out_dir / ONNX_NAME
    session = export_onnx(folded, x_test[:EVAL_BATCH], onnx_path)
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: x_test.numpy()})
    onnx_logits = torch.from_numpy(onnx_logits)
    result["onnx_path"] = str(onnx_path)
    result["onnx_gap"] = (onnx_logits - folded_logits).abs().max().item()
    result["onnx_accuracy"] = (onnx_logits.argmax(-1) == y_test).float().mean().item()
    print(
        f"\n7. torch.onnx.export(folded, dynamo=True) -> {onnx_path}, run in onnxruntime {onnxruntime.__version__} "
        f"on the {len(y_test)} test images at once\n"
        f"   largest |ONNX - eager| of the logits: {result['onnx_gap']:.2g} (limit {ONNX_TOLERANCE:g}); "
        f"test accuracy {_pct(result['onnx_accuracy'])}"
    )
    result["seconds"] = time.perf_counter() - started
    print(f"\nTime: {result['seconds']:.1f} s (imports aside)")
    result["model"], result["folded"] = model, folded
    return result


def failures(result: dict) -> list[str]:
    """The invariants ``result`` breaks (empty: all hold)."""
    problems = []
    if not result["conversion_relative_gap"] <= CONVERSION_TOLERANCE:
        problems.append(
            f"from_torch changed the logits by {result['conversion_relative_gap']:.2e} (relative) "
            f"> {CONVERSION_TOLERANCE:g}"
        )
    if not result["frozen_unchanged"]:
        problems.append("fine-tuning changed the frozen backbone")
    if not result["frozen_unchanged_after_recalibration"]:
        problems.append("recalibrate changed the frozen backbone")
    if not result["fold_gap"] <= FOLD_TOLERANCE:
        problems.append(f"the folded logits differ by {result['fold_gap']:.2e} (relative) > {FOLD_TOLERANCE:g}")
    if not result["onnx_gap"] <= ONNX_TOLERANCE:
        problems.append(f"the ONNX logits differ by {result['onnx_gap']:.2e} > {ONNX_TOLERANCE:g}")
    return problems


def _pct(a: float) -> str:
    return f"{100 * a:.1f} %"


def _yes(flag: bool) -> str:
    return "YES" if flag else "NO!"


# ------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="PyTorch pretraining epochs (default: %(default)s)")
    parser.add_argument(
        "--pretrain-classes",
        type=int,
        default=5,
        help="pretrain on digits 0 to K-1; the new head learns all ten (default: %(default)s; 10: the same task)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="data split, initialization and batch order (default: %(default)s)"
    )
    parser.add_argument(
        "--out-dir", default="convert-out", help="directory for the figures and the .onnx (default: %(default)s)"
    )
    args = parse_example_args(parser, argv, QUICK)
    if not 2 <= args.pretrain_classes <= 10:
        parser.error("--pretrain-classes must be between 2 and 10")
    return args


def main(argv: list[str] | None = None) -> int:
    problems = failures(run(parse_args(argv)))
    for problem in problems:
        print(f"FAILED: {problem}")
    if problems:
        return 1
    print("OK: conversion, frozen backbone, fold and ONNX export as promised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
