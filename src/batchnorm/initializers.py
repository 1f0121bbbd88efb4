"""Weight initializers with Keras 3's names, defaults, formulas and configs.

An initializer is called as ``initializer(shape, dtype=None)`` and returns a new
CPU tensor of that shape (``dtype`` defaults to ``torch.float32``).

Random initializers take ``seed``: an ``int`` seeds a private
``torch.Generator`` afresh on every call, so each call returns the same values
(as a Keras initializer seeded with an integer); ``None`` draws from torch's
global generator, so ``torch.manual_seed`` makes the result reproducible.
(Keras draws a fixed seed for ``None`` at construction instead.) Samples are
drawn in float32 (float64 for a float64 ``dtype``) and then cast.

Identifiers accepted by :func:`get` are Keras's: class names (``"Zeros"``),
snake-case names (``"zeros"``, ``"random_normal"``, ``"glorot_uniform"``, ...),
the aliases ``"zero"``, ``"one"``, ``"normal"`` and ``"uniform"``, Keras
serialized dicts, instances of :class:`Initializer` and other callables with the
signature ``(shape, dtype=None)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Union

import torch

from batchnorm._registry import Configurable, Registry, check_int, check_real

__all__ = [
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "compute_fans",
    "get",
    "serialize",
]

ShapeLike = int | Sequence[int] | torch.Size
DTypeLike = torch.dtype | str | None
InitializerLike = Union[str, Mapping[str, Any], "Initializer", Callable[..., torch.Tensor]]

# Standard deviation of a standard normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978


class Initializer(Configurable):
    """Base class of the initializers.

    Subclasses implement ``__call__(shape, dtype=None) -> torch.Tensor``;
    ``get_config()`` and ``from_config(config)`` come from the base.
    """

    def __call__(self, shape: ShapeLike, dtype: DTypeLike = None) -> torch.Tensor:
        """Return a new tensor of ``shape`` and ``dtype`` (default float32), on CPU."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


_REGISTRY: Registry[Initializer] = Registry(
    "initializer",
    Initializer,
    allow_none=False,
    unsupported=(
        "Identity",
        "identity",
        "IdentityInitializer",
        "Orthogonal",
        "orthogonal",
        "OrthogonalInitializer",
        "STFT",
        "stft",
        "STFTInitializer",
    ),
)


def _shape(shape: ShapeLike) -> tuple[int, ...]:
    """Normalize an int or a sequence of non-negative ints to a tuple."""
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    dims = tuple(check_int(d, "shape") for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"Invalid value for argument shape: negative size in shape={shape!r}")
    return dims


def _dtype(dtype: DTypeLike, *, floating: bool = False) -> torch.dtype:
    """Resolve ``None`` (float32), a ``torch.dtype`` or its name (``"float64"``)."""
    resolved = torch.float32 if dtype is None else dtype
    if isinstance(resolved, str):
        resolved = getattr(torch, resolved, None)
    if not isinstance(resolved, torch.dtype):
        raise TypeError(f"Invalid value for argument dtype: not a torch dtype: dtype={dtype!r}")
    if floating and not resolved.is_floating_point:
        raise ValueError(
            f"Invalid value for argument dtype: random initializers need a floating dtype, received dtype={dtype!r}"
        )
    return resolved


# -- constant initializers ------------------------------------------------------


@_REGISTRY.register("zeros", "zero")
class Zeros(Initializer):
    """Fill with 0."""

    def __call__(self, shape: ShapeLike, dtype: DTypeLike = None) -> torch.Tensor:
        return torch.zeros(_shape(shape), dtype=_dtype(dtype))


@_REGISTRY.register("ones", "one")
class Ones(Initializer):
    """Fill with 1."""

    def __call__(self, shape: ShapeLike, dtype: DTypeLike = None) -> torch.Tensor:
        return torch.ones(_shape(shape), dtype=_dtype(dtype))


@_REGISTRY.register("constant")
class Constant(Initializer):
    """Fill with ``value``, cast to ``dtype``.

    Args:
        value: A finite real scalar. (Keras cannot resolve the bare name
            ``"constant"``; here it means ``Constant(0.0)``.)
    """

    def __init__(self, value: float = 0.0) -> None:
        self.value = check_real(value, "value")

    def __call__(self, shape: ShapeLike, dtype: DTypeLike = None) -> torch.Tensor:
        return torch.full(_shape(shape), self.value, dtype=torch.float64).to(_dtype(dtype))

    def get_config(self) -> dict[str, Any]:
        return {"value": self.value}


# -- random initializers --------------------------------------------------------


def _normal(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None, mean: float, stddev: float
) -> torch.Tensor:
    """``mean + stddev * z`` with ``z ~ N(0, 1)``."""
    return mean + stddev * torch.randn(shape, generator=generator, dtype=dtype)


def _truncated_normal(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None, mean: float, stddev: float
) -> torch.Tensor:
    """``mean + stddev * z`` with ``z ~ N(0, 1)`` conditioned on ``|z| <= 2``.

    Sampled by inverting the CDF: ``z = sqrt(2) * erfinv(v)`` with
    ``v ~ U(-erf(sqrt(2)), erf(sqrt(2)))``, so every value lies within two
    standard deviations of the mean. (Keras's torch backend takes the first of
    four normal draws inside the bounds, and keeps an out-of-bounds value when
    all four miss, with probability about 4e-6 per element.)
    """
    edge = math.erf(math.sqrt(2.0))
    v = (2.0 * torch.rand(shape, generator=generator, dtype=dtype) - 1.0) * edge
    z = (math.sqrt(2.0) * torch.erfinv(v)).clamp_(-2.0, 2.0)
    return mean + stddev * z


def _uniform(
    shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None, minval: float, maxval: float
) -> torch.Tensor:
    """``minval + (maxval - minval) * u`` with ``u ~ U[0, 1)``."""
    return minval + (maxval - minval) * torch.rand(shape, generator=generator, dtype=dtype)


class _RandomInitializer(Initializer):
    """Common part of the random initializers: the seed and the dtype handling."""

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None:
            seed = check_int(seed, "seed")
            if not -(2**63) <= seed < 2**64:
                raise ValueError(f"Invalid value for argument seed: out of range, seed={seed}")
        self.seed = seed

    def __call__(self, shape: ShapeLike, dtype: DTypeLike = None) -> torch.Tensor:
        out = _dtype(dtype, floating=True)
        work = torch.float64 if out == torch.float64 else torch.float32
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        return self._sample(_shape(shape), work, generator).to(out)

    def _sample(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


class _MeanStdInitializer(_RandomInitializer):
    """Common part of :class:`RandomNormal` and :class:`TruncatedNormal`.

    Args:
        mean: Mean of the normal distribution.
        stddev: Its standard deviation, ``>= 0``.
        seed: ``int`` for reproducible draws, ``None`` for torch's global RNG.
    """

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        self.mean = check_real(mean, "mean")
        self.stddev = check_real(stddev, "stddev", minimum=0.0)
        super().__init__(seed)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


@_REGISTRY.register("random_normal", "normal")
class RandomNormal(_MeanStdInitializer):
    """Normal distribution: ``x ~ N(mean, stddev**2)``. Arguments: ``mean=0.0, stddev=0.05, seed=None``."""

    def _sample(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        return _normal(shape, dtype, generator, self.mean, self.stddev)


@_REGISTRY.register("truncated_normal")
class TruncatedNormal(_MeanStdInitializer):
    """Normal ``N(mean, stddev**2)`` truncated to ``|x - mean| <= 2 * stddev``.

    The result's standard deviation is ``0.8796... * stddev``.
    Arguments: ``mean=0.0, stddev=0.05, seed=None``.
    """

    def _sample(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        return _truncated_normal(shape, dtype, generator, self.mean, self.stddev)


@_REGISTRY.register("random_uniform", "uniform")
class RandomUniform(_RandomInitializer):
    """Uniform distribution on ``[minval, maxval)``.

    Args:
        minval: Lower bound (inclusive).
        maxval: Upper bound (exclusive), ``>= minval``.
        seed: ``int`` for reproducible draws, ``None`` for torch's global RNG.
    """

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None) -> None:
        self.minval = check_real(minval, "minval")
        self.maxval = check_real(maxval, "maxval", minimum=self.minval)
        super().__init__(seed)

    def _sample(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        return _uniform(shape, dtype, generator, self.minval, self.maxval)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


def compute_fans(
    shape: ShapeLike, input_axes: Sequence[int] | None = None, output_axes: Sequence[int] | None = None
) -> tuple[int, int]:
    """Return ``(fan_in, fan_out)`` for a weight shape, as Keras computes them.

    With both ``input_axes`` and ``output_axes`` given, each fan is the product
    of the sizes on those axes. Otherwise: ``()`` gives ``(1, 1)``; ``(C,)``
    gives ``(C, C)``; ``(a, b)`` gives ``(a, b)``; a convolution kernel
    ``(*spatial, c_in, c_out)`` gives ``(c_in * r, c_out * r)`` with
    ``r = prod(spatial)``.
    """
    dims = _shape(shape)
    if input_axes is not None and output_axes is not None:
        return math.prod(dims[a] for a in input_axes), math.prod(dims[a] for a in output_axes)
    if len(dims) == 0:
        return 1, 1
    if len(dims) == 1:
        return dims[0], dims[0]
    receptive = math.prod(dims[:-2])
    return dims[-2] * receptive, dims[-1] * receptive


_MODES = ("fan_in", "fan_out", "fan_avg")
_DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")


def _axes(axes: Sequence[int] | None, name: str) -> list[int] | None:
    """Check an optional list of axes; returned as a list of ints."""
    if axes is None:
        return None
    if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence):
        raise TypeError(f"Invalid value for argument {name}: expected a list of ints, received {name}={axes!r}")
    return [check_int(a, name) for a in axes]


@_REGISTRY.register("variance_scaling")
class VarianceScaling(_RandomInitializer):
    """Distribution whose variance is ``scale / n``, ``n`` taken from the fans.

    ``n`` is ``max(1, fan_in)``, ``max(1, fan_out)`` or
    ``max(1, (fan_in + fan_out) / 2)`` for ``mode`` ``"fan_in"``, ``"fan_out"``,
    ``"fan_avg"`` (fans from :func:`compute_fans`). Then, by ``distribution``:

    - ``"truncated_normal"`` (or ``"normal"``): ``N(0, s**2)`` truncated at
      ``2 s``, with ``s = sqrt(scale / n) / 0.87962566103423978`` so that the
      result's standard deviation is ``sqrt(scale / n)``;
    - ``"untruncated_normal"``: ``N(0, scale / n)``;
    - ``"uniform"``: ``U(-limit, limit)`` with ``limit = sqrt(3 * scale / n)``.

    Args:
        scale: Positive scaling factor.
        mode: ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"``.
        distribution: One of the above (case-insensitive).
        seed: ``int`` for reproducible draws, ``None`` for torch's global RNG.
        input_axes, output_axes: Optional axes whose sizes multiply into
            ``fan_in`` / ``fan_out`` (used only when both are given), as Keras 3.15.
    """

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        self.scale = check_real(scale, "scale", minimum=0.0, strict_minimum=True)
        if mode not in _MODES:
            raise ValueError(f"Invalid value for argument mode: expected one of {_MODES}, received mode={mode!r}")
        normalized = distribution.lower() if isinstance(distribution, str) else distribution
        normalized = "truncated_normal" if normalized == "normal" else normalized
        if normalized not in _DISTRIBUTIONS:
            raise ValueError(
                f"Invalid value for argument distribution: expected one of "
                f"{_DISTRIBUTIONS}, received distribution={distribution!r}"
            )
        self.mode = mode
        self.distribution = normalized
        self.input_axes = _axes(input_axes, "input_axes")
        self.output_axes = _axes(output_axes, "output_axes")
        super().__init__(seed)

    def _sample(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        fan_in, fan_out = compute_fans(shape, self.input_axes, self.output_axes)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}
        variance = self.scale / max(1.0, fan[self.mode])
        if self.distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return _uniform(shape, dtype, generator, -limit, limit)
        if self.distribution == "untruncated_normal":
            return _normal(shape, dtype, generator, 0.0, math.sqrt(variance))
        return _truncated_normal(shape, dtype, generator, 0.0, math.sqrt(variance) / _TRUNCATED_STD)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution,
            "input_axes": self.input_axes,
            "output_axes": self.output_axes,
        }


class _VarianceScalingPreset(VarianceScaling):
    """A :class:`VarianceScaling` with fixed ``(scale, mode, distribution)``."""

    _preset: ClassVar[tuple[float, str, str]]

    def __init__(
        self, seed: int | None = None, input_axes: Sequence[int] | None = None, output_axes: Sequence[int] | None = None
    ) -> None:
        scale, mode, distribution = self._preset
        super().__init__(scale, mode, distribution, seed, input_axes, output_axes)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed, "input_axes": self.input_axes, "output_axes": self.output_axes}


def _preset(
    name: str, keras_name: str, scale: float, mode: str, distribution: str, doc: str
) -> type[_VarianceScalingPreset]:
    """Make and register the subclass ``name`` (Keras also calls it ``keras_name``) of
    :class:`_VarianceScalingPreset` with ``(scale, mode, distribution)``."""
    namespace = {"__doc__": doc, "__module__": __name__, "_preset": (scale, mode, distribution)}
    return _REGISTRY.register(keras_name)(type(name, (_VarianceScalingPreset,), namespace))


# Keras's presets of VarianceScaling, a class each: name -> (Keras name, scale, mode, distribution)
# and name -> docstring. The classes are bound below in this order.
_PRESETS = {
    "GlorotUniform": ("glorot_uniform", 1.0, "fan_avg", "uniform"),
    "GlorotNormal": ("glorot_normal", 1.0, "fan_avg", "truncated_normal"),
    "HeNormal": ("he_normal", 2.0, "fan_in", "truncated_normal"),
    "HeUniform": ("he_uniform", 2.0, "fan_in", "uniform"),
    "LecunNormal": ("lecun_normal", 1.0, "fan_in", "truncated_normal"),
    "LecunUniform": ("lecun_uniform", 1.0, "fan_in", "uniform"),
}
_PRESET_DOCS = {
    "GlorotUniform": "Glorot (Xavier) uniform: ``U(-limit, limit)``, ``limit = sqrt(6 / (fan_in + fan_out))``.",
    "GlorotNormal": "Glorot (Xavier) normal: truncated normal with std ``sqrt(2 / (fan_in + fan_out))``.",
    "HeNormal": "He normal: truncated normal with std ``sqrt(2 / fan_in)``.",
    "HeUniform": "He uniform: ``U(-limit, limit)``, ``limit = sqrt(6 / fan_in)``.",
    "LecunNormal": "LeCun normal: truncated normal with std ``sqrt(1 / fan_in)``.",
    "LecunUniform": "LeCun uniform: ``U(-limit, limit)``, ``limit = sqrt(3 / fan_in)``.",
}
GlorotUniform, GlorotNormal, HeNormal, HeUniform, LecunNormal, LecunUniform = (
    _preset(name, *row, _PRESET_DOCS[name]) for name, row in _PRESETS.items()
)


# -- identifiers ----------------------------------------------------------------


def get(identifier: InitializerLike, *, argument: str | None = None) -> Callable[..., torch.Tensor]:
    """Resolve an initializer identifier.

    Args:
        identifier: A Keras name (``"zeros"``, ``"GlorotUniform"``, ...), a Keras
            serialized dict (``{"class_name": ..., "config": {...}, ...}``; its
            ``module``, if present, must be ``"keras.initializers"``), an
            :class:`Initializer` (returned as is), a class (instantiated with no
            arguments) or any callable ``(shape, dtype=None)`` (returned as is).
            ``None`` is rejected: an initializer is always needed.
        argument: Name of the argument being resolved, for error messages.

    Raises:
        TypeError: ``None`` or a type that cannot be an initializer.
        ValueError: An unknown name or ``class_name``, or a dict that names a
            module or a registered custom object (nothing is ever imported).
    """
    return _REGISTRY.get(identifier, argument=argument)


def serialize(initializer: Callable[..., torch.Tensor] | None) -> dict[str, Any] | None:
    """Serialize an initializer to Keras 3's dict format.

    A built-in gives exactly Keras's dict, e.g.
    ``{"module": "keras.initializers", "class_name": "Zeros", "config": {},
    "registered_name": None}``; ``None`` gives ``None``. Any other callable gives
    ``{"module": None, "class_name": q, "config": c, "registered_name": q}``
    with ``q`` its qualified name and ``c`` its ``get_config()`` (or ``{}``):
    a record only, which :func:`get` refuses to load, since it imports nothing.
    """
    return _REGISTRY.serialize(initializer)
