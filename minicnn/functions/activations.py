"""Differentiable activations (``minicnn.Function`` subclasses over ``kernels.activations``) and
``get(identifier)``, which turns a Keras activation name into a Tensor -> Tensor callable.

    relu(x)                            y = max(x, 0)                  dx = g [y > 0]
    leaky_relu(x, negative_slope=0.3)  y = x (x >= 0), a x (x < 0)    dx = g (1 if x > 0 else a)
    sigmoid(x)                         y = 1 / (1 + exp(-x))          dx = g y (1 - y)
    tanh(x)                            y = tanh(x)                    dx = g (1 - y^2)
    softmax(x, axis=-1)                y = exp(x) / sum exp(x)        dx = y (g - sum(g y))
    log_softmax(x, axis=-1)            z = x - log sum exp(x)         dx = g - exp(z) sum(g)
    relu(x, negative_slope=, max_value=, threshold=)   Keras' general ReLU (see ``GeneralReLU``)
    dropout(x, rate=)                  y = x * mask, mask = [u >= rate] / (1 - rate), dx = g * mask

Settings are keyword-only. ReLU runs through ``kernels.dispatch`` (its tuned CPU twin).
On the GPU, dropout draws its mask there, from a CuPy generator seeded once from the NumPy
generator it was given (``device_generator_for``): a GPU run repeats under ``minicnn.seed(n)``,
though with other masks than the CPU run.
"""
from __future__ import annotations

import numpy as np

from kernels import activations as K
from kernels import backend
from kernels import dispatch
from kernels.backend import get_array_module
from minicnn import rng
from minicnn.tensor import Function, as_tensor


class ReLU(Function):
    """y = max(x, 0); backward from the output: dx = g * [y > 0]."""

    def forward(self, x):
        self.y = dispatch.relu_forward(x)
        return self.y

    def backward(self, g):
        return dispatch.relu_backward(g, self.y)


class LeakyReLU(Function):
    """y = x for x >= 0, alpha * x otherwise; dx = g * (1 if x > 0 else alpha)."""

    def __init__(self, alpha=0.3):
        self.alpha = K.check_alpha(alpha)

    def forward(self, x):
        self.x = x
        return K.leaky_relu_forward(x, alpha=self.alpha)

    def backward(self, g):
        return K.leaky_relu_backward(g, self.x, alpha=self.alpha)


class GeneralReLU(Function):
    """Keras' ``relu(x, negative_slope, max_value, threshold)``:

        y = x * [x > threshold], clipped to [0, max_value] when max_value is given,
            minus negative_slope * max(threshold - x, 0)
        dx = g * ([x > threshold] * [0 < x < max_value, if clipped]
                  + negative_slope * [x < threshold])
    """

    def __init__(self, negative_slope=0.0, max_value=None, threshold=0.0):
        if negative_slope is None or negative_slope < 0:
            raise ValueError(f"relu: negative_slope must be >= 0, got {negative_slope}")
        if max_value is not None and max_value < 0:
            raise ValueError(f"relu: max_value must be >= 0, got {max_value}")
        if threshold is None:
            raise ValueError("relu: threshold must be a number, got None")
        self.negative_slope, self.max_value, self.threshold = (
            float(negative_slope), None if max_value is None else float(max_value),
            float(threshold))

    def forward(self, x):
        xp = get_array_module(x)
        self.x = x
        y = x * (x > self.threshold)
        if self.max_value is not None:
            y = xp.clip(y, 0, self.max_value)
        if self.negative_slope:
            y -= self.negative_slope * xp.maximum(self.threshold - x, 0)
        return y

    def backward(self, g):
        x = self.x
        passes = x > self.threshold
        if self.max_value is not None:
            passes &= (x > 0) & (x < self.max_value)
        dx = g * passes
        if self.negative_slope:
            dx += g * (x < self.threshold) * g.dtype.type(self.negative_slope)
        return dx


class Sigmoid(Function):
    """y = 1 / (1 + exp(-x)); dx = g * y * (1 - y)."""

    def forward(self, x):
        self.y = K.sigmoid_forward(x)
        return self.y

    def backward(self, g):
        return K.sigmoid_backward(g, self.y)


class Tanh(Function):
    """y = tanh(x); dx = g * (1 - y^2)."""

    def forward(self, x):
        self.y = K.tanh_forward(x)
        return self.y

    def backward(self, g):
        return K.tanh_backward(g, self.y)


class Softmax(Function):
    """y = exp(x - max) / sum(exp(x - max)) along ``axis``; dx = y * (g - sum(g * y))."""

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        self.y = K.softmax_forward(x, axis=self.axis)
        return self.y

    def backward(self, g):
        return K.softmax_backward(g, self.y, axis=self.axis)


class LogSoftmax(Function):
    """z = x - max - log(sum(exp(x - max))) along ``axis``; dx = g - exp(z) * sum(g)."""

    def __init__(self, axis=-1):
        self.axis = axis

    def forward(self, x):
        self.z = K.log_softmax_forward(x, axis=self.axis)
        return self.z

    def backward(self, g):
        return K.log_softmax_backward(g, self.z, axis=self.axis)


class Dropout(Function):
    """Inverted dropout: y = x * mask, mask = [u >= rate] / (1 - rate) with u ~ U[0, 1) drawn
    from ``generator`` (of shape ``noise_shape``, None entries taken from x, broadcast over x)."""

    def __init__(self, rate, generator, noise_shape=None):
        self.rate = K.check_dropout_rate(rate)
        self.generator, self.noise_shape = generator, noise_shape

    def forward(self, x):
        shape = resolve_noise_shape(self.noise_shape, x.shape)
        generator = device_generator_for(self.generator, x)
        self.mask = K.dropout_mask(shape, rate=self.rate, generator=generator, dtype=x.dtype,
                                  like=x)
        return K.dropout_forward(x, self.mask)

    def backward(self, g):
        return K.dropout_backward(g, self.mask)


DEVICE_GENERATORS: dict = {}     # id(numpy generator) -> (that generator, its GPU twin)
MAX_DEVICE_GENERATORS = 16       # forget the oldest beyond this (dropout(seed=...) makes many)


def device_generator_for(generator, like):
    """The generator to draw a mask for the array ``like`` with.

    ``generator`` itself for a NumPy ``like`` (or when it is not a NumPy Generator, e.g. already
    a GPU one). For a CuPy ``like``: a GPU generator seeded with one draw from ``generator``,
    made on first use and reused while ``generator`` is the same object, so the mask never
    crosses from host to device and ``minicnn.seed(n)`` (a new package generator) repeats a run.
    """
    if not backend.is_gpu_array(like) or not isinstance(generator, np.random.Generator):
        return generator
    entry = DEVICE_GENERATORS.get(id(generator))
    if entry is None or entry[0] is not generator:
        seed = int(generator.integers(2**63))
        entry = (generator, backend.device_generator(seed))
        DEVICE_GENERATORS.pop(id(generator), None)
        DEVICE_GENERATORS[id(generator)] = entry
        while len(DEVICE_GENERATORS) > MAX_DEVICE_GENERATORS:
            del DEVICE_GENERATORS[next(iter(DEVICE_GENERATORS))]
    return entry[1]


def resolve_noise_shape(noise_shape, shape):
    """Keras' noise_shape with its None entries filled from ``shape``; ValueError on a mismatch."""
    if noise_shape is None:
        return tuple(shape)
    noise_shape = tuple(noise_shape)
    if len(noise_shape) != len(shape):
        raise ValueError(f"dropout: noise_shape {noise_shape} has {len(noise_shape)} entries for "
                         f"an input of shape {tuple(shape)}")
    filled = tuple(n if d is None else int(d) for d, n in zip(noise_shape, shape))
    if any(d not in (1, n) for d, n in zip(filled, shape)):
        raise ValueError(f"dropout: noise_shape {noise_shape} does not broadcast to the input "
                         f"shape {tuple(shape)} (each entry must be 1, None or the input's size)")
    return filled


# -- functional forms -----------------------------------------------------------------------------


def relu(x, *, negative_slope=0.0, max_value=None, threshold=0.0):
    """max(x, 0); with Keras' options, ``GeneralReLU``'s formula."""
    if negative_slope == 0 and max_value is None and threshold == 0:
        return ReLU()(x)
    return GeneralReLU(negative_slope, max_value, threshold)(x)


def leaky_relu(x, *, negative_slope=0.3):
    """x for x >= 0, negative_slope * x otherwise (Keras 3 default slope 0.3; PyTorch's 0.01)."""
    return LeakyReLU(negative_slope)(x)


def sigmoid(x):
    return Sigmoid()(x)


def tanh(x):
    return Tanh()(x)


def softmax(x, *, axis=-1):
    return Softmax(axis)(x)


def log_softmax(x, *, axis=-1):
    return LogSoftmax(axis)(x)


def dropout(x, *, rate, noise_shape=None, seed=None, generator=None):
    """Inverted dropout (always applied: callers decide when training). The mask comes from
    ``generator``, else a fresh generator seeded with ``seed``, else ``minicnn.rng.generator()``."""
    if generator is None:
        generator = np.random.default_rng(seed) if seed is not None else rng.generator()
    return Dropout(rate, generator, noise_shape)(x)


def linear(x):
    """The identity (Keras' "linear" activation, also what ``None`` means)."""
    return as_tensor(x)


_ACTIVATIONS = {
    "relu": relu,
    "leaky_relu": leaky_relu,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "softmax": softmax,
    "log_softmax": log_softmax,
    "linear": linear,
}


def get(identifier):
    """A Tensor -> Tensor callable for an activation name, a callable, or None ("linear").

    Names: relu, leaky_relu, sigmoid, tanh, softmax, log_softmax, linear. A callable (a function
    or a layer) is returned as it is.
    """
    if identifier is None:
        return linear
    if isinstance(identifier, str):
        try:
            return _ACTIVATIONS[identifier]
        except KeyError:
            raise ValueError(f"activation: unknown name {identifier!r}; known activations are "
                             f"{sorted(_ACTIVATIONS)} (or None, or a callable)") from None
    if callable(identifier):
        return identifier
    raise TypeError(f"activation: expected a name, a callable or None, got "
                    f"{type(identifier).__name__}")


def serialize(activation):
    """The name of a known activation function (for get_config), else the callable's __name__."""
    for name, fn in _ACTIVATIONS.items():
        if fn is activation:
            return name
    return getattr(activation, "__name__", None)


__all__ = ["ReLU", "LeakyReLU", "GeneralReLU", "Sigmoid", "Tanh", "Softmax", "LogSoftmax",
           "Dropout", "dropout", "relu", "leaky_relu", "sigmoid", "tanh", "softmax", "log_softmax",
           "linear", "get", "serialize", "resolve_noise_shape", "device_generator_for"]
