"""``python -m batchnorm bench``: how fast is this layer, next to torch, Keras and a plain copy?

Measures, in one process and under one allocator configuration, for each case and mode:

* **ours**: :class:`batchnorm.BatchNormalization` called as users call it;
* **torch**: ``torch.nn.functional.batch_norm`` on its best zero-copy layout (the ``(M, C)`` view
  ``x.reshape(-1, C)`` for a channels-last ``axis=-1`` input, the tensor as is for ``axis=1``), with
  float32 running buffers, ``momentum=0.01`` (Keras's 0.99), ``eps=1e-3`` and float32 weight/bias
  Parameters; for bfloat16 inputs this is PyTorch's mixed-dtype call (bf16 input, float32
  weight/bias/running statistics). There is no native equivalent of a masked call (case E): there
  the reference is *ours unmasked* on the same tensor (``ours_unmasked``);
* **keras**: Keras 3's ``keras.layers.BatchNormalization(axis=...)`` on the torch backend (when
  Keras is installed and ``KERAS_BACKEND`` is unset or ``torch``), built on the input shape and
  called with torch tensors (``mask=`` for case E; ``dtype="mixed_bfloat16"`` for bf16 inputs, the
  Keras policy that matches ours: float32 weights, bf16 in and out);
* the **copy floor**: ``y.copy_(x)`` into a preallocated tensor (``copy_``) and ``x.clone()``
  (``clone``: copy plus a fresh output buffer). Both are mode-independent and measured once per
  case; every row of the case repeats them.

Cases (float32 unless said): A ``(64,56,56,64)`` axis=-1; B ``(32,128,768)`` axis=-1;
C ``(4096,1024)`` axis=-1; D ``(64,64,56,56)`` axis=1; E = B with a ``(32,128)`` mask whose
positions are exactly 25% False (seeded); F = B in bfloat16; G ``(32,64,28,28)`` axis=1 in
``torch.channels_last`` memory (torch's reference is ``F.batch_norm`` on the same tensor); R = B with
``renorm=True`` (batch renormalization, Keras's default clipping and ``renorm_momentum``), in the
training modes only (inference is plain batch normalization): torch has no renorm, so there the
reference is *ours plain* (``renorm=False``) on the same tensor (``ours_plain``), and Keras runs
with ``renorm=True`` too. ``quick`` divides every case by 128 in its batch/spatial dimensions
(about; channel counts unchanged).

Modes: ``inference`` (forward, ``training=False``, under ``torch.no_grad()``); ``training``
(forward with batch statistics, moving statistics updated, under ``torch.no_grad()``);
``training_backward`` (``y = f(x); y.backward(g)`` with ``x`` requiring grad and a fixed upstream
gradient ``g`` allocated once; dx, dgamma and dbeta are computed).

Timing
    All (mode, implementation) pairs of a case are timed interleaved round-robin (the starting
    implementation rotates each round): ``warmup`` untimed rounds, then ``repeats`` timed rounds;
    the reported figure is the median. ``torch.set_num_threads`` is fixed for the whole run (and
    restored afterwards). Each timed sample calls the implementation ``calls_per_sample`` times,
    chosen after warm-up so that the fastest implementation of the mode makes samples of at
    least ``min_sample_ms``; every implementation of a mode uses the same count. An untimed call
    of the same implementation precedes each sample, so that no sample pays for what the entry
    before it left behind (a heap that glibc trimmed, evicted caches). A call allocates and frees its own outputs
    inside the timed region: the forward output is dropped on return, and a backward call starts
    by setting ``.grad = None`` on x, gamma and beta (as ``zero_grad(set_to_none=True)`` would), so
    the previous call's gradients are freed inside the timing. Python's garbage collector is
    paused during the rounds. On CUDA the device is synchronized before and after each sample.
    Minor page faults per call (``getrusage``) are recorded too: they show what the allocator costs.

Threads and a shared machine
    With ``threads > 1`` every OpenMP parallel region waits for all its workers; when other
    processes keep the CPUs busy (load average near or above the CPU count) a worker can wait a
    whole scheduler time slice (~16 ms was seen on a loaded 2-core machine) and short calls then
    measure the scheduler, not the code. The header records the load average at start and end and
    the table warns; ``--threads 1`` gives steadier ratios there. ``detail`` keeps every sample
    (with min and max) so such noise can be seen.

Peak extra memory per call
    On CPU: ``torch.autograd.profiler.profile(use_cpu=True, profile_memory=True)`` around one call
    (after warm-up, untimed; gradients cleared before it, not inside it), then a walk over the
    ``"[memory]"`` events of ``prof.kineto_results.events()`` sorted by ``start_ns()``, keeping a
    running sum of ``nbytes()`` (positive for an allocation, negative for a free) and its maximum.
    That is the peak of bytes held by torch's CPU allocator during the call above what it held
    before (outputs, saved tensors and gradients included; frees of older tensors can only lower
    the running sum, and the peak is clamped at 0). Checked: ``x.clone()`` gives exactly
    ``x.nbytes`` and ``y.copy_(x)`` gives 0 (both are reported, as ``clone_peak_mib`` and
    ``copy_peak_mib``). In torch 2.13 the higher-level ``torch.profiler.profile`` works too but
    imports torch._dynamo/_inductor on first use (~3 s), hence the autograd-profiler entry point.
    Kineto writes ``USDT: ... profiler_start/stop`` lines straight to file descriptor 2; they are
    filtered out (other stderr output during the profiled call is passed through). Only memory
    allocated through torch's allocator, on threads the profiler follows, is seen (not numpy or
    Python objects). On CUDA: ``torch.cuda.reset_peak_memory_stats()``, then
    ``max_memory_allocated()`` after the call minus ``memory_allocated()`` before it.

Allocator
    glibc serves a buffer above its mmap threshold (dynamic, at most 32 MiB by default) with a
    fresh ``mmap`` unless its heap already holds a large enough free chunk, so under glibc
    defaults a 49 MiB output of case A or D may page-fault in whole (12,545 faults, ``clone`` ~5x
    ``copy_``) or not at all, depending on what ran before in the process (in one run, every A call
    faulted and D's inference calls did not). Within a case all implementations share that state;
    across cases, and for absolute times, prefer ``--tuned-malloc``. The header records the ``MALLOC_*``
    environment (``glibc defaults`` when none is set) as seen by this process; glibc reads it at
    start-up. ``--tuned-malloc`` re-executes the benchmark in a subprocess with
    ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184`` (1 GiB, 16 GiB), so
    freed big buffers are reused without faults; every implementation then benefits alike.

Usage::

    python -m batchnorm bench                       # full run: ~30 s on 2 idle cores, minutes if loaded
    python -m batchnorm bench --quick               # small sizes, seconds (CI smoke test)
    python -m batchnorm bench --sync                # synchronized=True against local statistics,
                                                    # 2 gloo processes (see sync_benchmark)
    python -m batchnorm bench --cases BEF --modes training --json out.json
    python -m batchnorm bench --cases BR --modes training,training_backward   # renorm against plain
    python -m batchnorm.bench --tuned-malloc        # the same, without the dispatcher

    >>> from batchnorm.bench import benchmark, format_table
    >>> rows = benchmark(cases="B", modes=("training",), repeats=3, quick=True, keras=False)
    >>> print(format_table(rows))                   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm.layer import BatchNormalization

try:  # POSIX only: page-fault counts are a diagnostic, not a requirement
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

__all__ = [
    "CASES",
    "MODES",
    "Case",
    "benchmark",
    "describe_environment",
    "allocator_settings",
    "format_table",
    "add_arguments",
    "run",
    "main",
]

MODES = ("inference", "training", "training_backward")
MODE_LABELS = {"inference": "infer fwd", "training": "train fwd", "training_backward": "train fwd+bwd"}
IMPLEMENTATIONS = ("ours", "torch", "keras", "ours_unmasked", "ours_plain", "copy_", "clone")
TRAINING_MODES = ("training", "training_backward")

MOMENTUM = 0.99  # Keras convention; torch's momentum is 1 - MOMENTUM
EPSILON = 1e-3  # Keras's default
FULL_REPEATS, FULL_WARMUP = 25, 2
QUICK_REPEATS, QUICK_WARMUP = 5, 1
QUICK_DIVISOR = 128
MAX_CALLS_PER_SAMPLE = 1000

# Environment variables that change how memory is allocated (glibc malloc, preloaded allocators,
# torch's CUDA caching allocator). Read at process start-up by the libraries concerned.
ALLOCATOR_ENV_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
    "PYTORCH_CUDA_ALLOC_CONF",
)
TUNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
_STARTUP_ENV = {name: os.environ[name] for name in ALLOCATOR_ENV_VARS if name in os.environ}


# ------------------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One input configuration: shape (full and quick), channel axis, dtype, optional mask, renorm."""

    name: str
    shape: tuple[int, ...]
    quick_shape: tuple[int, ...]
    axis: int
    dtype: torch.dtype = torch.float32
    mask_false_fraction: float | None = None  # masked case: this fraction of positions False
    memory_format: torch.memory_format = torch.contiguous_format
    renorm: bool = False  # batch renormalization (ours and Keras); its reference is ours plain
    modes: tuple[str, ...] = MODES  # the modes this case runs in
    note: str = ""

    def size(self, quick: bool) -> tuple[int, ...]:
        return self.quick_shape if quick else self.shape

    def describe(self, quick: bool = False) -> str:
        def fmt(shape: tuple[int, ...]) -> str:
            return "(" + ",".join(map(str, shape)) + ")"

        dtype = str(self.dtype).replace("torch.", "")
        text = f"{self.name} {fmt(self.size(quick))} {dtype} axis={self.axis}"
        if self.memory_format != torch.contiguous_format:
            text += f" {str(self.memory_format).removeprefix('torch.')}"
        if self.mask_false_fraction is not None:
            text += f", mask {fmt(self.mask_shape(quick))} {self.mask_false_fraction:.0%} False"
        if self.renorm:
            text += ", renorm=True (training only)"
        return text

    def mask_shape(self, quick: bool = False) -> tuple[int, ...]:
        shape = list(self.size(quick))
        del shape[self.axis]
        return tuple(shape)


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("A", (64, 56, 56, 64), (8, 14, 14, 64), -1, note="NHWC conv activations"),
        Case("B", (32, 128, 768), (2, 16, 768), -1, note="transformer activations"),
        Case("C", (4096, 1024), (32, 1024), -1, note="dense features"),
        Case("D", (64, 64, 56, 56), (8, 64, 14, 14), 1, note="NCHW conv activations"),
        Case("E", (32, 128, 768), (2, 16, 768), -1, mask_false_fraction=0.25, note="B with a padding mask"),
        Case("F", (32, 128, 768), (2, 16, 768), -1, dtype=torch.bfloat16, note="B in bfloat16"),
        Case(
            "G",
            (32, 64, 28, 28),
            (4, 64, 7, 7),
            1,
            memory_format=torch.channels_last,
            note="NCHW in torch.channels_last memory",
        ),
        Case("R", (32, 128, 768), (2, 16, 768), -1, renorm=True, modes=TRAINING_MODES, note="B with renorm=True"),
    )
}
ALL_CASES = "".join(CASES)


def _parse_cases(cases: str | Iterable[str]) -> list[Case]:
    if isinstance(cases, str):
        names = [c for c in cases.upper() if c not in ", "]
    else:
        names = [str(c).upper() for c in cases]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise ValueError(f"cases must be letters among {''.join(CASES)}, received {cases!r}")
    return [CASES[n] for n in dict.fromkeys(names)]


def _parse_modes(modes: str | Iterable[str]) -> list[str]:
    names = [m.strip() for m in modes.split(",")] if isinstance(modes, str) else list(modes)
    if names == ["all"]:
        names = list(MODES)
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ValueError(f"modes must be among {', '.join(MODES)} (or 'all'), received {modes!r}")
    return [m for m in MODES if m in names]


def _plan(cases: str | Iterable[str], modes: str | Iterable[str]) -> list[tuple[Case, list[str]]]:
    """Each case that runs, with the modes it runs in (among ``modes``): ValueError if none does."""
    mode_list = _parse_modes(modes)
    plan = [(case, [m for m in mode_list if m in case.modes]) for case in _parse_cases(cases)]
    if not any(case_modes for _, case_modes in plan):
        runs = "; ".join(f"{case.name} runs in {', '.join(case.modes)}" for case, _ in plan)
        raise ValueError(f"no case chosen runs in the modes {', '.join(mode_list)}: {runs}")
    return [(case, case_modes) for case, case_modes in plan if case_modes]


# ---------------------------------------------------------------------------------- keras


def _import_keras() -> tuple[Any, str | None]:
    """Keras on its torch backend, or ``(None, reason)``."""
    backend = os.environ.get("KERAS_BACKEND")
    if "keras" not in sys.modules:
        if backend not in (None, "torch"):
            return None, f"KERAS_BACKEND={backend} (Keras needs the torch backend here)"
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        return None, "keras is not installed"
    if keras.backend.backend() != "torch":
        return None, f"keras was imported with the {keras.backend.backend()} backend"
    return keras, None


# ------------------------------------------------------------------------- implementations


@dataclasses.dataclass
class _Entry:
    """One timed thing: ``call()`` is timed; ``clear()`` then ``body()`` is one call for memory."""

    mode: str  # a mode, or "-" for the mode-independent copy floor
    impl: str
    call: Callable[[], None]
    clear: Callable[[], None]
    body: Callable[[], None]
    samples_ms: list[float] = dataclasses.field(default_factory=list)
    warm_ms: list[float] = dataclasses.field(default_factory=list)
    faults: int = 0
    calls: int = 0
    calls_per_sample: int = 1
    peak_bytes: int | None = None


def _nothing() -> None:
    pass


def _entry(
    mode: str, impl: str, forward: Callable[[Tensor], Tensor], x: Tensor, g: Tensor, params: Sequence[Tensor]
) -> _Entry:
    """Wrap ``forward`` for ``mode``: forward modes under no_grad; backward with fresh grads."""
    if mode != "training_backward":

        def call() -> None:
            with torch.no_grad():
                forward(x)

        return _Entry(mode, impl, call, _nothing, call)

    xg = x.detach().requires_grad_()  # shares x's storage; its own .grad
    leaves = (xg, *params)

    def clear() -> None:
        for leaf in leaves:
            leaf.grad = None

    def body() -> None:
        forward(xg).backward(g)

    def call() -> None:
        clear()
        body()

    return _Entry(mode, impl, call, clear, body)


def _torch_native(case: Case, x: Tensor, training: bool, device: torch.device):
    channels = x.shape[case.axis]
    axis = case.axis % x.dim()
    weight = nn.Parameter(torch.ones(channels, device=device))
    bias = nn.Parameter(torch.zeros(channels, device=device))
    running_mean = torch.zeros(channels, device=device)
    running_var = torch.ones(channels, device=device)
    if axis == x.dim() - 1:

        def layout(t: Tensor) -> Tensor:
            return t.reshape(-1, channels)
    elif axis == 1:

        def layout(t: Tensor) -> Tensor:
            return t
    else:

        def layout(t: Tensor) -> Tensor:
            return t.reshape(math.prod(t.shape[:axis]), channels, -1)

    def forward(t: Tensor) -> Tensor:
        return F.batch_norm(
            layout(t), running_mean, running_var, weight, bias, training, 1.0 - MOMENTUM, EPSILON
        ).reshape(t.shape)

    return forward, (weight, bias)


def _ours(case: Case, x: Tensor, training: bool, mask: Tensor | None, device: torch.device):
    layer = BatchNormalization(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON, renorm=case.renorm, device=device)
    layer.build(x.shape)

    def forward(t: Tensor) -> Tensor:
        return layer(t, training=training, mask=mask)

    return forward, (layer.gamma, layer.beta)


def _keras(keras, case: Case, x: Tensor, training: bool, mask: Tensor | None, device: torch.device):
    policy = {torch.bfloat16: "mixed_bfloat16", torch.float16: "mixed_float16"}.get(case.dtype)
    keras_device = str(device)
    with keras.device(keras_device):
        layer = keras.layers.BatchNormalization(
            axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON, renorm=case.renorm, dtype=policy
        )
        layer.build(tuple(x.shape))

    def forward(t: Tensor) -> Tensor:
        with keras.device(keras_device):
            return layer(t, training=training, mask=mask)

    return forward, (layer.gamma.value, layer.beta.value)


def _make_inputs(case: Case, quick: bool, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = case.size(quick)
    layout = {"device": device, "dtype": case.dtype, "memory_format": case.memory_format}
    x = (torch.randn(shape, generator=generator) * 2.0 + 0.5).to(**layout)
    g = torch.randn(shape, generator=generator).to(**layout)
    mask = None
    if case.mask_false_fraction is not None:
        mask_shape = case.mask_shape(quick)
        n = math.prod(mask_shape)
        flat = torch.ones(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[: round(n * case.mask_false_fraction)]] = False
        mask = flat.reshape(mask_shape).to(device)
    return x, g, mask


def _entries(case: Case, modes: Sequence[str], quick: bool, device: torch.device, keras) -> tuple[list[_Entry], Tensor]:
    x, g, mask = _make_inputs(case, quick, device)
    entries: list[_Entry] = []
    for mode in modes:
        training = mode != "inference"
        forward, params = _ours(case, x, training, mask, device)
        entries.append(_entry(mode, "ours", forward, x, g, params))
        if case.renorm:  # torch has no renorm: the reference is ours plain
            forward, params = _ours(dataclasses.replace(case, renorm=False), x, training, mask, device)
            entries.append(_entry(mode, "ours_plain", forward, x, g, params))
        elif mask is None:
            forward, params = _torch_native(case, x, training, device)
            entries.append(_entry(mode, "torch", forward, x, g, params))
        else:
            forward, params = _ours(case, x, training, None, device)
            entries.append(_entry(mode, "ours_unmasked", forward, x, g, params))
        if keras is not None:
            forward, params = _keras(keras, case, x, training, mask, device)
            entries.append(_entry(mode, "keras", forward, x, g, params))
    out = torch.empty_like(x)
    entries.append(_entry("-", "copy_", lambda t: out.copy_(t), x, g, ()))
    entries.append(_entry("-", "clone", lambda t: t.clone(), x, g, ()))
    return entries, x


# --------------------------------------------------------------------------------- measuring

_KINETO_LOG = re.compile(rb"^(USDT|INFO):\d{4}-\d\d-\d\d [^\n]*\.cpp:\d+\][^\n]*\n?", re.MULTILINE)


@contextlib.contextmanager
def _without_kineto_log_lines():
    """Drop kineto's ``USDT:``/``INFO:`` log lines written to fd 2; pass anything else through."""
    fd = 2  # kineto writes to the descriptor, not to sys.stderr
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no descriptor 2 at all: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            rest = _KINETO_LOG.sub(b"", captured.read())
            if rest:
                os.write(fd, rest)


def _peak_bytes(entry: _Entry, device: torch.device) -> int:
    """Peak bytes allocated by torch during one call, above what was allocated before it."""
    entry.clear()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        entry.body()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        from torch.autograd import profiler

        with _without_kineto_log_lines():
            with profiler.profile(use_cpu=True, profile_memory=True) as prof:
                entry.body()
        events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        running = peak = 0
        for event in events:
            running += event.nbytes()
            peak = max(peak, running)
    entry.clear()
    return max(0, int(peak))


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _sample(entry: _Entry, number: int, sync: Callable[[], None]) -> float:
    """Milliseconds per call over ``number`` back-to-back calls."""
    faults = _minor_faults()
    sync()
    start = time.perf_counter_ns()
    for _ in range(number):
        entry.call()
    sync()
    elapsed = time.perf_counter_ns() - start
    entry.faults += _minor_faults() - faults
    entry.calls += number
    return elapsed / number / 1e6


def _rounds(
    entries: list[_Entry],
    count: int,
    sync,
    timed: bool,
    first_round: int = 0,
    before_sample: Callable[[], None] = _nothing,
    lead_in: bool = True,
) -> None:
    """``count`` round-robin rounds of one sample per entry (timed: ``calls_per_sample`` calls).

    With ``lead_in`` each timed sample follows one untimed call of the same entry, which leaves
    the caches and the allocator as that implementation's own calls leave them: no sample pays
    for what the entry before it did (a trimmed heap, evicted caches), and round-robin order
    always puts the same neighbour before an entry.
    """
    n = len(entries)
    for r in range(count):
        start = (first_round + r) % n
        for entry in entries[start:] + entries[:start]:
            before_sample()
            if timed and lead_in:
                entry.call()
            if timed:
                entry.samples_ms.append(_sample(entry, entry.calls_per_sample, sync))
            else:
                entry.warm_ms.append(_sample(entry, 1, sync))


def _measure_case(entries: list[_Entry], repeats: int, warmup: int, min_sample_ms: float, device: torch.device) -> None:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else _nothing
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _rounds(entries, max(1, warmup), sync, timed=False)
        # Implementations compared in one mode make samples of the same number of calls, set by
        # the fastest: a sample of one call also times the first call after another entry
        # (colder caches, perf_counter), which a sample of several calls spreads out.
        fastest_ms: dict[str, float] = {}
        for entry in entries:
            fastest_ms[entry.mode] = min(fastest_ms.get(entry.mode, math.inf), max(min(entry.warm_ms), 1e-6))
        for entry in entries:
            entry.calls_per_sample = max(
                1, min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_ms / fastest_ms[entry.mode]))
            )
            entry.peak_bytes = _peak_bytes(entry, device)
            entry.faults = entry.calls = 0
        _rounds(entries, repeats, sync, timed=True, first_round=max(1, warmup))
    finally:
        if gc_was_enabled:
            gc.enable()


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _rows_for_case(
    case: Case, modes: Sequence[str], entries: list[_Entry], x: Tensor, quick: bool, repeats: int
) -> list[dict]:
    by_key = {(e.mode, e.impl): e for e in entries}
    rows = []
    for mode in modes:
        found = {impl: by_key.get((mode, impl)) or by_key.get(("-", impl)) for impl in IMPLEMENTATIONS}
        found = {impl: e for impl, e in found.items() if e is not None}
        ms = {impl: statistics.median(e.samples_ms) for impl, e in found.items()}
        mib = {impl: e.peak_bytes / 2**20 for impl, e in found.items()}
        ours = ms["ours"]
        row = {
            "case": case.name,
            "mode": mode,
            "description": case.describe(quick),
            "shape": list(x.shape),
            "axis": case.axis,
            "dtype": str(case.dtype).replace("torch.", ""),
            "masked": case.mask_false_fraction is not None,
            "renorm": case.renorm,
            "numel": x.numel(),
            "input_mib": x.numel() * x.element_size() / 2**20,
            "ours_ms": ours,
            "torch_ms": ms.get("torch"),
            "keras_ms": ms.get("keras"),
            "copy_ms": ms["copy_"],
            "clone_ms": ms["clone"],
            "ours_unmasked_ms": ms.get("ours_unmasked"),
            "ours_plain_ms": ms.get("ours_plain"),
            "ours_over_torch": _ratio(ours, ms.get("torch")),
            "ours_over_keras": _ratio(ours, ms.get("keras")),
            "ours_over_copy": _ratio(ours, ms["copy_"]),
            "masked_over_unmasked": _ratio(ours, ms.get("ours_unmasked")),
            "renorm_over_plain": _ratio(ours, ms.get("ours_plain")),
            "ours_peak_mib": mib["ours"],
            "torch_peak_mib": mib.get("torch"),
            "keras_peak_mib": mib.get("keras"),
            "copy_peak_mib": mib["copy_"],
            "clone_peak_mib": mib["clone"],
            "ours_unmasked_peak_mib": mib.get("ours_unmasked"),
            "ours_plain_peak_mib": mib.get("ours_plain"),
            "repeats": repeats,
            "detail": {
                impl: {
                    "median_ms": ms[impl],
                    "min_ms": min(e.samples_ms),
                    "max_ms": max(e.samples_ms),
                    "samples_ms": list(e.samples_ms),
                    "calls_per_sample": e.calls_per_sample,
                    "peak_bytes": e.peak_bytes,
                    "minor_faults_per_call": e.faults / e.calls if e.calls else None,
                }
                for impl, e in found.items()
            },
        }
        rows.append(row)
    return rows


def benchmark(
    cases: str | Iterable[str] = ALL_CASES,
    modes: str | Iterable[str] = MODES,
    repeats: int | None = None,
    threads: int | None = None,
    quick: bool = False,
    keras: bool = True,
    *,
    device: str | torch.device = "cpu",
    warmup: int | None = None,
    min_sample_ms: float = 1.0,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run the benchmark; one dict per (case, mode), in case then mode order (R: training modes only).

    ``repeats``/``warmup`` default to 25/2 (``quick``: 5/1); ``threads`` to the current
    ``torch.get_num_threads()`` (fixed for the run, restored after). ``keras=True`` includes Keras
    when it can be used (see :func:`describe_environment`'s ``keras`` entry), else its columns are
    ``None``. Times are medians in milliseconds per call; ``*_over_*`` are ratios of those medians;
    ``*_peak_mib`` the peak extra memory of one call in MiB. ``detail`` holds every sample.
    """
    plan = _plan(cases, modes)
    repeats = (QUICK_REPEATS if quick else FULL_REPEATS) if repeats is None else int(repeats)
    warmup = (QUICK_WARMUP if quick else FULL_WARMUP) if warmup is None else int(warmup)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, received repeats={repeats}, warmup={warmup}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    keras_module = _import_keras()[0] if keras else None

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(previous_threads if threads is None else int(threads))
    rows: list[dict] = []
    try:
        for case, case_modes in plan:
            started = time.perf_counter()
            entries, x = _entries(case, case_modes, quick, device, keras_module)
            _measure_case(entries, repeats, warmup, min_sample_ms, device)
            rows.extend(_rows_for_case(case, case_modes, entries, x, quick, repeats))
            del entries, x
            if progress is not None:
                progress(f"case {case.describe(quick)}: {time.perf_counter() - started:.1f} s")
    finally:
        torch.set_num_threads(previous_threads)
    return rows


# ---------------------------------------------------------------------------- environment


def allocator_settings() -> dict:
    """The allocator environment this process started with, and a one-line description."""
    env = dict(_STARTUP_ENV)
    if not env:
        description = "glibc defaults"
    else:
        description = " ".join(f"{k}={v}" for k, v in env.items())
        if all(env.get(k) == v for k, v in TUNED_MALLOC_ENV.items()):
            description = "tuned malloc: " + description
    libc = " ".join(platform.libc_ver()).strip() or None
    return {"description": description, "env": env, "libc": libc}


def describe_environment(
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    quick: bool = False,
    keras: bool = True,
    cases: str | Iterable[str] = ALL_CASES,
    modes: str | Iterable[str] = MODES,
    min_sample_ms: float = 1.0,
    command: str | None = None,
) -> dict:
    """The header of a run: versions, threads, device, allocator, repetitions, command."""
    keras_module, reason = _import_keras() if keras else (None, "disabled (--no-keras)")
    device = torch.device(device)
    return {
        "torch": torch.__version__,
        "keras": keras_module.__version__ if keras_module is not None else None,
        "keras_note": reason,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else int(threads),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "allocator": allocator_settings(),
        "repeats": (QUICK_REPEATS if quick else FULL_REPEATS) if repeats is None else int(repeats),
        "warmup": (QUICK_WARMUP if quick else FULL_WARMUP) if warmup is None else int(warmup),
        "min_sample_ms": min_sample_ms,
        "quick": bool(quick),
        "cases": {c.name: c.describe(quick) for c, _ in _plan(cases, modes)},
        "modes": _parse_modes(modes),
        "statistic": "median of interleaved round-robin samples after warm-up",
        "memory": (
            "cuda max_memory_allocated"
            if device.type == "cuda"
            else "torch.autograd.profiler memory events: max running sum over one call"
        ),
        "command": command if command is not None else shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "loadavg": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ----------------------------------------------------------------------------------- table


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.1e}{suffix}"
    return f"{value:.{digits}f}{suffix}"


# The table's columns: title, row key, digits, suffix. The first two are text, left-aligned.
_COLUMNS = (
    ("case", "case", None, ""), ("mode", "mode", None, ""),
    ("ours ms", "ours_ms", 3, ""), ("torch ms", "torch_ms", 3, ""), ("keras ms", "keras_ms", 3, ""),
    ("copy_ ms", "copy_ms", 3, ""), ("clone ms", "clone_ms", 3, ""),
    ("ours/torch", "ours_over_torch", 2, "x"), ("ours/keras", "ours_over_keras", 2, "x"),
    ("ours/copy", "ours_over_copy", 2, "x"),
    ("ours MiB", "ours_peak_mib", 2, ""), ("torch MiB", "torch_peak_mib", 2, ""),
)  # fmt: skip


# The renorm table, for case R's rows: ours and Keras with renorm=True, ours without.
_RENORM_COLUMNS = (
    ("mode", "mode", None, ""), ("ours renorm ms", "ours_ms", 3, ""), ("keras renorm ms", "keras_ms", 3, ""),
    ("ours plain ms", "ours_plain_ms", 3, ""), ("renorm/keras", "ours_over_keras", 2, "x"),
    ("renorm/plain", "renorm_over_plain", 2, "x"),
)  # fmt: skip
RENORM_TARGET = 1.3  # issue 12: ours with renorm=True within 1.3x of ours plain, in training


def format_table(rows: Sequence[dict], header: dict | None = None) -> str:
    """The rows as a fixed-width text table (plus the header lines, when given)."""
    lines = [] if header is None else _header_lines(header)
    lines += _table_lines(_COLUMNS, rows)
    descriptions = dict.fromkeys(row["description"] for row in rows)
    if descriptions:
        lines.append("cases: " + "; ".join(descriptions))
    lines += _masked_lines(rows)
    lines += _renorm_lines(rows)
    return "\n".join(lines)


def _table_lines(columns: Sequence[tuple], rows: Sequence[dict]) -> list[str]:
    """``rows`` under ``columns`` (title, key, digits, suffix): text (digits None) left, numbers right."""
    table = [[title for title, *_ in columns]]
    for row in rows:
        table.append(
            [
                MODE_LABELS.get(row[key], row[key]) if digits is None else _fmt(row[key], digits, suffix)
                for _, key, digits, suffix in columns
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = []
    for line in table:
        cells = [cell.ljust(w) if spec[2] is None else cell.rjust(w) for cell, w, spec in zip(line, widths, columns)]
        lines.append("  ".join(cells).rstrip())
    return lines


def _header_lines(header: dict) -> list[str]:
    """The ``#`` lines above the table: versions, method, command, time, load."""
    keras = header["keras"] or f"- ({header['keras_note']})"
    lines = [
        f"# batchnorm bench: torch {header['torch']}, keras {keras}, device {header['device']}, "
        f"threads {header['threads']}, allocator: {header['allocator']['description']}",
        f"# median of {header['repeats']} interleaved round-robin repetitions after "
        f"{header['warmup']} warm-up rounds, each sample >= {header['min_sample_ms']:g} ms; "
        f"{'quick sizes' if header['quick'] else 'full sizes'}",
        f"# command: {header['command']}",
    ]
    if "elapsed_s" in header:
        lines.append(f"# total time: {header['elapsed_s']:.1f} s")
    load, cpus = header.get("loadavg"), header.get("cpu_count")
    if load is not None and cpus:
        end = header.get("loadavg_end")
        line = f"# load average at start {load[0]:.2f}" + (f", at end {end[0]:.2f}" if end else "") + f" on {cpus} CPUs"
        if load[0] >= cpus and header["threads"] > 1:  # the end figure includes this run
            line += (
                ": other processes compete for the CPUs; with threads > 1 a parallel region "
                "can stall a whole scheduler time slice waiting for a worker (--threads 1 is steadier)"
            )
        lines.append(line)
    return lines


def _masked_lines(rows: Sequence[dict]) -> list[str]:
    """Masked over unmasked, for the masked case's rows."""
    lines = []
    for row in rows:
        if row["masked_over_unmasked"] is None:
            continue
        line = (
            f"{row['case']} masked / unmasked (ours, same tensor), {MODE_LABELS[row['mode']]}: "
            f"{_fmt(row['masked_over_unmasked'], 2, 'x')} "
            f"({_fmt(row['ours_ms'], 3)} vs {_fmt(row['ours_unmasked_ms'], 3)} ms)"
        )
        if row["mode"] != "inference":
            line += "  [acceptance: <= 1.5x]"
        lines.append(line)
    if any(row["masked"] for row in rows):
        lines.append("torch has no masked batch norm: case E's torch columns are empty")
    return lines


def _renorm_lines(rows: Sequence[dict]) -> list[str]:
    """The renorm table: ours and Keras with renorm=True, ours plain on the same tensor, their ratios."""
    renorm_rows = [row for row in rows if row["renorm"]]
    if not renorm_rows:
        return []
    lines = [f"{renorm_rows[0]['case']} with renorm=True (ours, keras) against ours plain (renorm=False, same tensor):"]
    lines += _table_lines(_RENORM_COLUMNS, renorm_rows)
    lines.append(f"target: renorm/plain <= {RENORM_TARGET}x in training")
    lines.append("torch has no batch renormalization: case R's torch columns are empty")
    return lines


# ------------------------------------------------------------------- synchronized (--sync)

SYNC_CASE = "B"
SYNC_MODES = ("training", "training_backward")
SYNC_WORLD_SIZE = 2


class _CollectiveClock:
    """Wall time spent inside the ``torch.distributed`` collectives that a synchronized layer
    calls (``batchnorm.distributed`` looks them up at each call, so replacing them here sees
    them), waiting for the other processes included."""

    NAMES = ("all_reduce", "all_gather_single", "all_gather_into_tensor")

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> _CollectiveClock:
        import torch.distributed as dist

        self._originals = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}
        for name, original in self._originals.items():
            setattr(dist, name, self._timed(original))
        return self

    def __exit__(self, *exc) -> None:
        import torch.distributed as dist

        for name, original in self._originals.items():
            setattr(dist, name, original)

    def _timed(self, collective: Callable) -> Callable:
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return collective(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return call

    def attribute(self, entry: _Entry, spent: dict[str, float]) -> None:
        """Make ``entry``'s calls add the collective time they contain to ``spent[entry.mode]``."""
        call = entry.call

        def timed_call() -> None:
            before = self.seconds
            call()
            spent[entry.mode] += self.seconds - before

        entry.call = timed_call


def _sync_worker(quick: bool, repeats: int, warmup: int) -> list[dict]:
    """One process of :func:`sync_benchmark`: its own case-B batch, local and synchronized layers."""
    import torch.distributed as dist

    case = CASES[SYNC_CASE]
    x, g, _ = _make_inputs(case, quick, torch.device("cpu"), seed=dist.get_rank())
    entries = []
    for mode in SYNC_MODES:
        for synchronized in (False, True):
            layer = BatchNormalization(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON, synchronized=synchronized)
            layer.build(x.shape)
            impl = "synchronized" if synchronized else "local"
            entries.append(_entry(mode, impl, functools.partial(layer, training=True), x, g, (layer.gamma, layer.beta)))
    spent = dict.fromkeys(SYNC_MODES, 0.0)
    with _CollectiveClock() as clock:
        for entry in entries:
            if entry.impl == "synchronized":
                clock.attribute(entry, spent)
        # One call per sample and no untimed lead-in call (whose collectives the clock would
        # count), so that every process makes the same calls, and every sample starts together
        # (a barrier, untimed): a process that ran ahead during a local sample would otherwise
        # wait inside the next synchronized one. The warm-up rounds include each
        # synchronized layer's one-off layout check.
        _rounds(entries, max(1, warmup), _nothing, timed=False, before_sample=dist.barrier)
        spent.update(dict.fromkeys(SYNC_MODES, 0.0))
        _rounds(
            entries,
            repeats,
            _nothing,
            timed=True,
            first_round=max(1, warmup),
            before_sample=dist.barrier,
            lead_in=False,
        )
    by_key = {(e.mode, e.impl): e for e in entries}
    rows = []
    for mode in SYNC_MODES:
        local, synced = by_key[mode, "local"], by_key[mode, "synchronized"]
        local_ms, sync_ms = statistics.median(local.samples_ms), statistics.median(synced.samples_ms)
        rows.append(
            {
                "mode": mode,
                "rank": dist.get_rank(),
                "description": case.describe(quick),
                "repeats": repeats,
                "warmup": warmup,
                "threads": torch.get_num_threads(),
                "local_ms": local_ms,
                "synchronized_ms": sync_ms,
                "synchronized_over_local": _ratio(sync_ms, local_ms),
                "collectives_ms": spent[mode] * 1e3 / len(synced.samples_ms),
                "collectives_share": spent[mode] * 1e3 / sum(synced.samples_ms),
                "samples_ms": {"local": list(local.samples_ms), "synchronized": list(synced.samples_ms)},
            }
        )
    return rows


def sync_benchmark(
    *,
    quick: bool = False,
    repeats: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    world_size: int = SYNC_WORLD_SIZE,
) -> list[dict]:
    """Synchronized against local training of case B, in ``world_size`` gloo processes here.

    Each process holds its own case-B batch, as under DDP, and times a layer with
    ``synchronized=False`` and one with ``synchronized=True`` in the training modes, interleaved
    round-robin as :func:`benchmark` does (one call per sample, so that all processes make the
    same calls; the median is reported). The time inside the synchronized calls' collectives is
    measured too, waiting for the slower process included: ``collectives_ms`` per call, and
    ``collectives_share`` of the synchronized time. Returns every process's rows, rank by rank.
    ``threads`` per process defaults to the CPUs shared out.
    """
    from batchnorm.testing import run_local_group

    repeats = (QUICK_REPEATS if quick else FULL_REPEATS) if repeats is None else int(repeats)
    warmup = (QUICK_WARMUP if quick else FULL_WARMUP) if warmup is None else int(warmup)
    ranks = run_local_group(_sync_worker, world_size, quick, repeats, warmup, threads=threads, timeout_s=300.0)
    return [row for rows in ranks for row in rows]


def format_sync_table(rows: Sequence[dict], header: dict) -> str:
    """Rank 0's rows of :func:`sync_benchmark` as a text table, under ``header``'s lines."""
    lines = [
        f"# batchnorm bench --sync: {header['world_size']} gloo processes on this machine, "
        f"{header['threads']} thread(s) each, torch {header['torch']}, "
        f"allocator: {header['allocator']['description']}",
        f"# each process holds its own batch of case {rows[0]['description']}; rank 0's medians of "
        f"{header['repeats']} interleaved round-robin repetitions after {header['warmup']} warm-up rounds",
        f"# command: {header['command']}",
    ]
    columns = ["mode", "local ms", "synchronized ms", "sync/local", "collectives ms", "collectives share"]
    table = [columns] + [
        [
            MODE_LABELS[r["mode"]],
            _fmt(r["local_ms"], 3),
            _fmt(r["synchronized_ms"], 3),
            _fmt(r["synchronized_over_local"], 2, "x"),
            _fmt(r["collectives_ms"], 3),
            _fmt(100 * r["collectives_share"], 1, " %"),
        ]
        for r in rows
        if r["rank"] == 0
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    lines.append(
        "collectives: one all_gather per forward (the statistics), one all_reduce per backward "
        "(the gradient sums); their time includes waiting for the other process"
    )
    return "\n".join(lines)


def _run_sync(args: argparse.Namespace, command: str) -> dict:
    if torch.device(args.device).type != "cpu":
        raise ValueError(f"--sync runs its processes on the CPU (gloo), received --device {args.device}")
    started = time.perf_counter()
    rows = sync_benchmark(quick=args.quick, repeats=args.repeats, warmup=args.warmup, threads=args.threads)
    header = {
        "torch": torch.__version__,
        "world_size": SYNC_WORLD_SIZE,
        "command": command,
        **{key: rows[0][key] for key in ("threads", "repeats", "warmup")},
        "quick": args.quick,
        "cpu_count": os.cpu_count(),
        "loadavg": _loadavg(),
        "allocator": allocator_settings(),
        "elapsed_s": time.perf_counter() - started,
    }
    print(format_sync_table(rows, header), flush=True)
    return {"header": header, "rows": rows}


# ------------------------------------------------------------------------- command line


def _number_argument(convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str):
    """An argparse ``type``: ``convert(text)``, refused unless ``accept`` holds, naming ``expected``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number_argument(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number_argument(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number_argument(float, lambda v: 0 < v < float("inf"), "a positive number")


def _cases_arg(text: str) -> str:
    try:
        return "".join(c.name for c in _parse_cases(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _modes_arg(text: str) -> list[str]:
    try:
        return _parse_modes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` (the dispatcher calls :func:`run` with the result)."""
    _add_workload_arguments(parser)
    _add_run_arguments(parser)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """What is timed, and how often."""
    parser.add_argument(
        "--cases",
        type=_cases_arg,
        default="".join(CASES),
        metavar="LETTERS",
        help="cases to run, e.g. BEF or B,E,F (default: %(default)s): "
        + "; ".join(c.describe() for c in CASES.values()).replace("%", "%%"),
    )
    parser.add_argument(
        "--modes",
        type=_modes_arg,
        default=list(MODES),
        metavar="LIST",
        help=f"comma-separated among {', '.join(MODES)} (default: all; case R runs in the training modes only)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"timed round-robin repetitions; the median is reported "
        f"(default: {FULL_REPEATS}, --quick: {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help=f"untimed rounds first (default: {FULL_WARMUP}, --quick: {QUICK_WARMUP})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help="torch.set_num_threads for the run (default: torch's current value)",
    )
    parser.add_argument(
        "--device", default="cpu", metavar="DEVICE", help="torch device, e.g. cpu or cuda (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"sizes divided by {QUICK_DIVISOR}, fewer repetitions: seconds, for smoke tests",
    )
    parser.add_argument(
        "--min-sample-ms",
        type=_positive_float,
        default=1.0,
        metavar="MS",
        help="repeat tiny calls inside a sample until it lasts this long (default: %(default)s)",
    )


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Against what, where the results go, and the other runs."""
    parser.add_argument(
        "--no-keras", dest="keras", action="store_false", help="leave Keras out (it is included when installed)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the header and rows as JSON to PATH")
    parser.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="re-run in a subprocess with "
        + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC_ENV.items())
        + " so glibc reuses big buffers instead of mapping them afresh "
        "(default: this process's allocator settings, normally glibc defaults)",
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help=f"instead: time synchronized=True against local statistics in training (case "
        f"{SYNC_CASE}, forward and forward+backward) in {SYNC_WORLD_SIZE} gloo processes "
        "on this machine, and the collectives' share (honours --quick, --repeats, "
        "--warmup, --threads, --json, --tuned-malloc)",
    )
    parser.add_argument("--command", dest="command_line", default=None, help=argparse.SUPPRESS)


def _child_argv(args: argparse.Namespace, json_path: str, command: str) -> list[str]:
    argv = [
        "--cases",
        args.cases,
        "--modes",
        ",".join(args.modes),
        "--device",
        str(args.device),
        "--min-sample-ms",
        repr(args.min_sample_ms),
        "--json",
        json_path,
        "--command",
        command,
    ]
    for option, value in (("--repeats", args.repeats), ("--warmup", args.warmup), ("--threads", args.threads)):
        if value is not None:
            argv += [option, str(value)]
    if args.quick:
        argv.append("--quick")
    if not args.keras:
        argv.append("--no-keras")
    if args.sync:
        argv.append("--sync")
    return argv


def _run_tuned_subprocess(args: argparse.Namespace, command: str) -> dict:
    env = dict(os.environ, **TUNED_MALLOC_ENV)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    prefix = " ".join(f"{k}={v}" for k, v in TUNED_MALLOC_ENV.items())
    with tempfile.TemporaryDirectory() as tmp:
        json_path = args.json or os.path.join(tmp, "bench.json")
        child = [sys.executable, "-m", "batchnorm.bench", *_child_argv(args, json_path, f"{prefix} {command}")]
        subprocess.run(child, env=env, check=True)
        return json.loads(Path(json_path).read_text())


def run(args: argparse.Namespace) -> dict:
    """Run from parsed options: print the table, write ``--json``; return ``{"header", "rows"}``."""
    command = args.command_line or shlex.join(getattr(sys, "orig_argv", sys.argv))
    tuned_here = all(_STARTUP_ENV.get(k) == v for k, v in TUNED_MALLOC_ENV.items())
    if args.tuned_malloc and not tuned_here:
        return _run_tuned_subprocess(args, command)
    if args.sync:
        return _write_json(args, _run_sync(args, command))
    started = time.perf_counter()
    options = ("device", "threads", "repeats", "warmup", "quick", "keras", "cases", "modes", "min_sample_ms")
    options = {name: getattr(args, name) for name in options}  # what the header records is what runs
    header = describe_environment(**options, command=command)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = benchmark(**options, progress=progress)
    header["elapsed_s"] = time.perf_counter() - started
    header["loadavg_end"] = _loadavg()
    print(format_table(rows, header), flush=True)
    return _write_json(args, {"header": header, "rows": rows})


def _write_json(args: argparse.Namespace, result: dict) -> dict:
    """Write ``result`` to ``--json`` when given; return it."""
    if args.json:
        path = Path(args.json)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchnorm.bench",
        description="Time batchnorm.BatchNormalization against torch's native batch norm, Keras 3 "
        "and the copy floor; print a table, optionally write JSON.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
