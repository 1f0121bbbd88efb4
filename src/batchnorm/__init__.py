"""batchnorm: the Keras BatchNormalization layer, faithful to Keras, native to PyTorch.

Public API: :class:`BatchNormalization`, the tree helpers :func:`set_trainable`,
:func:`regularization_loss` and :func:`apply_constraints`, the R-style constructor
:func:`layer_batch_normalization`, Keras migration (:func:`from_keras`, :func:`to_keras`,
:func:`load_keras`, :func:`load_keras_weights`), PyTorch model tools (:func:`from_torch`,
:func:`to_torch`, :func:`fold`, :func:`recalibrate`, :func:`inspect`), and the Keras-named object
modules :mod:`initializers`, :mod:`regularizers`, :mod:`constraints`.
"""

from . import constraints, initializers, regularizers
from .convert import fold, from_torch, to_torch
from .health import inspect
from .keras_io import from_keras, load_keras, load_keras_weights, to_keras
from .layer import BatchNormalization
from .population import recalibrate
from .tree import apply_constraints, layer_batch_normalization, regularization_loss, set_trainable

__all__ = [
    "BatchNormalization",
    "set_trainable",
    "regularization_loss",
    "apply_constraints",
    "layer_batch_normalization",
    "from_keras",
    "to_keras",
    "load_keras",
    "load_keras_weights",
    "from_torch",
    "to_torch",
    "fold",
    "recalibrate",
    "inspect",
    "initializers",
    "regularizers",
    "constraints",
]
__version__ = "0.1.0"
