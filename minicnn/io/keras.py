"""Keras 3 files, both ways: ``.weights.h5`` (weights) and ``.keras`` (architecture + weights).
Needs the optional ``h5py`` (``pip install "minicnn[keras]"``); never Keras itself.

Layout, as Keras 3 writes it (keras/src/saving/saving_lib.py, H5IOStore):

``.weights.h5`` is an HDF5 file. The variables a layer owns (not its sub-layers') are the datasets
``<path>/vars/0``, ``<path>/vars/1``, ... : trainable ones first, then the others, in creation
order — Conv2D, Conv2DTranspose, DepthwiseConv2D, Dense: kernel, bias; SeparableConv2D:
depthwise_kernel, pointwise_kernel, bias; BatchNormalization: gamma, beta, moving_mean,
moving_variance. Newer Keras gives each ``vars`` group a ``name`` attribute (the layer's name)
and also writes empty groups for layers without weights; both are optional on reading.
``<path>`` is where the layer sits in the model, never its name:

- the model itself: ``vars`` (at the root; empty for models);
- a Functional or Sequential model's layers: ``layers/<snake_case(class)>``, the second, third
  ... layer of a class ``_1``, ``_2`` in ``model.layers`` order (Functional: Keras' depth order,
  InputLayers included; Sequential: without its InputLayer), e.g. ``layers/conv2d_1/vars/0``;
- a nested model continues below its own path: ``layers/sequential/layers/conv2d/vars/0``;
- a subclassed model or layer: its attributes in sorted order (private ones last), a layer
  attribute at ``<attribute>``, a list of layers at ``<attribute>/<snake_case(class)>[_k]``
  (nested lists ``container[_k]``); a subclassed *model* also lists its direct sub-layers as
  ``layers/...`` in that order, so a layer in an attribute sorting after "layers" is found
  there. A layer reachable twice is saved the first time only;
- a compiled model's optimizer: ``optimizer/vars/...`` (ignored when reading).

``.keras`` is a zip archive (members stored) holding ``metadata.json`` (``{"keras_version",
"date_saved"}``), ``config.json`` and ``model.weights.h5`` (the layout above). config.json is
``{"module", "class_name", "config", "registered_name", ...}``: "Functional" (module
keras.src.models.functional) with ``config = {"name", "trainable", "layers", "input_layers",
"output_layers"}``, each layer ``{"module": "keras.layers", "class_name", "config", "name",
"inbound_nodes": [{"args": [...], "kwargs": {...}}]}`` and each tensor in args a
``{"class_name": "__keras_tensor__", "config": {"shape", "dtype", "keras_history": [layer,
node, 0]}}`` (a list of them for Add/Concatenate); or "Sequential" (module keras) with
``config = {"name", "trainable", "layers": [InputLayer, ...], "build_input_shape"}``. That
is minicnn's own config schema too (Model.get_config), so reading one is translating the layer
configs (Keras' dtype policies, initializer dicts, defaults minicnn has no argument for).

minicnn rebuilds the layers it has: InputLayer, Conv2D, Conv2DTranspose, DepthwiseConv2D,
SeparableConv2D, BatchNormalization, Dense, MaxPooling2D, AveragePooling2D,
GlobalAveragePooling2D, UpSampling2D, ZeroPadding2D, Cropping2D, Concatenate, Add, Activation,
ReLU, LeakyReLU, Softmax, Dropout, Flatten, and nested Functional / Sequential models. Another
layer raises ValueError naming it. minicnn's own classes (UNet, ConvBlock, ...) are written with
their minicnn module: minicnn reads them back, Keras cannot.
"""
from __future__ import annotations

import datetime
import inspect
import io as stdio
import json
import os
import zipfile

import numpy as np

from kernels import backend
from minicnn.io.files import check_file, not_readable, write_atomic
from minicnn.layers.base import Layer, deserialize, layer_class, serialize, snake_case

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
WEIGHTS_MEMBER, CONFIG_MEMBER, METADATA_MEMBER = "model.weights.h5", "config.json", "metadata.json"

# Keras layers that minicnn has under the same name and meaning
KERAS_LAYERS = frozenset({
    "Conv2D", "Conv2DTranspose", "DepthwiseConv2D", "SeparableConv2D", "BatchNormalization",
    "Dense", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "UpSampling2D",
    "ZeroPadding2D", "Cropping2D", "Concatenate", "Add", "Activation", "ReLU", "LeakyReLU",
    "Softmax", "Dropout", "Flatten"})
KERAS_MODELS = {"Functional": "keras.src.models.functional", "Sequential": "keras"}
# Keras config entries minicnn has no argument for, harmless at these values
KERAS_DEFAULTS = {"renorm_momentum": 0.99}
# minicnn bookkeeping attributes that are not layers a Keras twin would have
_BOOKKEEPING = frozenset({"_layers", "_trainable_weights", "_non_trainable_weights", "_inputs",
                          "_outputs", "_nodes", "_operations", "_last_use", "stack"})


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError('Keras files need the h5py package: pip install "minicnn[keras]" '
                          '(or pip install h5py)') from None
    return h5py


# -- where each layer's weights live -------------------------------------------------------------
def keras_class_name(layer) -> str:
    """The class name Keras would give ``layer``: 'Functional' for a graph model."""
    return "Functional" if getattr(layer, "functional", False) else type(layer).__name__


def weight_paths(model) -> list:
    """(group path, layer) for every layer that owns weights, as Keras 3's ``_save_state``
    walks the model (see the module docstring); ``vars`` of the group holds the weights."""
    found, visited = [], set()
    _walk(model, "", visited, found)
    return found


def _join(path, name):
    return f"{path}/{name}" if path else name


def _children(layer):
    """(attribute, value) pairs in Keras' order: a Functional/Sequential model's layers, then
    attributes holding layers, sorted with private ones last (a subclassed model's own
    'layers' list among them)."""
    from_graph = getattr(layer, "functional", False) or hasattr(layer, "stack")
    if from_graph:
        yield "layers", layer.layers
        return
    attributes = {key: value for key, value in vars(layer).items() if key not in _BOOKKEEPING}
    if hasattr(layer, "compile"):       # a subclassed Model (it trains): Keras' Model.layers
        attributes["layers"] = layer.layers
    for key in sorted(attributes, key=lambda name: "~" + name if name.startswith("_") else name):
        yield key, attributes[key]


def _walk(layer, path, visited, found):
    if id(layer) in visited:
        return
    visited.add(id(layer))
    if layer._trainable_weights or layer._non_trainable_weights:
        found.append((path, layer))
    for attribute, value in _children(layer):
        if isinstance(value, Layer):
            _walk(value, _join(path, attribute), visited, found)
        elif isinstance(value, (list, tuple, dict)):
            _walk_container(value, _join(path, attribute), visited, found)


def _walk_container(items, path, visited, found):
    used = {}

    def unique(name):
        if name in used:
            used[name] += 1
            return f"{name}_{used[name]}"
        used[name] = 0
        return name
    for item in (items.values() if isinstance(items, dict) else items):
        if isinstance(item, Layer):
            _walk(item, _join(path, unique(snake_case(keras_class_name(item)))), visited, found)
        elif isinstance(item, (list, tuple, dict)):
            _walk_container(item, _join(path, unique("container")), visited, found)


def _own_weights(layer) -> list:
    """A layer's own weights in Keras' variable order: trainable, then non-trainable."""
    return layer._trainable_weights + layer._non_trainable_weights


# -- weights files -----------------------------------------------------------------------------------
def _write_weights(model, h5file) -> None:
    for path, layer in weight_paths(model):
        group = h5file.create_group(_join(path, "vars"))
        group.attrs["name"] = layer.name
        for i, weight in enumerate(_own_weights(layer)):
            group.create_dataset(str(i), data=weight.numpy())


def _require_built(model, what):
    if not model.weights:
        raise ValueError(f"{what}: {type(model).__name__} '{model.name}' has no weights yet; "
                         "build it first (call it on a batch, or model.build(input_shape)), "
                         "as Keras requires")


def save_weights(model, filepath) -> None:
    """Keras 3's ``.weights.h5`` for ``model``, written atomically (Keras' ``load_weights``
    reads it into the same architecture)."""
    h5py = _h5py()
    _require_built(model, "save_weights")
    buffer = stdio.BytesIO()
    with h5py.File(buffer, "w") as h5file:
        _write_weights(model, h5file)
    write_atomic(filepath, lambda stream: stream.write(buffer.getvalue()))


def _assign(model, h5file, source: str) -> None:
    """Copy every layer's ``vars`` from the open HDF5 file into ``model``, after checking all
    of them: every mismatch is listed and nothing is written unless all fit."""
    pairs, problems, consumed = [], [], set()
    for path, layer in weight_paths(model):
        group_path = _join(path, "vars")
        weights = _own_weights(layer)
        where = f"{group_path} ({type(layer).__name__} '{layer.name}', {len(weights)} weights)"
        group = h5file.get(group_path)
        if group is None or not hasattr(group, "keys"):
            problems.append(f"missing in {source}: {where}")
            continue
        consumed.add(group_path)
        names = sorted(group.keys(), key=lambda k: int(k) if k.isdigit() else -1)
        if names != [str(i) for i in range(len(weights))]:
            problems.append(f"{where}: the file has {len(names)} variables {names}")
            continue
        for i, weight in enumerate(weights):
            data = group[str(i)]
            if data.attrs.get("dtype") == "bfloat16" or data.dtype.kind not in "fiu":
                problems.append(f"{group_path}/{i}: dtype {data.attrs.get('dtype', data.dtype)} "
                                "is not supported")
            elif tuple(data.shape) != tuple(weight.shape):
                problems.append(f"shape differs: {group_path}/{i} ({weight.name}) model "
                                f"{tuple(weight.shape)} vs file {tuple(data.shape)}")
            else:
                pairs.append((weight, data))
    problems += [f"not in the model: {name} {shape}" for name, shape in _datasets(h5file)
                 if name.rsplit("/", 1)[0] not in consumed and not name.startswith("optimizer/")]
    if problems:
        raise ValueError(f"cannot load {source} into {type(model).__name__} '{model.name}' "
                         f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    arrays = [(weight, np.asarray(data[()])) for weight, data in pairs]
    for weight, value in arrays:
        weight.data[...] = backend.to_device(value.astype(weight.dtype), weight.device)


def _datasets(h5file) -> list:
    found = []
    h5file.visititems(lambda name, item: found.append((name, tuple(item.shape)))
                      if hasattr(item, "dtype") else None)
    return found


def _open_h5(data_or_path, source):
    h5py = _h5py()
    try:
        return h5py.File(data_or_path, "r")
    except (OSError, ValueError) as error:
        raise not_readable(source, "Keras weights file (HDF5)", error) from None


def load_weights(model, filepath) -> None:
    """Weights from Keras 3's ``.weights.h5`` into the equivalent minicnn ``model``."""
    path = check_file(filepath, "a Keras .weights.h5 file (HDF5)", HDF5_SIGNATURE)
    _require_built(model, "load_weights")
    with _open_h5(path, path) as h5file:
        _assign(model, h5file, path)


# -- .keras archives -----------------------------------------------------------------------------
def _read_archive(filepath) -> tuple[dict, bytes, str]:
    """(config.json as a dict, model.weights.h5 bytes, path) of a ``.keras`` file."""
    expected = "a Keras .keras file (a zip archive)"
    path = check_file(filepath, expected, ZIP_SIGNATURE)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for member in (CONFIG_MEMBER, WEIGHTS_MEMBER):
                if member not in names:
                    other = " (minicnn reads only h5 weights)" if "model.weights.npz" in names \
                        else ""
                    raise ValueError(f"{path} is not {expected} with {CONFIG_MEMBER} and "
                                     f"{WEIGHTS_MEMBER}: it holds {names[:6]}{other}")
                info = archive.getinfo(member)
                if info.file_size > (1 << 32) and info.file_size > 100 * info.compress_size:
                    raise ValueError(f"{path}: member {member} declares {info.file_size} bytes "
                                     f"from {info.compress_size}; refusing a zip bomb")
            config_bytes = archive.read(CONFIG_MEMBER)
            weights = archive.read(WEIGHTS_MEMBER)
    except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as error:
        raise not_readable(path, "Keras .keras file (zip)", error) from None
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise not_readable(path, f"Keras {CONFIG_MEMBER}", error) from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"{path}: {CONFIG_MEMBER} is not a Keras model config "
                         "({'module', 'class_name', 'config'})")
    return config, weights, path


def load_model(filepath):
    """A minicnn model rebuilt from a Keras 3 ``.keras`` file (Functional or Sequential,
    of the layers listed in the module docstring), with its weights."""
    config, weights, path = _read_archive(filepath)
    entry = from_keras(config, path)
    try:
        model = deserialize(entry)
        shape = (config.get("build_config") or {}).get("input_shape")
        if not model.weights and isinstance(shape, list):
            model.build(tuple(shape))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: cannot rebuild the model: {error}") from None
    _require_built(model, f"load_model({path})")
    with _open_h5(stdio.BytesIO(weights), f"{path}:{WEIGHTS_MEMBER}") as h5file:
        _assign(model, h5file, f"{path}:{WEIGHTS_MEMBER}")
    return model


def load_weights_from_archive(model, filepath) -> None:
    """The weights inside a ``.keras`` file into ``model`` (Keras' load_weights accepts one)."""
    _, weights, path = _read_archive(filepath)
    _require_built(model, "load_weights")
    with _open_h5(stdio.BytesIO(weights), f"{path}:{WEIGHTS_MEMBER}") as h5file:
        _assign(model, h5file, f"{path}:{WEIGHTS_MEMBER}")


def save_model(model, filepath) -> None:
    """``model`` as a Keras 3 ``.keras`` file, written atomically. Keras can load it when every
    layer is one Keras has (a Functional or Sequential model of the layers listed above)."""
    h5py = _h5py()
    _require_built(model, "save")
    entry = to_keras(serialize(model))
    if isinstance(model.built_input_shape, tuple):      # Keras' build_config, for a subclass
        entry["build_config"] = {"input_shape": list(model.built_input_shape)}
    config = json.dumps(entry)
    metadata = json.dumps({"keras_version": "3", "saved_by": "minicnn",
                           "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")})
    weights = stdio.BytesIO()
    with h5py.File(weights, "w") as h5file:
        _write_weights(model, h5file)

    def write(stream):
        with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(METADATA_MEMBER, metadata)
            archive.writestr(CONFIG_MEMBER, config)
            archive.writestr(WEIGHTS_MEMBER, weights.getvalue())
    write_atomic(filepath, write)


# -- config translation ---------------------------------------------------------------------------
def to_keras(entry: dict) -> dict:
    """minicnn's ``serialize`` dict in the form Keras 3 writes (module names, registered_name,
    Functional, an InputLayer first in a built Sequential)."""
    name, config = entry["class_name"], dict(entry.get("config") or {})
    out = {key: value for key, value in entry.items() if key not in ("module", "class_name",
                                                                       "config")}
    if name == "InputLayer":
        return {"module": "keras.layers", "class_name": "InputLayer", "config": config,
                "registered_name": None, **out}
    if "input_layers" in config:                  # a functional Model
        config["layers"] = [to_keras(layer) for layer in config["layers"]]
        return {"module": KERAS_MODELS["Functional"], "class_name": "Functional",
                "config": config, "registered_name": "Functional", **out}
    if name == "Sequential":
        layers = [to_keras(layer) for layer in config["layers"]]
        shape = config.get("build_input_shape")
        if shape is not None and layers:
            layers.insert(0, {"module": "keras.layers", "class_name": "InputLayer",
                              "config": {"batch_shape": shape, "dtype": "float32"},
                              "registered_name": None})
        config["layers"] = layers
        return {"module": "keras", "class_name": "Sequential", "config": config,
                "registered_name": None, **out}
    if name in KERAS_LAYERS:
        for key, value in config.items():         # initializers as Keras writes them
            if key.endswith("_initializer") and isinstance(value, dict):
                config[key] = {"module": "keras.initializers", **value, "registered_name": None}
        return {"module": "keras.layers", "class_name": name, "config": config,
                "registered_name": None, **out}
    return {**entry, "registered_name": name}     # minicnn's own: Keras cannot rebuild it


def from_keras(entry: dict, source: str) -> dict:
    """A Keras 3 config entry as minicnn's ``deserialize`` takes it; ValueError naming the
    layer for anything minicnn does not have."""
    if not isinstance(entry, dict) or "class_name" not in entry:
        raise ValueError(f"{source}: a layer entry needs 'class_name' and 'config', got "
                         f"{str(entry)[:120]}")
    name = entry["class_name"]
    module = entry.get("module") or ""
    config = dict(entry.get("config") or {})
    label = f"layer {config.get('name', entry.get('name'))!r} ({name})"
    out = {key: entry[key] for key in ("name", "inbound_nodes") if key in entry}
    if module.startswith("minicnn"):
        return {"module": module, "class_name": name, "config": config, **out}
    if name == "InputLayer":
        for flag in ("sparse", "ragged"):
            if config.get(flag):
                raise ValueError(f"{source}: {label} is {flag}; minicnn has dense inputs only")
        config["dtype"] = _dtype_name(config.get("dtype"), source, label)
        return {"class_name": name, "config": config, **out}
    if name in KERAS_MODELS:
        config["layers"] = [from_keras(layer, source) for layer in config.get("layers", [])]
        config.pop("dtype", None)
        return {"class_name": name, "config": config, **out}
    if name not in KERAS_LAYERS or not module.startswith("keras"):
        raise ValueError(f"{source}: {label} from module {module!r} is not a layer minicnn has; "
                         f"it rebuilds {sorted(KERAS_LAYERS)}, InputLayer and nested "
                         "Functional / Sequential models")
    cls = layer_class(name)
    accepted = _arguments(cls)
    clean = {}
    for key, value in config.items():
        if key == "dtype":
            clean[key] = _dtype_name(value, source, label)
        elif key.endswith("_initializer") and isinstance(value, dict):
            if _initializer(value) is not None:
                clean[key] = _initializer(value)
        elif key in accepted:
            clean[key] = value
        elif not (value is None or value is False or KERAS_DEFAULTS.get(key, object()) == value):
            raise ValueError(f"{source}: {label} uses {key}={value!r}, which minicnn's {name} "
                             "does not support")
    return {"class_name": name, "config": clean, **out}


def _arguments(cls) -> set:
    """Every keyword a layer class accepts, through its __init__ chain down to Layer."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, Layer):
            names.update(p.name for p in inspect.signature(klass.__init__).parameters.values()
                         if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self")
    return names


def _dtype_name(value, source, label) -> str:
    """Keras' dtype (a name or a DTypePolicy dict) as a NumPy dtype name minicnn computes in."""
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("name")
    value = value or "float32"
    if value not in ("float32", "float64"):
        raise ValueError(f"{source}: {label} has dtype policy {value!r}; minicnn computes in "
                         "float32 or float64")
    return value


def _initializer(value: dict):
    """A Keras initializer dict as minicnn's ``{"class_name", "config"}`` with the arguments
    minicnn's class takes (seeds are dropped: the weights come from the file); None for an
    initializer minicnn does not have (the layer keeps its default)."""
    from minicnn import initializers
    try:
        cls = type(initializers.get(value.get("class_name")))
    except (ValueError, TypeError):
        return None
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {"class_name": cls.__name__,
            "config": {k: v for k, v in (value.get("config") or {}).items() if k in accepted}}


def suffix_hint(filepath) -> str:
    """'' or a hint for a name that looks like Keras 2's single .h5 file."""
    name = os.fspath(filepath)
    return " (Keras 3 weights end in .weights.h5; Keras 2's .h5 models are not read)" \
        if name.endswith(".h5") and not name.endswith(".weights.h5") else ""
