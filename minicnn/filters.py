"""The course's classic image kernels, as arrays ready for ``conv2d``.

Each filter is a small 2-D array ``f`` (rows, columns). ``conv2d`` computes the cross-correlation
``y(x, y) = sum_{dx, dy} f(a + dx, b + dy) img(x + dx, y + dy)`` (no kernel flip; for the
symmetric kernels here it equals the convolution, for ``edge_detect_1`` it flips the sign).

    get(name)                               the 2-D filter (float64 copy)
    as_conv_kernel(f, channels=1)           (kh, kw, C, C): f on each channel separately
    as_depthwise_kernel(f, channels=1)      (kh, kw, C, 1) for depthwise_conv2d
    apply_filter(image, f, padding="same")  image (H, W), (H, W, C) or (N, H, W, C), filtered

Reference: the "Kernel (image processing)" table the course uses (identity, edge detection,
sharpen, box blur, Gaussian blur 3x3 and 5x5).
"""
from __future__ import annotations

import numpy as np

from kernels import dispatch as K
from kernels.backend import get_array_module

IDENTITY = np.array([[0, 0, 0],
                     [0, 1, 0],
                     [0, 0, 0]], dtype=np.float64)
"""Leaves the image unchanged."""

EDGE_DETECT_1 = np.array([[1, 0, -1],
                          [0, 0, 0],
                          [-1, 0, 1]], dtype=np.float64)
"""Diagonal differences: responds to edges at +-45 degrees; zero on flat regions (sums to 0)."""

EDGE_DETECT_2 = np.array([[0, 1, 0],
                          [1, -4, 1],
                          [0, 1, 0]], dtype=np.float64)
"""The 4-neighbour Laplacian: second derivative along rows plus along columns; sums to 0."""

EDGE_DETECT_3 = np.array([[-1, -1, -1],
                          [-1, 8, -1],
                          [-1, -1, -1]], dtype=np.float64)
"""The 8-neighbour (negated) Laplacian: the centre minus its eight neighbours; sums to 0."""

SHARPEN = np.array([[0, -1, 0],
                    [-1, 5, -1],
                    [0, -1, 0]], dtype=np.float64)
"""Identity minus the 4-neighbour Laplacian: boosts edges, keeps flat regions (sums to 1)."""

BOX_BLUR = np.full((3, 3), 1.0 / 9.0)
"""Mean of the 3x3 neighbourhood."""

GAUSSIAN_BLUR_3 = np.array([[1, 2, 1],
                            [2, 4, 2],
                            [1, 2, 1]], dtype=np.float64) / 16.0
"""3x3 binomial approximation of a Gaussian: ``[1, 2, 1]^T [1, 2, 1] / 16`` (separable)."""

GAUSSIAN_BLUR_5 = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0
"""5x5 binomial approximation of a Gaussian: ``[1, 4, 6, 4, 1]^T [1, 4, 6, 4, 1] / 256``."""

FILTERS = {
    "identity": IDENTITY,
    "edge_detect_1": EDGE_DETECT_1,
    "edge_detect_2": EDGE_DETECT_2,
    "edge_detect_3": EDGE_DETECT_3,
    "sharpen": SHARPEN,
    "box_blur": BOX_BLUR,
    "gaussian_blur_3": GAUSSIAN_BLUR_3,
    "gaussian_blur_5": GAUSSIAN_BLUR_5,
}


def get(name) -> np.ndarray:
    """The 2-D filter called ``name`` (a copy), or ``name`` itself as a 2-D array."""
    if isinstance(name, str):
        try:
            return FILTERS[name].copy()
        except KeyError:
            raise ValueError(f"filters.get: unknown filter {name!r}; known filters are "
                             f"{sorted(FILTERS)}") from None
    f = np.asarray(name, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"filters.get: a filter must be a 2-D array (rows, columns), "
                         f"got shape {f.shape}")
    return f


def as_conv_kernel(f, channels: int = 1, dtype="float32") -> np.ndarray:
    """``(kh, kw, C, C)`` HWIO kernel applying the 2-D filter to each channel on its own
    (zero between different channels), ready for ``conv2d``."""
    f = get(f)
    kernel = np.zeros((*f.shape, channels, channels), dtype=dtype)
    for c in range(channels):
        kernel[:, :, c, c] = f
    return kernel


def as_depthwise_kernel(f, channels: int = 1, dtype="float32") -> np.ndarray:
    """``(kh, kw, C, 1)`` kernel for ``depthwise_conv2d``: the same filter on every channel."""
    f = get(f)
    return np.repeat(f[:, :, None, None], channels, axis=2).astype(dtype)


def apply_filter(image, f, padding="same", strides=1, dilation=1):
    """Filter every channel of ``image`` with ``f`` (a name or a 2-D array).

    image: (H, W), (H, W, C) or (N, H, W, C), NumPy or CuPy; returns the same layout, in the
    image's floating dtype (float32 for integer images).
    """
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"apply_filter: image must be (H, W), (H, W, C) or (N, H, W, C), "
                         f"got shape {tuple(image.shape)}")
    dtype = image.dtype if image.dtype.kind == "f" else np.dtype("float32")
    x = image.astype(dtype, copy=False)
    if x.ndim == 2:
        x = x[:, :, None]                       # one channel
    if x.ndim == 3:
        x = x[None]                             # a batch of one
    kernel = get_array_module(x).asarray(as_depthwise_kernel(f, x.shape[3], dtype))
    y = K.depthwise_conv2d_forward(x, kernel, strides=strides, dilation=dilation, padding=padding)
    if image.ndim == 2:
        return y[0, :, :, 0]
    return y[0] if image.ndim == 3 else y
