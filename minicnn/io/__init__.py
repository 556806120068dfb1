"""Saving and loading models; the file's suffix picks the format, as in Keras.

    .npz           minicnn's own: named arrays + a JSON manifest (minicnn.io.npz); weights,
                   whole models, and checkpoints (weights + optimizer + epoch + random state)

Nothing is pickled, every file is written to a temporary file and renamed over the target, and a
file that is not what its reader expects raises ValueError naming it (minicnn.io.files).
"""
from __future__ import annotations

import os

from minicnn.io import npz
from minicnn.io.files import write_text_atomic  # noqa: F401
from minicnn.io.npz import (  # noqa: F401
    load_checkpoint, named_weights, read_npz, save_checkpoint, write_npz_atomic)


def _suffix(filepath, what: str, choices: dict):
    """The entry of ``choices`` (suffix -> handler) that ``filepath`` ends with."""
    name = os.fspath(filepath)
    for suffix, handler in choices.items():
        if name.endswith(suffix):
            return handler
    raise ValueError(f"{what}: cannot tell the format of {name!r} from its suffix; expected "
                     f"one of {list(choices)}")


def save_weights(model, filepath) -> None:
    """Every weight of ``model`` to ``filepath`` (.npz)."""
    _suffix(filepath, "save_weights", {".npz": npz.save_weights})(model, filepath)


def load_weights(model, filepath) -> None:
    """Weights from ``filepath`` (.npz weights or checkpoint) into ``model``; every
    mismatch is listed and no weight changes unless all of them fit."""
    _suffix(filepath, "load_weights", {".npz": npz.load_weights})(model, filepath)


def save_model(model, filepath) -> None:
    """Architecture and weights of ``model`` to ``filepath`` (.npz)."""
    _suffix(filepath, "save", {".npz": npz.save_model})(model, filepath)


def load_model(filepath):
    """A model rebuilt from ``filepath``: a minicnn .npz model."""
    return _suffix(filepath, "load_model", {".npz": npz.load_model})(filepath)
