"""ATen operators dispatched per call: ours against ``F.batch_norm``, per bench case and mode.

Every operator is a kernel launch on a GPU, so the count is a device-independent measure of a
call's overhead. Run: ``python benchmarks/count_ops.py [CASES]`` (default ``BE``; full sizes).
"""

from __future__ import annotations

import collections
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from batchnorm import BatchNormalization
from batchnorm.bench import _make_inputs, _parse_cases


class _OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched under it (after autograd, composites decomposed)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _count(call) -> collections.Counter[str]:
    call()  # warm: builds the layer, fills caches
    with _OperatorCounter() as counter:
        call()
    return counter.names


def _calls(layer, x):
    """The three modes, for a module ``layer`` called as ``layer(x, training)``."""

    def backward(y):
        y.backward(torch.ones_like(y))

    return {
        "inference": lambda: layer(x, False),
        "training forward": lambda: layer(x.detach(), True),
        "forward+backward": lambda: backward(layer(x, True)),
    }


def main(cases: str = "BE") -> None:
    for case in _parse_cases(cases):
        x, _, mask = _make_inputs(case, quick=False, device=torch.device("cpu"))
        x = x.detach().requires_grad_()
        axis = case.axis % x.dim()
        ours = BatchNormalization(axis=case.axis)
        channels = x.shape[axis]
        weight = torch.ones(channels, requires_grad=True)
        bias = torch.zeros(channels, requires_grad=True)
        running = torch.zeros(channels), torch.ones(channels)

        def torch_call(inputs, training):
            moved = inputs.movedim(axis, 1)
            return F.batch_norm(moved, *running, weight, bias, training, 0.01, 1e-3).movedim(1, axis)

        ours_calls = _calls(lambda inputs, training: ours(inputs, training, mask=mask), x)
        torch_calls = _calls(torch_call, x) if mask is None else {}
        for mode, call in ours_calls.items():
            counted = _count(call)
            reference = sum(_count(torch_calls[mode]).values()) if mode in torch_calls else None
            detail = ", ".join(f"{name} {n}" for name, n in sorted(counted.items()))
            print(f"{case.name} {mode:17} ours {sum(counted.values()):3}  torch {reference!s:>4}   {detail}")


if __name__ == "__main__":
    main(*sys.argv[1:])
