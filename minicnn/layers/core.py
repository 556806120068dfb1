"""Core layers with Keras 3's names, arguments and defaults: activations, dropout, the merge
"bridges" of skip connections (Add, Concatenate), Flatten and Dense.

    Activation(activation)      y = f(x), f from ``minicnn.functions.activations.get``
    ReLU(max_value=None, negative_slope=0.0, threshold=0.0)
                                y = max(x, 0) by default (Keras' general formula otherwise)
    LeakyReLU(negative_slope=0.3)   y = x (x >= 0), negative_slope * x (x < 0)  (PyTorch: 0.01)
    Softmax(axis=-1)            y = exp(x) / sum exp(x) along axis
    Dropout(rate, noise_shape=None, seed=None)
                                training: y = x * [u >= rate] / (1 - rate); otherwise y = x
    Add()                       [x1, x2, ...] (equal shapes) -> x1 + x2 + ...
    Concatenate(axis=-1)        [x1, x2, ...] -> joined along axis (other axes equal)
    Flatten()                   (N, d1, d2, ...) -> (N, d1 * d2 * ...), C order (NHWC)
    Dense(units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
          bias_initializer="zeros")
                                x (..., in) -> y = f(x @ kernel + bias) (..., units);
                                kernel (in, units), bias (units,)
"""
from __future__ import annotations

import math

import numpy as np

from minicnn import initializers
from minicnn.functions import activations as A
from minicnn.functions import math as M
from minicnn.layers.base import Layer, format_shape
from minicnn.tensor import Tensor


def initializer_config(identifier):
    """A JSON-able form of an initializer argument (names stay names)."""
    if isinstance(identifier, (str, dict)) or identifier is None:
        return identifier
    return initializers.serialize(identifier)


def _activation_name(identifier):
    """A JSON-able name for get_config (a known function's name, else the callable's name)."""
    if identifier is None or isinstance(identifier, str):
        return "linear" if identifier is None else identifier
    return A.serialize(identifier)


# -- activations ----------------------------------------------------------------------------------


class Activation(Layer):
    """y = activation(x), any shape. ``activation``: a name (relu, leaky_relu, sigmoid, tanh,
    softmax, log_softmax, linear), None (linear) or a callable Tensor -> Tensor."""

    def __init__(self, activation, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.activation = activation
        self.fn = A.get(activation)

    def call(self, inputs, training=False):
        return self.fn(inputs)

    def get_config(self):
        return {**super().get_config(), "activation": _activation_name(self.activation)}


class ReLU(Layer):
    """Keras' ReLU: y = max(x, 0) with the defaults; in general
    y = x for threshold < x < max_value, max_value above it, negative_slope * (x - threshold)
    below the threshold (see ``minicnn.functions.activations.GeneralReLU``)."""

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if max_value is not None and max_value < 0:
            raise ValueError(f"ReLU: max_value cannot be negative, got {max_value}")
        if negative_slope is None or negative_slope < 0:
            raise ValueError(f"ReLU: negative_slope cannot be None or negative, got "
                             f"{negative_slope}")
        if threshold is None or threshold < 0:
            raise ValueError(f"ReLU: threshold cannot be None or negative, got {threshold}")
        self.max_value = None if max_value is None else float(max_value)
        self.negative_slope, self.threshold = float(negative_slope), float(threshold)

    def call(self, inputs, training=False):
        return A.relu(inputs, negative_slope=self.negative_slope, max_value=self.max_value,
                      threshold=self.threshold)

    def get_config(self):
        return {**super().get_config(), "max_value": self.max_value,
                "negative_slope": self.negative_slope, "threshold": self.threshold}


class LeakyReLU(Layer):
    """y = x for x >= 0, negative_slope * x otherwise (Keras 3 default 0.3, PyTorch's 0.01);
    dy/dx = 1 for x > 0, negative_slope otherwise."""

    def __init__(self, negative_slope=0.3, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if negative_slope is None or negative_slope < 0:
            raise ValueError(f"LeakyReLU: negative_slope cannot be None or negative, got "
                             f"{negative_slope}")
        self.negative_slope = float(negative_slope)

    def call(self, inputs, training=False):
        return A.leaky_relu(inputs, negative_slope=self.negative_slope)

    def get_config(self):
        return {**super().get_config(), "negative_slope": self.negative_slope}


class Softmax(Layer):
    """y = exp(x - max) / sum(exp(x - max)) along ``axis`` (default the last: channels)."""

    def __init__(self, axis=-1, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.axis = axis

    def call(self, inputs, training=False):
        return A.softmax(inputs, axis=self.axis)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


# -- dropout --------------------------------------------------------------------------------------


class Dropout(Layer):
    """training=True: y = x * [u >= rate] / (1 - rate), u ~ U[0, 1) per element (or per
    ``noise_shape`` entry, broadcast); training=False: y = x. The mask comes from a generator
    seeded with ``seed``, else from ``minicnn.rng.generator()`` (so ``minicnn.seed(n)`` repeats
    it)."""

    def __init__(self, rate, noise_shape=None, seed=None, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"Dropout: rate must be a float between 0 and 1, got {rate!r}")
        self.rate = float(rate)
        self.noise_shape = None if noise_shape is None else tuple(noise_shape)
        self.seed = seed
        self.generator = None if seed is None else np.random.default_rng(seed)

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        if self.rate == 1:                  # Keras: everything dropped
            return inputs * 0
        return A.dropout(inputs, rate=self.rate, noise_shape=self.noise_shape,
                         generator=self.generator)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "noise_shape": self.noise_shape,
                "seed": self.seed}


# -- merges: the bridges of skip connections -------------------------------------------------------


def _same(a, b) -> bool:
    """Two dimensions agree (None, an unknown size, agrees with anything)."""
    return a is None or b is None or a == b


def _check_list(layer, inputs):
    """The shapes of a list of tensors (call) or the list of shapes itself (build, output shape);
    ValueError for anything else (one tensor, one shape)."""
    if isinstance(inputs, (list, tuple)) and inputs:
        if all(hasattr(x, "shape") for x in inputs):
            return [tuple(x.shape) for x in inputs]
        if isinstance(inputs, list) and all(isinstance(x, tuple) for x in inputs):
            return [tuple(x) for x in inputs]
    raise ValueError(f"{type(layer).__name__} '{layer.name}': expects a list of tensors, "
                     f"got {type(inputs).__name__}"
                     + (f" of shape {format_shape(inputs)}" if isinstance(inputs, tuple) else ""))


class Add(Layer):
    """[x1, x2, ...] -> x1 + x2 + ...; all shapes must be equal: no broadcasting, so a skip
    connection of the wrong size fails here, naming both shapes."""

    def _check(self, shapes):
        first = shapes[0]
        for shape in shapes[1:]:
            if len(shape) != len(first) or not all(_same(a, b) for a, b in zip(shape, first)):
                raise ValueError(f"Add '{self.name}': inputs must have equal shapes, got "
                                 f"{format_shape(first)} and {format_shape(shape)}")

    def build(self, input_shape):
        self._check(_check_list(self, input_shape))

    def compute_output_shape(self, input_shape):
        shapes = _check_list(self, input_shape)
        self._check(shapes)
        return tuple(next((d for d in dims if d is not None), None) for dims in zip(*shapes))

    def call(self, inputs, training=False):
        self._check(_check_list(self, inputs))
        total = inputs[0]
        for x in inputs[1:]:
            total = total + x
        return total


class Concatenate(Layer):
    """[x1, x2, ...] -> joined along ``axis`` (default the channels); every other axis must
    agree exactly, else ValueError naming the shapes (no cropping, no broadcasting)."""

    def __init__(self, axis=-1, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if not isinstance(axis, int) or isinstance(axis, bool):
            raise TypeError(f"Concatenate: axis must be an int, got {axis!r}")
        self.axis = axis

    def _check(self, shapes):
        first = shapes[0]
        ndim = len(first)
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"Concatenate '{self.name}': axis {self.axis} is out of range for "
                             f"input shape {format_shape(first)}")
        axis = self.axis % ndim
        for shape in shapes[1:]:
            if len(shape) != ndim or not all(_same(a, b) for i, (a, b) in
                                             enumerate(zip(shape, first)) if i != axis):
                raise ValueError(f"Concatenate '{self.name}': inputs must match except on axis "
                                 f"{self.axis}, got {format_shape(first)} and "
                                 f"{format_shape(shape)}")
        return axis

    def build(self, input_shape):
        self._check(_check_list(self, input_shape))

    def compute_output_shape(self, input_shape):
        shapes = _check_list(self, input_shape)
        axis = self._check(shapes)
        out = []
        for i, dims in enumerate(zip(*shapes)):
            if i == axis:
                out.append(None if any(d is None for d in dims) else sum(dims))
            else:
                out.append(next((d for d in dims if d is not None), None))
        return tuple(out)

    def call(self, inputs, training=False):
        self._check(_check_list(self, inputs))
        return M.concatenate(list(inputs), axis=self.axis)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


# -- reshaping and dense --------------------------------------------------------------------------


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...), in C order (for NHWC: h, then w, then c),
    as Keras with channels_last."""

    def __init__(self, data_format=None, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if data_format not in (None, "channels_last"):
            raise ValueError(f"Flatten: only data_format='channels_last' is supported, got "
                             f"{data_format!r}")

    def compute_output_shape(self, input_shape):
        rest = input_shape[1:]
        return (input_shape[0], None if any(d is None for d in rest) else math.prod(rest))

    def call(self, inputs, training=False):
        return M.reshape(inputs, (inputs.shape[0], -1))

    def get_config(self):
        return {**super().get_config(), "data_format": "channels_last"}


class Dense(Layer):
    """x (..., in) -> y = activation(x @ kernel + bias): (..., units); kernel (in, units),
    bias (units,), as Keras (PyTorch's Linear stores weight (units, in))."""

    def __init__(self, units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
                 name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        for arg, value in (("kernel_regularizer", kernel_regularizer),
                           ("bias_regularizer", bias_regularizer),
                           ("activity_regularizer", activity_regularizer),
                           ("kernel_constraint", kernel_constraint),
                           ("bias_constraint", bias_constraint)):
            if value is not None:
                raise ValueError(f"Dense: {arg} is not supported (got {value!r})")
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"Dense: units must be a positive int, got {units!r}")
        self.units, self.use_bias = int(units), bool(use_bias)
        self.activation = activation
        self.fn = A.get(activation)
        self.kernel_initializer, self.bias_initializer = kernel_initializer, bias_initializer
        self.bias = None

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(f"Dense '{self.name}': input needs a known last axis, got shape "
                             f"{format_shape(input_shape)}")
        self.kernel = self.add_weight("kernel", (input_shape[-1], self.units),
                                      self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.units,), self.bias_initializer)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def call(self, inputs, training=False):
        if not isinstance(inputs, Tensor):
            inputs = Tensor(inputs)
        lead = inputs.shape[:-1]
        x = inputs if inputs.ndim == 2 else M.reshape(inputs, (-1, inputs.shape[-1]))
        y = x @ self.cast_weight(self.kernel)
        if self.bias is not None:
            y = y + self.cast_weight(self.bias)
        if inputs.ndim != 2:
            y = M.reshape(y, tuple(lead) + (self.units,))
        return self.fn(y)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "activation": _activation_name(self.activation), "use_bias": self.use_bias,
                "kernel_initializer": initializer_config(self.kernel_initializer),
                "bias_initializer": initializer_config(self.bias_initializer)}
