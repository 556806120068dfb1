"""Saving and loading: weights, checkpoints and whole models, as ``.npz`` plus a JSON manifest.

Nothing is pickled: files hold named arrays and one JSON text (stored as a uint8 array), and
are read with ``allow_pickle=False``. Every file is written to a temporary file in the same folder
and then renamed over the target, so a crash mid-save leaves the previous file whole.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from kernels import backend
from minicnn import rng
from minicnn.layers.base import Layer, SymbolicTensor, snake_case

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
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = dict(arrays)
    payload[MANIFEST] = np.frombuffer(json.dumps(manifest).encode("utf-8"), dtype=np.uint8)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def read_npz(path) -> tuple[dict, dict]:
    """The arrays and manifest of a file written by ``write_npz_atomic`` (no pickles)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    if MANIFEST not in arrays:
        raise ValueError(f"{path} is not a minicnn file (no manifest)")
    manifest = json.loads(arrays.pop(MANIFEST).tobytes().decode("utf-8"))
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
def model_config(model) -> dict:
    """A JSON description of the architecture: built-in class + config, Sequential, or graph."""
    from minicnn.models.model import Sequential
    if getattr(model, "functional", False):
        layers = list(model.layers)
        index = {id(layer): i for i, layer in enumerate(layers)}
        symbols = {id(t): f"input{i}" for i, t in enumerate(model.inputs)}
        nodes = []
        for k, t in enumerate(model._nodes):
            symbols[id(t)] = f"node{k}"
            nodes.append({"layer": index[id(t.layer)], "inputs": [symbols[id(p)] for p in t.inputs],
                          "multiple": t.multiple, "kwargs": t.kwargs})
        return {"class_name": "Functional", "name": model.name,
                "inputs": [{"shape": list(t.shape), "name": t.name} for t in model.inputs],
                "outputs": [symbols[id(t)] for t in model.outputs],
                "single_input": model._single_input, "single_output": model._single_output,
                "layers": [layer_config(layer) for layer in layers], "nodes": nodes}
    if isinstance(model, Sequential):
        return {"class_name": "Sequential", "name": model.name,
                "layers": [layer_config(layer) for layer in model.stack]}
    return layer_config(model)


def layer_config(layer) -> dict:
    return {"class_name": type(layer).__name__, "config": layer.get_config()}


def layer_from_config(entry: dict):
    """Rebuild one layer (or built-in model) from ``{"class_name", "config"}``."""
    from minicnn import layers, models
    name = entry["class_name"]
    cls = getattr(layers, name, None) or getattr(models, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise ValueError(f"unknown layer or model class {name!r} in the saved config")
    return cls(**entry["config"])


def model_from_config(config: dict):
    from minicnn.layers.base import Input
    from minicnn.models.model import Model, Sequential
    kind = config["class_name"]
    if kind == "Sequential":
        return Sequential([layer_from_config(e) for e in config["layers"]], name=config["name"])
    if kind != "Functional":
        return layer_from_config(config)
    layers = [layer_from_config(e) for e in config["layers"]]
    symbols = {}
    inputs = []
    for i, spec in enumerate(config["inputs"]):
        symbol = Input(tuple(spec["shape"][1:]), batch_size=spec["shape"][0])
        symbols[f"input{i}"] = symbol
        inputs.append(symbol)
    for k, node in enumerate(config["nodes"]):
        args = [symbols[name] for name in node["inputs"]]
        symbols[f"node{k}"] = layers[node["layer"]](args if node["multiple"] else args[0],
                                                    **node["kwargs"])
    outputs = [symbols[name] for name in config["outputs"]]
    return Model(inputs[0] if config["single_input"] else inputs,
                 outputs[0] if config["single_output"] else outputs, name=config["name"])


def save_model(model, path) -> None:
    """Architecture (JSON config) and weights in one file; no pickle."""
    arrays, manifest = weights_payload(model)
    manifest["model"] = model_config(model)
    write_npz_atomic(path, arrays, manifest)


def load_model(path):
    """A model saved by ``save_model`` (built-in models, Sequential and functional models)."""
    arrays, manifest = read_npz(path)
    if "model" not in manifest:
        raise ValueError(f"{path} holds weights only; build the model and call load_weights")
    model = model_from_config(manifest["model"])
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
    import minicnn
    return minicnn.__version__


def write_text_atomic(path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
