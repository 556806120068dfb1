"""Weight initializers, named and parameterised as in Keras 3 (``keras.initializers``).

An initializer is a callable ``init(shape, dtype="float32") -> np.ndarray``. Random ones draw
from the package generator ``minicnn.rng.generator()``, so ``minicnn.seed(n)`` repeats them.

Fans follow Keras' ``compute_fans`` for any rank:

    shape ()                 fan_in = fan_out = 1
    shape (n,)               fan_in = fan_out = n
    shape (in, out)          dense kernel
    shape (k1, ..., in, out) convolution kernel (HWIO): receptive = k1 * ... * kd,
                             fan_in = in * receptive, fan_out = out * receptive
                             (a depthwise kernel (kh, kw, in, multiplier) uses the same rule)

Variance scaling (Keras ``VarianceScaling``): ``s = scale / max(1, n)`` with ``n`` = fan_in, fan_out
or (fan_in + fan_out) / 2, then

    uniform           U(-sqrt(3 s), sqrt(3 s))
    truncated_normal  N(0, sigma) cut at two sigma and redrawn, sigma = sqrt(s) / 0.87962566103423978
                      (the std of a unit normal cut at +-2), so the drawn values have variance s
    untruncated_normal N(0, sqrt(s))

As in Keras, the lower-case names are aliases of the classes: ``glorot_uniform()`` is
``GlorotUniform()``; ``get("glorot_uniform")`` returns an instance.
PyTorch differs: ``nn.init.xavier_normal_`` / ``kaiming_normal_`` draw an untruncated normal, and
its default Conv2d/Linear init is kaiming_uniform with a=sqrt(5), not glorot_uniform.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from kernels import backend
from minicnn import rng
from minicnn.registry import Configurable, resolve

# Standard deviation of a unit normal truncated to [-2, 2] (Keras divides by it).
TRUNCATED_NORMAL_STD = 0.87962566103423978


def _generator():
    return rng.generator()


def _check_shape(shape, who):
    """``shape`` as a tuple of non-negative Python ints, or a ValueError naming ``who``."""
    if isinstance(shape, numbers.Integral):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{who}: shape must be a tuple of ints, got {shape!r}") from None
    for d in dims:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 0:
            raise ValueError(f"{who}: shape must be a tuple of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def _check_float_dtype(dtype, who):
    dt = np.dtype(dtype)
    if not backend.is_floating(dt):
        raise TypeError(f"{who}: dtype must be a floating dtype, got {dt}")
    return dt


def compute_fans(shape):
    """(fan_in, fan_out) of a weight ``shape``, Keras' rule (see the module docstring)."""
    shape = _check_shape(shape, "compute_fans")
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def draw_truncated_normal(shape, mean=0.0, stddev=1.0, generator=None):
    """float64 draws of N(mean, stddev) kept within mean +- 2 stddev (out-of-range ones redrawn)."""
    gen = _generator() if generator is None else generator
    values = gen.standard_normal(math.prod(shape))
    outside = np.abs(values) > 2.0
    while outside.any():
        values[outside] = gen.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2.0
    values *= stddev
    values += mean
    return values.reshape(shape)


class Initializer(Configurable):
    """Base class: ``init(shape, dtype="float32") -> np.ndarray``; ``get_config()`` gives its arguments."""

    def __call__(self, shape, dtype="float32"):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(shape, dtype)")

    def get_config(self):
        return {}


# ----------------------------------------------------------------------------- constants

class Constant(Initializer):
    """Every entry equals ``value`` (Keras ``Constant(value=0.0)``)."""

    def __init__(self, value=0.0):
        if not isinstance(value, numbers.Number):
            raise TypeError(f"Constant: value must be a scalar number, got {type(value).__name__}")
        self.value = value

    def __call__(self, shape, dtype="float32"):
        shape = _check_shape(shape, type(self).__name__)
        return np.full(shape, self.value, dtype=np.dtype(dtype))

    def get_config(self):
        return {"value": self.value}


class Zeros(Constant):
    """All zeros (Keras ``Zeros``; the default bias initializer)."""

    def __init__(self):
        super().__init__(0.0)

    def get_config(self):
        return {}


class Ones(Constant):
    """All ones (Keras ``Ones``; BatchNormalization's gamma)."""

    def __init__(self):
        super().__init__(1.0)

    def get_config(self):
        return {}


class Identity(Initializer):
    """``gain * eye(rows, cols)`` for a 2D shape (Keras ``Identity(gain=1.0)``)."""

    def __init__(self, gain=1.0):
        self.gain = gain

    def __call__(self, shape, dtype="float32"):
        shape = _check_shape(shape, "Identity")
        if len(shape) != 2:
            raise ValueError(f"Identity: needs a 2D shape, got shape={shape}")
        return (self.gain * np.eye(*shape)).astype(np.dtype(dtype))

    def get_config(self):
        return {"gain": self.gain}


# ----------------------------------------------------------------------------- plain random

class RandomNormal(Initializer):
    """N(mean, stddev), Keras defaults mean=0.0, stddev=0.05."""

    def __init__(self, mean=0.0, stddev=0.05):
        self.mean = mean
        self.stddev = stddev

    def __call__(self, shape, dtype="float32"):
        shape = _check_shape(shape, "RandomNormal")
        dt = _check_float_dtype(dtype, "RandomNormal")
        return _generator().normal(self.mean, self.stddev, size=shape).astype(dt)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(Initializer):
    """N(mean, stddev) cut at mean +- 2 stddev, Keras defaults mean=0.0, stddev=0.05."""

    def __init__(self, mean=0.0, stddev=0.05):
        self.mean = mean
        self.stddev = stddev

    def __call__(self, shape, dtype="float32"):
        shape = _check_shape(shape, "TruncatedNormal")
        dt = _check_float_dtype(dtype, "TruncatedNormal")
        return draw_truncated_normal(shape, self.mean, self.stddev).astype(dt)

    def get_config(self):
        return {"mean": self.mean, "stddev": self.stddev}


class RandomUniform(Initializer):
    """U(minval, maxval), Keras defaults minval=-0.05, maxval=0.05."""

    def __init__(self, minval=-0.05, maxval=0.05):
        self.minval = minval
        self.maxval = maxval

    def __call__(self, shape, dtype="float32"):
        shape = _check_shape(shape, "RandomUniform")
        dt = _check_float_dtype(dtype, "RandomUniform")
        return _generator().uniform(self.minval, self.maxval, size=shape).astype(dt)

    def get_config(self):
        return {"minval": self.minval, "maxval": self.maxval}


# ----------------------------------------------------------------------------- variance scaling

class VarianceScaling(Initializer):
    """Keras ``VarianceScaling(scale=1.0, mode="fan_in", distribution="truncated_normal")``.

    s = scale / max(1, n), n from ``mode``; draws have variance s (see the module docstring).
    ``distribution="normal"`` means "truncated_normal", as in Keras.
    """

    MODES = ("fan_in", "fan_out", "fan_avg")
    DISTRIBUTIONS = ("truncated_normal", "untruncated_normal", "uniform")

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal"):
        name = type(self).__name__
        if not scale > 0.0:
            raise ValueError(f"{name}: scale must be a positive float, got scale={scale}")
        if mode not in self.MODES:
            raise ValueError(f"{name}: mode must be one of {self.MODES}, got mode={mode!r}")
        distribution = str(distribution).lower()
        if distribution == "normal":
            distribution = "truncated_normal"
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"{name}: distribution must be one of {self.DISTRIBUTIONS}, "
                             f"got distribution={distribution!r}")
        self.scale = float(scale)
        self.mode = mode
        self.distribution = distribution

    def variance(self, shape):
        """The variance ``s`` of the values drawn for ``shape``."""
        fan_in, fan_out = compute_fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        return self.scale / max(1.0, n)

    def __call__(self, shape, dtype="float32"):
        name = type(self).__name__
        shape = _check_shape(shape, name)
        dt = _check_float_dtype(dtype, name)
        s = self.variance(shape)
        if self.distribution == "uniform":
            limit = math.sqrt(3.0 * s)
            values = _generator().uniform(-limit, limit, size=shape)
        elif self.distribution == "truncated_normal":
            values = draw_truncated_normal(shape, 0.0, math.sqrt(s) / TRUNCATED_NORMAL_STD)
        else:
            values = _generator().normal(0.0, math.sqrt(s), size=shape)
        return values.astype(dt)

    def get_config(self):
        return {"scale": self.scale, "mode": self.mode, "distribution": self.distribution}


class _FixedVarianceScaling(VarianceScaling):
    """A named VarianceScaling whose settings are fixed (its config is empty)."""
    SETTINGS = {}

    def __init__(self):
        super().__init__(**self.SETTINGS)

    def get_config(self):
        return {}


class GlorotUniform(_FixedVarianceScaling):
    """U(-limit, limit), limit = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010; Keras default)."""
    SETTINGS = {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform"}


class GlorotNormal(_FixedVarianceScaling):
    """Truncated normal with variance 2 / (fan_in + fan_out) (Keras; PyTorch's xavier_normal_
    is untruncated)."""
    SETTINGS = {"scale": 1.0, "mode": "fan_avg", "distribution": "truncated_normal"}


class HeNormal(_FixedVarianceScaling):
    """Truncated normal with variance 2 / fan_in (He et al. 2015; Keras truncates, PyTorch does not)."""
    SETTINGS = {"scale": 2.0, "mode": "fan_in", "distribution": "truncated_normal"}


class HeUniform(_FixedVarianceScaling):
    """U(-limit, limit), limit = sqrt(6 / fan_in) (He et al. 2015)."""
    SETTINGS = {"scale": 2.0, "mode": "fan_in", "distribution": "uniform"}


class LecunNormal(_FixedVarianceScaling):
    """Truncated normal with variance 1 / fan_in (Klambauer et al. 2017)."""
    SETTINGS = {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal"}


class LecunUniform(_FixedVarianceScaling):
    """U(-limit, limit), limit = sqrt(3 / fan_in)."""
    SETTINGS = {"scale": 1.0, "mode": "fan_in", "distribution": "uniform"}


class Orthogonal(Initializer):
    """``gain`` times an orthogonal matrix from the QR of a normal draw, reshaped (Keras ``Orthogonal``).

    The matrix is (prod(shape[:-1]), shape[-1]); Q's columns are sign-fixed by diag(R).
    """

    def __init__(self, gain=1.0):
        self.gain = gain

    def __call__(self, shape, dtype="float32"):
        shape = _check_shape(shape, "Orthogonal")
        dt = _check_float_dtype(dtype, "Orthogonal")
        if len(shape) < 2:
            raise ValueError(f"Orthogonal: needs a shape of rank >= 2, got shape={shape}")
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = _generator().standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))
        if rows < cols:
            q = q.T
        return (self.gain * q).reshape(shape).astype(dt)

    def get_config(self):
        return {"gain": self.gain}


# Keras' lower-case aliases (they name the classes, as in ``keras.initializers``).
zeros = Zeros
ones = Ones
constant = Constant
identity = Identity
random_normal = RandomNormal
random_uniform = RandomUniform
truncated_normal = TruncatedNormal
variance_scaling = VarianceScaling
glorot_uniform = GlorotUniform
glorot_normal = GlorotNormal
he_normal = HeNormal
he_uniform = HeUniform
lecun_normal = LecunNormal
lecun_uniform = LecunUniform
orthogonal = Orthogonal

_CLASSES = (Zeros, Ones, Constant, Identity, RandomNormal, RandomUniform, TruncatedNormal,
            VarianceScaling, GlorotUniform, GlorotNormal, HeNormal, HeUniform, LecunNormal,
            LecunUniform, Orthogonal)


def _snake_case(name):
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i > 0:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


# name -> class: CamelCase class names, their snake_case, and Keras' short aliases.
_REGISTRY = {cls.__name__: cls for cls in _CLASSES}
_REGISTRY.update({_snake_case(cls.__name__): cls for cls in _CLASSES})
_REGISTRY.update({"uniform": RandomUniform, "normal": RandomNormal, "one": Ones, "zero": Zeros})


def serialize(initializer):
    """A JSON-able description ``{"class_name": ..., "config": {...}}`` that ``get`` accepts back."""
    initializer = get(initializer)
    name = type(initializer).__name__
    if _REGISTRY.get(name) is not type(initializer):
        raise ValueError(f"initializers.serialize: cannot serialize the custom initializer {initializer!r}")
    return {"class_name": name, "config": initializer.get_config()}


def get(identifier):
    """An initializer from a name ("glorot_uniform", "GlorotUniform", "zeros" ...), a
    ``{"class_name", "config"}`` dict, a class, an instance or any callable ``f(shape, dtype)``.
    ``None`` gives ``None``. Unknown names raise ValueError listing the known ones.
    """
    return resolve(identifier, "initializer", Initializer, _REGISTRY, _REGISTRY)
