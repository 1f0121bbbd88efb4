"""Synchronized statistics (SPEC section 8) across real processes.

The multi-process tests start their ranks with ``batchnorm.testing.run_local_group``: fresh
processes joined by a gloo group on 127.0.0.1 at a free port. Each rank builds the same seeded
global batch, computes the single-process reference on all of it with an unsynchronized layer,
runs a synchronized layer on its own shard and checks its part of the results; a mismatch raises
in the worker and fails the test with the worker's traceback. Starting processes costs seconds, so
each world size runs all its checks in one group.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from batchnorm import BatchNormalization, distributed
from batchnorm.__main__ import main
from batchnorm.testing import free_port, run_local_group

TIMEOUT_S = 60  # the groups' collective timeout, generous: the machine may be loaded
SHORT_TIMEOUT_S = 5  # for the tests of a peer that leaves
DEADLINE_S = 240  # processes still running by then fail the test instead of hanging it
CHANNELS, STEPS = 5, 3

pytestmark = pytest.mark.distributed  # every test here starts processes or uses torch.distributed


@dataclasses.dataclass(frozen=True)
class Case:
    """One synchronized call against the single-process reference."""

    axis: int = -1  # -1: (N, T, C); 1: (N, C, T)
    dtype: torch.dtype = torch.float32
    mask: str | None = None  # None, "random", "first shard out" or "all out"
    offset: float = 1.0  # the data's mean (a large one tests the stability)
    nan: bool = False  # a NaN in channel 1 of the last row

    def __str__(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


CASES = (
    Case(),
    Case(mask="random"),
    Case(axis=1),
    Case(axis=1, mask="random"),
    Case(dtype=torch.bfloat16),
    Case(dtype=torch.bfloat16, axis=1, mask="random"),
    Case(mask="first shard out"),  # a rank whose shard has no masked-in element
    Case(mask="all out"),  # no element in the whole group: moving statistics
    Case(offset=1e4),
    Case(nan=True),
)


# ------------------------------------------------------------------------- worker-side checks


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, slack: float = 0.0) -> None:
    """Equal up to 1e-5 of the expected tensor's largest magnitude (bfloat16: 2**-6, two
    roundings), plus ``slack``."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    relative = 2.0**-6 if expected.dtype == torch.bfloat16 else 1e-5
    scale = expected.float().nan_to_num(0.0, 0.0, 0.0).abs().max().item()
    torch.testing.assert_close(
        actual,
        expected,
        rtol=relative,
        atol=relative * scale + slack,
        equal_nan=True,
        msg=lambda message: f"{what}: {message}",
    )


def _bounds(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _global_batch(case: Case, sizes: list[int]):
    """The whole batch, upstream gradient and mask, the same on every rank (seeded)."""
    generator = torch.Generator().manual_seed(len(sizes) * 100 + sum(sizes))
    total, steps = sum(sizes), STEPS
    shape = (total, steps, CHANNELS) if case.axis == -1 else (total, CHANNELS, steps)
    x = torch.randn(shape, generator=generator) * 2.0 + case.offset
    if case.nan:
        x.select(case.axis % 3, 1)[-1, 0] = float("nan")
    upstream = torch.randn(shape, generator=generator)
    mask = None
    if case.mask is not None:
        mask = torch.rand(total, steps, generator=generator) > 0.3
        if case.mask == "first shard out":
            mask[_bounds(sizes, next(r for r, size in enumerate(sizes) if size))] = False
        elif case.mask == "all out":
            mask[:] = False
    return x.to(case.dtype), upstream.to(case.dtype), mask


def _layer(case: Case, shape: torch.Size, synchronized: bool) -> BatchNormalization:
    layer = BatchNormalization(axis=case.axis, momentum=0.8, synchronized=synchronized)
    layer.build(shape)
    with torch.no_grad():  # nothing at its default, so that every term shows
        layer.gamma.copy_(torch.linspace(0.5, 2.0, CHANNELS))
        layer.beta.copy_(torch.linspace(-1.0, 1.0, CHANNELS))
        layer.moving_mean.copy_(torch.linspace(-0.5, 0.5, CHANNELS))
        layer.moving_variance.copy_(torch.linspace(0.5, 1.5, CHANNELS))
    return layer


def _check_against_one_process(case: Case, sizes: list[int]) -> None:
    """This rank's outputs, input gradients and moving statistics, and the gamma/beta gradients
    summed over the ranks, equal one process's on the whole batch."""
    x, upstream, mask = _global_batch(case, sizes)
    reference, synchronized = _layer(case, x.shape, False), _layer(case, x.shape, True)
    x_all = x.clone().requires_grad_()
    y_all = reference(x_all, training=True, mask=mask)
    y_all.backward(upstream)

    shard = _bounds(sizes, dist.get_rank())
    x_mine = x[shard].clone().requires_grad_()
    y_mine = synchronized(x_mine, training=True, mask=None if mask is None else mask[shard])
    y_mine.backward(upstream[shard])
    parameter_grads = torch.stack([synchronized.gamma.grad, synchronized.beta.grad])
    dist.all_reduce(parameter_grads)  # what DDP does to them

    where = f"rank {dist.get_rank()}, shards {sizes}, {case}"
    # Both means are float32 roundings of the same number: one unit in their last place moves
    # xhat by 1 / std (<= 1 here) of it, y by gamma / std (<= 1), and the gamma gradient
    # sum(dy * xhat) by that times |sum(dy)| = |beta gradient|: above 1e-5 for a large offset.
    slack = abs(case.offset) * 2.0**-23
    _assert_close(y_mine, y_all[shard].detach(), f"output ({where})", slack)
    _assert_close(x_mine.grad, x_all.grad[shard], f"input gradient ({where})", slack)
    _assert_close(
        parameter_grads[0],
        reference.gamma.grad,
        f"gamma gradient ({where})",
        slack * reference.beta.grad.nan_to_num(0.0).abs().max().item(),
    )
    _assert_close(parameter_grads[1], reference.beta.grad, f"beta gradient ({where})")
    for name in ("moving_mean", "moving_variance"):
        _assert_close(getattr(synchronized, name), getattr(reference, name), f"{name} ({where})")


def _equivalence_worker(shard_sizes: list[list[int]]) -> int:
    for sizes in shard_sizes:
        for case in CASES:
            _check_against_one_process(case, sizes)
    return len(shard_sizes) * len(CASES)


@contextmanager
def _counting_collectives():
    """Count this process's collective calls by kind (the module looks them up at each call)."""
    kinds = {"all_reduce": "all_reduce", "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather"}
    counts: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in kinds if hasattr(dist, name)}

    def counting(name):
        def call(*args, **kwargs):
            counts[kinds[name]] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _check_collectives_per_call() -> None:
    """One gather in a training forward, one all-reduce in its backward, none in inference."""
    rank = dist.get_rank()
    layer = BatchNormalization(synchronized=True)
    x = torch.randn(4 + rank, 11, requires_grad=True)  # a channel count no other check uses
    with _counting_collectives() as calls:
        layer(x, training=True)
    assert calls == {"all_reduce": 1, "all_gather": 1}, calls  # the layout check, once
    with _counting_collectives() as calls:
        y = layer(x, training=True)
    assert calls == {"all_gather": 1}, calls
    with _counting_collectives() as calls:
        y.backward(torch.randn_like(y))
    assert calls == {"all_reduce": 1}, calls
    with _counting_collectives() as calls:
        layer(x, training=False)
        layer.eval()(x)
        with torch.no_grad():
            layer.train()(x)
    assert calls == {"all_gather": 1}, calls  # only the training call
    with _counting_collectives() as calls:  # on data: only gamma/beta need gradients, all local
        layer(x.detach(), training=True).sum().backward()
    assert calls == {"all_gather": 1}, calls


def _check_disagreements_raise() -> None:
    """Different channel counts or precisions: a ValueError naming both, on every rank."""
    rank = dist.get_rank()
    layer = BatchNormalization(synchronized=True)
    with pytest.raises(ValueError, match=rf"channel count from 7 to 8 \(this rank: {7 + rank}\)"):
        layer(torch.randn(5, 7 + rank), training=True)
    assert torch.equal(layer.moving_mean, torch.zeros(7 + rank))  # nothing was written
    assert torch.equal(layer.moving_variance, torch.ones(7 + rank))
    dtype = torch.float64 if rank == 0 else torch.float32
    with pytest.raises(ValueError, match=r"statistics bits from 32 to 64"):
        BatchNormalization(synchronized=True)(torch.randn(5, 9, dtype=dtype), training=True)
    # The group still works afterwards.
    layer = BatchNormalization(synchronized=True)
    layer(torch.full((2, 4), float(rank)), training=True)
    torch.testing.assert_close(layer.moving_mean, torch.full((4,), 0.005))  # 0.01 * mean of 0, 0, 1, 1
    # 4 and CHANNELS channels were agreed on by other layers; a caller that names its layer is
    # checked anyway.
    channels = 4 if rank == 0 else CHANNELS
    view = torch.randn(5, channels)
    with pytest.raises(ValueError, match=rf"channel count from 4 to {CHANNELS}"):
        distributed.batch_statistics(view, None, key=nn.Module())


def _check_ddp_training() -> None:
    """SGD under DistributedDataParallel on unequal (one empty) shards = one process on the whole batch."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), BatchNormalization(momentum=0.8, synchronized=True), nn.ReLU(), nn.Linear(8, 3)
    )
    model[1].build((1, 8))
    reference = copy.deepcopy(model)
    reference[1].synchronized = False
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5) for m in (ddp, reference)]
    for step, sizes in enumerate([[5, 11], [8, 8], [0, 9], [7, 2]]):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(sum(sizes), 4, generator=generator) * 3 + 1
        target = torch.randint(0, 3, (sum(sizes),), generator=generator)
        shard = _bounds(sizes, dist.get_rank())
        # DDP averages the ranks' gradients: each rank's loss is its share of the whole batch's mean.
        losses = [
            F.cross_entropy(ddp(x[shard]), target[shard], reduction="sum") * world / sum(sizes),
            F.cross_entropy(reference(x), target),
        ]
        for loss, optimizer in zip(losses, optimizers):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, mine), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(
            mine, theirs, rtol=1e-5, atol=1e-6, msg=lambda message, name=name: f"{name} after DDP training: {message}"
        )


def _two_rank_worker() -> int:
    checks = _equivalence_worker([[3, 8], [6, 0]])
    _check_collectives_per_call()
    _check_disagreements_raise()
    _check_ddp_training()
    return checks


def _peer_leaves_worker(how: str, done) -> str | None:
    """Rank 1 stops synchronizing after a first exchange; rank 0 must fail, not hang."""
    layer = BatchNormalization(synchronized=True)
    x = torch.randn(4, 3)
    layer(x, training=True)  # the group works
    if dist.get_rank() == 1:
        if how == "dies":
            os._exit(0)
        layer(x, training=False)  # does not synchronize this call: no collective
        done.wait(DEADLINE_S)  # alive until rank 0 has given up
        return None
    try:
        with pytest.raises(RuntimeError) as error:
            layer(x, training=True)
    finally:
        done.set()
    return str(error.value)


# ------------------------------------------------------------------------------------- tests


def test_two_processes_equal_one_process_and_ddp_training():
    """Shards 3+8 and 6+0, every case; the collectives per call; disagreements; DDP training."""
    assert run_local_group(_two_rank_worker, 2, timeout_s=TIMEOUT_S, deadline_s=DEADLINE_S) == [2 * len(CASES)] * 2


def test_three_processes_with_an_empty_shard_equal_one_process():
    results = run_local_group(_equivalence_worker, 3, [[5, 0, 9]], timeout_s=TIMEOUT_S, deadline_s=DEADLINE_S)
    assert results == [len(CASES)] * 3


@pytest.mark.parametrize("how", ["stays out", "dies"])
def test_a_peer_that_leaves_makes_the_others_fail(how):
    """A peer that stops synchronizing gives the group's timeout error; one that dies, a closed connection."""
    done = torch.multiprocessing.get_context("spawn").Event()
    message, _ = run_local_group(_peer_leaves_worker, 2, how, done, timeout_s=SHORT_TIMEOUT_S, deadline_s=DEADLINE_S)
    if how == "stays out":
        assert "timed out" in message.lower(), message
    else:
        assert message, "rank 0 got an error without a message"


def test_not_initialized_means_local_statistics(monkeypatch):
    assert not dist.is_initialized() and not distributed.is_synchronizing()

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective was called")

    monkeypatch.setattr(distributed, "batch_statistics", no_collective)
    x = torch.randn(6, 4) * 3 + 2
    local, synced = BatchNormalization(), BatchNormalization(synchronized=True)
    assert torch.equal(local(x, training=True), synced(x, training=True))
    assert torch.equal(local.moving_variance, synced.moving_variance)


def test_one_process_group_means_local_statistics(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert not distributed.is_synchronizing() and not distributed.is_synchronizing(dist.group.WORLD)
        for name in ("all_reduce", "all_gather_single", "all_gather_into_tensor"):
            monkeypatch.setattr(dist, name, lambda *a, **k: pytest.fail("a collective was called"), raising=False)
        x = torch.randn(6, 4) * 3 + 2
        local, synced = BatchNormalization(), BatchNormalization(synchronized=True)
        assert torch.equal(local(x, training=True), synced(x, training=True))
        assert torch.equal(local.moving_mean, synced.moving_mean)
    finally:
        dist.destroy_process_group()


def test_bench_sync_times_both_training_modes_on_every_rank(tmp_path, capsys):
    path = tmp_path / "sync.json"
    assert main(["bench", "--sync", "--quick", "--repeats", "2", "--warmup", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train fwd+bwd" in out and "collectives share" in out and "2 gloo processes" in out
    rows = json.loads(path.read_text())["rows"]
    assert [(row["rank"], row["mode"]) for row in rows] == [
        (rank, mode) for rank in (0, 1) for mode in ("training", "training_backward")
    ]
    for row in rows:
        assert row["local_ms"] > 0 and row["synchronized_ms"] > 0
        assert row["synchronized_over_local"] == pytest.approx(row["synchronized_ms"] / row["local_ms"])
        assert 0 < row["collectives_share"] <= 1 and row["collectives_ms"] > 0
        assert len(row["samples_ms"]["synchronized"]) == 2


def test_the_ddp_example_runs_under_torchrun():
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master-port",
        str(free_port()),
        "--nproc-per-node",
        "2",
        "examples/ddp_cpu.py",
        "--epochs",
        "1",
    ]
    result = subprocess.run(
        command, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=DEADLINE_S
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every synchronized DDP step matches one process on the whole batch" in result.stdout
