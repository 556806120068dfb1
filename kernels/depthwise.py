"""Depthwise 2D convolution, NHWC: each input channel convolved with its own ``M`` filters.

Shapes: ``x: (N, H, W, C)``, ``w: (kh, kw, C, M)`` (M = depth_multiplier), ``b: (C*M,)``,
``y: (N, Ho, Wo, C*M)``; output channel ``c*M + m`` is input channel ``c`` with filter ``m`` (the
Keras / TensorFlow order). Stride, padding and dilation as ``kernels.conv2d`` (the geometry of
``kernels.shapes``). With ``xpad`` the zero-padded input::

    y[n, oy, ox, c*M + m] = b[c*M + m]
                            + sum_{i, j} w[i, j, c, m] * xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]

No sum over channels, so no matrix product: the kernels loop over the kernel taps and multiply
whole ``(N, Ho, Wo, C)`` views of the input (``kernels.windows.tap``) by ``w[i, j]``. Backward::

    dw[i, j, c, m] = sum_{n, oy, ox} xpad[n, oy*sh + i*dh, ox*sw + j*dw, c] * dy[n, oy, ox, c*M + m]
    dxpad[n, oy*sh + i*dh, ox*sw + j*dw, c] += sum_m w[i, j, c, m] * dy[n, oy, ox, c*M + m]

and db = ``kernels.conv2d.bias_gradient(dy)``. The tuned CPU twins: ``kernels/fast/depthwise.py``.

Reference: Chollet, "Xception" (2017); Keras 3 ``DepthwiseConv2D`` documentation.
"""
from __future__ import annotations

import numpy as np

from kernels import windows
from kernels.backend import get_array_module
from kernels.shapes import conv_geometry
from kernels.windows import check_float, check_images, check_kernel, check_shape, crop, pad, tap


# --------------------------------------------------------------------------- the contract

def forward_geometry(fn, x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """Check ``x: (N, H, W, C)``, ``w: (kh, kw, C, M)``, ``b: (C*M,)`` or None and the settings;
    return their ``Geometry``."""
    check_kernel(fn, x, w, b, "depthwise kernel", "(kh, kw, C, depth_multiplier)",
                 lambda shape: shape[2] * shape[3])               # C * M output channels
    return conv_geometry(fn, x.shape[1:3], w.shape[:2], strides=strides, dilation=dilation,
                         padding=padding)


def input_geometry(fn, grad_y, w, *, input_size, strides=1, dilation=1, padding="valid"):
    """Check ``grad_y: (N, Ho, Wo, C*M)`` against the depthwise convolution of ``input_size``
    (H, W) images with ``w: (kh, kw, C, M)``; return its ``Geometry``."""
    check_images(fn, "grad_y", grad_y)
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D (kh, kw, C, depth_multiplier), "
                         f"got shape {tuple(w.shape)}")
    check_float(fn, grad_y=grad_y, w=w)
    g = conv_geometry(fn, input_size, w.shape[:2], strides=strides, dilation=dilation,
                      padding=padding)
    check_shape(fn, "grad_y", grad_y, (grad_y.shape[0], *g.out_hw, w.shape[2] * w.shape[3]))
    return g


def filter_geometry(fn, x, grad_y, *, kernel_size, strides=1, dilation=1, padding="valid"):
    """Check ``x: (N, H, W, C)`` and ``grad_y: (N, Ho, Wo, C*M)`` for a ``kernel_size`` window;
    return its ``Geometry``."""
    g = windows.filter_geometry(fn, x, grad_y, kernel_size=kernel_size, strides=strides,
                                dilation=dilation, padding=padding)
    if grad_y.shape[3] % x.shape[3]:
        raise ValueError(f"{fn}: grad_y of shape {tuple(grad_y.shape)} has {grad_y.shape[3]} "
                         f"channels, not a multiple of x's {x.shape[3]} (C * depth_multiplier)")
    return g


# --------------------------------------------------------------------------- reference loops

def depthwise_conv2d_reference(x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """The formula above as plain loops (slow on purpose)."""
    g = forward_geometry("depthwise_conv2d_reference", x, w, b, strides=strides,
                         dilation=dilation, padding=padding)
    (top, _), (left, _) = g.pads
    mult = w.shape[3]
    y = np.zeros((x.shape[0], *g.out_hw, x.shape[3] * mult), dtype=x.dtype)
    for n, oy, ox, c, m in np.ndindex(x.shape[0], *g.out_hw, x.shape[3], mult):
        total = 0.0 if b is None else b[c * mult + m]
        for i, j in np.ndindex(*w.shape[:2]):
            iy = oy * g.strides[0] + i * g.dilation[0] - top
            ix = ox * g.strides[1] + j * g.dilation[1] - left
            if 0 <= iy < x.shape[1] and 0 <= ix < x.shape[2]:
                total += w[i, j, c, m] * x[n, iy, ix, c]
        y[n, oy, ox, c * mult + m] = total
    return y


def depthwise_conv2d_backward_reference(x, w, grad_y, *, strides=1, dilation=1, padding="valid"):
    """``(dx, dw, db)`` as plain loops: each output sends ``w * dy`` to its input pixel and
    ``x * dy`` to its tap."""
    g = forward_geometry("depthwise_conv2d_backward_reference", x, w, strides=strides,
                         dilation=dilation, padding=padding)
    (top, _), (left, _) = g.pads
    mult = w.shape[3]
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n, oy, ox, c, m in np.ndindex(x.shape[0], *g.out_hw, x.shape[3], mult):
        dy = grad_y[n, oy, ox, c * mult + m]
        for i, j in np.ndindex(*w.shape[:2]):
            iy = oy * g.strides[0] + i * g.dilation[0] - top
            ix = ox * g.strides[1] + j * g.dilation[1] - left
            if 0 <= iy < x.shape[1] and 0 <= ix < x.shape[2]:
                dx[n, iy, ix, c] += w[i, j, c, m] * dy
                dw[i, j, c, m] += x[n, iy, ix, c] * dy
    return dx, dw, grad_y.sum(axis=(0, 1, 2))


# --------------------------------------------------------------------------- the kernels

def depthwise_conv2d_forward(x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """``y = depthwise_conv2d(x, w) + b``: ``(N, H, W, C)``, ``(kh, kw, C, M)`` ->
    ``(N, Ho, Wo, C*M)``; one multiply-add of whole views per kernel tap."""
    g = forward_geometry("depthwise_conv2d_forward", x, w, b, strides=strides,
                         dilation=dilation, padding=padding)
    xpad = pad(x, g.pads)
    n, c, mult = x.shape[0], x.shape[3], w.shape[3]
    y = get_array_module(x, w).zeros((n, *g.out_hw, c, mult), dtype=x.dtype)
    for i, j in np.ndindex(*g.kernel_hw):
        y += tap(xpad, g, i, j)[..., None] * w[i, j]      # (N, Ho, Wo, C, 1) * (C, M)
    y = y.reshape(n, *g.out_hw, c * mult)
    return y if b is None else y + b


def depthwise_conv2d_backward_input(grad_y, w, *, input_size, strides=1, dilation=1,
                                    padding="valid"):
    """dL/dx of ``depthwise_conv2d_forward``: ``grad_y: (N, Ho, Wo, C*M)`` -> ``(N, H, W, C)``,
    each tap's ``sum_m w[i, j, :, m] * dy`` added back where the tap read."""
    g = input_geometry("depthwise_conv2d_backward_input", grad_y, w, input_size=input_size,
                       strides=strides, dilation=dilation, padding=padding)
    c, mult = w.shape[2:]
    dy = grad_y.reshape(grad_y.shape[0], *g.out_hw, c, mult)
    dxpad = get_array_module(grad_y, w).zeros((grad_y.shape[0], *g.padded_hw, c),
                                              dtype=grad_y.dtype)
    for i, j in np.ndindex(*g.kernel_hw):
        tap(dxpad, g, i, j)[...] += (dy * w[i, j]).sum(axis=-1)     # a view: adds into dxpad
    return crop(dxpad, g.pads)


def depthwise_conv2d_backward_filter(x, grad_y, *, kernel_size, strides=1, dilation=1,
                                     padding="valid"):
    """dL/dw of ``depthwise_conv2d_forward``: ``x: (N, H, W, C)``, ``grad_y: (N, Ho, Wo, C*M)``
    -> ``(kh, kw, C, M)``, per tap the sum over the pixels of ``x_tap * dy``."""
    g = filter_geometry("depthwise_conv2d_backward_filter", x, grad_y, kernel_size=kernel_size,
                        strides=strides, dilation=dilation, padding=padding)
    c = x.shape[3]
    dy = grad_y.reshape(x.shape[0], *g.out_hw, c, grad_y.shape[3] // c)
    xpad = pad(x, g.pads)
    dw = get_array_module(x, grad_y).empty((*g.kernel_hw, *dy.shape[3:]), dtype=x.dtype)
    for i, j in np.ndindex(*g.kernel_hw):
        dw[i, j] = (tap(xpad, g, i, j)[..., None] * dy).sum(axis=(0, 1, 2))    # (C, M)
    return dw
