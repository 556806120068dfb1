"""Tuned CPU twins of ``kernels/pooling.py``'s max and average pooling (same arguments, checks and
results).

- Windows that tile the image exactly (stride == pool size, no padding, H and W multiples of the
  pool: MaxPooling2D(2) on even sizes) are a reshape ``(N, Ho, ph, Wo, pw, C)``, reduced rows
  first on long contiguous runs.
- Max pooling's argmax comes after y from the "not the maximum" flags f_k = [x_k != y] of the
  K = ph*pw cells: k = f_0 * (1 + f_1 * (1 + ... (1 + f_{K-2}))), which counts the leading cells
  that lose (no boolean indexing).
- Batches larger than ``mc.config.parallel_min_bytes`` are pooled (max: both ways) in groups of
  whole images on the threads.
"""
from __future__ import annotations

import numpy as np

from kernels import pooling as plain
from kernels.config import settings
from kernels.fast.runtime import image_groups, parallel_map
from kernels.windows import check_shape, pad, tap


def _groups(a):
    """[(n0, n1), ...]: a's batch in one group per thread when a is large, else one group."""
    threads = settings.threads if a.nbytes > settings.parallel_min_bytes else 1
    return [p[:2] for p in image_groups(a.shape[0], threads)]


def _tiles(x, g):
    """x (N, Ho*ph, Wo*pw, C) as (N, Ho, ph, Wo, pw, C), a view."""
    (ho, wo), (ph, pw) = g.out_hw, g.kernel_hw
    return x.reshape(x.shape[0], ho, ph, wo, pw, x.shape[3])


def _reduce_tiles(x6, op):
    """Reduce (N, Ho, ph, Wo, pw, C) over ph then pw with the binary ufunc ``op``."""
    rows = x6[:, :, 0]
    for a in range(1, x6.shape[2]):
        rows = op(rows, x6[:, :, a])
    out = rows[:, :, :, 0]
    for b in range(1, x6.shape[4]):
        out = op(out, rows[:, :, :, b])
    return out.copy() if x6.shape[2] == 1 and x6.shape[4] == 1 else out


def max_pool2d_forward(x, *, pool_size=2, strides=None, padding="valid", return_argmax=True):
    """``kernels.pooling.max_pool2d_forward``."""
    g = plain.forward_geometry("max_pool2d", x, pool_size, strides, padding)
    groups = _groups(x)
    if len(groups) == 1:
        return _max_pool(x, g, return_argmax)
    parts = parallel_map(lambda p: _max_pool(x[p[0]:p[1]], g, return_argmax), groups)
    if not return_argmax:
        return np.concatenate(parts)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _max_pool(x, g, return_argmax):
    if g.tiles_exactly:
        x6 = _tiles(x, g)
        y = _reduce_tiles(x6, np.maximum)
        cells = [x6[:, :, a, :, b] for a, b in np.ndindex(*g.kernel_hw)]
    else:
        xpad = pad(x, g.pads, plain.lowest(x.dtype))
        cells = [tap(xpad, g, a, b) for a, b in np.ndindex(*g.kernel_hw)]
        y = cells[0].copy()
        for cell in cells[1:]:
            np.maximum(y, cell, out=y)
    if not return_argmax:
        return y
    argmax = np.zeros(y.shape, dtype=plain.argmax_dtype(g.kernel_hw))
    for cell in reversed(cells[:-1]):          # Horner's rule from the innermost bracket
        argmax += 1
        argmax *= cell != y
    return y, argmax


def max_pool2d_backward(dy, argmax, *, input_size, pool_size=2, strides=None, padding="valid"):
    """``kernels.pooling.max_pool2d_backward``; exact tilings assign each cell once (no sums), in
    groups of images on the threads."""
    fn = "max_pool2d_backward"
    g = plain.backward_geometry(fn, dy, input_size, pool_size, strides, padding)
    if not g.tiles_exactly:
        return plain.max_pool2d_backward(dy, argmax, input_size=input_size, pool_size=pool_size,
                                         strides=strides, padding=padding)
    check_shape(fn, "argmax", argmax, dy.shape)
    dx = np.empty((dy.shape[0], *g.in_hw, dy.shape[3]), dtype=dy.dtype)

    def assign(p):
        dx6 = _tiles(dx[p[0]:p[1]], g)
        for k, (a, b) in enumerate(np.ndindex(*g.kernel_hw)):
            np.multiply(dy[p[0]:p[1]], argmax[p[0]:p[1]] == k, out=dx6[:, :, a, :, b])
    parallel_map(assign, _groups(dx))
    return dx


def avg_pool2d_forward(x, *, pool_size=2, strides=None, padding="valid"):
    """``kernels.pooling.avg_pool2d_forward``; exact tilings by reshape."""
    g = plain.forward_geometry("avg_pool2d", x, pool_size, strides, padding)
    if not g.tiles_exactly:
        return plain.avg_pool2d_forward(x, pool_size=pool_size, strides=strides, padding=padding)
    y = _reduce_tiles(_tiles(x, g), np.add)
    y /= g.kernel_hw[0] * g.kernel_hw[1]
    return y


def avg_pool2d_backward(dy, *, input_size, pool_size=2, strides=None, padding="valid"):
    """``kernels.pooling.avg_pool2d_backward``; exact tilings by one broadcast copy."""
    g = plain.backward_geometry("avg_pool2d_backward", dy, input_size, pool_size, strides,
                                padding)
    if not g.tiles_exactly:
        return plain.avg_pool2d_backward(dy, input_size=input_size, pool_size=pool_size,
                                         strides=strides, padding=padding)
    dx = np.empty((dy.shape[0], *g.in_hw, dy.shape[3]), dtype=dy.dtype)
    _tiles(dx, g)[...] = (dy / (g.kernel_hw[0] * g.kernel_hw[1]))[:, :, None, :, None, :]
    return dx
