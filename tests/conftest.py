"""Shared test set-up: Keras runs on its torch backend (it must be chosen before keras is imported)."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
