"""Shared test set-up: Keras runs on its torch backend (it must be chosen before keras is imported)."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run, so that CI and a user's `make test` agree;
# HYPOTHESIS_PROFILE=explore draws fresh ones (use it when changing the numerics).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
