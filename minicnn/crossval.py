"""``minicnn train --task instances``: nuclei instances, cross-validated over bands of rows.

    minicnn train --task instances              # one fold: train rows 0..383, val 384..447, test 448..511
    minicnn train --task instances --folds 4    # 4 models, each tested on its own band of 128 rows

Per fold (``minicnn.data.band_folds``): train a U-Net on random crops of the fold's training rows
only; after each epoch re-estimate the batch-norm statistics and score instances on the validation
band (a log; with --tune it also chooses the post-processing thresholds); then
segment the test band, never seen in training, and count TP / FP / FN at IoU 0.5, 0.55, ..., 0.95
over the nuclei scored in that band (``minicnn.data.objects_in_band``: a nucleus cut by a band edge
is scored in the band holding most of its pixels, on that band's crop of the label map). The counts
of the folds are pooled: the cross-validated F1@0.5 and mean AP count every nucleus once.

The recipe, one flag per idea (defaults first; each measured in benchmarks/RESULTS.md):
    --head border-distance  3 classes (background / interior / border; Ronneberger et al. 2015)
                            + a regression of the normalised distance transform (4 outputs);
                            watershed markers = mean of p(interior) and the distance
           border           the 3 classes only; markers = p(interior)
           distance         2 classes + the distance regression; markers = the distance
           mask             2 classes (the baseline)
    --border-weight 10 w0 of the U-Net weight map (sigma --border-sigma 5); 0: plain cross-entropy
    --postprocess watershed (marker-based, ``segmentation.watershed_instances``) for the distance
                  heads, grow (3-class argmax, interiors grown over the border) for --head border,
                  components (connected components of the foreground) for --head mask
    --flips 8          test-time flips and transposes averaged (``segmentation.flip_average``)
    --no-tune/--tune   fixed thresholds (0.5, 0.5, 16 px) or chosen on the validation band
"""
from __future__ import annotations

import itertools
import os
import time

import numpy as np

from minicnn import segmentation as seg
from minicnn.callbacks import Callback

HEAD_CLASSES = {"mask": 2, "border": 3, "distance": 2, "border-distance": 3}
HAS_DISTANCE = ("distance", "border-distance")     # heads with a distance-regression channel
POSTPROCESS_HEADS = {"components": tuple(HEAD_CLASSES), "grow": ("border", "border-distance"),
                     "watershed": ("border", "distance", "border-distance")}
DEFAULTS = {"fg_threshold": 0.5, "marker_threshold": 0.5, "min_size": 16}
GRID = {"fg_threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
        "marker_threshold": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
        "min_size": (8, 16, 32)}
TUNED = {"components": ("fg_threshold", "min_size"), "grow": ("min_size",),
         "watershed": ("fg_threshold", "marker_threshold", "min_size")}
DISTANCE_WEIGHT = 1.0          # weight of the distance head's squared error against the cross-entropy
CSV_COLUMNS = ("fold", "test_rows", "val_rows", "nuclei", "tp", "fp", "fn", "f1@0.5", "mean_ap",
               "fg_threshold", "marker_threshold", "min_size", "wall_s", "cpu_s")


# -- targets and batches ----------------------------------------------------------------------------
def targets(labels, args) -> np.ndarray:
    """Training targets (H, W, K) float32 of the whole instance map (H, W): class ids (channel 0),
    the per-pixel loss weight (1), and for the distance head the normalised distance (2)."""
    classes = (seg.classes_from_instances(labels) if HEAD_CLASSES[args.head] == 3
               else (labels > 0).astype(np.int64))
    weight = (seg.unet_weight_map(labels, w0=args.border_weight, sigma=args.border_sigma, classes=classes)
              if args.border_weight > 0 else np.ones(labels.shape))
    maps = [classes, weight] + ([seg.distance_target(labels)] if args.head in HAS_DISTANCE else [])
    return np.stack(maps, axis=-1).astype(np.float32)


def augmenter():
    from minicnn import data
    return data.ImageDataGenerator(rotation_range=15, zoom_range=0.1, horizontal_flip=True,
                                   vertical_flip=True, brightness_range=(0.8, 1.2), fill_mode="reflect")


def fold_batches(image, target, fold, args, seed):
    """Endless (x (B, c, c, 1), y, weight (B, c, c)) crops of the fold's training rows; y is the class
    ids (B, c, c), or (B, c, c, 2) class ids and distance for the distance head."""
    from minicnn import data
    stream = data.random_crops(image, target, args.crop, args.batch_size, seed=seed,
                               augmenter=augmenter() if args.augment else None, rows=fold.train)
    for x, y in stream:
        classes = y[..., 0].astype(np.int64)
        weight = y[..., 1] if args.border_weight > 0 else None
        yield x, (y[..., [0, 2]] if args.head in HAS_DISTANCE else classes), weight


class DistanceHeadLoss:
    """Loss of a head with a distance channel: sparse cross-entropy of the first ``classes``
    channels (class logits, weighted by ``sample_weight`` (N, H, W)) + ``distance_weight`` * the mean
    squared error between sigmoid(last channel) and the normalised distance.
    y_true: (N, H, W, 2) = class id, distance; y_pred: (N, H, W, classes + 1) logits."""

    def __init__(self, classes: int = 2, distance_weight: float = DISTANCE_WEIGHT):
        from minicnn import losses
        self.classes, self.distance_weight = int(classes), float(distance_weight)
        self.cross_entropy = losses.SparseCategoricalCrossentropy(from_logits=True)
        self.squared_error = losses.MeanSquaredError()

    def __call__(self, y_true, y_pred, sample_weight=None):
        from minicnn.functions import sigmoid
        from minicnn.tensor import Tensor
        y_true = y_true.data if isinstance(y_true, Tensor) else y_true
        c = self.classes
        ce = self.cross_entropy(y_true[..., 0], y_pred[..., :c], sample_weight=sample_weight)
        return ce + self.distance_weight * self.squared_error(y_true[..., 1:2],
                                                              sigmoid(y_pred[..., c:c + 1]))


# -- prediction and post-processing -----------------------------------------------------------------
def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def head_probabilities(logits: np.ndarray, head: str) -> np.ndarray:
    """(H, W, K) logits -> probabilities: the softmax of the classes; for the distance head
    (p(background), p(nucleus), sigmoid(distance channel))."""
    if head in HAS_DISTANCE:
        return np.concatenate([_softmax(logits[..., :-1]), 1 / (1 + np.exp(-logits[..., -1:]))], axis=-1)
    return _softmax(logits)


def probabilities(model, image, head: str, flips: int) -> np.ndarray:
    """(H, W, K) probabilities of a band image (H, W, 1): the whole band in one window, averaged
    over ``flips`` flips / transposes."""
    from minicnn.models.unet import predict_image
    side = max(image.shape[:2])

    def predict(window):
        return head_probabilities(predict_image(model, window, tile=side), head)
    return seg.flip_average(predict, image, flips)


def segment(probs: np.ndarray, head: str, postprocess: str, fg_threshold=0.5, marker_threshold=0.5,
            min_size=16) -> np.ndarray:
    """Instance map (H, W) from the probabilities (H, W, K) of ``head_probabilities``."""
    foreground = 1.0 - probs[..., 0]
    if postprocess == "components":
        return seg.instances_from_two_class((foreground > fg_threshold).astype(np.int64), min_size)
    if postprocess == "grow":
        return seg.instances(probs[..., :3], min_size)
    if head == "border-distance":                  # mean of p(interior) and the distance
        markers = 0.5 * (probs[..., 1] + probs[..., 3])
    else:
        markers = probs[..., 1] if head == "border" else probs[..., 2]
    return seg.watershed_instances(foreground, markers, fg_threshold, marker_threshold, min_size)


def band_counts(labels, rows, predicted) -> np.ndarray:
    """(T, 3) TP / FP / FN of a band's instance map against the truth, nuclei mostly outside ignored."""
    from minicnn import data
    _, ignored = data.objects_in_band(labels, rows)
    return seg.instance_counts(labels[rows[0]:rows[1]], predicted, ignore=ignored)


def tune(probs, labels, rows, args) -> dict:
    """The post-processing parameters with the best F1@0.5 + mean AP on the band ``rows``."""
    names = TUNED[args.postprocess]
    best, chosen = -1.0, dict(DEFAULTS)
    for values in itertools.product(*(GRID[n] for n in names)):
        params = {**DEFAULTS, **dict(zip(names, values))}
        f1, ap = seg.scores_from_counts(band_counts(labels, rows, segment(
            probs, args.head, args.postprocess, **params)))
        if f1 + ap > best:
            best, chosen = f1 + ap, params
    return chosen


# -- training one fold ------------------------------------------------------------------------------
def recalibrate(model, image, target, fold, args, batches=8):
    """Batch-norm population statistics of the current weights, from training-row crops."""
    from minicnn import data, training
    stream = data.random_crops(image, target[..., 0], args.crop, args.batch_size,
                               seed=args.seed + 7, rows=fold.train)
    training.recompute_batchnorm_statistics(model, (next(stream)[0] for _ in range(batches)))


class ValidationScores(Callback):
    """After each epoch: re-estimate batch norm and log the instance F1@0.5 and mean AP of the
    validation band with the default thresholds (``val_f1``, ``val_ap``). The final weights are
    kept (the cosine schedule ends at 0): a band of 12-20 nuclei is too few to pick an epoch by,
    and the post-processing variants then share one trained model."""

    def __init__(self, image, labels, target, fold, args):
        self.image, self.labels, self.target, self.fold, self.args = image, labels, target, fold, args

    def on_epoch_end(self, epoch, logs):
        a, b = self.fold.val
        recalibrate(self.model, self.image, self.target, self.fold, self.args)
        probs = probabilities(self.model, self.image[a:b], self.args.head, 1)
        logs["val_f1"], logs["val_ap"] = seg.scores_from_counts(band_counts(
            self.labels, self.fold.val, segment(probs, self.args.head, self.args.postprocess)))


def train_fold(image, labels, target, fold, args):
    """A U-Net trained on the fold's training rows (its final weights, batch norm re-estimated after
    the last epoch). Seeded per fold (seed * 1000 + fold), so one fold repeats on its own."""
    import minicnn
    from minicnn import losses, optimizers
    from minicnn.models import UNet
    minicnn.seed(args.seed * 1000 + fold.index)
    outputs = HEAD_CLASSES[args.head] + (args.head in HAS_DISTANCE)     # class logits (+ distance)
    model = UNet(outputs, base_filters=args.base_filters, depth=args.depth,
                 padding="same")
    total = args.epochs * args.steps_per_epoch
    schedule = optimizers.CosineDecay(args.lr, total) if args.schedule == "cosine" else args.lr
    loss = (DistanceHeadLoss(HEAD_CLASSES[args.head]) if args.head in HAS_DISTANCE
            else losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(optimizer=optimizers.get(args.optimizer, learning_rate=schedule), loss=loss)
    model.build((None, args.crop, args.crop, image.shape[-1]))
    model.to(args.device)
    model.fit(lambda epoch: fold_batches(image, target, fold, args,
                                         seed=args.seed * 1000 + 100 * fold.index + epoch),
              epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
              callbacks=[ValidationScores(image, labels, target, fold, args)], verbose=2)
    return model


# -- the run ----------------------------------------------------------------------------------------
NATURAL_POSTPROCESS = {"mask": "components", "border": "grow", "distance": "watershed",
                       "border-distance": "watershed"}


def check(args) -> str | None:
    """What is wrong with flags that do not go together (one line for the CLI), or None.
    Fills in the head's own post-processing when --postprocess is not given."""
    if args.postprocess is None:
        args.postprocess = NATURAL_POSTPROCESS[args.head]
    if args.dataset != "nuclei":
        return f"--task instances works on the nuclei image, got --dataset {args.dataset}"
    if args.head not in POSTPROCESS_HEADS[args.postprocess]:
        return (f"--postprocess {args.postprocess} needs --head "
                f"{' or '.join(POSTPROCESS_HEADS[args.postprocess])}, got --head {args.head}")
    if args.padding != "same":
        return "--task instances uses --padding same (a band is predicted in one window)"
    if args.border_weight < 0 or args.border_sigma <= 0:
        return "--border-weight must be >= 0 and --border-sigma > 0"
    return None


def run(args) -> int:
    """Train and test every fold, print one row per fold and, last, the cross-validated line;
    write folds.csv, instances.npz and instances.png into args.out."""
    from minicnn import data, io
    image = data.nuclei(2, "all").image
    labels = data.nuclei_instances("all")
    target = targets(labels, args)
    folds = data.band_folds(labels.shape[0], args.folds)
    os.makedirs(args.out, exist_ok=True)
    print(f"minicnn train --task instances: {args.folds} fold(s), head {args.head}, border weight "
          f"{args.border_weight:g}, postprocess {args.postprocess}, flips {args.flips}, thresholds "
          f"{'tuned on validation' if args.tune else 'fixed'}; UNet(base_filters={args.base_filters}, "
          f"depth={args.depth}), {args.epochs} x {args.steps_per_epoch} steps of {args.batch_size} "
          f"crops {args.crop}x{args.crop}, device {args.device}")
    rows, pooled, found = [], 0, np.zeros(labels.shape, dtype=np.int64)
    marks = {"pairs": [], "missed": [], "false": []}
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    for fold in folds:
        wall, cpu = time.perf_counter(), time.process_time()
        model = train_fold(image, labels, target, fold, args)
        io.save_model(model, os.path.join(args.out, f"fold{fold.index}.npz"))
        (va, vb), (ta, tb) = fold.val, fold.test
        params = dict(DEFAULTS)
        if args.tune:
            params = tune(probabilities(model, image[va:vb], args.head, args.flips), labels, fold.val, args)
        predicted = segment(probabilities(model, image[ta:tb], args.head, args.flips), args.head,
                            args.postprocess, **params)
        predicted = np.where(predicted > 0, predicted + found.max(), 0)     # ids unique over folds
        found[ta:tb] = predicted
        counts = band_counts(labels, fold.test, predicted)
        pooled = pooled + counts
        found_marks = seg.matches(labels[ta:tb], predicted, 0.5,
                                  ignore=data.objects_in_band(labels, fold.test)[1])
        for key, value in zip(("pairs", "missed", "false"), found_marks):
            marks[key].append(value)
        f1, ap = seg.scores_from_counts(counts)
        nuclei = len(data.objects_in_band(labels, fold.test)[0])
        rows.append((fold.index, f"{ta}-{tb - 1}", f"{va}-{vb - 1}", nuclei, *counts[0], f"{f1:.4f}",
                     f"{ap:.4f}", params["fg_threshold"], params["marker_threshold"],
                     params["min_size"], f"{time.perf_counter() - wall:.1f}",
                     f"{time.process_time() - cpu:.1f}"))
        print(f"fold {fold.index}: test rows {ta}-{tb - 1} ({nuclei} nuclei)  val rows {va}-{vb - 1}  "
              f"F1@0.5 {f1:.4f}  mean AP {ap:.4f}  TP {counts[0][0]} FP {counts[0][1]} "
              f"FN {counts[0][2]}  thresholds fg {params['fg_threshold']} marker "
              f"{params['marker_threshold']} min size {params['min_size']}  "
              f"({time.perf_counter() - wall:.0f} s)")
    f1, ap = seg.scores_from_counts(pooled)
    n = int(pooled[0][0] + pooled[0][2])
    wall, cpu = time.perf_counter() - wall_started, time.process_time() - cpu_started
    rows.append(("all", "", "", n, *pooled[0], f"{f1:.4f}", f"{ap:.4f}", "", "", "",
                 f"{wall:.1f}", f"{cpu:.1f}"))
    write_csv(os.path.join(args.out, "folds.csv"), rows)
    marks = {key: np.concatenate(value) for key, value in marks.items()}
    io.write_npz_atomic(os.path.join(args.out, "instances.npz"), {"predicted": found, **marks},
                        {"what": "cross-validated instance map of the test bands (ids unique over "
                                 "folds), matches (true id, predicted id) at IoU 0.5, missed true "
                                 "ids, false predicted ids", "bands": [list(f.test) for f in folds]})
    draw(image, labels, found, folds, marks, args, (f1, ap))
    print(f"all folds in {wall:.0f} s (CPU time {cpu:.0f} s); wrote {args.out}/folds.csv")
    print(f"cross-validated instance F1@0.5 {f1:.4f} mean AP {ap:.4f} over {n} nuclei")
    return 0


def write_csv(path, rows):
    from minicnn.io import write_text_atomic
    lines = [",".join(CSV_COLUMNS)] + [",".join(str(v) for v in row) for row in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


def draw(image, labels, found, folds, marks, args, scores):
    from minicnn import visualize
    if not visualize.matplotlib_available():
        print('picture skipped: matplotlib is not installed (pip install "minicnn[plot]")')
        return
    bands = [fold.test for fold in folds]
    path = os.path.join(args.out, "instances.png")
    f1, ap = scores
    visualize.save_instance_overlay(
        image, labels, found, path, bands=bands, band_labels=[f"fold {f.index}" for f in folds],
        title=f"minicnn train --task instances --folds {args.folds}: each band segmented by the model "
              f"that never saw it; F1@0.5 {f1:.3f}, mean AP {ap:.3f}", **marks)
    print(f"wrote {path}")
