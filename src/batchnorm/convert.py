"""PyTorch's batch normalization across, both ways, and folded away for deployment (SPEC section 13).

* :func:`from_torch` turns ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` into our layer and
  :func:`to_torch` back, in place, as ``SyncBatchNorm.convert_sync_batchnorm`` does: the new module
  *shares* the old one's parameters and buffers, so an optimizer made before the conversion keeps
  training them. The inference outputs are unchanged; what changes in training is the convention:
  Keras's momentum (``momentum = 1 - torch_momentum``) and a biased moving variance (torch keeps the
  unbiased one).
* :func:`fold` folds each batch normalization that directly follows a convolution or a linear layer
  into that layer's weight and bias: in inference the normalization is a per-channel affine map,
  ``y = x * scale + shift`` with ``scale = gamma / sqrt(var + epsilon)`` and
  ``shift = beta - mean * scale``, which the preceding layer can absorb::

      W' = W * scale  (per output channel)        b' = b * scale + shift
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from .layer import BatchNormalization
from .population import inference_parameters, is_batch_normalization

__all__ = ["from_torch", "to_torch", "fold", "Folded"]

# torch's class for each rank of input that our layer may be built for (SyncBatchNorm takes any).
_TORCH_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_TORCH_RANKS = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}  # BatchNorm1d takes ranks 2 and 3: fixed by the first call

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDS_INTO = (*_CONVOLUTIONS, *_TRANSPOSED, nn.Linear)


def _where(path: str) -> str:
    return path or "<root>"


def _complement(momentum: float) -> float:
    """``1 - momentum`` to 15 significant digits: torch's 0.1 becomes 0.9 and comes back 0.1, not
    0.09999999999999998 (a change far below float32's, and the value the user wrote)."""
    return float(f"{1.0 - momentum:.15g}")


def _replace(
    root: nn.Module, kind: type | tuple[type, ...], convert: Callable[[nn.Module, str], nn.Module]
) -> nn.Module:
    """Replace ``root`` or each of its descendants of type ``kind`` by ``convert(module, path)``, in place.

    All conversions run before the first replacement, so that a refused module leaves the model as
    it was. A module found at several places gets one replacement, shared likewise.
    """
    if isinstance(root, kind):
        return convert(root, "")
    sites = [
        (parent, name, child, f"{path}.{name}" if path else name)
        for path, parent in root.named_modules()
        for name, child in parent._modules.items()  # every place: named_children() skips repeats
        if isinstance(child, kind)
    ]
    replacements: dict[int, nn.Module] = {}
    for _, _, child, path in sites:
        if id(child) not in replacements:
            replacements[id(child)] = convert(child, path)
    for parent, name, child, _ in sites:
        setattr(parent, name, replacements[id(child)])
    return root


# ----------------------------------------------------------------------------- from / to torch


def from_torch(module: nn.Module) -> nn.Module:
    """Our :class:`BatchNormalization` in place of ``module`` if it is a torch batch normalization,
    else of each one inside it (in place); returns the module, or its replacement.

    ``BatchNorm1d/2d/3d``, an initialized ``LazyBatchNorm*d`` and ``SyncBatchNorm`` become
    ``BatchNormalization(axis=1, momentum=1 - m, epsilon=eps, center=affine, scale=affine)``,
    ``synchronized=True`` on the ``SyncBatchNorm``'s process group. The new layer shares the
    module's ``weight``, ``bias``, ``running_mean`` and ``running_var`` (as ``gamma``, ``beta``,
    ``moving_mean``, ``moving_variance``) and its train/eval mode: inference outputs are unchanged.
    Built for rank 4 (``BatchNorm2d``) or 5 (``BatchNorm3d``); from ``BatchNorm1d`` and
    ``SyncBatchNorm``, which take several ranks, the first call fixes it.

    Raises:
        ValueError: naming the module's path, for what has no Keras meaning: ``momentum=None``
            (a cumulative average), ``track_running_stats=False`` (batch statistics in inference),
            and an uninitialized lazy module (it has no channel count yet: run it once).
    """
    return _replace(module, _BatchNorm, _from_torch_layer)


def _from_torch_layer(module: _BatchNorm, path: str) -> BatchNormalization:
    kind = type(module).__name__
    if not module.track_running_stats:
        raise ValueError(
            f"{_where(path)}: {kind}(track_running_stats=False) normalizes with batch statistics in "
            "inference too, which a Keras BatchNormalization never does"
        )
    if module.momentum is None:
        raise ValueError(
            f"{_where(path)}: {kind}(momentum=None) keeps a cumulative average, which has no Keras "
            "momentum; set module.momentum to a number first"
        )
    if is_lazy(module.running_var):
        raise ValueError(f"{_where(path)}: {kind} is not initialized yet (no channel count): run it once first")
    synchronized = isinstance(module, nn.SyncBatchNorm)
    try:
        layer = BatchNormalization(
            axis=1,
            momentum=_complement(module.momentum),
            epsilon=module.eps,
            center=module.affine,
            scale=module.affine,
            synchronized=synchronized,
            dtype=module.running_var.dtype,
            process_group=module.process_group if synchronized else None,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{_where(path)}: {kind} has no Keras equivalent: {error}") from error
    weights = {"moving_mean": module.running_mean, "moving_variance": module.running_var}
    if module.affine:
        weights.update(gamma=module.weight, beta=module.bias)
    layer._share_weights(**weights)
    rank = next((r for cls, r in _TORCH_RANKS.items() if isinstance(module, cls)), None)
    if rank is not None:
        layer.build((None, module.num_features) + (None,) * (rank - 2))
    return layer.train(module.training)


def to_torch(module: nn.Module) -> nn.Module:
    """torch's batch normalization in place of our layer ``module``, or of each one inside it (in
    place); returns the module, or its replacement. The inverse of :func:`from_torch`.

    ``synchronized=True`` gives ``SyncBatchNorm`` on the layer's process group; otherwise the built
    rank chooses: 4 ``BatchNorm2d``, 5 ``BatchNorm3d``, 2, 3 or not fixed yet (built by
    ``load_state_dict`` or :func:`from_torch` and never called) ``BatchNorm1d``. The torch module
    shares the layer's weights and moving statistics and takes ``momentum = 1 - momentum``; with
    only one of ``center``/``scale``, the other is a constant (ones or zeros, not trained).

    Raises:
        ValueError: naming the layer's path, for what torch's modules cannot do: an unbuilt layer,
            a channel axis other than 1, several axes, ``renorm``, ``virtual_batch_size``,
            ``trainable=False`` (inference in training mode), regularizers or constraints, a rank
            without a torch class.
    """
    return _replace(module, BatchNormalization, _to_torch_layer)


def _torch_class(layer: BatchNormalization) -> tuple[type[_BatchNorm] | None, list[str]]:
    """The torch class for ``layer``, and what prevents its conversion."""
    rank = None if layer._built_shape is None else len(layer._built_shape)
    axes = (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)
    problems = []
    if len(axes) > 1:
        problems.append(f"several channel axes (axis={layer.axis})")
    elif axes[0] != 1 and (rank is None or axes[0] % rank != 1):
        problems.append(f"axis={layer.axis} is not torch's channel axis 1" + (f" for rank {rank}" if rank else ""))
    for name in ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint"):
        if getattr(layer, name) is not None:
            problems.append(f"{name} is set")
    if layer.renorm:
        problems.append("renorm=True")
    if layer.virtual_batch_size is not None:
        problems.append(f"virtual_batch_size={layer.virtual_batch_size}")
    if not layer.trainable:
        problems.append("trainable=False (inference in training mode)")
    if layer.synchronized:
        return nn.SyncBatchNorm, problems
    if rank is not None and rank not in _TORCH_CLASSES:
        problems.append(f"rank {rank} inputs")
    return _TORCH_CLASSES.get(rank or 2), problems


def _to_torch_layer(layer: BatchNormalization, path: str) -> _BatchNorm:
    if not layer.built:
        raise ValueError(f"{_where(path)}: the layer is not built (no channel count yet): call it or build() it first")
    cls, problems = _torch_class(layer)
    if problems:
        raise ValueError(f"{_where(path)}: torch.nn's batch normalization has no equivalent of: {'; '.join(problems)}")
    moving_variance = layer.moving_variance
    extra = {"process_group": layer.process_group} if cls is nn.SyncBatchNorm else {}
    module = cls(
        moving_variance.shape[0],
        eps=layer.epsilon,
        momentum=_complement(layer.momentum),
        affine=layer.center or layer.scale,
        device=moving_variance.device,
        dtype=moving_variance.dtype,
        **extra,
    )
    module.running_mean, module.running_var = layer.moving_mean, moving_variance
    if module.affine:
        constant = nn.Parameter(torch.ones_like(moving_variance), requires_grad=False)
        module.weight = layer.gamma if layer.scale else constant
        module.bias = layer.beta if layer.center else nn.Parameter(torch.zeros_like(constant), requires_grad=False)
    return module.train(layer.training)


# ------------------------------------------------------------------------------------------ fold


class Folded(nn.Identity):
    """What :func:`fold` leaves where a batch normalization was: its input, whatever else the model
    passes to the layer (``training=``, ``mask=``).

    ``rank``: the only input rank for which the fold holds, where the model does not fix it (a
    torch ``BatchNorm1d`` after ``Linear`` normalized the features of ``(N, features)`` inputs
    only; on ``(N, L, features)`` it normalized ``L``): another rank raises ``ValueError``
    rather than give wrong outputs.
    """

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, input: Tensor, *args, **kwargs) -> Tensor:
        if self.rank is not None and input.dim() != self.rank:
            raise ValueError(
                f"a batch normalization folded for inputs of rank {self.rank} received one of shape "
                f"{tuple(input.shape)}: fold the model without it, or give the model rank-{self.rank} inputs"
            )
        return input

    def extra_repr(self) -> str:
        return "" if self.rank is None else f"rank={self.rank}"


class _Tracer(fx.Tracer):
    """torch.fx's tracer that records our layer as one call (its forward checks values)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, BatchNormalization) or super().is_leaf_module(module, qualified_name)


def fold(module: nn.Module) -> nn.Module:
    """A copy of the inference model ``module`` with each foldable batch normalization folded away.

    A batch normalization (ours or torch's) folds when it directly follows a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` or ``Linear`` on that layer's output channels (ours: ``axis`` 1
    after a convolution, the last axis after ``Linear``; torch's: any after a convolution,
    ``BatchNorm1d`` after ``Linear`` for ``(N, features)`` inputs, which its :class:`Folded`
    checks at each call), and neither module
    is shared nor the layer's output used elsewhere. Its inference map (module docstring) goes
    into the layer's weight and bias, computed in float64, and a :class:`Folded` identity takes
    its place. The pairs come from ``torch.fx`` when the model traces, else from adjacent
    children of each ``nn.Sequential``. What cannot fold stays, listed in one ``UserWarning``.

    The copy is in ``eval()`` mode (it is an inference model: a folded layer no longer trains
    like the pair it replaces); its outputs equal the original's in ``eval()`` to float32
    rounding. ``module`` itself is untouched.
    """
    folded = copy.deepcopy(module).eval()
    modules = dict(folded.named_modules())
    uses = Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    tied = {i for i, n in Counter(id(p) for _, p in folded.named_parameters(remove_duplicate=False)).items() if n > 1}
    graph = _trace(folded)
    if graph is None:
        pairs, elsewhere = _sequential_pairs(modules), "torch.fx cannot trace the model: only nn.Sequential pairs fold"
        calls = Counter()
    else:
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        pairs, elsewhere = _graph_pairs(graph, modules, calls), "not directly after a Conv/ConvTranspose/Linear"
    unfolded = {
        path: f"called {calls[path]} times" if calls[path] > 1 else elsewhere
        for path, m in modules.items()
        if is_batch_normalization(m)
    }
    for producer_path, bn_path in pairs:
        producer, bn = modules[producer_path], modules[bn_path]
        reason = _why_not_foldable(producer, bn)
        if uses[id(producer)] > 1 or uses[id(bn)] > 1:
            reason = "shared: it or its Conv/Linear is used at several places"
        elif any(id(p) in tied for p in producer.parameters(recurse=False)):
            reason = "its Conv/Linear shares a weight with another module"
        if reason is None:
            _fold_into(producer, bn)
            _set_module(folded, bn_path, Folded(_folded_rank(producer, bn)).eval())
            del unfolded[bn_path]
        else:
            unfolded[bn_path] = reason
    if unfolded:
        listed = ", ".join(f"{_where(path)} ({reason})" for path, reason in unfolded.items())
        warnings.warn(f"fold left {len(unfolded)} batch normalization layer(s) unfolded: {listed}", stacklevel=2)
    return folded


def _trace(model: nn.Module) -> fx.Graph | None:
    """``model``'s torch.fx graph (our layers as single calls), or ``None`` where it does not trace."""
    try:
        return _Tracer().trace(model)
    except Exception:  # torch.fx fails on Python it cannot trace with any exception (data-dependent flow, ...)
        return None


def _graph_pairs(graph: fx.Graph, modules: dict[str, nn.Module], calls: Counter) -> list[tuple[str, str]]:
    """The (Conv/Linear path, batch normalization path) pairs of the graph where the second takes the
    first's output, which feeds nothing else, each module called once (``calls``: per module path)
    and ours in its own mode."""
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_batch_normalization(modules[node.target]) or not node.args:
            continue
        source = node.args[0]
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], _FOLDS_INTO)
            and len(source.users) == 1
            and calls[source.target] == calls[node.target] == 1
            and _inference_call(node)
        ):
            pairs.append((source.target, node.target))
    return pairs


def _sequential_pairs(modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """The (Conv/Linear path, batch normalization path) pairs of adjacent children of each ``nn.Sequential``."""
    pairs = []
    for path, sequence in modules.items():
        if isinstance(sequence, nn.Sequential):
            names = [f"{path}.{name}" if path else name for name, _ in sequence.named_children()]
            pairs += [
                (first, second)
                for first, second in zip(names, names[1:])
                if isinstance(modules[first], _FOLDS_INTO) and is_batch_normalization(modules[second])
            ]
    return pairs


def _inference_call(node: fx.Node) -> bool:
    """Whether the traced call of our layer leaves its mode to the module (no ``training=True``)."""
    training = node.kwargs.get("training", node.args[1] if len(node.args) > 1 else None)
    return training is None or training is False


def _why_not_foldable(producer: nn.Module, bn: nn.Module) -> str | None:
    """``None`` when ``bn`` normalizes ``producer``'s output channels with fixed statistics, else why not."""
    torch_class = next(cls for cls in _FOLDS_INTO if isinstance(producer, cls))
    if parametrize.is_parametrized(producer) or producer._forward_pre_hooks or producer._forward_hooks:
        return f"the {torch_class.__name__}'s weight is computed (a parametrization or a hook)"
    if type(producer).forward is not torch_class.forward:
        return f"{type(producer).__name__} has its own forward"
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if isinstance(bn, _BatchNorm):
        if not bn.track_running_stats:
            return "track_running_stats=False: batch statistics in inference"
        if isinstance(producer, nn.Linear) and type(bn) is not nn.BatchNorm1d:
            return f"{type(bn).__name__} after Linear"
        return None if bn.num_features == channels else "another channel count"
    if not bn.built:
        return "not built"
    if not isinstance(bn.axis, int) and len(bn.axis) > 1:
        return "several channel axes"
    linear = isinstance(producer, nn.Linear)
    axis = bn.axis if isinstance(bn.axis, int) else bn.axis[0]
    rank = None if bn._built_shape is None else len(bn._built_shape)
    if rank is None:  # not fixed yet: the axes that name the channels at any rank, and 1 of (N, features)
        matches = axis in ((-1, 1) if linear else (1,))
    else:  # a convolution's output is (N, C, *spatial); Linear's features are last
        matches = axis % rank == rank - 1 if linear else axis % rank == 1 and rank == len(producer.kernel_size) + 2
    if not matches:
        return f"axis={bn.axis} is not the channel axis of the {type(producer).__name__} output"
    return None if bn.moving_variance.shape[0] == channels else "another channel count"


def _folded_rank(producer: nn.Module, bn: nn.Module) -> int | None:
    """The input rank that the fold of ``bn`` after ``producer`` holds for, where the model does not fix
    it: 2 for a batch normalization on axis 1 after ``Linear`` (torch's ``BatchNorm1d``, or ours
    converted from one and not called yet), which normalized ``L`` of ``(N, L, features)`` inputs."""
    if not isinstance(producer, nn.Linear):
        return None
    if isinstance(bn, _BatchNorm):
        return 2
    return 2 if bn._built_shape is None and bn.axis in (1, (1,), [1]) else None


@torch.no_grad()
def _fold_into(producer: nn.Module, bn: nn.Module) -> None:
    """``producer``'s weight and bias absorb ``bn``'s inference map (module docstring), in float64."""
    gamma, beta, mean, var, epsilon = inference_parameters(bn)
    scale = torch.rsqrt(var.double() + epsilon)
    if gamma is not None:
        scale = scale * gamma.double()
    shift = -mean.double() * scale
    if beta is not None:
        shift = shift + beta.double()
    weight = producer.weight
    if isinstance(producer, _TRANSPOSED):  # (in, out / groups, *kernel): output channels group-major
        groups = producer.groups
        grouped = weight.double().unflatten(0, (groups, -1)) * _along(scale.view(groups, 1, -1), weight.dim() + 1)
        folded_weight = grouped.flatten(0, 1)
    else:  # (out, ...)
        folded_weight = weight.double() * _along(scale, weight.dim())
    bias = shift if producer.bias is None else producer.bias.double() * scale + shift
    weight.copy_(folded_weight)
    if producer.bias is None:
        producer.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
    else:
        producer.bias.copy_(bias)


def _along(t: Tensor, rank: int) -> Tensor:
    """``t`` with trailing size-1 dimensions up to ``rank``, to broadcast over a weight's kernel axes."""
    return t.reshape(t.shape + (1,) * (rank - t.dim()))


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)
