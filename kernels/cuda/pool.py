"""GPU max pooling (``pool.cu``): forward with the argmax of each window, backward as a gather.

Same signatures and results as ``kernels.pooling.max_pool2d_forward`` / ``max_pool2d_backward``;
CuPy arrays in and out. Window sizes and padding come from ``kernels.shapes.pool2d_geometry``.
"""
from __future__ import annotations

import numpy as np

from kernels import backend
from kernels.cuda import runtime as rt
from kernels.shapes import normalize_tuple, pool2d_geometry

SOURCE = "pool.cu"
INDEX_SUFFIX = {np.dtype(np.uint8): "u8", np.dtype(np.int32): "i32"}


def argmax_dtype(pool):
    """uint8 when a window has at most 256 cells, else int32 (``kernels.pooling.argmax_dtype``)."""
    return np.uint8 if pool[0] * pool[1] <= 256 else np.int32


def _geometry(fn, x_shape, pool_size, strides, padding):
    """(pool, strides, out_hw, pads), validated by kernels.shapes; ValueError names ``fn``."""
    if len(x_shape) != 4:
        raise ValueError(f"{fn}: expected images of shape (N, H, W, C), got shape {tuple(x_shape)}")
    pool = normalize_tuple(pool_size, 2, "pool_size", minimum=1)
    strides = pool if strides is None else normalize_tuple(strides, 2, "strides", minimum=1)
    try:
        out_hw, pads = pool2d_geometry(tuple(x_shape[1:3]), pool, strides, padding)
    except ValueError as exc:
        raise ValueError(f"{fn}: input of shape {tuple(x_shape)}, pool_size={pool}, "
                         f"strides={strides}, padding={padding!r}: {exc}") from None
    return pool, strides, out_hw, pads


def _args(x_shape, pool, strides, out_hw, pads):
    n, height, width, c = x_shape
    (top, _), (left, _) = pads
    return [rt.i64(v) for v in (n, height, width, c, *out_hw, *pool, *strides, top, left)]


def max_pool2d_forward_gpu(x, pool_size=(2, 2), strides=None, padding="valid", return_argmax=True):
    """Max pooling. x: (N, H, W, C) -> y: (N, Ho, Wo, C) [, argmax: same shape].

    argmax = a*pw + b, the first cell (row-major window order) holding the maximum; padded cells
    never win. argmax dtype: uint8 (windows of <= 256 cells) or int32. One thread per output.
    Mirrors ``kernels.pooling.max_pool2d_forward``.
    """
    fn = "max_pool2d_forward_gpu"
    rt.require_gpu(fn, "kernels.pooling.max_pool2d_forward", x=x)
    pool, strides, out_hw, pads = _geometry(fn, x.shape, pool_size, strides, padding)
    suffix = rt.dtype_suffix(fn, x.dtype)
    xp = backend.get_array_module(x)
    x = rt.contiguous(x)
    n, _, _, c = x.shape
    y = xp.empty((n, *out_hw, c), dtype=x.dtype)
    argmax = xp.empty(y.shape, dtype=argmax_dtype(pool))
    index = INDEX_SUFFIX[argmax.dtype]
    rt.launch(SOURCE, f"max_pool2d_forward_{suffix}_{index}", y.size,
              [x, y, argmax, *_args(x.shape, pool, strides, out_hw, pads)])
    return (y, argmax) if return_argmax else y


def max_pool2d_backward_gpu(dy, argmax, x_shape, pool_size=(2, 2), strides=None, padding="valid"):
    """dx[cell k of window (i, j)] += dy[i, j] where argmax[i, j] == k. dy, argmax: (N, Ho, Wo, C).

    A gather: each input element sums, in a fixed order, the windows whose argmax points at it
    (deterministic, no atomics). Mirrors ``kernels.pooling.max_pool2d_backward``.
    """
    fn = "max_pool2d_backward_gpu"
    rt.require_gpu(fn, "kernels.pooling.max_pool2d_backward", dy=dy, argmax=argmax)
    x_shape = tuple(int(s) for s in x_shape)
    pool, strides, out_hw, pads = _geometry(fn, x_shape, pool_size, strides, padding)
    suffix = rt.dtype_suffix(fn, dy.dtype)
    expected = (x_shape[0], *out_hw, x_shape[3])
    if tuple(dy.shape) != expected:
        raise ValueError(f"{fn}: dy of shape {tuple(dy.shape)} does not match the pooled shape "
                         f"{expected} of input {x_shape}")
    if tuple(argmax.shape) != tuple(dy.shape):
        raise ValueError(f"{fn}: argmax shape {tuple(argmax.shape)} differs from dy shape "
                         f"{tuple(dy.shape)}")
    if argmax.dtype.kind not in "iu":
        raise TypeError(f"{fn}: argmax must hold integer window offsets, got dtype {argmax.dtype}")
    if argmax.dtype not in INDEX_SUFFIX:
        argmax = argmax.astype(np.int32)
    xp = backend.get_array_module(dy)
    dy, argmax = rt.contiguous(dy), rt.contiguous(argmax)
    dx = xp.empty(x_shape, dtype=dy.dtype)
    index = INDEX_SUFFIX[argmax.dtype]
    rt.launch(SOURCE, f"max_pool2d_backward_{suffix}_{index}", dx.size,
              [dy, argmax, dx, *_args(x_shape, pool, strides, out_hw, pads)])
    return dx
