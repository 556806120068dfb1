"""Batch normalisation over every axis but the last (channels): x (..., C), e.g. (N, H, W, C).

With M = N*H*W values per channel c (Ioffe & Szegedy 2015; Keras 3 BatchNormalization):

    training:   mean_c = (1/M) sum x,   var_c = (1/M) sum (x - mean_c)^2   (biased, as Keras)
                x_hat = (x - mean_c) * inv_std_c,   inv_std_c = 1 / sqrt(var_c + epsilon)
                y = gamma_c * x_hat + beta_c
    moving:     moving = moving * momentum + batch * (1 - momentum), for the mean and the biased
                variance (Keras; PyTorch uses the unbiased variance and momentum = 1 - Keras').
    inference:  y = (x - moving_mean) / sqrt(moving_var + epsilon) * gamma + beta
    backward:   dbeta = sum dy,  dgamma = sum dy * x_hat,
                dx = gamma * inv_std / M * (M dy - dbeta - x_hat * dgamma)
                (from x - mean and inv_std, kept by the forward, rather than x_hat itself)

How the fast kernels run (NumPy; CuPy takes the whole array at once):
- x is viewed as a contiguous (A, B*C) matrix (B the second-to-last axis, W for images) and every
  (C,) vector is tiled to (B*C,): long rows broadcast 2-3x faster than rows of C values.
- The rows are cut into blocks of about 2 MiB, processed by a small thread pool (NumPy's ufuncs
  release the GIL). Each step does all its arithmetic on one block while it is in cache, so the
  memory is read and written about as often as the formula needs: forward = read x, read x and
  write x - mean, read x - mean and write y; backward = read dy and x - mean, read them again and
  write dx. Measured on 2 cores: about 2x faster than whole-array NumPy, level with PyTorch.
- Sums are per block in the array's dtype, then over blocks and over B in float64, always in the
  same order: deterministic, and float32 error grows with the block's rows, not with N*H*W.
``*_reference`` twins loop over channels and values.

On CuPy arrays the training forward, the inference forward and the backward run the CUDA
kernels of ``kernels.cuda`` (same arguments, same results; see
``kernels.backend.cuda_kernels_enabled``).
"""
from __future__ import annotations

import math

import numpy as np

from kernels import cuda
from kernels.backend import cuda_kernels_enabled, get_array_module
from kernels.cpu import parallel_map

BLOCK_BYTES = 2 << 20         # about 2 MiB of rows per block: in cache with the block's twins

# -- rows, blocks and threads ---------------------------------------------------------------------


def _rows(a):
    """a (..., B, C) as a contiguous (A, B*C) matrix, and B."""
    b = a.shape[-2] if a.ndim >= 3 else 1
    return a.reshape(-1, b * a.shape[-1]), b


def _tile(v, b):
    """A (C,) vector repeated to (B*C,), to match the rows of ``_rows``."""
    return v if b == 1 else get_array_module(v).tile(v, b)


def _blocks(rows):
    """Row slices of about BLOCK_BYTES each (one slice for CuPy arrays)."""
    if get_array_module(rows) is not np:
        return [slice(None)]
    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    return [slice(i, i + step) for i in range(0, rows.shape[0], step)]


_map_blocks = parallel_map


def _combine(partials, b, dtype):
    """Per-block partial sums (B*C,) -> the per-channel total (C,): added in float64."""
    total = partials[0].astype(np.float64)
    for partial in partials[1:]:
        total += partial
    return total.reshape(b, -1).sum(axis=0).astype(dtype)


# -- per-channel reductions -----------------------------------------------------------------------


def channel_sum(a):
    """sum_(all axes but the last) a: (..., C) -> (C,), in a's dtype."""
    rows, b = _rows(a)
    return _combine(_map_blocks(lambda s: rows[s].sum(axis=0), _blocks(rows)), b, a.dtype)


def channel_dot(a, b_):
    """sum_(all axes but the last) a * b_: (..., C), (..., C) -> (C,), without a temporary."""
    xp = get_array_module(a, b_)
    rows_a, b = _rows(a)
    rows_b, _ = _rows(b_)
    partials = _map_blocks(lambda s: xp.einsum("ij,ij->j", rows_a[s], rows_b[s]), _blocks(rows_a))
    return _combine(partials, b, a.dtype)


# -- forward --------------------------------------------------------------------------------------


def batch_norm_forward_training(x, gamma=None, beta=None, epsilon=1e-3):
    """Normalise with the batch's own statistics.

    x: (..., C); gamma, beta: (C,) or None (scale 1, offset 0); they are cast to x's dtype.
    Returns ``y, mean, var, x_centered, inv_std``: y like x; the batch mean and biased variance
    (C,) for the moving statistics; x_centered = x - mean (like x) and inv_std (C,) for the
    backward (x_hat = x_centered * inv_std is never stored:
    y = x_centered * (gamma inv_std) + beta).
    """
    gamma, beta = _check("batch_norm", x, gamma, beta, epsilon)
    xp = get_array_module(x)
    if xp is not np and cuda_kernels_enabled(x):
        return cuda.batch_norm_forward_training_gpu(x, gamma, beta, epsilon)
    m = _count(x)
    rows, b = _rows(x)
    blocks = _blocks(rows)
    mean = channel_sum(x) / m

    x_centered = xp.empty_like(rows)
    mean_t = _tile(mean, b)

    def center(s):                      # x - mean, and its sum of squares while in cache
        xc = x_centered[s]
        xp.subtract(rows[s], mean_t, out=xc)
        return xp.einsum("ij,ij->j", xc, xc)
    var = _combine(_map_blocks(center, blocks), b, x.dtype) / m
    inv_std = 1 / xp.sqrt(var + epsilon)

    y = xp.empty_like(rows)
    scale_t = _tile(inv_std if gamma is None else gamma * inv_std, b)
    beta_t = None if beta is None else _tile(beta, b)

    def affine(s):                      # y = (x - mean) * gamma inv_std + beta
        out = y[s]
        xp.multiply(x_centered[s], scale_t, out=out)
        if beta_t is not None:
            out += beta_t
    _map_blocks(affine, blocks)
    return y.reshape(x.shape), mean, var, x_centered.reshape(x.shape), inv_std


def batch_norm_forward_inference(x, moving_mean, moving_var, gamma=None, beta=None, epsilon=1e-3):
    """y = x * scale + shift with scale = gamma / sqrt(moving_var + eps), shift = beta - mean*scale
    (Keras' ``ops.batch_normalization``). x: (..., C); the rest (C,)."""
    gamma, beta = _check("batch_norm (inference)", x, gamma, beta, epsilon)
    xp = get_array_module(x)
    if xp is not np and cuda_kernels_enabled(x):
        return cuda.batch_norm_forward_inference_gpu(x, moving_mean, moving_var, gamma, beta,
                                                     epsilon)
    moving_mean = _param("batch_norm (inference)", x, moving_mean, "moving_mean")
    moving_var = _param("batch_norm (inference)", x, moving_var, "moving_variance")
    scale = 1 / xp.sqrt(moving_var + epsilon)
    if gamma is not None:
        scale = scale * gamma
    shift = -moving_mean * scale
    if beta is not None:
        shift = shift + beta
    rows, b = _rows(x)
    scale_t, shift_t = _tile(scale, b), _tile(shift, b)
    y = xp.empty_like(rows)

    def affine(s):
        out = y[s]
        xp.multiply(rows[s], scale_t, out=out)
        out += shift_t
    _map_blocks(affine, _blocks(rows))
    return y.reshape(x.shape)


def update_moving_statistics(moving_mean, moving_var, mean, var, momentum=0.99):
    """Keras' update: moving = moving * momentum + batch * (1 - momentum); returns new arrays."""
    if not 0 <= momentum <= 1:
        raise ValueError(f"batch_norm: momentum must be in [0, 1], got {momentum}")
    for name, moving, batch in (("mean", moving_mean, mean), ("variance", moving_var, var)):
        if moving.shape != batch.shape:
            raise ValueError(f"update_moving_statistics: moving_{name} of shape "
                             f"{tuple(moving.shape)} vs batch {name} of shape {tuple(batch.shape)}")
    new_mean = moving_mean * momentum + mean.astype(moving_mean.dtype, copy=False) * (1 - momentum)
    new_var = moving_var * momentum + var.astype(moving_var.dtype, copy=False) * (1 - momentum)
    return new_mean, new_var


# -- backward -------------------------------------------------------------------------------------


def batch_norm_backward(dy, x_centered, inv_std, gamma=None):
    """Gradients of the training-mode forward. dy, x_centered = x - mean: (..., C);
    inv_std, gamma: (C,).

    Returns ``dx, dgamma, dbeta`` with x_hat = x_centered * inv_std, dbeta = sum dy,
    dgamma = sum dy * x_hat and dx = k * (dy - dbeta/M - x_hat * dgamma/M), k = gamma * inv_std.
    """
    if dy.shape != x_centered.shape:
        raise ValueError(f"batch_norm_backward: dy of shape {tuple(dy.shape)} vs x_centered of "
                         f"shape {tuple(x_centered.shape)}")
    xp = get_array_module(dy, x_centered)
    if xp is not np and cuda_kernels_enabled(dy):
        return cuda.batch_norm_backward_gpu(dy, x_centered, inv_std, gamma)
    m = _count(dy)
    dy_rows, b = _rows(dy)
    centered, _ = _rows(x_centered)
    blocks = _blocks(dy_rows)

    def sums(s):                        # both reductions in one visit of the block
        return dy_rows[s].sum(axis=0), xp.einsum("ij,ij->j", dy_rows[s], centered[s])
    partials = _map_blocks(sums, blocks)
    dbeta = _combine([p[0] for p in partials], b, dy.dtype)
    dgamma = _combine([p[1] for p in partials], b, dy.dtype) * inv_std

    k = inv_std if gamma is None else _param("batch_norm_backward", dy, gamma, "gamma") * inv_std
    k_t = _tile(k, b)
    slope_t = _tile(-k * inv_std * dgamma / m, b)        # - x_hat * k dgamma / M, per x - mean
    offset_t = _tile(-k * dbeta / m, b)                  # - k dbeta / M
    dx = xp.empty_like(dy_rows)

    def chain(s):                       # dx = k dy - x_hat k dgamma / M - k dbeta / M
        out = dx[s]
        xp.multiply(centered[s], slope_t, out=out)
        out += offset_t
        out += dy_rows[s] * k_t
    _map_blocks(chain, blocks)
    return dx.reshape(dy.shape), dgamma, dbeta


def batch_norm_backward_inference(dy, moving_var, gamma=None, epsilon=1e-3):
    """dx of the inference forward (its statistics are constants):
    dx = dy * gamma / sqrt(var + eps)."""
    xp = get_array_module(dy)
    moving_var = _param("batch_norm_backward (inference)", dy, moving_var, "moving_variance")
    scale = 1 / xp.sqrt(moving_var + epsilon)
    if gamma is not None:
        scale = scale * _param("batch_norm_backward (inference)", dy, gamma, "gamma")
    rows, b = _rows(dy)
    return (rows * _tile(scale, b)).reshape(dy.shape)


def batch_norm_param_grads_inference(dy, x, moving_mean, moving_var, epsilon=1e-3):
    """dgamma = sum dy * (x - moving_mean) / sqrt(moving_var + eps), dbeta = sum dy  (inference)."""
    xp = get_array_module(dy, x)
    moving_mean = _param("batch_norm_backward (inference)", x, moving_mean, "moving_mean")
    moving_var = _param("batch_norm_backward (inference)", x, moving_var, "moving_variance")
    rows, b = _rows(x)
    x_hat = rows - _tile(moving_mean, b)
    x_hat *= _tile(1 / xp.sqrt(moving_var + epsilon), b)
    return channel_dot(dy, x_hat.reshape(x.shape)), channel_sum(dy)


# -- references -----------------------------------------------------------------------------------


def batch_norm_training_reference(x, gamma, beta, epsilon=1e-3):
    """Per channel, in plain loops: the textbook formulas. Returns y, mean, var."""
    flat = x.reshape(-1, x.shape[-1])
    m, channels = flat.shape
    y = np.empty_like(flat)
    mean, var = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
    for c in range(channels):
        mean[c] = sum(float(v) for v in flat[:, c]) / m
        var[c] = sum((float(v) - float(mean[c])) ** 2 for v in flat[:, c]) / m
        for i in range(m):
            x_hat = (flat[i, c] - mean[c]) / math.sqrt(var[c] + epsilon)
            y[i, c] = gamma[c] * x_hat + beta[c]
    return y.reshape(x.shape), mean, var


def batch_norm_backward_reference(dy, x, gamma, epsilon=1e-3):
    """The chain rule through mean and variance written out term by term (not the closed form):
    dx_i = dx_hat_i / s + dvar * 2 (x_i - mu) / M + dmean / M,  s = sqrt(var + eps),
    dx_hat = dy * gamma, dvar = sum dx_hat (x - mu) * (-1/2) s^-3, dmean = -sum dx_hat / s."""
    g, flat = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    m, channels = flat.shape
    dx = np.empty_like(flat)
    dgamma, dbeta = np.empty(channels, x.dtype), np.empty(channels, x.dtype)
    for c in range(channels):
        mu = sum(flat[:, c]) / m
        s = math.sqrt(sum((v - mu) ** 2 for v in flat[:, c]) / m + epsilon)
        dx_hat = [g[i, c] * gamma[c] for i in range(m)]
        dvar = sum(dx_hat[i] * (flat[i, c] - mu) for i in range(m)) * (-0.5) * s ** -3
        dmean = -sum(dx_hat) / s
        for i in range(m):
            dx[i, c] = dx_hat[i] / s + dvar * 2 * (flat[i, c] - mu) / m + dmean / m
        dgamma[c] = sum(g[i, c] * (flat[i, c] - mu) / s for i in range(m))
        dbeta[c] = sum(g[:, c])
    return dx.reshape(x.shape), dgamma, dbeta


# -- checks ---------------------------------------------------------------------------------------


def _count(x):
    """M: how many values each channel's statistics are taken over."""
    return x.size // x.shape[-1]


def _param(name, x, value, what):
    """A (C,) parameter in x's dtype, or ValueError naming both shapes."""
    if value.shape != (x.shape[-1],):
        raise ValueError(f"{name}: {what} of shape {tuple(value.shape)} does not match the "
                         f"{x.shape[-1]} channels of input shape {tuple(x.shape)}")
    return value.astype(x.dtype, copy=False)


def _check(name, x, gamma, beta, epsilon):
    if x.ndim < 2:
        raise ValueError(f"{name}: input must have a batch axis and a channel axis, "
                         f"got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: input must be floating point, got {x.dtype}")
    if not epsilon > 0:
        raise ValueError(f"{name}: epsilon must be > 0, got {epsilon}")
    if gamma is not None:
        gamma = _param(name, x, gamma, "gamma")
    if beta is not None:
        beta = _param(name, x, beta, "beta")
    return gamma, beta
