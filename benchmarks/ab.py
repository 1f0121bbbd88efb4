"""Old against new in one process: the same bench cases, both layers timed interleaved.

Separate bench runs drift with the machine's load by more than the 5% a regression check needs;
in one process, alternating the two implementations sample by sample, the drift cancels. Give the
old checkout's package as an importable copy under another name, e.g. ``batchnorm_old``::

    cp -r OLD/src/batchnorm /tmp/old/batchnorm_old   # its absolute self-imports made relative
    PYTHONPATH=/tmp/old:src python benchmarks/ab.py batchnorm_old [CASES] [ROUNDS]
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time

import torch

from batchnorm import BatchNormalization
from batchnorm.bench import _make_inputs, _parse_cases


def _calls(layer, x, g, mask):
    xg = x.detach().requires_grad_()

    def training_backward():
        layer(xg, True, mask=mask).backward(g)

    def inference():
        with torch.no_grad():
            layer(x, False, mask=mask)

    def training():
        with torch.no_grad():
            layer(x, True, mask=mask)

    return {"inference": inference, "training": training, "training_backward": training_backward}


def _sample(call, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        call()
    return (time.perf_counter() - start) / number


def main(old_package: str, cases: str = "ABCDEFG", rounds: int = 15) -> None:
    old_layer = importlib.import_module(old_package).BatchNormalization
    print(f"{'case':4} {'mode':18} {'old ms':>8} {'new ms':>8} {'new/old':>8}")
    for case in _parse_cases(cases):
        x, g, mask = _make_inputs(case, quick=False, device=torch.device("cpu"))
        kwargs = {"axis": case.axis, **({"renorm": True} if case.renorm else {})}  # old layers may lack renorm
        layers = {"old": old_layer(**kwargs), "new": BatchNormalization(**kwargs)}
        calls = {name: _calls(layer, x, g, mask) for name, layer in layers.items()}
        for mode in calls["new"]:
            for name in layers:  # warm up, and size a sample to about 20 ms
                calls[name][mode]()
            number = max(1, round(0.02 / _sample(calls["new"][mode], 1)))
            times = {name: [] for name in layers}
            for index in range(int(rounds)):
                for name in sorted(layers, reverse=index % 2 == 1):  # alternate who goes first
                    times[name].append(_sample(calls[name][mode], number))
            old, new = (statistics.median(times[name]) * 1e3 for name in ("old", "new"))
            print(f"{case.name:4} {mode:18} {old:8.3f} {new:8.3f} {new / old:8.3f}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
