"""2D convolution of NHWC images with HWIO kernels: the formula, its loops, im2col, and the dual.

Shapes: ``x: (N, H, W, C)``, ``w: (kh, kw, C, O)``, ``b: (O,)``, ``y: (N, Ho, Wo, O)``; output size
and padding from ``kernels.shapes`` (Keras' 'same': the odd extra row/column at the bottom/right).
With ``xpad`` the zero-padded input::

    y[n, oy, ox, o] = b[o] + sum_{i, j, c} w[i, j, c, o] * xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]

a cross-correlation, as in every deep-learning library. The course writes it centred on the output
pixel, ``(f * w)(x, y) = sum_{dx=-a..a} sum_{dy=-b..b} w(a+dx, b+dy) f(x+dx, y+dy)``;
``conv2d_reference`` keeps that form.

The algorithm (Chainer's im2col): copy every window into one matrix ``cols: (N*Ho*Wo, kh*kw*C)``
with kh*kw strided copies, then do ONE matrix product. The chain rule on the sum above gives::

    y  = cols @ w             conv2d_forward
    dw = cols.T @ dy          conv2d_backward_filter
    dx = col2im(dy @ w.T)     conv2d_transpose: each window's gradient added back where it was read
    db = sum_{n, oy, ox} dy   bias_gradient

Transposed convolution is not a separate algorithm: the input gradient of ``conv2d_forward`` IS
the transposed convolution (Keras' ``Conv2DTranspose``, whose kernel ``(kh, kw, out, in)`` is this
HWIO kernel), and the transposed convolution's gradients are ``conv2d_forward`` (for its input)
and ``conv2d_backward_filter`` with the two activations swapped (``minicnn/functions/conv.py``).

These are the plain kernels: one thread, no reused buffers. ``kernels.dispatch`` runs the tuned
CPU twins of ``kernels/fast/conv2d.py`` or the CUDA ones of ``kernels/cuda/conv.py`` instead, which
tests hold to these; ``mc.config.kernels = "plain"`` (or ``with mc.config.override(kernels=
"plain")``) runs these.

References: Dumoulin & Visin, "A guide to convolution arithmetic for deep learning" (2016);
Chainer ``chainer/utils/conv.py``; Keras 3 ``Conv2D`` / ``Conv2DTranspose`` documentation.
"""
from __future__ import annotations

import numpy as np

from kernels.backend import get_array_module
from kernels.shapes import conv_geometry
from kernels.windows import (check_float, check_images, check_kernel, check_shape, crop,
                             filter_geometry, pad, product, tap)


# --------------------------------------------------------------------------- the contract

def forward_geometry(fn, x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """Check ``x: (N, H, W, C)``, ``w: (kh, kw, C, O)``, ``b: (O,)`` or None and the settings;
    return their ``Geometry``. Every implementation of ``conv2d_forward`` starts here."""
    check_kernel(fn, x, w, b, "kernel", "(kh, kw, C_in, C_out)", lambda shape: shape[3])
    return conv_geometry(fn, x.shape[1:3], w.shape[:2], strides=strides, dilation=dilation,
                         padding=padding)


def transpose_geometry(fn, y, w, b=None, *, output_size, strides=1, dilation=1, padding="valid"):
    """Check ``y: (N, Ho, Wo, O)`` against the convolution of an ``output_size`` image with
    ``w: (kh, kw, C, O)``; ``b: (C,)`` or None. Return that convolution's ``Geometry``."""
    check_images(fn, "y", y)
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D (kh, kw, C_out, C_in), got shape {tuple(w.shape)}")
    if y.shape[3] != w.shape[3]:
        raise ValueError(f"{fn}: y of shape {tuple(y.shape)} has {y.shape[3]} channels but the "
                         f"transposed kernel of shape {tuple(w.shape)} (kh, kw, out, in) expects "
                         f"{w.shape[3]}")
    if b is not None and tuple(b.shape) != (w.shape[2],):
        raise ValueError(f"{fn}: bias must have shape ({w.shape[2]},) to match the kernel "
                         f"{tuple(w.shape)}, got {tuple(b.shape)}")
    check_float(fn, y=y, w=w, b=b)
    g = conv_geometry(fn, output_size, w.shape[:2], strides=strides, dilation=dilation,
                      padding=padding)
    check_shape(fn, "y", y, (y.shape[0], *g.out_hw, w.shape[3]))
    return g


# --------------------------------------------------------------------------- reference loops

def conv2d_reference(x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """The course's formula as plain loops (slow on purpose; the tests hold every kernel to it).

    ``(f * w)(x, y) = sum_{dx=-a..a} sum_{dy=-b..b} w(a+dx, b+dy) f(x+dx, y+dy)`` summed over the
    input channels, for each output channel; the window centre moves by the stride, the taps are
    ``dilation`` pixels apart, pixels outside the image are zero (padding).
    """
    g = forward_geometry("conv2d_reference", x, w, b, strides=strides, dilation=dilation,
                         padding=padding)
    n_batch, height, width, _ = x.shape
    kh, kw, _, n_out = w.shape
    (top, _), (left, _) = g.pads
    a, bb = (kh - 1) // 2, (kw - 1) // 2      # the centre tap of the kernel (w(a, b) above)
    y = np.zeros((n_batch, *g.out_hw, n_out), dtype=x.dtype)
    for n in range(n_batch):
        for oy in range(g.out_hw[0]):
            for ox in range(g.out_hw[1]):
                cy = oy * g.strides[0] - top + a * g.dilation[0]        # window centre in x
                cx = ox * g.strides[1] - left + bb * g.dilation[1]
                for o in range(n_out):
                    total = 0.0 if b is None else b[o]
                    for dy in range(-a, kh - a):                       # -a..a for odd kernels
                        for dx in range(-bb, kw - bb):
                            iy, ix = cy + dy * g.dilation[0], cx + dx * g.dilation[1]
                            if 0 <= iy < height and 0 <= ix < width:   # outside: zero padding
                                total += np.dot(w[a + dy, bb + dx, :, o], x[n, iy, ix, :])
                    y[n, oy, ox, o] = total
    return y


def conv2d_backward_reference(x, w, grad_y, *, strides=1, dilation=1, padding="valid"):
    """``(dx, dw, db)`` as plain loops: each output pixel sends ``w * dy`` back to the input
    pixels of its window and ``x * dy`` to the kernel taps."""
    g = forward_geometry("conv2d_backward_reference", x, w, strides=strides, dilation=dilation,
                         padding=padding)
    check_shape("conv2d_backward_reference", "grad_y", grad_y,
                (x.shape[0], *g.out_hw, w.shape[3]))
    (top, _), (left, _) = g.pads
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n, oy, ox in np.ndindex(x.shape[0], *g.out_hw):
        for i, j in np.ndindex(*w.shape[:2]):
            iy = oy * g.strides[0] + i * g.dilation[0] - top
            ix = ox * g.strides[1] + j * g.dilation[1] - left
            if 0 <= iy < x.shape[1] and 0 <= ix < x.shape[2]:
                for o in range(w.shape[3]):
                    dx[n, iy, ix, :] += w[i, j, :, o] * grad_y[n, oy, ox, o]
                    dw[i, j, :, o] += x[n, iy, ix, :] * grad_y[n, oy, ox, o]
    return dx, dw, grad_y.sum(axis=(0, 1, 2))


def conv2d_transpose_reference(y, w, b=None, *, output_size, strides=1, dilation=1,
                               padding="valid"):
    """The transposed convolution as plain loops: every input pixel stamps the kernel, scaled by
    its values, onto the output at ``stride`` times its position (arguments as
    ``conv2d_transpose``)."""
    g = transpose_geometry("conv2d_transpose_reference", y, w, b, output_size=output_size,
                           strides=strides, dilation=dilation, padding=padding)
    (top, _), (left, _) = g.pads
    out = np.zeros((y.shape[0], *g.in_hw, w.shape[2]), dtype=y.dtype)
    for n, iy, ix in np.ndindex(*y.shape[:3]):
        for i, j in np.ndindex(*w.shape[:2]):
            oy = iy * g.strides[0] + i * g.dilation[0] - top
            ox = ix * g.strides[1] + j * g.dilation[1] - left
            if 0 <= oy < g.in_hw[0] and 0 <= ox < g.in_hw[1]:
                out[n, oy, ox, :] += w[i, j, :, :] @ y[n, iy, ix, :]
    return out if b is None else out + b


# --------------------------------------------------------------------------- im2col and col2im

def im2col(x, g):
    """``cols: (N, Ho, Wo, kh, kw, C)``, ``cols[n, oy, ox, i, j, c] = xpad[n, oy*sh + i*dh,
    ox*sw + j*dw, c]``: every window copied once, one strided copy per kernel tap."""
    xpad = pad(x, g.pads)
    cols = get_array_module(x).empty((x.shape[0], *g.out_hw, *g.kernel_hw, x.shape[3]),
                                     dtype=x.dtype)
    for i, j in np.ndindex(*g.kernel_hw):
        cols[:, :, :, i, j, :] = tap(xpad, g, i, j)
    return cols


def col2im(cols, x_shape, g):
    """The adjoint of ``im2col``: every window ``cols[:, :, :, i, j, :]`` added back where it was
    read. ``cols: (N, Ho, Wo, kh, kw, C)`` -> ``(N, H, W, C)``."""
    n, _, _, c = x_shape
    xpad = get_array_module(cols).zeros((n, *g.padded_hw, c), dtype=cols.dtype)
    for i, j in np.ndindex(*g.kernel_hw):
        tap(xpad, g, i, j)[...] += cols[:, :, :, i, j, :]     # a view: adds into xpad
    return crop(xpad, g.pads)


# --------------------------------------------------------------------------- the kernels

def conv2d_forward(x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """``y = conv2d(x, w) + b``: ``(N, H, W, C)``, ``(kh, kw, C, O)``, ``(O,)`` or None ->
    ``(N, Ho, Wo, O)``. ``padding``: 'valid', 'same' or explicit (``kernels.shapes``)."""
    g = forward_geometry("conv2d_forward", x, w, b, strides=strides, dilation=dilation,
                         padding=padding)
    kh, kw, c, n_out = w.shape
    cols = im2col(x, g).reshape(-1, kh * kw * c)
    y = product(cols, w.reshape(kh * kw * c, n_out)).reshape(x.shape[0], *g.out_hw, n_out)
    if b is not None:
        y += b
    return y


def conv2d_transpose(y, w, b=None, *, output_size, strides=1, dilation=1, padding="valid"):
    """The transposed convolution: the adjoint of ``conv2d_forward`` on ``output_size`` (H, W)
    images, so ``conv2d_transpose(dy, w)`` is conv2d's input gradient dL/dx.

    ``y: (N, Ho, Wo, O)``, ``w: (kh, kw, C, O)`` (Keras' transposed kernel (kh, kw, out, in)),
    ``b: (C,)`` or None -> ``(N, H, W, C)``. ``strides``, ``dilation`` and ``padding`` are those of
    the convolution it transposes (explicit pairs for Keras' rule: ``conv_transpose2d_geometry``).
    """
    g = transpose_geometry("conv2d_transpose", y, w, b, output_size=output_size, strides=strides,
                           dilation=dilation, padding=padding)
    kh, kw, c, n_out = w.shape
    dcols = product(y.reshape(-1, n_out), w.reshape(kh * kw * c, n_out).T)
    x = col2im(dcols.reshape(y.shape[0], *g.out_hw, kh, kw, c), (y.shape[0], *g.in_hw, c), g)
    if b is not None:
        x += b
    return x


def conv2d_backward_filter(x, grad_y, *, kernel_size, strides=1, dilation=1, padding="valid"):
    """dL/dw of ``conv2d_forward``: ``x: (N, H, W, C)``, ``grad_y: (N, Ho, Wo, O)`` ->
    ``(kh, kw, C, O)``, the sum over all windows of window * dy."""
    g = filter_geometry("conv2d_backward_filter", x, grad_y, kernel_size=kernel_size,
                        strides=strides, dilation=dilation, padding=padding)
    (kh, kw), c, n_out = g.kernel_hw, x.shape[3], grad_y.shape[3]
    cols = im2col(x, g).reshape(-1, kh * kw * c)
    return product(cols.T, grad_y.reshape(-1, n_out)).reshape(kh, kw, c, n_out)


def bias_gradient(grad_y):
    """dL/db of a bias added over every axis but the last: ``(..., C) -> (C,)``."""
    return grad_y.reshape(-1, grad_y.shape[-1]).sum(axis=0)
