"""Loss kernels: each loss's forward and its closed-form gradient, side by side.

Arrays in, arrays out (NumPy or CuPy, found with ``get_array_module``); float32 stays float32.
Classes lie on the LAST axis (``output: (..., C)``); callers move another class axis there first.
Arrays come first, settings (``from_logits``, ...) are keyword-only.

Every ``*_forward`` returns ``(values, saved)``: the loss of each position (Keras' per-sample
values, before any reduction) and what the matching ``*_backward(grad, saved)`` needs to turn
``grad = dL/dvalues`` into ``dL/doutput`` without re-running the forward. The reduction of the
values to one number is ``kernels.reduction``; the Dice losses are ``kernels.dice``.

Numerics follow Keras 3 (``keras/src/backend/*/nn.py``, ``keras/src/losses/losses.py``):
- logits: log-softmax through log-sum-exp, sigmoid cross-entropy in the softplus form
  ``softplus(x) - t x`` (finite for logits of +-1e4);
- probabilities: categorical outputs are first renormalised to sum to one over the classes,
  then clipped to ``[EPSILON, 1 - EPSILON]`` (EPSILON = 1e-7, Keras' ``backend.epsilon()``)
  before the log; binary outputs are clipped the same way. A clipped entry gets no gradient,
  as in autodiff through ``clip``.

The ``*_reference`` twins are plain loops over positions and classes that read like the
formulas; they run on NumPy only and are what the tests hold the kernels to. Sparse categorical
cross-entropy from logits has a fused CUDA twin (``kernels/cuda/softmax_ce.py``).
"""
from __future__ import annotations

import math

import numpy as np

from kernels.backend import get_array_module

EPSILON = 1e-7          # keras.backend.epsilon()


# ============================================================================== building blocks
def clip_probabilities(p):
    """(clip(p, EPSILON, 1 - EPSILON), inside) in p's dtype; ``inside`` marks the unclipped entries."""
    lo, hi = p.dtype.type(EPSILON), p.dtype.type(1.0 - EPSILON)
    return p.clip(lo, hi), (p >= lo) & (p <= hi)


def log_softmax(z):
    """log softmax over the last axis: z - max - log(sum(exp(z - max)))  (log-sum-exp)."""
    xp = get_array_module(z)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(z):
    """exp(z - max) / sum(exp(z - max)) over the last axis."""
    xp = get_array_module(z)
    e = xp.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_backward(grad_p, p):
    """dL/dz for p = softmax(z):  p * (g - sum_c g_c p_c)."""
    return p * (grad_p - (grad_p * p).sum(axis=-1, keepdims=True))


def renormalize(y):
    """(q, s): q = y / s with s = sum_c y_c (Keras' 'adjust so the classes sum to one')."""
    s = y.sum(axis=-1, keepdims=True)
    return y / s, s


def renormalize_backward(grad_q, q, s):
    """dL/dy for q = y / sum(y):  (g - sum_c g_c q_c) / s."""
    return (grad_q - (grad_q * q).sum(axis=-1, keepdims=True)) / s


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp(-|x|) only."""
    xp = get_array_module(x)
    e = xp.exp(-abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))."""
    xp = get_array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-abs(x)))


def one_hot(labels, num_classes, dtype):
    """(labels.shape + (C,)) array with 1 at each label (labels outside [0, C) give a zero row)."""
    xp = get_array_module(labels)
    return (labels[..., None] == xp.arange(num_classes)).astype(dtype)


def mean_over_axis_backward(grad, *, shape, axis):
    """dL/dx for values = mean(x, axis) with x of ``shape``: grad / n, spread back along axis."""
    xp = get_array_module(grad)
    axis = axis % len(shape)
    return xp.broadcast_to(xp.expand_dims(grad, axis) / grad.dtype.type(shape[axis]), shape)


# ============================================================================== mean squared error
def mean_squared_error_forward(target, output):
    """values = mean_c (output - target)^2 over the last axis.  target, output: (..., D)."""
    diff = output - target
    return (diff * diff).mean(axis=-1), diff


def mean_squared_error_backward(grad, diff):
    """dL/doutput = grad * 2 (output - target) / D."""
    return grad[..., None] * (diff * diff.dtype.type(2.0 / diff.shape[-1]))


def mean_squared_error_reference(target, output):
    values = np.zeros(output.shape[:-1])
    for pos in np.ndindex(*output.shape[:-1]):
        d = output.shape[-1]
        values[pos] = sum((output[pos][k] - target[pos][k]) ** 2 for k in range(d)) / d
    return values


# =========================================================================== binary cross-entropy
def binary_crossentropy_forward(target, output, weight=None, *, from_logits):
    """Elementwise  -w [t log p + (1 - t) log(1 - p)]  (same shape as output).

    from_logits: p = sigmoid(x) and the loss is w (softplus(x) - t x), finite for any x.
    else: p = clip(output, eps, 1 - eps).   weight: optional elementwise w (class weights).
    """
    if from_logits:
        loss = softplus(output) - target * output
        saved = (True, target, output, None, weight)
    else:
        xp = get_array_module(output)
        p, inside = clip_probabilities(output)
        loss = -(target * xp.log(p) + (1 - target) * xp.log(1 - p))
        saved = (False, target, p, inside, weight)
    if weight is not None:
        loss = loss * weight
    return loss, saved


def binary_crossentropy_backward(grad, saved):
    """logits: g w (sigmoid(x) - t);
    probabilities: g w (-t / p + (1 - t) / (1 - p)) where unclipped, 0 where clipped."""
    from_logits, target, x_or_p, inside, weight = saved
    if from_logits:
        d = sigmoid(x_or_p) - target
    else:
        p = x_or_p
        d = (-target / p + (1 - target) / (1 - p)) * inside
    if weight is not None:
        d = d * weight
    return grad * d


def binary_crossentropy_reference(target, output, *, from_logits):
    loss = np.zeros(output.shape)
    for pos in np.ndindex(*output.shape):
        t, y = float(target[pos]), float(output[pos])
        if from_logits:
            # -[t log sigmoid(y) + (1-t) log(1 - sigmoid(y))] with -log sigmoid(y) = log(1 + e^-y)
            loss[pos] = t * math.log1p(math.exp(-y)) + (1 - t) * math.log1p(math.exp(y))
        else:
            p = min(max(y, EPSILON), 1 - EPSILON)
            loss[pos] = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    return loss


# ====================================================================== categorical cross-entropy
def categorical_crossentropy_forward(target, output, class_weight=None, *, from_logits):
    """values = -sum_c w_c t_c log p_c over the last axis.  target, output: (..., C).

    from_logits: log p = log_softmax(output).  else: p = clip(output / sum_c output_c).
    class_weight: optional (C,) w (1 when None).
    """
    xp = get_array_module(output)
    wt = target if class_weight is None else target * class_weight
    if from_logits:
        logp = log_softmax(output)
        return -(wt * logp).sum(axis=-1), (True, wt, xp.exp(logp), None, None)
    q, s = renormalize(output)
    p, inside = clip_probabilities(q)
    return -(wt * xp.log(p)).sum(axis=-1), (False, wt, q, s, (p, inside))


def categorical_crossentropy_backward(grad, saved):
    """logits: g (p sum_c w_c t_c - w t)  (softmax - one_hot for one-hot t, w = 1);
    probabilities: dL/dq = -w t / p where unclipped, then through q = y / sum(y)."""
    from_logits, wt, q, s, clipped = saved
    g = grad[..., None]
    if from_logits:
        return g * (q * wt.sum(axis=-1, keepdims=True) - wt)
    p, inside = clipped
    grad_q = g * (-wt / p) * inside
    return renormalize_backward(grad_q, q, s)


def categorical_crossentropy_reference(target, output, *, from_logits):
    values = np.zeros(output.shape[:-1])
    n_classes = output.shape[-1]
    for pos in np.ndindex(*output.shape[:-1]):
        y, t = output[pos], target[pos]
        if from_logits:
            top = max(y)
            log_z = top + math.log(sum(math.exp(y[c] - top) for c in range(n_classes)))
            logp = [y[c] - log_z for c in range(n_classes)]
        else:
            total = sum(y[c] for c in range(n_classes))
            logp = [math.log(min(max(y[c] / total, EPSILON), 1 - EPSILON)) for c in range(n_classes)]
        values[pos] = -sum(t[c] * logp[c] for c in range(n_classes))
    return values


# =============================================================== sparse categorical cross-entropy
def sparse_categorical_crossentropy_forward(labels, output, class_weight=None, valid=None, *,
                                            from_logits):
    """values = -w[y] log p[y] at each position.  labels: (...) int in [0, C); output: (..., C).

    from_logits: log p = log_softmax(output).  else: p = clip(output / sum_c output_c).
    class_weight: optional (C,) w.  valid: optional (...) bool; invalid positions (ignore_class)
    get value 0 and gradient 0, whatever their label and output.
    """
    xp = get_array_module(output)
    dtype = output.dtype
    if valid is not None:
        labels = xp.where(valid, labels, 0)
        output = xp.where(valid[..., None], output, dtype.type(1))   # a harmless row
    picked = labels[..., None]
    weight = None if class_weight is None else class_weight[labels]
    if valid is not None:
        weight = valid.astype(dtype) if weight is None else weight * valid
    if from_logits:
        logp = log_softmax(output)
        values = -xp.take_along_axis(logp, picked, axis=-1)[..., 0]
        saved = (True, labels, xp.exp(logp), None, None, weight)
    else:
        q, s = renormalize(output)
        p, inside = clip_probabilities(q)
        values = -xp.log(xp.take_along_axis(p, picked, axis=-1)[..., 0])
        saved = (False, labels, q, s, (p, inside), weight)
    if weight is not None:
        values = values * weight
    return values, saved


def sparse_categorical_crossentropy_backward(grad, saved):
    """logits: g w[y] (softmax - one_hot(y));  probabilities: dL/dq_y = -w[y] / p_y (if unclipped),
    then through q = y / sum(y)."""
    from_logits, labels, q, s, clipped, weight = saved
    g = grad if weight is None else grad * weight
    target = one_hot(labels, q.shape[-1], q.dtype)
    if from_logits:
        return g[..., None] * (q - target)
    p, inside = clipped
    grad_q = g[..., None] * (-target / p) * inside
    return renormalize_backward(grad_q, q, s)


def sparse_categorical_crossentropy_reference(labels, output, class_weight=None, valid=None, *,
                                              from_logits):
    values = np.zeros(labels.shape)
    n_classes = output.shape[-1]
    for pos in np.ndindex(*labels.shape):
        if valid is not None and not valid[pos]:
            continue                                   # ignored: contributes 0
        target = np.zeros((1, n_classes))
        target[0, int(labels[pos])] = 1.0
        ce = categorical_crossentropy_reference(target, output[pos][None],
                                                from_logits=from_logits)[0]
        weight = 1.0 if class_weight is None else class_weight[int(labels[pos])]
        values[pos] = weight * ce
    return values


# ===================================================================== binary focal cross-entropy
def binary_focal_crossentropy_forward(target, output, *, from_logits, gamma, alpha,
                                      apply_class_balancing):
    """Elementwise  a(t) (1 - p_t)^gamma bce(t, p)   (Lin et al. 2017; Keras 3 semantics).

    p = sigmoid(x) (logits) or output; p_t = t p + (1 - t)(1 - p) from the UNclipped p;
    bce as in ``binary_crossentropy_forward`` (softplus form for logits, clipped p otherwise);
    a(t) = alpha t + (1 - alpha)(1 - t) when apply_class_balancing, else 1.
    """
    p = sigmoid(output) if from_logits else output
    bce, bce_saved = binary_crossentropy_forward(target, output, from_logits=from_logits)
    one_minus_pt = 1 - (target * p + (1 - target) * (1 - p))
    focal = one_minus_pt ** gamma
    balance = alpha * target + (1 - alpha) * (1 - target) if apply_class_balancing else None
    loss = focal * bce
    if balance is not None:
        loss = loss * balance
    return loss, (from_logits, target, p, bce, bce_saved, one_minus_pt, focal, gamma, balance)


def binary_focal_crossentropy_backward(grad, saved):
    """d/dy [a f bce] = a (f dbce/dy + bce df/dy),  f = (1 - p_t)^gamma,
    df/dp = -gamma (1 - p_t)^(gamma - 1) (2t - 1),  dp/dx = p (1 - p) for logits."""
    from_logits, target, p, bce, bce_saved, one_minus_pt, focal, gamma, balance = saved
    xp = get_array_module(p)
    d_bce = binary_crossentropy_backward(xp.ones_like(p), bce_saved)
    # (1 - p_t)^(gamma - 1) where 1 - p_t = 0: 0 for gamma > 1, 1 for gamma = 1, and 0 (a
    # subgradient) for gamma < 1, where the derivative is unbounded.
    positive = one_minus_pt > 0
    at_zero = 1.0 if gamma == 1 else 0.0
    power = xp.where(positive, xp.where(positive, one_minus_pt, 1) ** (gamma - 1), at_zero)
    d_focal = -gamma * power * (2 * target - 1)
    if from_logits:
        d_focal = d_focal * (p * (1 - p))
    d = focal * d_bce + bce * d_focal
    if balance is not None:
        d = d * balance
    return grad * d


def binary_focal_crossentropy_reference(target, output, *, from_logits, gamma, alpha,
                                        apply_class_balancing):
    loss = np.zeros(output.shape)
    bce = binary_crossentropy_reference(target, output, from_logits=from_logits)
    for pos in np.ndindex(*output.shape):
        t, y = float(target[pos]), float(output[pos])
        p = 1 / (1 + math.exp(-y)) if from_logits else y
        p_t = t * p + (1 - t) * (1 - p)
        weight = alpha * t + (1 - alpha) * (1 - t) if apply_class_balancing else 1.0
        loss[pos] = weight * (1 - p_t) ** gamma * bce[pos]
    return loss


# ================================================================ categorical focal cross-entropy
def categorical_focal_crossentropy_forward(target, output, *, from_logits, gamma, alpha):
    """values = sum_c alpha_c (1 - p_c)^gamma (-t_c log p_c)   (Keras 3 semantics).

    p = clip(q, eps, 1 - eps) with q = softmax(output) (logits) or output / sum_c output_c;
    alpha: a scalar or a (C,) array.
    """
    xp = get_array_module(output)
    if from_logits:
        q, s = softmax(output), None
    else:
        q, s = renormalize(output)
    p, inside = clip_probabilities(q)
    log_p = xp.log(p)
    modulating = (1 - p) ** gamma
    values = (alpha * modulating * (-target * log_p)).sum(axis=-1)
    return values, (from_logits, target, q, s, p, inside, log_p, gamma, alpha)


def categorical_focal_crossentropy_backward(grad, saved):
    """dL/dp_c = alpha_c t_c [gamma (1 - p_c)^(gamma - 1) log p_c - (1 - p_c)^gamma / p_c] where
    unclipped, then through softmax (logits) or q = y / sum(y) (probabilities)."""
    from_logits, target, q, s, p, inside, log_p, gamma, alpha = saved
    one_minus = 1 - p           # >= eps > 0: powers are finite
    d_p = alpha * target * (gamma * one_minus ** (gamma - 1) * log_p - one_minus ** gamma / p)
    grad_q = grad[..., None] * d_p * inside
    if from_logits:
        return softmax_backward(grad_q, q)
    return renormalize_backward(grad_q, q, s)


def categorical_focal_crossentropy_reference(target, output, *, from_logits, gamma, alpha):
    n_classes = output.shape[-1]
    alphas = np.broadcast_to(np.asarray(alpha, dtype=float), (n_classes,))
    values = np.zeros(output.shape[:-1])
    for pos in np.ndindex(*output.shape[:-1]):
        y, t = output[pos], target[pos]
        if from_logits:
            top = max(y)
            e = [math.exp(y[c] - top) for c in range(n_classes)]
            q = [e[c] / sum(e) for c in range(n_classes)]
        else:
            q = [y[c] / sum(y) for c in range(n_classes)]
        total = 0.0
        for c in range(n_classes):
            p = min(max(q[c], EPSILON), 1 - EPSILON)
            total += alphas[c] * (1 - p) ** gamma * (-t[c] * math.log(p))
        values[pos] = total
    return values
