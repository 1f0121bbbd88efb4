"""ATen operators dispatched per call: ours against ``F.batch_norm``, per bench case and mode.

Every operator is a kernel launch on a GPU, so the count is a device-independent measure of a
call's fixed cost. Two routes of ours: eager CPU, and the route of other devices (CUDA), taken on
CPU tensors by declaring them not eager-CPU (no host reads, no CPU-only kernel choices). View
operators (``view``, ``permute``, ...) launch nothing but are counted as dispatched.
Run: ``python benchmarks/count_ops.py [CASES]`` (default ``BDEG``; full sizes).
"""

from __future__ import annotations

import collections
import sys
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from batchnorm import BatchNormalization, _kernels
from batchnorm.bench import Case, _make_inputs, _parse_cases

MODES = ("inference", "training forward", "forward+backward")


class _OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched under it (after autograd, composites decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _count(call, mode: str, x: torch.Tensor) -> collections.Counter[str]:
    """Operators of one warm call of ``call(inputs, training)`` in ``mode``."""

    def run() -> None:
        if mode == "inference":
            call(x.detach(), False)
        elif mode == "training forward":
            call(x.detach(), True)
        else:
            y = call(x, True)
            y.backward(torch.ones_like(y))

    run()  # warm: builds the layer, fills caches
    with _OperatorCounter() as counter:
        run()
    return counter.names


def _torch_call(channels: int, axis: int):
    weight, bias = torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)
    running = torch.zeros(channels), torch.ones(channels)

    def call(inputs: torch.Tensor, training: bool) -> torch.Tensor:
        moved = inputs.movedim(axis, 1)
        return F.batch_norm(moved, *running, weight, bias, training, 0.01, 1e-3).movedim(1, axis)

    return call


def count_case(case: Case) -> list[tuple[str, int, int, int | None]]:
    """``(mode, ours on CPU, ours on the device route, F.batch_norm)`` per mode of ``case``."""
    x, _, mask = _make_inputs(case, quick=False, device=torch.device("cpu"))
    x = x.detach().requires_grad_()
    axis = case.axis % x.dim()
    ours = BatchNormalization(axis=case.axis, renorm=case.renorm)

    def ours_call(inputs, training):
        return ours(inputs, training, mask=mask)

    rows = []
    for mode in MODES:
        cpu = sum(_count(ours_call, mode, x).values())
        with mock.patch.object(_kernels, "eager_cpu", lambda t: False):
            device = sum(_count(ours_call, mode, x).values())
        reference = None if mask is not None else sum(_count(_torch_call(x.shape[axis], axis), mode, x).values())
        rows.append((mode, cpu, device, reference))
    return rows


def main(cases: str = "BDEG") -> None:
    print(f"{'case':4} {'mode':17} {'ours CPU':>8} {'ours device':>11} {'F.batch_norm':>12}")
    for case in _parse_cases(cases):
        for mode, cpu, device, reference in count_case(case):
            print(f"{case.name:4} {mode:17} {cpu:8} {device:11} {reference if reference is not None else '-':>12}")


if __name__ == "__main__":
    main(*sys.argv[1:])
