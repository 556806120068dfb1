"""Saving and loading models; the file's suffix picks the format, as in Keras.

    .npz           minicnn's own: named arrays + a JSON manifest (minicnn.io.npz); weights,
                   whole models, and checkpoints (weights + optimizer + epoch + random state)
    .weights.h5    Keras 3's weights file (minicnn.io.keras; needs h5py)
    .keras         Keras 3's model archive: config.json + model.weights.h5 (needs h5py)
    .onnx          export only, for onnxruntime and others (minicnn.io.onnx; needs onnx)

Nothing is pickled, every file is written to a temporary file and renamed over the target, and a
file that is not what its reader expects raises ValueError naming it (minicnn.io.files).
"""
from __future__ import annotations

import os

from minicnn.io import keras, npz, onnx
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
                     f"one of {list(choices)}{keras.suffix_hint(name)}")


def save_weights(model, filepath) -> None:
    """Every weight of ``model`` to ``filepath`` (.npz or .weights.h5)."""
    _suffix(filepath, "save_weights", {".npz": npz.save_weights,
                                       ".weights.h5": keras.save_weights})(model, filepath)


def load_weights(model, filepath) -> None:
    """Weights from ``filepath`` (.npz weights or checkpoint, .weights.h5, .keras) into
    ``model``; every mismatch is listed and no weight changes unless all of them fit."""
    _suffix(filepath, "load_weights", {".npz": npz.load_weights,
                                       ".weights.h5": keras.load_weights,
                                       ".keras": keras.load_weights_from_archive})(model, filepath)


def save_model(model, filepath) -> None:
    """Architecture and weights of ``model`` to ``filepath`` (.npz or .keras)."""
    _suffix(filepath, "save", {".npz": npz.save_model, ".keras": keras.save_model})(model, filepath)


def load_model(filepath):
    """A model rebuilt from ``filepath``: a minicnn .npz model or a Keras 3 .keras file."""
    return _suffix(filepath, "load_model", {".npz": npz.load_model,
                                            ".keras": keras.load_model})(filepath)


def export(model, filepath, format="onnx", input_signature=None, opset=17) -> None:
    """Keras 3's ``Model.export``: only ``format="onnx"`` (see minicnn.io.onnx)."""
    if format != "onnx":
        raise ValueError(f"export: format must be 'onnx' (minicnn writes no {format!r}), "
                         f"got format={format!r}")
    onnx.export_onnx(model, filepath, input_signature=input_signature, opset=opset)
