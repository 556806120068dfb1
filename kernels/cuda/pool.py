"""GPU max pooling (``pool.cu``): forward with the argmax of each window, backward as a gather.

Same signatures and results as ``kernels.pooling.max_pool2d_forward`` / ``max_pool2d_backward``;
CuPy arrays in and out. Window sizes and padding come from ``kernels.shapes.pool_geometry``.
"""
from __future__ import annotations

import numpy as np

from kernels import backend
from kernels.cuda import runtime as rt
from kernels.pooling import argmax_dtype, backward_geometry, forward_geometry
from kernels.windows import check_shape

SOURCE = "pool.cu"
INDEX_SUFFIX = {np.dtype(np.uint8): "u8", np.dtype(np.int32): "i32"}


def _args(n, c, g):
    (top, _), (left, _) = g.pads
    return [rt.i64(v) for v in (n, *g.in_hw, c, *g.out_hw, *g.kernel_hw, *g.strides, top, left)]


def max_pool2d_forward_gpu(x, *, pool_size=2, strides=None, padding="valid", return_argmax=True):
    """Max pooling. x: (N, H, W, C) -> y: (N, Ho, Wo, C) [, argmax: same shape].

    argmax = a*pw + b, the first cell (row-major window order) holding the maximum; padded cells
    never win. argmax dtype: uint8 (windows of <= 256 cells) or int32. One thread per output.
    Mirrors ``kernels.pooling.max_pool2d_forward``.
    """
    fn = "max_pool2d_forward_gpu"
    rt.require_gpu(fn, "kernels.pooling.max_pool2d_forward", x=x)
    g = forward_geometry(fn, x, pool_size, strides, padding)
    suffix = rt.dtype_suffix(fn, x.dtype)
    xp = backend.get_array_module(x)
    x = rt.contiguous(x)
    n, _, _, c = x.shape
    y = xp.empty((n, *g.out_hw, c), dtype=x.dtype)
    argmax = xp.empty(y.shape, dtype=argmax_dtype(g.kernel_hw))
    index = INDEX_SUFFIX[argmax.dtype]
    rt.launch(SOURCE, f"max_pool2d_forward_{suffix}_{index}", y.size,
              [x, y, argmax, *_args(n, c, g)])
    return (y, argmax) if return_argmax else y


def max_pool2d_backward_gpu(dy, argmax, *, input_size, pool_size=2, strides=None,
                            padding="valid"):
    """dx[cell k of window (i, j)] += dy[i, j] where argmax[i, j] == k. dy, argmax: (N, Ho, Wo, C).

    A gather: each input element sums, in a fixed order, the windows whose argmax points at it
    (deterministic, no atomics). Mirrors ``kernels.pooling.max_pool2d_backward``.
    """
    fn = "max_pool2d_backward_gpu"
    rt.require_gpu(fn, "kernels.pooling.max_pool2d_backward", dy=dy, argmax=argmax)
    g = backward_geometry(fn, dy, input_size, pool_size, strides, padding)
    suffix = rt.dtype_suffix(fn, dy.dtype)
    check_shape(fn, "argmax", argmax, dy.shape)
    if argmax.dtype.kind not in "iu":
        raise TypeError(f"{fn}: argmax must hold integer window offsets, got dtype {argmax.dtype}")
    if argmax.dtype not in INDEX_SUFFIX:
        argmax = argmax.astype(np.int32)
    xp = backend.get_array_module(dy)
    dy, argmax = rt.contiguous(dy), rt.contiguous(argmax)
    n, c = dy.shape[0], dy.shape[3]
    dx = xp.empty((n, *g.in_hw, c), dtype=dy.dtype)
    index = INDEX_SUFFIX[argmax.dtype]
    rt.launch(SOURCE, f"max_pool2d_backward_{suffix}_{index}", dx.size,
              [dy, argmax, dx, *_args(n, c, g)])
    return dx
