"""Losses with Keras 3 names, arguments, defaults and numbers.

``loss(y_true, y_pred, sample_weight=None)`` returns a Tensor: a scalar, or the per-sample losses
for ``reduction="none"``. ``y_pred`` is a Tensor (gradients flow to it) or an array; ``y_true``
and ``sample_weight`` are arrays or Tensors and never receive gradients (they are moved to
``y_pred``'s device). Each call is ONE ``minicnn.Function`` (``LossOp``) whose backward is the
closed form of ``kernels.losses`` (softmax - one_hot for softmax cross-entropy, ...), not a chain
of generic operations.

Keras 3 semantics reproduced (keras/src/losses/losses.py and loss.py):
- y_true and y_pred whose ranks differ by one with a trailing 1 are squeezed/expanded first
  (``squeeze_or_expand_to_same_rank``); the per-sample losses then have y_pred's shape without
  its last (class or mean) axis.
- Probabilities are clipped to [1e-7, 1 - 1e-7]; categorical ones are first renormalised to sum
  to one. Logits use log-sum-exp / the softplus form.
- Reductions: "sum_over_batch_size" (default) and "mean" = sum(w * loss) / number of per-sample
  losses (NOT divided by the weights' sum); "sum"; "none"/None; "mean_with_sample_weight" =
  sum(w * loss) / sum(w). ``ignore_class`` is a mask: ignored positions add nothing, and the
  "sum_over_batch_size" mean runs over the valid positions only.
- sample_weight: a scalar, one weight per sample ``(N,)`` (broadcast over the pixels; Keras would
  align a 1-D weight with the LAST axis), or a weight map of the per-sample losses' shape, e.g.
  the U-Net paper's ``(N, H, W)`` weighted cross-entropy map.

Additions (not in Keras): ``class_weight=`` (an array of C values) on the cross-entropies, and
``CEDice``. PyTorch differs from Keras in two places noted below; Keras wins.
"""
from __future__ import annotations

import warnings

import numpy as np

from kernels import backend, dispatch
from kernels import dice as D
from kernels import losses as K
from kernels import reduction as R
from minicnn import mixed_precision
from minicnn.registry import Configurable, resolve
from minicnn.tensor import Function, Tensor, as_tensor

__all__ = [
    "Loss", "LossOp", "MeanSquaredError", "BinaryCrossentropy", "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy", "BinaryFocalCrossentropy", "CategoricalFocalCrossentropy",
    "Dice", "CEDice", "get", "mean_squared_error", "binary_crossentropy",
    "categorical_crossentropy", "sparse_categorical_crossentropy", "binary_focal_crossentropy",
    "categorical_focal_crossentropy", "dice"]


def standardize_reduction(reduction, where="Loss"):
    """'none' for None; ValueError for anything Keras 3 does not accept."""
    if reduction is None:
        return "none"
    if reduction not in R.REDUCTIONS:
        raise ValueError(f"{where}: invalid reduction {reduction!r}; expected one of "
                         f"{R.REDUCTIONS} or None")
    return reduction


def _as_array(value):
    return value.data if isinstance(value, Tensor) else value


def _normalize_axis(axis, ndim, where):
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{where}: axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{where}: axis={axis} is out of range for y_pred of rank {ndim}")
    return int(axis) % ndim


def _align_ranks(y_true, pred_shape):
    """Keras' squeeze_or_expand_to_same_rank(y_true, y_pred) on y_true and y_pred's shape."""
    t_rank, p_rank = y_true.ndim, len(pred_shape)
    if t_rank == p_rank + 1 and y_true.shape[-1] == 1:
        if p_rank == 1:
            pred_shape = tuple(pred_shape) + (1,)
        else:
            y_true = y_true.reshape(y_true.shape[:-1])
    elif p_rank == t_rank + 1 and pred_shape[-1] == 1:
        if t_rank == 1:
            y_true = y_true.reshape(y_true.shape + (1,))
        else:
            pred_shape = tuple(pred_shape[:-1])
    return y_true, tuple(pred_shape)


def _class_vector(values, num_classes, dtype, xp, where, what):
    """A (C,) array on xp from a list/array of per-class values, or ValueError."""
    vector = np.asarray(backend.to_numpy(_as_array(values)), dtype=np.float64)
    if vector.ndim != 1 or vector.shape[0] != num_classes:
        raise ValueError(f"{where}: {what} must hold one value per class ({num_classes}), "
                         f"got shape {vector.shape}")
    return xp.asarray(vector.astype(dtype))


def _check_sparse_labels(y_true, num_classes, ignore_class, where):
    """Integer labels (int64) in [0, C) and the valid mask (None without ignore_class)."""
    xp = backend.get_array_module(y_true)
    if y_true.dtype.kind not in "biuf":
        raise TypeError(f"{where}: y_true must hold integer class ids, got dtype {y_true.dtype}")
    ignored = None if ignore_class is None else (y_true == ignore_class)
    bad = (y_true < 0) | (y_true >= num_classes)
    if y_true.dtype.kind == "f":
        bad = bad | (y_true != xp.floor(y_true))
    if ignored is not None:
        bad = bad & ~ignored
    if bool(bad.any()):                                   # one device -> host read
        first = backend.to_numpy(y_true[bad])[0].item()
        raise ValueError(f"{where}: y_true holds label {first!r}, not a class id in "
                         f"[0, {num_classes}) of y_pred's class axis"
                         + ("" if ignore_class is None else f" (ignore_class={ignore_class})"))
    labels = y_true.astype(xp.int64)
    if ignored is not None:
        labels = xp.where(ignored, 0, labels)
    return labels, None if ignored is None else ~ignored


class LossOp(Function):
    """y_pred -> reduced loss, one differentiable operation.

    forward: per-sample values of the loss kernel, then Keras' weighted reduction.
    backward: dL/dvalues from the reduction, then the kernel's closed-form gradient.
    """

    def __init__(self, loss: "Loss", plan: dict, sample_weight):
        self.loss, self.plan, self.sample_weight = loss, plan, sample_weight

    @property
    def name(self) -> str:
        return type(self.loss).__name__

    def forward(self, y_pred):
        self.input_dtype = y_pred.dtype
        pred = y_pred.astype(self.plan["dtype"], copy=False)
        values, mask, self.saved, extra = self.loss._forward(self.plan, pred)
        out, self.reduced = R.weighted_reduction_forward(
            values, self.sample_weight, mask, reduction=self.loss.reduction, where=self.name)
        self.has_extra = extra is not None
        return out if extra is None else out + extra

    def backward(self, grad):
        if not self.needs_input_grad[0]:
            return (None,)
        grad_values = R.weighted_reduction_backward(grad, self.reduced)
        grad_extra = grad.sum() if self.has_extra else None
        d_pred = self.loss._backward(grad_values, grad_extra, self.saved)
        return (d_pred.astype(self.input_dtype, copy=False),)


class Loss(Configurable):
    """Base of every loss: ``loss(y_true, y_pred, sample_weight=None) -> Tensor``.

    Subclasses implement ``_prepare(y_true, pred_shape, dtype, xp) -> plan`` (checks, raising
    ValueError before any graph is built), ``_forward(plan, pred) -> (values, mask, saved,
    extra)`` and ``_backward(grad_values, grad_extra, saved) -> dL/dy_pred``.
    dtype: None computes in y_pred's float dtype (float32 for float16 / bfloat16 predictions,
    as Keras' losses compute in float32); a dtype casts y_pred to it for the loss.
    """

    def __init__(self, name=None, reduction="sum_over_batch_size", dtype=None):
        self.name = name or type(self).__name__.lower()
        self.reduction = standardize_reduction(reduction, type(self).__name__)
        self.dtype = None if dtype is None else np.dtype(dtype).name

    def __call__(self, y_true, y_pred, sample_weight=None) -> Tensor:
        where = type(self).__name__
        y_pred = as_tensor(y_pred)
        if not backend.is_floating(y_pred.dtype):
            y_pred = Tensor(y_pred.data.astype("float32"))
        device = y_pred.device
        xp = backend.get_array_module(y_pred.data)
        y_true = backend.to_device(_as_array(y_true), device)
        if sample_weight is not None:
            sample_weight = backend.to_device(_as_array(sample_weight), device)
        dtype = np.dtype(self.dtype or mixed_precision.loss_dtype(y_pred.dtype))
        if y_true.dtype.kind not in "biuf":
            raise TypeError(f"{where}: y_true must be numeric, got dtype {y_true.dtype}")
        plan = self._prepare(y_true, tuple(y_pred.shape), dtype, xp)
        plan["dtype"] = dtype
        if sample_weight is not None:
            sample_weight = xp.asarray(sample_weight).astype(dtype)
        return LossOp(self, plan, sample_weight)(y_pred)

    # -- to implement ---------------------------------------------------------------------------
    def _prepare(self, y_true, pred_shape, dtype, xp) -> dict:
        raise NotImplementedError

    def _forward(self, plan, pred):
        raise NotImplementedError

    def _backward(self, grad_values, grad_extra, saved):
        raise NotImplementedError

    # -- config -----------------------------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name, "reduction": self.reduction, "dtype": self.dtype}


    # -- shared checks ----------------------------------------------------------------------------
    def _set_options(self, from_logits, label_smoothing, axis, class_weight):
        """The settings shared by the cross-entropies, checked."""
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)
        self.axis = axis
        self.class_weight = class_weight
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"{type(self).__name__}: label_smoothing must be in [0, 1], "
                             f"got {label_smoothing}")

    def _same_shape(self, y_true, shape, hint=""):
        if tuple(y_true.shape) != tuple(shape):
            raise ValueError(f"{type(self).__name__}: y_true of shape {tuple(y_true.shape)} and "
                             f"y_pred of shape {tuple(shape)} must have the same shape{hint}")


def _class_weight_config(class_weight):
    if class_weight is None:
        return None
    return [float(v) for v in np.asarray(backend.to_numpy(_as_array(class_weight))).ravel()]


# =================================================================================== MSE
class MeanSquaredError(Loss):
    """loss = mean((y_true - y_pred)^2) over the last axis, then reduced.  Keras: MeanSquaredError."""

    def __init__(self, reduction="sum_over_batch_size", name="mean_squared_error", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def _prepare(self, y_true, pred_shape, dtype, xp):
        y_true, shape = _align_ranks(y_true, pred_shape)
        self._same_shape(y_true, shape)
        if not shape:
            raise ValueError("MeanSquaredError: y_pred must have at least one axis, got a scalar")
        return {"target": y_true.astype(dtype), "shape": shape}

    def _forward(self, plan, pred):
        values, diff = K.mean_squared_error_forward(plan["target"], pred.reshape(plan["shape"]))
        return values, None, (diff, pred.shape), None

    def _backward(self, grad_values, grad_extra, saved):
        diff, shape = saved
        return K.mean_squared_error_backward(grad_values, diff).reshape(shape)


# =================================================================================== binary
class BinaryCrossentropy(Loss):
    """loss = mean over ``axis`` of  -w [t log p + (1 - t) log(1 - p)].  Keras: BinaryCrossentropy.

    from_logits: p = sigmoid(y_pred), computed as softplus(x) - t x (finite for any logit).
    else: p = clip(y_pred, 1e-7, 1 - 1e-7).
    label_smoothing: t -> t (1 - s) + s / 2.
    class_weight (addition): [w0, w1]; each element's loss is multiplied by
    w = w1 t + w0 (1 - t) (t before smoothing). PyTorch's ``pos_weight`` is different (it weights
    only the positive term).
    y_true, y_pred: same shape, e.g. (N, H, W, 1); values: y_pred's shape without ``axis``.
    """

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, class_weight=None,
                 reduction="sum_over_batch_size", name="binary_crossentropy", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_options(from_logits, label_smoothing, axis, class_weight)

    def _prepare(self, y_true, pred_shape, dtype, xp):
        where = type(self).__name__
        y_true, shape = _align_ranks(y_true, pred_shape)
        self._same_shape(y_true, shape)
        if not shape:
            raise ValueError(f"{where}: y_pred must have at least one axis, got a scalar")
        raw = y_true.astype(dtype)
        s = self.label_smoothing
        target = raw * dtype.type(1 - s) + dtype.type(0.5 * s) if s else raw
        weight = None
        if self.class_weight is not None:
            w = _class_vector(self.class_weight, 2, dtype, xp, where, "class_weight")
            weight = w[1] * raw + w[0] * (1 - raw)
        return {"target": target, "weight": weight, "shape": shape,
                "axis": _normalize_axis(self.axis, len(shape), where)}

    def _forward(self, plan, pred):
        x = pred.reshape(plan["shape"])
        elementwise, saved = K.binary_crossentropy_forward(plan["target"], x, plan["weight"],
                                                           from_logits=self.from_logits)
        return elementwise.mean(axis=plan["axis"]), None, (saved, plan, pred.shape), None

    def _backward(self, grad_values, grad_extra, saved):
        kernel_saved, plan, shape = saved
        g = K.mean_over_axis_backward(grad_values, shape=plan["shape"], axis=plan["axis"])
        return K.binary_crossentropy_backward(g, kernel_saved).reshape(shape)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits,
                "label_smoothing": self.label_smoothing, "axis": self.axis,
                "class_weight": _class_weight_config(self.class_weight)}


class BinaryFocalCrossentropy(BinaryCrossentropy):
    """loss = mean over ``axis`` of  a(t) (1 - p_t)^gamma bce(t, p)   (Lin et al. 2017).

    Keras: BinaryFocalCrossentropy. p = sigmoid(y_pred) (logits) or y_pred;
    p_t = t p + (1 - t)(1 - p); a(t) = alpha t + (1 - alpha)(1 - t) if apply_class_balancing
    else 1; bce as in BinaryCrossentropy (softplus form for logits, as Keras' TensorFlow backend
    computes it; clipped probabilities otherwise). label_smoothing: t -> t (1 - s) + s / 2.
    """

    def __init__(self, apply_class_balancing=False, alpha=0.25, gamma=2.0, from_logits=False,
                 label_smoothing=0.0, axis=-1, reduction="sum_over_batch_size",
                 name="binary_focal_crossentropy", dtype=None):
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, axis=axis,
                         reduction=reduction, name=name, dtype=dtype)
        self.apply_class_balancing = bool(apply_class_balancing)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        if self.gamma < 0:
            raise ValueError(f"BinaryFocalCrossentropy: gamma must be >= 0, got {gamma}")

    def _forward(self, plan, pred):
        x = pred.reshape(plan["shape"])
        elementwise, saved = K.binary_focal_crossentropy_forward(
            plan["target"], x, from_logits=self.from_logits, gamma=self.gamma, alpha=self.alpha,
            apply_class_balancing=self.apply_class_balancing)
        return elementwise.mean(axis=plan["axis"]), None, (saved, plan, pred.shape), None

    def _backward(self, grad_values, grad_extra, saved):
        kernel_saved, plan, shape = saved
        g = K.mean_over_axis_backward(grad_values, shape=plan["shape"], axis=plan["axis"])
        return K.binary_focal_crossentropy_backward(g, kernel_saved).reshape(shape)

    def get_config(self):
        config = super().get_config()
        config.pop("class_weight")
        return {**config, "apply_class_balancing": self.apply_class_balancing,
                "alpha": self.alpha, "gamma": self.gamma}


# =================================================================================== categorical
class _ClassAxisLoss(Loss):
    """Shared plumbing of the losses with a class axis: move it last, and back for the gradient."""

    def _to_last(self, pred, plan):
        return _moveaxis(pred.reshape(plan["shape"]), plan["axis"], -1)

    def _from_last(self, grad, plan, shape):
        return _moveaxis(grad, -1, plan["axis"]).reshape(shape)


def _moveaxis(a, source, destination):
    xp = backend.get_array_module(a)
    return xp.moveaxis(a, source, destination)


class CategoricalCrossentropy(_ClassAxisLoss):
    """loss = -sum_c w_c t_c log p_c over the class ``axis``.  Keras: CategoricalCrossentropy.

    y_true: one-hot (or soft) labels of y_pred's shape, e.g. (N, H, W, C).
    from_logits: log p = log_softmax(y_pred) (log-sum-exp); gradient softmax * sum(w t) - w t.
    else: p = clip(y_pred / sum_c y_pred_c, 1e-7, 1 - 1e-7).
    label_smoothing: t -> t (1 - s) + s / C.  class_weight (addition): (C,) w, default 1 —
    for one-hot t the pixel's loss times w[its class], as PyTorch's ``weight=``; but the mean
    divides by the number of pixels, not by sum(w[y]) as PyTorch's "mean" does.
    """

    def __init__(self, from_logits=False, label_smoothing=0.0, axis=-1, class_weight=None,
                 reduction="sum_over_batch_size", name="categorical_crossentropy", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._set_options(from_logits, label_smoothing, axis, class_weight)

    def _prepare(self, y_true, pred_shape, dtype, xp):
        where = type(self).__name__
        y_true, shape = _align_ranks(y_true, pred_shape)
        if not shape:
            raise ValueError(f"{where}: y_pred must have a class axis, got a scalar")
        hint = ("; y_true looks like integer class ids: use SparseCategoricalCrossentropy"
                if y_true.ndim == len(shape) - 1 else "")
        self._same_shape(y_true, shape, hint)
        axis = _normalize_axis(self.axis, len(shape), where)
        n_classes = shape[axis]
        if n_classes == 1:
            warnings.warn(f"{where}: y_pred has a single class along axis {axis} (shape "
                          f"{shape}); the loss is constant. Use BinaryCrossentropy for two "
                          "classes.", stacklevel=3)
        target = _moveaxis(y_true.astype(dtype), axis, -1)
        s = self.label_smoothing
        if s:
            target = target * dtype.type(1 - s) + dtype.type(s / n_classes)
        plan = {"target": target, "shape": shape, "axis": axis, "n_classes": n_classes}
        plan.update(self._class_options(n_classes, dtype, xp, where))
        return plan

    def _class_options(self, n_classes, dtype, xp, where):
        cw = self.class_weight
        return {"class_weight": None if cw is None else
                _class_vector(cw, n_classes, dtype, xp, where, "class_weight")}

    def _forward(self, plan, pred):
        z = self._to_last(pred, plan)
        values, saved = K.categorical_crossentropy_forward(plan["target"], z, plan["class_weight"],
                                                           from_logits=self.from_logits)
        return values, None, (saved, plan, pred.shape), None

    def _backward(self, grad_values, grad_extra, saved):
        kernel_saved, plan, shape = saved
        return self._from_last(K.categorical_crossentropy_backward(grad_values, kernel_saved),
                               plan, shape)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits,
                "label_smoothing": self.label_smoothing, "axis": self.axis,
                "class_weight": _class_weight_config(self.class_weight)}


class CategoricalFocalCrossentropy(CategoricalCrossentropy):
    """loss = sum_c alpha_c (1 - p_c)^gamma (-t_c log p_c)   (Lin et al. 2017).

    Keras: CategoricalFocalCrossentropy. p = clip(q, 1e-7, 1 - 1e-7) with q = softmax(y_pred)
    (logits; Keras clips here too) or y_pred / sum(y_pred). alpha: a scalar or one value per
    class. label_smoothing: t -> t (1 - s) + s / C.
    """

    def __init__(self, alpha=0.25, gamma=2.0, from_logits=False, label_smoothing=0.0, axis=-1,
                 reduction="sum_over_batch_size", name="categorical_focal_crossentropy",
                 dtype=None):
        super().__init__(from_logits=from_logits, label_smoothing=label_smoothing, axis=axis,
                         reduction=reduction, name=name, dtype=dtype)
        self.alpha = alpha if np.ndim(_as_array(alpha)) else float(alpha)
        self.gamma = float(gamma)
        if self.gamma < 0:
            raise ValueError(f"CategoricalFocalCrossentropy: gamma must be >= 0, got {gamma}")

    def _class_options(self, n_classes, dtype, xp, where):
        if isinstance(self.alpha, float):
            return {"alpha": dtype.type(self.alpha)}
        return {"alpha": _class_vector(self.alpha, n_classes, dtype, xp, where, "alpha")}

    def _forward(self, plan, pred):
        z = self._to_last(pred, plan)
        values, saved = K.categorical_focal_crossentropy_forward(
            plan["target"], z, from_logits=self.from_logits, gamma=self.gamma, alpha=plan["alpha"])
        return values, None, (saved, plan, pred.shape), None

    def _backward(self, grad_values, grad_extra, saved):
        kernel_saved, plan, shape = saved
        return self._from_last(
            K.categorical_focal_crossentropy_backward(grad_values, kernel_saved), plan, shape)

    def get_config(self):
        config = super().get_config()
        config.pop("class_weight")
        alpha = self.alpha if isinstance(self.alpha, float) else _class_weight_config(self.alpha)
        return {**config, "alpha": alpha, "gamma": self.gamma}


class SparseCategoricalCrossentropy(_ClassAxisLoss):
    """loss = -w[y] log p[y] at each position.  Keras: SparseCategoricalCrossentropy.

    y_true: integer class ids of y_pred's shape without the class ``axis``, e.g. (N, H, W) or
    (N, H, W, 1) for y_pred (N, H, W, C). from_logits: log p = log_softmax (gradient
    softmax - one_hot); else p = clip(y_pred / sum_c y_pred_c, 1e-7, 1 - 1e-7) — Keras
    renormalises probabilities that do not sum to one.
    ignore_class: positions whose label equals it add nothing and leave the mean (the mean of
    "sum_over_batch_size" runs over the other positions, like PyTorch's ignore_index).
    class_weight (addition): (C,) w; the mean still divides by the number of valid positions,
    not by sum(w[y]) as PyTorch's weighted "mean" does.
    Raises ValueError for labels outside [0, C), one-hot y_true, and shape mismatches.
    """

    def __init__(self, from_logits=False, ignore_class=None, axis=-1, class_weight=None,
                 reduction="sum_over_batch_size", name="sparse_categorical_crossentropy",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.ignore_class = None if ignore_class is None else int(ignore_class)
        self.axis = axis
        self.class_weight = class_weight

    def _prepare(self, y_true, pred_shape, dtype, xp):
        where = type(self).__name__
        y_true, shape = _align_ranks(y_true, pred_shape)
        if not shape:
            raise ValueError(f"{where}: y_pred must have a class axis, got a scalar")
        axis = _normalize_axis(self.axis, len(shape), where)
        n_classes = shape[axis]
        expected = shape[:axis] + shape[axis + 1:]
        if y_true.ndim == len(shape) and y_true.shape[-1] == 1 and tuple(y_true.shape) != shape:
            y_true = y_true.reshape(y_true.shape[:-1])
        if tuple(y_true.shape) == shape and n_classes > 1:
            raise ValueError(f"{where}: y_true of shape {tuple(y_true.shape)} has the shape of "
                             f"y_pred, so it looks one-hot; give integer class ids of shape "
                             f"{expected} or use CategoricalCrossentropy")
        if tuple(y_true.shape) != expected:
            raise ValueError(f"{where}: y_true of shape {tuple(y_true.shape)} must be y_pred's "
                             f"shape {shape} without the class axis {axis}, i.e. {expected}")
        labels, valid = _check_sparse_labels(y_true, n_classes, self.ignore_class, where)
        cw = self.class_weight
        return {"labels": labels, "valid": valid, "shape": shape, "axis": axis,
                "class_weight": None if cw is None else
                _class_vector(cw, n_classes, dtype, xp, where, "class_weight")}

    def _forward(self, plan, pred):
        z = self._to_last(pred, plan)
        values, saved = dispatch.sparse_categorical_crossentropy_forward(
            plan["labels"], z, plan["class_weight"], plan["valid"], from_logits=self.from_logits)
        return values, plan["valid"], (saved, plan, pred.shape), None

    def _backward(self, grad_values, grad_extra, saved):
        kernel_saved, plan, shape = saved
        return self._from_last(
            dispatch.sparse_categorical_crossentropy_backward(grad_values, kernel_saved), plan, shape)

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits,
                "ignore_class": self.ignore_class, "axis": self.axis,
                "class_weight": _class_weight_config(self.class_weight)}


# =================================================================================== Dice
class Dice(Loss):
    """loss = 1 - 2 sum(y_true y_pred) / (sum(y_true) + sum(y_pred) + 1e-7).  Keras: Dice.

    Sums run over ``axis`` (None: every axis, one number for the batch; (1, 2, 3): one per image
    of an (N, H, W, C) batch). y_pred is used as given (probabilities; no softmax, no clipping),
    y_true is a one-hot / binary mask of the same shape.
    """

    def __init__(self, reduction="sum_over_batch_size", name="dice", axis=None, dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.axis = axis

    def _prepare(self, y_true, pred_shape, dtype, xp):
        where = type(self).__name__
        y_true, shape = _align_ranks(y_true, pred_shape)
        self._same_shape(y_true, shape)
        axis = self.axis
        if axis is not None:
            axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
            axis = tuple(sorted({_normalize_axis(a, len(shape), where) for a in axes}))
        return {"target": y_true.astype(dtype), "shape": shape, "axis": axis}

    def _forward(self, plan, pred):
        values, saved = D.dice_forward(plan["target"], pred.reshape(plan["shape"]),
                                       axis=plan["axis"])
        return values, None, (saved, pred.shape), None

    def _backward(self, grad_values, grad_extra, saved):
        kernel_saved, shape = saved
        return D.dice_backward(grad_values, kernel_saved).reshape(shape)

    def get_config(self):
        axis = self.axis if self.axis is None or isinstance(self.axis, int) else list(self.axis)
        return {**super().get_config(), "axis": axis}


class CEDice(SparseCategoricalCrossentropy):
    """Cross-entropy + soft Dice for integer masks: the usual segmentation loss sum.

        loss = ce_weight * SCE + dice_weight * (1 - (1/C) sum_c D_c)
        D_c  = (2 sum_i p_ic g_ic + smooth) / (sum_i p_ic + sum_i g_ic + smooth)

    SCE is exactly ``SparseCategoricalCrossentropy(from_logits, ignore_class, class_weight,
    reduction)(y_true, y_pred, sample_weight)``. p = softmax(y_pred) (from_logits) or
    y_pred / sum_c y_pred_c (no clipping); g = one_hot(y_true); the Dice sums run over every
    valid pixel of the whole batch ("batch Dice", as nnU-Net), pixels of ``ignore_class`` left
    out; sample_weight weights the cross-entropy only. With reduction="none" the Dice term (one
    number for the batch) is added to every pixel's weighted cross-entropy.
    y_true: (N, H, W) or (N, H, W, 1) integer ids; y_pred: (N, H, W, C).
    """

    def __init__(self, from_logits=False, ignore_class=None, class_weight=None, ce_weight=1.0,
                 dice_weight=1.0, smooth=1.0, reduction="sum_over_batch_size", name="ce_dice",
                 dtype=None):
        super().__init__(from_logits=from_logits, ignore_class=ignore_class, axis=-1,
                         class_weight=class_weight, reduction=reduction, name=name, dtype=dtype)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)
        if self.smooth < 0:
            raise ValueError(f"CEDice: smooth must be >= 0, got {smooth}")

    def _forward(self, plan, pred):
        values, mask, (saved, plan, shape), _ = super()._forward(plan, pred)
        z = self._to_last(pred, plan)
        dice, dice_saved = D.soft_dice_forward(plan["labels"], z, plan["valid"],
                                               from_logits=self.from_logits, smooth=self.smooth)
        values = values * values.dtype.type(self.ce_weight)
        extra = dice * dice.dtype.type(self.dice_weight)
        return values, mask, (saved, dice_saved, plan, shape), extra

    def _backward(self, grad_values, grad_extra, saved):
        ce_saved, dice_saved, plan, shape = saved
        d_ce = dispatch.sparse_categorical_crossentropy_backward(
            grad_values * grad_values.dtype.type(self.ce_weight), ce_saved)
        d_dice = D.soft_dice_backward(grad_extra * grad_extra.dtype.type(self.dice_weight),
                                      dice_saved)
        return self._from_last(d_ce + d_dice, plan, shape)

    def get_config(self):
        config = super().get_config()
        config.pop("axis")
        return {**config, "ce_weight": self.ce_weight, "dice_weight": self.dice_weight,
                "smooth": self.smooth}


# =================================================================================== functions
def mean_squared_error(y_true, y_pred):
    """Per-sample mean squared error (reduction "none"), as keras.losses.mean_squared_error."""
    return MeanSquaredError(reduction="none")(y_true, y_pred)


def binary_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """Per-sample binary cross-entropy, as keras.losses.binary_crossentropy."""
    return BinaryCrossentropy(from_logits, label_smoothing, axis, reduction="none")(y_true, y_pred)


def categorical_crossentropy(y_true, y_pred, from_logits=False, label_smoothing=0.0, axis=-1):
    """Per-sample categorical cross-entropy, as keras.losses.categorical_crossentropy."""
    return CategoricalCrossentropy(from_logits, label_smoothing, axis,
                                   reduction="none")(y_true, y_pred)


def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
    """Per-sample sparse categorical cross-entropy (0 at ignored positions), as Keras."""
    return SparseCategoricalCrossentropy(from_logits, ignore_class, axis,
                                         reduction="none")(y_true, y_pred)


def binary_focal_crossentropy(y_true, y_pred, apply_class_balancing=False, alpha=0.25, gamma=2.0,
                              from_logits=False, label_smoothing=0.0, axis=-1):
    """Per-sample binary focal cross-entropy, as keras.losses.binary_focal_crossentropy."""
    return BinaryFocalCrossentropy(apply_class_balancing, alpha, gamma, from_logits,
                                   label_smoothing, axis, reduction="none")(y_true, y_pred)


def categorical_focal_crossentropy(y_true, y_pred, alpha=0.25, gamma=2.0, from_logits=False,
                                   label_smoothing=0.0, axis=-1):
    """Per-sample categorical focal cross-entropy, as keras.losses.categorical_focal_crossentropy."""
    return CategoricalFocalCrossentropy(alpha, gamma, from_logits, label_smoothing, axis,
                                        reduction="none")(y_true, y_pred)


def dice(y_true, y_pred, axis=None):
    """Dice loss values over ``axis`` (a scalar for axis=None), as keras.losses.dice."""
    return Dice(reduction="none", axis=axis)(y_true, y_pred)


# =================================================================================== get
_CLASSES = {cls.__name__: cls for cls in (
    MeanSquaredError, BinaryCrossentropy, CategoricalCrossentropy, SparseCategoricalCrossentropy,
    BinaryFocalCrossentropy, CategoricalFocalCrossentropy, Dice, CEDice)}
_ALIASES = {
    "mse": MeanSquaredError, "mean_squared_error": MeanSquaredError,
    "bce": BinaryCrossentropy, "binary_crossentropy": BinaryCrossentropy,
    "cce": CategoricalCrossentropy, "categorical_crossentropy": CategoricalCrossentropy,
    "scce": SparseCategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "focal": BinaryFocalCrossentropy, "binary_focal_crossentropy": BinaryFocalCrossentropy,
    "categorical_focal_crossentropy": CategoricalFocalCrossentropy,
    "dice": Dice, "ce_dice": CEDice, "cedice": CEDice, "dice_ce": CEDice,
}


def get(identifier, **kwargs):
    """A loss from a name ("sparse_categorical_crossentropy", "mse", "dice", "focal" ->
    BinaryFocalCrossentropy, "ce_dice", or a class name), a config dict
    ({"class_name": ..., "config": {...}}), a Loss (returned as is) or any callable.
    ``kwargs`` go to the constructor of a named loss, e.g. get("scce", from_logits=True).
    """
    return resolve(identifier, "loss", Loss, _CLASSES, _ALIASES, **kwargs)


def serialize(loss) -> dict:
    """{"class_name": ..., "config": ...} for a built-in loss (the inverse of ``get``)."""
    if not isinstance(loss, Loss):
        raise TypeError(f"losses.serialize: expected a Loss, got {type(loss).__name__}")
    return {"class_name": type(loss).__name__, "config": loss.get_config()}
