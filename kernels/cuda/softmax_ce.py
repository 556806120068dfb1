"""GPU fused softmax cross-entropy with integer labels (``softmax_ce.cu``), classes last.

    loss = -w[y] log softmax(z)_y  (log-sum-exp),   dloss/dz = w[y] (softmax(z) - one_hot(y))

Ignored positions (``ignore_class`` / ``valid``) get loss 0 and a zero gradient. CuPy arrays in
and out. ``sparse_categorical_crossentropy_forward_gpu`` / ``_backward_gpu`` have the signatures
of the NumPy kernels (``from_logits=True``) and the same ``saved`` tuple, so either backward
accepts either forward's ``saved``.
"""
from __future__ import annotations

import numpy as np

from kernels import backend
from kernels.cuda import runtime as rt

SOURCE = "softmax_ce.cu"
MODE_PROBABILITIES, MODE_GRADIENT = 0, 1


def _check(fn, labels, logits):
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits must have a class axis last, got shape "
                         f"{tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{fn}: labels of shape {tuple(labels.shape)} must be the logits' shape "
                         f"{tuple(logits.shape)} without the class axis")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{fn}: labels must be integer class ids, got dtype {labels.dtype}")


def _class_weight(fn, class_weight, logits):
    if class_weight is None:
        return None
    rt.require_gpu(fn, "kernels.losses", class_weight=class_weight)
    if tuple(class_weight.shape) != (logits.shape[-1],):
        raise ValueError(f"{fn}: class_weight of shape {tuple(class_weight.shape)} must hold one "
                         f"weight per class ({logits.shape[-1]})")
    return rt.contiguous(class_weight.astype(logits.dtype, copy=False))


def _run_forward(logits, labels32, class_weight, mode):
    """(loss (P,), out (P, C)) of the fused kernel; labels32: int32 with -1 = ignored."""
    xp = backend.get_array_module(logits)
    suffix = rt.dtype_suffix("softmax_cross_entropy", logits.dtype)
    n_classes = logits.shape[-1]
    rows = labels32.size
    loss = xp.empty(labels32.shape, dtype=logits.dtype)
    out = xp.empty(logits.shape, dtype=logits.dtype)
    rt.launch(SOURCE, f"softmax_ce_forward_{suffix}", rows,
              [rt.contiguous(logits), rt.contiguous(labels32),
               logits if class_weight is None else class_weight, rt.i32(class_weight is not None),
               rt.i64(rows), rt.i64(n_classes), rt.i32(mode), loss, out])
    return loss, out


def softmax_cross_entropy_gpu(logits, labels, ignore_class=None, class_weight=None):
    """Fused loss and gradient of one training step. logits: (..., C); labels: (...) ints.

    Returns ``loss: (...)`` = -w[y] log softmax(logits)_y and ``grad: (..., C)`` =
    w[y] (softmax - one_hot(y)), w = class_weight or 1. Labels equal to ``ignore_class``, and
    labels of -1, are ignored (loss 0, zero gradient row); any other label outside [0, C) gives
    NaN. Equals ``kernels.losses.sparse_categorical_crossentropy_forward(labels, logits,
    class_weight, valid, from_logits=True)[0]`` and its backward with grad = 1.
    """
    fn = "softmax_cross_entropy_gpu"
    rt.require_gpu(fn, "kernels.losses.sparse_categorical_crossentropy_forward",
                   logits=logits, labels=labels)
    _check(fn, labels, logits)
    rt.dtype_suffix(fn, logits.dtype)
    class_weight = _class_weight(fn, class_weight, logits)
    xp = backend.get_array_module(logits)
    labels32 = labels.astype(np.int32)
    if ignore_class is not None:
        labels32 = xp.where(labels == ignore_class, np.int32(-1), labels32)
    return _run_forward(logits, labels32, class_weight, MODE_GRADIENT)


def sparse_categorical_crossentropy_forward_gpu(labels, output, class_weight=None, valid=None, *,
                                                from_logits):
    """values = -w[y] log softmax(output)_y at each position; ``(values, saved)`` as in NumPy.

    labels: (...) ints in [0, C); output: (..., C) logits; class_weight: (C,) or None;
    valid: (...) bool or None (invalid positions: value 0, gradient 0). Only ``from_logits=True``
    runs here. Mirrors ``kernels.losses.sparse_categorical_crossentropy_forward``; ``saved`` is
    ``(True, labels, softmax, None, None, weight)`` with int32 labels (0 where invalid) and the
    per-position weight (None when there is neither class_weight nor valid).
    """
    fn = "sparse_categorical_crossentropy_forward_gpu"
    if not from_logits:
        raise ValueError(f"{fn}: only from_logits=True has a CUDA kernel; use "
                         "kernels.losses.sparse_categorical_crossentropy_forward for probabilities")
    rt.require_gpu(fn, "kernels.losses.sparse_categorical_crossentropy_forward",
                   labels=labels, output=output, valid=valid)
    _check(fn, labels, output)
    rt.dtype_suffix(fn, output.dtype)
    if valid is not None and tuple(valid.shape) != tuple(labels.shape):
        raise ValueError(f"{fn}: valid of shape {tuple(valid.shape)} must match labels of shape "
                         f"{tuple(labels.shape)}")
    class_weight = _class_weight(fn, class_weight, output)
    xp = backend.get_array_module(output)
    labels32 = labels.astype(np.int32)
    if valid is not None:
        labels32 = xp.where(valid, labels32, np.int32(-1))
    values, probabilities = _run_forward(output, labels32, class_weight, MODE_PROBABILITIES)
    clean = labels32 if valid is None else xp.where(valid, labels32, np.int32(0))
    weight = None if class_weight is None else class_weight[clean]
    if valid is not None:
        weight = valid.astype(output.dtype) if weight is None else weight * valid
    return values, (True, clean, probabilities, None, None, weight)


def sparse_categorical_crossentropy_backward_gpu(grad, saved):
    """dL/doutput = grad * w[y] * (softmax - one_hot(y)), one fused elementwise pass.

    grad: (...) = dL/dvalues; saved: from either forward (from_logits=True). Mirrors
    ``kernels.losses.sparse_categorical_crossentropy_backward``.
    """
    fn = "sparse_categorical_crossentropy_backward_gpu"
    from_logits, labels, q, _, _, weight = saved
    if not from_logits:
        raise ValueError(f"{fn}: only the from_logits=True gradient has a CUDA kernel")
    rt.require_gpu(fn, "kernels.losses.sparse_categorical_crossentropy_backward",
                   grad=grad if getattr(grad, "ndim", 0) else None, labels=labels, q=q,
                   weight=weight)
    xp = backend.get_array_module(q)
    suffix = rt.dtype_suffix(fn, q.dtype)
    if tuple(labels.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"{fn}: saved labels {tuple(labels.shape)} do not match the saved "
                         f"probabilities {tuple(q.shape)}")
    g = xp.broadcast_to(xp.asarray(grad, dtype=q.dtype), labels.shape)
    weight = None if weight is None else xp.broadcast_to(weight.astype(q.dtype, copy=False),
                                                         labels.shape)
    rows, n_classes = labels.size, q.shape[-1]
    dz = xp.empty(q.shape, dtype=q.dtype)
    rt.launch(SOURCE, f"softmax_ce_backward_{suffix}", dz.size,
              [rt.contiguous(g), q if weight is None else rt.contiguous(weight),
               rt.i32(weight is not None), rt.contiguous(labels.astype(np.int32, copy=False)),
               rt.contiguous(q), rt.i64(rows), rt.i64(n_classes), dz])
    return dz
