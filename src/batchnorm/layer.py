"""The Keras ``BatchNormalization`` layer as a PyTorch module."""

from __future__ import annotations

import itertools
import numbers
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from . import constraints, distributed, functional, initializers, regularizers

__all__ = ["BatchNormalization"]

_KERAS_NAME = "batch_normalization"
_name_counter = itertools.count()

# Keras dtype-policy names and the dtype of the weights they give (mixed policies keep float32
# weights, as Keras does).
_POLICY_WEIGHT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "mixed_float16": torch.float32,
    "mixed_bfloat16": torch.float32,
}
_POLICY_CLASSES = ("DTypePolicy", "FloatDTypePolicy")
_TORCH_DTYPE_NAMES = {dtype: name for name, dtype in _POLICY_WEIGHT_DTYPES.items() if "mixed" not in name}

# The bounds that batch renormalization's ``renorm_clipping`` may give (Keras's keys).
_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# Batch renormalization's buffers, in Keras's order of creation (after moving_variance).
_RENORM_BUFFERS = ("moving_stddev", "renorm_mean", "renorm_stddev")


class _UninitializedBuffer(UninitializedBuffer):
    """torch's ``UninitializedBuffer`` that ``copy.deepcopy`` copies (torch's own raises, unlike
    its ``UninitializedParameter``), so that an unbuilt layer deep-copies as an unbuilt layer."""

    def __deepcopy__(self, memo: dict) -> _UninitializedBuffer:
        if id(self) not in memo:
            memo[id(self)] = type(self)(self.requires_grad, self.data.device, self.data.dtype)
        return memo[id(self)]


def _check_type(name: str, value: Any, kind: type | tuple, description: str) -> None:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise TypeError(f"{name} must be {description}, received {name}={value!r}")


def _check_arguments(
    axis: Any,
    momentum: Any,
    epsilon: Any,
    name: Any,
    process_group: Any,
    renorm_clipping: Any,
    renorm_momentum: Any,
    virtual_batch_size: Any,
    **flags: Any,
) -> None:
    """The constructor's checks of its plain arguments, in the order their errors are reported.

    ``flags`` are the bool arguments by name (``center``, ``scale``, ...). The initializers,
    regularizers, constraints, dtype and device are checked by their own resolution.
    """
    _check_axis(axis)
    _check_fraction("momentum", momentum)
    _check_type("epsilon", epsilon, numbers.Real, "a real number")
    if not 0.0 < epsilon < float("inf"):
        raise ValueError(f"epsilon must be a positive finite number, received epsilon={epsilon!r}")
    for flag_name, flag in flags.items():
        _check_type(flag_name, flag, bool, "a bool")
    _check_clipping(renorm_clipping)
    _check_fraction("renorm_momentum", renorm_momentum)
    if virtual_batch_size is not None:
        _check_type("virtual_batch_size", virtual_batch_size, numbers.Integral, "None or an int")
        if virtual_batch_size <= 0:
            raise ValueError(f"virtual_batch_size must be positive, received virtual_batch_size={virtual_batch_size!r}")
        if 0 in ((axis,) if isinstance(axis, numbers.Integral) else axis):
            raise ValueError(
                f"virtual_batch_size splits the batch axis, which must not be normalized: received axis={axis!r}"
            )
    if name is not None:
        _check_type("name", name, str, "a str")
    _check_process_group(process_group)


def _check_axis(axis: Any) -> None:
    """An int, or a non-empty list or tuple of distinct ints (several channel axes, as tf-keras)."""
    if isinstance(axis, (list, tuple)):
        if any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in axis):
            raise TypeError(f"axis must be an int or a non-empty list/tuple of ints, received axis={axis!r}")
        if not axis:
            raise ValueError(f"axis must name at least one axis, received axis={axis!r}")
        if len(set(axis)) < len(axis):
            raise ValueError(f"axis must not name an axis twice, received axis={axis!r}")
        return
    _check_type("axis", axis, numbers.Integral, "an int or a non-empty list/tuple of ints")


def _check_fraction(name: str, value: Any) -> None:
    _check_type(name, value, numbers.Real, "a real number")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], received {name}={value!r}")


def _check_clipping(clipping: Any) -> None:
    """``None`` or a dict of the bounds ``rmax``, ``rmin``, ``dmax``: real numbers, ``rmax >= rmin``, ``dmax >= 0``."""
    if clipping is None:
        return
    if not isinstance(clipping, dict):
        raise TypeError(f"renorm_clipping must be None or a dict, received renorm_clipping={clipping!r}")
    unknown = sorted(set(clipping) - set(_CLIPPING_KEYS), key=str)
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown keys {unknown}: the keys are {list(_CLIPPING_KEYS)}, "
            f"received renorm_clipping={clipping!r}"
        )
    for key, value in clipping.items():
        if value is not None:  # None: no bound (as Keras)
            _check_type(f"renorm_clipping[{key!r}]", value, numbers.Real, "a real number")
            if value != value:
                raise ValueError(f"renorm_clipping[{key!r}] must not be NaN")
    rmax, rmin, dmax = (clipping.get(key) for key in _CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(f"renorm_clipping needs rmax >= rmin, received rmax={rmax!r}, rmin={rmin!r}")
    if dmax is not None and dmax < 0:
        raise ValueError(f"renorm_clipping needs dmax >= 0, received dmax={dmax!r}")


def _python_number(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds; anything else as it is."""
    return value.item() if isinstance(value, numbers.Number) and hasattr(value, "item") else value


def _check_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be None or a torch.device or device string, received device={device!r}"
        ) from error


def _check_process_group(process_group: Any) -> None:
    if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            "process_group must be None or a torch.distributed.ProcessGroup (e.g. from "
            f"torch.distributed.new_group), received process_group={process_group!r}"
        )


def _check_training(training: Any) -> None:
    if training is None or isinstance(training, bool):
        return
    if isinstance(training, Tensor):
        raise TypeError(
            f"training must be None or a bool, received a tensor of shape {tuple(training.shape)}: "
            "a mask goes by keyword, layer(inputs, mask=mask)"
        )
    raise TypeError(f"training must be None or a bool, received training={training!r}")


def _loading_strictly() -> bool:
    """The ``strict`` of the ``nn.Module.load_state_dict`` call under way (True if none is found).

    PyTorch passes ``strict=True`` down to every ``_load_from_state_dict`` whatever the caller
    asked, and applies the caller's flag only to the keys reported afterwards; the layer needs
    the caller's own to load the present keys under ``strict=False``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is nn.Module.load_state_dict.__code__:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return True


def _resolve_dtype(dtype: Any) -> tuple[str, torch.dtype]:
    """Policy name and weight dtype from ``None``, a torch dtype, a name or a Keras DTypePolicy dict."""
    if dtype is None:
        return "float32", torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPE_NAMES:
            raise ValueError(f"dtype must be a floating dtype, received dtype={dtype!r}")
        return _TORCH_DTYPE_NAMES[dtype], dtype
    name = dtype
    if isinstance(dtype, dict):
        # FloatDTypePolicy: Keras 3.4-3.5's name of the class, which Keras 3.15 still reads
        name = dtype.get("config", {}).get("name") if dtype.get("class_name") in _POLICY_CLASSES else None
    if isinstance(name, str) and name in _POLICY_WEIGHT_DTYPES:
        return name, _POLICY_WEIGHT_DTYPES[name]
    raise ValueError(
        f"dtype must be None, a floating torch.dtype, one of {sorted(_POLICY_WEIGHT_DTYPES)} "
        f"or a Keras DTypePolicy dict, received dtype={dtype!r}"
    )


def _register_unbuilt_weights(
    layer: nn.Module,
    *,
    scale: bool,
    center: bool,
    renorm: bool,
    trainable: bool,
    device: torch.device | None,
    dtype: torch.dtype,
) -> None:
    """Register ``gamma`` (if ``scale``), ``beta`` (if ``center``), the moving statistics and, if
    ``renorm``, batch renormalization's three statistics on ``layer``, uninitialized until the build.

    As in torch's lazy modules: an optimizer, a deepcopy or a state_dict taken now holds the very
    objects that are later materialized and trained, and .to()/.double()/.half() or a torch.device
    context before the build decide their placement.
    """
    factory = {"device": device, "dtype": dtype}
    layer.register_parameter("gamma", UninitializedParameter(requires_grad=trainable, **factory) if scale else None)
    layer.register_parameter("beta", UninitializedParameter(requires_grad=trainable, **factory) if center else None)
    layer.register_buffer("moving_mean", _UninitializedBuffer(**factory))
    layer.register_buffer("moving_variance", _UninitializedBuffer(**factory))
    for name in _RENORM_BUFFERS if renorm else ():
        layer.register_buffer(name, _UninitializedBuffer(**factory))


def _flat(weight: Tensor | None) -> Tensor | None:
    """A weight of several channel axes as the one channel dimension of the channel view (a view)."""
    return weight if weight is None or weight.dim() == 1 else weight.view(-1)


def _over_ghosts(ghosts: int, *weights: Tensor | None) -> tuple[Tensor | None, ...]:
    """Per-channel weights repeated for each of ``ghosts`` ghost batches (ghost-major, as
    :func:`functional.ghost_batches` lays the channels out); differentiable."""
    if ghosts == 1:
        return weights
    return tuple(None if w is None else w.repeat(ghosts) for w in weights)


class BatchNormalization(LazyModuleMixin, nn.Module):
    r"""Keras's ``BatchNormalization`` layer, natively in PyTorch.

    Normalizes its input per channel (the entries along ``axis``). With :math:`R` every axis but
    ``axis``:

    * **training** (``training and trainable``): batch statistics
      :math:`\mu = \operatorname{mean}_R(x)`, :math:`\sigma^2 = \operatorname{mean}_R((x-\mu)^2)`
      (biased) and :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`; then, in place
      and without gradient, ``moving_mean = moving_mean * momentum + mu * (1 - momentum)`` and
      likewise ``moving_variance`` with the biased :math:`\sigma^2`;
    * **inference** (otherwise): the same formula with ``moving_mean``/``moving_variance``; no
      buffer is written.

    ``training=None`` follows ``module.training`` (``model.train()``/``model.eval()`` play the part
    of Keras's ``fit``/``predict``); ``trainable=False`` forces inference whatever ``training`` says
    (Keras's fine-tuning rule) and freezes ``gamma``/``beta``.

    A ``mask`` (the input's shape without ``axis``, size-1 dimensions broadcast, non-zero = True)
    restricts the batch statistics to the masked-in positions; every position is still normalized.

    Batch renormalization (``renorm=True``, as Keras 3.15): with :math:`s = \sqrt{\sigma^2 +
    \epsilon}` and the renorm statistics before this call's update,
    :math:`r = \operatorname{clip}(s / \max(\text{renorm\_stddev}, \sqrt\epsilon))` and
    :math:`d = \operatorname{clip}((\mu - \text{renorm\_mean}) / \max(\ldots))`, constants for
    the gradients, give :math:`y = ((x - \mu) / s \cdot r + d)\,\gamma + \beta`; five buffers
    move per call (``docs/behaviour.md`` section 12). Ghost batches (``virtual_batch_size``, as
    tf-keras) normalize strided sub-batches with their own statistics and update the moving ones
    once per call from their means. Several channel axes (``axis=(1, 3)``) give weights shaped
    ``(input_shape[1], input_shape[3])``.

    Beyond Keras, deliberately: the variance is computed stably (never ``E[x^2] - E[x]^2``); a
    training call with no element to take statistics from (empty batch, all-False mask) normalizes
    with the moving statistics and leaves them untouched; a channel whose batch statistics are not
    finite keeps its moving statistics; masks work on any axis; 16-bit inputs compute in float32
    and return their own dtype. See the README's table of differences.

    Args:
        axis: the channel axis (negative counts from the end). Keras's default, ``-1``, is
            channels-last; use ``1`` for PyTorch's ``(N, C, ...)`` layout. A list or tuple of
            distinct axes normalizes per index tuple on all of them (tf-keras).
        momentum: fraction of the old moving value kept at each update (Keras convention: torch's
            ``BatchNorm*d(momentum=m)`` corresponds to ``1 - m``). ``0 <= momentum <= 1``.
        epsilon: added to the variance before the square root; ``> 0``.
        center, scale: whether to learn ``beta`` / ``gamma``.
        beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer:
            Keras names, Keras config dicts, :mod:`batchnorm.initializers` objects or callables
            ``(shape, dtype) -> tensor``.
        beta_regularizer, gamma_regularizer: ``None`` or as above from
            :mod:`batchnorm.regularizers` (penalties in :attr:`losses`).
        beta_constraint, gamma_constraint: ``None`` or as above from :mod:`batchnorm.constraints`
            (applied by :meth:`apply_constraints`).
        renorm: batch renormalization (adds ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``).
        renorm_clipping: ``None`` or a dict of bounds ``rmax``, ``rmin`` (for ``r``) and ``dmax``
            (for ``|d|``); absent bounds clip nothing. ``rmax >= rmin``, ``dmax >= 0``.
        renorm_momentum: as ``momentum``, for ``renorm_mean`` and ``renorm_stddev``.
        synchronized: use the statistics of the whole ``torch.distributed`` group in training
            (see :mod:`batchnorm.distributed`); local statistics when ``torch.distributed`` is
            not initialized or the group has one process.
        virtual_batch_size: ``None`` or the size of the ghost batches, which must divide the
            batch size of every training call; ``axis`` must not include the batch axis 0.
        name: Keras's layer name (unique default ``batch_normalization[_N]``).
        trainable: see above.
        dtype: dtype of the weights and moving statistics: a floating ``torch.dtype``, a Keras
            dtype-policy name or dict (``mixed_*`` policies mean float32). Default float32.
        device: where weights are created by :meth:`build` or by the lazy build of the first
            call (which otherwise uses the input's device). Until then they are PyTorch's
            uninitialized parameters and buffers, as in ``torch.nn.LazyBatchNorm*d``: optimizers,
            ``state_dict``, ``deepcopy`` and ``.to()``/``.double()`` work on an unbuilt layer.
        process_group: the ``torch.distributed`` group that synchronizes (default: all ranks).

    Example::

        >>> bn = BatchNormalization()                    # channels-last, Keras defaults
        >>> x = torch.randn(8, 10, 16) * 3 + 5
        >>> y = bn(x, training=True)                     # builds: gamma, beta, moving stats of (16,)
        >>> bool(y.mean((0, 1)).abs().max() < 1e-5)
        True
        >>> bn.moving_mean.shape
        torch.Size([16])
    """

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: dict[str, float] | None = None,
        renorm_momentum: float = 0.99,
        synchronized: bool = False,
        *,
        virtual_batch_size: int | None = None,
        name: str | None = None,
        trainable: bool = True,
        dtype: Any = None,
        device: torch.device | str | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        _check_arguments(
            axis,
            momentum,
            epsilon,
            name,
            process_group,
            renorm_clipping,
            renorm_momentum,
            virtual_batch_size,
            center=center,
            scale=scale,
            renorm=renorm,
            synchronized=synchronized,
            trainable=trainable,
        )
        # As given (NumPy integers become ints): an int, or a list or tuple of them.
        self.axis = int(axis) if isinstance(axis, numbers.Integral) else type(axis)(map(int, axis))
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self.center, self.scale, self.synchronized = center, scale, synchronized
        # Kept as Keras keeps them, for its configs: renorm_momentum and the bounds as given (NumPy
        # numbers as Python's, for JSON), and {} for no clipping under renorm.
        self.renorm, self.renorm_momentum = renorm, _python_number(renorm_momentum)
        if renorm_clipping is not None:
            self.renorm_clipping = {key: _python_number(bound) for key, bound in renorm_clipping.items()}
        else:
            self.renorm_clipping = {} if renorm else None
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)
        self.process_group = process_group
        self.beta_initializer = initializers.get(beta_initializer, argument="beta_initializer")
        self.gamma_initializer = initializers.get(gamma_initializer, argument="gamma_initializer")
        self.moving_mean_initializer = initializers.get(moving_mean_initializer, argument="moving_mean_initializer")
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer, argument="moving_variance_initializer"
        )
        self.beta_regularizer = regularizers.get(beta_regularizer, argument="beta_regularizer")
        self.gamma_regularizer = regularizers.get(gamma_regularizer, argument="gamma_regularizer")
        self.beta_constraint = constraints.get(beta_constraint, argument="beta_constraint")
        self.gamma_constraint = constraints.get(gamma_constraint, argument="gamma_constraint")
        self.name = name if name is not None else self._unique_name()
        self._dtype_policy, weight_dtype = _resolve_dtype(dtype)
        self._device = _check_device(device)
        self._trainable = trainable
        self._built_shape: tuple | None = None  # fixes the rank: set by build() or the first call
        _register_unbuilt_weights(
            self,
            scale=scale,
            center=center,
            renorm=renorm,
            trainable=trainable,
            device=self._device,
            dtype=weight_dtype,
        )

    @staticmethod
    def _unique_name() -> str:
        index = next(_name_counter)
        return _KERAS_NAME if index == 0 else f"{_KERAS_NAME}_{index}"

    # ----------------------------------------------------------------------------------- build

    @property
    def built(self) -> bool:
        """Whether the weights exist (after :meth:`build`, the first call or ``load_state_dict``)."""
        return not is_lazy(self.moving_variance)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the weights and moving statistics (``dtype=``, or as moved by ``.to()``)."""
        return self.moving_variance.dtype

    def _weights(self) -> dict[str, Callable]:
        """The names of this layer's weights in Keras's creation order, each with its initializer."""
        pairs = (
            ("gamma", self.gamma_initializer),
            ("beta", self.beta_initializer),
            ("moving_mean", self.moving_mean_initializer),
            ("moving_variance", self.moving_variance_initializer),
            ("moving_stddev", self._stddev_initializer),
            ("renorm_mean", self.moving_mean_initializer),
            ("renorm_stddev", self._stddev_initializer),
        )
        return {name: initializer for name, initializer in pairs if getattr(self, name, None) is not None}

    def _stddev_initializer(self, shape: tuple, dtype: torch.dtype) -> Tensor:
        """Renorm's standard deviations start as the square root of the moving variance's start (as Keras)."""
        return torch.as_tensor(self.moving_variance_initializer(shape, dtype=dtype)).sqrt()

    def _channel_axes(self, input_shape: tuple) -> tuple[int, ...]:
        """``axis`` as sorted non-negative indices into ``input_shape``; ``ValueError`` if out of range,
        if two name the same axis, or if one is the batch axis that ghost batches split."""
        rank = len(input_shape)
        given = (self.axis,) if isinstance(self.axis, int) else self.axis
        if not all(-rank <= a < rank for a in given):
            raise ValueError(
                f"axis={self.axis} is out of range for inputs of shape {tuple(input_shape)} "
                f"(rank {rank}): expected {-rank} <= axis < {rank}"
            )
        axes = (given[0] % rank,) if len(given) == 1 else tuple(sorted(a % rank for a in given))
        if len(set(axes)) < len(axes):
            raise ValueError(f"axis={self.axis} names an axis twice for inputs of rank {rank} (axes {axes})")
        if self.virtual_batch_size is not None and axes[0] == 0:
            raise ValueError(
                f"virtual_batch_size splits the batch axis, which must not be normalized: axis={self.axis} "
                f"is axis 0 of inputs of shape {tuple(input_shape)}"
            )
        return axes

    def build(self, input_shape) -> None:
        """Create the weights (``gamma``, ``beta``, the moving statistics, ...) for ``input_shape``.

        Fixes the rank and the weights' shape, the sizes on the channel axes (``(C,)`` for one,
        ``C = input_shape[axis]``). The weights are the uninitialized ones materialized in place,
        where they are (``device=``, a ``torch.device`` context at construction, or a later
        ``.to()``; default CPU) and in their dtype. On a built layer it checks ``input_shape``
        against the weights (and the rank, once fixed): ``ValueError`` where they differ.
        """
        input_shape = tuple(input_shape)
        channels = tuple(input_shape[a] for a in self._channel_axes(input_shape))
        if not all(isinstance(size, int) and size >= 0 for size in channels):
            raise ValueError(
                f"the channel dimensions must be known to build, received input_shape={input_shape} "
                f"with axis={self.axis}"
            )
        built_rank = None if self._built_shape is None else len(self._built_shape)
        if self.built and (channels != tuple(self.moving_variance.shape) or built_rank not in (None, len(input_shape))):
            raise ValueError(
                f"this layer is built for channel sizes {tuple(self.moving_variance.shape)}"
                + ("" if built_rank is None else f" and rank {built_rank}")
                + f", received input_shape={input_shape} with axis={self.axis}"
            )
        self._materialize(channels)
        if self._built_shape is None:  # the first shape fixes the rank; later ones only checked
            self._built_shape = input_shape
        self._retire_lazy_hooks()

    def initialize_parameters(self, inputs: Tensor, training: bool | None = None, mask: Tensor | None = None) -> None:
        """The lazy build of the first call (run by torch's lazy-module hook before :meth:`forward`).

        Validates the call first, so that a call that raises builds nothing. A layer never placed
        (no ``device=``, no ``.to(device)``, no device context) builds on its input's device.
        """
        axes, mask = self._check_call(inputs, training, mask)
        if self._built_shape is None:
            if not self.built:
                placed = self._device is not None or self.moving_variance.device.type != "cpu"
                self._materialize(tuple(inputs.shape[a] for a in axes), None if placed else inputs.device)
            self._built_shape = tuple(inputs.shape)

    def _share_weights(self, **weights: Tensor) -> None:
        """Take ``weights`` (by name: ``gamma``, ``moving_mean``, ...) as this unbuilt layer's own,
        shared rather than copied, as ``SyncBatchNorm.convert_sync_batchnorm`` shares torch's (an
        optimizer made before the conversion keeps training them). The layer is then built; its
        rank is fixed by :meth:`build` or the first call."""
        for name, weight in weights.items():
            setattr(self, name, weight)
        self._retire_lazy_hooks()

    def _retire_lazy_hooks(self) -> None:
        """Remove torch's lazy-module hooks once built by :meth:`build` or ``load_state_dict``.

        Their first-call build has nothing left to do (the call fixes the rank in :meth:`forward`),
        and their removal at a first call made from several threads at once would race.
        """
        if hasattr(self, "_initialize_hook"):
            self._initialize_hook.remove()
            self._load_hook.remove()
            del self._initialize_hook, self._load_hook

    def _materialize(self, shape: tuple[int, ...], device: torch.device | None = None) -> None:
        if self.built:
            return
        for name in self._weights():
            getattr(self, name).materialize(shape, device=device)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialize ``gamma``, ``beta`` and the moving statistics with their initializers.

        Nothing to do before the build. With meta-device initialization: ``build()`` under
        ``torch.device("meta")``, then ``to_empty(device=...)`` and ``reset_parameters()``.
        """
        if not self.built:
            return
        for name, initializer in self._weights().items():
            weight = getattr(self, name)
            weight.copy_(torch.as_tensor(initializer(tuple(weight.shape), dtype=weight.dtype)))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Checked before anything is written: nn.Module would copy the well-shaped entries before
        # reporting the others. An unbuilt layer is built from the checkpoint's channel count (its
        # rank is then fixed by the first call); an unbuilt layer's checkpoint loads into an
        # unbuilt layer only. strict=True loads all or nothing; strict=False the keys present.
        names = list(self._weights())
        saved = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
        unbuilt = [name for name, t in saved.items() if is_lazy(t)]
        rank = 1 if isinstance(self.axis, int) else len(self.axis)  # one dimension per channel axis
        problems = [
            f"{prefix}{name} has shape {tuple(t.shape)}, expected {rank} dimension{'s' * (rank > 1)}"
            for name, t in saved.items()
            if name not in unbuilt and t.dim() != rank
        ]
        if unbuilt and (self.built or len(unbuilt) < len(saved)):
            problems.append(
                f"{', '.join(prefix + name for name in unbuilt)}: uninitialized in the checkpoint (saved "
                "before its layer was built), which loads only into an unbuilt layer with no other weights"
            )
        if not problems and saved and not unbuilt:
            reference = self.moving_variance if self.built else saved.get("moving_variance", next(iter(saved.values())))
            expected = tuple(reference.shape)
            problems = [
                f"size mismatch for {prefix}{name}: copying a tensor of shape {tuple(t.shape)} from the "
                f"checkpoint, the shape in the layer is {expected}"
                for name, t in saved.items()
                if tuple(t.shape) != expected
            ]
        missing = [prefix + name for name in names if name not in saved]
        # Keys of this layer that it does not have (e.g. renorm's from a renorm=True layer)
        unexpected = [key for key in state_dict if key.startswith(prefix) and key[len(prefix) :] not in names]
        if problems or ((missing or unexpected) and _loading_strictly()):
            error_msgs.extend(problems)
            missing_keys.extend(missing)
            unexpected_keys.extend(unexpected)
            return
        if unbuilt:  # nothing to copy: both are unbuilt
            missing_keys.extend(missing)
            return
        if saved:
            self._materialize(expected)
            self._retire_lazy_hooks()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------------------- trainable

    @property
    def trainable(self) -> bool:
        """False freezes ``gamma``/``beta`` and puts the layer in inference mode (as Keras).

        Independent of ``train()``/``eval()``: ``model.train()`` does not unfreeze a frozen layer.
        """
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        _check_type("trainable", value, bool, "a bool")
        self._trainable = value
        for parameter in (self.gamma, self.beta):
            if parameter is not None:
                parameter.requires_grad = value  # an attribute: an uninitialized one takes it too

    # ------------------------------------------------------------------------------------ call

    def _check_call(self, inputs: Tensor, training: Any, mask: Any) -> tuple[tuple[int, ...], Tensor | None]:
        """Validate a call before anything is built or written; return the channel axes and the mask."""
        _check_training(training)
        if inputs.is_complex():
            raise TypeError(f"inputs must be real, received dtype={inputs.dtype}")
        shape = inputs.shape
        if self._built_shape is not None and len(shape) != len(self._built_shape):
            self._raise_shape_mismatch(inputs)
        axes = self._channel_axes(shape)
        # A rank fixed means built (and asks nothing that torch.compile cannot trace).
        if (self._built_shape is not None or self.built) and [shape[a] for a in axes] != list(
            self.moving_variance.shape
        ):
            self._raise_shape_mismatch(inputs)
        if mask is not None:
            if not isinstance(mask, Tensor):
                mask = torch.as_tensor(mask, device=inputs.device)
            functional.check_mask(mask, shape, axes)
        ghost = self.virtual_batch_size
        if ghost is not None and self._uses_batch_statistics(training) and shape[0] % ghost:
            raise ValueError(
                f"virtual_batch_size={ghost} must divide the batch size of a training call, "
                f"received inputs of shape {tuple(shape)} (batch size {shape[0]})"
            )
        return axes, mask

    def _raise_shape_mismatch(self, inputs: Tensor) -> None:
        channels = tuple(self.moving_variance.shape)
        built_shape = self._built_shape
        built_for = f"shape {built_shape} (rank {len(built_shape)})" if built_shape is not None else "any rank"
        sizes = f"{channels[0]} channels" if len(channels) == 1 else f"channel sizes {channels}"
        raise ValueError(
            f"this layer was built for inputs of {built_for} with {sizes} on axis "
            f"{self.axis}, received inputs of shape {tuple(inputs.shape)}"
        )

    def _uses_batch_statistics(self, training: bool | None) -> bool:
        """The mode rule: batch statistics only when ``training`` (``None``: ``self.training``) and ``trainable``."""
        return (self.training if training is None else training) and self._trainable

    def forward(self, inputs: Tensor, training: bool | None = None, mask: Tensor | None = None) -> Tensor:
        """Normalize ``inputs``; see the class docstring for the formulas and the mode rule."""
        axes, mask = self._check_call(inputs, training, mask)
        if self._built_shape is None:  # built by load_state_dict, or called without the lazy hook
            self.initialize_parameters(inputs, training, mask)

        x = inputs if inputs.is_floating_point() else inputs.to(self.weight_dtype)
        if 0 in self.moving_variance.shape:  # no channel: nothing to normalize or update (as Keras)
            return x.clone()
        dtype = functional.compute_dtype(x.dtype)
        gamma, beta = self.gamma, self.beta
        moving_mean, moving_variance = self.moving_mean, self.moving_variance
        # e.g. float32 weights meeting float64 inputs, or 16-bit gamma/beta (FSDP mixed precision)
        if not (
            moving_mean.dtype == moving_variance.dtype == dtype
            and (gamma is None or gamma.dtype == dtype)
            and (beta is None or beta.dtype == dtype)
        ):
            gamma, beta, moving_mean, moving_variance = (
                None if t is None else t.to(dtype) for t in (gamma, beta, moving_mean, moving_variance)
            )
        if len(axes) > 1:  # the kernels see one channel dimension, the axes' indices in row-major order
            gamma, beta, moving_mean, moving_variance = map(_flat, (gamma, beta, moving_mean, moving_variance))
        if not self._uses_batch_statistics(training):
            return functional.normalize_input(x, axes, moving_mean, moving_variance, gamma, beta, self.epsilon)
        if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
            # The TorchScript-based exporter turns the statistics kernel into ONNX's
            # BatchNormalization with the wrong running statistics: refuse rather than mislead.
            raise RuntimeError(
                "BatchNormalization in training mode cannot be exported by the TorchScript-based ONNX "
                "exporter (dynamo=False): export the model in inference mode (model.eval())"
            )

        inside = None
        if mask is not None:
            inside = functional.full_mask(mask if mask.device == x.device else mask.to(x.device), x.shape, axes)
        memory = functional.memory_order(x)  # channels_last & co. are read where they lie
        ghost_count, split = 1, x
        if self.virtual_batch_size is not None and x.shape[0] > self.virtual_batch_size:  # one: the batch itself
            ghost_count = x.shape[0] // self.virtual_batch_size
            split, axes, inside, memory = functional.ghost_batches(x, self.virtual_batch_size, axes, inside, memory)
        order = functional.channel_order(memory, axes, split.dim())
        view = functional.channel_view(split, axes, order)
        if inside is not None:
            inside = functional.channel_view(inside, axes, order)
        y = self._normalize_training(view, inside, ghost_count, gamma, beta, moving_mean, moving_variance)
        y = functional.from_channel_view(y, split.shape, order, memory)
        return y if split is x else y.reshape(x.shape)

    def _normalize_training(self, view, inside, ghost_count, gamma, beta, moving_mean, moving_variance) -> Tensor:
        """The training call on a channel view: which statistics, the fallback, the update (the policy).

        Synchronized layers take the global batch's statistics and sum the backward's over the
        group; every rank joins, one with an empty shard too (ghost batches stay each process's
        own). A batch with no element (empty, or all masked out) has no statistics: the moving
        ones stand in, as in inference, and nothing is updated. In ghost batches (``ghost_count``
        of them, each its own channels of ``view``), the update and renorm's correction take the
        mean of their statistics.
        """
        all_reduce = None
        if self.synchronized and self.virtual_batch_size is None and distributed.is_synchronizing(self.process_group):
            statistics = distributed.batch_statistics(view, inside, self.process_group, key=self)
            all_reduce = distributed.summing(self.process_group)
        else:
            statistics = functional.batch_statistics(view, inside)
        if not isinstance(statistics.count, Tensor) and statistics.count == 0:  # known on the host
            fallback = _over_ghosts(ghost_count, moving_mean, moving_variance, gamma, beta)
            return functional.normalize(view, *fallback, self.epsilon)
        update = statistics if ghost_count == 1 else functional.mean_over_ghosts(statistics, ghost_count)
        if isinstance(statistics.count, Tensor):  # decided on the device: no synchronization
            statistics = functional.fill_empty(statistics, *_over_ghosts(ghost_count, moving_mean, moving_variance))
        gamma, beta = self._batch_affine(update, statistics.valid, ghost_count, gamma, beta)
        y = functional.normalize_by_batch(view, statistics, gamma, beta, self.epsilon, inside, all_reduce)
        self._update_moving_statistics(update)
        return y

    def _batch_affine(self, update, valid, ghost_count, gamma, beta) -> tuple[Tensor | None, Tensor | None]:
        """The scale and offset of the training normalization, for each channel of the view.

        ``gamma``/``beta``, or under renorm ``r * gamma``/``d * gamma + beta`` with ``r``, ``d``
        from the ``update`` statistics (as tf-keras for ghost batches), but none (``r = 1``,
        ``d = 0``) where the view's channel is not ``valid``: without elements, it takes the
        inference formula.
        """
        if not self.renorm:
            return _over_ghosts(ghost_count, gamma, beta)
        renorm_mean, renorm_stddev = _flat(self.renorm_mean), _flat(self.renorm_stddev)
        r, d = functional.renorm_correction(update, renorm_mean, renorm_stddev, self.epsilon, self.renorm_clipping)
        return functional.renorm_affine(*_over_ghosts(ghost_count, r, d, gamma, beta), valid)

    def _update_moving_statistics(self, update: functional.Statistics) -> None:
        """One update per training call, in place: Keras's two moving averages, or renorm's five."""
        if not self.renorm:
            functional.update_moving_statistics(
                _flat(self.moving_mean), _flat(self.moving_variance), update, self.momentum
            )
            return
        functional.update_renorm_statistics(
            moving_mean=_flat(self.moving_mean),
            moving_variance=_flat(self.moving_variance),
            moving_stddev=_flat(self.moving_stddev),
            renorm_mean=_flat(self.renorm_mean),
            renorm_stddev=_flat(self.renorm_stddev),
            statistics=update,
            momentum=self.momentum,
            renorm_momentum=self.renorm_momentum,
            epsilon=self.epsilon,
        )

    def extra_repr(self) -> str:
        """What ``print(model)`` shows, as torch's modules: the channel sizes once built, ``axis``,
        ``momentum`` and ``epsilon`` always (the conventions that differ from torch's), then the
        arguments that differ from Keras's defaults."""
        parts = [] if not self.built else [", ".join(map(str, self.moving_variance.shape))]
        parts += [f"axis={self.axis}", f"momentum={self.momentum}", f"epsilon={self.epsilon}"]
        flags = {"center": True, "scale": True, "renorm": False, "synchronized": False, "trainable": True}
        parts += [f"{name}={getattr(self, name)}" for name, default in flags.items() if getattr(self, name) != default]
        if self.virtual_batch_size is not None:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
        return ", ".join(parts)

    # -------------------------------------------------------------- regularizers, constraints

    @property
    def losses(self) -> list[Tensor]:
        """Regularization penalties of ``gamma`` then ``beta`` (differentiable, recomputed on access)."""
        pairs = ((self.gamma_regularizer, self.gamma), (self.beta_regularizer, self.beta))
        return [regularizer(weight) for regularizer, weight in pairs if regularizer is not None and weight is not None]

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project ``gamma``/``beta`` in place with their constraints (Keras: after each optimizer step).

        Recipe: ``optimizer.register_step_post_hook(lambda *_: batchnorm.apply_constraints(model))``.
        """
        pairs = ((self.gamma_constraint, self.gamma), (self.beta_constraint, self.beta))
        for constraint, weight in pairs:
            if constraint is not None and weight is not None:
                weight.copy_(constraint(weight))

    # -------------------------------------------------------------------------- configuration

    def get_config(self) -> dict[str, Any]:
        """Keras 3's configuration dict for this layer (JSON-serializable, loadable by Keras).

        A list or tuple ``axis`` is written as a list and ``virtual_batch_size`` when set, as
        tf-keras writes them (Keras 3 loads neither).
        """
        config = {
            "name": self.name,
            "trainable": self._trainable,
            "dtype": {
                "module": "keras",
                "class_name": "DTypePolicy",
                "config": {"name": self._policy_name()},
                "registered_name": None,
            },
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
        }
        if isinstance(self.axis, (list, tuple)):
            config["axis"] = list(self.axis)
        if self.virtual_batch_size is not None:  # written only when set, as tf-keras
            config["virtual_batch_size"] = self.virtual_batch_size
        return config

    def _policy_name(self) -> str:
        """The dtype policy given, unless ``.to()``/``.double()``/... moved the weights to another dtype."""
        if _POLICY_WEIGHT_DTYPES[self._dtype_policy] == self.weight_dtype:
            return self._dtype_policy
        return _TORCH_DTYPE_NAMES[self.weight_dtype]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchNormalization:
        """Build a layer from :meth:`get_config` output or from Keras's own layer config.

        Accepts the bare config or Keras's ``{"class_name": "BatchNormalization", "config": ...}``
        wrapper. Unknown keys raise ``ValueError`` naming them; nothing named in the config is ever
        imported, only built-in identifiers resolve.
        """
        if set(config) >= {"class_name", "config"}:
            if config["class_name"] != "BatchNormalization":
                raise ValueError(f"expected a BatchNormalization config, received class_name={config['class_name']!r}")
            config = config["config"]
        config = dict(config)
        # tf-keras's implementation choices: `fused` changes nothing here, `adjustment` only if None.
        config.pop("fused", None)
        if config.pop("adjustment", None) is not None:
            raise ValueError("adjustment (a tf-keras callable) is not supported: only adjustment=None loads")
        if config.pop("activity_regularizer", None) is not None:
            raise ValueError("activity_regularizer is not supported by batchnorm.BatchNormalization")
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown BatchNormalization config keys: {unknown}")
        return cls(**config)


_CONFIG_KEYS = {
    "name",
    "trainable",
    "dtype",
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
    "synchronized",
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "virtual_batch_size",
}
