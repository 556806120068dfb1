"""Keras 3's reduction of per-sample loss values to one number (``keras/src/losses/loss.py``:
``reduce_weighted_values``, ``apply_mask``, ``reduce_values``), its gradient and a loop twin.

    weighted = values * w   (w: sample_weight, times the mask rescaled to the valid count)
    "none": weighted;  "sum": sum(weighted);  "sum_over_batch_size"/"mean": sum / size(weighted);
    "mean_with_sample_weight": sum / sum(w)
"""
from __future__ import annotations

import numpy as np

from kernels.backend import get_array_module

REDUCTIONS = ("sum_over_batch_size", "sum", "none", "mean", "mean_with_sample_weight")


# =========================================================== reduction (keras/src/losses/loss.py)
def _squeeze_or_expand(x1, x2, expand_rank_1=True):
    """Keras' squeeze_or_expand_to_same_rank: fix a rank difference of one with a trailing 1."""
    xp = get_array_module(x1, x2)
    if x1.ndim == x2.ndim + 1 and x1.shape[-1] == 1:
        if x2.ndim == 1 and expand_rank_1:
            x2 = xp.expand_dims(x2, -1)
        else:
            x1 = x1.reshape(x1.shape[:-1])
    elif x2.ndim == x1.ndim + 1 and x2.shape[-1] == 1:
        if x1.ndim == 1 and expand_rank_1:
            x1 = xp.expand_dims(x1, -1)
        else:
            x2 = x2.reshape(x2.shape[:-1])
    return x1, x2


def _align_sample_weight(values, weight, where):
    """values, weight after Keras' rank fix, with ``weight`` checked to broadcast onto values.

    A 1-D weight of length N on values of rank > 1 with N rows is a per-sample weight and is
    aligned with the FIRST axis (Keras 3 would align it with the last axis: a silent error for
    images). A 0-d ``values`` (e.g. Dice with axis=None) broadcasts to the weight's shape, as in Keras.
    """
    values, weight = _squeeze_or_expand(values, weight)
    if weight.ndim == 1 and values.ndim > 1 and weight.shape[0] == values.shape[0] > 1:
        weight = weight.reshape((weight.shape[0],) + (1,) * (values.ndim - 1))
    if values.ndim == 0:
        return values, weight
    try:
        shape = np.broadcast_shapes(values.shape, weight.shape)
    except ValueError:
        shape = None
    if shape != values.shape:
        raise ValueError(f"{where}: sample_weight of shape {tuple(weight.shape)} does not broadcast "
                         f"to the per-sample losses of shape {tuple(values.shape)} (give a scalar, "
                         f"one weight per sample, or a weight map of the losses' shape)")
    return values, weight


def weighted_reduction_forward(values, sample_weight=None, mask=None, *,
                               reduction="sum_over_batch_size", where="loss"):
    """Keras 3 ``reduce_weighted_values``: the reduced loss and what the backward needs.

    mask (values' shape, bool; e.g. ignore_class): for "sum_over_batch_size"/"mean" it is scaled
    by total/valid (so the mean runs over valid entries only), then multiplied into the weights.
    Then  weighted = values * w  and
      "none": weighted;  "sum": sum(weighted);  "sum_over_batch_size"/"mean": sum / size(weighted);
      "mean_with_sample_weight": sum / sum(w) (sum / size without weights); x / 0 -> 0.
    A 0-d ``weighted`` is returned unreduced, as in Keras.
    """
    xp = get_array_module(values)
    dtype = values.dtype
    reduction = "none" if reduction is None else reduction
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS} or None, got {reduction!r}")
    weight = None if sample_weight is None else xp.asarray(sample_weight).astype(dtype, copy=False)
    if mask is not None:
        m = mask.astype(dtype)
        if reduction in ("mean", "sum_over_batch_size"):
            valid = m.sum()
            m = m * xp.where(valid > 0, dtype.type(m.size) / xp.maximum(valid, 1), 0).astype(dtype)
        if weight is None:
            weight = m
        else:
            m, weight = _align_sample_weight(m, weight, where)
            weight = weight * m
    original_shape = values.shape
    if weight is not None:
        values, weight = _align_sample_weight(values, weight, where)
        weighted = values * weight
    else:
        weighted = values
    if reduction == "none" or weighted.ndim == 0 or weighted.shape == (0,):
        scale = None
        out = weighted
    else:
        if reduction == "mean_with_sample_weight" and weight is not None:
            total = weight.sum()
            scale = xp.where(total != 0, 1 / xp.where(total != 0, total, 1), 0).astype(dtype)
        elif reduction == "sum":
            scale = dtype.type(1)
        else:
            scale = dtype.type(1.0 / weighted.size) if weighted.size else dtype.type(0)
        out = weighted.sum() * scale
    return out, (original_shape, values.shape, weighted.shape, weight, scale)


def weighted_reduction_backward(grad, saved):
    """dL/dvalues: grad (times the 1/size or 1/sum(w) scale) times w, summed back to values' shape."""
    xp = get_array_module(grad)
    original_shape, values_shape, weighted_shape, weight, scale = saved
    g = grad if scale is None else grad * scale
    g = xp.broadcast_to(g, weighted_shape)
    if weight is not None:
        g = g * weight
    if g.shape != values_shape:                        # values broadcast against the weights
        extra = g.ndim - len(values_shape)
        axes = tuple(range(extra)) + tuple(extra + i for i, n in enumerate(values_shape)
                                           if n == 1 and g.shape[extra + i] != 1)
        g = g.sum(axis=axes, keepdims=True).reshape(values_shape)
    return xp.ascontiguousarray(g).reshape(original_shape)


def weighted_reduction_reference(values, sample_weight=None, mask=None, *,
                                 reduction="sum_over_batch_size"):
    """The same reduction for values and weights of one shape, as plain loops."""
    values = np.asarray(values, dtype=float)
    w = np.ones(values.shape) if sample_weight is None else \
        np.broadcast_to(np.asarray(sample_weight, float), values.shape)
    m = np.ones(values.shape) if mask is None else np.asarray(mask, float)
    total = 0.0
    weight_sum = 0.0
    valid = 0
    for pos in np.ndindex(*values.shape):
        total += values[pos] * w[pos] * m[pos]
        weight_sum += w[pos] * m[pos]
        valid += int(m[pos] > 0)
    reduction = "none" if reduction is None else reduction
    if reduction == "none":
        return values * w * m
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and (sample_weight is not None or mask is not None):
        return total / weight_sum if weight_sum else 0.0
    count = valid if mask is not None else values.size
    return total / count if count else 0.0
