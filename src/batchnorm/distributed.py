"""Cross-process batch statistics over ``torch.distributed`` (SPEC section 8)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_synchronizing", "synchronized_batch_norm_training"]


def is_synchronizing(process_group: Any = None) -> bool:
    """Whether a synchronized layer must combine statistics across processes.

    Not yet: statistics are local until synchronized training is implemented.
    """
    return False


def synchronized_batch_norm_training(
    view: Tensor,
    inside: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    fallback_mean: Tensor,
    fallback_var: Tensor,
    epsilon: float,
    process_group: Any = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch normalization with the statistics of the whole group's batch (not implemented yet)."""
    raise NotImplementedError("synchronized batch statistics are not implemented yet")
