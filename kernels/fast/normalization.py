"""Tuned CPU twins of ``kernels/normalization.py``: the training forward, the inference forward and
the backward, alone or followed by a ReLU, with the plain kernels' arguments, checks and results
(to float rounding).

- x is viewed as a contiguous (A, B*C) matrix (B the second-to-last axis, W for images) and every
  (C,) vector is tiled to (B*C,): long rows broadcast 2-3x faster than rows of C values.
- The rows are cut into blocks of about ``mc.config.batchnorm_block_bytes``, processed on the
  threads (NumPy's ufuncs release the GIL). Each step does all its arithmetic on one block while
  it is in cache, so memory is read and written about as often as the formula needs: forward =
  read x, read x and write x - mean, read x - mean and write y; backward = read dy and x - mean,
  read them again and write dx.
- Sums are per block in the array's dtype, then over blocks and over B in float64, always in the
  same order: deterministic, and float32 error grows with the block's rows, not with N*H*W.
"""
from __future__ import annotations

import numpy as np

from kernels import normalization as plain
from kernels.activations import check_same_shape
from kernels.config import settings
from kernels.fast.runtime import parallel_map


def rows_of(a):
    """a (..., B, C) as a contiguous (A, B*C) matrix, and B."""
    b = a.shape[-2] if a.ndim >= 3 else 1
    return np.ascontiguousarray(a).reshape(-1, b * a.shape[-1]), b


def _tile(v, b):
    """A (C,) vector repeated to (B*C,), to match the rows of ``rows_of``."""
    return v if b == 1 else np.tile(v, b)


def blocks(rows):
    """Row slices of about ``mc.config.batchnorm_block_bytes`` each."""
    step = max(1, settings.batchnorm_block_bytes // max(1, rows.shape[1] * rows.itemsize))
    return [slice(i, i + step) for i in range(0, rows.shape[0], step)]


def _combine(partials, b, dtype):
    """Per-block partial sums (B*C,) -> the per-channel total (C,): added in float64."""
    total = partials[0].astype(np.float64)
    for partial in partials[1:]:
        total += partial
    return total.reshape(b, -1).sum(axis=0).astype(dtype)


def channel_sum(a):
    """``kernels.normalization.channel_sum`` by blocks on the threads."""
    rows, b = rows_of(a)
    return _combine(parallel_map(lambda s: rows[s].sum(axis=0), blocks(rows)), b, a.dtype)


def batch_norm_forward_training(x, gamma=None, beta=None, *, epsilon=1e-3):
    """``kernels.normalization.batch_norm_forward_training``."""
    return _forward_training(x, gamma, beta, epsilon, relu=False)


def batch_norm_relu_forward_training(x, gamma=None, beta=None, *, epsilon=1e-3):
    """``kernels.normalization.batch_norm_relu_forward_training``: the ReLU taken on each block
    of y while it is in cache (no pass of its own)."""
    return _forward_training(x, gamma, beta, epsilon, relu=True)


def _forward_training(x, gamma, beta, epsilon, relu):
    """y (or max(y, 0) with ``relu``), mean, var, x - mean, inv_std by blocks on the threads."""
    gamma, beta = plain.check_batch_norm("batch_norm", x, gamma, beta, epsilon)
    m = plain.count(x)
    rows, b = rows_of(x)
    parts = blocks(rows)
    mean = channel_sum(x) / m

    x_centered = np.empty_like(rows)
    mean_t = _tile(mean, b)

    def center(s):                      # x - mean, and its sum of squares while in cache
        xc = x_centered[s]
        np.subtract(rows[s], mean_t, out=xc)
        return np.einsum("ij,ij->j", xc, xc)
    var = _combine(parallel_map(center, parts), b, x.dtype) / m
    inv_std = 1 / np.sqrt(var + epsilon)

    y = np.empty_like(rows)
    scale_t = _tile(inv_std if gamma is None else gamma * inv_std, b)
    beta_t = None if beta is None else _tile(beta, b)
    zero = x.dtype.type(0)

    def affine(s):                      # y = (x - mean) * gamma inv_std + beta [, max(y, 0)]
        out = y[s]
        np.multiply(x_centered[s], scale_t, out=out)
        if beta_t is not None:
            out += beta_t
        if relu:
            np.maximum(out, zero, out=out)
    parallel_map(affine, parts)
    return y.reshape(x.shape), mean, var, x_centered.reshape(x.shape), inv_std


def batch_norm_forward_inference(x, moving_mean, moving_var, gamma=None, beta=None, *,
                                 epsilon=1e-3):
    """``kernels.normalization.batch_norm_forward_inference``."""
    scale, shift = plain.inference_affine(x, moving_mean, moving_var, gamma, beta, epsilon)
    rows, b = rows_of(x)
    scale_t, shift_t = _tile(scale, b), _tile(shift, b)
    y = np.empty_like(rows)

    def affine(s):
        out = y[s]
        np.multiply(rows[s], scale_t, out=out)
        out += shift_t
    parallel_map(affine, blocks(rows))
    return y.reshape(x.shape)


def batch_norm_backward(dy, x_centered, inv_std, gamma=None):
    """``kernels.normalization.batch_norm_backward``."""
    return _backward(dy, None, x_centered, inv_std, gamma)


def batch_norm_relu_backward(dz, z, x_centered, inv_std, gamma=None):
    """``kernels.normalization.batch_norm_relu_backward``: the ReLU's mask dz * [z > 0] taken per
    block in the pass of the sums (kept in dx's block for the second pass)."""
    check_same_shape("batch_norm_relu_backward", dz, z)
    return _backward(dz, z, x_centered, inv_std, gamma)


def _backward(dy, z, x_centered, inv_std, gamma):
    """dx, dgamma, dbeta by blocks on the threads; with the ReLU's output ``z``, of dy * [z > 0]."""
    k = plain.check_batch_norm_backward(dy, x_centered, inv_std, gamma)
    m = plain.count(dy)
    dy_rows, b = rows_of(dy)
    centered, _ = rows_of(x_centered)
    z_rows = None if z is None else rows_of(z)[0]
    parts = blocks(dy_rows)
    dx = np.empty_like(dy_rows)

    def sums(s):                        # both reductions in one visit of the block
        g = dy_rows[s] if z_rows is None else np.multiply(dy_rows[s], z_rows[s] > 0, out=dx[s])
        return g.sum(axis=0), np.einsum("ij,ij->j", g, centered[s])
    partials = parallel_map(sums, parts)
    dbeta = _combine([p[0] for p in partials], b, dy.dtype)
    dgamma = _combine([p[1] for p in partials], b, dy.dtype) * inv_std

    k_t = _tile(k, b)
    slope_t = _tile(-k * inv_std * dgamma / m, b)        # - x_hat * k dgamma / M, per x - mean
    offset_t = _tile(-k * dbeta / m, b)                  # - k dbeta / M

    def chain(s):                       # dx = k dy - x_hat k dgamma / M - k dbeta / M
        out = dx[s]
        np.multiply(dy_rows[s] if z_rows is None else out, k_t, out=out)
        out += centered[s] * slope_t
        out += offset_t
    parallel_map(chain, parts)
    return dx.reshape(dy.shape), dgamma, dbeta
