"""Differentiable pooling and up-sampling over NHWC tensors (``kernels.pooling`` and
``kernels.upsampling``, run through ``kernels.dispatch``); settings keyword-only.

    max_pool2d(x, *, pool_size=2, strides=None, padding="valid")   x (N, H, W, C) -> (N, oh, ow, C)
        y = max over each window; dx: dy goes to the window's (first) maximum only
    avg_pool2d(x, *, pool_size=2, strides=None, padding="valid")
        y = mean of the window's real cells ('same' padding excluded from the count, as Keras)
    global_avg_pool2d(x, *, keepdims=False)                          (N, H, W, C) -> (N, C)
        y = mean over H and W; dx = dy / (H W) everywhere
    upsample2d(x, *, size=2, interpolation="nearest"|"bilinear")     -> (N, H sh, W sw, C)
        nearest repeats pixels; bilinear is Keras 3's resize (half-pixel centres, edges clamped)
"""
from __future__ import annotations

from kernels import dispatch as K
from kernels import pooling as P
from minicnn.tensor import Function


class MaxPool2D(Function):
    """Max pooling; keeps the winners' window offsets (argmax) for the backward."""

    def __init__(self, pool_size=2, strides=None, padding="valid"):
        self.settings = dict(pool_size=pool_size, strides=strides, padding=padding)

    def forward(self, x):
        self.input_size = x.shape[1:3]
        if not self.needs_input_grad[0]:
            return K.max_pool2d_forward(x, return_argmax=False, **self.settings)
        y, self.argmax = K.max_pool2d_forward(x, **self.settings)
        return y

    def backward(self, g):
        return K.max_pool2d_backward(g, self.argmax, input_size=self.input_size, **self.settings)


class AvgPool2D(Function):
    """Average pooling over the real (unpadded) cells of each window."""

    def __init__(self, pool_size=2, strides=None, padding="valid"):
        self.settings = dict(pool_size=pool_size, strides=strides, padding=padding)

    def forward(self, x):
        self.input_size = x.shape[1:3]
        return K.avg_pool2d_forward(x, **self.settings)

    def backward(self, g):
        return K.avg_pool2d_backward(g, input_size=self.input_size, **self.settings)


class GlobalAvgPool2D(Function):
    """Mean over H and W: (N, H, W, C) -> (N, C), or (N, 1, 1, C) with keepdims."""

    def __init__(self, keepdims=False):
        self.keepdims = bool(keepdims)

    def forward(self, x):
        self.input_size = x.shape[1:3]
        return P.global_avg_pool2d_forward(x, keepdims=self.keepdims)

    def backward(self, g):
        return P.global_avg_pool2d_backward(g, input_size=self.input_size)


class UpSample2D(Function):
    """Up-sampling by integer factors, 'nearest' or 'bilinear'."""

    def __init__(self, size=2, interpolation="nearest"):
        self.settings = dict(size=size, interpolation=interpolation)

    def forward(self, x):
        return K.upsample2d_forward(x, **self.settings)

    def backward(self, g):
        return K.upsample2d_backward(g, **self.settings)


def max_pool2d(x, *, pool_size=2, strides=None, padding="valid"):
    return MaxPool2D(pool_size, strides, padding)(x)


def avg_pool2d(x, *, pool_size=2, strides=None, padding="valid"):
    return AvgPool2D(pool_size, strides, padding)(x)


def global_avg_pool2d(x, *, keepdims=False):
    return GlobalAvgPool2D(keepdims)(x)


def upsample2d(x, *, size=2, interpolation="nearest"):
    return UpSample2D(size, interpolation)(x)
