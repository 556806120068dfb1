"""Tuned CPU twins of ``kernels/conv2d.py``: ``conv2d_forward``, ``conv2d_transpose`` (the input
gradient), ``conv2d_backward_filter`` and ``bias_gradient``, with the plain kernels' arguments and
checks (plus ``algorithm=``) and their results to float rounding. NumPy arrays only.

Two algorithms, picked by ``choose_algorithm`` from the shapes (the filter gradient by the same
rule as its forward):

- ``"im2col"``: the plain algorithm, cut into pieces: each piece copies its windows into a
  per-thread ``cols`` matrix and does one product ``cols @ w``. Any stride. Used for strides > 1,
  1x1 kernels (no copy at all), few input channels (a 3-channel image: K = 27 is a good product,
  K = 3 is not) and small images.
- ``"shifted"`` (stride 1): flatten the padded input over ``(N, Hp, Wp)``; kernel tap (i, j) is then
  a *contiguous* range of rows ``i*dh*Wp + j*dw`` further on, so ``y = sum_ij xrows[shift_ij:] @
  w[i, j]``. The kw taps of one kernel row are copied side by side once per chunk of rows
  (``row_taps``, about ``mc.config.conv_chunk_bytes``), giving kh products of K = kw*C instead of
  kh*kw thin ones. The rows that straddle a border are computed and dropped (``Hp*Wp / (Ho*Wo)``
  extra work, at most ``mc.config.shifted_max_waste``).

The input gradient of a stride-1 convolution is itself a forward convolution (of dy, padded by the
window's reach minus the padding, with the kernel turned by 180 degrees and its channel axes
swapped), so it runs the same tuned forward; for larger strides it is ``col2im(dy @ w.T)``.

Threads: every kernel cuts its work into pieces of whole images (or bands of rows of one image when
the images do not share out evenly: ``runtime.split_work``), one per thread, with OpenBLAS held to
one thread per product meanwhile (``runtime.run_pieces``). Convolutions below
``mc.config.conv_parallel_min_macs`` multiply-adds run as one piece. Partial sums over pieces
(dw, db) are added in piece order: results are deterministic for a given thread count.
Temporaries are reused between calls (``Scratch("conv2d")``); results never share them.

Buffers shared between calls (``kernels.fast.memo``): ``conv2d_forward`` keeps its workspace (the
padded input, or im2col's window matrix, new arrays) for the filter gradient of the same input
unless ``mc.config.keep_workspaces`` is off (``minicnn.no_grad()``); the stride-1
input gradient keeps its zero-bordered dy (when it is the forward's grid) for the filter
gradient of the same dy; the filter gradient keeps the sums of dy for ``bias_gradient``.
"""
from __future__ import annotations

import numpy as np

from kernels.config import settings
from kernels.conv2d import forward_geometry, transpose_geometry
from kernels.fast.memo import Memo
from kernels.fast.runtime import (even_bounds, image_groups, piece_threads, run_pieces,
                                  single_threaded_blas, split_work)
from kernels.fast.scratch import Scratch, unchanged
from kernels.shapes import conv_geometry
from kernels.windows import copy_of, filter_geometry, tap

ALGORITHMS = ("im2col", "shifted")
scratch = Scratch("conv2d")
memo = Memo()        # what one call derives from an array and a later call reads (see below)


# --------------------------------------------------------------------------- choosing

def choose_algorithm(g, in_channels: int) -> str:
    """'shifted' for stride-1 convolutions with a kernel larger than 1x1, at least
    ``mc.config.shifted_min_channels`` input channels and a padded grid at most
    ``mc.config.shifted_max_waste`` times the output; 'im2col' otherwise. The input gradient of a
    stride-1 convolution is a forward convolution with ``in_channels`` = the output channels, and
    chooses by the same rule (measured: benchmarks/bench_conv.py)."""
    if g.strides != (1, 1) or g.kernel_hw == (1, 1) or in_channels < settings.shifted_min_channels:
        return "im2col"
    hp, wp = g.padded_hw
    waste = hp * wp / (g.out_hw[0] * g.out_hw[1])
    return "shifted" if waste <= settings.shifted_max_waste else "im2col"


def _resolve(fn, algorithm, g, in_channels):
    if algorithm is None:
        return choose_algorithm(g, in_channels)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{fn}: algorithm must be one of {ALGORITHMS} or None, got {algorithm!r}")
    if algorithm == "shifted" and g.strides != (1, 1):
        raise ValueError(f"{fn}: algorithm 'shifted' needs strides (1, 1), got {g.strides}")
    return algorithm


def _pieces(n, g, macs_per_tap):
    """``split_work`` for a convolution: one piece when it is below conv_parallel_min_macs."""
    macs = n * g.out_hw[0] * g.out_hw[1] * g.kernel_hw[0] * g.kernel_hw[1] * macs_per_tap
    return split_work(n, g.out_hw[0],
                      piece_threads() if macs >= settings.conv_parallel_min_macs else 1)


def _sum_parts(parts):
    """Per-piece partial sums added in piece order."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


# --------------------------------------------------------------------------- the kernels

def conv2d_forward(x, w, b=None, *, strides=1, dilation=1, padding="valid", algorithm=None):
    """``kernels.conv2d.conv2d_forward``; ``algorithm``: None (``choose_algorithm``), 'im2col'
    or 'shifted'. The bias is added while each piece's output is in cache."""
    fn = "conv2d_forward"
    g = forward_geometry(fn, x, w, b, strides=strides, dilation=dilation, padding=padding)
    algorithm = _resolve(fn, algorithm, g, x.shape[3])
    keep = settings.keep_workspaces
    y, workspace = _forward(x, w, b, g, algorithm, keep=keep)
    if keep and workspace is not None:
        memo.put(x, ("workspace", algorithm, g), workspace)
    return y


def conv2d_transpose(y, w, b=None, *, output_size, strides=1, dilation=1, padding="valid",
                     algorithm=None):
    """``kernels.conv2d.conv2d_transpose``. Stride 1: the forward convolution of ``y`` with the
    flipped kernel (``algorithm``: that convolution's); larger strides: ``col2im(y @ w.T)`` in
    groups of whole images."""
    fn = "conv2d_transpose"
    g = transpose_geometry(fn, y, w, b, output_size=output_size, strides=strides,
                           dilation=dilation, padding=padding)
    x = _transpose_as_forward(fn, y, w, g, algorithm) if g.strides == (1, 1) else \
        _transpose_im2col(y, w, g)
    if b is not None:
        add_bias(x, b)
    return x


def conv2d_backward_filter(x, grad_y, *, kernel_size, strides=1, dilation=1, padding="valid",
                           algorithm=None):
    """``kernels.conv2d.conv2d_backward_filter``, by the algorithm its forward would use."""
    fn = "conv2d_backward_filter"
    g = filter_geometry(fn, x, grad_y, kernel_size=kernel_size, strides=strides,
                        dilation=dilation, padding=padding)
    algorithm = _resolve(fn, algorithm, g, x.shape[3])
    workspace = memo.take(x, ("workspace", algorithm, g))        # from conv2d_forward(x, ...)
    if workspace is not None and (workspace.dtype != grad_y.dtype):
        workspace = None
    if algorithm == "im2col":
        dw, db = _filter_gradient_im2col(x, grad_y, g, workspace)
    else:
        xpad = pad_input(x, g.pads, slot="filter_xpad") if workspace is None else workspace
        dw, db = _filter_gradient_shifted(xpad, grad_y, g, _shared_dy_grid(grad_y, g))
    memo.put(grad_y, "bias_gradient", db)
    return dw


def bias_gradient(grad_y):
    """``kernels.conv2d.bias_gradient`` as ``ones @ rows``: a BLAS product, about ten times faster
    than NumPy's reduction over leading axes. Large arrays: one single-threaded product per block
    of rows on the threads, the partial sums added in order."""
    db = memo.take(grad_y, "bias_gradient")                   # from conv2d_backward_filter
    if db is not None:
        return db
    rows = grad_y.reshape(-1, grad_y.shape[-1])
    if rows.shape[0] == 0:
        return np.zeros(rows.shape[1], dtype=grad_y.dtype)
    parts = piece_threads() if rows.nbytes > settings.parallel_min_bytes else 1
    bounds = even_bounds(rows.shape[0], parts)
    ones = np.ones(bounds[0][1] - bounds[0][0] + 1, dtype=grad_y.dtype)
    with single_threaded_blas():
        parts = run_pieces(lambda p: ones[:p[1] - p[0]] @ rows[p[0]:p[1]], bounds)
    return _sum_parts(parts).astype(grad_y.dtype, copy=False)


# --------------------------------------------------------------------------- building blocks

def pad_input(x, pads, slot=None, out=None):
    """Zero-padded copy ``(N, H+top+bottom, W+left+right, C)`` (``x`` itself when there is no
    padding): a reused temporary ``slot``, or written into ``out``. Only the border is zeroed;
    large arrays are padded in groups of whole images on the threads."""
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0 and out is None:
        return x
    n, h, w, c = x.shape
    if out is None:
        out = scratch.get(slot, (n, h + top + bottom, w + left + right, c), x.dtype)
    groups = image_groups(n, piece_threads()) if x.nbytes > settings.parallel_min_bytes \
        else [(0, n, 0, 1)]
    run_pieces(lambda p: pad_images(x, out, pads, p[0], p[1]), groups)
    return out


def pad_images(x, out, pads, n0, n1):
    """``out[n0:n1]`` = images n0..n1-1 of x inside a zero border ``pads``."""
    (top, _), (left, _) = pads
    h, w = x.shape[1:3]
    block, inner = out[n0:n1], out[n0:n1, top:top + h]
    block[:, :top] = 0
    block[:, top + h:] = 0
    inner[:, :, :left] = 0
    inner[:, :, left + w:] = 0
    inner[:, :, left:left + w] = x[n0:n1]


def window_view(xpad, g):
    """A view (no copy, not to be written) of every window:
    ``v[n, oy, ox, i, j, c] = xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]``."""
    s_n, s_h, s_w, s_c = xpad.strides
    (sh, sw), (dh, dw) = g.strides, g.dilation
    return np.lib.stride_tricks.as_strided(
        xpad, shape=(xpad.shape[0], *g.out_hw, *g.kernel_hw, xpad.shape[3]),
        strides=(s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))


def piece_windows(x, windows, g, piece):
    """The windows of piece ``(n0, n1, h0, h1)``, ``(n1-n0, h1-h0, Wo, kh, kw, C)``: copied from
    ``windows`` (a ``window_view``) into this thread's temporary, or the pixels of x themselves
    when ``windows`` is None (a pointwise kernel)."""
    n0, n1, h0, h1 = piece
    if windows is None:
        return x[n0:n1, h0:h1]
    cols = scratch.get("cols", (n1 - n0, h1 - h0, *windows.shape[2:]), x.dtype)
    cols[...] = windows[n0:n1, h0:h1]
    return cols


def is_pointwise(g) -> bool:
    """1x1 kernel, stride 1, no padding: the windows are the pixels themselves."""
    return g.kernel_hw == (1, 1) and g.strides == (1, 1) and g.pads == ((0, 0), (0, 0))


def col2im_into(cols, out, g):
    """``kernels.conv2d.col2im`` written into ``out: (n, H, W, C)``. Windows that tile the image
    exactly are a pure reshuffle (one transposed copy); padded ones are summed in a zeroed
    temporary."""
    n, _, _, c = out.shape
    (ho, wo), (kh, kw) = g.out_hw, g.kernel_hw
    if g.tiles_exactly:
        out.reshape(n, ho, kh, wo, kw, c)[...] = cols.transpose(0, 1, 3, 2, 4, 5)
        return out
    if g.pads == ((0, 0), (0, 0)):
        xpad = out
        xpad.fill(0)
    else:
        xpad = scratch.get("col2im", (n, *g.padded_hw, c), cols.dtype, zero=True)
    for i, j in np.ndindex(kh, kw):
        tap(xpad, g, i, j)[...] += cols[:, :, :, i, j, :]
    if xpad is not out:
        (top, _), (left, _) = g.pads
        out[...] = xpad[:, top:top + g.in_hw[0], left:left + g.in_hw[1]]
    return out


def add_bias(y, b, crop=None):
    """``y[...] = crop + b`` (or ``y += b`` without ``crop``), b: (C,) over y: (..., W, C).

    The bias is tiled along W so that NumPy's inner loop runs over W*C values rather than C (with
    8-16 channels 5x faster). ``crop``: a view whose rows of W*C values are each contiguous (the
    output inside a padded grid)."""
    width, c = y.shape[-2], y.shape[-1]
    rows = y.reshape(*y.shape[:-2], width * c)
    source = rows if crop is None else crop.reshape(*crop.shape[:-2], width * c)
    np.add(source, np.tile(b, width) if width > 1 else b, out=rows)
    return y


def row_shifts(g):
    """Offsets, in rows of the flattened padded input, of each kernel tap (i, j) ("shifted")."""
    wp = g.padded_hw[1]
    (kh, kw), (dh, dw) = g.kernel_hw, g.dilation
    return [(i, j, i * dh * wp + j * dw) for i in range(kh) for j in range(kw)]


class _Grid:
    """Where piece ``(n0, n1, h0, h1)`` of a stride-1 output lives in the flattened padded grid
    ("shifted"): its first grid row ``start``, the ``count`` rows computed (the last rows' dropped
    border columns are cut where the windows would run past the array) and the
    ``(images, grid_h, Wp)`` block they fill (whole padded images, or one band of rows)."""

    def __init__(self, g, n_images: int, piece):
        hp, wp = g.padded_hw
        n0, n1, h0, h1 = piece
        self.images, self.rows = n1 - n0, h1 - h0
        self.grid_h = hp if self.images > 1 else self.rows
        self.start = (n0 * hp + h0) * wp
        limit = n_images * hp * wp - row_shifts(g)[-1][2]
        self.count = min(((self.images - 1) * self.grid_h + self.rows) * wp, limit - self.start)
        self.size = self.images * self.grid_h * wp
        self.wp = wp

    def crop(self, grid, out_w):
        """The piece's outputs ``(images, rows, Wo, O)`` in a grid of ``size`` rows."""
        return grid.reshape(self.images, self.grid_h, self.wp, -1)[:, :self.rows, :out_w]


def _chunk_rows(row_values, itemsize):
    low, high = settings.conv_chunk_rows
    return int(min(high, max(low, settings.conv_chunk_bytes // (row_values * itemsize))))


def row_taps(rows, start, count, g):
    """``taps[t] = [rows[start + t + j*dw] for j in 0..kw-1]`` for t < count + (kh-1)*dh*Wp: the kw
    taps of each row of the flattened padded grid side by side, ``(span, kw*C)`` (a per-thread
    temporary). Kernel row i's taps for grid rows start..start+count-1 are then the contiguous
    rows ``taps[i*dh*Wp:i*dh*Wp + count]``."""
    (kh, kw), (dh, dw) = g.kernel_hw, g.dilation
    c = rows.shape[1]
    span = count + (kh - 1) * dh * g.padded_hw[1]
    taps = scratch.get("row_taps", (span, kw, c), rows.dtype)
    taps[...] = np.lib.stride_tricks.as_strided(
        rows[start:], shape=(span, kw, c),
        strides=(rows.strides[0], dw * rows.strides[0], rows.strides[1]))
    return taps.reshape(span, kw * c)


# --------------------------------------------------------------------------- forward

def _forward(x, w, b, g, algorithm, keep, slot="xpad"):
    """``(y, workspace)`` of the resolved ``algorithm``. The workspace is what the filter gradient
    reads (im2col: the window matrix; shifted: the padded input), None when it is x itself: new
    arrays when ``keep``, else this thread's temporaries (``slot``: the padded input's)."""
    n, c, n_out = x.shape[0], x.shape[3], w.shape[3]
    y = np.empty((n, *g.out_hw, n_out), dtype=x.dtype)
    pieces = _pieces(n, g, c * n_out)
    if algorithm == "im2col":
        return y, _forward_im2col(x, w, b, g, y, pieces, keep, slot)
    return y, _forward_shifted(x, w, b, g, y, pieces, keep, slot)


def _forward_im2col(x, w, b, g, y, pieces, keep, slot):
    """y = cols @ w per piece, ``cols`` the piece's windows (the pixels themselves for a 1x1
    stride-1 unpadded kernel): in a per-thread temporary, or, with ``keep``, in one new window
    matrix for all pieces, which is returned."""
    kh, kw, c, n_out = w.shape
    k = kh * kw * c
    w_mat = w.reshape(k, n_out)
    windows = None if is_pointwise(g) else window_view(pad_input(x, g.pads, slot=slot), g)
    cols_all = np.empty((x.shape[0], *g.out_hw, kh, kw, c), dtype=x.dtype) \
        if keep and windows is not None else None

    def piece(p):
        n0, n1, h0, h1 = p
        if cols_all is None:
            cols = piece_windows(x, windows, g, p)
        else:
            cols = cols_all[n0:n1, h0:h1]
            cols[...] = windows[n0:n1, h0:h1]
        np.matmul(cols.reshape(-1, k), w_mat, out=y[n0:n1, h0:h1].reshape(-1, n_out))
        if b is not None:
            add_bias(y[n0:n1, h0:h1], b)
    run_pieces(piece, pieces)
    return cols_all


def _forward_shifted(x, w, b, g, y, pieces, keep, slot):
    """y = sum_ij xpad_rows[shift_ij + r] @ w[i, j] over the flattened padded grid, grouped by
    kernel row: ``y = sum_i row_taps[i*dh*Wp + r] @ w[i]``, kh products of K = kw*C. Per piece, in
    chunks of rows whose taps stay in cache; a piece of whole images pads them itself first (they
    are then in cache for the products), and the piece's outputs (and the bias) are copied out of
    its per-thread grid while they are in cache. Returns the padded input (a new array with
    ``keep``, else the temporary ``slot``), None without padding."""
    n, _, _, c = x.shape
    hp, wp = g.padded_hw
    (kh, kw), dh = g.kernel_hw, g.dilation[0]
    n_out = w.shape[3]
    padded = g.pads != ((0, 0), (0, 0))
    if not padded:
        xpad = x
    else:
        xpad = np.empty((n, hp, wp, c), dtype=x.dtype) if keep else \
            scratch.get(slot, (n, hp, wp, c), x.dtype)
    pad_in_pieces = padded and all(p[2:] == (0, g.out_hw[0]) for p in pieces)
    if padded and not pad_in_pieces:           # bands read their neighbours' rows: pad first
        pad_input(x, g.pads, out=xpad)
    rows = xpad.reshape(-1, c)
    w_rows = np.ascontiguousarray(w).reshape(kh, kw * c, n_out)
    chunk = _chunk_rows(kw * c, x.itemsize)

    def piece(p):
        n0, n1, h0, h1 = p
        if pad_in_pieces:
            pad_images(x, xpad, g.pads, n0, n1)
        place = _Grid(g, n, p)
        grid = scratch.get("y_grid", (place.size, n_out), y.dtype)
        for first in range(0, place.count, chunk):
            count = min(chunk, place.count - first)
            taps = row_taps(rows, place.start + first, count, g)
            acc = grid[first:first + count]
            term = scratch.get("term", (count, n_out), y.dtype)
            for i in range(kh):
                np.matmul(taps[i * dh * wp:i * dh * wp + count], w_rows[i],
                          out=acc if i == 0 else term)
                if i:
                    acc += term
        if b is None:
            y[n0:n1, h0:h1] = place.crop(grid, g.out_hw[1])
        else:
            add_bias(y[n0:n1, h0:h1], b, crop=place.crop(grid, g.out_hw[1]))
    run_pieces(piece, pieces)
    return xpad if padded else None


# --------------------------------------------------------------------------- input gradient

def flipped_kernel(w):
    """``(kh, kw, C, O) -> (kh, kw, O, C)``: turned by 180 degrees, channel axes swapped (the
    kernel whose forward convolution is the input gradient of ``w``'s)."""
    return np.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))


def _transpose_as_forward(fn, dy, w, g, algorithm):
    """dx of a stride-1 convolution as the forward convolution of dy with ``flipped_kernel(w)``.

    From y[oy] = sum_i w[i] xpad[oy + i*d]: dx[r] = sum_i w[i].T dy[r + top - i*d]; with
    i' = kh-1-i that reads dy padded by ``(kh-1)*d - top`` above (and ``(kh-1)*d - bottom``
    below) at r + i'*d: a correlation. Paddings larger than the window's reach give a negative
    amount: those rows of dy only ever saw zeros and are cropped away.

    With a 'same'-like padding (top + bottom and left + right equal to the reach) the padded dy
    has the forward's (Hp, Wp), and it is also the filter gradient's dy grid (dy at the top-left,
    zero on the dropped border, ``offset`` rows further on): it is kept for that (``memo``).
    """
    (kh, kw), (dh, dw) = g.kernel_hw, g.dilation
    (top, bottom), (left, right) = g.pads
    reach_h, reach_w = (kh - 1) * dh, (kw - 1) * dw
    amounts = ((reach_h - top, reach_h - bottom), (reach_w - left, reach_w - right))
    (ct, cb), (cl, cr) = [[max(0, -a) for a in pair] for pair in amounts]
    grad_y = dy
    if ct or cb or cl or cr:
        dy = copy_of(dy[:, ct:dy.shape[1] - cb, cl:dy.shape[2] - cr])
    pads = tuple(tuple(max(0, a) for a in pair) for pair in amounts)
    twin = conv_geometry(fn, dy.shape[1:3], (kh, kw), dilation=g.dilation, padding=pads)
    algorithm = _resolve(fn, algorithm, twin, dy.shape[3])
    dx, workspace = _forward(dy, flipped_kernel(w), None, twin, algorithm, keep=False,
                             slot="dy_pad")
    if dx.shape[1:3] != g.in_hw:            # cannot happen for a valid geometry; guards a bug
        raise AssertionError(f"{fn}: {dx.shape} vs {g.in_hw}")
    if algorithm == "shifted" and workspace is not None and twin.padded_hw == g.padded_hw \
            and top + bottom == reach_h and left + right == reach_w:
        offset = pads[0][0] * g.padded_hw[1] + pads[1][0]
        memo.put(grad_y, ("dy_grid", g), (workspace.reshape(-1, dy.shape[3]), offset,
                                          scratch.stamp("dy_pad", dy.dtype)))
    return dx


def _shared_dy_grid(grad_y, g):
    """``(rows, offset)`` of the input gradient's padded dy when it is still there, else None."""
    kept = memo.take(grad_y, ("dy_grid", g))
    return None if kept is None or not unchanged(kept[2]) else kept[:2]


def _transpose_im2col(dy, w, g):
    """dx = col2im(dy @ w.T): each window's gradient, scattered back where it was read; per group
    of whole images (windows of different images never overlap)."""
    kh, kw, c, n_out = w.shape
    k = kh * kw * c
    w_t = w.reshape(k, n_out).T
    n = dy.shape[0]
    dx = np.empty((n, *g.in_hw, c), dtype=dy.dtype)
    pieces = _pieces(n, g, c * n_out)
    groups = image_groups(n, len(pieces)) if len(pieces) > 1 else pieces

    def piece(p):
        n0, n1 = p[0], p[1]
        dcols = scratch.get("dcols", (n1 - n0, *g.out_hw, kh, kw, c), dy.dtype)
        np.matmul(dy[n0:n1].reshape(-1, n_out), w_t, out=dcols.reshape(-1, k))
        col2im_into(dcols, dx[n0:n1], g)
    run_pieces(piece, groups)
    return dx


# --------------------------------------------------------------------------- filter gradient

def _bias_part(grad_y, piece):
    n0, n1, h0, h1 = piece
    rows = grad_y[n0:n1, h0:h1].reshape(-1, grad_y.shape[3])
    return np.ones(rows.shape[0], dtype=grad_y.dtype) @ rows


def _filter_gradient_im2col(x, grad_y, g, cols_all=None):
    """``(dw, db)``: dw = cols.T @ dy, ``(kh*kw*C, N*Ho*Wo) @ (N*Ho*Wo, O)``, per piece (the
    forward's window matrix ``cols_all``, or each piece's windows copied into a per-thread
    temporary; the pixels themselves for a pointwise kernel); db from the same pieces of dy.
    Partial sums added in order."""
    n, c, n_out = x.shape[0], x.shape[3], grad_y.shape[3]
    kh, kw = g.kernel_hw
    k = kh * kw * c
    windows = None if is_pointwise(g) or cols_all is not None else \
        window_view(pad_input(x, g.pads, slot="filter_xpad"), g)

    def piece(p):
        n0, n1, h0, h1 = p
        cols = cols_all[n0:n1, h0:h1] if cols_all is not None else piece_windows(x, windows, g, p)
        dy = grad_y[n0:n1, h0:h1].reshape(-1, n_out)
        return cols.reshape(-1, k).T @ dy, _bias_part(grad_y, p)
    parts = run_pieces(piece, _pieces(n, g, c * n_out))
    return (_sum_parts([p[0] for p in parts]).reshape(kh, kw, c, n_out).astype(x.dtype,
                                                                               copy=False),
            _sum_parts([p[1] for p in parts]).astype(x.dtype, copy=False))


def _filter_gradient_shifted(xpad, grad_y, g, dy_grid=None):
    """``(dw, db)``: dw[i, j] = sum_r xpad_rows[shift_ij + r].T @ dy_rows[r] over the flattened
    padded grid, ``dy_rows`` being dy at the top-left of each piece's grid (zero on the dropped
    border); db from the same pieces of dy.

    Grouped by kernel row as the forward: ``dw[i] = sum_r row_taps[i*dh*Wp + r].T @ dy_rows[r]``,
    kh products of M = kw*C per chunk of rows (the chunk's taps in cache: long thin products that
    stream the whole piece ran 1.3-2x slower), partial sums added in order. ``dy_grid``:
    ``(rows, offset)``, dy already in a zero-bordered grid of the same (Hp, Wp) (the input
    gradient's padded dy), dy_rows[r] = rows[offset + r]; else each piece fills a per-thread
    grid."""
    n, _, wp, c = xpad.shape
    (kh, kw), dh = g.kernel_hw, g.dilation[0]
    n_out = grad_y.shape[3]
    rows = xpad.reshape(-1, c)
    wo = g.out_hw[1]
    chunk = _chunk_rows(kw * c, xpad.itemsize)

    def piece(p):
        n0, n1, h0, h1 = p
        place = _Grid(g, n, p)
        if dy_grid is not None:
            shared, offset = dy_grid
            grid = shared[offset + place.start:offset + place.start + place.count]
        else:
            grid = scratch.get("dy_grid", (place.size, n_out), grad_y.dtype)
            inside = grid.reshape(place.images, place.grid_h, wp, n_out)
            inside[:, :place.rows, wo:] = 0
            inside[:, place.rows:] = 0
            inside[:, :place.rows, :wo] = grad_y[n0:n1, h0:h1]
        dw = np.empty((kh, kw * c, n_out), dtype=grad_y.dtype)
        part = scratch.get("dw_part", (kw * c, n_out), grad_y.dtype)
        for first in range(0, place.count, chunk):
            count = min(chunk, place.count - first)
            taps = row_taps(rows, place.start + first, count, g)
            dy_rows = grid[first:first + count]
            for i in range(kh):
                taps_i = taps[i * dh * wp:i * dh * wp + count].T
                if first == 0:
                    np.matmul(taps_i, dy_rows, out=dw[i])
                else:
                    np.matmul(taps_i, dy_rows, out=part)
                    dw[i] += part
        return dw, _bias_part(grad_y, p)
    parts = run_pieces(piece, _pieces(n, g, c * n_out))
    return (_sum_parts([p[0] for p in parts]).reshape(kh, kw, c, n_out),
            _sum_parts([p[1] for p in parts]).astype(grad_y.dtype, copy=False))
