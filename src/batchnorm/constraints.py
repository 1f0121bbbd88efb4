"""Weight constraints with Keras 3's names, defaults, formulas and configs.

A constraint is called as ``constraint(weight)`` and returns the projected
weight, a new tensor of the weight's shape and dtype (computed in float32 for
16-bit weights). Keras applies constraints after each optimizer step.

The norm constraints rescale each slice of ``w`` along ``axis`` (an int or a
list of ints): with ``n = sqrt(sum(w**2, axis))`` the result is
``w * desired(n) / (1e-7 + n)``, where ``1e-7`` is Keras's ``epsilon()``. For
a 1-D weight such as a batch-norm ``gamma`` of shape ``(C,)``, ``axis=0``
means the norm of the whole vector.

Names accepted by :func:`get`: ``"MaxNorm"``/``"max_norm"``,
``"MinMaxNorm"``/``"min_max_norm"``, ``"NonNeg"``/``"non_neg"``,
``"UnitNorm"``/``"unit_norm"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

from batchnorm._registry import Configurable, Registry, check_int, check_real

__all__ = ["Constraint", "MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm", "get", "serialize"]

EPSILON = 1e-7
"""Keras's ``backend.epsilon()``, added to the norms in the denominators."""

Axis = int | Sequence[int]
ConstraintLike = Union[None, str, Mapping[str, Any], "Constraint", Callable[[torch.Tensor], torch.Tensor]]


class Constraint(Configurable):
    """Base class of the constraints; the base projection is the identity, as in Keras."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the projection of ``weight`` (same shape and dtype)."""
        return weight


_REGISTRY: Registry[Constraint] = Registry("constraint", Constraint)


def _check_axis(axis: Axis) -> Axis:
    """An int or a non-empty list/tuple of ints, returned as given."""
    if isinstance(axis, Sequence) and not isinstance(axis, (str, bytes)):
        if len(axis) == 0:
            raise ValueError(f"Invalid value for argument axis: expected at least one axis, received axis={axis!r}")
        checked = [check_int(a, "axis") for a in axis]
        return checked if isinstance(axis, list) else tuple(checked)
    return check_int(axis, "axis")


class _NormConstraint(Constraint):
    """Rescale each slice along ``axis`` to a desired norm: ``w * desired(n) / (eps + n)``.

    Args:
        axis: Axis or axes along which the norms are taken.
    """

    def __init__(self, axis: Axis = 0) -> None:
        self.axis = _check_axis(axis)

    def _desired(self, norms: torch.Tensor) -> torch.Tensor | float:
        raise NotImplementedError

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        if any(not -weight.dim() <= a < weight.dim() for a in axes):
            raise ValueError(f"Invalid axis={self.axis!r} for a weight of shape {tuple(weight.shape)}")
        w = weight if weight.dtype == torch.float64 else weight.to(torch.float32)
        norms = w.square().sum(dim=axes, keepdim=True).sqrt()
        return (w * (self._desired(norms) / (EPSILON + norms))).to(weight.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis}


@_REGISTRY.register("max_norm")
class MaxNorm(_NormConstraint):
    """Cap the norm of each slice: ``desired = clip(n, 0, max_value)``.

    Args:
        max_value: Largest norm allowed, ``>= 0``.
        axis: Axis or axes along which the norms are taken.
    """

    def __init__(self, max_value: float = 2, axis: Axis = 0) -> None:
        self.max_value = check_real(max_value, "max_value", minimum=0.0)
        super().__init__(axis)

    def _desired(self, norms: torch.Tensor) -> torch.Tensor:
        return norms.clamp(0.0, self.max_value)

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, **super().get_config()}


@_REGISTRY.register("min_max_norm")
class MinMaxNorm(_NormConstraint):
    """Pull each slice's norm into ``[min_value, max_value]``.

    ``desired = rate * clip(n, min_value, max_value) + (1 - rate) * n``:
    ``rate=1`` enforces the bounds at once, a smaller rate moves towards them.

    Args:
        min_value: Smallest norm, ``>= 0``.
        max_value: Largest norm, ``>= min_value``.
        rate: Enforcement rate in ``[0, 1]``.
        axis: Axis or axes along which the norms are taken.
    """

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis: Axis = 0) -> None:
        self.min_value = check_real(min_value, "min_value", minimum=0.0)
        self.max_value = check_real(max_value, "max_value", minimum=self.min_value)
        self.rate = check_real(rate, "rate", minimum=0.0, maximum=1.0)
        super().__init__(axis)

    def _desired(self, norms: torch.Tensor) -> torch.Tensor:
        clipped = norms.clamp(self.min_value, self.max_value)
        return self.rate * clipped + (1 - self.rate) * norms

    def get_config(self) -> dict[str, Any]:
        return {"min_value": self.min_value, "max_value": self.max_value, "rate": self.rate, **super().get_config()}


@_REGISTRY.register("unit_norm")
class UnitNorm(_NormConstraint):
    """Scale each slice to unit norm: ``desired = 1``, i.e. ``w / (eps + n)``.

    Args:
        axis: Axis or axes along which the norms are taken.
    """

    def _desired(self, norms: torch.Tensor) -> float:
        return 1.0


@_REGISTRY.register("non_neg")
class NonNeg(Constraint):
    """Clip negative weights to zero: ``max(w, 0)``."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.clamp_min(0)


def get(identifier: ConstraintLike, *, argument: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Resolve a constraint identifier.

    Args:
        identifier: ``None`` (no constraint), a Keras name (``"max_norm"``,
            ``"NonNeg"``, ...: Keras's defaults), a Keras serialized dict (its
            ``module``, if present, must be ``"keras.constraints"``), a
            :class:`Constraint` (returned as is), a class (instantiated with no
            arguments) or any callable ``weight -> projected weight``.
        argument: Name of the argument being resolved, for error messages.

    Raises:
        TypeError: A type that cannot be a constraint.
        ValueError: An unknown name or ``class_name``, an invalid argument, or
            a dict that names a module or a custom object (nothing is imported).
    """
    return _REGISTRY.get(identifier, argument=argument)


def serialize(constraint: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, Any] | None:
    """Serialize a constraint to Keras 3's dict format.

    A built-in gives exactly Keras's dict, e.g. ``{"module": "keras.constraints",
    "class_name": "MaxNorm", "config": {"max_value": 2, "axis": 0},
    "registered_name": None}``; ``None`` gives ``None``. Any other callable gives
    a record ``{"module": None, "class_name": q, "config": get_config() or {},
    "registered_name": q}`` (``q`` its qualified name) that :func:`get` refuses
    to load, since it imports nothing.
    """
    return _REGISTRY.serialize(constraint)
