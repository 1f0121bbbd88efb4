"""Keras's BatchNormalization across: live Keras layers both ways, Keras 3 files in (SPEC section 13).

Keras 3 saves a model as a ``.keras`` zip archive holding ``config.json`` (the architecture: every
layer's ``get_config()``, nested models inside their parents) and ``model.weights.h5``, or saves
the weights alone as a ``.weights.h5`` file. In the HDF5 file a layer's variables are the datasets
``layers/<key>/vars/0``, ``vars/1``, ... in the layer's weight order, where ``<key>`` is the snake
case of its class name with a counter per class within its model (``batch_normalization``,
``batch_normalization_1``, ...), and a nested model's layers sit under ``layers/<key>/layers/``.
The ``vars`` group's attribute ``name`` holds the layer's own name.

Files are read with :mod:`zipfile`, :mod:`json` and ``h5py`` (the ``batchnorm[keras]`` extra):
Keras is not imported, and nothing named in a file is imported or run (configs go through
:meth:`BatchNormalization.from_config`, which resolves built-in identifiers only). As Keras's own
loader, nothing outside the file is read: links, external and virtual datasets and "shape bombs"
are refused (:func:`_child`).
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .layer import BatchNormalization

__all__ = ["from_keras", "to_keras", "load_keras", "load_keras_weights"]

_CLASS = "BatchNormalization"
_KEY = "batch_normalization"  # the snake case of _CLASS: the HDF5 key of its layers, with _<k> after the first


# ------------------------------------------------------------------------------- live layers


def from_keras(layer: Any) -> BatchNormalization:
    """A live ``keras.layers.BatchNormalization`` (any Keras 3 backend) as our layer: its config and weights.

    Built (for the Keras layer's input shape) with every weight copied, renorm's included, when
    the Keras layer is built; unbuilt, like it, otherwise.
    """
    ours = BatchNormalization.from_config(layer.get_config())
    if layer.built:
        ours.build(layer.get_build_config()["input_shape"])
        # through float64: exact for every float dtype, bfloat16 included (which NumPy lacks)
        state = {name: torch.from_numpy(getattr(layer, name).numpy().astype("float64")) for name in ours._weights()}
        ours.load_state_dict(state)
    return ours


def to_keras(layer: BatchNormalization) -> Any:
    """Our layer as a live ``keras.layers.BatchNormalization``: its config and, when built, every weight.

    Needs Keras 3 (``ImportError`` otherwise). ``ValueError`` for what Keras 3's layer cannot hold:
    several axes, ghost batches (tf-keras only) and ``synchronized=True`` off the TensorFlow backend.
    """
    try:
        import keras
    except ImportError as error:
        raise ImportError("to_keras needs Keras 3: pip install keras (with a backend: KERAS_BACKEND=torch)") from error
    config = layer.get_config()
    unsupported = []
    if isinstance(config["axis"], list):
        unsupported.append(f"axis={config['axis']} (several axes)")
    if "virtual_batch_size" in config:
        unsupported.append(f"virtual_batch_size={config['virtual_batch_size']}")
    if config["synchronized"] and keras.backend.backend() != "tensorflow":
        unsupported.append(f"synchronized=True on Keras's {keras.backend.backend()} backend")
    if unsupported:
        raise ValueError(f"Keras 3's BatchNormalization cannot hold {', '.join(unsupported)} (layer {layer.name!r})")
    keras_layer = keras.layers.BatchNormalization.from_config(config)
    if layer.built:
        keras_layer.build(_input_shape(layer))
        for name in layer._weights():
            getattr(keras_layer, name).assign(getattr(layer, name).detach().cpu().double().numpy())
    return keras_layer


def _input_shape(layer: BatchNormalization) -> tuple:
    """The shape ``layer`` was built for: Keras fixes a layer's input rank when it builds it."""
    if layer._built_shape is None:
        raise ValueError(
            f"layer {layer.name!r} was built by load_state_dict, so its input rank is unknown, and Keras "
            "fixes the rank at build: call layer.build(input_shape) (or the layer once) before to_keras"
        )
    return layer._built_shape


# ------------------------------------------------------------------------------------- files


def load_keras(path: str | os.PathLike) -> dict[str, BatchNormalization]:
    """Every BatchNormalization layer of a Keras 3 ``.keras`` archive, built with its config and weights.

    Returns ``{name: layer}`` in Keras's layer order, nested models included: a nested layer's name
    is prefixed by its models' names, joined by ``/`` (``"backbone/bn_3"``; the outer model's own
    name is left out). ``ValueError`` naming the path for a file that is not such an archive, whose
    weights do not fit their configs, or that holds no BatchNormalization layer.
    """
    layers = {name: layer for name, _, layer in _archive_layers(path)}
    if not layers:
        raise ValueError(f"{os.fspath(path)}: the model holds no BatchNormalization layer")
    return layers


def load_keras_weights(model: nn.Module, path: str | os.PathLike) -> list[tuple[str, str]]:
    """Assign a Keras file's BatchNormalization weights to ``model``'s ``BatchNormalization`` modules.

    ``path`` is a ``.weights.h5`` file or a ``.keras`` archive. The file's layers, in Keras's layer
    order (creation order: ``batch_normalization_10`` after ``batch_normalization_9``), go to the
    modules in ``model.named_modules()`` order. All or nothing: every count or shape mismatch is
    listed in one ``ValueError`` and nothing is written. Returns the ``(module name, HDF5 path)`` pairs.

    A ``.keras`` archive gives the exact order from its config. A ``.weights.h5`` file records no
    order between a model's own layers and its nested models: there, each model's
    BatchNormalization layers come first (by their counter), then its nested models, depth first.
    """
    if zipfile.is_zipfile(path):  # each layer checked against its config, as load_keras does
        variables = {at: [getattr(layer, n) for n in layer._weights()] for _, at, layer in _archive_layers(path)}
    else:
        with _open_hdf5(path, path) as weights:
            variables = {h5_path: _variables(weights, h5_path, path) for h5_path in _hdf5_entries(weights, path)}
    entries = list(variables)
    if not entries:
        raise ValueError(f"{os.fspath(path)}: the file holds no BatchNormalization layer")
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, BatchNormalization)]
    problems = []
    if len(entries) != len(modules):
        problems.append(f"the file has {len(entries)} BatchNormalization layers, the model {len(modules)}")
    for (name, module), h5_path in zip(modules, entries):
        problems += [f"{name or 'model'} <- {h5_path}: {problem}" for problem in _misfit(module, variables[h5_path])]
    if problems:
        raise ValueError(f"{os.fspath(path)}: the weights do not fit the model:\n  " + "\n  ".join(problems))
    for (_, module), h5_path in zip(modules, entries):
        module.load_state_dict(dict(zip(module._weights(), variables[h5_path])))
    return [(name, h5_path) for (name, _), h5_path in zip(modules, entries)]


# ----------------------------------------------------------------------------------- reading


def _h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError('reading Keras files needs h5py: pip install "batchnorm[keras]"') from error
    return h5py


def _archive_layers(path) -> list[tuple[str, str, BatchNormalization]]:
    """``(name, HDF5 path, layer)`` of every BatchNormalization of a ``.keras`` archive, built with its weights."""
    config, weights = _read_archive(path)
    layers, seen = [], set()
    with weights:
        for name, at, layer_config in _config_layers(config, path):
            own_name = layer_config["config"]["name"]
            if own_name in seen and at + "/vars" not in weights:
                continue  # a layer shared with a model visited before: Keras saved it there only
            seen.add(own_name)
            layers.append((name, at, _layer(path, at, layer_config, weights)))
    return layers


def _open_hdf5(source, path):
    """``source`` (a path or a file object) opened read-only; ``ValueError`` naming ``path`` if not HDF5."""
    h5py = _h5py()
    try:
        return h5py.File(source, "r")
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"{os.fspath(path)}: not an HDF5 file (a Keras .weights.h5): {error}") from error


def _read_archive(path) -> tuple[dict, Any]:
    """The ``config.json`` and the open ``model.weights.h5`` of a ``.keras`` archive."""
    _h5py()  # the missing dependency before the file's problems
    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)}: a directory (an unzipped save): zip it, or load its model.weights.h5")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = sorted({"config.json", "model.weights.h5"} - names)
            if missing:
                raise ValueError(f"{os.fspath(path)}: not a Keras 3 .keras archive, it lacks {', '.join(missing)}")
            config = json.loads(archive.read("config.json"))
            weights = archive.read("model.weights.h5")
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{os.fspath(path)}: not a readable Keras .keras archive (a zip file): {error}") from error
    return config, _open_hdf5(io.BytesIO(weights), path)


def _snake_case(name: str) -> str:
    """A class name as Keras keys its layers in weight files (``Conv2D`` -> ``conv2d``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _config_layers(config: dict, path) -> Iterator[tuple[str, str, dict]]:
    """``(name, HDF5 path, layer config)`` of every BatchNormalization layer of a model's config, in
    Keras's layer order, depth first into nested models (whose configs list their layers)."""
    try:
        if not isinstance(config.get("config", {}).get("layers"), list):
            raise ValueError(
                "its config lists no layers (a subclassed model?): load its weights into your model with "
                "load_keras_weights"
            )
        yield from _model_layers(config)
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{os.fspath(path)}: config.json is not a Keras model's config ({error!r})") from error
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: {error}") from error


def _model_layers(config: dict, h5_prefix: str = "", name_prefix: str = "") -> Iterator[tuple[str, str, dict]]:
    used: dict[str, int] = {}
    for layer in config["config"]["layers"]:
        key = _snake_case(layer["class_name"])  # Keras's saver: a counter per class within a model
        used[key] = used.get(key, -1) + 1
        h5_path = f"{h5_prefix}layers/{key}" + (f"_{used[key]}" if used[key] else "")
        name = name_prefix + layer["config"]["name"]
        if layer["class_name"] == _CLASS:
            yield name, h5_path, layer
        elif isinstance(layer["config"].get("layers"), list):
            yield from _model_layers(layer, h5_path + "/", name + "/")
        elif f'"class_name": "{_CLASS}"' in json.dumps(layer["config"]):
            raise ValueError(f"layer {name!r} ({layer['class_name']}) wraps a BatchNormalization, which is not read")


def _hdf5_entries(group, path, prefix: str = "") -> Iterator[str]:
    """The HDF5 paths of the BatchNormalization layers of a weights file: each model's own, by their
    counter, then its nested models' (those with ``layers`` of their own), depth first."""
    layers = _child(group, "layers", "Group", path)
    if layers is None:
        return
    children = {key: _child(layers, key, "Group", path) for key in layers}
    for key in sorted((k for k in children if re.fullmatch(rf"{_KEY}(_\d+)?", k)), key=_counter):
        yield f"{prefix}layers/{key}"
    for key in sorted((k for k, child in children.items() if "layers" in child), key=lambda k: (_base(k), _counter(k))):
        yield from _hdf5_entries(children[key], path, f"{prefix}layers/{key}/")


def _counter(key: str) -> int:
    """Keras's per-class counter in a key: 0 for ``batch_normalization``, k for ``batch_normalization_k``."""
    match = re.search(r"_(\d+)$", key)
    return int(match.group(1)) if match else 0


def _base(key: str) -> str:
    return re.sub(r"_\d+$", "", key)


def _variables(weights, h5_path: str, path) -> list[torch.Tensor]:
    """The variables ``vars/0``, ``vars/1``, ... of the layer at ``h5_path``, as tensors."""
    group = weights
    for part in f"{h5_path}/vars".split("/"):
        group = _child(group, part, "Group", path) if group is not None else None
    keys = [str(index) for index in range(len(group))] if group is not None else []
    if group is None or sorted(group) != sorted(keys):
        raise ValueError(f"{os.fspath(path)}: no variables 0, 1, ... at {h5_path}/vars (not a Keras 3 weights layout)")
    return [_tensor(_child(group, key, "Dataset", path)) for key in keys]


def _child(group, key: str, kind: str, path):
    """``group[key]`` if it exists (else ``None``), refusing what could reach beyond the file or its size.

    As Keras's own loader: no soft or external links, no dataset stored in other files or
    assembled from them (virtual), and no dataset that declares far more data than the file stores
    (a "shape bomb": a huge allocation from a tiny file). ``kind`` is ``"Group"`` or ``"Dataset"``.
    """
    h5py = _h5py()
    link = group.get(key, getlink=True)
    if link is None:
        return None
    where = f"{os.fspath(path)}: {group.name.rstrip('/')}/{key}"
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{where} is a {type(link).__name__}, refused (it may reach other files)")
    child = group[key]
    if not isinstance(child, getattr(h5py, kind)):
        raise ValueError(f"{where} is not a {kind} (not a Keras 3 weights layout)")
    if kind == "Dataset":
        declared = child.size * child.dtype.itemsize
        if child.external or child.is_virtual or (declared > 2**20 and declared > 1000 * child.id.get_storage_size()):
            raise ValueError(f"{where}: data stored elsewhere or far less than declared, refused")
    return child


def _tensor(dataset) -> torch.Tensor:
    """A dataset's values: Keras stores bfloat16 as 2-byte opaque values with the attribute ``dtype``."""
    values = dataset[()]
    if dataset.attrs.get("dtype") == "bfloat16":
        return torch.from_numpy(values.view("<i2")).view(torch.bfloat16)
    return torch.as_tensor(values)


def _misfit(layer: BatchNormalization, variables: list[torch.Tensor]) -> list[str]:
    """What keeps ``variables`` (in Keras's order) from loading into ``layer``, in words; nothing if they fit."""
    names = list(layer._weights())
    if len(variables) != len(names):
        return [f"{len(variables)} variables in the file, the layer has {len(names)} ({', '.join(names)})"]
    if layer.built:
        expected = [tuple(getattr(layer, name).shape) for name in names]
    else:  # all alike, with one dimension per channel axis
        rank = 1 if isinstance(layer.axis, int) else len(layer.axis)
        if variables[0].dim() != rank:
            return [f"{names[0]} has shape {tuple(variables[0].shape)} in the file, the layer {rank} dimension(s)"]
        expected = [tuple(variables[0].shape)] * len(names)
    return [
        f"{name} has shape {tuple(v.shape)} in the file, {shape} in the layer"
        for name, v, shape in zip(names, variables, expected)
        if tuple(v.shape) != shape
    ]


def _layer(path, h5_path: str, layer_config: dict, weights) -> BatchNormalization:
    """One BatchNormalization of an archive: from its config, built, with its variables."""
    layer = BatchNormalization.from_config(layer_config["config"])
    input_shape = layer_config.get("build_config", {}).get("input_shape")
    if input_shape is not None:
        layer.build(input_shape)
    variables = _variables(weights, h5_path, path)
    problems = _misfit(layer, variables)
    if problems:
        raise ValueError(f"{os.fspath(path)}: the weights at {h5_path} do not fit its config: {'; '.join(problems)}")
    layer.load_state_dict(dict(zip(layer._weights(), variables)))
    return layer
