"""Synthetic segmentation data: discs, squares and triangles on noisy backgrounds (tests and demos)."""
from __future__ import annotations

import numpy as np

from minicnn.data._random import as_generator
from minicnn.data.datasets import SegmentationData

SHAPE_CLASSES = {"disc": 1, "square": 2, "triangle": 3}


def _shape_mask(kind: str, size: int, row: float, col: float, radius: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at (row, col) with circumradius ``radius``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = y - row, x - col
    if kind == "disc":
        return dy * dy + dx * dx <= radius * radius
    # rotate the pixel offsets into the shape's frame
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == "square":
        half = radius / np.sqrt(2.0)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle: inside the three half-planes whose normals point at 90, 210, 330 degrees
    inside = np.ones_like(u, dtype=bool)
    for normal in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
        inside &= u * np.cos(normal) + v * np.sin(normal) <= radius / 2
    return inside


def shapes(n_images: int, size: int = 64, seed=0, shapes_per_image=(1, 4), radius=(6, 14),
           noise: float = 0.1, channels: int = 1) -> SegmentationData:
    """Noisy images of discs (class 1), squares (2) and triangles (3) on background 0.

    Each image gets k shapes (k uniform in shapes_per_image, inclusive), of random kind, centre,
    circumradius (uniform in ``radius``) and rotation; a later shape covers an earlier one.
    Pixel = background level (uniform 0..0.3) or the shape's brightness (uniform 0.5..1, one per
    channel), plus Gaussian noise of std ``noise``, clipped to [0, 1].
    image: (N, size, size, channels) float32; mask: (N, size, size) int64. Same seed, same data.
    """
    if int(n_images) != n_images or n_images < 1:
        raise ValueError(f"shapes: n_images must be a positive int, got {n_images!r}")
    if int(size) != size or size < 8:
        raise ValueError(f"shapes: size must be an int >= 8, got {size!r}")
    if int(channels) != channels or channels < 1:
        raise ValueError(f"shapes: channels must be a positive int, got {channels!r}")
    low, high = shapes_per_image
    r_low, r_high = radius
    if not 0 <= low <= high or not 0 < r_low <= r_high:
        raise ValueError(f"shapes: need 0 <= shapes_per_image[0] <= [1] and 0 < radius[0] <= [1], "
                         f"got shapes_per_image={shapes_per_image!r}, radius={radius!r}")
    rng = as_generator(seed)
    kinds = list(SHAPE_CLASSES)
    n, size, channels = int(n_images), int(size), int(channels)
    images = np.empty((n, size, size, channels), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        image = np.broadcast_to(rng.uniform(0.0, 0.3, size=channels), (size, size, channels)).copy()
        for _ in range(int(rng.integers(low, high + 1))):
            kind = kinds[int(rng.integers(len(kinds)))]
            r = rng.uniform(r_low, r_high)
            row, col = rng.uniform(0, size - 1, size=2)
            inside = _shape_mask(kind, size, row, col, r, rng.uniform(0, 2 * np.pi))
            image[inside] = rng.uniform(0.5, 1.0, size=channels)
            masks[i][inside] = SHAPE_CLASSES[kind]
        image += rng.normal(0.0, noise, size=image.shape)
        images[i] = np.clip(image, 0.0, 1.0)
    return SegmentationData(images, masks)
