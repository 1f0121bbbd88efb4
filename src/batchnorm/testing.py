"""Local process groups for trying synchronized layers on one machine: tests, benchmarks, examples.

Real jobs start their processes with ``torchrun``; :func:`run_local_group` starts a gloo group of
fresh processes on this machine and collects what each returns.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing

__all__ = ["run_local_group", "free_port"]


def run_local_group(
    worker: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 60.0,
    deadline_s: float | None = None,
    threads: int | None = None,
) -> list[Any]:
    """Run ``worker(*args)`` in ``world_size`` new processes joined by a gloo group; return the results.

    Each process joins ``torch.distributed`` (gloo, rendezvous on 127.0.0.1 at a free port, the
    group's collective timeout ``timeout_s``), uses ``threads`` CPU threads (default: the CPUs
    shared out), calls ``worker(*args)`` (``dist.get_rank()`` tells it which it is) and leaves the
    group. For trying synchronized layers on one machine, for tests and for benchmarks; real jobs
    start with ``torchrun``. ``worker`` must be a module-level function and its result small and
    picklable. Returns the results in rank order (``None`` for a process that exited without
    returning); raises the first failure, with the worker's traceback, or ``TimeoutError`` when the
    processes are not done after ``deadline_s`` seconds (they are killed).
    """
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    context = torch.multiprocessing.start_processes(
        _run_rank,
        args=(world_size, free_port(), timeout_s, threads, worker, args, results),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    stop = None if deadline_s is None else time.monotonic() + deadline_s
    while not context.join(timeout=0.1):
        if stop is not None and time.monotonic() > stop:
            for process in context.processes:
                process.kill()
                process.join()
            raise TimeoutError(f"the {world_size} processes of the local group were not done after {deadline_s} s")
    by_rank = {}
    while not results.empty():  # every process has exited: whatever they sent is here
        rank, result = results.get()
        by_rank[rank] = result
    return [by_rank.get(rank) for rank in range(world_size)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the system's choice; another process may take it later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(
    rank: int, world_size: int, port: int, timeout_s: float, threads: int, worker: Callable, args: tuple, results
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        results.put((rank, worker(*args)))
    finally:
        # Whatever the worker left in reference cycles (a DistributedDataParallel wrapper) goes
        # while its group exists: torn down after it, gloo can abort the process.
        gc.collect()
        dist.destroy_process_group()
