"""``python -m batchnorm demo``: what BatchNormalization is for, shown on a small digit classifier.

Trains a channels-last (NHWC) convolutional network whose normalization layers are
``BatchNormalization(axis=-1)`` on the 8x8 handwritten digits that ship with scikit-learn
(no download, CPU only), then shows in the terminal:

(a) test accuracy in inference mode (moving statistics) against the same model forced into
    training mode on small test batches (batch statistics of a few samples are noisy);
(b) a fine-tuning run of a new head with the backbone frozen by ``set_trainable(backbone, False)``,
    in ``model.train()`` mode, whose moving statistics stay bit-for-bit unchanged;
(c) a PNG figure: the training curve, and one layer's moving mean/variance converging to the
    population statistics of that layer's inputs.

Needs the ``demo`` extra (matplotlib, scikit-learn, tqdm).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm import BatchNormalization, set_trainable
from batchnorm.population import population_statistics

__all__ = ["run_demo", "build_model", "bn_buffers", "buffers_equal"]

BATCH_SIZE = 16  # training batch size (84 steps per epoch)
MAX_LR = 1e-3  # peak of the one-cycle learning-rate schedule (Adam)
SMALL_BATCH = 4  # test batch size for the "forced training mode" comparison
FINETUNE_STEPS = 60  # steps of the new head on the frozen backbone
TRACKED_LAYER = 0  # index (among the BatchNormalization layers) of the layer in the figure:
# the first, so its inputs depend on the conv weights in front of it only
TRACKED_CHANNELS = 3  # how many of its channels the figure shows
FIGURE_NAME = "batchnorm_demo.png"


# --------------------------------------------------------------------------------------- model


class NHWC(nn.Module):
    """Apply an NCHW module (conv, pooling) to a channels-last NHWC tensor.

    ``x.permute(0, 3, 1, 2)`` of a contiguous NHWC tensor is an NCHW tensor in
    ``torch.channels_last`` memory format, which convolutions accept and return as is,
    so neither permute copies.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GlobalAvgPoolNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2))


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    # Conv without bias: the BatchNormalization's beta plays that part (as usual in Keras).
    return [NHWC(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)), BatchNormalization(axis=-1), nn.ReLU()]


def build_model(n_classes: int = 10) -> nn.Sequential:
    """``Sequential(backbone, head)``; every activation is channels-last, every
    BatchNormalization normalizes the last axis (on 4-D maps and on 2-D features)."""
    backbone = nn.Sequential(
        *_conv_block(1, 32),  # (N, 8, 8, 1)  -> (N, 8, 8, 32)
        *_conv_block(32, 64),  # -> (N, 8, 8, 64)
        NHWC(nn.MaxPool2d(2)),  # -> (N, 4, 4, 64)
        *_conv_block(64, 64),  # -> (N, 4, 4, 64)
        GlobalAvgPoolNHWC(),  # -> (N, 64)
        nn.Linear(64, 64, bias=False),
        BatchNormalization(axis=-1),  # on (N, 64): 2-D features
        nn.ReLU(),
    )
    head = nn.Linear(64, n_classes)
    return nn.Sequential(backbone, head)


def bn_layers(module: nn.Module) -> list[BatchNormalization]:
    return [m for m in module.modules() if isinstance(m, BatchNormalization)]


def bn_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the moving statistics of every BatchNormalization in ``module``."""
    out = {}
    for i, layer in enumerate(bn_layers(module)):
        out[f"bn{i}.moving_mean"] = layer.moving_mean.detach().clone()
        out[f"bn{i}.moving_variance"] = layer.moving_variance.detach().clone()
    return out


def buffers_equal(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """True iff both snapshots have the same keys and every buffer is bit-for-bit equal."""
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------- data


@dataclass
class Digits:
    """scikit-learn's 8x8 digits as channels-last ``(N, 8, 8, 1)`` images in [0, 1], split 3:1."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def parse_example_args(parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict) -> argparse.Namespace:
    """The examples' command line: ``parser``'s options (an ``--epochs`` among them) and ``--quick``,
    a smoke run of ``quick["epochs"]`` epochs on ``quick["train_images"]`` training images
    (:func:`quick_data`), which overrides ``--epochs``. ``--epochs`` must be >= 1."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {quick['epochs']} epoch(s) on {quick['train_images']} training images (overrides --epochs)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = quick["epochs"]
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def quick_data(data: Digits, quick: dict) -> Digits:
    """``data`` with its first ``quick["train_images"]`` training images only (the examples' ``--quick``)."""
    return replace(data, x_train=data.x_train[: quick["train_images"]], y_train=data.y_train[: quick["train_images"]])


def load_digits_images(seed: int) -> Digits:
    """The digits of :class:`Digits`, split stratified with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(-1)  # (N, 8, 8, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, stratify=digits.target, random_state=seed
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches; drops the last incomplete batch (so no tiny batch feeds the statistics)."""
    perm = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield perm[start : start + batch_size]


@contextlib.contextmanager
def single_thread():
    """PyTorch on one thread inside the block, as it was after it.

    The examples' small batches (4 to 32 tiny images) gain nothing from intra-op threads, and on a
    machine whose cores are busy with other work the threads wait for each other: up to 10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """The share of ``x`` that ``model`` (in its mode as it is) classifies as ``y``, in batches."""
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        correct += (logits.argmax(-1) == y[start : start + batch_size]).sum().item()
    return correct / len(y)


def _population_stats(
    model: nn.Module, layer: BatchNormalization, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``layer``'s inputs over all of ``x``, with the
    model's current weights in front of it: :func:`batchnorm.population.population_statistics`,
    the pass that ``recalibrate`` measures with (nothing in the model is written)."""
    [statistics] = [s for m, s in population_statistics(model, [x]).values() if m is layer]
    return statistics.mean.float(), statistics.var.float()


# ------------------------------------------------------------------------------------ training


@dataclass
class _Training:
    """What training leaves for the report and the figure: per-epoch ``history``, the tracked
    layer's moving statistics before the first step and after every step, the time it took."""

    steps_per_epoch: int
    history: dict[str, list] = field(
        default_factory=lambda: {"epoch": [], "train_loss": [], "train_accuracy": [], "test_accuracy": []}
    )
    trace_mean: list[torch.Tensor] = field(default_factory=list)
    trace_var: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0

    def record_statistics(self, layer: BatchNormalization) -> None:
        self.trace_mean.append(layer.moving_mean.detach().clone())
        self.trace_var.append(layer.moving_variance.detach().clone())

    def record_epoch(self, epoch: int, train_loss: float, train_accuracy: float, test_accuracy: float) -> None:
        self.history["epoch"].append(epoch)
        self.history["train_loss"].append(train_loss)
        self.history["train_accuracy"].append(train_accuracy)
        self.history["test_accuracy"].append(test_accuracy)


def _built_model(x: torch.Tensor) -> nn.Sequential:
    """``build_model()`` with its lazily created weights built by one call on ``x[:2]``, in
    inference mode so that no moving statistic is written before training."""
    model = build_model()
    model.eval()
    with torch.no_grad():
        model(x[:2])
    return model


def _train(
    model: nn.Module,
    tracked: BatchNormalization,
    data: Digits,
    epochs: int,
    generator: torch.Generator,
    progress: bool,
) -> _Training:
    """Adam under a one-cycle learning-rate schedule, ``epochs`` passes in batches of BATCH_SIZE.

    Records the loss and accuracies of every epoch (test accuracy in inference mode) and
    ``tracked``'s moving statistics after every step, for the figure.
    """
    from tqdm import tqdm

    run = _Training(steps_per_epoch=len(data.y_train) // BATCH_SIZE)
    total_steps = epochs * run.steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters())  # lr set by the one-cycle schedule
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=MAX_LR, total_steps=total_steps)
    run.record_statistics(tracked)
    bar = tqdm(total=total_steps, unit="step", disable=not progress, desc="training", dynamic_ncols=True)

    def after_step() -> None:
        run.record_statistics(tracked)
        bar.update(1)

    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_loss, train_accuracy = _train_epoch(model, optimizer, schedule, data, generator, after_step)
        model.eval()
        test_accuracy = accuracy(model, data.x_test, data.y_test, 256)
        run.record_epoch(epoch, train_loss, train_accuracy, test_accuracy)
        bar.set_postfix_str(f"epoch {epoch}/{epochs}, loss {train_loss:.3f}, test acc {100 * test_accuracy:.1f}%")
    run.seconds = time.perf_counter() - t0
    bar.close()
    return run


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    data: Digits,
    generator: torch.Generator,
    after_step: Callable[[], None],
) -> tuple[float, float]:
    """One shuffled pass in training mode; the mean loss and the accuracy over its batches."""
    model.train()
    loss_sum = correct = seen = 0
    for idx in shuffled_batches(len(data.y_train), BATCH_SIZE, generator):
        logits = model(data.x_train[idx])
        loss = F.cross_entropy(logits, data.y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_sum += loss.item() * len(idx)
        correct += (logits.argmax(-1) == data.y_train[idx]).sum().item()
        seen += len(idx)
        after_step()
    return loss_sum / seen, correct / seen


# ------------------------------------------------------------------------------ the three parts


@dataclass
class _ModeAccuracies:
    """(a) Test accuracies of the trained model in inference mode, and of a copy of it forced into
    training mode: on test batches of SMALL_BATCH, and on the whole test set as one batch."""

    inference: float
    small_batch: float
    full_batch: float


def _accuracy_by_mode(model: nn.Module, data: Digits) -> _ModeAccuracies:
    model.eval()
    inference = accuracy(model, data.x_test, data.y_test, 256)
    forced = copy.deepcopy(model).train()  # a copy: training-mode calls update moving statistics
    return _ModeAccuracies(
        inference=inference,
        small_batch=accuracy(forced, data.x_test, data.y_test, SMALL_BATCH),
        full_batch=accuracy(forced, data.x_test, data.y_test, len(data.y_test)),
    )


@dataclass
class _FineTuning:
    """(b) The new head's test accuracy, and whether the frozen backbone stayed bit-for-bit equal."""

    accuracy: float
    buffers_unchanged: bool
    weights_unchanged: bool
    buffers_checked: int
    frozen_layers: int


def _fine_tune_new_head(model: nn.Sequential, data: Digits, generator: torch.Generator) -> _FineTuning:
    """Freeze the backbone with ``set_trainable(backbone, False)`` and train a new head for
    FINETUNE_STEPS steps in ``model.train()`` mode, the usual loop: the frozen layers must stay in
    inference mode, so their moving statistics must not move."""
    backbone, head = model[0], model[1]
    set_trainable(backbone, False)
    finetuned = nn.Sequential(backbone, nn.Linear(head.in_features, head.out_features))
    finetuned.train()
    before = bn_buffers(backbone)
    weights_before = [p.detach().clone() for p in backbone.parameters()]
    _train_steps(finetuned, data, generator, FINETUNE_STEPS)
    after = bn_buffers(backbone)
    weights_unchanged = all(torch.equal(a, b) for a, b in zip(weights_before, backbone.parameters()))
    finetuned.eval()
    return _FineTuning(
        accuracy=accuracy(finetuned, data.x_test, data.y_test, 256),
        buffers_unchanged=buffers_equal(before, after),
        weights_unchanged=weights_unchanged,
        buffers_checked=len(after),
        frozen_layers=len(bn_layers(backbone)),
    )


def _train_steps(model: nn.Module, data: Digits, generator: torch.Generator, steps: int) -> None:
    """``steps`` Adam steps (lr 1e-2) on the parameters that require a gradient."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = 0
    while step < steps:
        for idx in shuffled_batches(len(data.y_train), BATCH_SIZE, generator):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break


def _figure_of_moving_statistics(
    path: Path, model: nn.Module, tracked: BatchNormalization, data: Digits, training: _Training
) -> tuple[Path, float]:
    """(c) Draw the figure; return its path and how far the tracked layer's final moving means
    are from the population means of its inputs, in population standard deviations (the most
    over its channels)."""
    pop_mean, pop_var = _population_stats(model, tracked, data.x_train)
    traces = _Traces(
        torch.stack(training.trace_mean), torch.stack(training.trace_var), pop_mean, pop_var,
        training.steps_per_epoch, tracked.momentum,
    )  # fmt: skip
    png = _draw_figure(path, training.history, traces)
    gap = ((traces.moving_mean[-1] - pop_mean).abs() / pop_var.sqrt()).max().item()
    return png, gap


# ---------------------------------------------------------------------------------------- demo


def run_demo(epochs: int = 25, seed: int = 0, out_dir: str | Path = "demo-out", progress: bool = True) -> dict:
    """Train, compare, fine-tune, draw; print a short report and return its figures.

    Returns a dict with: ``epochs``, ``seed``, ``train_seconds``, ``final_train_loss``,
    ``test_accuracy`` (inference mode), ``train_mode_accuracy_small_batch`` (training mode, test
    batches of ``small_batch``), ``train_mode_accuracy_full_batch`` (training mode, the whole test
    set as one batch), ``small_batch``, ``finetune_accuracy``, ``finetune_steps``,
    ``frozen_unchanged`` (bool: every moving statistic of the frozen backbone bit-for-bit equal
    after fine-tuning), ``frozen_weights_unchanged`` (bool, same for its parameters),
    ``frozen_buffers_checked``, ``png`` (path, str), ``history`` (per-epoch lists).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, received epochs={epochs!r}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    png_path = Path(out_dir) / FIGURE_NAME
    data = load_digits_images(seed)
    model = _built_model(data.x_train)
    tracked = bn_layers(model)[TRACKED_LAYER]
    _print_setup(model, data)
    training = _train(model, tracked, data, epochs, generator, progress)
    _print_training(training, epochs)
    modes = _accuracy_by_mode(model, data)
    _print_modes(modes, len(data.y_test), tracked.momentum)
    fine_tuning = _fine_tune_new_head(model, data, generator)
    _print_fine_tuning(fine_tuning)
    png, gap = _figure_of_moving_statistics(png_path, model, tracked, data, training)
    _print_figure(png, gap)
    return {
        "epochs": epochs,
        "seed": seed,
        "train_seconds": training.seconds,
        "final_train_loss": training.history["train_loss"][-1],
        "test_accuracy": modes.inference,
        "train_mode_accuracy_small_batch": modes.small_batch,
        "train_mode_accuracy_full_batch": modes.full_batch,
        "small_batch": SMALL_BATCH,
        "finetune_accuracy": fine_tuning.accuracy,
        "finetune_steps": FINETUNE_STEPS,
        "frozen_unchanged": fine_tuning.buffers_unchanged,
        "frozen_weights_unchanged": fine_tuning.weights_unchanged,
        "frozen_buffers_checked": fine_tuning.buffers_checked,
        "png": str(png),
        "history": training.history,
    }


# ------------------------------------------------------------------------------------- report


def _pct(a: float) -> str:
    return f"{100 * a:5.1f} %"


def _print_setup(model: nn.Module, data: Digits) -> None:
    print(
        "batchnorm demo: a small channels-last CNN with BatchNormalization(axis=-1), "
        "on scikit-learn's 8x8 digits, on CPU"
    )
    print(
        f"  {len(data.y_train)} training / {len(data.y_test)} test images; "
        f"{len(bn_layers(model))} BatchNormalization layers; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters",
        flush=True,
    )


def _print_training(training: _Training, epochs: int) -> None:
    print(
        f"Trained {epochs} epoch{'s' * (epochs != 1)} ({epochs * training.steps_per_epoch} steps, "
        f"batches of {BATCH_SIZE}) in {training.seconds:.1f} s; final training loss "
        f"{training.history['train_loss'][-1]:.3f}."
    )


def _print_modes(acc: _ModeAccuracies, n_test: int, momentum: float) -> None:
    print()
    print("(a) Test accuracy, inference mode vs the same model forced into training mode")
    print(
        f"    {_pct(acc.inference)}  model.eval(): moving statistics, so a prediction does not "
        "depend on its batch-mates"
    )
    print(
        f"    {_pct(acc.full_batch)}  model.train(), the {n_test} test images as one batch: "
        "its statistics are close to the moving ones"
    )
    print(
        f"    {_pct(acc.small_batch)}  model.train(), batches of {SMALL_BATCH}: the statistics of "
        f"{SMALL_BATCH} images are noisy, so are the outputs"
    )
    if acc.inference < acc.full_batch - 0.02:
        print(
            f"    (inference trails: the moving statistics still remember their start values; "
            f"momentum {momentum:g} averages\n     over ~{1 / (1 - momentum):.0f} "
            "steps. Train for more epochs.)"
        )


def _print_fine_tuning(result: _FineTuning) -> None:
    print()
    print(
        f"(b) A new head trained for {FINETUNE_STEPS} steps under model.train(), backbone frozen "
        "by set_trainable(backbone, False)"
    )
    print(f"    {_pct(result.accuracy)}  test accuracy of the new head on the frozen backbone's features")
    verdict = "    YES    " if result.buffers_unchanged else "    NO!    "
    print(
        f"{verdict}moving statistics of the {result.frozen_layers} frozen layers bit-for-bit "
        f"unchanged (torch.equal on {result.buffers_checked} buffers)"
    )
    if not result.weights_unchanged:
        print("    NO!    the frozen backbone's weights changed")


def _print_figure(png: Path, gap: float) -> None:
    print()
    print(f"(c) Figure: {png}")
    print(
        "    the training curve, and the 1st BatchNormalization layer's moving mean/variance "
        "reaching the\n    mean/variance of its inputs over the training set "
        f"(final gap in the means: {gap:.2g} standard deviations)"
    )


# -------------------------------------------------------------------------------------- figure


class _Traces(NamedTuple):
    """The tracked layer's moving statistics per step ``(steps, C)``, the population statistics
    of its inputs ``(C,)``, and what the time axis and the title need."""

    moving_mean: torch.Tensor
    moving_variance: torch.Tensor
    population_mean: torch.Tensor
    population_variance: torch.Tensor
    steps_per_epoch: int
    momentum: float


def _draw_figure(path: Path, history: dict, traces: _Traces) -> Path:
    """Write the PNG: the training curve, and the tracked layer's moving statistics per step
    against the population statistics of its inputs."""
    # Figure + Agg canvas directly: no pyplot, so no global backend is switched or window opened.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.9), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_mean, ax_var = fig.subplots(1, 3)
    _plot_training_curve(ax_loss, history)
    _plot_moving_statistics(ax_mean, ax_var, traces)
    fig.suptitle(
        "Solid: the layer's moving statistics during training, for 3 of its channels.   "
        "Dashed: mean/variance of the layer's inputs over the whole training set, "
        "with the final weights in front of it.",
        fontsize=9,
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _plot_training_curve(ax_loss, history: dict) -> None:
    """Training loss per epoch (log scale), and on a twin axis the training and test accuracies."""
    ax_loss.plot(history["epoch"], history["train_loss"], "o-", color="tab:blue", label="training loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy (training)", color="tab:blue")
    ax_loss.set_yscale("log")
    ax_acc = ax_loss.twinx()
    curves = (
        ("train_accuracy", "s--", "tab:orange", "training accuracy (batch statistics)"),
        (
            "test_accuracy",
            "^-",
            "tab:green",
            "test accuracy (inference mode: moving\nstatistics, which lag in the first epochs)",
        ),
    )
    for key, style, color, label in curves:
        ax_acc.plot(history["epoch"], [100 * a for a in history[key]], style, color=color, label=label)
    ax_acc.set_ylabel("accuracy (%)")
    lines = ax_loss.get_lines() + ax_acc.get_lines()
    ax_loss.legend(
        lines,
        [ln.get_label() for ln in lines],
        loc="upper center",
        fontsize=8,
        bbox_to_anchor=(0.5, -0.13),
        ncol=2,
        frameon=False,
    )
    ax_loss.set_title("Training curve")


def _plot_moving_statistics(ax_mean, ax_var, traces: _Traces) -> None:
    """TRACKED_CHANNELS channels' moving mean and variance per step (solid), and the population
    values they should reach (dashed)."""
    # Channels spread over the range of population means, so their curves don't overlap.
    trace_mean, trace_var, pop_mean, pop_var, steps_per_epoch, momentum = traces
    order = torch.argsort(pop_mean)
    picks = [int(order[round(i * (len(order) - 1) / max(TRACKED_CHANNELS - 1, 1))]) for i in range(TRACKED_CHANNELS)]
    steps = torch.arange(len(trace_mean)).numpy()
    epochs_axis = [s / steps_per_epoch for s in steps]
    colors = ["tab:red", "tab:purple", "tab:cyan", "tab:olive", "tab:brown"]
    for ax, trace, pop in ((ax_mean, trace_mean, pop_mean), (ax_var, trace_var, pop_var)):
        for k, ch in enumerate(picks):
            c = colors[k % len(colors)]
            ax.plot(epochs_axis, trace[:, ch].numpy(), color=c, lw=1.4, label=f"channel {ch}")
            ax.axhline(float(pop[ch]), color=c, ls="--", lw=1, alpha=0.8)
        ax.set_xlabel("epoch")
    ax_var.set_yscale("log")
    ax_mean.set_ylabel("moving_mean")
    ax_var.set_ylabel("moving_variance (log scale)")
    ax_var.plot([], [], color="gray", ls="--", lw=1, label="population value")
    ax_var.legend(fontsize=8, loc="upper right")
    ax_mean.set_title(f"1st BatchNormalization: moving_mean (momentum {momentum:g})")
    ax_var.set_title("1st BatchNormalization: moving_variance")
