"""Synchronized renorm and ghost batches (SPEC 8, 10, 11) across real gloo processes.

As in ``test_distributed.py``: every rank builds the same seeded global batch, runs a synchronized
layer on its own (unequal, possibly empty) shard and checks its part against one process on the
whole batch, both our unsynchronized layer and the float64 reference. Ghost batches stay local:
each rank's ghosts are its own, so each rank is checked against the reference on its own shard,
and no collective runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from modes_support import (
    RENORM_BUFFERS,
    assert_near,
    buffer_names,
    make_layer,
    random_mask,
    reference_call,
)
from test_distributed import _counting_collectives

from batchnorm.testing import run_local_group

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60
DEADLINE_S = 120
CLIPPING = {"rmax": 1.3, "rmin": 0.9, "dmax": 0.25}
# (axis, masked, clipping): one case with a mask on a non-last axis, one on several axes.
SYNC_CASES = [(-1, False, None), (1, True, CLIPPING), ((1, 2), True, None)]
GHOST_CASES = [(-1, False, False), (1, True, True)]  # (axis, masked, renorm)


def _bounds(sizes, rank) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _global_batch(axis, masked, total, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (total, 4, 3) if axis == -1 else (total, 3, 4)
    x = torch.randn(shape, generator=g) * 2 + 1.5
    upstream = torch.randn(shape, generator=g)
    mask = None
    if masked:
        mask = random_mask((total, 4) if axis != (1, 2) else (total,), seed=seed)
    return x, upstream, mask


def _check_synchronized_renorm(axis, masked, clipping, sizes) -> None:
    rank = dist.get_rank()
    where = f"rank {rank}, shards {sizes}, axis {axis}, mask {masked}, clipping {clipping}"
    x, upstream, mask = _global_batch(axis, masked, sum(sizes), seed=len(sizes))
    kwargs = dict(renorm=True, renorm_clipping=clipping, seed=3)
    whole = make_layer(x.shape, axis, **kwargs)
    synchronized = make_layer(x.shape, axis, synchronized=True, **kwargs)
    y_ref, buffers_ref, grads_ref = reference_call(whole, x, mask, upstream)

    x_all = x.clone().requires_grad_()
    y_all = whole(x_all, training=True, mask=mask)
    y_all.backward(upstream)

    shard = _bounds(sizes, rank)
    x_mine = x[shard].clone().requires_grad_()
    y_mine = synchronized(x_mine, training=True, mask=None if mask is None else mask[shard])
    y_mine.backward(upstream[shard])
    parameter_grads = torch.stack([synchronized.gamma.grad, synchronized.beta.grad])
    dist.all_reduce(parameter_grads)  # what DDP does to them

    # Against one process on the whole batch (our layer, float32), then the float64 reference.
    assert_near(y_mine, y_all[shard], 1e-5, f"output ({where})")
    assert_near(x_mine.grad, x_all.grad[shard], 1e-5, f"input gradient ({where})")
    assert_near(parameter_grads[0], whole.gamma.grad, 1e-5, f"gamma gradient ({where})")
    assert_near(parameter_grads[1], whole.beta.grad, 1e-5, f"beta gradient ({where})")
    assert_near(y_mine, y_ref[shard], 1e-4, f"output vs reference ({where})")
    assert_near(x_mine.grad, grads_ref[0][shard], 1e-4, f"input gradient vs reference ({where})")
    assert_near(parameter_grads[0], grads_ref[1], 1e-4, f"gamma gradient vs reference ({where})")
    assert_near(parameter_grads[1], grads_ref[2], 1e-4, f"beta gradient vs reference ({where})")
    assert set(buffer_names(synchronized)) >= set(RENORM_BUFFERS)
    for name in buffer_names(synchronized):
        assert_near(getattr(synchronized, name), getattr(whole, name), 1e-5, f"{name} ({where})")
        assert_near(getattr(synchronized, name), buffers_ref[name], 1e-5, f"{name} vs reference ({where})")


def _check_local_ghosts(axis, masked, renorm, sizes) -> None:
    """Each rank's ghost batches are its own: the reference on this rank's shard, no collective."""
    rank = dist.get_rank()
    where = f"rank {rank}, shards {sizes}, axis {axis}, mask {masked}, renorm {renorm}"
    x, upstream, mask = _global_batch(axis, masked, sum(sizes), seed=10 + len(sizes))
    shard = _bounds(sizes, rank)
    x, upstream = x[shard], upstream[shard]
    mask = None if mask is None else mask[shard]
    layer = make_layer(x.shape, axis, synchronized=True, virtual_batch_size=2, renorm=renorm, seed=4)
    y_ref, buffers_ref, grads_ref = reference_call(layer, x, mask, upstream)
    x_in = x.clone().requires_grad_()
    with _counting_collectives() as calls:
        y = layer(x_in, training=True, mask=mask)
        y.backward(upstream)
    assert not calls, f"collectives in a ghost-batch call ({where}): {dict(calls)}"
    assert_near(y, y_ref, 1e-4, f"output ({where})")
    assert_near(x_in.grad, grads_ref[0], 1e-4, f"input gradient ({where})")
    assert_near(layer.gamma.grad, grads_ref[1], 1e-4, f"gamma gradient ({where})")
    assert_near(layer.beta.grad, grads_ref[2], 1e-4, f"beta gradient ({where})")
    for name in buffer_names(layer):
        assert_near(getattr(layer, name), buffers_ref[name], 1e-5, f"{name} ({where})")


def _worker(sync_sizes, ghost_sizes) -> int:
    checks = 0
    for case in SYNC_CASES:
        _check_synchronized_renorm(*case, sync_sizes)
        checks += 1
    for case in GHOST_CASES:
        _check_local_ghosts(*case, ghost_sizes)
        checks += 1
    return checks


def test_synchronized_renorm_and_local_ghosts_over_two_processes():
    results = run_local_group(_worker, 2, [3, 6], [4, 6], timeout_s=TIMEOUT_S, deadline_s=DEADLINE_S)
    assert results == [len(SYNC_CASES) + len(GHOST_CASES)] * 2


def test_synchronized_renorm_and_local_ghosts_over_three_processes_one_empty():
    results = run_local_group(_worker, 3, [2, 0, 5], [4, 8, 6], timeout_s=TIMEOUT_S, deadline_s=DEADLINE_S)
    assert results == [len(SYNC_CASES) + len(GHOST_CASES)] * 3
