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
from kernels.conv2d import (_check_float, conv_geometry, conv_threads, copy_of,
                            crop_padding, image_groups, pad_input, row_shifts, run_pieces,
                            scratch, sum_over_pixels, tap_slices)


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


# Stride 1 runs in blocks of grid rows. On one thread, blocks of about this many bytes per grid
# row range keep a block's taps in cache (backward 1.9x faster than whole arrays). On several,
# one block per thread unless they are huge: every NumPy call hands the GIL over between the
# threads, and more, shorter calls lost more to that than they gained in cache (measured on
# 2 cores, 8x64x64x32: 1 block per thread 1.8 ms forward, 3 per thread 2.6 ms).
_BLOCK_BYTES = 1 << 20
_THREADED_BLOCK_BYTES = 64 << 20
# Rows of ``w[i, j]`` tiled side by side: NumPy's broadcast ``(rows, C) * (C,)`` runs an inner
# loop of only C values per row; on ``(rows/k, k*C) * (k*C,)`` it runs k*C (about 1.5x faster).
_TILE_VALUES = 1024


def tile_rows(channels: int, xp=np) -> int:
    """How many grid rows the stride-1 kernels treat as one (see ``_TILE_VALUES``); 1 on CuPy."""
    return max(1, -(-_TILE_VALUES // channels)) if xp is np else 1


def row_blocks(rows: int, row_bytes: int, xp=np, parts=None, unit=1):
    """Cut ``rows`` grid rows (a multiple of ``unit``) into contiguous blocks ``(r0, r1)`` of
    about ``_BLOCK_BYTES`` each (``_THREADED_BLOCK_BYTES`` on several threads), their ends multiples of ``unit``, a multiple of the conv
    threads in number (so they share out evenly); one block for CuPy (one launch does the whole
    array). ``parts`` forces the number of blocks (tests)."""
    if parts is None:
        if xp is not np:
            parts = 1
        else:
            threads = conv_threads(xp)
            size = _BLOCK_BYTES if threads == 1 else _THREADED_BLOCK_BYTES
            parts = max(1, -(-rows * row_bytes // size))
            parts = -(-parts // threads) * threads
    units = rows // unit
    parts = max(1, min(int(parts), units))
    bounds = [unit * (units * k // parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _tiled(a, k):
    """``(r, C)`` grid rows (r a multiple of k, uniformly strided) as ``(r/k, k*C)``: a view."""
    return a.reshape(a.shape[0] // k, k * a.shape[1]) if k > 1 else a


def _block_term(xp, blocks, channels, dtype):
    """This thread's (rows, C) temporary, sized for the largest block (reused per thread)."""
    longest = max(b - a for a, b in blocks)
    return scratch(xp, "dw_term", (longest, channels), dtype)


def _padded_rows(xp, x, g, extra, slot):
    """``x`` zero-padded by ``g.pads`` and flattened to grid rows ``(N*Hp*Wp, C)``, followed by
    ``extra`` zero rows (so that blocks rounded up to whole tiles read zeros, not past the end)."""
    n, _, _, channels = x.shape
    hp, wp = g.padded_hw
    total = n * hp * wp
    rows = scratch(xp, slot, (total + extra, channels), x.dtype)
    rows[total:] = 0
    pad_input(x, g.pads, out=rows[:total].reshape(n, hp, wp, channels))
    return rows


def depthwise_conv2d_forward(x, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """y = depthwise_conv2d(x, w) + b: ``(N, H, W, C)``, ``(kh, kw, C, M)`` ->
    ``(N, Ho, Wo, C*M)``."""
    fn = "depthwise_conv2d_forward"
    _check_depthwise_args(fn, x, w, b)
    xp = get_array_module(x, w)
    n, height, width, channels = x.shape
    kh, kw, _, mult = w.shape
    g = conv_geometry(fn, (height, width), (kh, kw), strides, dilation, padding)
    if g.strides == (1, 1):
        return _forward_rows(xp, x, w, b, g, n)
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


def _forward_rows(xp, x, w, b, g, n):
    """Stride 1: ``grid[r] = sum_ij xrows[r + shift_ij] * w[i, j]`` block by block of rows r."""
    channels, mult = x.shape[3], w.shape[3]
    k = tile_rows(channels, xp)
    shifts = row_shifts(g)
    total = n * g.padded_hw[0] * g.padded_hw[1]
    span = _round_up(total - shifts[-1][2], k)        # grid rows every tap reaches, rounded up
    rows = _padded_rows(xp, x, g, k, "pad")
    grid = scratch(xp, "y_grid", (total + k, channels, mult), x.dtype)
    pieces = row_blocks(span, channels * x.itemsize * (mult + 2), xp, _forced_blocks[0], k)
    w_tiled = xp.tile(w.reshape(-1, channels, mult), (1, k, 1))      # (kh*kw, k*C, M)

    def piece(p):
        r0, r1 = p
        term = _tiled(_block_term(xp, pieces, channels, x.dtype)[:r1 - r0], k)
        for m in range(mult):
            acc = _tiled(grid[r0:r1, :, m], k)
            for t, (_, _, shift) in enumerate(shifts):
                xp.multiply(_tiled(rows[r0 + shift:r1 + shift], k), w_tiled[t, :, m],
                            out=acc if t == 0 else term)
                if t:
                    acc += term
    run_pieces(piece, pieces, xp)
    y = copy_of(_grid_to_output(grid[:total], g, n)).reshape(n, *g.out_hw, channels * mult)
    if b is not None:
        y += b
    return y


# Tests set this to force the number of row blocks of the stride-1 paths (None: by size).
_forced_blocks = [None]


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
    db = sum_over_pixels(grad_y) if need_bias else None
    if g.strides == (1, 1):
        dx, dw = _backward_rows(xp, grad_y, x, w, g, x_shape, need_input, need_filter)
        return dx, dw, db
    dx = dw = None
    dy = grad_y.reshape(n, *g.out_hw, channels, mult)
    if need_filter:
        taps, _, reached = _aligned_taps(pad_input(x, g.pads, slot="pad"), g)
        dw = xp.empty_like(w)
        for m in range(mult):
            for i, j, xtap in taps:                     # dw[i, j, c, m] = sum xpad[tap ij] * dy
                dw[i, j, :, m] = xp.einsum("nhwc,nhwc->c", xtap, dy[reached, ..., m])
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


def _embed_dy(xp, grad_y, g, lead, extra):
    """``dy`` in the forward's flattened grid layout ``(N*Hp*Wp, C*M)`` (zero where the grid is
    not an output pixel), between ``lead`` and ``extra`` zero rows."""
    n, ho, wo, _ = grad_y.shape
    hp, wp = g.padded_hw
    total = n * hp * wp
    buf = scratch(xp, "dy_grid", (lead + total + extra, grad_y.shape[3]), grad_y.dtype)
    buf[:lead] = 0
    buf[lead + total:] = 0
    grid = buf[lead:lead + total].reshape(n, hp, wp, -1)

    def piece(p):
        block = grid[p[0]:p[1]]
        block[:, ho:] = 0
        block[:, :ho, wo:] = 0
        block[:, :ho, :wo] = grad_y[p[0]:p[1]]
    groups = image_groups(n, conv_threads(xp)) if grad_y.size > (1 << 20) else [(0, n)]
    run_pieces(piece, groups, xp)
    return buf


def _backward_rows(xp, grad_y, x, w, g, x_shape, need_input, need_filter):
    """Stride 1, block by block of grid rows (see ``_forward_rows``), with ``G[r]`` = dy in the
    forward's grid (zero off the outputs) and ``L`` the last tap's shift::

        dw[i, j] = sum_r xrows[r + shift_ij] * G[r]
        dxrows[q] = sum_ij w[i, j] * G[q - shift_ij] = sum_ij w[i, j] * buf[q + shift_(flip ij)]

    where ``buf[q] = G[q - L]`` (``L`` zero rows, then ``G``) and ``flip ij = (kh-1-i, kw-1-j)``:
    the input gradient gathers (each block writes only its own rows: no scatter to share), and
    the filter gradient per block is a column sum ``ones @ (x_tap * dy)`` (a BLAS product),
    the blocks' partial sums added in block order.
    """
    n, height, width, channels = x_shape
    kh, kw, _, mult = w.shape
    dtype = grad_y.dtype
    k = tile_rows(channels, xp)
    shifts = row_shifts(g)
    last = shifts[-1][2]
    total = n * g.padded_hw[0] * g.padded_hw[1]
    reach = _round_up(total - last, k)
    span = _round_up(total, k) if need_input else reach
    buf = _embed_dy(xp, grad_y, g, last, span - total + k).reshape(-1, channels, mult)
    dy = buf[last:]
    pieces = row_blocks(span, channels * dtype.itemsize * (mult + 3), xp, _forced_blocks[0], k)
    if need_filter:
        rows = _padded_rows(xp, x, g, span - total + k, "pad")
        ones = xp.ones(max(b - a for a, b in pieces), dtype=dtype)
    if need_input:
        dxgrid = xp.empty((span, channels), dtype=dtype)
        flipped = w[::-1, ::-1].reshape(-1, channels, mult)         # tap t -> w[flip t]
        w_tiled = xp.tile(flipped, (1, k, 1))                       # (kh*kw, k*C, M)

    def piece(p):
        r0, r1 = p
        term = _block_term(xp, pieces, channels, dtype)
        partial = None
        if need_filter and r0 < reach:
            f1 = min(r1, reach)
            part_term = term[:f1 - r0]
            partial = xp.empty(w.shape, dtype=dtype)
            for m in range(mult):
                for i, j, shift in shifts:             # dw[i, j, :, m] += sum_r x * dy
                    xp.multiply(rows[r0 + shift:f1 + shift], dy[r0:f1, :, m], out=part_term)
                    partial[i, j, :, m] = ones[:f1 - r0] @ part_term
        if need_input:
            acc, term = _tiled(dxgrid[r0:r1], k), _tiled(term[:r1 - r0], k)
            for m in range(mult):
                for t, (_, _, shift) in enumerate(shifts):
                    first = m == 0 and t == 0
                    xp.multiply(_tiled(buf[r0 + shift:r1 + shift, :, m], k), w_tiled[t, :, m],
                                out=acc if first else term)
                    if not first:
                        acc += term
        return partial
    partials = [part for part in run_pieces(piece, pieces, xp) if part is not None]
    dw = None
    if need_filter:
        dw = partials[0]
        for part in partials[1:]:                       # in block order: deterministic
            dw += part
    dx = None
    if need_input:
        (top, _), (left, _) = g.pads
        hp, wp = g.padded_hw
        dx = dxgrid[:total].reshape(n, hp, wp, channels)
        if (hp, wp) != (height, width) or span != total:
            dx = copy_of(dx[:, top:top + height, left:left + width])
    return dx, dw


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
