"""Pooling and up-sampling of NHWC images: forward and backward side by side.

Shapes: x (N, H, W, C) -> y (N, out_h, out_w, C), sizes and padding from
``kernels.shapes.pool2d_geometry`` (strides default to the pool size; 'same' pads as Keras/TF,
the odd extra row/column at the bottom/right). A window of pool size (ph, pw) at output (i, j)
covers rows ``i*sh - top + a`` and columns ``j*sw - left + b``, 0 <= a < ph, 0 <= b < pw.

    max:      y[n,i,j,c] = max_(a,b) x[n, i*sh-top+a, j*sw-left+b, c]; padded cells are -inf and
              never win. The winner's window offset k = a*pw + b (the first in row-major order on
              ties) is kept; backward sends dy[n,i,j,c] to that cell only, and overlapping windows
              add up.
    average:  y = (sum of the real cells of the window) / (how many there are): padded cells are
              left out of the mean, as in Keras/TF (PyTorch's count_include_pad=True differs).
    global:   y[n,c] = mean over (h, w) of x[n,h,w,c]; dx = dy / (H*W) everywhere.
    upsample: factors (sh, sw). 'nearest' repeats each pixel sh x sw times. 'bilinear' is Keras 3's
              image resize (TF ``resize_bilinear`` with half-pixel centres): output row o samples
              the input at r = (o + 0.5) / sh - 0.5, between rows floor(r) and floor(r) + 1, both
              clamped to [0, H-1], as ``lo + (hi - lo) * (r - floor(r))``; the same along columns,
              columns first.

The fast kernels loop only over window offsets (ph*pw) or up-sampling phases (sh, sw) and work
on strided views of whole arrays. When windows tile the image exactly (stride == pool size, no
padding, H and W multiples of the pool: MaxPooling2D(2) on even sizes), max and average pooling
take a reshape-based path. Each ``*_reference`` twin loops over every output value.

On CuPy arrays, max pooling's forward and up-sampling (both ways) run the CUDA kernels of
``kernels.cuda`` (same arguments, same results; see ``kernels.backend.cuda_kernels_enabled``);
max pooling's backward stays array code, which is as fast there.
"""
from __future__ import annotations

import math

import numpy as np

from kernels import cuda
from kernels.backend import cuda_kernels_enabled, get_array_module
from kernels.cpu import num_threads, parallel_map
from kernels.shapes import normalize_tuple, normalize_upsampling, pool2d_geometry

# -- geometry helpers -----------------------------------------------------------------------------


def _check_images(name, x):
    if x.ndim != 4:
        raise ValueError(f"{name}: expected images of shape (N, H, W, C), "
                         f"got shape {tuple(x.shape)}")


def _geometry(name, x_shape, pool_size, strides, padding):
    """(pool, strides, out_hw, pads) of a pooling window, all validated by kernels.shapes."""
    if len(x_shape) != 4:
        raise ValueError(f"{name}: expected images of shape (N, H, W, C), "
                         f"got shape {tuple(x_shape)}")
    pool = normalize_tuple(pool_size, 2, "pool_size", minimum=1)
    strides = pool if strides is None else normalize_tuple(strides, 2, "strides", minimum=1)
    try:
        out_hw, pads = pool2d_geometry(x_shape[1:3], pool, strides, padding)
    except ValueError as exc:
        raise ValueError(f"{name}: input of shape {tuple(x_shape)}, pool_size={pool}, "
                         f"strides={strides}, padding={padding!r}: {exc}") from None
    return pool, strides, out_hw, pads


def _offsets(pool):
    """Window offsets (a, b) in row-major order: k = a * pw + b."""
    return [(a, b) for a in range(pool[0]) for b in range(pool[1])]


def _window(xpad, a, b, out_hw, strides):
    """The strided view of every window's cell (a, b): shape (N, out_h, out_w, C)."""
    (oh, ow), (sh, sw) = out_hw, strides
    return xpad[:, a:a + sh * (oh - 1) + 1:sh, b:b + sw * (ow - 1) + 1:sw, :]


def _pad(x, pads, value):
    """x with ``pads`` ((top, bottom), (left, right)) of ``value`` around H and W."""
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    out = xp.full((n, h + top + bottom, w + left + right, c), value, dtype=x.dtype)
    out[:, top:top + h, left:left + w, :] = x
    return out


def _crop(xpad, pads, x_shape):
    (top, _), (left, _) = pads
    return xpad[:, top:top + x_shape[1], left:left + x_shape[2], :]


def _tiles_exactly(x_shape, pool, strides, out_hw, pads):
    """True when the windows cover the image exactly once: reshape (N, oh, ph, ow, pw, C)."""
    no_pad = all(p == 0 for pair in pads for p in pair)
    return (no_pad and tuple(strides) == tuple(pool)
            and out_hw[0] * pool[0] == x_shape[1] and out_hw[1] * pool[1] == x_shape[2])


def _tiles(x, pool, out_hw):
    """x (N, oh*ph, ow*pw, C) as (N, oh, ph, ow, pw, C), a view."""
    n, _, _, c = x.shape
    return x.reshape(n, out_hw[0], pool[0], out_hw[1], pool[1], c)


def _reduce_tiles(x6, op):
    """Reduce (N, oh, ph, ow, pw, C) over ph then pw with the binary ufunc ``op``:
    rows first, on long contiguous runs (fast for any channel count)."""
    rows = x6[:, :, 0]
    for a in range(1, x6.shape[2]):
        rows = op(rows, x6[:, :, a])
    out = rows[:, :, :, 0]
    for b in range(1, x6.shape[4]):
        out = op(out, rows[:, :, :, b])
    if x6.shape[2] == 1 and x6.shape[4] == 1:
        out = out.copy()
    return out


# -- max pooling ----------------------------------------------------------------------------------


def argmax_dtype(pool):
    """The smallest integer type that holds a window offset 0 .. ph*pw - 1."""
    return np.uint8 if pool[0] * pool[1] <= 256 else np.int32


def max_pool2d_forward(x, pool_size=(2, 2), strides=None, padding="valid", return_argmax=True):
    """Max pooling. x: (N, H, W, C) -> y: (N, out_h, out_w, C) [, argmax: same shape].

    argmax[n,i,j,c] = k = a*pw + b, the first (row-major) cell of the window holding the maximum.
    It is found after y from the "not the maximum" flags f_k = [x_k != y] of the K = ph*pw cells:
    k = f_0 * (1 + f_1 * (1 + ... (1 + f_{K-2}))), which counts the leading cells that lose.
    """
    _check_images("max_pool2d", x)
    pool, strides, out_hw, pads = _geometry("max_pool2d", x.shape, pool_size, strides, padding)
    xp = get_array_module(x)
    if xp is not np and cuda_kernels_enabled(x):
        return cuda.max_pool2d_forward_gpu(x, pool_size, strides, padding, return_argmax)
    groups = _image_groups(x)
    if len(groups) > 1:            # large NumPy batches: groups of images on the kernel threads
        parts = parallel_map(lambda g: _max_pool2d_array(x[g[0]:g[1]], pool, strides, out_hw,
                                                         pads, return_argmax), groups)
        if not return_argmax:
            return np.concatenate(parts)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return _max_pool2d_array(x, pool, strides, out_hw, pads, return_argmax)


# NumPy batches larger than this many bytes are pooled in groups of whole images on the threads
# of ``kernels.cpu.parallel_map`` (with the same for concatenation: 7 ms of a 200 ms
# U-Net step on two cores, benchmarks/RESULTS.md).
PARALLEL_MIN_BYTES = 4 << 20


def _image_groups(a):
    """[(n0, n1), ...]: a's batch cut into one group per thread when a is a large NumPy array."""
    n = a.shape[0]
    parts = min(n, num_threads()) if get_array_module(a) is np and \
        a.size * a.itemsize > PARALLEL_MIN_BYTES else 1
    bounds = [n * k // parts for k in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def _max_pool2d_array(x, pool, strides, out_hw, pads, return_argmax):
    """``max_pool2d_forward``'s array code (any array module), settings already checked."""
    xp = get_array_module(x)
    if _tiles_exactly(x.shape, pool, strides, out_hw, pads):
        x6 = _tiles(x, pool, out_hw)
        y = _reduce_tiles(x6, xp.maximum)
        cells = [x6[:, :, a, :, b] for a, b in _offsets(pool)]
    else:
        xpad = _pad(x, pads, -xp.inf)
        cells = [_window(xpad, a, b, out_hw, strides) for a, b in _offsets(pool)]
        y = cells[0].copy()
        for cell in cells[1:]:
            xp.maximum(y, cell, out=y)
    if not return_argmax:
        return y
    argmax = xp.zeros(y.shape, dtype=argmax_dtype(pool))
    for cell in reversed(cells[:-1]):          # Horner's rule from the innermost bracket
        argmax += 1
        argmax *= cell != y
    return y, argmax


def max_pool2d_backward(dy, argmax, x_shape, pool_size=(2, 2), strides=None, padding="valid"):
    """dx[cell k of window (i, j)] += dy[i, j] where argmax[i, j] == k.
    dy, argmax: (N, oh, ow, C) -> dx: x_shape."""
    pool, strides, out_hw, pads = _geometry("max_pool2d_backward", x_shape, pool_size, strides,
                                            padding)
    _check_pooled("max_pool2d_backward", dy, x_shape, out_hw)
    if argmax.shape != dy.shape:
        raise ValueError(f"max_pool2d_backward: argmax shape {tuple(argmax.shape)} differs from "
                         f"dy shape {tuple(dy.shape)}")
    xp = get_array_module(dy, argmax)
    if _tiles_exactly(x_shape, pool, strides, out_hw, pads):
        dx = xp.empty(x_shape, dtype=dy.dtype)     # each cell in exactly one window: assign

        def assign(g):
            dx6 = _tiles(dx[g[0]:g[1]], pool, out_hw)
            for k, (a, b) in enumerate(_offsets(pool)):
                xp.multiply(dy[g[0]:g[1]], argmax[g[0]:g[1]] == k, out=dx6[:, :, a, :, b])
        parallel_map(assign, _image_groups(dx))
        return dx
    padded = (x_shape[0], x_shape[1] + sum(pads[0]), x_shape[2] + sum(pads[1]), x_shape[3])
    dxpad = xp.zeros(padded, dtype=dy.dtype)
    for k, (a, b) in enumerate(_offsets(pool)):
        _window(dxpad, a, b, out_hw, strides)[...] += dy * (argmax == k)
    return _crop(dxpad, pads, x_shape)


def max_pool2d_reference(x, pool_size=(2, 2), strides=None, padding="valid"):
    """Loops: y[n,i,j,c] = max of the real cells of the window, argmax = first cell attaining it."""
    pool, strides, (oh, ow), ((top, _), (left, _)) = _geometry(
        "max_pool2d", x.shape, pool_size, strides, padding)
    n_, h_, w_, c_ = x.shape
    y = np.empty((n_, oh, ow, c_), dtype=x.dtype)
    argmax = np.empty((n_, oh, ow, c_), dtype=argmax_dtype(pool))
    for n in range(n_):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_):
                    best, best_k = -np.inf, 0
                    for k, (a, b) in enumerate(_offsets(pool)):
                        r, s = i * strides[0] - top + a, j * strides[1] - left + b
                        if 0 <= r < h_ and 0 <= s < w_ and x[n, r, s, c] > best:
                            best, best_k = x[n, r, s, c], k
                    y[n, i, j, c], argmax[n, i, j, c] = best, best_k
    return y, argmax


def max_pool2d_backward_reference(dy, argmax, x_shape, pool_size=(2, 2), strides=None,
                                  padding="valid"):
    pool, strides, (oh, ow), ((top, _), (left, _)) = _geometry(
        "max_pool2d_backward", x_shape, pool_size, strides, padding)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(x_shape[0]):
        for i in range(oh):
            for j in range(ow):
                for c in range(x_shape[3]):
                    a, b = divmod(int(argmax[n, i, j, c]), pool[1])
                    dx[n, i * strides[0] - top + a, j * strides[1] - left + b, c] += dy[n, i, j, c]
    return dx


# -- average pooling ------------------------------------------------------------------------------


def _window_counts(xp, x_shape, pool, strides, out_hw, pads, dtype):
    """How many real (unpadded) cells each window holds: an int, or an (1, oh, ow, 1) array."""
    if all(p == 0 for pair in pads for p in pair):
        return pool[0] * pool[1]
    ones = _pad(xp.ones((1, x_shape[1], x_shape[2], 1), dtype=dtype), pads, 0)
    counts = xp.zeros((1,) + tuple(out_hw) + (1,), dtype=dtype)
    for a, b in _offsets(pool):
        counts += _window(ones, a, b, out_hw, strides)
    return counts


def avg_pool2d_forward(x, pool_size=(2, 2), strides=None, padding="valid"):
    """Average pooling. x: (N, H, W, C) -> y: (N, out_h, out_w, C);
    y = sum of the window's real cells / their count (padding excluded, as Keras/TF)."""
    _check_images("avg_pool2d", x)
    pool, strides, out_hw, pads = _geometry("avg_pool2d", x.shape, pool_size, strides, padding)
    xp = get_array_module(x)
    if _tiles_exactly(x.shape, pool, strides, out_hw, pads):
        y = _reduce_tiles(_tiles(x, pool, out_hw), xp.add)
    else:
        xpad = _pad(x, pads, 0)
        y = _window(xpad, 0, 0, out_hw, strides).copy()
        for a, b in _offsets(pool)[1:]:
            y += _window(xpad, a, b, out_hw, strides)
    y /= _window_counts(xp, x.shape, pool, strides, out_hw, pads, x.dtype)
    return y


def avg_pool2d_backward(dy, x_shape, pool_size=(2, 2), strides=None, padding="valid"):
    """dx[cell of window (i, j)] += dy[i, j] / count[i, j] for every real cell of the window."""
    pool, strides, out_hw, pads = _geometry("avg_pool2d_backward", x_shape, pool_size, strides,
                                            padding)
    _check_pooled("avg_pool2d_backward", dy, x_shape, out_hw)
    xp = get_array_module(dy)
    share = dy / _window_counts(xp, x_shape, pool, strides, out_hw, pads, dy.dtype)
    if _tiles_exactly(x_shape, pool, strides, out_hw, pads):
        dx = xp.empty(x_shape, dtype=dy.dtype)
        _tiles(dx, pool, out_hw)[...] = share[:, :, None, :, None, :]
        return dx
    padded = (x_shape[0], x_shape[1] + sum(pads[0]), x_shape[2] + sum(pads[1]), x_shape[3])
    dxpad = xp.zeros(padded, dtype=dy.dtype)
    for a, b in _offsets(pool):
        _window(dxpad, a, b, out_hw, strides)[...] += share
    return _crop(dxpad, pads, x_shape)


def avg_pool2d_reference(x, pool_size=(2, 2), strides=None, padding="valid"):
    pool, strides, (oh, ow), ((top, _), (left, _)) = _geometry(
        "avg_pool2d", x.shape, pool_size, strides, padding)
    n_, h_, w_, c_ = x.shape
    y = np.empty((n_, oh, ow, c_), dtype=x.dtype)
    for n in range(n_):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_):
                    total, count = 0.0, 0
                    for a, b in _offsets(pool):
                        r, s = i * strides[0] - top + a, j * strides[1] - left + b
                        if 0 <= r < h_ and 0 <= s < w_:
                            total, count = total + x[n, r, s, c], count + 1
                    y[n, i, j, c] = total / count
    return y


def avg_pool2d_backward_reference(dy, x_shape, pool_size=(2, 2), strides=None, padding="valid"):
    pool, strides, (oh, ow), ((top, _), (left, _)) = _geometry(
        "avg_pool2d_backward", x_shape, pool_size, strides, padding)
    n_, h_, w_, c_ = x_shape
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_):
        for i in range(oh):
            for j in range(ow):
                for c in range(c_):
                    cells = [(i * strides[0] - top + a, j * strides[1] - left + b)
                             for a, b in _offsets(pool)]
                    cells = [(r, s) for r, s in cells if 0 <= r < h_ and 0 <= s < w_]
                    for r, s in cells:
                        dx[n, r, s, c] += dy[n, i, j, c] / len(cells)
    return dx


# -- global average pooling -----------------------------------------------------------------------


def global_avg_pool2d_forward(x, keepdims=False):
    """y[n, c] = (1 / (H*W)) * sum_(h,w) x[n, h, w, c]. x: (N, H, W, C) -> (N, C) or (N, 1, 1, C).

    Summed in two stages (over H on contiguous (W*C) rows, then over W), which is both faster and
    more accurate in float32 than one long running sum per channel.
    """
    _check_images("global_avg_pool2d", x)
    n, h, w, c = x.shape
    y = x.reshape(n, h, w * c).sum(axis=1).reshape(n, w, c).sum(axis=1)
    y /= h * w
    return y.reshape(n, 1, 1, c) if keepdims else y


def global_avg_pool2d_backward(dy, x_shape):
    """dx[n, h, w, c] = dy[n, c] / (H*W). dy: (N, C) or (N, 1, 1, C)."""
    n, h, w, c = _check_shape4("global_avg_pool2d_backward", x_shape)
    if dy.shape not in ((n, c), (n, 1, 1, c)):
        raise ValueError(f"global_avg_pool2d_backward: dy of shape {tuple(dy.shape)} does not fit "
                         f"input of shape {tuple(x_shape)} (expected {(n, c)} or {(n, 1, 1, c)})")
    xp = get_array_module(dy)
    dx = xp.empty((n, h, w, c), dtype=dy.dtype)
    dx[...] = dy.reshape(n, 1, 1, c) / (h * w)
    return dx


def global_avg_pool2d_reference(x):
    n_, h_, w_, c_ = x.shape
    y = np.empty((n_, c_), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            y[n, c] = sum(x[n, h, w, c] for h in range(h_) for w in range(w_)) / (h_ * w_)
    return y


def global_avg_pool2d_backward_reference(dy, x_shape):
    n_, h_, w_, c_ = x_shape
    dx = np.empty(x_shape, dtype=dy.dtype)
    for n, h, w, c in np.ndindex(*x_shape):
        dx[n, h, w, c] = dy[n, c] / (h_ * w_)
    return dx


# -- up-sampling ----------------------------------------------------------------------------------

def upsample2d_forward(x, size=(2, 2), interpolation="nearest"):
    """Up-sampling by integer factors. x: (N, H, W, C) -> y: (N, H*sh, W*sw, C).

    nearest:  y[n, i, j, c] = x[n, i // sh, j // sw, c]
    bilinear: Keras 3 / TF resize with half-pixel centres, edges clamped (see the module docstring).
    """
    _check_images("upsample2d", x)
    (sh, sw), interpolation = normalize_upsampling("upsample2d", size, interpolation)
    xp = get_array_module(x)
    if xp is not np and cuda_kernels_enabled(x):
        return cuda.upsample2d_forward_gpu(x, (sh, sw), interpolation)
    if sh == sw == 1:
        return x.copy()
    if interpolation == "nearest":
        n, h, w, c = x.shape
        y = xp.broadcast_to(x[:, :, None, :, None, :], (n, h, sh, w, sw, c))
        return y.reshape(n, h * sh, w * sw, c)
    return _lerp_axis(_lerp_axis(x, 2, sw), 1, sh)       # columns first, as TF


def upsample2d_backward(dy, size=(2, 2), interpolation="nearest"):
    """The adjoint of ``upsample2d_forward``. dy: (N, H*sh, W*sw, C) -> dx: (N, H, W, C).

    nearest:  dx[n, i, j, c] = sum of dy over the sh x sw block it was copied to.
    bilinear: each output's dy goes back to its two source rows (columns) with weights
              1 - t and t, rows first (the reverse of the forward).
    """
    _check_images("upsample2d_backward", dy)
    (sh, sw), interpolation = normalize_upsampling("upsample2d_backward", size, interpolation)
    n, H, W, c = dy.shape
    if H % sh or W % sw:
        raise ValueError(f"upsample2d_backward: dy of shape {tuple(dy.shape)} is not a multiple of "
                         f"size {(sh, sw)}")
    xp = get_array_module(dy)
    if xp is not np and cuda_kernels_enabled(dy):
        return cuda.upsample2d_backward_gpu(dy, (sh, sw), interpolation)
    if interpolation == "nearest":
        return _reduce_tiles(_tiles(dy, (sh, sw), (H // sh, W // sw)), xp.add)
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


def upsample2d_reference(x, size=(2, 2), interpolation="nearest"):
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


def upsample2d_backward_reference(dy, size=(2, 2), interpolation="nearest"):
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


# -- checks ---------------------------------------------------------------------------------------


def _check_shape4(name, shape):
    shape = tuple(int(v) for v in shape)
    if len(shape) != 4:
        raise ValueError(f"{name}: x_shape must be (N, H, W, C), got {shape}")
    return shape


def _check_pooled(name, dy, x_shape, out_hw):
    expected = (x_shape[0], out_hw[0], out_hw[1], x_shape[3])
    if tuple(dy.shape) != expected:
        raise ValueError(f"{name}: dy of shape {tuple(dy.shape)} does not match the pooled shape "
                         f"{expected} of input {tuple(x_shape)}")
