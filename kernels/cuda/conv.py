"""GPU convolution: im2col / col2im (``conv.cu``), the window copy and its adjoint, and the
convolution kernels of ``kernels.conv2d`` built on them (one large product per layer, which is
what a GPU does well).

Same signatures and results as the NumPy kernels they replace; CuPy arrays in and out.
``geometry`` is a ``kernels.shapes.Geometry`` (any object with ``kernel_hw``, ``out_hw``,
``strides``, ``dilation`` and ``pads`` works): sizes and padding come from ``kernels.shapes``.
"""
from __future__ import annotations

from kernels import backend
from kernels.conv2d import forward_geometry, transpose_geometry
from kernels.cuda import runtime as rt
from kernels.windows import filter_geometry

SOURCE = "conv.cu"


def _geometry_args(geometry):
    (kh, kw), (ho, wo) = geometry.kernel_hw, geometry.out_hw
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilation
    (top, _), (left, _) = geometry.pads
    return [rt.i64(v) for v in (ho, wo, kh, kw, sh, sw, dh, dw, top, left)]


def _check_image_shape(fn, what, shape, geometry):
    if len(shape) != 4:
        raise ValueError(f"{fn}: {what} must be 4-D (N, H, W, C), got shape {tuple(shape)}")
    in_hw = getattr(geometry, "in_hw", None)
    if in_hw is not None and tuple(shape[1:3]) != tuple(in_hw):
        raise ValueError(f"{fn}: {what} of shape {tuple(shape)} does not match the geometry's "
                         f"input size {tuple(in_hw)}")


def im2col_gpu(x, geometry):
    """``cols: (N, Ho, Wo, kh, kw, C)``,
    cols[n, oy, ox, i, j, c] = xpad[n, oy*sh + i*dh, ox*sw + j*dw, c].

    x: (N, H, W, C) CuPy array. Mirrors ``kernels.conv2d.im2col(x, geometry)`` (Chainer's im2col);
    one thread per element of cols, zeros outside the image. A 1x1, stride-1, unpadded window
    needs no copy: the result is then a view of ``x``, as in the NumPy kernel.
    """
    fn = "im2col_gpu"
    rt.require_gpu(fn, "kernels.conv2d.im2col", x=x)
    _check_image_shape(fn, "x", x.shape, geometry)
    suffix = rt.dtype_suffix(fn, x.dtype)
    n, height, width, c = x.shape
    (kh, kw), (ho, wo) = geometry.kernel_hw, geometry.out_hw
    if (kh, kw) == (1, 1) and tuple(geometry.strides) == (1, 1) \
            and all(p == 0 for pair in geometry.pads for p in pair):
        return rt.contiguous(x).reshape(n, ho, wo, 1, 1, c)
    xp = backend.get_array_module(x)
    x = rt.contiguous(x)
    cols = xp.empty((n, ho, wo, kh, kw, c), dtype=x.dtype)
    rt.launch(SOURCE, f"im2col_{suffix}", cols.size,
              [x, cols, rt.i64(n), rt.i64(height), rt.i64(width), rt.i64(c),
               *_geometry_args(geometry)])
    return cols


def col2im_gpu(cols, x_shape, geometry):
    """The adjoint of ``im2col_gpu``: ``dx: (N, H, W, C)``, each input pixel the sum of the
    ``cols`` entries that read it (a gather over the kernel taps: deterministic, no atomics).

    cols: (N, Ho, Wo, kh, kw, C) CuPy array.
    Mirrors ``kernels.conv2d.col2im(cols, x_shape, geometry)``.
    """
    fn = "col2im_gpu"
    rt.require_gpu(fn, "kernels.conv2d.col2im", cols=cols)
    x_shape = tuple(int(s) for s in x_shape)
    _check_image_shape(fn, "x_shape", x_shape, geometry)
    suffix = rt.dtype_suffix(fn, cols.dtype)
    n, height, width, c = x_shape
    (kh, kw), (ho, wo) = geometry.kernel_hw, geometry.out_hw
    expected = (n, ho, wo, kh, kw, c)
    if tuple(cols.shape) != expected:
        raise ValueError(f"{fn}: cols of shape {tuple(cols.shape)} does not match input shape "
                         f"{x_shape} and this geometry (expected {expected})")
    xp = backend.get_array_module(cols)
    cols = rt.contiguous(cols)
    dx = xp.empty(x_shape, dtype=cols.dtype)
    rt.launch(SOURCE, f"col2im_{suffix}", dx.size,
              [cols, dx, rt.i64(n), rt.i64(height), rt.i64(width), rt.i64(c),
               *_geometry_args(geometry)])
    return dx


# -- the convolution kernels on the GPU: kernels.conv2d's algorithm with the CUDA window copies --

def conv2d_forward_gpu(x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """``kernels.conv2d.conv2d_forward`` on CuPy arrays: ``im2col_gpu`` and one product."""
    g = forward_geometry("conv2d_forward", x, w, b, strides=strides, dilation=dilation,
                         padding=padding)
    kh, kw, c, n_out = w.shape
    cols = im2col_gpu(x, g).reshape(-1, kh * kw * c)
    y = (cols @ w.reshape(kh * kw * c, n_out)).reshape(x.shape[0], *g.out_hw, n_out)
    if b is not None:
        y += b
    return y


def conv2d_transpose_gpu(y, w, b=None, *, output_size, strides=1, dilation=1, padding="valid"):
    """``kernels.conv2d.conv2d_transpose`` on CuPy arrays: one product and ``col2im_gpu``."""
    g = transpose_geometry("conv2d_transpose", y, w, b, output_size=output_size,
                           strides=strides, dilation=dilation, padding=padding)
    kh, kw, c, n_out = w.shape
    dcols = y.reshape(-1, n_out) @ w.reshape(kh * kw * c, n_out).T
    x = col2im_gpu(dcols.reshape(y.shape[0], *g.out_hw, kh, kw, c), (y.shape[0], *g.in_hw, c), g)
    if b is not None:
        x += b
    return x


def conv2d_backward_filter_gpu(x, grad_y, *, kernel_size, strides=1, dilation=1,
                               padding="valid"):
    """``kernels.conv2d.conv2d_backward_filter`` on CuPy arrays: ``im2col_gpu``, one product."""
    g = filter_geometry("conv2d_backward_filter", x, grad_y, kernel_size=kernel_size,
                        strides=strides, dilation=dilation, padding=padding)
    (kh, kw), c, n_out = g.kernel_hw, x.shape[3], grad_y.shape[3]
    cols = im2col_gpu(x, g).reshape(-1, kh * kw * c)
    return (cols.T @ grad_y.reshape(-1, n_out)).reshape(kh, kw, c, n_out)
