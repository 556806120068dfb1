"""Tuned CPU twins of ``kernels/depthwise.py`` (same arguments, checks and results to rounding).

Stride 1 runs on conv2d's "shifted" layout: the padded image flattened to grid rows
``(N*Hp*Wp, C)``, where kernel tap (i, j) is the contiguous row range ``shift_ij = i*dh*Wp + j*dw``
further on (contiguous slices run about 1.5x faster than strided ones) and the output is the grid's
top-left ``(Ho, Wo)`` corner. The rows are cut into blocks (``row_blocks``: about
``mc.config.depthwise_block_bytes`` on one thread, ``depthwise_threaded_block_bytes`` on several),
shared out over the threads, and ``tile_rows`` grid rows are treated as one wider row (NumPy's
broadcast ``(rows, C) * (C,)`` runs an inner loop of only C values; tiled, of about
``mc.config.depthwise_tile_values``). Other strides run the plain kernels.
"""
from __future__ import annotations

import numpy as np

from kernels import depthwise as plain
from kernels.config import settings
from kernels.fast.conv2d import pad_input, row_shifts
from kernels.fast.runtime import even_bounds, image_groups, piece_threads, run_pieces
from kernels.fast.scratch import Scratch
from kernels.windows import copy_of

scratch = Scratch("depthwise")


def tile_rows(channels: int) -> int:
    """How many grid rows the stride-1 kernels treat as one (see the module docstring)."""
    return max(1, -(-settings.depthwise_tile_values // channels))


def row_blocks(rows: int, row_bytes: int, parts=None, unit=1):
    """Cut ``rows`` grid rows into contiguous blocks ``(r0, r1)`` whose ends are multiples of
    ``unit``: ``parts`` of them, or by default about ``mc.config.depthwise_block_bytes`` each
    (``depthwise_threaded_block_bytes`` on several threads), a multiple of the threads in number
    (so that they share out evenly)."""
    if parts is None:
        threads = piece_threads()
        size = settings.depthwise_block_bytes if threads == 1 else \
            settings.depthwise_threaded_block_bytes
        parts = -(-max(1, -(-rows * row_bytes // size)) // threads) * threads
    units = rows // unit
    return [(unit * a, unit * b) for a, b in even_bounds(units, max(1, min(int(parts), units)))]


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _tiled(a, k):
    """``(r, C)`` grid rows (r a multiple of k, uniformly strided) as ``(r/k, k*C)``: a view."""
    return a.reshape(a.shape[0] // k, k * a.shape[1]) if k > 1 else a


def _padded_rows(x, g, extra, slot):
    """``x`` zero-padded by ``g.pads`` and flattened to grid rows ``(N*Hp*Wp, C)``, followed by
    ``extra`` zero rows (so that blocks rounded up to whole tiles read zeros, not past the end)."""
    n, _, _, channels = x.shape
    hp, wp = g.padded_hw
    total = n * hp * wp
    rows = scratch.get(slot, (total + extra, channels), x.dtype)
    rows[total:] = 0
    pad_input(x, g.pads, out=rows[:total].reshape(n, hp, wp, channels))
    return rows


def _grid_to_output(grid, g, n):
    """The output pixels ``(N, Ho, Wo, ...)`` of a flattened padded grid ``(N*Hp*Wp, ...)``."""
    hp, wp = g.padded_hw
    return grid.reshape(n, hp, wp, *grid.shape[1:])[:, :g.out_hw[0], :g.out_hw[1]]


def depthwise_conv2d_forward(x, w, b=None, *, strides=1, dilation=1, padding="valid"):
    """``kernels.depthwise.depthwise_conv2d_forward``. Stride 1:
    ``grid[r] = sum_ij xrows[r + shift_ij] * w[i, j]`` block by block of rows r."""
    g = plain.forward_geometry("depthwise_conv2d_forward", x, w, b, strides=strides,
                               dilation=dilation, padding=padding)
    if g.strides != (1, 1):
        return plain.depthwise_conv2d_forward(x, w, b, strides=strides, dilation=dilation,
                                              padding=padding)
    n, channels, mult = x.shape[0], x.shape[3], w.shape[3]
    k = tile_rows(channels)
    shifts = row_shifts(g)
    total = n * g.padded_hw[0] * g.padded_hw[1]
    span = _round_up(total - shifts[-1][2], k)        # grid rows every tap reaches, rounded up
    rows = _padded_rows(x, g, k, "xrows")
    grid = scratch.get("y_grid", (total + k, channels, mult), x.dtype)
    pieces = row_blocks(span, channels * x.itemsize * (mult + 2), unit=k)
    w_tiled = np.tile(w.reshape(-1, channels, mult), (1, k, 1))      # (kh*kw, k*C, M)
    longest = max(r1 - r0 for r0, r1 in pieces)

    def piece(p):
        r0, r1 = p
        term = _tiled(scratch.get("term", (longest, channels), x.dtype)[:r1 - r0], k)
        for m in range(mult):
            acc = _tiled(grid[r0:r1, :, m], k)
            for t, (_, _, shift) in enumerate(shifts):
                np.multiply(_tiled(rows[r0 + shift:r1 + shift], k), w_tiled[t, :, m],
                            out=acc if t == 0 else term)
                if t:
                    acc += term
    run_pieces(piece, pieces)
    y = copy_of(_grid_to_output(grid[:total], g, n)).reshape(n, *g.out_hw, channels * mult)
    return y if b is None else np.add(y, b, out=y)


def depthwise_conv2d_backward_input(grad_y, w, *, input_size, strides=1, dilation=1,
                                    padding="valid"):
    """``kernels.depthwise.depthwise_conv2d_backward_input``; stride 1 in row blocks, as a
    gather (see ``_backward_rows``)."""
    settings_ = dict(strides=strides, dilation=dilation, padding=padding)
    g = plain.input_geometry("depthwise_conv2d_backward_input", grad_y, w, input_size=input_size,
                             **settings_)
    if g.strides != (1, 1):
        return plain.depthwise_conv2d_backward_input(grad_y, w, input_size=input_size,
                                                     **settings_)
    return _backward_rows(grad_y, None, w, g, w.shape[2])


def depthwise_conv2d_backward_filter(x, grad_y, *, kernel_size, strides=1, dilation=1,
                                     padding="valid"):
    """``kernels.depthwise.depthwise_conv2d_backward_filter``; stride 1 in row blocks, each a
    column sum ``ones @ (x_tap * dy)`` (a BLAS product), added in block order."""
    settings_ = dict(strides=strides, dilation=dilation, padding=padding)
    g = plain.filter_geometry("depthwise_conv2d_backward_filter", x, grad_y,
                              kernel_size=kernel_size, **settings_)
    if g.strides != (1, 1):
        return plain.depthwise_conv2d_backward_filter(x, grad_y, kernel_size=kernel_size,
                                                      **settings_)
    return _backward_rows(grad_y, x, None, g, x.shape[3])


def _embed_dy(grad_y, g, lead, extra):
    """``dy`` in the forward's flattened grid layout ``(N*Hp*Wp, C*M)`` (zero where the grid is not
    an output pixel), between ``lead`` and ``extra`` zero rows."""
    n, ho, wo, _ = grad_y.shape
    hp, wp = g.padded_hw
    total = n * hp * wp
    buf = scratch.get("dy_grid", (lead + total + extra, grad_y.shape[3]), grad_y.dtype)
    buf[:lead] = 0
    buf[lead + total:] = 0
    grid = buf[lead:lead + total].reshape(n, hp, wp, -1)

    def piece(p):
        block = grid[p[0]:p[1]]
        block[:, ho:] = 0
        block[:, :ho, wo:] = 0
        block[:, :ho, :wo] = grad_y[p[0]:p[1]]
    groups = image_groups(n, piece_threads()) if grad_y.nbytes > settings.parallel_min_bytes \
        else [(0, n)]
    run_pieces(piece, groups)
    return buf


def _backward_rows(grad_y, x, w, g, channels):
    """Stride 1, block by block of grid rows, with ``G[r]`` = dy in the forward's grid (zero off
    the outputs) and ``L`` the last tap's shift; dx when ``w`` is given, else dw of ``x``::

        dw[i, j] = sum_r xrows[r + shift_ij] * G[r]
        dxrows[q] = sum_ij w[i, j] * G[q - shift_ij] = sum_ij w[i, j] * buf[q + shift_(flip ij)]

    where ``buf[q] = G[q - L]`` (``L`` zero rows, then ``G``) and ``flip ij = (kh-1-i, kw-1-j)``:
    the input gradient gathers (each block writes only its own rows: no scatter to share).
    """
    n, dtype = grad_y.shape[0], grad_y.dtype
    mult = grad_y.shape[3] // channels
    k = tile_rows(channels)
    shifts = row_shifts(g)
    last = shifts[-1][2]
    total = n * g.padded_hw[0] * g.padded_hw[1]
    reach = _round_up(total - last, k)
    span = reach if w is None else _round_up(total, k)
    extra = max(span - total, 0) + k                  # zero rows past the end that blocks read
    buf = _embed_dy(grad_y, g, last, extra).reshape(-1, channels, mult)
    dy = buf[last:]
    pieces = row_blocks(span, channels * dtype.itemsize * (mult + 3), unit=k)
    longest = max(r1 - r0 for r0, r1 in pieces)
    if w is None:
        rows = _padded_rows(x, g, extra, "xrows")
        ones = np.ones(longest, dtype=dtype)
    else:
        dxgrid = np.empty((span, channels), dtype=dtype)
        w_tiled = np.tile(w[::-1, ::-1].reshape(-1, channels, mult), (1, k, 1))   # flipped taps

    def piece(p):
        r0, r1 = p
        term = scratch.get("term", (longest, channels), dtype)
        if w is None:                                  # dw[i, j, :, m] += sum_r x * dy
            partial = np.empty((*g.kernel_hw, channels, mult), dtype=dtype)
            f1 = min(r1, reach)
            for m in range(mult):
                for i, j, shift in shifts:
                    np.multiply(rows[r0 + shift:f1 + shift], dy[r0:f1, :, m], out=term[:f1 - r0])
                    partial[i, j, :, m] = ones[:f1 - r0] @ term[:f1 - r0]
            return partial
        acc, term = _tiled(dxgrid[r0:r1], k), _tiled(term[:r1 - r0], k)
        for m in range(mult):
            for t, (_, _, shift) in enumerate(shifts):
                first = m == 0 and t == 0
                np.multiply(_tiled(buf[r0 + shift:r1 + shift, :, m], k), w_tiled[t, :, m],
                            out=acc if first else term)
                if not first:
                    acc += term
        return None
    if w is None:
        partials = run_pieces(piece, [p for p in pieces if p[0] < reach])
        dw = partials[0]
        for part in partials[1:]:                     # in block order: deterministic
            dw += part
        return dw
    run_pieces(piece, pieces)
    (top, _), (left, _) = g.pads
    hp, wp = g.padded_hw
    dx = dxgrid[:total].reshape(n, hp, wp, channels)
    if (hp, wp) != g.in_hw or span != total:
        dx = copy_of(dx[:, top:top + g.in_hw[0], left:left + g.in_hw[1]])
    return dx
