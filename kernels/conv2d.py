"""2D convolution, NHWC input and HWIO kernel: forward, both backwards, and the transposed twin.

Shapes: ``x: (N, H, W, C)``, ``w: (kh, kw, C, O)``, ``b: (O,)``, ``y: (N, Ho, Wo, O)``.
With ``xpad`` the zero-padded input (padding from ``kernels.shapes.conv2d_geometry``)::

    y[n, oy, ox, o] = b[o] + sum_{i, j, c} w[i, j, c, o] * xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]

This is a cross-correlation, as in every deep-learning library. The course writes it centred on
the output pixel, ``(f * w)(x, y) = sum_{dx=-a..a} sum_{dy=-b..b} w(a+dx, b+dy) f(x+dx, y+dy)``;
``conv2d_reference`` keeps that form.

Fast algorithms, picked by ``choose_algorithm`` from the shapes (measured with
benchmarks/bench_conv.py; the forward and the filter gradient share one, since the filter
gradient reads the forward's workspace; the input gradient chooses on its own):

- ``"im2col"`` (Chainer): copy every kernel window into one matrix
  ``cols: (N*Ho*Wo, kh*kw*C)`` and do ONE matrix product ``y = cols @ w``. Any stride. The filter
  gradient reuses ``cols``: ``dw = cols.T @ dy``; the input gradient scatters ``dy @ w.T`` back
  into the windows (``col2im``). Used for strides > 1, 1x1 kernels, few input channels (a
  3-channel image: K = 27 is a good product, K = 3 is not) and small images.
- ``"shifted"`` (stride 1): flatten the padded input over ``(N, Hp, Wp)``; kernel offset (i, j)
  is then a *contiguous* slice of rows starting ``i*dh*Wp + j*dw`` further on, so
  ``y = sum_ij xflat[shift_ij:] @ w[i, j]``: one matrix product per offset, no window copy. The
  rows that straddle a border are computed and dropped (``Hp*Wp / (Ho*Wo)`` extra work). Used
  for 8 or more channels on images where that waste is small (32x32 and larger with a 3x3
  kernel), where the im2col copy costs about as much as the product.

Temporaries that never leave a call are reused between calls (``scratch``): on the CPU a fresh
multi-megabyte array costs a page fault per page, comparable to the products themselves.

Backward (chain rule on the sum above)::

    dw[i, j, c, o] = sum_{n, oy, ox} xpad[n, oy*sh + i*dh, ox*sw + j*dw, c] * dy[n, oy, ox, o]
    dxpad[n, oy*sh + i*dh, ox*sw + j*dw, c] += sum_o w[i, j, c, o] * dy[n, oy, ox, o]
    db[o] = sum_{n, oy, ox} dy[n, oy, ox, o]

Transposed convolution (Keras ``Conv2DTranspose``, kernel ``(kh, kw, out, in)``) is the input
gradient of the forward convolution whose HWIO kernel is that same array: its forward *is*
``conv2d_backward_input`` and its backward *is* ``conv2d_forward`` plus ``conv2d_backward_filter``
with the two activations swapped (see ``conv2d_transpose_*``).

References: Dumoulin & Visin, "A guide to convolution arithmetic for deep learning" (2016);
Chainer ``chainer/utils/conv.py``; Keras 3 ``Conv2D`` / ``Conv2DTranspose`` documentation.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from kernels.backend import get_array_module
from kernels.shapes import (conv2d_geometry, conv_transpose2d_geometry, normalize_padding,
                            normalize_tuple)

ALGORITHMS = ("im2col", "shifted")

# "shifted" computes the whole padded grid; above this much extra work im2col wins (measured:
# 64x64 and 32x32 images with a 3x3 'same' kernel are below it, 16x16 (1.27) is above).
_SHIFTED_MAX_WASTE = 1.2
# Below this many input channels one product per offset is too thin (K = C) to run fast.
_SHIFTED_MIN_CHANNELS = 8


# --------------------------------------------------------------------------- checks and geometry

@dataclass(frozen=True)
class ConvGeometry:
    """Everything the kernels need to know about one convolution's shapes."""
    in_hw: tuple          # (H, W) of the input
    kernel_hw: tuple      # (kh, kw)
    out_hw: tuple         # (Ho, Wo)
    strides: tuple        # (sh, sw)
    dilation: tuple       # (dh, dw)
    pads: tuple           # ((top, bottom), (left, right))

    @property
    def padded_hw(self):
        (top, bottom), (left, right) = self.pads
        return self.in_hw[0] + top + bottom, self.in_hw[1] + left + right


def conv_geometry(fn: str, in_hw, kernel_hw, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """Normalise the settings and compute output size and padding (via ``kernels.shapes``).

    Raises ValueError naming ``fn`` and the shapes when the settings are invalid.
    """
    try:
        strides = normalize_tuple(strides, 2, "strides", minimum=1)
        dilation = normalize_tuple(dilation, 2, "dilation_rate", minimum=1)
        out_hw, pads = conv2d_geometry(tuple(in_hw), tuple(kernel_hw), strides, dilation, padding)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc} (input {tuple(in_hw)}, kernel {tuple(kernel_hw)}, "
                         f"strides {strides}, dilation {dilation}, padding {padding!r})") from None
    return ConvGeometry(tuple(in_hw), tuple(kernel_hw), out_hw, strides, dilation, pads)


def _check_float(fn: str, **arrays):
    """Same floating dtype everywhere: float32 stays float32 (no silent upcast)."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    for name, dtype in dtypes.items():
        if dtype.kind != "f":
            raise TypeError(f"{fn}: {name} must be a floating array, got dtype {dtype}")
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"{fn}: all arrays must share one dtype, got {detail}")


def _check_conv_args(fn: str, x, w, b=None, x_name="x"):
    """x: (N, H, W, C), w: (kh, kw, C, O), b: (O,) or None."""
    if x.ndim != 4:
        raise ValueError(f"{fn}: {x_name} must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D (kh, kw, C_in, C_out), got shape {tuple(w.shape)}")
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"{fn}: {x_name} of shape {tuple(x.shape)} has {x.shape[3]} channels but "
                         f"the kernel of shape {tuple(w.shape)} expects {w.shape[2]}")
    if b is not None and tuple(b.shape) != (w.shape[3],):
        raise ValueError(f"{fn}: bias must have shape ({w.shape[3]},) to match the kernel "
                         f"{tuple(w.shape)}, got {tuple(b.shape)}")
    _check_float(fn, **{x_name: x, "w": w, "b": b})


def _check_grad_shape(fn: str, grad_y, expected):
    if tuple(grad_y.shape) != tuple(expected):
        raise ValueError(f"{fn}: grad_y must have the output's shape {tuple(expected)}, "
                         f"got {tuple(grad_y.shape)}")


def choose_algorithm(geometry: ConvGeometry, in_channels: int, input_gradient=False) -> str:
    """'shifted' for stride-1 k>1 convolutions on images where the padded border adds little
    work, and (except for the input gradient, whose products have K = C_out and whose im2col
    twin scatters C-wide strips) at least 8 input channels; 'im2col' otherwise.
    Measured in benchmarks/bench_conv.py."""
    kh, kw = geometry.kernel_hw
    if geometry.strides != (1, 1) or kh * kw == 1:
        return "im2col"
    if in_channels < _SHIFTED_MIN_CHANNELS and not input_gradient:
        return "im2col"
    hp, wp = geometry.padded_hw
    waste = hp * wp / (geometry.out_hw[0] * geometry.out_hw[1])
    return "shifted" if waste <= _SHIFTED_MAX_WASTE else "im2col"


def _resolve_algorithm(fn: str, algorithm, geometry, in_channels, input_gradient=False):
    if algorithm is None:
        return choose_algorithm(geometry, in_channels, input_gradient)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{fn}: algorithm must be one of {ALGORITHMS} or None, "
                         f"got {algorithm!r}")
    if algorithm == "shifted" and geometry.strides != (1, 1):
        raise ValueError(f"{fn}: algorithm 'shifted' needs strides (1, 1), "
                         f"got {geometry.strides}")
    return algorithm


# --------------------------------------------------------------------------- reference loops

def conv2d_reference(x, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """The course's formula as plain loops (slow on purpose; tests hold the fast kernels to it).

    ``(f * w)(x, y) = sum_{dx=-a..a} sum_{dy=-b..b} w(a+dx, b+dy) f(x+dx, y+dy)`` summed over the
    input channels, for each output channel; the window centre moves by the stride, the taps
    are ``dilation`` pixels apart, pixels outside the image are zero (padding).
    """
    _check_conv_args("conv2d_reference", x, w, b)
    n_batch, height, width, _ = x.shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry("conv2d_reference", (height, width), (kh, kw), strides, dilation, padding)
    (top, _), (left, _) = g.pads
    a, bb = (kh - 1) // 2, (kw - 1) // 2      # centre tap of the kernel (w(a, b) in the formula)
    y = np.zeros((n_batch, *g.out_hw, n_out), dtype=x.dtype)
    for n in range(n_batch):
        for oy in range(g.out_hw[0]):
            for ox in range(g.out_hw[1]):
                cy = oy * g.strides[0] - top + a * g.dilation[0]       # window centre in x
                cx = ox * g.strides[1] - left + bb * g.dilation[1]
                for o in range(n_out):
                    total = 0.0 if b is None else b[o]
                    for dy in range(-a, kh - a):                      # -a..a for odd kernels
                        for dx in range(-bb, kw - bb):
                            iy, ix = cy + dy * g.dilation[0], cx + dx * g.dilation[1]
                            if 0 <= iy < height and 0 <= ix < width:  # outside: zero padding
                                total += np.dot(w[a + dy, bb + dx, :, o], x[n, iy, ix, :])
                    y[n, oy, ox, o] = total
    return y


def conv2d_backward_reference(x, w, grad_y, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """Both gradients as plain loops: each output pixel sends ``w * dy`` back to the input pixels
    of its window and ``x * dy`` to the kernel taps. Returns ``(dx, dw, db)``."""
    _check_conv_args("conv2d_backward_reference", x, w)
    n_batch, height, width, _ = x.shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry("conv2d_backward_reference", (height, width), (kh, kw), strides, dilation,
                      padding)
    _check_grad_shape("conv2d_backward_reference", grad_y, (n_batch, *g.out_hw, n_out))
    (top, _), (left, _) = g.pads
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n in range(n_batch):
        for oy in range(g.out_hw[0]):
            for ox in range(g.out_hw[1]):
                for i in range(kh):
                    for j in range(kw):
                        iy = oy * g.strides[0] + i * g.dilation[0] - top
                        ix = ox * g.strides[1] + j * g.dilation[1] - left
                        if 0 <= iy < height and 0 <= ix < width:
                            for o in range(n_out):
                                dx[n, iy, ix, :] += w[i, j, :, o] * grad_y[n, oy, ox, o]
                                dw[i, j, :, o] += x[n, iy, ix, :] * grad_y[n, oy, ox, o]
    db = grad_y.sum(axis=(0, 1, 2))
    return dx, dw, db


def conv2d_transpose_reference(y, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid",
                               output_padding=None):
    """Transposed convolution as plain loops: every input pixel stamps the kernel, scaled by its
    values, onto the output at ``stride`` times its position. ``w: (kh, kw, out, in)`` (Keras)."""
    _check_transpose_args("conv2d_transpose_reference", y, w, b)
    n_batch, height, width, _ = y.shape
    kh, kw, n_out, _ = w.shape
    out_hw, pads = _transpose_geometry("conv2d_transpose_reference", (height, width), (kh, kw),
                                       strides, dilation, padding, output_padding)
    sh, sw = normalize_tuple(strides, 2, "strides")
    dh, dw_ = normalize_tuple(dilation, 2, "dilation_rate")
    (top, _), (left, _) = pads
    out = np.zeros((n_batch, *out_hw, n_out), dtype=y.dtype)
    for n in range(n_batch):
        for iy in range(height):
            for ix in range(width):
                for i in range(kh):
                    for j in range(kw):
                        oy, ox = iy * sh + i * dh - top, ix * sw + j * dw_ - left
                        if 0 <= oy < out_hw[0] and 0 <= ox < out_hw[1]:
                            out[n, oy, ox, :] += w[i, j, :, :] @ y[n, iy, ix, :]
    if b is not None:
        out += b
    return out


# --------------------------------------------------------------------------- building blocks

_scratch = threading.local()


def scratch(xp, slot: str, shape, dtype, zero=False):
    """A buffer for an array that never leaves one kernel call, reused from call to call.

    A fresh multi-megabyte NumPy array page-faults on first touch (the OS hands out zeroed
    pages): measured, that costs as much as the matrix products of a 64x64, 32-channel layer.
    So temporaries are kept, per thread and per ``slot``, grown to the largest size seen. CuPy
    has its own memory pool: there this is plain ``empty``/``zeros``. Contents are undefined
    unless ``zero``. ``clear_scratch()`` releases them.
    """
    if xp is not np:
        return xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
    cache = _scratch.__dict__
    size, key = math.prod(shape), (slot, np.dtype(dtype))
    if key not in cache or cache[key].size < size:
        cache[key] = np.empty(size, dtype=dtype)
    out = cache[key][:size].reshape(shape)
    if zero:
        out.fill(0)
    return out


def clear_scratch():
    """Free the reusable temporaries of this thread."""
    _scratch.__dict__.clear()


def pad_input(x, pads, slot=None):
    """Zero-padded copy ``(N, H+top+bottom, W+left+right, C)``; ``x`` itself when no padding.

    With ``slot`` the copy is a reused temporary (see ``scratch``): only for arrays that stay
    inside the call.
    """
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    shape = (n, h + top + bottom, w + left + right, c)
    out = xp.zeros(shape, dtype=x.dtype) if slot is None else scratch(xp, slot, shape, x.dtype,
                                                                       zero=True)
    out[:, top:top + h, left:left + w, :] = x
    return out


def crop_padding(xpad, pads):
    """Inverse of ``pad_input``: the interior as a new C-contiguous array (``xpad`` itself when
    there is no padding)."""
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return xpad
    return copy_of(xpad[:, top:xpad.shape[1] - bottom, left:xpad.shape[2] - right, :])


def copy_of(view):
    """A new C-contiguous array with the values of ``view`` (always a copy: a kernel's results
    must never share memory with its reused ``scratch`` buffers)."""
    xp = get_array_module(view)
    out = xp.empty(view.shape, dtype=view.dtype)
    out[...] = view
    return out


def window_view(xpad, geometry: ConvGeometry):
    """A view (no copy, not to be written) of every window:
    ``v[n, oy, ox, i, j, c] = xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]``."""
    xp = get_array_module(xpad)
    n, _, _, c = xpad.shape
    s_n, s_h, s_w, s_c = xpad.strides
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilation
    shape = (n, *geometry.out_hw, *geometry.kernel_hw, c)
    strides = (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c)
    return xp.lib.stride_tricks.as_strided(xpad, shape=shape, strides=strides)


def im2col(x, geometry: ConvGeometry, slot=None):
    """``cols: (N, Ho, Wo, kh, kw, C)``, every kernel window copied once (one strided copy).

    A 1x1 stride-1 unpadded convolution needs no copy: ``cols`` is then ``x`` itself. With
    ``slot`` the matrix is a reused temporary (see ``scratch``).
    """
    xp = get_array_module(x)
    n, _, _, c = x.shape
    shape = (n, *geometry.out_hw, *geometry.kernel_hw, c)
    if geometry.kernel_hw == (1, 1) and geometry.strides == (1, 1) \
            and geometry.pads == ((0, 0), (0, 0)):
        return x.reshape(shape)
    cols = xp.empty(shape, dtype=x.dtype) if slot is None else scratch(xp, slot, shape, x.dtype)
    cols[...] = window_view(pad_input(x, geometry.pads, slot="im2col_pad"), geometry)
    return cols


def col2im(cols, x_shape, geometry: ConvGeometry):
    """Adjoint of ``im2col``: add every window ``cols[:, :, :, i, j, :]`` back where it was read.

    Returns ``(N, H, W, C)``. Windows that tile the image exactly (kernel == stride, no padding,
    no dilation: the U-Net's 2x2 up-sampling) are a pure reshuffle, done as one transposed copy.
    """
    xp = get_array_module(cols)
    n, height, width, c = x_shape
    (ho, wo), (kh, kw) = geometry.out_hw, geometry.kernel_hw
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilation
    if (kh, kw) == (sh, sw) and (dh, dw) == (1, 1) and (ho * kh, wo * kw) == (height, width) \
            and geometry.pads == ((0, 0), (0, 0)):
        return copy_of(cols.transpose(0, 1, 3, 2, 4, 5)).reshape(x_shape)   # no overlap
    padded_shape = (n, *geometry.padded_hw, c)
    if geometry.pads == ((0, 0), (0, 0)):
        xpad = xp.zeros(padded_shape, dtype=cols.dtype)           # it is the result
    else:
        xpad = scratch(xp, "col2im", padded_shape, cols.dtype, zero=True)
    for i in range(kh):
        for j in range(kw):
            xpad[tap_slices(geometry, i, j)] += cols[:, :, :, i, j, :]
    return crop_padding(xpad, geometry.pads)


def tap_slices(geometry: ConvGeometry, i: int, j: int):
    """Index of the padded-input pixels that kernel tap (i, j) reads for all outputs:
    ``xpad[tap_slices(g, i, j)]`` is ``(N, Ho, Wo, C)``, ``[n, oy, ox]`` being
    ``xpad[n, oy*sh + i*dh, ox*sw + j*dw]``."""
    (ho, wo), (sh, sw), (dh, dw) = geometry.out_hw, geometry.strides, geometry.dilation
    rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
    columns = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
    return (slice(None), rows, columns, slice(None))


def sum_over_pixels(grad):
    """``grad: (N, H, W, C) -> (C,)``, the bias gradient, as ``ones @ grad``: a BLAS product is
    about ten times faster than NumPy's reduction over leading axes here, and sums in blocks."""
    xp = get_array_module(grad)
    rows = grad.reshape(-1, grad.shape[-1])
    return xp.ones(rows.shape[0], dtype=grad.dtype) @ rows


def row_shifts(geometry: ConvGeometry):
    """Offsets, in rows of the flattened padded input, of each kernel tap (i, j) ("shifted")."""
    wp = geometry.padded_hw[1]
    (kh, kw), (dh, dw) = geometry.kernel_hw, geometry.dilation
    return [(i, j, i * dh * wp + j * dw) for i in range(kh) for j in range(kw)]


def embed_in_padded_grid(grad_y, geometry: ConvGeometry):
    """``dy`` placed at the top-left of a zero ``(N, Hp, Wp, O)`` grid, flattened to rows:
    the layout in which "shifted" computed the output (the dropped border rows get zero)."""
    xp = get_array_module(grad_y)
    n, ho, wo, n_out = grad_y.shape
    hp, wp = geometry.padded_hw
    grid = scratch(xp, "dy_grid", (n, hp, wp, n_out), grad_y.dtype, zero=True)
    grid[:, :ho, :wo, :] = grad_y
    return grid.reshape(n * hp * wp, n_out)


# --------------------------------------------------------------------------- forward

def conv2d_forward(x, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid",
                   algorithm=None, return_workspace=False):
    """y = conv2d(x, w) + b. ``x: (N, H, W, C)``, ``w: (kh, kw, C, O)``, ``b: (O,)`` or None.

    ``padding``: 'valid', 'same' (Keras/TensorFlow split, extra at the bottom/right) or explicit
    (see ``kernels.shapes``). ``algorithm``: None (auto), 'im2col' or 'shifted'.
    With ``return_workspace=True`` returns ``(y, workspace)``: the array the filter gradient
    reads (im2col: the window matrix; shifted: the padded input), to hand to
    ``conv2d_backward(..., workspace=...)`` so it is not rebuilt.
    """
    fn = "conv2d_forward"
    _check_conv_args(fn, x, w, b)
    xp = get_array_module(x, w)
    n, height, width, c = x.shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry(fn, (height, width), (kh, kw), strides, dilation, padding)
    algorithm = _resolve_algorithm(fn, algorithm, g, c)
    keep = None if return_workspace else "workspace"     # a kept workspace must be fresh
    if algorithm == "im2col":
        workspace = im2col(x, g, slot=keep)                         # (N, Ho, Wo, kh, kw, C)
        y = workspace.reshape(-1, kh * kw * c) @ w.reshape(kh * kw * c, n_out)
        y = y.reshape(n, *g.out_hw, n_out)
    else:
        workspace = pad_input(x, g.pads, slot=keep)                 # (N, Hp, Wp, C)
        hp, wp = g.padded_hw
        rows = workspace.reshape(n * hp * wp, c)
        shifts = row_shifts(g)
        m = rows.shape[0] - shifts[-1][2]           # grid rows whose whole window is in the array
        grid = scratch(xp, "y_grid", (n * hp * wp, n_out), x.dtype)
        acc, term = grid[:m], scratch(xp, "term", (m, n_out), x.dtype)
        for k, (i, j, shift) in enumerate(shifts):  # y = sum_ij xpad[shift_ij + row] @ w[i, j]
            xp.matmul(rows[shift:shift + m], w[i, j], out=acc if k == 0 else term)
            if k:
                acc += term
        y = copy_of(grid.reshape(n, hp, wp, n_out)[:, :g.out_hw[0], :g.out_hw[1]])
    if b is not None:
        y += b
    return (y, workspace) if return_workspace else y


# --------------------------------------------------------------------------- backward

def conv2d_backward(grad_y, x, w, strides=(1, 1), dilation=(1, 1), padding="valid",
                    need_input=True, need_filter=True, need_bias=True, workspace=None,
                    algorithm=None, x_shape=None):
    """Gradients of ``conv2d_forward`` as ``(dx, dw, db)``; any not needed is None.

    ``grad_y: (N, Ho, Wo, O)``. ``x`` is needed only for the filter gradient (or pass the
    ``workspace`` that ``conv2d_forward(..., return_workspace=True)`` returned, with the same
    ``algorithm``); for the input gradient alone pass ``x=None, x_shape=(N, H, W, C)``.
    """
    fn = "conv2d_backward"
    if x is not None:
        _check_conv_args(fn, x, w)
        x_shape = x.shape
    elif x_shape is None:
        raise ValueError(f"{fn}: pass x, or x_shape when only the input gradient is wanted")
    elif need_filter and workspace is None:
        raise ValueError(f"{fn}: the filter gradient needs x or the forward's workspace")
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or w.ndim != 4 or x_shape[3] != w.shape[2]:
        raise ValueError(f"{fn}: input shape {x_shape} does not fit kernel {tuple(w.shape)} "
                         "(expected (N, H, W, C) and (kh, kw, C, O))")
    _check_float(fn, grad_y=grad_y, w=w)
    n, height, width, c = x_shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry(fn, (height, width), (kh, kw), strides, dilation, padding)
    _check_grad_shape(fn, grad_y, (n, *g.out_hw, n_out))
    dx = dw = dy_rows = None
    db = sum_over_pixels(grad_y) if need_bias else None
    if need_filter:             # same algorithm as the forward, whose workspace it reads
        if _resolve_algorithm(fn, algorithm, g, c) == "im2col":
            cols = im2col(x, g, slot="workspace") if workspace is None else workspace
            _check_workspace(fn, cols, (n, *g.out_hw, kh, kw, c))
            dw = _filter_gradient_im2col(cols, grad_y, w.shape)
        else:
            xpad = pad_input(x, g.pads, slot="workspace") if workspace is None else workspace
            _check_workspace(fn, xpad, (n, *g.padded_hw, c))
            dy_rows = embed_in_padded_grid(grad_y, g)
            dw = _filter_gradient_shifted(xpad, dy_rows, w.shape, g)
    if need_input:              # chosen on its own: it reads only grad_y and w
        if _resolve_algorithm(fn, algorithm, g, c, input_gradient=True) == "im2col":
            dx = _input_gradient_im2col(grad_y, w, x_shape, g)
        else:
            dy_rows = embed_in_padded_grid(grad_y, g) if dy_rows is None else dy_rows
            dx = _input_gradient_shifted(dy_rows, w, x_shape, g)
    return dx, dw, db


def _filter_gradient_im2col(cols, grad_y, w_shape):
    """dw = cols.T @ dy: ``(kh*kw*C, N*Ho*Wo) @ (N*Ho*Wo, O)``, one matrix product."""
    k = math.prod(w_shape[:3])
    return (cols.reshape(-1, k).T @ grad_y.reshape(-1, w_shape[3])).reshape(w_shape)


def _input_gradient_im2col(grad_y, w, x_shape, g):
    """dx = col2im(dy @ w.T): each window's gradient, scattered back where it was read."""
    xp = get_array_module(grad_y, w)
    kh, kw, c, n_out = w.shape
    dcols = scratch(xp, "dcols", (x_shape[0], *g.out_hw, kh, kw, c), grad_y.dtype)
    xp.matmul(grad_y.reshape(-1, n_out), w.reshape(kh * kw * c, n_out).T,
              out=dcols.reshape(-1, kh * kw * c))
    return col2im(dcols, x_shape, g)


def _filter_gradient_shifted(xpad, dy_rows, w_shape, g):
    """dw[i, j] = xpad_rows[shift_ij + r].T @ dy_rows[r], grouped by kernel row: the kw taps of
    a row are copied side by side once (``row_taps[r] = xpad_rows[r + j*dw]``, j = 0..kw-1),
    then ``dw[i] = row_taps[i*dh*Wp + r].T @ dy_rows[r]``, kh products of K = kw*C rows. (Nine
    (C, m) @ (m, O) products with C = O = 16 ran at a third of this speed on 2 threads.)
    ``dy_rows: (N*Hp*Wp, O)`` from ``embed_in_padded_grid``."""
    xp = get_array_module(xpad, dy_rows)
    n, hp, wp, c = xpad.shape
    (kh, kw), (dh, dw_) = g.kernel_hw, g.dilation
    rows = xpad.reshape(n * hp * wp, c)
    taps = rows.shape[0] - (kw - 1) * dw_                  # rows whose kw taps are all inside
    row_taps = scratch(xp, "row_taps", (taps, kw, c), xpad.dtype)
    row_taps[...] = xp.lib.stride_tricks.as_strided(
        rows, shape=(taps, kw, c), strides=(rows.strides[0], dw_ * rows.strides[0],
                                            rows.strides[1]))
    row_taps = row_taps.reshape(taps, kw * c)
    m = rows.shape[0] - row_shifts(g)[-1][2]
    dw = xp.empty(w_shape, dtype=dy_rows.dtype)
    for i in range(kh):
        start = i * dh * wp
        xp.matmul(row_taps[start:start + m].T, dy_rows[:m], out=dw[i].reshape(kw * c, -1))
    return dw


def _input_gradient_shifted(dy_rows, w, x_shape, g):
    """dxpad_rows[shift_ij + r] += dy_rows[r] @ w[i, j].T: one product per kernel offset.
    ``dy_rows: (N*Hp*Wp, O)`` from ``embed_in_padded_grid``."""
    xp = get_array_module(dy_rows, w)
    n, _, _, c = x_shape
    hp, wp = g.padded_hw
    shifts = row_shifts(g)
    m = n * hp * wp - shifts[-1][2]
    if g.pads == ((0, 0), (0, 0)):
        dx_rows = xp.zeros((n * hp * wp, c), dtype=dy_rows.dtype)   # it is the result
    else:
        dx_rows = scratch(xp, "dx_grid", (n * hp * wp, c), dy_rows.dtype, zero=True)
    term = scratch(xp, "term", (m, c), dy_rows.dtype)
    for i, j, shift in shifts:
        xp.matmul(dy_rows[:m], w[i, j].T, out=term)
        dx_rows[shift:shift + m] += term
    return crop_padding(dx_rows.reshape(n, hp, wp, c), g.pads)


def _check_workspace(fn, workspace, expected):
    if tuple(workspace.shape) != tuple(expected):
        raise ValueError(f"{fn}: workspace of shape {tuple(workspace.shape)} does not match "
                         f"this convolution (expected {tuple(expected)}; same algorithm as the "
                         "forward?)")


def conv2d_backward_input(grad_y, w, x_shape, strides=(1, 1), dilation=(1, 1), padding="valid",
                          algorithm=None):
    """dL/dx of ``conv2d_forward``: ``(N, H, W, C)`` from ``grad_y: (N, Ho, Wo, O)``."""
    return conv2d_backward(grad_y, None, w, strides, dilation, padding, need_input=True,
                           need_filter=False, need_bias=False, algorithm=algorithm,
                           x_shape=x_shape)[0]


def conv2d_backward_filter(x, grad_y, w_shape, strides=(1, 1), dilation=(1, 1), padding="valid",
                           need_bias=True, workspace=None, algorithm=None):
    """(dL/dw, dL/db) of ``conv2d_forward``: ``(kh, kw, C, O)`` and ``(O,)`` (db: None if not
    needed). ``workspace``: what ``conv2d_forward(..., return_workspace=True)`` returned, to skip
    its rebuild (x may then be None).
    """
    w_shape = tuple(int(s) for s in w_shape)
    if len(w_shape) != 4:
        raise ValueError(f"conv2d_backward_filter: w_shape must be (kh, kw, C, O), "
                         f"got {w_shape}")
    xp = get_array_module(grad_y)
    w_like = xp.empty(w_shape, dtype=grad_y.dtype)      # only its shape and dtype are read
    _, dw, db = conv2d_backward(grad_y, x, w_like, strides, dilation, padding, need_input=False,
                                need_filter=True, need_bias=need_bias, workspace=workspace,
                                algorithm=algorithm)
    return dw, db


# --------------------------------------------------------------------------- transposed twin

def _transpose_geometry(fn, in_hw, kernel_hw, strides, dilation, padding, output_padding):
    """Output size (Keras' rule) and the explicit padding of the forward twin."""
    try:
        if isinstance(normalize_padding(padding, 2), tuple):
            raise ValueError("transposed convolution takes padding 'valid' or 'same', "
                             f"got {padding!r}")
        return conv_transpose2d_geometry(tuple(in_hw), tuple(kernel_hw), strides, dilation,
                                         padding, output_padding)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc} (input {tuple(in_hw)}, kernel {tuple(kernel_hw)}, "
                         f"strides {strides}, dilation {dilation}, output_padding "
                         f"{output_padding})") from None


def _check_transpose_args(fn: str, y, w, b=None):
    """y: (N, H, W, in), w: (kh, kw, out, in), b: (out,) or None."""
    if y.ndim != 4:
        raise ValueError(f"{fn}: y must be 4-D (N, H, W, C), got shape {tuple(y.shape)}")
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D (kh, kw, C_out, C_in), got shape {tuple(w.shape)}")
    if y.shape[3] != w.shape[3]:
        raise ValueError(f"{fn}: y of shape {tuple(y.shape)} has {y.shape[3]} channels but the "
                         f"transposed kernel of shape {tuple(w.shape)} (kh, kw, out, in) "
                         f"expects {w.shape[3]}")
    if b is not None and tuple(b.shape) != (w.shape[2],):
        raise ValueError(f"{fn}: bias must have shape ({w.shape[2]},) to match the kernel "
                         f"{tuple(w.shape)}, got {tuple(b.shape)}")
    _check_float(fn, y=y, w=w, b=b)


def conv2d_transpose_output_shape(y_shape, w_shape, strides=(1, 1), dilation=(1, 1),
                                  padding="valid", output_padding=None):
    """``(N, Ho, Wo, out)`` of ``conv2d_transpose_forward`` for ``y: (N, H, W, in)``."""
    out_hw, _ = _transpose_geometry("conv2d_transpose", y_shape[1:3], w_shape[:2], strides,
                                    dilation, padding, output_padding)
    return (y_shape[0], *out_hw, w_shape[2])


def conv2d_transpose_forward(y, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid",
                             output_padding=None, algorithm=None):
    """Transposed convolution: ``y: (N, H, W, in)``, ``w: (kh, kw, out, in)`` (Keras) ->
    ``(N, Ho, Wo, out)``, Ho by Keras' rule (``kernels.shapes``).

    It IS the input gradient of the convolution with HWIO kernel ``w`` mapping (Ho, Wo) to
    (H, W); for k = s = 2 that is one matrix product and a reshuffle (see ``col2im``).
    """
    fn = "conv2d_transpose_forward"
    _check_transpose_args(fn, y, w, b)
    out_shape = conv2d_transpose_output_shape(y.shape, w.shape, strides, dilation, padding,
                                              output_padding)
    _, pads = _transpose_geometry(fn, y.shape[1:3], w.shape[:2], strides, dilation, padding,
                                  output_padding)
    out = conv2d_backward_input(y, w, out_shape, strides, dilation, pads, algorithm)
    if b is not None:
        out += b
    return out


def conv2d_transpose_backward(grad_out, y, w, strides=(1, 1), dilation=(1, 1), padding="valid",
                              output_padding=None, need_input=True, need_filter=True,
                              need_bias=True, algorithm=None):
    """Gradients ``(dy, dw, db)`` of ``conv2d_transpose_forward`` (None where not needed).

    The forward twin maps ``grad_out`` (shape of the transposed output) back to ``y``'s shape:
    ``dy = conv2d_forward(grad_out, w)`` and ``dw = conv2d_backward_filter(x=grad_out, grad_y=y)``.
    """
    _check_transpose_args("conv2d_transpose_backward", y, w)
    _, pads = _transpose_geometry("conv2d_transpose_backward", y.shape[1:3], w.shape[:2],
                                  strides, dilation, padding, output_padding)
    dy = workspace = None
    if need_input:
        dy, workspace = conv2d_forward(grad_out, w, None, strides, dilation, pads, algorithm,
                                       return_workspace=True)
    dw = None
    if need_filter:
        dw, _ = conv2d_backward_filter(grad_out, y, w.shape, strides, dilation, pads,
                                       need_bias=False, workspace=workspace, algorithm=algorithm)
    db = sum_over_pixels(grad_out) if need_bias else None
    return dy, dw, db
