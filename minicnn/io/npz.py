"""minicnn's own files: weights, checkpoints and whole models, as ``.npz`` plus a JSON manifest.

Nothing is pickled: files hold named arrays and one JSON text (stored as a uint8 array), and
are read with ``allow_pickle=False``. Every file is written to a temporary file in the same folder
and then renamed over the target, so a crash mid-save leaves the previous file whole.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from kernels import backend
from minicnn import rng
from minicnn.io.files import check_file, not_readable, write_atomic
from minicnn.layers.base import Layer, deserialize, serialize, snake_case

MANIFEST = "__manifest__"
FORMAT = "minicnn-npz-1"


# -- names ---------------------------------------------------------------------------------------
def named_weights(layer: Layer, prefix: str = "") -> list:
    """(path, weight) pairs in ``layer.weights`` order; paths follow attributes
    ('encoder[0].conv1/kernel'), so they do not depend on global layer counters."""
    attribute_names = {}
    for key, value in vars(layer).items():
        if key.startswith("_"):
            continue
        if isinstance(value, Layer):
            attribute_names.setdefault(id(value), key)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, Layer):
                    attribute_names.setdefault(id(item), f"{key}[{i}]")
    pairs = [(f"{prefix}{w.name.rsplit('/', 1)[-1]}", w)
             for w in layer._trainable_weights + layer._non_trainable_weights]
    for i, sub in enumerate(layer.layers):
        name = attribute_names.get(id(sub), f"{i}_{snake_case(type(sub).__name__)}")
        pairs += named_weights(sub, prefix=f"{prefix}{name}/" if not prefix else f"{prefix}{name}/")
    seen, unique = set(), []
    for path, w in pairs:
        if id(w) not in seen:
            seen.add(id(w))
            unique.append((path, w))
    return unique


# -- files ---------------------------------------------------------------------------------------
def write_npz_atomic(path, arrays: dict, manifest: dict) -> None:
    """Write ``arrays`` and a JSON ``manifest`` to ``path`` through a temporary file and rename."""
    payload = dict(arrays)
    payload[MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    write_atomic(path, lambda stream: np.savez(stream, **payload))


def read_npz(path) -> tuple[dict, dict]:
    """The arrays and manifest of a file written by ``write_npz_atomic`` (no pickles); a file
    that is not one (empty, truncated, another format) raises ValueError naming it."""
    expected = "a minicnn .npz file (a zip of arrays with a JSON manifest)"
    path = check_file(path, expected, b"PK\x03\x04")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError:              # an object array inside: NumPy would suggest pickles
        raise ValueError(f"{path} is not {expected}: it holds Python objects (pickles), which "
                         "minicnn never loads") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as error:
        raise not_readable(path, "minicnn .npz file", error) from None
    if MANIFEST not in arrays:
        raise ValueError(f"{path} is not {expected}: it has no {MANIFEST!r} entry")
    try:
        manifest = json.loads(arrays.pop(MANIFEST).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise not_readable(path, "minicnn .npz manifest", error) from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not {expected}: its manifest is not a JSON object")
    return arrays, manifest


# -- weights ---------------------------------------------------------------------------------------
def _ensure_built(model, input_shape) -> None:
    if not model.weights and input_shape is not None and hasattr(model, "build"):
        model.build(tuple(input_shape))


def _input_shape(model):
    shape = model.built_input_shape
    if isinstance(shape, list):
        return [list(s) for s in shape]
    return None if shape is None else list(shape)


def weights_payload(model) -> tuple[dict, dict]:
    """Arrays keyed 'weights/<path>' and their manifest entries."""
    pairs = named_weights(model)
    arrays = {f"weights/{path}": w.numpy() for path, w in pairs}
    entries = [{"name": path, "shape": list(w.shape), "dtype": str(w.dtype)} for path, w in pairs]
    return arrays, {"format": FORMAT, "version": _version(), "weights": entries,
                    "input_shape": _input_shape(model)}


def save_weights(model, path) -> None:
    """Save every weight of ``model`` to ``path`` (.npz + manifest), atomically."""
    arrays, manifest = weights_payload(model)
    write_npz_atomic(path, arrays, manifest)


def apply_weights(model, arrays: dict, manifest: dict, source: str = "file") -> None:
    """Copy saved arrays into ``model``; list every missing, unexpected or mis-shaped name."""
    input_shape = manifest.get("input_shape")
    if not isinstance(input_shape, list) or (input_shape and isinstance(input_shape[0], list)):
        input_shape = None
    _ensure_built(model, input_shape)
    pairs = named_weights(model)
    saved = {key[len("weights/"):]: value for key, value in arrays.items()
             if key.startswith("weights/")}
    problems = []
    for path, w in pairs:
        if path not in saved:
            problems.append(f"missing in {source}: {path} {tuple(w.shape)}")
        elif saved[path].dtype.kind not in "fiub":
            problems.append(f"not numbers: {path} holds {saved[path].dtype} values")
        elif tuple(saved[path].shape) != tuple(w.shape):
            problems.append(f"shape differs: {path} model {tuple(w.shape)} vs {source} "
                            f"{tuple(saved[path].shape)}")
    known = {path for path, _ in pairs}
    problems += [f"not in the model: {path} {tuple(saved[path].shape)}"
                 for path in saved if path not in known]
    if problems:
        raise ValueError(f"cannot load weights into {type(model).__name__} '{model.name}' "
                         f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    for path, w in pairs:
        w.data[...] = backend.to_device(saved[path].astype(w.dtype), w.device)


def load_weights(model, path) -> None:
    """Load weights saved by ``save_weights`` (or a checkpoint) into ``model``."""
    arrays, manifest = read_npz(path)
    apply_weights(model, arrays, manifest, source=os.fspath(path))


# -- checkpoints: weights + optimizer + epoch + random state ---------------------------------------
def save_checkpoint(path, model, epoch: int, extra: dict | None = None) -> None:
    """Everything needed to resume training exactly: weights, optimizer state, epoch, and the
    package random generator's state."""
    arrays, manifest = weights_payload(model)
    optimizer = getattr(model, "optimizer", None)
    scalars = {}
    if optimizer is not None:
        for key, value in optimizer.get_state().items():
            if isinstance(value, (int, float, np.integer, np.floating)) and np.ndim(value) == 0:
                scalars[key] = value.item() if hasattr(value, "item") else value
            else:
                arrays[f"optimizer/{key}"] = backend.to_numpy(value)
    manifest.update({"epoch": int(epoch), "optimizer_scalars": scalars,
                     "rng_state": _jsonable(rng.generator().bit_generator.state),
                     "extra": extra or {}})
    write_npz_atomic(path, arrays, manifest)


def load_checkpoint(path, model) -> dict:
    """Restore a checkpoint into ``model`` (and its compiled optimizer); returns the manifest
    (``manifest['epoch']`` is the number of epochs done)."""
    arrays, manifest = read_npz(path)
    apply_weights(model, arrays, manifest, source=os.fspath(path))
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        state = {key[len("optimizer/"):]: value for key, value in arrays.items()
                 if key.startswith("optimizer/")}
        state.update(manifest.get("optimizer_scalars", {}))
        if state:
            optimizer.set_state(state)
    if "rng_state" in manifest:
        rng.generator().bit_generator.state = manifest["rng_state"]
    return manifest


# -- whole models ----------------------------------------------------------------------------------
def save_model(model, path) -> None:
    """Architecture (``serialize(model)``, JSON) and weights in one file; no pickle."""
    arrays, manifest = weights_payload(model)
    manifest["model"] = serialize(model)
    write_npz_atomic(path, arrays, manifest)


def load_model(path):
    """A model saved by ``save_model`` (built-in models, Sequential and functional models)."""
    arrays, manifest = read_npz(path)
    if "model" not in manifest:
        raise ValueError(f"{path} holds weights only; build the model and call load_weights")
    entry = manifest["model"]
    if "config" not in entry:
        raise ValueError(f"{path}: the model was saved by an older minicnn (format 1, no "
                         "'config'); rebuild it and call load_weights")
    model = deserialize(entry)
    input_shape = manifest.get("input_shape")
    if not model.weights and input_shape is not None and not isinstance(input_shape[0], list):
        model.build(tuple(input_shape))
    apply_weights(model, arrays, manifest, source=os.fspath(path))
    return model


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("minicnn")
    except metadata.PackageNotFoundError:     # run from a source tree that is not installed
        return "unknown"
