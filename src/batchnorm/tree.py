"""Helpers that act on a whole ``nn.Module`` tree, as Keras does on a model's layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layer import BatchNormalization

__all__ = ["set_trainable", "regularization_loss", "apply_constraints", "layer_batch_normalization"]


def _batch_norms(module: nn.Module) -> list[BatchNormalization]:
    return [m for m in module.modules() if isinstance(m, BatchNormalization)]


def set_trainable(module: nn.Module, flag: bool) -> nn.Module:
    """Freeze (``False``) or unfreeze (``True``) a whole tree, as Keras's ``model.trainable = flag``.

    Sets ``trainable`` on every :class:`BatchNormalization` inside ``module`` (so a frozen one runs in
    inference mode even under ``model.train()``) and ``requires_grad`` on every parameter of the
    tree. Returns ``module``.
    """
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, received flag={flag!r}")
    for layer in _batch_norms(module):
        layer.trainable = flag
    for parameter in module.parameters():
        parameter.requires_grad_(flag)
    return module


def regularization_loss(module: nn.Module) -> Tensor:
    """Sum of the regularization penalties of every :class:`BatchNormalization` in ``module``.

    Differentiable; a zero scalar tensor when there are none. Add it to the training loss.
    """
    losses = [loss for layer in _batch_norms(module) for loss in layer.losses]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def apply_constraints(module: nn.Module) -> None:
    """Project ``gamma``/``beta`` of every :class:`BatchNormalization` in ``module`` in place.

    Keras applies constraints after each optimizer step; the PyTorch equivalent is one line::

        optimizer.register_step_post_hook(lambda *_: batchnorm.apply_constraints(model))
    """
    for layer in _batch_norms(module):
        layer.apply_constraints()


def layer_batch_normalization(object: Any = None, **kwargs: Any) -> Any:
    """Keras's R interface ``layer_batch_normalization(object, ...)``.

    With no ``object``: a new :class:`BatchNormalization(**kwargs)`. With an ``nn.Sequential``: the
    new layer is appended and the same Sequential returned. With a tensor: the new layer applied
    to it (``training=None``; a new module is in training mode, so batch statistics are used).
    """
    layer = BatchNormalization(**kwargs)
    if object is None:
        return layer
    if isinstance(object, nn.Sequential):
        object.append(layer)
        return object
    if isinstance(object, Tensor):
        return layer(object)
    raise TypeError(f"object must be None, an nn.Sequential or a tensor, received {type(object).__name__}")
