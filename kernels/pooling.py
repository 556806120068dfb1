"""Pooling of NHWC images: max, average and global average, forward and backward side by side.

Shapes: ``x: (N, H, W, C) -> y: (N, Ho, Wo, C)``; sizes and padding from
``kernels.shapes.pool_geometry`` (strides default to the pool size; 'same' pads as Keras/TF, the odd
extra row/column at the bottom/right). Window (i, j) covers rows ``i*sh - top + a`` and columns
``j*sw - left + b``, 0 <= a < ph, 0 <= b < pw: the cell (a, b) of every window is the view
``tap(xpad, g, a, b)`` of ``kernels.windows``, and the kernels loop over the ph*pw cells::

    max:      y[n,i,j,c] = max_(a,b) xpad[n, i*sh+a, j*sw+b, c], padded cells -inf (they never win).
              argmax = the first cell k = a*pw + b (row-major) holding the maximum; backward sends
              dy[n,i,j,c] to that cell only, and overlapping windows add up.
    average:  y = (sum of the real cells of the window) / (how many there are): padded cells are
              left out of the mean, as in Keras/TF (PyTorch's count_include_pad=True differs).
    global:   y[n,c] = mean over (h, w) of x[n,h,w,c]; dx = dy / (H*W) everywhere.

Each ``*_reference`` twin loops over every output value. The tuned CPU twins (exact tilings by
reshape, batches on the threads) are in ``kernels/fast/pooling.py``, max pooling's CUDA forward in
``kernels/cuda/pool.py``.
"""
from __future__ import annotations

import numpy as np

from kernels.backend import get_array_module
from kernels.shapes import pool_geometry
from kernels.windows import check_images, check_shape, crop, pad, tap


def forward_geometry(fn, x, pool_size, strides, padding):
    """Check ``x: (N, H, W, C)`` and the settings; return the windows' ``Geometry``."""
    check_images(fn, "x", x)
    return pool_geometry(fn, x.shape[1:3], pool_size, strides=strides, padding=padding)


def backward_geometry(fn, dy, input_size, pool_size, strides, padding):
    """Check ``dy: (N, Ho, Wo, C)`` against the pooling of ``input_size`` (H, W) images."""
    check_images(fn, "dy", dy)
    g = pool_geometry(fn, input_size, pool_size, strides=strides, padding=padding)
    check_shape(fn, "dy", dy, (dy.shape[0], *g.out_hw, dy.shape[3]))
    return g


def argmax_dtype(pool_size):
    """The smallest integer type that holds a window offset 0 .. ph*pw - 1."""
    return np.uint8 if pool_size[0] * pool_size[1] <= 256 else np.int32


def lowest(dtype):
    """A padding value below every value of ``dtype``: -inf, or the smallest integer."""
    return -np.inf if np.dtype(dtype).kind == "f" else np.iinfo(dtype).min


def _padded_shape(dy, g):
    return (dy.shape[0], *g.padded_hw, dy.shape[3])


# -- max pooling ----------------------------------------------------------------------------------

def max_pool2d_forward(x, *, pool_size=2, strides=None, padding="valid", return_argmax=True):
    """Max pooling: ``y`` (and ``argmax``, same shape, the first cell of each window that holds
    the maximum) of ``x: (N, H, W, C)``."""
    g = forward_geometry("max_pool2d", x, pool_size, strides, padding)
    xpad = pad(x, g.pads, lowest(x.dtype))
    cells = [tap(xpad, g, a, b) for a, b in np.ndindex(*g.kernel_hw)]
    y = cells[0].copy()
    for cell in cells[1:]:
        get_array_module(x).maximum(y, cell, out=y)
    if not return_argmax:
        return y
    argmax = get_array_module(x).zeros(y.shape, dtype=argmax_dtype(g.kernel_hw))
    for k in reversed(range(len(cells))):             # the earliest cell holding y wins
        argmax[cells[k] == y] = k
    return y, argmax


def max_pool2d_backward(dy, argmax, *, input_size, pool_size=2, strides=None, padding="valid"):
    """``dx[cell k of window (i, j)] += dy[i, j]`` where ``argmax[i, j] == k``: ``dy, argmax:
    (N, Ho, Wo, C)`` -> ``(N, H, W, C)``."""
    g = backward_geometry("max_pool2d_backward", dy, input_size, pool_size, strides, padding)
    check_shape("max_pool2d_backward", "argmax", argmax, dy.shape)
    dxpad = get_array_module(dy).zeros(_padded_shape(dy, g), dtype=dy.dtype)
    for k, (a, b) in enumerate(np.ndindex(*g.kernel_hw)):
        tap(dxpad, g, a, b)[...] += dy * (argmax == k)      # a view: adds into dxpad
    return crop(dxpad, g.pads)


def max_pool2d_reference(x, *, pool_size=2, strides=None, padding="valid"):
    """Loops: y[n,i,j,c] = max of the real cells of the window, argmax = first cell attaining it."""
    g = forward_geometry("max_pool2d", x, pool_size, strides, padding)
    (top, _), (left, _) = g.pads
    y = np.empty((x.shape[0], *g.out_hw, x.shape[3]), dtype=x.dtype)
    argmax = np.empty(y.shape, dtype=argmax_dtype(g.kernel_hw))
    for n, i, j, c in np.ndindex(*y.shape):
        best, best_k = -np.inf, 0
        for k, (a, b) in enumerate(np.ndindex(*g.kernel_hw)):
            r, s = i * g.strides[0] - top + a, j * g.strides[1] - left + b
            if 0 <= r < x.shape[1] and 0 <= s < x.shape[2] and x[n, r, s, c] > best:
                best, best_k = x[n, r, s, c], k
        y[n, i, j, c], argmax[n, i, j, c] = best, best_k
    return y, argmax


def max_pool2d_backward_reference(dy, argmax, *, input_size, pool_size=2, strides=None,
                                  padding="valid"):
    g = backward_geometry("max_pool2d_backward", dy, input_size, pool_size, strides, padding)
    (top, _), (left, _) = g.pads
    dx = np.zeros((dy.shape[0], *g.in_hw, dy.shape[3]), dtype=dy.dtype)
    for n, i, j, c in np.ndindex(*dy.shape):
        a, b = divmod(int(argmax[n, i, j, c]), g.kernel_hw[1])
        dx[n, i * g.strides[0] - top + a, j * g.strides[1] - left + b, c] += dy[n, i, j, c]
    return dx


# -- average pooling ------------------------------------------------------------------------------

def window_counts(g, dtype, xp=np):
    """How many real (unpadded) cells each window holds: ``(1, Ho, Wo, 1)``."""
    ones = pad(xp.ones((1, *g.in_hw, 1), dtype=dtype), g.pads)
    counts = xp.zeros((1, *g.out_hw, 1), dtype=dtype)
    for a, b in np.ndindex(*g.kernel_hw):
        counts += tap(ones, g, a, b)
    return counts


def avg_pool2d_forward(x, *, pool_size=2, strides=None, padding="valid"):
    """Average pooling: ``y`` = the sum of each window's real cells / their count."""
    g = forward_geometry("avg_pool2d", x, pool_size, strides, padding)
    xp = get_array_module(x)
    xpad = pad(x, g.pads)
    y = xp.zeros((x.shape[0], *g.out_hw, x.shape[3]), dtype=x.dtype)
    for a, b in np.ndindex(*g.kernel_hw):
        y += tap(xpad, g, a, b)
    return y / window_counts(g, x.dtype, xp)


def avg_pool2d_backward(dy, *, input_size, pool_size=2, strides=None, padding="valid"):
    """``dx[cell of window (i, j)] += dy[i, j] / count[i, j]`` for every real cell of the window."""
    g = backward_geometry("avg_pool2d_backward", dy, input_size, pool_size, strides, padding)
    xp = get_array_module(dy)
    share = dy / window_counts(g, dy.dtype, xp)
    dxpad = xp.zeros(_padded_shape(dy, g), dtype=dy.dtype)
    for a, b in np.ndindex(*g.kernel_hw):
        tap(dxpad, g, a, b)[...] += share
    return crop(dxpad, g.pads)


def avg_pool2d_reference(x, *, pool_size=2, strides=None, padding="valid"):
    g = forward_geometry("avg_pool2d", x, pool_size, strides, padding)
    (top, _), (left, _) = g.pads
    y = np.empty((x.shape[0], *g.out_hw, x.shape[3]), dtype=x.dtype)
    for n, i, j, c in np.ndindex(*y.shape):
        total, count = 0.0, 0
        for a, b in np.ndindex(*g.kernel_hw):
            r, s = i * g.strides[0] - top + a, j * g.strides[1] - left + b
            if 0 <= r < x.shape[1] and 0 <= s < x.shape[2]:
                total, count = total + x[n, r, s, c], count + 1
        y[n, i, j, c] = total / count
    return y


def avg_pool2d_backward_reference(dy, *, input_size, pool_size=2, strides=None, padding="valid"):
    g = backward_geometry("avg_pool2d_backward", dy, input_size, pool_size, strides, padding)
    (top, _), (left, _) = g.pads
    h, w = g.in_hw
    dx = np.zeros((dy.shape[0], h, w, dy.shape[3]), dtype=dy.dtype)
    for n, i, j, c in np.ndindex(*dy.shape):
        cells = [(i * g.strides[0] - top + a, j * g.strides[1] - left + b)
                 for a, b in np.ndindex(*g.kernel_hw)]
        cells = [(r, s) for r, s in cells if 0 <= r < h and 0 <= s < w]
        for r, s in cells:
            dx[n, r, s, c] += dy[n, i, j, c] / len(cells)
    return dx


# -- global average pooling -----------------------------------------------------------------------

def global_avg_pool2d_forward(x, *, keepdims=False):
    """``y[n, c] = (1 / (H*W)) * sum_(h,w) x[n, h, w, c]``: ``(N, H, W, C) -> (N, C)`` or
    ``(N, 1, 1, C)``. Summed over H on contiguous (W*C) rows, then over W: faster and more
    accurate in float32 than one long running sum per channel."""
    check_images("global_avg_pool2d", "x", x)
    n, h, w, c = x.shape
    y = x.reshape(n, h, w * c).sum(axis=1).reshape(n, w, c).sum(axis=1)
    y /= h * w
    return y.reshape(n, 1, 1, c) if keepdims else y


def global_avg_pool2d_backward(dy, *, input_size):
    """``dx[n, h, w, c] = dy[n, c] / (H*W)``: ``dy: (N, C)`` or ``(N, 1, 1, C)`` ->
    ``(N, H, W, C)`` with (H, W) = ``input_size``."""
    h, w = (int(v) for v in input_size)
    if dy.ndim not in (2, 4) or dy.shape[1:-1] not in ((), (1, 1)):
        raise ValueError(f"global_avg_pool2d_backward: dy of shape {tuple(dy.shape)} must be "
                         "(N, C) or (N, 1, 1, C)")
    n, c = dy.shape[0], dy.shape[-1]
    dx = get_array_module(dy).empty((n, h, w, c), dtype=dy.dtype)
    dx[...] = dy.reshape(n, 1, 1, c) / (h * w)
    return dx


def global_avg_pool2d_reference(x):
    n_, h_, w_, c_ = x.shape
    y = np.empty((n_, c_), dtype=x.dtype)
    for n, c in np.ndindex(n_, c_):
        y[n, c] = sum(x[n, h, w, c] for h in range(h_) for w in range(w_)) / (h_ * w_)
    return y


def global_avg_pool2d_backward_reference(dy, *, input_size):
    h_, w_ = input_size
    dx = np.empty((dy.shape[0], h_, w_, dy.shape[-1]), dtype=dy.dtype)
    for n, h, w, c in np.ndindex(*dx.shape):
        dx[n, h, w, c] = dy[n, c] / (h_ * w_)
    return dx
