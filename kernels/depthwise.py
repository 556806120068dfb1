"""Depthwise 2D convolution, NHWC: each input channel convolved with its own ``M`` filters.

Shapes: ``x: (N, H, W, C)``, ``w: (kh, kw, C, M)`` (M = depth_multiplier), ``b: (C*M,)``,
``y: (N, Ho, Wo, C*M)``; output channel ``c*M + m`` is input channel ``c`` with filter ``m``
(the Keras / TensorFlow order). With ``xpad`` the zero-padded input::

    y[n, oy, ox, c*M + m] = b[c*M + m]
                            + sum_{i, j} w[i, j, c, m] * xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]

No sum over channels, so there is no matrix product: the fast kernels loop over the kernel taps
(and the multiplier ``m``) and multiply whole ``(N, Ho, Wo, C)`` slices at once; with stride 1
the slices are contiguous row ranges of the flattened padded image (conv2d's "shifted" layout).
Stride, padding and dilation follow ``kernels.conv2d`` (same geometry, from ``kernels.shapes``).

Backward::

    dw[i, j, c, m] = sum_{n, oy, ox} xpad[n, oy*sh + i*dh, ox*sw + j*dw, c] * dy[n, oy, ox, c*M + m]
    dxpad[n, oy*sh + i*dh, ox*sw + j*dw, c] += sum_m w[i, j, c, m] * dy[n, oy, ox, c*M + m]

Reference: Chollet, "Xception" (2017); Keras 3 ``DepthwiseConv2D`` documentation.
"""
from __future__ import annotations

import numpy as np

from kernels.backend import get_array_module
from kernels.conv2d import (_check_float, conv_geometry, copy_of, crop_padding,
                            embed_in_padded_grid, pad_input, row_shifts, scratch,
                            sum_over_pixels, tap_slices)


def _check_depthwise_args(fn: str, x, w, b=None):
    if x.ndim != 4:
        raise ValueError(f"{fn}: x must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D (kh, kw, C, depth_multiplier), "
                         f"got shape {tuple(w.shape)}")
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"{fn}: x of shape {tuple(x.shape)} has {x.shape[3]} channels but the "
                         f"depthwise kernel of shape {tuple(w.shape)} expects {w.shape[2]}")
    if b is not None and tuple(b.shape) != (w.shape[2] * w.shape[3],):
        raise ValueError(f"{fn}: bias must have shape ({w.shape[2] * w.shape[3]},) = "
                         f"channels * depth_multiplier for kernel {tuple(w.shape)}, "
                         f"got {tuple(b.shape)}")
    _check_float(fn, x=x, w=w, b=b)


def _taps(kernel_hw):
    return [(i, j) for i in range(kernel_hw[0]) for j in range(kernel_hw[1])]


# --------------------------------------------------------------------------- reference loops

def depthwise_conv2d_reference(x, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """The formula above as plain loops (slow on purpose)."""
    _check_depthwise_args("depthwise_conv2d_reference", x, w, b)
    n_batch, height, width, channels = x.shape
    kh, kw, _, mult = w.shape
    g = conv_geometry("depthwise_conv2d_reference", (height, width), (kh, kw), strides,
                      dilation, padding)
    (top, _), (left, _) = g.pads
    y = np.zeros((n_batch, *g.out_hw, channels * mult), dtype=x.dtype)
    for n in range(n_batch):
        for oy in range(g.out_hw[0]):
            for ox in range(g.out_hw[1]):
                for c in range(channels):
                    for m in range(mult):
                        total = 0.0 if b is None else b[c * mult + m]
                        for i in range(kh):
                            for j in range(kw):
                                iy = oy * g.strides[0] + i * g.dilation[0] - top
                                ix = ox * g.strides[1] + j * g.dilation[1] - left
                                if 0 <= iy < height and 0 <= ix < width:
                                    total += w[i, j, c, m] * x[n, iy, ix, c]
                        y[n, oy, ox, c * mult + m] = total
    return y


def depthwise_conv2d_backward_reference(x, w, grad_y, strides=(1, 1), dilation=(1, 1),
                                        padding="valid"):
    """``(dx, dw, db)`` as plain loops: each output sends ``w * dy`` to its input pixel and
    ``x * dy`` to its tap."""
    _check_depthwise_args("depthwise_conv2d_backward_reference", x, w)
    n_batch, height, width, channels = x.shape
    kh, kw, _, mult = w.shape
    g = conv_geometry("depthwise_conv2d_backward_reference", (height, width), (kh, kw), strides,
                      dilation, padding)
    (top, _), (left, _) = g.pads
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n in range(n_batch):
        for oy in range(g.out_hw[0]):
            for ox in range(g.out_hw[1]):
                for c in range(channels):
                    for m in range(mult):
                        dy = grad_y[n, oy, ox, c * mult + m]
                        for i in range(kh):
                            for j in range(kw):
                                iy = oy * g.strides[0] + i * g.dilation[0] - top
                                ix = ox * g.strides[1] + j * g.dilation[1] - left
                                if 0 <= iy < height and 0 <= ix < width:
                                    dx[n, iy, ix, c] += w[i, j, c, m] * dy
                                    dw[i, j, c, m] += x[n, iy, ix, c] * dy
    return dx, dw, grad_y.sum(axis=(0, 1, 2))


# --------------------------------------------------------------------------- fast kernels

def _aligned_taps(xpad, g):
    """One view of ``xpad`` per kernel tap, all aligned with one output "grid"; the grid's shape;
    and the index of the grid entries every tap reaches.

    Stride 1: the grid is the padded image flattened to rows (conv2d's "shifted" layout); tap
    (i, j) is the contiguous row range ``i*dh*Wp + j*dw`` further on and the output is the grid's
    top-left ``(Ho, Wo)`` corner (``_grid_to_output``). Contiguous slices run about 1.5x faster
    than strided ones. Otherwise the grid is the output and each tap a strided slice.
    """
    n, hp, wp, channels = xpad.shape
    if g.strides == (1, 1):
        rows = xpad.reshape(n * hp * wp, channels)
        shifts = row_shifts(g)
        m = rows.shape[0] - shifts[-1][2]
        return [(i, j, rows[shift:shift + m]) for i, j, shift in shifts], (n * hp * wp,), \
            slice(0, m)
    return [(i, j, xpad[tap_slices(g, i, j)]) for i, j in _taps(g.kernel_hw)], (n, *g.out_hw), \
        slice(None)


def _grid_to_output(grid, g, n):
    """The output pixels of a grid from ``_aligned_taps`` as ``(N, Ho, Wo, ...)``."""
    if g.strides == (1, 1):
        hp, wp = g.padded_hw
        return grid.reshape(n, hp, wp, *grid.shape[1:])[:, :g.out_hw[0], :g.out_hw[1]]
    return grid


def depthwise_conv2d_forward(x, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """y = depthwise_conv2d(x, w) + b: ``(N, H, W, C)``, ``(kh, kw, C, M)`` ->
    ``(N, Ho, Wo, C*M)``."""
    fn = "depthwise_conv2d_forward"
    _check_depthwise_args(fn, x, w, b)
    xp = get_array_module(x, w)
    n, height, width, channels = x.shape
    kh, kw, _, mult = w.shape
    g = conv_geometry(fn, (height, width), (kh, kw), strides, dilation, padding)
    taps, grid_shape, reached = _aligned_taps(pad_input(x, g.pads, slot="pad"), g)
    grid = scratch(xp, "y_grid", (*grid_shape, channels, mult), x.dtype)
    term = scratch(xp, "term", taps[0][2].shape, x.dtype)
    for m in range(mult):
        acc = grid[reached, ..., m]                     # a view into the grid
        for k, (i, j, xtap) in enumerate(taps):         # acc = sum_ij xpad[tap ij] * w[i, j, :, m]
            xp.multiply(xtap, w[i, j, :, m], out=acc if k == 0 else term)
            if k:
                acc += term
    y = copy_of(_grid_to_output(grid, g, n)).reshape(n, *g.out_hw, channels * mult)
    if b is not None:
        y += b
    return y


def depthwise_conv2d_backward(grad_y, x, w, strides=(1, 1), dilation=(1, 1), padding="valid",
                              need_input=True, need_filter=True, need_bias=True, x_shape=None):
    """Gradients ``(dx, dw, db)`` of ``depthwise_conv2d_forward`` (None where not needed).

    ``x`` is read only by the filter gradient: for ``dx`` alone pass ``x=None, x_shape=...``.
    """
    fn = "depthwise_conv2d_backward"
    if x is not None:
        _check_depthwise_args(fn, x, w)
        x_shape = x.shape
    elif x_shape is None or need_filter:
        raise ValueError(f"{fn}: pass x (needed by the filter gradient) or x_shape")
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or w.ndim != 4 or x_shape[3] != w.shape[2]:
        raise ValueError(f"{fn}: input shape {x_shape} does not fit depthwise kernel "
                         f"{tuple(w.shape)} (expected (N, H, W, C) and (kh, kw, C, M))")
    _check_float(fn, grad_y=grad_y, w=w)
    xp = get_array_module(grad_y, w)
    n, height, width, channels = x_shape
    kh, kw, _, mult = w.shape
    g = conv_geometry(fn, (height, width), (kh, kw), strides, dilation, padding)
    expected = (n, *g.out_hw, channels * mult)
    if tuple(grad_y.shape) != expected:
        raise ValueError(f"{fn}: grad_y must have the output's shape {expected}, "
                         f"got {tuple(grad_y.shape)}")
    dx = dw = None
    db = sum_over_pixels(grad_y) if need_bias else None
    # dy laid out like the forward's grid (zero where the grid is not an output pixel).
    if g.strides == (1, 1):
        dy = embed_in_padded_grid(grad_y, g).reshape(-1, channels, mult)
    else:
        dy = grad_y.reshape(n, *g.out_hw, channels, mult)
    if need_filter:
        taps, _, reached = _aligned_taps(pad_input(x, g.pads, slot="pad"), g)
        pixels = "nhwc" if g.strides != (1, 1) else "rc"
        dw = xp.empty_like(w)
        for m in range(mult):
            for i, j, xtap in taps:                     # dw[i, j, c, m] = sum xpad[tap ij] * dy
                dw[i, j, :, m] = xp.einsum(f"{pixels},{pixels}->c", xtap, dy[reached, ..., m])
    if need_input:
        padded_shape = (n, *g.padded_hw, channels)
        if g.pads == ((0, 0), (0, 0)):
            dxpad = xp.zeros(padded_shape, dtype=grad_y.dtype)        # it is the result
        else:
            dxpad = scratch(xp, "dx_pad", padded_shape, grad_y.dtype, zero=True)
        taps, _, reached = _aligned_taps(dxpad, g)        # views of dxpad: written through
        term = scratch(xp, "term", taps[0][2].shape, grad_y.dtype)
        for m in range(mult):
            for i, j, dxtap in taps:                      # dxpad[tap ij] += dy * w[i, j, :, m]
                xp.multiply(dy[reached, ..., m], w[i, j, :, m], out=term)
                dxtap += term
        dx = crop_padding(dxpad, g.pads)
    return dx, dw, db


def depthwise_conv2d_backward_input(grad_y, w, x_shape, strides=(1, 1), dilation=(1, 1),
                                    padding="valid"):
    """dL/dx of ``depthwise_conv2d_forward``: ``(N, H, W, C)``."""
    return depthwise_conv2d_backward(grad_y, None, w, strides, dilation, padding,
                                     need_filter=False, need_bias=False, x_shape=x_shape)[0]


def depthwise_conv2d_backward_filter(x, grad_y, w_shape, strides=(1, 1), dilation=(1, 1),
                                     padding="valid", need_bias=True):
    """(dL/dw, dL/db) of ``depthwise_conv2d_forward``: ``(kh, kw, C, M)`` and ``(C*M,)``."""
    w_shape = tuple(int(s) for s in w_shape)
    if len(w_shape) != 4:
        raise ValueError(f"depthwise_conv2d_backward_filter: w_shape must be (kh, kw, C, M), "
                         f"got {w_shape}")
    xp = get_array_module(x, grad_y)
    w_like = xp.empty(w_shape, dtype=grad_y.dtype)       # only its shape and dtype are read
    _, dw, db = depthwise_conv2d_backward(grad_y, x, w_like, strides, dilation, padding,
                                          need_input=False, need_bias=need_bias)
    return dw, db
