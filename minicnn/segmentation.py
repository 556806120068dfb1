"""Instance segmentation from semantic outputs, and the object-level metrics of the 2018 Data Science Bowl.

Training targets, from an instance map ``labels`` (H, W) int (0 background, one positive id per object):
``classes_from_instances`` the 3-class mask (0 background, 1 interior, 2 border; Ronneberger et al.,
2015), ``unet_weight_map`` the U-Net paper's per-pixel loss weights, ``distance_target`` each object's
normalised distance transform (for a regression head).

Instances from predictions (all (H, W) -> instance map (H, W) int64, 0 background, ids 1..K):
``instances`` (3-class argmax: interior blobs grown over their border), ``instances_from_two_class``
(connected components of a 2-class mask), ``watershed_instances`` (marker-based watershed of
probability maps, thresholds as arguments); ``flip_average`` averages a predictor over the 8 flips
and transposes of its input (test-time augmentation).

Metrics compare two instance maps (H, W): ``match_instances`` gives the IoU of every (true, predicted)
pair, ``instance_counts`` the TP / FP / FN at each IoU threshold (optionally leaving some true objects
out of the score), ``match_counts`` / ``f1_at`` / ``mean_average_precision`` one score each, and
``scores_from_counts`` both scores from (pooled) counts. The DSB 2018 score (Caicedo et al., Nature
Methods 16, 2019) is the mean over thresholds t = 0.5, 0.55, ..., 0.95 of TP(t) / (TP(t) + FP(t) + FN(t)),
a pair matching when its IoU is strictly above t.

Pure NumPy / SciPy on host arrays; CuPy inputs are copied to the host first.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, optimize

from kernels.backend import to_numpy

BACKGROUND, INTERIOR, BORDER = 0, 1, 2
DSB_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))   # 0.5, 0.55, ..., 0.95
EIGHT = np.ones((3, 3), dtype=bool)                                 # 8-connectivity


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


# --------------------------------------------------------------------------- training targets

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


def unet_weight_map(labels, w0: float = 10.0, sigma: float = 5.0, classes=None,
                    class_weight=None) -> np.ndarray:
    """Per-pixel loss weights (H, W) float64 of the U-Net paper (Ronneberger et al. 2015, eq. 2):

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

    labels: instance map (H, W). d1, d2: Euclidean distances from x to the nearest and the second
    nearest object (0 inside an object: inside object k, d1 = 0 and d2 is the distance to the closest
    other object, so where two objects touch w is about w_c + w0; in a narrow gap between two objects
    too). w_c(x) = class_weight[classes[x]], classes (H, W) default ``labels > 0`` (0 background,
    1 object), class_weight default 1 for every class. A term whose d2 exceeds 4 sigma is left out
    (it is below w0 * exp(-8)); so is the term of a pixel with fewer than two objects that near.
    """
    labels = _label_map(labels, "unet_weight_map", "labels")
    if not (sigma > 0 and w0 >= 0):
        raise ValueError(f"unet_weight_map: need sigma > 0 and w0 >= 0, got sigma={sigma}, w0={w0}")
    classes = (labels > 0).astype(np.int64) if classes is None else _label_map(
        classes, "unet_weight_map", "classes")
    if classes.shape != labels.shape:
        raise ValueError(f"unet_weight_map: classes {classes.shape} must have the shape of "
                         f"labels {labels.shape}")
    if class_weight is None:
        class_weight = np.ones(int(classes.max()) + 1)
    class_weight = np.asarray(class_weight, dtype=np.float64)
    if class_weight.ndim != 1 or len(class_weight) <= classes.max():
        raise ValueError(f"unet_weight_map: class_weight needs one value per class "
                         f"(0..{classes.max()}), got shape {class_weight.shape}")
    cutoff = 4.0 * float(sigma)
    reach = int(np.ceil(cutoff))
    d1 = np.full(labels.shape, np.inf)
    d2 = np.full(labels.shape, np.inf)
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        window = tuple(slice(max(b.start - reach, 0), b.stop + reach) for b in box)
        dk = ndimage.distance_transform_edt(labels[window] != index + 1)   # 0 inside the object
        dk[dk > cutoff] = np.inf                    # pixels outside the window are farther still
        near, second = d1[window], d2[window]
        d2[window] = np.minimum(second, np.maximum(near, dk))
        d1[window] = np.minimum(near, dk)
    term = np.zeros(labels.shape)
    both = np.isfinite(d2)
    term[both] = w0 * np.exp(-((d1[both] + d2[both]) ** 2) / (2.0 * sigma * sigma))
    return class_weight[classes] + term


def distance_target(labels) -> np.ndarray:
    """Normalised distance transform (H, W) float64 in [0, 1] of an instance map (H, W).

    Inside object k: the Euclidean distance to the nearest pixel not in k (another object or the
    background; pixels off the image edge do not count), divided by its maximum over k, so each
    object peaks at 1 at its centre and falls to 1 / max at its rim; 0 on the background. A target
    for a distance-regression head whose peaks are the watershed's markers.
    """
    labels = _label_map(labels, "distance_target", "labels")
    target = np.zeros(labels.shape)
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        window = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
        inside = labels[window] == index + 1
        if inside.all():                             # nothing else in sight: a flat target
            target[window] = 1.0
            continue
        distance = ndimage.distance_transform_edt(inside)
        target[window] = np.where(inside, distance / distance.max(), target[window])
    return target


# --------------------------------------------------------------------------- instances from predictions

_NEIGHBOURS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def _shifted(array: np.ndarray, dr: int, dc: int, fill):
    """out[r, c] = array[r + dr, c + dc], ``fill`` where that falls off the image."""
    out = np.full_like(array, fill)
    h, w = array.shape
    out[max(-dr, 0):h - max(dr, 0), max(-dc, 0):w - max(dc, 0)] = \
        array[max(dr, 0):h - max(-dr, 0), max(dc, 0):w - max(-dc, 0)]
    return out


def _grow(labels: np.ndarray, allowed: np.ndarray, max_steps: int | None = None, value=None) -> int:
    """Grow labelled objects (in place) into unlabelled ``allowed`` pixels, one 8-neighbour step at a
    time (a geodesic dilation inside ``allowed``) until none is reached or after ``max_steps``.
    A pixel reached by two objects in the same step joins, without ``value``, the higher id; with a
    ``value`` map (H, W), the object of its labelled neighbour of highest value (the steepest way
    up the marker map, so neither basin gains ground on the other). Returns the number of steps."""
    steps = 0
    while max_steps is None or steps < max_steps:
        free = allowed & (labels == 0)
        if not free.any():
            break
        if value is None:
            reached = ndimage.maximum_filter(labels, footprint=EIGHT, mode="constant", cval=0)
        else:
            reached, best = np.zeros_like(labels), np.full(labels.shape, -np.inf)
            for dr, dc in _NEIGHBOURS:
                neighbour = _shifted(labels, dr, dc, 0)
                height = _shifted(value, dr, dc, -np.inf)
                better = (neighbour > 0) & (height > best)
                reached[better], best[better] = neighbour[better], height[better]
        grow = free & (reached > 0)
        if not grow.any():
            break
        labels[grow] = reached[grow]
        steps += 1
    return steps


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
    _grow(labels, border, max_grow)
    orphans, _ = ndimage.label(border & (labels == 0), structure=EIGHT)
    labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    return _drop_small(labels, min_size)


def instances_from_two_class(mask, min_size: int = 16) -> np.ndarray:
    """Instance map (H, W) int64 from a 2-class mask (H, W) or scores (H, W, 2): the 4-connected
    components of the foreground (class 1), those under ``min_size`` pixels dropped. Touching objects merge.
    """
    classes = _class_map(mask, 2, "instances_from_two_class")
    labels, _ = ndimage.label(classes == 1)
    return _drop_small(labels, min_size)


def _probability_map(values, name: str, arg: str) -> np.ndarray:
    values = to_numpy(values)
    if values.ndim != 2:
        raise ValueError(f"{name}: {arg} must be a 2-D (H, W) map, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise TypeError(f"{name}: {arg} must be a float map, got dtype {values.dtype}")
    return values


def watershed_instances(foreground, markers, fg_threshold: float = 0.5,
                        marker_threshold: float = 0.5, min_size: int = 16,
                        levels: int = 16) -> np.ndarray:
    """Instance map (H, W) int64 by a marker-based watershed of two maps (H, W) in [0, 1].

    foreground: probability of an object pixel (e.g. 1 - p(background)); markers: high at object
    centres (p(interior) of a 3-class net, or a predicted ``distance_target``).
    1. mask = foreground > fg_threshold; seeds = 4-connected components of
       mask & (markers > marker_threshold);
    2. flooding (Beucher & Meyer's watershed, by immersion): elevation = 1 - markers, cut into
       ``levels`` equal steps; at step l every seed grows, one 8-neighbour step at a time, into
       the unlabelled mask pixels whose step is <= l, until none is reached. Neighbouring basins
       so meet on the ridge of the marker map, and on a plateau half-way (a geodesic split);
       a pixel two basins reach in the same step joins its labelled neighbour of highest marker
       value (the steepest way up);
    3. mask components that hold no seed become objects of their own;
    4. objects under ``min_size`` pixels are dropped; the rest are numbered 1..K.
    (scipy.ndimage.watershed_ift is not used: it floods the wrong basin on simple inputs, e.g.
    a 1-D profile 3 2 1 0 1 2 3 3 2 1 0 1 2 3 with a marker in each minimum.)
    """
    name = "watershed_instances"
    foreground = _probability_map(foreground, name, "foreground")
    markers = _probability_map(markers, name, "markers")
    if foreground.shape != markers.shape:
        raise ValueError(f"{name}: foreground {foreground.shape} and markers {markers.shape} "
                         "must have the same shape")
    if int(levels) != levels or levels < 1:
        raise ValueError(f"{name}: levels must be an int >= 1, got {levels!r}")
    mask = foreground > fg_threshold
    labels, _ = ndimage.label(mask & (markers > marker_threshold))
    step = np.clip(np.floor((1.0 - markers) * levels), 0, levels - 1).astype(np.int64)
    value = markers.astype(np.float64)
    for level in range(int(levels)):
        _grow(labels, mask & (step <= level), value=value)
    orphans, _ = ndimage.label(mask & (labels == 0))
    labels[orphans > 0] = orphans[orphans > 0] + labels.max()
    return _drop_small(labels, min_size)


# the 8 symmetries of the square as (transpose, flip rows, flip columns); each is its own inverse
# once the flips are undone before the transpose
_SYMMETRIES = [(t, r, c) for t in (False, True) for r in (False, True) for c in (False, True)]


def _apply_symmetry(array: np.ndarray, transpose: bool, flip_rows: bool, flip_cols: bool):
    if transpose:
        array = np.swapaxes(array, 0, 1)
    if flip_rows:
        array = array[::-1]
    if flip_cols:
        array = array[:, ::-1]
    return array


def _undo_symmetry(array: np.ndarray, transpose: bool, flip_rows: bool, flip_cols: bool):
    if flip_cols:
        array = array[:, ::-1]
    if flip_rows:
        array = array[::-1]
    if transpose:
        array = np.swapaxes(array, 0, 1)
    return array


def flip_average(predict, image, flips: int = 8) -> np.ndarray:
    """Test-time augmentation: the mean over symmetries T of T^-1(predict(T(image))).

    image: (H, W, C); predict: a function (h, w, C) -> (h, w, K) (probabilities, so their mean is
    one too). flips: how many of the 8 symmetries of the square, in the order identity, column
    flip, row flip, both, then the same four after a transpose (1: none, 4: the flips, 8: all).
    Returns (H, W, K) float32.
    """
    image = to_numpy(image)
    if image.ndim != 3:
        raise ValueError(f"flip_average: image must be (H, W, C), got shape {image.shape}")
    if flips not in (1, 2, 4, 8):
        raise ValueError(f"flip_average: flips must be 1, 2, 4 or 8, got {flips!r}")
    total = None
    for symmetry in _SYMMETRIES[:flips]:
        out = np.asarray(predict(np.ascontiguousarray(_apply_symmetry(image, *symmetry))))
        out = _undo_symmetry(out, *symmetry)
        if out.shape[:2] != image.shape[:2] or out.ndim != 3:
            raise ValueError(f"flip_average: predict must return (h, w, K) for an input (h, w, C); "
                             f"image {image.shape} gave {out.shape} after undoing the flip")
        total = out.astype(np.float64) if total is None else total + out
    return (total / flips).astype(np.float32)


# --------------------------------------------------------------------------- metrics

def _consecutive(labels: np.ndarray):
    """(ids, index): ids = sorted positive labels; index = 0 for background, k + 1 for ids[k]."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    index = np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0)
    return ids, index


def _contingency(true_labels, pred_labels, name: str):
    """(true ids, pred ids, table): table[i, j] = pixels of true index i and pred index j, index 0
    the background and k + 1 the k-th sorted id (one np.bincount over the pixel pairs)."""
    true = _label_map(true_labels, name, "true_labels")
    pred = _label_map(pred_labels, name, "pred_labels")
    if true.shape != pred.shape:
        raise ValueError(f"{name}: true_labels {true.shape} and pred_labels {pred.shape} "
                         "must have the same shape")
    true_ids, t = _consecutive(true)
    pred_ids, p = _consecutive(pred)
    n_t, n_p = len(true_ids) + 1, len(pred_ids) + 1
    table = np.bincount((t * n_p + p).ravel(), minlength=n_t * n_p).reshape(n_t, n_p)
    return true_ids, pred_ids, table


def _iou(table: np.ndarray) -> np.ndarray:
    intersection = table[1:, 1:].astype(np.float64)
    true_area = table[1:, :].sum(axis=1, keepdims=True)
    pred_area = table[:, 1:].sum(axis=0, keepdims=True)
    union = true_area + pred_area - intersection
    return intersection / np.maximum(union, 1)


def match_instances(true_labels, pred_labels) -> np.ndarray:
    """IoU matrix (n_true, n_pred) float64 of every true object against every predicted object.

    Rows follow the sorted positive ids of ``true_labels``, columns those of ``pred_labels``;
    IoU(A, B) = |A & B| / |A | B|, from one contingency table (np.bincount over pixel pairs).
    """
    return _iou(_contingency(true_labels, pred_labels, "match_instances")[2])


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


def _scored_table(true_labels, pred_labels, ignore, name: str):
    """``_contingency`` without the ignored true objects and the predictions mostly on them."""
    true_ids, pred_ids, table = _contingency(true_labels, pred_labels, name)
    ignored = np.isin(true_ids, np.asarray(list(ignore), dtype=np.int64))
    if ignored.any():
        on_ignored = table[1:][ignored].sum(axis=0)[1:]          # pixels of each prediction on them
        dropped = 2 * on_ignored > table[:, 1:].sum(axis=0)
        table = table[np.concatenate([[True], ~ignored])][:, np.concatenate([[True], ~dropped])]
        true_ids, pred_ids = true_ids[~ignored], pred_ids[~dropped]
    return true_ids, pred_ids, table


def instance_counts(true_labels, pred_labels, thresholds=DSB_THRESHOLDS, ignore=()) -> np.ndarray:
    """(T, 3) int64: (TP, FP, FN) at each of the T IoU ``thresholds`` (default 0.5, 0.55, ..., 0.95).

    true_labels, pred_labels: instance maps (H, W). A pair matches when IoU > t, one-to-one.
    ignore: ids of true objects left out of the score (e.g. nuclei mostly outside the evaluated
    band): they are neither matched nor missed, and every predicted object with more than half of
    its pixels on them is left out too (for t >= 0.5 it could match no other true object: its IoU
    with any is below 1/2). Counts of several images add up: sum them, then ``scores_from_counts``.
    """
    name = "instance_counts"
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if thresholds.ndim != 1 or thresholds.size == 0:
        raise ValueError(f"{name}: thresholds must be a non-empty 1-D list, got shape {thresholds.shape}")
    iou = _iou(_scored_table(true_labels, pred_labels, ignore, name)[2])
    return np.array([_counts_from_iou(iou, _check_threshold(t, name)) for t in thresholds],
                    dtype=np.int64).reshape(-1, 3)


def matches(true_labels, pred_labels, threshold: float = 0.5, ignore=()):
    """Who matched whom at an IoU threshold >= 0.5, for pictures and error lists:
    (pairs (M, 2) int64 of (true id, predicted id), missed true ids, false predicted ids), with
    ``ignore`` as in ``instance_counts`` (ignored objects appear in none of the three)."""
    threshold = _check_threshold(threshold, "matches")
    if threshold < 0.5:
        raise ValueError(f"matches: threshold must be >= 0.5 (one-to-one without an assignment), "
                         f"got {threshold}")
    true_ids, pred_ids, table = _scored_table(true_labels, pred_labels, ignore, "matches")
    rows, cols = np.nonzero(_iou(table) > threshold)
    pairs = np.stack([true_ids[rows], pred_ids[cols]], axis=1).astype(np.int64).reshape(-1, 2)
    return pairs, np.setdiff1d(true_ids, pairs[:, 0]), np.setdiff1d(pred_ids, pairs[:, 1])


def scores_from_counts(counts):
    """(F1 at the first threshold, mean average precision) from (T, 3) (TP, FP, FN) counts, as made
    by ``instance_counts`` (or their sum over images, which pools the objects of all of them).

    F1 = 2 TP / (2 TP + FP + FN); AP(t) = TP / (TP + FP + FN); a threshold with no true and no
    predicted object scores 1.0 in both.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != 3 or counts.shape[0] == 0:
        raise ValueError(f"scores_from_counts: counts must be (T, 3) (TP, FP, FN) rows, got shape "
                         f"{counts.shape}")
    tp, fp, fn = (counts[:, k].astype(np.float64) for k in range(3))
    f1_total, ap_total = 2 * tp + fp + fn, tp + fp + fn
    f1 = np.where(f1_total > 0, 2 * tp / np.maximum(f1_total, 1), 1.0)
    ap = np.where(ap_total > 0, tp / np.maximum(ap_total, 1), 1.0)
    return float(f1[0]), float(ap.mean())


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

    thresholds: default 0.5, 0.55, ..., 0.95 (``DSB_THRESHOLDS``), as the 2018 Data Science Bowl
    defined it. A threshold with no true and no predicted object scores 1.0.
    """
    counts = instance_counts(true_labels, pred_labels,
                             DSB_THRESHOLDS if thresholds is None else thresholds)
    return scores_from_counts(counts)[1]
