"""The Keras ``BatchNormalization`` layer as a PyTorch module."""

from __future__ import annotations

import itertools
import numbers
import sys
from collections.abc import Callable
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
_TORCH_DTYPE_NAMES = {dtype: name for name, dtype in _POLICY_WEIGHT_DTYPES.items() if "mixed" not in name}

# Keras 3.15 configuration keys we accept but whose feature (batch renormalization) is absent.
_RENORM_DEFAULTS = {"renorm": False, "renorm_clipping": None, "renorm_momentum": 0.99}


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


def _check_arguments(axis: Any, momentum: Any, epsilon: Any, name: Any, process_group: Any, **flags: Any) -> None:
    """The constructor's checks of its plain arguments, in the order their errors are reported.

    ``flags`` are the bool arguments by name (``center``, ``scale``, ...). The initializers,
    regularizers, constraints, dtype and device are checked by their own resolution.
    """
    _check_type("axis", axis, numbers.Integral, "an int")
    _check_type("momentum", momentum, numbers.Real, "a real number")
    _check_type("epsilon", epsilon, numbers.Real, "a real number")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], received momentum={momentum!r}")
    if not 0.0 < epsilon < float("inf"):
        raise ValueError(f"epsilon must be a positive finite number, received epsilon={epsilon!r}")
    for flag_name, flag in flags.items():
        _check_type(flag_name, flag, bool, "a bool")
    if name is not None:
        _check_type("name", name, str, "a str")
    _check_process_group(process_group)


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
        name = dtype.get("config", {}).get("name") if dtype.get("class_name") == "DTypePolicy" else None
    if isinstance(name, str) and name in _POLICY_WEIGHT_DTYPES:
        return name, _POLICY_WEIGHT_DTYPES[name]
    raise ValueError(
        f"dtype must be None, a floating torch.dtype, one of {sorted(_POLICY_WEIGHT_DTYPES)} "
        f"or a Keras DTypePolicy dict, received dtype={dtype!r}"
    )


def _register_unbuilt_weights(
    layer: nn.Module, *, scale: bool, center: bool, trainable: bool, device: torch.device | None, dtype: torch.dtype
) -> None:
    """Register ``gamma`` (if ``scale``), ``beta`` (if ``center``) and the moving statistics on
    ``layer``, uninitialized until the build.

    As in torch's lazy modules: an optimizer, a deepcopy or a state_dict taken now holds the very
    objects that are later materialized and trained, and .to()/.double()/.half() or a torch.device
    context before the build decide their placement.
    """
    factory = {"device": device, "dtype": dtype}
    layer.register_parameter("gamma", UninitializedParameter(requires_grad=trainable, **factory) if scale else None)
    layer.register_parameter("beta", UninitializedParameter(requires_grad=trainable, **factory) if center else None)
    layer.register_buffer("moving_mean", _UninitializedBuffer(**factory))
    layer.register_buffer("moving_variance", _UninitializedBuffer(**factory))


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

    Beyond Keras, deliberately: the variance is computed stably (never ``E[x^2] - E[x]^2``); a
    training call with no element to take statistics from (empty batch, all-False mask) normalizes
    with the moving statistics and leaves them untouched; a channel whose batch statistics are not
    finite keeps its moving statistics; masks work on any axis; 16-bit inputs compute in float32
    and return their own dtype. See the README's table of differences.

    Args:
        axis: the channel axis (negative counts from the end). Keras's default, ``-1``, is
            channels-last; use ``1`` for PyTorch's ``(N, C, ...)`` layout.
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
        synchronized: use the statistics of the whole ``torch.distributed`` group in training
            (see :mod:`batchnorm.distributed`); local statistics when ``torch.distributed`` is
            not initialized or the group has one process.
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
        axis: int = -1,
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
        synchronized: bool = False,
        *,
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
            center=center,
            scale=scale,
            synchronized=synchronized,
            trainable=trainable,
        )
        self.axis = int(axis)  # NumPy integers are ints too
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self.center, self.scale, self.synchronized = center, scale, synchronized
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
            self, scale=scale, center=center, trainable=trainable, device=self._device, dtype=weight_dtype
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
        )
        return {name: initializer for name, initializer in pairs if getattr(self, name) is not None}

    def _channel_axis(self, input_shape: tuple) -> int:
        """``axis`` as a non-negative index into ``input_shape``; ``ValueError`` if out of range."""
        rank = len(input_shape)
        if not -rank <= self.axis < rank:
            raise ValueError(
                f"axis={self.axis} is out of range for inputs of shape {tuple(input_shape)} "
                f"(rank {rank}): expected {-rank} <= axis < {rank}"
            )
        return self.axis % rank

    def build(self, input_shape) -> None:
        """Create ``gamma``, ``beta``, ``moving_mean`` and ``moving_variance`` for ``input_shape``.

        Fixes the rank and the channel size ``C = input_shape[axis]``. The weights are the
        uninitialized ones materialized in place, where they are (``device=``, a ``torch.device``
        context at construction, or a later ``.to()``; default CPU) and in their dtype.
        """
        input_shape = tuple(input_shape)
        channels = input_shape[self._channel_axis(input_shape)]
        if not isinstance(channels, int) or channels < 0:
            raise ValueError(
                f"the channel dimension must be known to build, received input_shape={input_shape} "
                f"with axis={self.axis}"
            )
        self._materialize(channels)
        self._built_shape = input_shape
        self._retire_lazy_hooks()

    def initialize_parameters(self, inputs: Tensor, training: bool | None = None, mask: Tensor | None = None) -> None:
        """The lazy build of the first call (run by torch's lazy-module hook before :meth:`forward`).

        Validates the call first, so that a call that raises builds nothing. A layer never placed
        (no ``device=``, no ``.to(device)``, no device context) builds on its input's device.
        """
        axis, mask = self._check_call(inputs, training, mask)
        if self._built_shape is None:
            if not self.built:
                placed = self._device is not None or self.moving_variance.device.type != "cpu"
                self._materialize(inputs.shape[axis], None if placed else inputs.device)
            self._built_shape = tuple(inputs.shape)

    def _retire_lazy_hooks(self) -> None:
        """Remove torch's lazy-module hooks once built by :meth:`build` or ``load_state_dict``.

        Their first-call build has nothing left to do (the call fixes the rank in :meth:`forward`),
        and their removal at a first call made from several threads at once would race.
        """
        if hasattr(self, "_initialize_hook"):
            self._initialize_hook.remove()
            self._load_hook.remove()
            del self._initialize_hook, self._load_hook

    def _materialize(self, channels: int, device: torch.device | None = None) -> None:
        if self.built:
            return
        for name in self._weights():
            getattr(self, name).materialize((channels,), device=device)
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
        problems = [
            f"{prefix}{name} has shape {tuple(t.shape)}, expected a vector"
            for name, t in saved.items()
            if name not in unbuilt and t.dim() != 1
        ]
        if unbuilt and (self.built or len(unbuilt) < len(saved)):
            problems.append(
                f"{', '.join(prefix + name for name in unbuilt)}: uninitialized in the checkpoint (saved "
                "before its layer was built), which loads only into an unbuilt layer with no other weights"
            )
        if not problems and saved and not unbuilt:
            reference = self.moving_variance if self.built else saved.get("moving_variance", next(iter(saved.values())))
            expected = reference.shape[0]
            problems = [
                f"size mismatch for {prefix}{name}: copying a tensor of shape {tuple(t.shape)} from the "
                f"checkpoint, the shape in the layer is ({expected},)"
                for name, t in saved.items()
                if t.shape[0] != expected
            ]
        missing = [prefix + name for name in names if name not in saved]
        if problems or (missing and _loading_strictly()):
            error_msgs.extend(problems)
            missing_keys.extend(missing)
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

    def _check_call(self, inputs: Tensor, training: Any, mask: Any) -> tuple[int, Tensor | None]:
        """Validate a call before anything is built or written; return the channel axis and mask."""
        _check_training(training)
        if inputs.is_complex():
            raise TypeError(f"inputs must be real, received dtype={inputs.dtype}")
        shape = inputs.shape
        if self._built_shape is not None and len(shape) != len(self._built_shape):
            self._raise_shape_mismatch(inputs)
        axis = self._channel_axis(shape)
        # A rank fixed means built (and asks nothing that torch.compile cannot trace).
        if (self._built_shape is not None or self.built) and shape[axis] != self.moving_variance.shape[0]:
            self._raise_shape_mismatch(inputs)
        if mask is not None:
            if not isinstance(mask, Tensor):
                mask = torch.as_tensor(mask, device=inputs.device)
            functional.check_mask(mask, shape, axis)
        return axis, mask

    def _raise_shape_mismatch(self, inputs: Tensor) -> None:
        channels = self.moving_variance.shape[0]
        built_shape = self._built_shape
        built_for = f"shape {built_shape} (rank {len(built_shape)})" if built_shape is not None else "any rank"
        raise ValueError(
            f"this layer was built for inputs of {built_for} with {channels} channels on axis "
            f"{self.axis}, received inputs of shape {tuple(inputs.shape)}"
        )

    def forward(self, inputs: Tensor, training: bool | None = None, mask: Tensor | None = None) -> Tensor:
        """Normalize ``inputs``; see the class docstring for the formulas and the mode rule."""
        axis, mask = self._check_call(inputs, training, mask)
        if self._built_shape is None:  # built by load_state_dict, or called without the lazy hook
            self.initialize_parameters(inputs, training, mask)

        x = inputs if inputs.is_floating_point() else inputs.to(self.weight_dtype)
        if x.shape[axis] == 0:  # no channel: nothing to normalize or update (as Keras)
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
        if training is None:
            training = self.training
        if not (training and self._trainable):
            return functional.normalize_input(x, axis, moving_mean, moving_variance, gamma, beta, self.epsilon)
        if torch.jit.is_tracing() and torch.onnx.is_in_onnx_export():
            # The TorchScript-based exporter turns the statistics kernel into ONNX's
            # BatchNormalization with the wrong running statistics: refuse rather than mislead.
            raise RuntimeError(
                "BatchNormalization in training mode cannot be exported by the TorchScript-based ONNX "
                "exporter (dynamo=False): export the model in inference mode (model.eval())"
            )

        order = functional.memory_order(x)  # channels_last & co. are read where they lie
        view = functional.channel_view(x, axis, order)
        inside = None
        if mask is not None:
            inside = functional.mask_view(mask if mask.device == x.device else mask.to(x.device), x.shape, axis, order)
        y = self._normalize_training(view, inside, gamma, beta, moving_mean, moving_variance)
        return functional.from_channel_view(y, x.shape, order)

    def _normalize_training(self, view, inside, gamma, beta, moving_mean, moving_variance) -> Tensor:
        """The training call on a channel view: which statistics, the fallback, the update (the policy).

        Synchronized layers take the global batch's statistics and sum the backward's over the
        group; every rank joins, one with an empty shard too. A batch with no element (empty, or
        all masked out) has no statistics: the moving ones stand in and nothing is updated.
        """
        all_reduce = None
        if self.synchronized and distributed.is_synchronizing(self.process_group):
            statistics = distributed.batch_statistics(view, inside, self.process_group, key=self)
            all_reduce = distributed.summing(self.process_group)
        else:
            statistics = functional.batch_statistics(view, inside)
        if isinstance(statistics.count, int):  # known on the host
            if statistics.count == 0:
                return functional.normalize(view, moving_mean, moving_variance, gamma, beta, self.epsilon)
            used = statistics
        else:  # decided on the device: no synchronization
            has_elements = statistics.count > 0
            used = statistics._replace(
                mean=torch.where(has_elements, statistics.mean, moving_mean),
                var=torch.where(has_elements, statistics.var, moving_variance),
            )
        y = functional.normalize_by_batch(view, used, gamma, beta, self.epsilon, inside, all_reduce)
        functional.update_moving_statistics(self.moving_mean, self.moving_variance, statistics, self.momentum)
        return y

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
        """Keras 3's configuration dict for this layer (JSON-serializable, loadable by Keras)."""
        return {
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
            **_RENORM_DEFAULTS,
        }

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
        renorm = {key: config.pop(key, default) for key, default in _RENORM_DEFAULTS.items()}
        if renorm["renorm"]:
            raise ValueError("renorm=True (batch renormalization) is not implemented, received renorm=True")
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
}
