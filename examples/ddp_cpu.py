"""Synchronized BatchNormalization under DistributedDataParallel, on CPU (gloo).

    torchrun --nproc-per-node 2 examples/ddp_cpu.py [--epochs N] [--batch B]

Trains the demo's channels-last CNN (``batchnorm.demo.build_model``, four BatchNormalization
layers) on scikit-learn's 8x8 digits with every BatchNormalization ``synchronized=True``. Each
step's global batch is split unequally between the processes (rank ``r`` gets a share
proportional to ``r + 1``), so the statistics only come out right if they are combined
count-weighted.

The check: before every step, rank 0 copies the DDP model's weights and moving statistics into an
unsynchronized copy, which takes the same step on the whole batch in one process; the two results
must agree (largest relative difference printed; exit status 1 above 1e-9). The model runs in
float64 so that the check sees the algorithm, not roundings: two and one processes sum in
different orders, and this network turns differences of float32 rounding into much larger ones
(a near-tie in a max-pooling window sends a gradient elsewhere: one process, with its weights
perturbed by 1e-7, takes steps up to 1e-3 apart, and whole runs end 20% apart after 80 steps).
Synchronization itself works the same in float32 and bfloat16.

Needs the ``demo`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from batchnorm import BatchNormalization
from batchnorm.demo import build_model

TOLERANCE = 1e-9  # largest accepted difference, relative to each tensor's largest magnitude


def load_digits(seed: int = 0):
    """Images ``(N, 8, 8, 1)`` in [0, 1] and labels, shuffled, split 75% / 25%."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(-1)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = len(y) * 3 // 4
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``batch``: a share proportional to ``rank + 1`` (unequal on purpose)."""
    weights = torch.arange(1, world + 1, dtype=torch.float64)
    cuts = torch.cat([torch.zeros(1), weights.cumsum(0) / weights.sum() * len(batch)]).round().long()
    return batch[cuts[rank] : cuts[rank + 1]]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def track_worst(worst: dict, ours: dict, theirs: dict) -> None:
    """Keep, per kind of state, the largest relative difference seen and the tensor's name."""
    for name, tensor in ours.items():
        kind = "moving statistics" if "moving_" in name else "parameters"
        worst[kind] = max(worst[kind], (relative_difference(tensor, theirs[name]), name))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # moving statistics: no collective, no buffer written
    return (model(x).argmax(-1) == y).float().mean().item()


def build_models(x: torch.Tensor, rank: int) -> tuple[nn.Module, nn.Module | None]:
    """The demo model with synchronized normalization, in float64; on rank 0, an unsynchronized copy."""
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_model()
    for layer in model.modules():
        if isinstance(layer, BatchNormalization):
            layer.synchronized = True
            layer.momentum = 0.9  # a few hundred steps only: moving statistics with a short memory
    model.eval()
    with torch.no_grad():
        model(x[:2])  # builds the lazily created weights (inference: no collective)
    model.double()  # after the build, so that it reaches the normalization weights
    if rank != 0:
        return model, None
    reference = copy.deepcopy(model)
    for layer in reference.modules():
        if isinstance(layer, BatchNormalization):
            layer.synchronized = False
    return model, reference


def train(model: nn.Module, reference: nn.Module | None, data: tuple, args: argparse.Namespace) -> dict:
    """Train ``model`` under DDP; on rank 0, check each step against ``reference``. Return the
    largest differences seen, by kind of state."""
    x_train, y_train, x_test, y_test = data
    rank, world = dist.get_rank(), dist.get_world_size()
    # The first convolution's weight gradient comes channels-last: its strides differ from the
    # weight's only along a dimension of size 1, which DDP reports but which costs nothing.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for m in (ddp, reference) if m is not None]
    worst = {"parameters": (0.0, ""), "moving statistics": (0.0, "")}
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order) - args.batch + 1, args.batch):
            batch = order[start : start + args.batch]
            mine = shard(batch, rank, world)
            if reference is not None:
                reference.load_state_dict(model.state_dict())  # the same starting point, then one step
            # DDP averages the ranks' gradients, so each rank's loss is its share of the batch mean.
            losses = [F.cross_entropy(ddp.train()(x_train[mine]), y_train[mine], reduction="sum") * world / len(batch)]
            if reference is not None:
                losses.append(F.cross_entropy(reference.train()(x_train[batch]), y_train[batch]))
            for loss, optimizer in zip(losses, optimizers):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if reference is not None:
                track_worst(worst, model.state_dict(), reference.state_dict())
        if reference is not None:
            print(
                f"epoch {epoch + 1}: loss {losses[1].item():.3f} (last batch), "
                f"test accuracy {accuracy(model, x_test, y_test):.1%} (inference mode)"
            )
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="global batch size (default: 32)")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # rank, world size and rendezvous from torchrun's environment
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the processes share the CPUs
    x_train, y_train, x_test, y_test = load_digits()
    model, reference = build_models(x_train, rank)
    data = x_train.double(), y_train, x_test.double(), y_test
    if rank == 0:
        sizes = [len(shard(torch.empty(args.batch), r, world)) for r in range(world)]
        print(
            f"{world} processes (gloo, CPU), global batch {args.batch} split {sizes}; "
            f"{args.epochs} epochs of {len(y_train) // args.batch} steps"
        )
    started = time.perf_counter()
    worst = train(model, reference, data, args)
    status = 0
    if reference is not None:
        print(f"trained in {time.perf_counter() - started:.1f} s (rank 0 also ran the one-process steps)")
        for kind, (difference, name) in worst.items():
            print(f"{kind:>17}: largest relative difference to the one-process step {difference:.1e} ({name})")
            status |= difference > TOLERANCE
        print(
            "OK: every synchronized DDP step matches one process on the whole batch"
            if not status
            else f"MISMATCH: a difference above {TOLERANCE:g}"
        )
    # Leave together: under torchrun (torch 2.13) a process that exits while another still works
    # in the group is now and then aborted at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
