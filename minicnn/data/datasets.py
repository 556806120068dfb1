"""The two real data sets shipped with minicnn (provenance in minicnn/data/README.md).

nuclei: one 512 x 512 fluorescence image of cell nuclei (2018 Data Science Bowl, BBBC038), cut by
    rows into disjoint train / val / test regions; 2-class or 3-class (interior / border) masks.
m2nist: M2NIST-style canvases of real MNIST digits, a class per digit pixel (1..10), 0 elsewhere.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minicnn.data._random import as_generator
from minicnn.segmentation import classes_from_instances

DATA_DIR = Path(__file__).resolve().parent

# rows [start, stop) of the nuclei image in each split; the eval regions are 64 rows high
NUCLEI_SPLITS = {"train": (0, 384), "val": (384, 448), "test": (448, 512), "all": (0, 512)}

MNIST_SPLIT_SEED = 20180101      # the fixed shuffle that splits the 5,000 digits, never changed
MNIST_TRAIN_DIGITS = 4000        # first 4,000 of the shuffle train, the last 1,000 test


class SegmentationData(NamedTuple):
    """image: (H, W, C) or (N, H, W, C) float32 in [0, 1]; mask: (H, W) or (N, H, W) int64 class ids."""
    image: np.ndarray
    mask: np.ndarray


@lru_cache(maxsize=None)
def _load(filename: str) -> dict:
    """The arrays of a shipped .npz (read once, no pickles), as read-only NumPy arrays."""
    with np.load(DATA_DIR / filename, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def _nuclei_rows(split: str, name: str) -> slice:
    if split not in NUCLEI_SPLITS:
        raise ValueError(f"{name}: split must be one of {sorted(NUCLEI_SPLITS)}, got {split!r}")
    start, stop = NUCLEI_SPLITS[split]
    return slice(start, stop)


def nuclei_instances(split: str = "train") -> np.ndarray:
    """Instance map (H, W) int64 of a split: 0 background, one positive id per nucleus (ids of the
    whole image, so a nucleus cut by a region edge keeps its id in both regions)."""
    rows = _nuclei_rows(split, "nuclei_instances")
    return _load("nuclei_dsb2018.npz")["labels"][rows].astype(np.int64)


def nuclei(classes: int = 2, split: str = "train", border_width: int = 2) -> SegmentationData:
    """The nuclei image of one split and its mask.

    image: (H, W, 1) float32, (x - min) / (max - min) over the whole image (0 .. 235 -> 0 .. 1).
    mask: (H, W) int64; classes=2: 0 background, 1 nucleus; classes=3: 0 background, 1 interior,
        2 border = nucleus pixels within ``border_width`` px of another label (see
        minicnn.segmentation.classes_from_instances), computed on the whole image before cutting.
    split: "train" rows 0..383 (384 x 512), "val" rows 384..447 (64 x 512), "test" rows 448..511
        (64 x 512), or "all" (512 x 512). The three regions are disjoint.
    """
    if classes not in (2, 3):
        raise ValueError(f"nuclei: classes must be 2 or 3, got {classes!r}")
    rows = _nuclei_rows(split, "nuclei")
    arrays = _load("nuclei_dsb2018.npz")
    raw = arrays["image"].astype(np.float32)
    image = (raw - raw.min()) / (raw.max() - raw.min())
    labels = arrays["labels"].astype(np.int64)
    if classes == 2:
        mask = (labels > 0).astype(np.int64)
    else:
        mask = classes_from_instances(labels, border_width=border_width)
    return SegmentationData(np.ascontiguousarray(image[rows, :, None]), np.ascontiguousarray(mask[rows]))


def mnist_digits(split: str = "train"):
    """(images (n, 28, 28) float32 in [0, 1], labels (n,) int64) of the fixed MNIST split.

    The 5,000 digits are permuted once by np.random.default_rng(MNIST_SPLIT_SEED); the first 4,000
    are "train", the last 1,000 "test" (about 400 / 100 of each class), disjoint on every machine.
    """
    if split not in ("train", "test"):
        raise ValueError(f"mnist_digits: split must be 'train' or 'test', got {split!r}")
    arrays = _load("mnist_5k.npz")
    order = np.random.default_rng(MNIST_SPLIT_SEED).permutation(len(arrays["labels"]))
    chosen = order[:MNIST_TRAIN_DIGITS] if split == "train" else order[MNIST_TRAIN_DIGITS:]
    images = arrays["images"][chosen].astype(np.float32) / 255.0
    return images, arrays["labels"][chosen].astype(np.int64)


def _check_canvas(canvas, name: str):
    canvas = (canvas, canvas) if np.isscalar(canvas) else tuple(canvas)
    if len(canvas) != 2 or any(int(c) != c or c < 28 for c in canvas):
        raise ValueError(f"{name}: canvas must be (height, width) with both >= 28 (a digit is 28 x 28), "
                         f"got {canvas!r}")
    return int(canvas[0]), int(canvas[1])


def m2nist(n_images: int, canvas=(64, 64), digits_per_image=(1, 3), split: str = "train",
           seed=0, threshold: float = 0.5, overlap: bool = False, return_placements: bool = False):
    """Multi-class segmentation canvases of real MNIST digits (M2NIST-style).

    Each canvas (H, W) gets k digits, k uniform in digits_per_image = (low, high) inclusive, drawn
    from the ``split``'s digits (train and test never share one) and pasted whole at uniform random
    places. overlap=False keeps their 28 x 28 boxes apart (a digit that finds no free place in 100
    tries is left out); overlap=True lets them overlap, the later digit on top (image: pixel maximum).
    image: (N, H, W, 1) float32 in [0, 1]; mask: (N, H, W) int64, class + 1 (1..10) where the digit's
    intensity > threshold, else 0. The same arguments (and integer seed) give the same canvases.
    return_placements: also return, per canvas, a list of (digit index in mnist_digits(split), row, col).
    """
    name = "m2nist"
    if int(n_images) != n_images or n_images < 1:
        raise ValueError(f"{name}: n_images must be a positive int, got {n_images!r}")
    height, width = _check_canvas(canvas, name)
    low, high = (digits_per_image, digits_per_image) if np.isscalar(digits_per_image) else digits_per_image
    if not 0 <= low <= high:
        raise ValueError(f"{name}: digits_per_image must be (low, high) with 0 <= low <= high, "
                         f"got {digits_per_image!r}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"{name}: threshold must be in [0, 1), got {threshold}")
    digits, digit_classes = mnist_digits(split)
    rng = as_generator(seed)
    images = np.zeros((int(n_images), height, width, 1), dtype=np.float32)
    masks = np.zeros((int(n_images), height, width), dtype=np.int64)
    placements = []
    for n in range(int(n_images)):
        taken = np.zeros((height, width), dtype=bool)
        placed = []
        for index in rng.integers(0, len(digits), size=int(rng.integers(low, high + 1))):
            for _ in range(1 if overlap else 100):
                row = int(rng.integers(0, height - 28 + 1))
                col = int(rng.integers(0, width - 28 + 1))
                box = (slice(row, row + 28), slice(col, col + 28))
                if overlap or not taken[box].any():
                    break
            else:
                continue
            taken[box] = True
            digit = digits[index]
            images[n][box + (0,)] = np.maximum(images[n][box + (0,)], digit)
            masks[n][box] = np.where(digit > threshold, digit_classes[index] + 1, masks[n][box])
            placed.append((int(index), row, col))
        placements.append(placed)
    if return_placements:
        return images, masks, placements
    return SegmentationData(images, masks)
