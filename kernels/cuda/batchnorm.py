"""GPU batch normalisation (``batchnorm.cu``): per-channel sums in two deterministic stages,
the normalisation, and the backward's closed form.

Same signatures and results as ``kernels.normalization.batch_norm_forward_training``,
``batch_norm_forward_inference`` and ``batch_norm_backward``; CuPy arrays in and out.
x: (..., C), statistics over the M = x.size / C values of each channel (N*H*W for images):

    mean = (1/M) sum x,  var = (1/M) sum (x - mean)^2 (biased, as Keras),
    inv_std = 1 / sqrt(var + eps)
    x_hat = (x - mean) * inv_std,  y = gamma * x_hat + beta
    backward: dbeta = sum dy,  dgamma = sum dy * x_hat,
              dx = gamma * inv_std / M * (M dy - dbeta - x_hat * dgamma)

Like the NumPy kernels, the forward keeps ``x_centered = x - mean`` for the backward (not x_hat);
``save="x_hat"`` keeps x_hat instead (then pass ``saved="x_hat"`` to the backward) and
``save=None`` nothing (inference-like use of the training statistics).

Sums accumulate in float64 whatever the input dtype; results come back in x's dtype.
"""
from __future__ import annotations

import numpy as np

from kernels import backend
from kernels.activations import check_same_shape
from kernels.cuda import runtime as rt

SOURCE = "batchnorm.cu"
LANES = (32, 8)              # stage-1 block: 32 channels x 8 row lanes (BN_LANES_X, BN_LANES_Y)
MIN_ROWS_PER_CHUNK = 256     # stage 1 gives each block at least this many rows ...
MAX_CHUNKS = 1024            # ... and uses at most this many row chunks (fixed by M: deterministic)


def _check_input(fn, x):
    if x.ndim < 2:
        raise ValueError(f"{fn}: input must have a batch axis and a channel axis, "
                         f"got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"{fn}: input of shape {tuple(x.shape)} is empty")


def _param(fn, x, value, what):
    """A (C,) contiguous parameter in x's dtype, or ValueError naming both shapes."""
    if value is None:
        return None
    rt.require_gpu(fn, "the NumPy kernel in kernels.normalization", **{what: value})
    if tuple(value.shape) != (x.shape[-1],):
        raise ValueError(f"{fn}: {what} of shape {tuple(value.shape)} does not match the "
                         f"{x.shape[-1]} channels of input shape {tuple(x.shape)}")
    return rt.contiguous(value.astype(x.dtype, copy=False))


def chunking(m: int):
    """(rows_per_chunk, chunks) of stage 1 for M rows: a function of M only (deterministic)."""
    rows = max(MIN_ROWS_PER_CHUNK, -(-m // MAX_CHUNKS))
    return rows, -(-m // rows)


def _partial_sums(a, b, mode):
    """Stage 1 over the (M, C) rows of a (and b): (part1, part2) of shape (chunks, C), float64.
    mode 0: sums of d = a - a[0] and d^2; mode 1: sums of a and a * b."""
    xp = backend.get_array_module(a)
    c = a.shape[-1]
    m = a.size // c
    rows, chunks = chunking(m)
    part1 = xp.empty((chunks, c), dtype=np.float64)
    part2 = xp.empty((chunks, c), dtype=np.float64)
    grid = (-(-c // LANES[0]), chunks)
    rt.kernel(SOURCE, f"bn_partial_sums_{rt.dtype_suffix('batch_norm', a.dtype)}")(
        grid, LANES, (a, a if b is None else b, rt.i64(m), rt.i64(c), rt.i64(rows), rt.i32(mode),
                      part1, part2))
    return part1, part2


def _per_channel(total_channels):
    """(blocks, threads) of the one-thread-per-channel finalize kernels."""
    return (rt.blocks_for(total_channels),), (rt.THREADS,)


def batch_norm_statistics_gpu(x, *, epsilon=1e-3):
    """(mean, var, inv_std), each (C,) in x's dtype: biased variance, inv_std = 1/sqrt(var + eps).

    Shifted sums in float64 (d = x - x[0, c]): mean = x[0] + S1/M, var = S2/M - (S1/M)^2.
    """
    fn = "batch_norm_statistics_gpu"
    rt.require_gpu(fn, "kernels.normalization.batch_norm_forward_training", x=x)
    _check_input(fn, x)
    if not epsilon > 0:
        raise ValueError(f"{fn}: epsilon must be > 0, got {epsilon}")
    suffix = rt.dtype_suffix(fn, x.dtype)
    xp = backend.get_array_module(x)
    x = rt.contiguous(x)
    c = x.shape[-1]
    m = x.size // c
    part1, part2 = _partial_sums(x, None, mode=0)
    mean, var, inv_std = (xp.empty(c, dtype=x.dtype) for _ in range(3))
    rt.kernel(SOURCE, f"bn_finalize_stats_{suffix}")(
        *_per_channel(c), (part1, part2, rt.i64(part1.shape[0]), rt.i64(c), rt.i64(m), x,
                           np.float64(epsilon), mean, var, inv_std))
    return mean, var, inv_std


SAVE_MODES = {None: 0, "x_hat": 1, "x_centered": 2}     # what bn_normalize keeps (save_mode)


def _save_mode(fn, save):
    if save not in SAVE_MODES:
        raise ValueError(f"{fn}: save must be 'x_centered', 'x_hat' or None, got {save!r}")
    return SAVE_MODES[save]


def _normalize(x, mean, inv_std, gamma, beta, save_mode):
    """(y, saved): y = gamma * (x - mean) * inv_std + beta; saved by save_mode (None for 0)."""
    xp = backend.get_array_module(x)
    y = xp.empty_like(x)
    saved = xp.empty_like(x) if save_mode else None
    rt.launch(SOURCE, f"bn_normalize_{rt.dtype_suffix('batch_norm', x.dtype)}", x.size,
              [x, mean, inv_std, x if gamma is None else gamma, x if beta is None else beta,
               rt.i32(gamma is not None), rt.i32(beta is not None), rt.i64(x.size),
               rt.i64(x.shape[-1]), y, y if saved is None else saved, rt.i32(save_mode)])
    return y, saved


def batch_norm_forward_training_gpu(x, gamma=None, beta=None, *, epsilon=1e-3,
                                    save="x_centered"):
    """Normalise with the batch's own statistics. x: (..., C); gamma, beta: (C,) or None.

    Returns ``y, mean, var, x_centered, inv_std``, x_centered = x - mean (what the backward
    takes; ``save="x_hat"`` returns x_hat there instead, ``save=None`` returns None).
    Mirrors ``kernels.normalization.batch_norm_forward_training``.
    """
    fn = "batch_norm_forward_training_gpu"
    rt.require_gpu(fn, "kernels.normalization.batch_norm_forward_training", x=x)
    _check_input(fn, x)
    save_mode = _save_mode(fn, save)
    gamma, beta = _param(fn, x, gamma, "gamma"), _param(fn, x, beta, "beta")
    x = rt.contiguous(x)
    mean, var, inv_std = batch_norm_statistics_gpu(x, epsilon=epsilon)
    y, saved = _normalize(x, mean, inv_std, gamma, beta, save_mode)
    return y, mean, var, saved, inv_std


def batch_norm_forward_inference_gpu(x, moving_mean, moving_var, gamma=None, beta=None, *,
                                     epsilon=1e-3):
    """y = gamma * (x - moving_mean) / sqrt(moving_var + eps) + beta. x: (..., C), the rest (C,).

    Mirrors ``kernels.normalization.batch_norm_forward_inference``.
    """
    fn = "batch_norm_forward_inference_gpu"
    rt.require_gpu(fn, "kernels.normalization.batch_norm_forward_inference", x=x)
    _check_input(fn, x)
    rt.dtype_suffix(fn, x.dtype)
    if not epsilon > 0:
        raise ValueError(f"{fn}: epsilon must be > 0, got {epsilon}")
    gamma, beta = _param(fn, x, gamma, "gamma"), _param(fn, x, beta, "beta")
    moving_mean = _param(fn, x, moving_mean, "moving_mean")
    moving_var = _param(fn, x, moving_var, "moving_variance")
    xp = backend.get_array_module(x)
    inv_std = (1 / xp.sqrt(moving_var + epsilon)).astype(x.dtype, copy=False)
    y, _ = _normalize(rt.contiguous(x), moving_mean, inv_std, gamma, beta, save_mode=0)
    return y


def batch_norm_backward_gpu(dy, x_centered, inv_std, gamma=None, *, saved="x_centered"):
    """Gradients of the training-mode forward. dy, x_centered = x - mean: (..., C);
    inv_std, gamma: (C,). ``saved="x_hat"``: the second argument is x_hat itself.

    Returns ``dx, dgamma, dbeta``: x_hat = x_centered * inv_std, dbeta = sum dy,
    dgamma = sum dy * x_hat, dx = gamma * inv_std / M * (M dy - dbeta - x_hat * dgamma).
    Mirrors ``kernels.normalization.batch_norm_backward``.
    """
    fn = "batch_norm_backward_gpu"
    rt.require_gpu(fn, "kernels.normalization.batch_norm_backward", dy=dy,
                   x_centered=x_centered, inv_std=inv_std)
    _check_input(fn, dy)
    if saved not in ("x_centered", "x_hat"):
        raise ValueError(f"{fn}: saved must be 'x_centered' or 'x_hat', got {saved!r}")
    if tuple(dy.shape) != tuple(x_centered.shape):
        raise ValueError(f"{fn}: dy of shape {tuple(dy.shape)} vs {saved} of shape "
                         f"{tuple(x_centered.shape)}")
    suffix = rt.dtype_suffix(fn, rt.same_dtype(fn, dy=dy, **{saved: x_centered}))
    inv_std = _param(fn, dy, inv_std, "inv_std")
    gamma = _param(fn, dy, gamma, "gamma")
    centered = saved == "x_centered"
    xp = backend.get_array_module(dy)
    dy, x_centered = rt.contiguous(dy), rt.contiguous(x_centered)
    c = dy.shape[-1]
    m = dy.size // c
    part1, part2 = _partial_sums(dy, x_centered, mode=1)       # sum dy, sum dy * saved
    dbeta, dgamma = xp.empty(c, dtype=dy.dtype), xp.empty(c, dtype=dy.dtype)
    # dbeta = sum dy; dgamma = inv_std * sum dy * (x - mean) (or sum dy * x_hat)
    rt.kernel(SOURCE, f"bn_finalize_sums_{suffix}")(
        *_per_channel(c), (part1, part2, rt.i64(part1.shape[0]), rt.i64(c), inv_std,
                           rt.i32(centered), dbeta, dgamma))
    dx = xp.empty_like(dy)
    rt.launch(SOURCE, f"bn_backward_dx_{suffix}", dx.size,
              [dy, x_centered, rt.i32(centered), dy if gamma is None else gamma,
               rt.i32(gamma is not None), inv_std, dbeta, dgamma, rt.i64(dx.size), rt.i64(c),
               rt.i64(m), dx])
    return dx, dgamma, dbeta


def batch_norm_relu_forward_training_gpu(x, gamma=None, beta=None, *, epsilon=1e-3):
    """z = max(y, 0) of ``batch_norm_forward_training_gpu`` (the ReLU in place on y).
    Returns ``z, mean, var, x_centered, inv_std``.
    Mirrors ``kernels.normalization.batch_norm_relu_forward_training``."""
    y, mean, var, x_centered, inv_std = batch_norm_forward_training_gpu(x, gamma, beta,
                                                                        epsilon=epsilon)
    backend.get_array_module(y).maximum(y, y.dtype.type(0), out=y)
    return y, mean, var, x_centered, inv_std


def batch_norm_relu_backward_gpu(dz, z, x_centered, inv_std, gamma=None):
    """``batch_norm_backward_gpu`` of the ReLU's dy = dz * [z > 0]; z: the forward's output.
    Mirrors ``kernels.normalization.batch_norm_relu_backward``."""
    check_same_shape("batch_norm_relu_backward_gpu", dz, z)
    return batch_norm_backward_gpu(dz * (z > 0), x_centered, inv_std, gamma)
