"""Weight regularizers with Keras 3's names, defaults, formulas and configs.

A regularizer is called as ``regularizer(weight)`` and returns a differentiable
scalar tensor, the penalty to add to the loss. The penalty is computed in the
weight's dtype when it is float32 or float64, otherwise in float32.

Names accepted by :func:`get` are those Keras 3's ``keras.regularizers.get``
accepts: ``"L1"``, ``"l1"`` (``L1(0.01)``), ``"L2"``, ``"l2"`` (``L2(0.01)``)
and ``"L1L2"``, ``"l1l2"`` (``L1L2()``, i.e. both factors 0.0, as in Keras;
``"l1_l2"`` is not a Keras identifier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Union

import torch

from batchnorm._registry import Configurable, Registry, check_real

__all__ = ["L1", "L1L2", "L2", "Regularizer", "get", "serialize"]

RegularizerLike = Union[None, str, Mapping[str, Any], "Regularizer", Callable[[torch.Tensor], torch.Tensor]]


class Regularizer(Configurable):
    """Base class of the regularizers.

    Subclasses implement ``__call__(weight) -> scalar tensor``; the base
    penalty is zero, as in Keras.
    """

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the penalty for ``weight`` as a scalar tensor."""
        return torch.zeros((), dtype=_work_dtype(weight), device=weight.device)


_REGISTRY: Registry[Regularizer] = Registry(
    "regularizer",
    Regularizer,
    unsupported=("OrthogonalRegularizer", "orthogonal_regularizer"),
)


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _factor(value: float | None, name: str, default: float) -> float:
    """A penalty factor: ``None`` means ``default``; else a finite float ``>= 0``."""
    return float(check_real(default if value is None else value, name, minimum=0.0))


def _penalty(weight: torch.Tensor, l1: float = 0.0, l2: float = 0.0) -> torch.Tensor:
    """``l1 * sum(|w|) + l2 * sum(w**2)``, a term left out when its factor is 0."""
    w = weight.to(_work_dtype(weight))
    total = torch.zeros((), dtype=w.dtype, device=w.device)
    if l1 != 0.0:
        total = total + l1 * w.abs().sum()
    if l2 != 0.0:
        total = total + l2 * w.square().sum()
    return total


class _OneFactor(Regularizer):
    """Base of :class:`L1` and :class:`L2`: one penalty factor, named ``_factor_name`` (``"l1"``
    or ``"l2"``) as attribute, config key and keyword of :func:`_penalty`. A subclass writes only
    its ``__init__``, whose keyword Keras names ``l1`` or ``l2``."""

    _factor_name: ClassVar[str]

    def _factors(self) -> dict[str, float]:
        return {self._factor_name: getattr(self, self._factor_name)}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return _penalty(weight, **self._factors())

    def get_config(self) -> dict[str, Any]:
        return self._factors()


@_REGISTRY.register("l1")
class L1(_OneFactor):
    """L1 penalty: ``l1 * sum(abs(w))``; ``l1`` a non-negative finite factor (``None``: 0.01)."""

    _factor_name = "l1"

    def __init__(self, l1: float | None = 0.01) -> None:
        self.l1 = _factor(l1, "l1", 0.01)


@_REGISTRY.register("l2")
class L2(_OneFactor):
    """L2 penalty: ``l2 * sum(w**2)`` (no factor 1/2); ``l2`` a non-negative finite factor
    (``None``: 0.01)."""

    _factor_name = "l2"

    def __init__(self, l2: float | None = 0.01) -> None:
        self.l2 = _factor(l2, "l2", 0.01)


@_REGISTRY.register("l1l2")
class L1L2(Regularizer):
    """Both penalties: ``l1 * sum(abs(w)) + l2 * sum(w**2)``.

    Args:
        l1: Non-negative finite factor (``None`` means 0.0).
        l2: Non-negative finite factor (``None`` means 0.0).
    """

    def __init__(self, l1: float | None = 0.0, l2: float | None = 0.0) -> None:
        self.l1 = _factor(l1, "l1", 0.0)
        self.l2 = _factor(l2, "l2", 0.0)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return _penalty(weight, self.l1, self.l2)

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


def get(identifier: RegularizerLike, *, argument: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Resolve a regularizer identifier.

    Args:
        identifier: ``None`` (no regularizer), a Keras name (``"l1"``, ``"L2"``,
            ``"l1l2"``, ...: Keras's default factors), a Keras serialized dict
            (its ``module``, if present, must be ``"keras.regularizers"``), a
            :class:`Regularizer` (returned as is), a class (instantiated with no
            arguments) or any callable ``weight -> scalar`` (returned as is).
        argument: Name of the argument being resolved, for error messages.

    Raises:
        TypeError: A type that cannot be a regularizer.
        ValueError: An unknown name or ``class_name``, an invalid factor, or a
            dict that names a module or a custom object (nothing is imported).
    """
    return _REGISTRY.get(identifier, argument=argument)


def serialize(regularizer: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, Any] | None:
    """Serialize a regularizer to Keras 3's dict format.

    A built-in gives Keras's dict, e.g. ``{"module": "keras.regularizers",
    "class_name": "L2", "config": {"l2": 0.01}, "registered_name": None}``
    (Keras rounds ``L1``'s factor to float32 in its config, e.g.
    0.009999999776482582; we keep the float given); ``None`` gives ``None``.
    Any other callable gives a record ``{"module": None, "class_name": q,
    "config": get_config() or {}, "registered_name": q}`` (``q`` its qualified
    name) that :func:`get` refuses to load, since it imports nothing.
    """
    return _REGISTRY.serialize(regularizer)
