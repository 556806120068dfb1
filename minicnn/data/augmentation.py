"""Joint image + mask augmentation: the same random geometric transform moves an image and its mask.

Keras' ImageDataGenerator names and ranges (rotation_range, width_shift_range, height_shift_range,
zoom_range, shear_range, horizontal_flip, vertical_flip, brightness_range, fill_mode, cval), plus the
elastic deformation of the U-Net paper (Ronneberger et al., 2015, sec. 3.1: random displacements on
a coarse grid, Gaussian with std ``elastic_sigma`` pixels, interpolated smoothly (cubic spline)).

Every geometric part is one 2 x 2 matrix about the image centre; they are multiplied into ONE affine
map from an output pixel to the input point it samples, and each image is resampled once
(scipy.ndimage.affine_transform, or map_coordinates when the elastic field is on): bilinear
(order 1) for images, nearest (order 0) for masks, so a mask keeps exactly its label values.

Runs on host NumPy arrays: CuPy inputs are copied with kernels.backend.to_numpy and NumPy arrays come
out (move the batch to the GPU after augmentation).
"""
from __future__ import annotations

import numbers
from functools import lru_cache

import numpy as np
from scipy import ndimage

from kernels.backend import to_numpy
from minicnn.data._random import as_generator

# Keras fill_mode -> scipy.ndimage mode. Keras documents 'wrap' as abcd|abcd|abcd: scipy's grid-wrap.
# scipy's 'constant' gives cval to any point outside [0, n - 1], for images and masks alike, so the
# two stay aligned up to the edge (grid-constant would ramp the image, not the mask, to cval).
FILL_MODES = {"constant": "constant", "nearest": "nearest", "reflect": "reflect", "wrap": "grid-wrap"}


def _check_nonnegative(value, name: str) -> float:
    if not isinstance(value, numbers.Real) or value < 0:
        raise ValueError(f"ImageDataGenerator: {name} must be a number >= 0, got {value!r}")
    return float(value)


def _check_shift(value, name: str):
    if isinstance(value, numbers.Real):
        if value < 0:
            raise ValueError(f"ImageDataGenerator: {name} must be >= 0, got {value!r}")
        return value
    values = np.asarray(value, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"ImageDataGenerator: {name} must be a number or a 1-D list of shifts, "
                         f"got {value!r}")
    return values


def _check_pair(value, name: str, minimum: float):
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not minimum < pair[0] <= pair[1]:
        raise ValueError(f"ImageDataGenerator: {name} must be (low, high) with {minimum} < low <= high, "
                         f"got {value!r}")
    return pair


class ImageDataGenerator:
    """Random augmentation applied identically to an image (H, W, C) and its mask (H, W) or (H, W, K).

    rotation_range: degrees; angle uniform in [-r, r].
    width_shift_range, height_shift_range: a float < 1 is a fraction of the width/height, a float >= 1
        pixels (shift uniform in [-s, s]); an int s >= 1 an integer number of pixels in [-s, s];
        a list: one of its values, chosen uniformly (Keras' rules).
    zoom_range: float z -> [1 - z, 1 + z], or (low, high); a zoom for each axis, drawn independently.
        As in Keras the factor scales the sampled coordinates: a zoom < 1 magnifies (zooms in).
    shear_range: shear angle in degrees, uniform in [-s, s].
    horizontal_flip, vertical_flip: each flips with probability 1/2 (exact: integer coordinates).
    brightness_range: (low, high): the image (not the mask) is multiplied by a factor uniform in it.
    elastic_sigma: std in pixels of the coarse displacement vectors (0 = off; the U-Net paper used 10
        on 572 x 572 tiles); elastic_grid: grid points per axis (3 -> a 3 x 3 grid).
    fill_mode: "constant" | "nearest" | "reflect" | "wrap" for points outside the input (Keras' names);
        cval: the image's constant, mask_cval: the mask's (default 0, background).
    """

    def __init__(self, rotation_range=0.0, width_shift_range=0.0, height_shift_range=0.0, zoom_range=0.0,
                 shear_range=0.0, horizontal_flip=False, vertical_flip=False, brightness_range=None,
                 elastic_sigma=0.0, elastic_grid=3, fill_mode="nearest", cval=0.0, mask_cval=0):
        self.rotation_range = _check_nonnegative(rotation_range, "rotation_range")
        self.width_shift_range = _check_shift(width_shift_range, "width_shift_range")
        self.height_shift_range = _check_shift(height_shift_range, "height_shift_range")
        if isinstance(zoom_range, numbers.Real):
            zoom = _check_nonnegative(zoom_range, "zoom_range")
            if zoom >= 1:
                raise ValueError(f"ImageDataGenerator: a float zoom_range must be in [0, 1), "
                                 f"got {zoom_range!r}")
            self.zoom_range = (1.0 - zoom, 1.0 + zoom)
        else:
            self.zoom_range = _check_pair(zoom_range, "zoom_range", 0.0)
        self.shear_range = _check_nonnegative(shear_range, "shear_range")
        self.horizontal_flip = bool(horizontal_flip)
        self.vertical_flip = bool(vertical_flip)
        self.brightness_range = None if brightness_range is None else _check_pair(
            brightness_range, "brightness_range", 0.0)
        self.elastic_sigma = _check_nonnegative(elastic_sigma, "elastic_sigma")
        if int(elastic_grid) != elastic_grid or elastic_grid < 2:
            raise ValueError(f"ImageDataGenerator: elastic_grid must be an int >= 2, got {elastic_grid!r}")
        self.elastic_grid = int(elastic_grid)
        if fill_mode not in FILL_MODES:
            raise ValueError(f"ImageDataGenerator: fill_mode must be one of {sorted(FILL_MODES)}, "
                             f"got {fill_mode!r}")
        self.fill_mode = fill_mode
        self.cval = float(cval)
        self.mask_cval = mask_cval

    # ------------------------------------------------------------------ drawing the parameters

    @staticmethod
    def _draw_shift(setting, length: int, rng: np.random.Generator) -> float:
        if isinstance(setting, np.ndarray):
            return float(rng.choice(setting))
        if isinstance(setting, numbers.Integral) and setting >= 1:
            return float(rng.integers(-setting, setting + 1))
        if setting == 0:
            return 0.0
        span = setting * length if setting < 1 else setting
        return float(rng.uniform(-span, span))

    def get_random_transform(self, image_shape, seed=None) -> dict:
        """Draw one transform for an image of shape (H, W, ...): a dict of its parameters.

        keys: theta, shear (degrees), tx, ty (row and column shift, pixels), zx, zy (row and column
        zoom), flip_vertical, flip_horizontal (bools), brightness (factor or None), elastic ((2, g, g)
        coarse displacements in pixels, or None). ``seed``: int, Generator or None.
        """
        rng = as_generator(seed)
        height, width = int(image_shape[0]), int(image_shape[1])
        r = self.rotation_range
        s = self.shear_range
        lo, hi = self.zoom_range
        params = {
            "theta": float(rng.uniform(-r, r)) if r else 0.0,
            "tx": self._draw_shift(self.height_shift_range, height, rng),
            "ty": self._draw_shift(self.width_shift_range, width, rng),
            "shear": float(rng.uniform(-s, s)) if s else 0.0,
            "zx": float(rng.uniform(lo, hi)) if (lo, hi) != (1.0, 1.0) else 1.0,
            "zy": float(rng.uniform(lo, hi)) if (lo, hi) != (1.0, 1.0) else 1.0,
            "flip_vertical": bool(self.vertical_flip and rng.random() < 0.5),
            "flip_horizontal": bool(self.horizontal_flip and rng.random() < 0.5),
            "brightness": (float(rng.uniform(*self.brightness_range))
                           if self.brightness_range is not None else None),
            "elastic": None,
        }
        if self.elastic_sigma > 0:
            g = self.elastic_grid
            params["elastic"] = rng.normal(0.0, self.elastic_sigma, size=(2, g, g))
        return params

    # ------------------------------------------------------------------ the geometry

    @staticmethod
    def transform_matrix(params: dict, image_shape) -> np.ndarray:
        """3 x 3 homogeneous matrix A taking an output pixel (row, col, 1) to the input point it samples.

        About the centre c = ((H - 1) / 2, (W - 1) / 2):
            input = c + R(theta) Sh(shear) Z(zx, zy) F (output - c) + (tx, ty)
        R = [[cos, -sin], [sin, cos]], Sh = [[1, -sin(shear)], [0, cos(shear)]] (Keras' shear),
        Z = diag(zx, zy), F = diag(+-1, +-1) for the flips. Entries within 1e-9 of an integer are
        rounded to it, so quarter turns and flips sample exact pixel centres (cos 90 deg is 6e-17).
        """
        theta, shear = np.deg2rad(params["theta"]), np.deg2rad(params["shear"])
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        shearing = np.array([[1.0, -np.sin(shear)], [0.0, np.cos(shear)]])
        zoom = np.diag([params["zx"], params["zy"]])
        flip = np.diag([-1.0 if params["flip_vertical"] else 1.0, -1.0 if params["flip_horizontal"] else 1.0])
        linear = rotation @ shearing @ zoom @ flip
        centre = np.array([(image_shape[0] - 1) / 2.0, (image_shape[1] - 1) / 2.0])
        matrix = np.eye(3)
        matrix[:2, :2] = linear
        matrix[:2, 2] = centre - linear @ centre + np.array([params["tx"], params["ty"]])
        nearest_integer = np.round(matrix)
        return np.where(np.abs(matrix - nearest_integer) < 1e-9, nearest_integer, matrix)

    @staticmethod
    def _elastic_field(coarse: np.ndarray, height: int, width: int) -> np.ndarray:
        """(2, H, W) displacements: the (2, g, g) coarse vectors spread over the image by cubic splines.

        The 2-D spline is a tensor product, so field = B_rows @ coarse @ B_cols^T with B (n, g) the
        1-D cubic-spline weights of the g grid points at n evenly spaced positions (cached).
        """
        g = coarse.shape[-1]
        rows, cols = _spline_weights(height, g), _spline_weights(width, g)
        return np.einsum("hk,ikl,wl->ihw", rows, coarse, cols)

    def _resample(self, array: np.ndarray, matrix: np.ndarray, coords, order: int, cval) -> np.ndarray:
        """Resample an (H, W, C) array once: output[p] = array[A p] (or at the given coordinates)."""
        mode = FILL_MODES[self.fill_mode]
        if coords is None:
            # A acting on (row, col, channel, 1): the channel axis maps to itself
            full = np.eye(4)
            full[:2, :2] = matrix[:2, :2]
            full[:2, 3] = matrix[:2, 2]
            return ndimage.affine_transform(array, full, order=order, mode=mode, cval=cval)
        channels = np.broadcast_to(np.arange(array.shape[2], dtype=np.float64), array.shape)
        grid = [np.broadcast_to(coords[0][..., None], array.shape),
                np.broadcast_to(coords[1][..., None], array.shape), channels]
        return ndimage.map_coordinates(array, grid, order=order, mode=mode, cval=cval)

    def apply_transform(self, image, mask, params: dict):
        """Apply one drawn transform (``get_random_transform``) to image (H, W, C) and mask (H, W) or
        (H, W, K); returns (image, mask). mask may be None (then None comes back). Host NumPy arrays
        in the input dtypes come out.
        """
        image = to_numpy(image)
        if image.ndim != 3:
            raise ValueError(f"ImageDataGenerator.apply_transform: image must be (H, W, C), "
                             f"got {image.shape}")
        if mask is not None:
            mask = to_numpy(mask)
            if mask.ndim not in (2, 3) or mask.shape[:2] != image.shape[:2]:
                raise ValueError(f"ImageDataGenerator.apply_transform: mask must be (H, W) or (H, W, K) "
                                 f"matching image {image.shape}, got {mask.shape}")
        height, width = image.shape[:2]
        matrix = self.transform_matrix(params, image.shape)
        coords = None
        if params.get("elastic") is not None:
            field = self._elastic_field(np.asarray(params["elastic"]), height, width)
            rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
            moved = np.stack([rows, cols]) + field
            coords = np.einsum("ij,jhw->ihw", matrix[:2, :2], moved) + matrix[:2, 2][:, None, None]
        identity = coords is None and np.array_equal(matrix, np.eye(3))
        out_image = image.copy() if identity else self._resample(image, matrix, coords, 1, self.cval)
        if params.get("brightness") is not None:
            out_image = (out_image * params["brightness"]).astype(image.dtype, copy=False)
        out_mask = None
        if mask is not None:
            stacked = mask[..., None] if mask.ndim == 2 else mask
            out_mask = (stacked.copy() if identity
                        else self._resample(stacked, matrix, coords, 0, self.mask_cval))
            out_mask = out_mask[..., 0] if mask.ndim == 2 else out_mask
        return out_image, out_mask

    def random_transform(self, image, mask=None, seed=None):
        """Draw a transform and apply it to image (H, W, C) and mask: returns (image, mask)."""
        image = to_numpy(image)
        if image.ndim != 3:
            raise ValueError(f"ImageDataGenerator.random_transform: image must be (H, W, C), "
                             f"got {image.shape}")
        return self.apply_transform(image, mask, self.get_random_transform(image.shape, seed))

    def transform_batch(self, images, masks=None, seed=None):
        """Each sample of images (N, H, W, C) and masks (N, H, W[, K]) (or None) gets its own transform."""
        images = to_numpy(images)
        masks = None if masks is None else to_numpy(masks)
        _check_batch(images, masks, "ImageDataGenerator.transform_batch")
        rng = as_generator(seed)
        out_images = np.empty_like(images)
        out_masks = None if masks is None else np.empty_like(masks)
        for i in range(len(images)):
            params = self.get_random_transform(images.shape[1:], rng)
            image, mask = self.apply_transform(images[i], None if masks is None else masks[i], params)
            out_images[i] = image
            if masks is not None:
                out_masks[i] = mask
        return out_images, out_masks

    def flow(self, images, masks=None, batch_size: int = 32, seed=None, shuffle: bool = True):
        """Yield augmented (images, masks) batches forever (images only when masks is None).

        images: (N, H, W, C); masks: (N, H, W) or (N, H, W, K). Each epoch visits every sample once,
        in a fresh random order when shuffle; the last batch of an epoch may be smaller (as Keras).
        An integer seed makes the whole stream repeat exactly; None uses the package generator.
        """
        images = to_numpy(images)
        masks = None if masks is None else to_numpy(masks)
        _check_batch(images, masks, "ImageDataGenerator.flow")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"ImageDataGenerator.flow: batch_size must be a positive int, "
                             f"got {batch_size!r}")
        rng = as_generator(seed)
        return self._flow(images, masks, int(batch_size), rng, shuffle)

    def _flow(self, images, masks, batch_size, rng, shuffle):
        n = len(images)
        while True:
            order = rng.permutation(n) if shuffle else np.arange(n)
            for start in range(0, n, batch_size):
                chosen = order[start:start + batch_size]
                batch = self.transform_batch(images[chosen], None if masks is None else masks[chosen], rng)
                yield batch if masks is not None else batch[0]


@lru_cache(maxsize=64)
def _spline_weights(length: int, grid: int) -> np.ndarray:
    """(length, grid) weights: row i holds the cubic-spline interpolant through each grid point's unit
    impulse, read at position i * (grid - 1) / (length - 1) (grid points spread over the image)."""
    positions = np.linspace(0.0, grid - 1.0, length)
    weights = np.stack([ndimage.map_coordinates(impulse, [positions], order=3, mode="nearest")
                        for impulse in np.eye(grid)], axis=1)
    weights.setflags(write=False)
    return weights


def _check_batch(images, masks, name: str):
    if images.ndim != 4:
        raise ValueError(f"{name}: images must be (N, H, W, C), got {images.shape}")
    if masks is not None and (masks.ndim not in (3, 4) or masks.shape[:3] != images.shape[:3]):
        raise ValueError(f"{name}: masks must be (N, H, W) or (N, H, W, K) matching images "
                         f"{images.shape}, got {masks.shape}")
