"""Layer: the Keras-style building block that owns weights and calls differentiable functions.

A layer builds lazily on its first call (``build(input_shape)`` creates its weights, now that the
input channels are known), then ``call(inputs, training)`` computes its output. Called on the
symbolic tensor of ``Input(...)``, it records a node of a functional graph instead of computing.
"""
from __future__ import annotations

import re

import numpy as np

from kernels import backend
from minicnn import initializers, mixed_precision
from minicnn.tensor import Tensor

_name_counts: dict = {}


def unique_name(base: str) -> str:
    """'conv2d', 'conv2d_1', 'conv2d_2', ... as Keras names its layers."""
    count = _name_counts.get(base, 0)
    _name_counts[base] = count + 1
    return base if count == 0 else f"{base}_{count}"


def snake_case(name: str) -> str:
    """Keras' ``to_snake_case``: 'BatchNormalization' -> 'batch_normalization', 'Conv2D' ->
    'conv2d', 'ReLU' -> 're_lu' (default layer names and Keras' weight-file paths use it)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


# -- classes by name (Keras' deserialisation rule) ---------------------------------------------
_CLASSES: dict = {}


def register(cls, name: str | None = None):
    """Make ``cls`` findable by ``name`` (its class name by default) when a saved config is read.
    Every Layer subclass registers itself; minicnn's own classes keep their names."""
    name = name or cls.__name__
    known = _CLASSES.get(name)
    if known is None or not known.__module__.startswith("minicnn."):
        _CLASSES[name] = cls
    return cls


def layer_class(name: str):
    """The Layer subclass registered as ``name``; ValueError listing the known ones otherwise."""
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown layer or model class {name!r}; known: {sorted(_CLASSES)}"
                         ) from None


def serialize(layer) -> dict:
    """``{"module", "class_name", "config"}``: what ``deserialize`` rebuilds the layer from
    (Keras 3's form; a functional Model's config holds its layers and graph, see Model)."""
    return {"module": type(layer).__module__, "class_name": type(layer).__name__,
            "config": layer.get_config()}


def deserialize(entry: dict):
    """A new layer (or model) from ``serialize``'s dict: the class looked up by its name, then
    ``cls.from_config(entry["config"])``."""
    if not isinstance(entry, dict) or "class_name" not in entry:
        raise ValueError(f"a layer entry needs 'class_name' and 'config', got {entry!r:.200}")
    return layer_class(entry["class_name"]).from_config(dict(entry.get("config") or {}))


def format_shape(shape) -> str:
    return "(" + ", ".join("None" if s is None else str(s) for s in shape) + \
        ("," if len(shape) == 1 else "") + ")"


class SymbolicTensor:
    """A placeholder for a batch in the functional API: a shape (batch first, None = any), and
    the layer call that produces it (none for an ``Input``)."""

    def __init__(self, shape, layer=None, inputs=(), kwargs=None, name=None, dtype="float32"):
        self.shape = tuple(shape)
        self.layer = layer
        self.inputs = tuple(inputs)       # the symbolic tensors the layer was called on
        self.multiple = False             # whether the layer was called on a list
        self.kwargs = kwargs or {}
        self.name = name
        self.dtype = np.dtype(dtype)

    ndim = property(lambda self: len(self.shape))

    def __repr__(self) -> str:
        source = "Input" if self.layer is None else self.layer.name
        return f"SymbolicTensor(shape={format_shape(self.shape)}, from={source})"


def Input(shape, batch_size=None, name=None, dtype="float32") -> SymbolicTensor:  # noqa: N802
    """The entry of a functional model: ``Input((H, W, C))`` stands for a batch (N, H, W, C)."""
    shape = tuple(shape)
    if any(s is not None and (not isinstance(s, (int, np.integer)) or s < 1) for s in shape):
        raise ValueError(f"Input: shape must hold positive ints or None, got {shape}")
    return SymbolicTensor((batch_size,) + shape, name=name or unique_name("input_layer"),
                          dtype=dtype)


def shape_of(inputs):
    """The shape of a tensor, array or symbolic tensor; a list of shapes for a list."""
    if isinstance(inputs, (list, tuple)):
        return [shape_of(x) for x in inputs]
    return tuple(inputs.shape)


class Layer:
    """Base of every layer.

    Subclasses implement ``build(input_shape)`` (create weights with ``add_weight``),
    ``call(inputs, training=False)`` and, when the shape changes, ``compute_output_shape``.
    ``input_ndim`` (e.g. 4 for NHWC layers) is checked on every call.
    """

    input_ndim: int | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(cls)

    def __init__(self, name=None, trainable=True, dtype=None, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unexpected arguments {sorted(kwargs)}")
        object.__setattr__(self, "_layers", [])
        self.name = name or unique_name(snake_case(type(self).__name__))
        self.trainable = trainable
        self.dtype_policy = mixed_precision.get(dtype)   # None: the global policy, as Keras
        self.built = False
        self.built_input_shape = None
        self.output_shape = None          # of the last call, for summary()
        self._trainable_weights = []
        self._non_trainable_weights = []

    # -- dtypes (Keras' DTypePolicy; see minicnn.mixed_precision) --------------------------------
    @property
    def dtype(self) -> np.dtype:
        """The variable dtype: weights are created in it (Keras' ``layer.dtype``)."""
        return mixed_precision.as_dtype(self.dtype_policy.variable_dtype)

    @property
    def variable_dtype(self) -> np.dtype:
        return self.dtype

    @property
    def compute_dtype(self) -> np.dtype:
        """The dtype the layer computes in: its inputs and weights are cast to it."""
        return mixed_precision.as_dtype(self.dtype_policy.compute_dtype)

    def cast_weight(self, weight):
        """``weight`` as the layer computes with it: cast, differentiably, to the compute dtype
        under a mixed policy (so its gradient comes back in the variable dtype); itself
        otherwise, and None stays None (Keras' autocast of variables)."""
        if weight is None or not self.dtype_policy.is_mixed:
            return weight
        return mixed_precision.cast(weight, self.compute_dtype)

    # -- nested layers ------------------------------------------------------------------------
    def __setattr__(self, key, value):
        """Track sub-layers assigned as attributes (or in lists), in assignment order."""
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for item in candidates:
            if isinstance(item, Layer) and item is not self and \
                    all(item is not known for known in self._layers):
                self._layers.append(item)
        object.__setattr__(self, key, value)

    @property
    def layers(self) -> list:
        return list(self._layers)

    # -- weights --------------------------------------------------------------------------------
    def add_weight(self, name, shape, initializer="zeros", trainable=True, dtype=None) -> Tensor:
        """Create a weight of ``shape`` from an initializer name; Keras' order is creation order."""
        value = initializers.get(initializer)(tuple(shape), dtype=dtype or self.dtype)
        weight = Tensor(value, requires_grad=trainable, name=f"{self.name}/{name}")
        (self._trainable_weights if trainable else self._non_trainable_weights).append(weight)
        return weight

    @property
    def weights(self) -> list:
        """Own trainable, own non-trainable, then each sub-layer's weights (Keras' order)."""
        found = self._trainable_weights + self._non_trainable_weights
        for layer in self._layers:
            found += layer.weights
        return _unique(found)

    @property
    def trainable_weights(self) -> list:
        if not self.trainable:
            return []
        found = list(self._trainable_weights)
        for layer in self._layers:
            found += layer.trainable_weights
        return _unique(found)

    @property
    def non_trainable_weights(self) -> list:
        trainable = {id(w) for w in self.trainable_weights}
        return [w for w in self.weights if id(w) not in trainable]

    def get_weights(self) -> list:
        """Host copies of ``weights``, in Keras' order."""
        return [w.numpy() for w in self.weights]

    def set_weights(self, values) -> None:
        """Copy arrays into ``weights`` (same order and shapes as ``get_weights()``)."""
        weights = self.weights
        values = list(values)
        if len(values) != len(weights):
            raise ValueError(f"{type(self).__name__} '{self.name}': set_weights got {len(values)} "
                             f"arrays for {len(weights)} weights "
                             f"({[w.name for w in weights]})")
        for weight, value in zip(weights, values):
            value = backend.to_numpy(value.data if isinstance(value, Tensor) else value)
            if tuple(value.shape) != weight.shape:
                raise ValueError(f"{type(self).__name__} '{self.name}': weight {weight.name} has "
                                 f"shape {weight.shape}, got {tuple(value.shape)}")
            weight.data[...] = backend.to_device(value.astype(weight.dtype), weight.device)

    def count_params(self) -> int:
        return int(sum(w.size for w in self.weights))

    def zero_grad(self) -> None:
        """Forget every weight's gradient (before a new backward pass)."""
        for weight in self.weights:
            weight.grad = None

    def to(self, device: str):
        """Move every weight to ``device`` ('cpu' or 'gpu') in place; returns self."""
        for weight in self.weights:
            weight.data = backend.to_device(weight.data, device)
            weight.grad = None if weight.grad is None else backend.to_device(weight.grad, device)
        return self

    @property
    def device(self) -> str:
        weights = self.weights
        return weights[0].device if weights else "cpu"

    # -- calling --------------------------------------------------------------------------------
    def build(self, input_shape) -> None:
        """Create the weights once the input shape is known (batch dim included)."""

    def call(self, inputs, training=False):
        raise NotImplementedError(f"{type(self).__name__}.call")

    def compute_output_shape(self, input_shape):
        """Output shape for an input shape (batch dim included); identity by default."""
        return input_shape

    def get_config(self) -> dict:
        """The constructor's arguments, JSON-able, for saving the architecture."""
        return {"name": self.name, "trainable": self.trainable,
                "dtype": self.dtype_policy.name}      # a dtype name, or e.g. 'mixed_float16'

    @classmethod
    def from_config(cls, config: dict):
        """A new layer from ``get_config()``'s dict (Keras' rule: the constructor's arguments)."""
        return cls(**config)

    def __call__(self, inputs, training=False, **kwargs):
        flat = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if any(isinstance(x, SymbolicTensor) for x in flat):
            return self._call_symbolic(inputs, **kwargs)
        if isinstance(inputs, (list, tuple)):
            inputs = [self._autocast(self._as_input(x)) for x in inputs]
        else:
            inputs = self._autocast(self._as_input(inputs))
        self._prepare(shape_of(inputs))
        output = self.call(inputs, training=training, **kwargs)
        self.output_shape = shape_of(output)
        return output

    def _as_input(self, x) -> Tensor:
        """A Tensor as it is; an array as a constant Tensor, floats cast to the layer's compute
        dtype (as Keras casts inputs)."""
        if isinstance(x, Tensor):
            return x
        if not backend.is_gpu_array(x):
            x = np.asarray(x)
        if backend.is_floating(x.dtype) and x.dtype != self.compute_dtype:
            x = x.astype(self.compute_dtype)
        return Tensor(x)

    def _autocast(self, x: Tensor) -> Tensor:
        """Under a mixed policy, a floating tensor of another dtype is cast (differentiably) to
        the compute dtype, as Keras autocasts; a single-dtype layer leaves it to the layer."""
        if self.dtype_policy.is_mixed and backend.is_floating(x.dtype) and \
                x.dtype != self.compute_dtype:
            return mixed_precision.cast(x, self.compute_dtype)
        return x

    def _call_symbolic(self, inputs, **kwargs):
        shape = shape_of(inputs)
        self._prepare(shape)
        if self._layers:     # a composite layer: trace its call, which builds its sub-layers
            out_shape = shape_of(self.call(inputs, training=False, **kwargs))
        else:
            out_shape = self.compute_output_shape(shape)
        output = SymbolicTensor(out_shape, layer=self,
                                inputs=inputs if isinstance(inputs, (list, tuple)) else [inputs],
                                kwargs=kwargs)
        output.multiple = isinstance(inputs, (list, tuple))
        self.output_shape = output.shape
        return output

    def _prepare(self, shape) -> None:
        """Check the input's rank and channels; build on the first call."""
        if self.input_ndim is not None and len(shape) != self.input_ndim:
            raise ValueError(f"{type(self).__name__} '{self.name}': expected input of rank "
                             f"{self.input_ndim} (N, H, W, C), got shape {format_shape(shape)}")
        if not self.built:
            self.build(shape)
            self.built = True
            self.built_input_shape = shape
        elif self.weights and not isinstance(shape, list) and \
                shape[-1] != self.built_input_shape[-1]:
            raise ValueError(f"{type(self).__name__} '{self.name}': was built for input shape "
                             f"{format_shape(self.built_input_shape)}, got "
                             f"{format_shape(shape)} (channels {shape[-1]} instead of "
                             f"{self.built_input_shape[-1]})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"


register(Layer)


def _unique(weights) -> list:
    """Drop repeats (a layer reachable twice), keeping the first occurrence."""
    seen, out = set(), []
    for w in weights:
        if id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    return out
