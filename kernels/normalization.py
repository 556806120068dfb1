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
    with ReLU:  z = max(y, 0) for a batch norm whose output nothing else reads; backward
                dy = dz * [z > 0], then the backward above

Sums over the M values are taken in float64 and returned in x's dtype. ``*_reference`` twins loop
over channels and values. The tuned CPU twins (cache-sized blocks on the threads) are in
``kernels/fast/normalization.py``, the CUDA ones in ``kernels/cuda/batchnorm.py``.
"""
from __future__ import annotations

import math

import numpy as np

from kernels.activations import check_same_shape, relu_backward, relu_forward
from kernels.backend import get_array_module


def channel_sum(a):
    """sum over every axis but the last: ``(..., C) -> (C,)``, in float64, returned in a's dtype."""
    return a.reshape(-1, a.shape[-1]).sum(axis=0, dtype=np.float64).astype(a.dtype)


# -- forward --------------------------------------------------------------------------------------


def batch_norm_forward_training(x, gamma=None, beta=None, *, epsilon=1e-3):
    """Normalise with the batch's own statistics.

    x: (..., C); gamma, beta: (C,) or None (scale 1, offset 0); they are cast to x's dtype.
    Returns ``y, mean, var, x_centered, inv_std``: y like x; the batch mean and biased variance
    (C,) for the moving statistics; x_centered = x - mean (like x) and inv_std (C,) for the
    backward (x_hat = x_centered * inv_std is never stored:
    y = x_centered * (gamma inv_std) + beta).
    """
    gamma, beta = check_batch_norm("batch_norm", x, gamma, beta, epsilon)
    xp = get_array_module(x)
    m = count(x)
    mean = channel_sum(x) / m
    x_centered = x - mean
    var = channel_sum(x_centered * x_centered) / m
    inv_std = 1 / xp.sqrt(var + epsilon)
    y = x_centered * (inv_std if gamma is None else gamma * inv_std)
    if beta is not None:
        y += beta
    return y, mean, var, x_centered, inv_std


def batch_norm_relu_forward_training(x, gamma=None, beta=None, *, epsilon=1e-3):
    """z = max(y, 0), y the training-mode batch norm of x (``batch_norm_forward_training``).

    x: (..., C); gamma, beta: (C,) or None. Returns ``z, mean, var, x_centered, inv_std``
    (z like x; the rest as ``batch_norm_forward_training``'s).
    """
    y, mean, var, x_centered, inv_std = batch_norm_forward_training(x, gamma, beta,
                                                                    epsilon=epsilon)
    return relu_forward(y), mean, var, x_centered, inv_std


def batch_norm_forward_inference(x, moving_mean, moving_var, gamma=None, beta=None, *,
                                 epsilon=1e-3):
    """y = x * scale + shift with scale = gamma / sqrt(moving_var + eps), shift = beta - mean*scale
    (Keras' ``ops.batch_normalization``). x: (..., C); the rest (C,)."""
    scale, shift = inference_affine(x, moving_mean, moving_var, gamma, beta, epsilon)
    return x * scale + shift


def inference_affine(x, moving_mean, moving_var, gamma, beta, epsilon):
    """``(scale, shift)`` of the inference forward, in x's dtype (arguments checked)."""
    gamma, beta = check_batch_norm("batch_norm (inference)", x, gamma, beta, epsilon)
    moving_mean = param("batch_norm (inference)", x, moving_mean, "moving_mean")
    moving_var = param("batch_norm (inference)", x, moving_var, "moving_variance")
    scale = 1 / get_array_module(x).sqrt(moving_var + epsilon)
    if gamma is not None:
        scale = scale * gamma
    shift = -moving_mean * scale
    if beta is not None:
        shift = shift + beta
    return scale, shift


def update_moving_statistics(moving_mean, moving_var, mean, var, *, momentum=0.99):
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
    k = check_batch_norm_backward(dy, x_centered, inv_std, gamma)
    m = count(dy)
    x_hat = x_centered * inv_std
    dbeta = channel_sum(dy)
    dgamma = channel_sum(dy * x_hat)
    dx = k * (dy - dbeta / m - x_hat * (dgamma / m))
    return dx, dgamma, dbeta


def batch_norm_relu_backward(dz, z, x_centered, inv_std, gamma=None):
    """Gradients of ``batch_norm_relu_forward_training``. dz, z (its output), x_centered: (..., C);
    inv_std, gamma: (C,).

    The ReLU's dy = dz * [z > 0], then ``batch_norm_backward(dy, x_centered, inv_std, gamma)``:
    returns ``dx, dgamma, dbeta``.
    """
    check_same_shape("batch_norm_relu_backward", dz, z)
    return batch_norm_backward(relu_backward(dz, z), x_centered, inv_std, gamma)


def batch_norm_backward_inference(dy, moving_var, gamma=None, *, epsilon=1e-3):
    """dx of the inference forward (its statistics are constants):
    dx = dy * gamma / sqrt(var + eps)."""
    xp = get_array_module(dy)
    moving_var = param("batch_norm_backward (inference)", dy, moving_var, "moving_variance")
    scale = 1 / xp.sqrt(moving_var + epsilon)
    if gamma is not None:
        scale = scale * param("batch_norm_backward (inference)", dy, gamma, "gamma")
    return dy * scale


def batch_norm_param_grads_inference(dy, x, moving_mean, moving_var, *, epsilon=1e-3):
    """dgamma = sum dy * (x - moving_mean) / sqrt(moving_var + eps), dbeta = sum dy  (inference)."""
    xp = get_array_module(dy, x)
    moving_mean = param("batch_norm_backward (inference)", x, moving_mean, "moving_mean")
    moving_var = param("batch_norm_backward (inference)", x, moving_var, "moving_variance")
    x_hat = (x - moving_mean) * (1 / xp.sqrt(moving_var + epsilon))
    return channel_sum(dy * x_hat), channel_sum(dy)


# -- references -----------------------------------------------------------------------------------


def batch_norm_training_reference(x, gamma, beta, *, epsilon=1e-3):
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


def batch_norm_backward_reference(dy, x, gamma, *, epsilon=1e-3):
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


def count(x):
    """M: how many values each channel's statistics are taken over."""
    return x.size // x.shape[-1]


def param(name, x, value, what):
    """A (C,) parameter in x's dtype, or ValueError naming both shapes."""
    if value.shape != (x.shape[-1],):
        raise ValueError(f"{name}: {what} of shape {tuple(value.shape)} does not match the "
                         f"{x.shape[-1]} channels of input shape {tuple(x.shape)}")
    return value.astype(x.dtype, copy=False)


def check_batch_norm(name, x, gamma, beta, epsilon):
    if x.ndim < 2:
        raise ValueError(f"{name}: input must have a batch axis and a channel axis, "
                         f"got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: input must be floating point, got {x.dtype}")
    if not epsilon > 0:
        raise ValueError(f"{name}: epsilon must be > 0, got {epsilon}")
    if gamma is not None:
        gamma = param(name, x, gamma, "gamma")
    if beta is not None:
        beta = param(name, x, beta, "beta")
    return gamma, beta


def check_batch_norm_backward(dy, x_centered, inv_std, gamma):
    """Check the backward's arrays; return k = gamma * inv_std (inv_std without gamma)."""
    if dy.shape != x_centered.shape:
        raise ValueError(f"batch_norm_backward: dy of shape {tuple(dy.shape)} vs x_centered of "
                         f"shape {tuple(x_centered.shape)}")
    return inv_std if gamma is None else param("batch_norm_backward", dy, gamma, "gamma") * inv_std
