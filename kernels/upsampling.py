"""Up-sampling of NHWC images by integer factors (sh, sw), nearest and bilinear, both ways.

    nearest:  y[n, i, j, c] = x[n, i // sh, j // sw, c]; dx sums dy over each sh x sw block.
    bilinear: Keras 3's image resize (TF ``resize_bilinear`` with half-pixel centres): output row
              o samples the input at r = (o + 0.5) / sh - 0.5, between rows floor(r) and
              floor(r) + 1, both clamped to [0, H-1], as ``lo + (hi - lo) * (r - floor(r))``; the
              same along columns, columns first. Backward: each output's dy goes back to its two
              source rows (columns) with weights 1 - t and t.

The kernels loop over the sh (sw) phases of the output and work on strided views of whole arrays;
the ``*_reference`` twins loop over every output pixel. The CUDA twins are in
``kernels/cuda/upsample.py``.
"""
from __future__ import annotations

import math

import numpy as np

from kernels.backend import get_array_module
from kernels.shapes import normalize_upsampling
from kernels.windows import check_images


def upsample2d_forward(x, *, size=2, interpolation="nearest"):
    """Up-sampling by integer factors. x: (N, H, W, C) -> y: (N, H*sh, W*sw, C).

    nearest:  y[n, i, j, c] = x[n, i // sh, j // sw, c]
    bilinear: Keras 3 / TF resize with half-pixel centres, edges clamped (see the module docstring).
    """
    check_images("upsample2d", "x", x)
    (sh, sw), interpolation = normalize_upsampling("upsample2d", size, interpolation)
    xp = get_array_module(x)
    if sh == sw == 1:
        return x.copy()
    if interpolation == "nearest":
        n, h, w, c = x.shape
        y = xp.broadcast_to(x[:, :, None, :, None, :], (n, h, sh, w, sw, c))
        return y.reshape(n, h * sh, w * sw, c)
    return _lerp_axis(_lerp_axis(x, 2, sw), 1, sh)       # columns first, as TF


def upsample2d_backward(dy, *, size=2, interpolation="nearest"):
    """The adjoint of ``upsample2d_forward``. dy: (N, H*sh, W*sw, C) -> dx: (N, H, W, C).

    nearest:  dx[n, i, j, c] = sum of dy over the sh x sw block it was copied to.
    bilinear: each output's dy goes back to its two source rows (columns) with weights
              1 - t and t, rows first (the reverse of the forward).
    """
    check_images("upsample2d_backward", "dy", dy)
    (sh, sw), interpolation = normalize_upsampling("upsample2d_backward", size, interpolation)
    n, H, W, c = dy.shape
    if H % sh or W % sw:
        raise ValueError(f"upsample2d_backward: dy of shape {tuple(dy.shape)} is not a multiple of "
                         f"size {(sh, sw)}")
    if interpolation == "nearest":
        return dy.reshape(n, H // sh, sh, W // sw, sw, c).sum(axis=(2, 4))
    return _lerp_axis_backward(_lerp_axis_backward(dy, 1, sh), 2, sw)


def _phase_offset(p, s):
    """Output p of each block of s samples the input at i + d with d = (p + 0.5) / s - 0.5."""
    return (p + 0.5) / s - 0.5


def _take(a, axis, index):
    """a[..., index, ...] along ``axis`` (a slice or an int that keeps the axis)."""
    if isinstance(index, int):
        index = slice(index, index + 1 if index != -1 else None)
    key = [slice(None)] * a.ndim
    key[axis] = index
    return a[tuple(key)]


def _lerp_axis(x, axis, s):
    """Linear interpolation by an integer factor s along ``axis`` (half-pixel centres, clamped).

    Phase p (outputs o = i*s + p) samples i + d, d in (-1/2, 1/2): for d < 0 it lies between rows
    i-1 and i (t = 1 + d; row 0 is clamped to x[0]), for d >= 0 between i and i+1 (t = d; the
    last row is clamped to x[-1]). Each is lo + (hi - lo) * t with hi - lo = x[1:] - x[:-1].
    """
    if s == 1:
        return x
    xp = get_array_module(x)
    shape = list(x.shape)
    shape[axis] *= s
    y = xp.empty(shape, dtype=x.dtype)
    lo, hi = _take(x, axis, slice(None, -1)), _take(x, axis, slice(1, None))
    step = hi - lo
    for p in range(s):
        d = _phase_offset(p, s)
        out = _take(y, axis, slice(p, None, s))
        if d < 0:       # between i-1 and i: outputs 1.. get lo + step * t, output 0 is clamped
            inner, edge, edge_src = _take(out, axis, slice(1, None)), _take(out, axis, 0), 0
            t = 1 + d
        else:           # between i and i+1: outputs ..n-2 interpolate, output n-1 is clamped
            inner, edge, edge_src = _take(out, axis, slice(None, -1)), _take(out, axis, -1), -1
            t = d
        if t == 0:
            inner[...] = lo
        else:
            xp.multiply(step, t, out=inner)
            inner += lo
        edge[...] = _take(x, axis, edge_src)
    return y


def _lerp_axis_backward(dy, axis, s):
    """The adjoint of ``_lerp_axis``: y = lo + (hi - lo) t = (1 - t) lo + t hi, so lo gets
    (1 - t) dy and hi gets t dy; a clamped edge output gives its whole dy to its one source."""
    if s == 1:
        return dy
    xp = get_array_module(dy)
    shape = list(dy.shape)
    shape[axis] //= s
    dx = xp.zeros(shape, dtype=dy.dtype)
    dx_lo, dx_hi = _take(dx, axis, slice(None, -1)), _take(dx, axis, slice(1, None))
    for p in range(s):
        d = _phase_offset(p, s)
        g = _take(dy, axis, slice(p, None, s))
        if d < 0:
            inner, edge, edge_dst, t = _take(g, axis, slice(1, None)), _take(g, axis, 0), 0, 1 + d
        else:
            inner, edge, edge_dst, t = _take(g, axis, slice(None, -1)), _take(g, axis, -1), -1, d
        if t == 0:
            dx_lo += inner
        else:
            dx_lo += inner * (1 - t)
            dx_hi += inner * t
        _take(dx, axis, edge_dst)[...] += edge
    return dx


def upsample2d_reference(x, *, size=2, interpolation="nearest"):
    """Loops over output pixels; bilinear as TF's resize_bilinear (half-pixel centres)."""
    (sh, sw), interpolation = normalize_upsampling("upsample2d", size, interpolation)
    n_, h_, w_, c_ = x.shape
    y = np.empty((n_, h_ * sh, w_ * sw, c_), dtype=x.dtype)
    for n, i, j, c in np.ndindex(*y.shape):
        if interpolation == "nearest":
            y[n, i, j, c] = x[n, i // sh, j // sw, c]
            continue
        (r0, r1, tr), (s0, s1, ts) = _bilinear_source(i, sh, h_), _bilinear_source(j, sw, w_)
        top = x[n, r0, s0, c] + (x[n, r0, s1, c] - x[n, r0, s0, c]) * ts
        bottom = x[n, r1, s0, c] + (x[n, r1, s1, c] - x[n, r1, s0, c]) * ts
        y[n, i, j, c] = top + (bottom - top) * tr
    return y


def upsample2d_backward_reference(dy, *, size=2, interpolation="nearest"):
    (sh, sw), interpolation = normalize_upsampling("upsample2d_backward", size, interpolation)
    n_, H, W, c_ = dy.shape
    h_, w_ = H // sh, W // sw
    dx = np.zeros((n_, h_, w_, c_), dtype=dy.dtype)
    for n, i, j, c in np.ndindex(*dy.shape):
        g = dy[n, i, j, c]
        if interpolation == "nearest":
            dx[n, i // sh, j // sw, c] += g
            continue
        (r0, r1, tr), (s0, s1, ts) = _bilinear_source(i, sh, h_), _bilinear_source(j, sw, w_)
        dx[n, r0, s0, c] += g * (1 - tr) * (1 - ts)
        dx[n, r0, s1, c] += g * (1 - tr) * ts
        dx[n, r1, s0, c] += g * tr * (1 - ts)
        dx[n, r1, s1, c] += g * tr * ts
    return dx


def _bilinear_source(o, s, n):
    """Output index o of an axis scaled by s from n: (lower, upper, t) with half-pixel centres."""
    r = (o + 0.5) / s - 0.5
    r0 = math.floor(r)
    return min(max(r0, 0), n - 1), min(max(r0 + 1, 0), n - 1), r - r0
