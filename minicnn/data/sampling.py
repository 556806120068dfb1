"""Random training crops from large images, and tiling an evaluation region into crops and back."""
from __future__ import annotations

import numpy as np

from kernels.backend import to_numpy
from minicnn.data._random import as_generator


def _as_stack(image, mask, name: str):
    """image (H, W, C) or (N, H, W, C) and mask (H, W[, K]) or (N, H, W[, K]) -> stacked host arrays."""
    image, mask = to_numpy(image), to_numpy(mask)
    stack_image, stack_mask = (image[None], mask[None]) if image.ndim == 3 else (image, mask)
    if (stack_image.ndim != 4 or stack_mask.ndim not in (3, 4)
            or stack_image.shape[:3] != stack_mask.shape[:3]):
        raise ValueError(f"{name}: expected image (H, W, C) with mask (H, W) or (H, W, K), or image "
                         f"(N, H, W, C) with mask (N, H, W) or (N, H, W, K), got image {image.shape} "
                         f"and mask {mask.shape}")
    return stack_image, stack_mask


def _crop_rows(height: int, crop: int, rows, name: str) -> np.ndarray:
    """Every top row a crop of ``crop`` rows may start at: all that fit, or those whose crop lies
    inside one of the (start, stop) row ranges ``rows``."""
    if rows is None:
        return np.arange(height - crop + 1)
    starts = [np.arange(int(a), int(b) - crop + 1) for a, b in rows
              if 0 <= int(a) < int(b) <= height]
    if len(starts) != len(rows) or not sum(len(s) for s in starts):
        raise ValueError(f"{name}: rows must be (start, stop) ranges within 0..{height} of which one "
                         f"at least holds a crop of {crop} rows, got {list(rows)}")
    return np.concatenate(starts)


def random_crops(image, mask, crop: int, batch_size: int, seed=None, augmenter=None, rows=None):
    """Yield (images (B, crop, crop, C) float32, masks (B, crop, crop[, K])) batches of random crops, forever.

    image: (H, W, C) or a stack (N, H, W, C) (each crop picks an image uniformly); mask: (H, W) or
    (N, H, W), or with a last axis of K target maps (e.g. class ids and a weight map). Crop corners
    are uniform over all positions that fit; ``rows``: a list of (start, stop) row ranges, and then
    over the positions whose crop lies entirely inside one of them (the training rows of a
    cross-validation fold, so no crop reaches into a held-out band). augmenter: optional
    ImageDataGenerator; each crop pair then gets its own random transform (same stream of numbers).
    A seed (int) makes the stream repeat exactly; None uses the package generator. Host arrays out.
    """
    images, masks = _as_stack(image, mask, "random_crops")
    crop, batch_size = int(crop), int(batch_size)
    n, height, width = masks.shape[:3]
    if crop < 1 or crop > min(height, width):
        raise ValueError(f"random_crops: crop must be in 1..{min(height, width)} for images of "
                         f"{height} x {width}, got {crop}")
    if batch_size < 1:
        raise ValueError(f"random_crops: batch_size must be >= 1, got {batch_size}")
    top_rows = _crop_rows(height, crop, rows, "random_crops")
    rng = as_generator(seed)
    while True:
        which = rng.integers(0, n, size=batch_size)
        if rows is None:
            tops = rng.integers(0, height - crop + 1, size=batch_size)
        else:
            tops = top_rows[rng.integers(0, len(top_rows), size=batch_size)]
        cols = rng.integers(0, width - crop + 1, size=batch_size)
        batch_images = np.stack([images[i, r:r + crop, c:c + crop] for i, r, c in zip(which, tops, cols)])
        batch_masks = np.stack([masks[i, r:r + crop, c:c + crop] for i, r, c in zip(which, tops, cols)])
        batch_images = batch_images.astype(np.float32, copy=False)
        if augmenter is not None:
            batch_images, batch_masks = augmenter.transform_batch(batch_images, batch_masks, rng)
        yield batch_images, batch_masks


def _starts(length: int, crop: int, stride: int):
    """Corner positions along one axis: 0, stride, 2 stride, ... and a last one flush with the end."""
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def tile(image, crop: int, stride: int | None = None):
    """Cut an image (H, W, ...) into crops (n, crop, crop, ...) covering every pixel.

    Corners step by ``stride`` (default ``crop``: no overlap), the last row/column of crops sits
    flush with the bottom/right edge (so it may overlap its neighbour). Returns (crops, corners),
    corners an (n, 2) int array of (row, col), for ``untile``. Works for images and masks.
    """
    image = to_numpy(image)
    crop = int(crop)
    stride = crop if stride is None else int(stride)
    if image.ndim < 2 or crop < 1 or crop > min(image.shape[:2]) or not 1 <= stride <= crop:
        raise ValueError(f"tile: need an image (H, W, ...) with 1 <= crop <= min(H, W) and "
                         f"1 <= stride <= crop, got image {image.shape}, crop {crop}, stride {stride}")
    corners = np.array([(r, c) for r in _starts(image.shape[0], crop, stride)
                        for c in _starts(image.shape[1], crop, stride)], dtype=np.int64)
    crops = np.stack([image[r:r + crop, c:c + crop] for r, c in corners])
    return crops, corners


def untile(crops, corners, shape) -> np.ndarray:
    """Put crops (n, h, w, ...) back at their corners in an array of ``shape`` (H, W, ...).

    Overlapping pixels get the mean of the crops covering them (average the class scores, then
    take the argmax, to stitch a segmentation). Pixels no crop covers are 0.
    """
    crops, corners = to_numpy(crops), np.asarray(corners)
    shape = tuple(int(s) for s in shape)
    if corners.ndim != 2 or corners.shape != (len(crops), 2) or crops.shape[3:] != shape[2:]:
        raise ValueError(f"untile: crops {crops.shape}, corners {corners.shape} and shape {shape} "
                         "do not match (crops (n, h, w, ...), corners (n, 2), shape (H, W, ...))")
    h, w = crops.shape[1:3]
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape[:2], dtype=np.float64)
    for piece, (r, c) in zip(crops, corners):
        total[r:r + h, c:c + w] += piece
        count[r:r + h, c:c + w] += 1
    count = count.reshape(count.shape + (1,) * (len(shape) - 2))
    out_dtype = crops.dtype if np.issubdtype(crops.dtype, np.floating) else np.float64
    return (total / np.maximum(count, 1)).astype(out_dtype)
