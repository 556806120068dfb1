"""Instance segmentation from semantic outputs, and the object-level metrics of the 2018 Data Science Bowl.

A 3-class U-Net output (0 background, 1 nucleus interior, 2 nucleus border; Ronneberger et al., 2015)
tells touching nuclei apart: the border band lies between them. ``instances`` labels each interior
blob and grows it back over its border; ``classes_from_instances`` goes the other way and makes the
3-class training mask from an instance map.

Metrics compare two instance maps (H, W) of ints, 0 = background, any positive id per object:
``match_instances`` gives the IoU of every (true, predicted) pair, ``match_counts`` the TP / FP / FN at
an IoU threshold, ``f1_at`` the object F1 and ``mean_average_precision`` the DSB 2018 score
(Caicedo et al., Nature Methods 16, 2019): the mean over thresholds t = 0.5, 0.55, ..., 0.95 of
TP(t) / (TP(t) + FP(t) + FN(t)), a pair matching when its IoU is strictly above t.

Pure NumPy / SciPy on host arrays; CuPy inputs are copied to the host first.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize

from kernels.backend import to_numpy

BACKGROUND, INTERIOR, BORDER = 0, 1, 2


# --------------------------------------------------------------------------- input checks

def _label_map(labels, name: str, arg: str) -> np.ndarray:
    """A host (H, W) int64 copy of an instance/class map, or a ValueError/TypeError naming ``name``."""
    labels = to_numpy(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name}: {arg} must be a 2-D (H, W) label map, got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name}: {arg} must hold integer labels, got dtype {labels.dtype} "
                        f"(shape {labels.shape})")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name}: {arg} must hold labels >= 0, got minimum {labels.min()}")
    return labels


def _class_map(pred, num_classes: int, name: str) -> np.ndarray:
    """(H, W) class ids from a class map (H, W) or class scores (H, W, num_classes) (argmax)."""
    pred = to_numpy(pred)
    if pred.ndim == 3:
        if pred.shape[-1] != num_classes:
            raise ValueError(f"{name}: class scores must have shape (H, W, {num_classes}), "
                             f"got {pred.shape}")
        return np.argmax(pred, axis=-1).astype(np.int64)
    classes = _label_map(pred, name, "pred_mask")
    if classes.size and classes.max() >= num_classes:
        raise ValueError(f"{name}: pred_mask must hold class ids 0..{num_classes - 1}, "
                         f"got maximum {classes.max()} (shape {classes.shape})")
    return classes


def _disk(radius: int) -> np.ndarray:
    """Boolean footprint of the pixels within Euclidean distance ``radius`` of the centre."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return y * y + x * x <= radius * radius


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects with fewer than ``min_size`` pixels and renumber the rest 1..K (in id order)."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(int(min_size), 1)
    keep[0] = False
    new_ids = np.zeros(len(sizes), dtype=np.int64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[labels]


# --------------------------------------------------------------------------- classes <-> instances

def classes_from_instances(labels, border_width: int = 2) -> np.ndarray:
    """3-class mask (H, W) int64 from an instance map (H, W): 0 background, 1 interior, 2 border.

    A pixel of object L is border when some pixel q with label(q) != L (background included) lies
    within Euclidean distance ``border_width`` of it: max and min of the labels over that disk
    differ. Pixels off the image edge count as copies of the edge (an image edge is not a border).
    Two touching objects therefore keep interiors at least ``2 * border_width`` pixels apart, so their
    interiors are never connected, even 8-connected (U-Net paper, Ronneberger et al. 2015, sec. 3).
    """
    labels = _label_map(labels, "classes_from_instances", "labels")
    if int(border_width) != border_width or border_width < 1:
        raise ValueError(f"classes_from_instances: border_width must be an int >= 1, got {border_width!r}")
    disk = _disk(int(border_width))
    highest = ndimage.maximum_filter(labels, footprint=disk, mode="nearest")
    lowest = ndimage.minimum_filter(labels, footprint=disk, mode="nearest")
    foreground = labels > 0
    classes = np.where(foreground, INTERIOR, BACKGROUND).astype(np.int64)
    classes[foreground & (highest != lowest)] = BORDER
    return classes


def instances(pred_mask, min_size: int = 16, max_grow: int | None = None) -> np.ndarray:
    """Instance map (H, W) int64 from a 3-class mask (H, W) or class scores (H, W, 3).

    1. interior blobs: connected components (4-connected) of class 1;
    2. growth: each blob takes over the border pixels (class 2) it reaches through border pixels,
       one 8-neighbour step at a time (a geodesic dilation inside the border, ``max_grow`` steps at
       most, default unlimited); where two blobs reach a pixel in the same step the higher id wins;
    3. border pixels no blob reaches (e.g. a nucleus too small to have an interior) form objects of
       their own, one per 8-connected piece;
    4. objects smaller than ``min_size`` pixels are dropped; the rest are numbered 1..K.
    """
    classes = _class_map(pred_mask, 3, "instances")
    labels, _ = ndimage.label(classes == INTERIOR)
    border = classes == BORDER
    eight = np.ones((3, 3), dtype=bool)
    steps = 0
    while max_grow is None or steps < max_grow:
        free = border & (labels == 0)
        reached = ndimage.grey_dilation(labels, footprint=eight, mode="constant", cval=0)
        grow = free & (reached > 0)
        if not grow.any():
            break
        labels[grow] = reached[grow]
        steps += 1
    orphans, _ = ndimage.label(border & (labels == 0), structure=eight)
    labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    return _drop_small(labels, min_size)


def instances_from_two_class(mask, min_size: int = 16) -> np.ndarray:
    """Instance map (H, W) int64 from a 2-class mask (H, W) or scores (H, W, 2): the 4-connected
    components of the foreground (class 1), those under ``min_size`` pixels dropped. Touching objects merge.
    """
    classes = _class_map(mask, 2, "instances_from_two_class")
    labels, _ = ndimage.label(classes == 1)
    return _drop_small(labels, min_size)


# --------------------------------------------------------------------------- metrics

def _consecutive(labels: np.ndarray):
    """(ids, index): ids = sorted positive labels; index = 0 for background, k + 1 for ids[k]."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    index = np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0)
    return ids, index


def match_instances(true_labels, pred_labels) -> np.ndarray:
    """IoU matrix (n_true, n_pred) float64 of every true object against every predicted object.

    Rows follow the sorted positive ids of ``true_labels``, columns those of ``pred_labels``;
    IoU(A, B) = |A & B| / |A | B|, from one contingency table (np.bincount over pixel pairs).
    """
    true = _label_map(true_labels, "match_instances", "true_labels")
    pred = _label_map(pred_labels, "match_instances", "pred_labels")
    if true.shape != pred.shape:
        raise ValueError(f"match_instances: true_labels {true.shape} and pred_labels {pred.shape} "
                         "must have the same shape")
    true_ids, t = _consecutive(true)
    pred_ids, p = _consecutive(pred)
    n_t, n_p = len(true_ids) + 1, len(pred_ids) + 1
    table = np.bincount((t * n_p + p).ravel(), minlength=n_t * n_p).reshape(n_t, n_p)
    intersection = table[1:, 1:].astype(np.float64)
    true_area = table[1:, :].sum(axis=1, keepdims=True)
    pred_area = table[:, 1:].sum(axis=0, keepdims=True)
    union = true_area + pred_area - intersection
    return intersection / np.maximum(union, 1)


def _check_threshold(threshold, name: str) -> float:
    threshold = float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{name}: threshold must be in [0, 1), got {threshold}")
    return threshold


def _counts_from_iou(iou: np.ndarray, threshold: float):
    """(TP, FP, FN) from an IoU matrix: a true/pred pair matches when IoU > threshold, one-to-one."""
    n_true, n_pred = iou.shape
    hits = iou > threshold
    if threshold >= 0.5:
        # IoU > 0.5 with two disjoint objects is impossible, so the matches are already one-to-one
        tp = int(hits.sum())
    elif hits.any():
        rows, cols = optimize.linear_sum_assignment(hits, maximize=True)
        tp = int(hits[rows, cols].sum())
    else:
        tp = 0
    return tp, n_pred - tp, n_true - tp


def match_counts(true_labels, pred_labels, threshold: float = 0.5):
    """(TP, FP, FN) at an IoU threshold: TP = pairs with IoU > threshold matched one-to-one
    (a maximum matching when threshold < 0.5), FP = unmatched predictions, FN = unmatched true objects."""
    threshold = _check_threshold(threshold, "match_counts")
    return _counts_from_iou(match_instances(true_labels, pred_labels), threshold)


def f1_at(true_labels, pred_labels, threshold: float = 0.5) -> float:
    """Object-level F1 = 2 TP / (2 TP + FP + FN) at an IoU threshold; 1.0 when both maps are empty."""
    threshold = _check_threshold(threshold, "f1_at")
    tp, fp, fn = _counts_from_iou(match_instances(true_labels, pred_labels), threshold)
    total = 2 * tp + fp + fn
    return 1.0 if total == 0 else 2 * tp / total


def mean_average_precision(true_labels, pred_labels, thresholds=None) -> float:
    """DSB 2018 score: mean over thresholds t of TP(t) / (TP(t) + FP(t) + FN(t)).

    thresholds: default np.arange(0.5, 1.0, 0.05) (0.5, 0.55, ..., 0.95), as the 2018 Data Science
    Bowl defined it. A threshold with no true and no predicted object scores 1.0.
    """
    if thresholds is None:
        thresholds = np.arange(0.5, 1.0, 0.05)
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if thresholds.ndim != 1 or thresholds.size == 0:
        raise ValueError(f"mean_average_precision: thresholds must be a non-empty 1-D list, "
                         f"got shape {thresholds.shape}")
    iou = match_instances(true_labels, pred_labels)
    scores = []
    for t in thresholds:
        tp, fp, fn = _counts_from_iou(iou, _check_threshold(t, "mean_average_precision"))
        total = tp + fp + fn
        scores.append(1.0 if total == 0 else tp / total)
    return float(np.mean(scores))
