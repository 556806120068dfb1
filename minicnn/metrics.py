"""Segmentation metrics, Keras style: ``update_state(y_true, y_pred, sample_weight=None)``,
``result()``, ``reset_state()``; calling a metric updates it and returns the result.

Inputs: y_true integer masks ``(N, H, W)`` or ``(N, H, W, 1)``; y_pred any of
- scores with a class axis ``(N, H, W, C)``, C > 1 (logits or probabilities): argmax over the
  last axis;
- one channel ``(N, H, W, 1)`` or ``(N, H, W)`` of floats: a binary prediction, class 1 where
  ``y_pred >= threshold``; threshold defaults to 0.5 for probabilities and 0 for logits
  (``from_logits=True``), Keras' BinaryIoU rule;
- integer masks of y_true's shape.
Tensors or arrays, NumPy or CuPy. The statistics (a confusion matrix, or two sums) accumulate ON
THE ARRAYS' DEVICE (``pair_counts``); only ``result()`` reads them back, and ``update_state``
reads one flag (whether any class id is out of range) to raise at once.
sample_weight: a scalar, one weight per image ``(N,)``, or a per-pixel map of y_true's shape.
ignore_class: pixels whose true label equals it are left out (Keras' ``ignore_class``).
"""
from __future__ import annotations

import numpy as np

from kernels import backend
from minicnn.registry import Configurable, resolve
from minicnn.tensor import Tensor

__all__ = ["Metric", "PixelAccuracy", "MeanIoU", "DiceCoefficient", "get", "pair_counts"]

EPSILON = 1e-7   # keras.backend.epsilon(), as in keras.metrics.MeanIoU.result


def _as_array(value):
    return value.data if isinstance(value, Tensor) else value


def predicted_ids(y_true, y_pred, from_logits=False, threshold=None, where="metric"):
    """(true_ids, pred_ids, n_classes_seen) of one shape, on y_pred's device.

    n_classes_seen: C of a class axis, 2 for a thresholded single channel, None for integer masks.
    """
    y_pred = _as_array(y_pred)
    if not backend.is_gpu_array(y_pred):
        y_pred = np.asarray(y_pred)
    xp = backend.get_array_module(y_pred)
    y_true = backend.to_device(_as_array(y_true), backend.device_of(y_pred))
    y_true = xp.asarray(y_true)
    if y_true.dtype.kind not in "biuf":
        raise TypeError(f"{where}: y_true must hold integer class ids, got dtype {y_true.dtype}")
    if y_pred.dtype.kind not in "biu" and not backend.is_floating(y_pred.dtype):
        raise TypeError(f"{where}: y_pred must be numeric, got dtype {y_pred.dtype}")
    if y_pred.dtype.name in ("float16", "bfloat16"):       # mixed precision: score in float32
        y_pred = y_pred.astype(np.float32)
    if y_true.ndim == y_pred.ndim and y_true.ndim and y_true.shape[-1] == 1 \
            and y_true.shape != y_pred.shape:
        y_true = y_true.reshape(y_true.shape[:-1])          # (N, H, W, 1) masks
    if y_pred.dtype.kind in "biu":                         # integer masks
        if y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
            y_pred = y_pred.reshape(y_pred.shape[:-1])
        seen, pred = None, y_pred
    elif y_pred.shape == y_true.shape or (y_pred.ndim == y_true.ndim + 1
                                          and y_pred.shape[-1] == 1):
        cut = (0.0 if from_logits else 0.5) if threshold is None else threshold
        scores = y_pred if y_pred.shape == y_true.shape else y_pred[..., 0]
        seen, pred = 2, (scores >= cut).astype(xp.int64)
    elif y_pred.ndim == y_true.ndim + 1:
        seen, pred = y_pred.shape[-1], y_pred.argmax(axis=-1)
    else:
        pred = y_pred
    if pred.shape != y_true.shape:
        raise ValueError(f"{where}: y_pred of shape {tuple(y_pred.shape)} does not match y_true "
                         f"of shape {tuple(y_true.shape)} (expected scores (..., C), one channel, "
                         "or an integer mask of y_true's shape)")
    if y_true.dtype.kind == "f" and bool((y_true != xp.floor(y_true)).any()):
        raise ValueError(f"{where}: y_true must hold integer class ids, found fractional values")
    return y_true.astype(xp.int64), pred.astype(xp.int64), seen


def pixel_weights(sample_weight, shape, xp, where="metric"):
    """sample_weight as a float64 array of ``shape``.

    Accepted: a scalar, one weight per image (N,), the mask's shape, or it with a trailing 1.
    """
    if sample_weight is None:
        return None
    w = xp.asarray(backend.to_device(_as_array(sample_weight),
                                     "gpu" if xp is not np else "cpu")).astype(xp.float64)
    if w.shape == tuple(shape) + (1,):
        w = w.reshape(shape)
    elif w.ndim == 1 and len(shape) > 1 and w.shape[0] == shape[0]:
        w = w.reshape((shape[0],) + (1,) * (len(shape) - 1))
    try:
        return xp.broadcast_to(w, shape)
    except ValueError:
        raise ValueError(f"{where}: sample_weight of shape {tuple(w.shape)} does not broadcast "
                         f"to the masks of shape {tuple(shape)}") from None


def pair_counts(index, weights, size):
    """counts[k] = sum of ``weights`` (1 each when None) over the positions where index == k,
    for 0 <= k < size (ids already checked): float64 (size,), on the arrays' device.

    NumPy: ``bincount``. CuPy: a scatter-add into a fixed-size array, because ``cupy.bincount``
    reads max(index) back to size its result (a device sync per call).
    """
    xp = backend.get_array_module(index)
    if xp is np:
        return np.bincount(index, weights=weights, minlength=size).astype(np.float64)
    counts = xp.zeros(size, dtype=xp.float64)
    backend.scatter_add(counts, index, xp.ones(index.shape, xp.float64) if weights is None
                        else weights.astype(xp.float64, copy=False))
    return counts


class Metric(Configurable):
    """Base: ``update_state``, ``result`` (a Python float), ``reset_state``; ``m(y_true, y_pred)``
    updates then returns the result (Keras 3's Metric.__call__)."""

    _direction = "up"      # every metric here grows as the model improves (callbacks' mode="auto")

    def __init__(self, name=None, dtype=None):
        self.name = name or type(self).__name__.lower()
        self.dtype = dtype
        self.reset_state()

    def __call__(self, y_true, y_pred, sample_weight=None) -> float:
        self.update_state(y_true, y_pred, sample_weight=sample_weight)
        return self.result()

    def update_state(self, y_true, y_pred, sample_weight=None):
        raise NotImplementedError

    def result(self) -> float:
        raise NotImplementedError

    def reset_state(self):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


def _on_device(state, like):
    """``state`` moved to ``like``'s device (a model moved between CPU and GPU mid-stream)."""
    return backend.to_device(state, backend.device_of(like))


class PixelAccuracy(Metric):
    """sum_i w_i [pred_i == true_i] / sum_i w_i over all pixels seen (ignore_class left out).

    Keras' (Sparse)CategoricalAccuracy on masks; "accuracy" in ``metrics.get``. 0 before any data.
    """

    def __init__(self, ignore_class=None, from_logits=False, threshold=None,
                 name="pixel_accuracy", dtype=None):
        self.ignore_class = ignore_class
        self.from_logits = bool(from_logits)
        self.threshold = threshold
        super().__init__(name=name, dtype=dtype)

    state_names = ("_correct", "_total")      # sums: added over ranks by minicnn.distributed

    def reset_state(self):
        self._correct = None       # 0-d float64 arrays on the data's device
        self._total = None

    def update_state(self, y_true, y_pred, sample_weight=None):
        where = type(self).__name__
        true, pred, _ = predicted_ids(y_true, y_pred, self.from_logits, self.threshold, where)
        xp = backend.get_array_module(pred)
        w = pixel_weights(sample_weight, true.shape, xp, where)
        if self.ignore_class is not None:
            valid = (true != self.ignore_class).astype(xp.float64)
            w = valid if w is None else w * valid
        hits = (pred == true).astype(xp.float64)
        correct = (hits if w is None else hits * w).sum()
        total = xp.asarray(float(true.size)) if w is None else w.sum()
        if self._correct is None:
            self._correct, self._total = correct, total
        else:
            self._correct = _on_device(self._correct, correct) + correct
            self._total = _on_device(self._total, total) + total

    def result(self) -> float:
        if self._total is None:
            return 0.0
        total = float(self._total)
        return float(self._correct) / total if total else 0.0

    def get_config(self):
        return {**super().get_config(), "ignore_class": self.ignore_class,
                "from_logits": self.from_logits, "threshold": self.threshold}


class _ConfusionMatrixMetric(Metric):
    """Accumulates cm[true, pred] (rows: true class, columns: predicted), weighted, on device."""

    def __init__(self, num_classes=None, ignore_class=None, from_logits=False, threshold=None,
                 name=None, dtype=None):
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1
                                        or int(num_classes) != num_classes):
            raise ValueError(f"{type(self).__name__}: num_classes must be a positive int, "
                             f"got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.ignore_class = ignore_class
        self.from_logits = bool(from_logits)
        self.threshold = threshold
        super().__init__(name=name, dtype=dtype)

    state_names = ("_cm",)

    def reset_state(self):
        self._cm = None

    def update_state(self, y_true, y_pred, sample_weight=None):
        where = type(self).__name__
        true, pred, seen = predicted_ids(y_true, y_pred, self.from_logits, self.threshold, where)
        xp = backend.get_array_module(pred)
        if self.num_classes is None:
            if seen is None:
                raise ValueError(f"{where}: y_pred holds integer masks, so num_classes cannot be "
                                 "inferred; pass num_classes=")
            self.num_classes = int(seen)
        n = self.num_classes
        if seen is not None and seen != n:
            shape = tuple(_as_array(y_pred).shape)
            raise ValueError(f"{where}: y_pred has {seen} classes (shape {shape}) but "
                             f"num_classes={n}")
        w = pixel_weights(sample_weight, true.shape, xp, where)
        if self.ignore_class is not None:
            ignored = true == self.ignore_class
            valid = (~ignored).astype(xp.float64)
            w = valid if w is None else w * valid
            true = xp.where(ignored, 0, true)
            pred = xp.where(ignored, 0, pred)
        bad_true = (true < 0) | (true >= n)
        bad_pred = (pred < 0) | (pred >= n)
        if bool((bad_true | bad_pred).any()):                # one device -> host read
            which, ids = ("y_true", true[bad_true]) if bool(bad_true.any()) else \
                ("y_pred", pred[bad_pred])
            raise ValueError(f"{where}: {which} holds class id {int(backend.to_numpy(ids)[0])}, "
                             f"outside [0, {n}) (num_classes={n})")
        index = (true * n + pred).ravel()
        counts = pair_counts(index, None if w is None else w.ravel(), n * n).reshape(n, n)
        self._cm = counts if self._cm is None else _on_device(self._cm, counts) + counts

    def confusion_matrix(self) -> np.ndarray:
        """(C, C) host copy; rows are true classes, columns predicted ones."""
        if self._cm is None:
            n = self.num_classes or 0
            return np.zeros((n, n))
        return np.array(backend.to_numpy(self._cm), dtype=np.float64)

    def _parts(self):
        cm = self.confusion_matrix()
        tp = np.diag(cm)
        return tp, cm.sum(axis=1) - tp, cm.sum(axis=0) - tp   # tp, false negatives, false positives

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes,
                "ignore_class": self.ignore_class, "from_logits": self.from_logits,
                "threshold": self.threshold}


class MeanIoU(_ConfusionMatrixMetric):
    """Mean over classes of IoU_c = TP_c / (TP_c + FP_c + FN_c).  Keras: MeanIoU.

    As Keras' ``result``: classes with TP + FP + FN = 0 (in neither mask) are left out of the
    mean, IoU_c = TP / (denominator + 1e-7) and mean = sum / (valid classes + 1e-7).
    ``per_class()`` gives the exact IoU of each class, NaN for a class left out.
    num_classes=None: taken from y_pred's class axis at the first update.
    """

    def __init__(self, num_classes=None, ignore_class=None, from_logits=False, threshold=None,
                 name="mean_iou", dtype=None):
        super().__init__(num_classes, ignore_class, from_logits, threshold, name, dtype)

    def per_class(self) -> np.ndarray:
        tp, fn, fp = self._parts()
        denominator = tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, tp / denominator, np.nan)

    def result(self) -> float:
        tp, fn, fp = self._parts()
        denominator = tp + fp + fn
        if denominator.size == 0:
            return 0.0
        valid = np.sum(denominator > 1e-9)
        iou = tp / (denominator + EPSILON)
        return float(np.sum(iou) / (valid + EPSILON))


class DiceCoefficient(_ConfusionMatrixMetric):
    """Mean over classes of Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c) (the F1 score of class c).

    Classes in neither mask (2 TP + FP + FN = 0) are left out of the mean, the MeanIoU rule;
    ``per_class()`` gives NaN for them. 0 before any data.
    """

    def __init__(self, num_classes=None, ignore_class=None, from_logits=False, threshold=None,
                 name="dice", dtype=None):
        super().__init__(num_classes, ignore_class, from_logits, threshold, name, dtype)

    def per_class(self) -> np.ndarray:
        tp, fn, fp = self._parts()
        denominator = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * tp / denominator, np.nan)

    def result(self) -> float:
        scores = self.per_class()
        present = ~np.isnan(scores)
        return float(scores[present].mean()) if present.any() else 0.0


_CLASSES = {cls.__name__: cls for cls in (PixelAccuracy, MeanIoU, DiceCoefficient)}
_ALIASES = {
    "pixel_accuracy": PixelAccuracy, "accuracy": PixelAccuracy, "acc": PixelAccuracy,
    "sparse_categorical_accuracy": PixelAccuracy,
    "mean_iou": MeanIoU, "iou": MeanIoU, "miou": MeanIoU,
    "dice": DiceCoefficient, "dice_coefficient": DiceCoefficient,
}


def get(identifier, **kwargs):
    """A metric from a name ("pixel_accuracy", "accuracy", "mean_iou", "dice"), a class, a config
    dict, a Metric (returned as is) or a callable. A metric named by an alias is named as asked
    (so logs say "accuracy" when asked for "accuracy"); ``kwargs`` go to its constructor."""
    if isinstance(identifier, str) and identifier not in _CLASSES:
        kwargs.setdefault("name", identifier)
    return resolve(identifier, "metric", Metric, _CLASSES, _ALIASES, **kwargs)


def serialize(metric) -> dict:
    """{"class_name": ..., "config": ...} for a built-in metric."""
    if not isinstance(metric, Metric):
        raise TypeError(f"metrics.serialize: expected a Metric, got {type(metric).__name__}")
    return {"class_name": type(metric).__name__, "config": metric.get_config()}
