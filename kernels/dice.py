"""Dice losses: Keras 3's ``dice`` on soft targets, and the batch soft Dice of integer masks (for
CEDice), each forward with its closed-form gradient and a loop twin (arrays first, settings
keyword-only; ``(values, saved)`` as in ``kernels.losses``).

    dice:       1 - 2 sum(t y) / (sum(t) + sum(y) + eps), sums over ``axis`` (None: all)
    soft dice:  1 - mean_c (2 sum p_c g_c + smooth) / (sum p_c + sum g_c + smooth)

Reference: Milletari et al., "V-Net" (2016); Keras 3 ``keras.losses.dice``.
"""
from __future__ import annotations

import math

import numpy as np

from kernels.backend import get_array_module
from kernels.losses import EPSILON, one_hot, renormalize, renormalize_backward, softmax, \
    softmax_backward


# ============================================================================== Dice (Keras 3)
def dice_forward(target, output, *, axis=None):
    """values = 1 - 2 sum(t y) / (sum(t) + sum(y) + eps), sums over ``axis`` (None: all).

    keras.losses.dice: eps = 1e-7 in the denominator only; no clipping or softmax.
    """
    inter = (target * output).sum(axis=axis, keepdims=True)
    denom = target.sum(axis=axis, keepdims=True) + output.sum(axis=axis, keepdims=True) \
        + output.dtype.type(EPSILON)
    values = 1 - 2 * inter / denom
    squeeze = tuple(range(output.ndim)) if axis is None else \
        tuple(a % output.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    return values.squeeze(axis=squeeze), (target, inter, denom, squeeze)


def dice_backward(grad, saved):
    """dL/dy = -2 (t U - I) / U^2 with I = sum(t y), U = sum(t) + sum(y) + eps."""
    xp = get_array_module(grad)
    target, inter, denom, squeeze = saved
    g = xp.expand_dims(grad, squeeze)
    return g * (-2 * (target * denom - inter) / (denom * denom))


def dice_reference(target, output, *, axis=None):
    axes = tuple(range(output.ndim)) if axis is None else tuple(a % output.ndim for a in
                                                                  np.atleast_1d(axis))
    kept = [d for d in range(output.ndim) if d not in axes]
    values = np.zeros(tuple(output.shape[d] for d in kept))
    for out_pos in np.ndindex(*values.shape):
        inter = t_sum = y_sum = 0.0
        for pos in np.ndindex(*output.shape):
            if tuple(pos[d] for d in kept) != out_pos:
                continue
            inter += target[pos] * output[pos]
            t_sum += target[pos]
            y_sum += output[pos]
        values[out_pos] = 1 - 2 * inter / (t_sum + y_sum + EPSILON)
    return values


# ===================================================================== soft Dice on integer masks
def soft_dice_forward(labels, output, valid=None, *, from_logits, smooth=1.0):
    """Batch soft Dice loss of integer masks against class probabilities (for CEDice).

    labels: (...) int; output: (..., C) logits (softmax) or probabilities (divided by their sum,
    no clipping). With g = one_hot(labels) and sums over every valid position of the batch:
        D_c = (2 sum p_c g_c + smooth) / (sum p_c + sum g_c + smooth),  loss = 1 - mean_c D_c.
    Returns a 0-d array.
    """
    xp = get_array_module(output)
    dtype = output.dtype
    if valid is not None:
        labels = xp.where(valid, labels, 0)
        output = xp.where(valid[..., None], output, dtype.type(1))
    if from_logits:
        q, s = softmax(output), None
    else:
        q, s = renormalize(output)
    g = one_hot(labels, q.shape[-1], dtype)
    v = xp.ones(labels.shape + (1,), dtype) if valid is None else valid[..., None].astype(dtype)
    lead = tuple(range(q.ndim - 1))
    inter = (q * g * v).sum(axis=lead)
    union = (q * v).sum(axis=lead) + (g * v).sum(axis=lead) + dtype.type(smooth)
    dice = (2 * inter + dtype.type(smooth)) / union
    return 1 - dice.mean(), (from_logits, q, s, g, v, inter, union, smooth)


def soft_dice_backward(grad, saved):
    """dL/dp_ic = -(1/C) v_i (2 g_ic U_c - (2 I_c + smooth)) / U_c^2,
    then through softmax (logits) or q = y / sum(y) (probabilities)."""
    from_logits, q, s, g, v, inter, union, smooth = saved
    n_classes = q.shape[-1]
    grad_q = -(grad / n_classes) * v * (2 * g * union - (2 * inter + smooth)) / (union * union)
    if from_logits:
        return softmax_backward(grad_q, q)
    return renormalize_backward(grad_q, q, s)


def soft_dice_reference(labels, output, valid=None, *, from_logits, smooth=1.0):
    n_classes = output.shape[-1]
    inter = np.zeros(n_classes)
    p_sum = np.zeros(n_classes)
    g_sum = np.zeros(n_classes)
    for pos in np.ndindex(*labels.shape):
        if valid is not None and not valid[pos]:
            continue
        y = output[pos]
        if from_logits:
            e = [math.exp(y[c] - max(y)) for c in range(n_classes)]
            p = [e[c] / sum(e) for c in range(n_classes)]
        else:
            p = [y[c] / sum(y) for c in range(n_classes)]
        for c in range(n_classes):
            g = 1.0 if int(labels[pos]) == c else 0.0
            inter[c] += p[c] * g
            p_sum[c] += p[c]
            g_sum[c] += g
    dice = [(2 * inter[c] + smooth) / (p_sum[c] + g_sum[c] + smooth) for c in range(n_classes)]
    return 1 - sum(dice) / n_classes
