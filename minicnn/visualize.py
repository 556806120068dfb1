"""Pictures: training curves, predicted masks, feature maps, filters, overlays, gradient flow.

matplotlib is optional (``pip install "minicnn[plot]"``): this module imports without it, and
only the drawing functions need it (they raise ImportError saying so). Figures are drawn with
matplotlib's object API on the Agg canvas (no pyplot, no window), and every file is written
atomically: to a temporary file in the same folder, then ``os.replace``.

Masks always use one fixed discrete palette (``mask_palette``): class 0 (background) black,
class 1 gold, class 2 red, class 3 blue, ... so a class has the same colour in every picture.
"""
from __future__ import annotations

import colorsys
import importlib.util
import math
import os
import struct
import tempfile
import zlib

import numpy as np

from kernels import backend
from minicnn.tensor import Tensor, no_grad

# background, then colours that stay distinct on a black background and from each other
_PALETTE = [
    (0.00, 0.00, 0.00),   # 0 background: black
    (1.00, 0.80, 0.00),   # 1 gold
    (0.90, 0.10, 0.10),   # 2 red
    (0.15, 0.45, 1.00),   # 3 blue
    (0.20, 0.75, 0.25),   # 4 green
    (0.85, 0.25, 0.85),   # 5 magenta
    (0.10, 0.85, 0.85),   # 6 cyan
    (1.00, 0.50, 0.05),   # 7 orange
    (0.55, 0.35, 0.85),   # 8 purple
    (0.60, 0.35, 0.15),   # 9 brown
    (1.00, 0.60, 0.75),   # 10 pink
]
FALSE_POSITIVE = (1.00, 0.10, 0.85)     # predicted foreground, truly background: magenta
FALSE_NEGATIVE = (0.10, 0.90, 1.00)     # predicted background, truly foreground: cyan
WRONG_CLASS = (1.00, 0.55, 0.00)        # both foreground, different classes: orange
PLOT_EXTRA = 'pip install "minicnn[plot]"'


# -- matplotlib, optional ---------------------------------------------------------------------------
def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the drawing functions need it)."""
    return importlib.util.find_spec("matplotlib") is not None


def _new_figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas (no pyplot, no GUI)."""
    if not matplotlib_available():
        raise ImportError(f"minicnn.visualize: drawing needs matplotlib ({PLOT_EXTRA})")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _temporary_beside(path) -> tuple[str, str]:
    """(final path, temporary path in the same folder) for an atomic write."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(handle)
    mask = os.umask(0)            # mkstemp makes the file private: give it the usual mode
    os.umask(mask)
    os.chmod(temporary, 0o666 & ~mask)
    return path, temporary


def _save_figure(figure, path) -> str:
    """Write ``figure`` as a PNG at ``path`` atomically; returns the path."""
    path, temporary = _temporary_beside(path)
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


# -- PNG without matplotlib (for masks) -------------------------------------------------------------
def _png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (H, W, 3) uint8: signature, IHDR, IDAT (zlib, filter 0), IEND."""
    height, width, _ = rgb.shape

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8 bits, truecolour
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, -1)], axis=1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def _write_bytes_atomic(path, payload: bytes) -> str:
    path, temporary = _temporary_beside(path)
    try:
        with open(temporary, "wb") as stream:
            stream.write(payload)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


# -- colours ----------------------------------------------------------------------------------------
def mask_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) RGB colours in [0, 1]: the fixed palette, then golden-angle hues."""
    if num_classes < 1:
        raise ValueError(f"mask_palette: num_classes must be >= 1, got {num_classes}")
    colours = list(_PALETTE[:num_classes])
    for k in range(len(colours), num_classes):
        hue = (k * 0.618033988749895) % 1.0
        colours.append(colorsys.hsv_to_rgb(hue, 0.75, 0.95))
    return np.array(colours, dtype=np.float64)


def colour_mask(mask, num_classes: int) -> np.ndarray:
    """mask (H, W) int -> (H, W, 3) float RGB with ``mask_palette``."""
    mask = _host(mask)
    _check_labels("colour_mask", mask, num_classes)
    return mask_palette(num_classes)[mask.astype(np.intp)]


def _check_labels(where: str, mask: np.ndarray, num_classes: int) -> None:
    if mask.dtype.kind not in "iub":
        raise TypeError(f"{where}: mask must hold integer class labels, got dtype {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
        raise ValueError(f"{where}: mask labels must lie in [0, {num_classes - 1}] for "
                         f"num_classes={num_classes}, got [{mask.min()}, {mask.max()}]")


def _host(value) -> np.ndarray:
    """A NumPy copy of a Tensor, CuPy array or array-like."""
    if isinstance(value, Tensor):
        return value.numpy()
    return np.asarray(backend.to_numpy(value))


def _display_image(image: np.ndarray, low: float, high: float):
    """(array for imshow, cmap): grey for one channel (or any count but 3/4), RGB for 3 or 4."""
    image = image.astype(np.float64)
    scale = (high - low) if high > low else 1.0
    image = np.clip((image - low) / scale, 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return image[..., :3], None
    if image.ndim == 3:
        image = image.mean(axis=-1)
    return image, "gray"


def _value_range(images: np.ndarray) -> tuple[float, float]:
    """The images' own min and max: one contrast stretch for every picture of a figure (dim
    microscopy stays readable, and crops of one image stay comparable)."""
    return float(images.min()), float(images.max())


def _hide_axes(axes) -> None:
    axes.set_xticks([])
    axes.set_yticks([])


# -- training curves --------------------------------------------------------------------------------
def save_training_curves(history: dict, path) -> str:
    """Losses in one panel, every other metric in a second, against epoch 1..n.

    history: {"loss": [...], "val_loss": [...], "pixel_accuracy": [...], "val_dice": [...]}
    (Keras' ``History.history``); keys containing "loss" go to the first panel.
    """
    if not isinstance(history, dict) or not history:
        raise ValueError("save_training_curves: history must be a non-empty dict of lists, "
                         f"got {history!r}")
    losses = {k: v for k, v in history.items() if "loss" in k}
    others = {k: v for k, v in history.items() if "loss" not in k}
    panels = [(title, group) for title, group in (("loss", losses), ("metrics", others)) if group]
    figure = _new_figure(5.5 * len(panels), 4.0)
    from matplotlib.ticker import MaxNLocator
    for i, (title, group) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for key, values in group.items():
            values = np.array([np.nan if v is None else float(v) for v in values])
            epochs = np.arange(1, len(values) + 1)
            axes.plot(epochs, values, marker="o" if len(values) < 30 else None,
                      markersize=3, label=key)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return _save_figure(figure, path)


# -- predictions ------------------------------------------------------------------------------------
def crop_windows(height: int, width: int, side: int, count: int) -> list:
    """Up to ``count`` square windows (top, left, side) evenly spread over an image.

    Along each axis ``ceil(length / side)`` windows from the first to the last position
    (overlapping when the length is not a multiple of ``side``); when the grid has more than
    ``count`` windows, ``count`` of them evenly spaced in reading order.
    """
    side = min(side, height, width)
    tops = np.linspace(0, height - side, max(1, math.ceil(height / side))).round().astype(int)
    lefts = np.linspace(0, width - side, max(1, math.ceil(width / side))).round().astype(int)
    grid = [(int(t), int(left), side) for t in tops for left in lefts]
    if len(grid) > count:
        grid = [grid[i] for i in np.linspace(0, len(grid) - 1, count).round().astype(int)]
    return grid


def _crop_side(height: int, width: int, crop) -> int | None:
    """The crop size: ``crop`` if given; None (whole image) for images up to 128 px and of
    aspect ratio below 2; else the short side, at most 128."""
    if crop is False:
        return None
    if crop is not None:
        if int(crop) < 1:
            raise ValueError(f"save_predictions: crop must be a positive size, got {crop}")
        return int(crop)
    if max(height, width) <= 128 and max(height, width) < 2 * min(height, width):
        return None
    return min(height, width, 128)


def error_map(mask: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(H, W) codes: 0 right, 1 false positive (foreground predicted on background),
    2 false negative (background predicted on foreground), 3 wrong foreground class."""
    codes = np.zeros(mask.shape, dtype=np.int8)
    codes[(prediction != 0) & (mask == 0)] = 1
    codes[(prediction == 0) & (mask != 0)] = 2
    codes[(prediction != 0) & (mask != 0) & (prediction != mask)] = 3
    return codes


def _error_overlay(grey: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The image dimmed to grey with errors painted in their colours, (H, W, 3)."""
    if grey.ndim == 3:
        grey = grey.mean(axis=-1)
    rgb = np.repeat(0.6 * grey[..., None], 3, axis=-1)
    for code, colour in ((1, FALSE_POSITIVE), (2, FALSE_NEGATIVE), (3, WRONG_CLASS)):
        rgb[codes == code] = colour
    return rgb


def save_predictions(images, masks, predictions, path, max_rows: int = 4, crop=None) -> str:
    """A grid, one row per (crop of an) image: image | true mask | predicted mask | errors.

    images: (N, H, W, C) float (or (N, H, W)); masks, predictions: (N, H, W) int labels.
    Large images (over 128 px, or twice as long as wide, e.g. one 64 x 512 strip) are cut into
    square crops (``crop_windows``) so the pictures stay readable; ``crop`` sets the crop side,
    ``crop=False`` shows whole images. At most ``max_rows`` rows. Errors: false positives
    magenta, false negatives cyan, wrong foreground class orange, on the dimmed image.
    """
    images, masks, predictions = _host(images), _host(masks), _host(predictions)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or masks.ndim != 3 or predictions.shape != masks.shape \
            or images.shape[:3] != masks.shape:
        raise ValueError(f"save_predictions: expected images (N, H, W, C), masks and predictions "
                         f"(N, H, W) of the same N, H, W; got images {images.shape}, masks "
                         f"{masks.shape}, predictions {predictions.shape}")
    if max_rows < 1:
        raise ValueError(f"save_predictions: max_rows must be >= 1, got {max_rows}")
    num_classes = max(2, int(masks.max()) + 1, int(predictions.max()) + 1)
    _check_labels("save_predictions (masks)", masks, num_classes)
    _check_labels("save_predictions (predictions)", predictions, num_classes)
    low, high = _value_range(images)
    rows = []                                       # (image index, top, left, height, width)
    height, width = images.shape[1:3]
    side = _crop_side(height, width, crop)
    for n in range(images.shape[0]):
        if side is None:
            rows.append((n, 0, 0, height, width))
        else:
            rows += [(n, t, left, s, s)
                     for t, left, s in crop_windows(height, width, side, max_rows - len(rows))]
        if len(rows) >= max_rows:
            break
    rows = rows[:max_rows]
    columns = ("image", "true mask", "predicted mask", "errors")
    figure = _new_figure(2.6 * len(columns), 2.6 * len(rows) + 0.5)
    for r, (n, top, left, h, w) in enumerate(rows):
        window = (n, slice(top, top + h), slice(left, left + w))
        image, cmap = _display_image(images[window], low, high)
        truth, guess = masks[window], predictions[window]
        pictures = (image, colour_mask(truth, num_classes), colour_mask(guess, num_classes),
                    _error_overlay(image, error_map(truth, guess)))
        for c, picture in enumerate(pictures):
            axes = figure.add_subplot(len(rows), len(columns), r * len(columns) + c + 1)
            axes.imshow(picture, cmap=cmap if c == 0 else None, vmin=0.0, vmax=1.0,
                        interpolation="nearest")
            _hide_axes(axes)
            if r == 0:
                axes.set_title(columns[c])
            if c == 0:
                axes.set_ylabel(f"#{n} y{top}:{top + h} x{left}:{left + w}", fontsize=8)
    figure.suptitle(f"errors: magenta false positive, cyan false negative, orange wrong class "
                    f"({num_classes} classes)", fontsize=9)
    figure.tight_layout()
    return _save_figure(figure, path)


# -- files ------------------------------------------------------------------------------------------
def read_image(path) -> np.ndarray:
    """An image file as an array: (H, W) or (H, W, 3).

    PNG through ``matplotlib.image.imread`` (float32 in [0, 1]); other formats as stored (uint8
    through Pillow); ``.npy`` with ``np.load`` (no pickles). An alpha channel is dropped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"read_image: no such file: {path}")
    if path.endswith(".npy"):
        image = np.load(path, allow_pickle=False)
    else:
        if not matplotlib_available():
            raise ImportError(f"read_image: reading {path} needs matplotlib ({PLOT_EXTRA}); "
                              "a .npy array needs nothing")
        from matplotlib import image as mpimg
        image = np.asarray(mpimg.imread(path))
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3):
        raise ValueError(f"read_image: {path} holds an array of shape {image.shape}, "
                         "expected (H, W) or (H, W, C)")
    return image


def save_mask(mask, path, num_classes: int) -> str:
    """A label mask (H, W) as an RGB PNG in ``mask_palette`` colours, written atomically.

    Needs no matplotlib (a small PNG encoder, zlib and CRC from the standard library).
    """
    mask = _host(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_mask: mask must be (H, W), got shape {mask.shape}")
    rgb = np.round(colour_mask(mask, num_classes) * 255).astype(np.uint8)
    return _write_bytes_atomic(path, _png_bytes(rgb))


def overlay(image, mask, path, num_classes: int | None = None, alpha: float = 0.45) -> str:
    """The segmentation painted over the image: each foreground class in its palette colour at
    opacity ``alpha``, background left as is. image (H, W[, C]); mask (H, W) int."""
    image, mask = _host(image), _host(mask)
    if image.shape[:2] != mask.shape or mask.ndim != 2:
        raise ValueError(f"overlay: image (H, W[, C]) and mask (H, W) must share H and W, got "
                         f"image {image.shape} and mask {mask.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must lie in [0, 1], got {alpha}")
    num_classes = max(2, int(mask.max()) + 1) if num_classes is None else num_classes
    picture, _ = _display_image(image, *_value_range(image))
    rgb = picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, axis=-1)
    colours = colour_mask(mask, num_classes)
    foreground = (mask != 0)[..., None]
    blended = np.where(foreground, (1 - alpha) * rgb + alpha * colours, rgb)
    figure = _new_figure(6.0, 6.0 * mask.shape[0] / mask.shape[1] + 0.4)
    axes = figure.add_subplot(1, 1, 1)
    axes.imshow(blended, interpolation="nearest")
    _hide_axes(axes)
    axes.set_title(f"segmentation overlay ({num_classes} classes)")
    figure.tight_layout()
    return _save_figure(figure, path)


def _dark_edge():
    from matplotlib import patheffects
    return [patheffects.withStroke(linewidth=3.5, foreground="black")]


def _instance_colours(ids) -> dict:
    """A colour per object id: golden-angle hues, bright enough on a grey image."""
    return {int(k): colorsys.hsv_to_rgb((i * 0.618033988749895 + 0.1) % 1.0, 0.7, 1.0)
            for i, k in enumerate(ids)}


def _outline(axes, labels: np.ndarray, k: int, colour, **style) -> None:
    """Draw the outline of object ``k`` of ``labels`` (its 0.5 level line, in its bounding box)."""
    rows, cols = np.nonzero(labels == k)
    r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, labels.shape[0])
    c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, labels.shape[1])
    inside = (labels[r0:r1, c0:c1] == k).astype(np.float64)
    axes.contour(np.arange(c0, c1), np.arange(r0, r1), inside, levels=[0.5], colors=[colour],
                 **style)


def save_instance_overlay(image, true_labels, pred_labels, path, pairs=(), missed=(), false=(),
                          bands=(), band_labels=(), title=None, alpha: float = 0.45) -> str:
    """Two panels over the (dimmed) image (H, W[, C]): the true instances (H, W) and the predicted
    ones (H, W), each object filled in its own colour at opacity ``alpha`` with its outline.

    pairs: (true id, predicted id) matches; a matched prediction takes its true object's colour.
    missed: true ids no prediction matched, outlined dashed in yellow on the prediction panel;
    false: predicted ids that match nothing, filled and outlined in red with a white cross.
    bands: (start, stop) row ranges evaluated (e.g. cross-validation test bands): the picture keeps
    their rows and draws their edges as dashed white lines; band_labels: a text for each band
    (e.g. "fold 0"), written at its top left. title: a line above the panels (e.g. the scores).
    Written atomically; returns the path.
    """
    image, truth, found = _host(image), _host(true_labels), _host(pred_labels)
    if truth.ndim != 2 or found.shape != truth.shape or image.shape[:2] != truth.shape:
        raise ValueError(f"save_instance_overlay: image (H, W[, C]), true_labels and pred_labels "
                         f"(H, W) must share H and W, got image {image.shape}, true_labels "
                         f"{truth.shape}, pred_labels {found.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"save_instance_overlay: alpha must lie in [0, 1], got {alpha}")
    bands = [tuple(int(v) for v in band) for band in bands] or [(0, truth.shape[0])]
    top, bottom = min(b[0] for b in bands), max(b[1] for b in bands)
    image, truth, found = image[top:bottom], truth[top:bottom], found[top:bottom]
    grey, _ = _display_image(image, *_value_range(image))
    grey = grey if grey.ndim == 2 else grey.mean(axis=-1)
    base = np.repeat(0.75 * grey[..., None], 3, axis=-1)
    true_colour = _instance_colours(np.unique(truth[truth > 0]))
    partner = {int(p): int(t) for t, p in np.asarray(pairs, dtype=np.int64).reshape(-1, 2)}
    false, missed = {int(k) for k in false}, {int(k) for k in missed}
    red, yellow = (1.0, 0.15, 0.15), (1.0, 0.95, 0.2)
    extra = _instance_colours(np.unique(found[found > 0]))
    for k in extra:                        # unscored predictions: the nucleus they mostly cover
        if k not in partner and k not in false:
            under = truth[found == k]
            under = under[under > 0]
            if len(under) * 2 > (found == k).sum():
                partner[k] = int(np.bincount(under).argmax())
    pred_colour = {k: red if k in false else true_colour.get(partner.get(k), extra[k])
                   for k in extra}
    wide = truth.shape[1] >= 2 * truth.shape[0]
    aspect = truth.shape[0] / truth.shape[1]
    figure = (_new_figure(12.0, 2 * (11.6 * aspect + 0.45) + 0.9) if wide
              else _new_figure(13.0, 6.3 * aspect + 1.0))
    panels = ((f"true nuclei ({len(true_colour)})", truth, true_colour),
              (f"predicted ({len(false)} false detections, {len(missed)} missed nuclei)",
               found, pred_colour))
    for p, (name, labels, colours) in enumerate(panels):
        axes = figure.add_subplot(2 if wide else 1, 1 if wide else 2, p + 1)
        paint = base.copy()
        for k, colour in colours.items():
            where = labels == k
            paint[where] = (1 - alpha) * paint[where] + alpha * np.asarray(colour)
        axes.imshow(paint, interpolation="nearest", extent=(-0.5, labels.shape[1] - 0.5,
                                                            labels.shape[0] - 0.5, -0.5))
        for k, colour in colours.items():
            _outline(axes, labels, k, colour, linewidths=1.2 if k in false else 0.8)
        if p == 1:
            for k in missed:
                if (truth == k).any():
                    _outline(axes, truth, k, yellow, linewidths=1.4, linestyles="dashed")
            for k in false:
                rows, cols = np.nonzero(found == k)
                if len(rows):
                    axes.plot(cols.mean(), rows.mean(), marker="x", color="white", markersize=6,
                              mew=2.0, path_effects=_dark_edge())
        for b, (start, stop) in enumerate(bands):
            for edge in (start, stop):
                if top < edge < bottom:
                    axes.axhline(edge - top - 0.5, color="white", linewidth=0.8, linestyle=(0, (4, 4)))
            if b < len(band_labels):
                axes.text(4, start - top + 3, band_labels[b], color="white", fontsize=7, va="top",
                          bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
        axes.set_xlim(-0.5, labels.shape[1] - 0.5)
        axes.set_ylim(labels.shape[0] - 0.5, -0.5)
        _hide_axes(axes)
        axes.set_title(name, fontsize=10)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.text(0.5, 0.01, "each nucleus its own colour; a matched prediction (IoU > 0.5) takes the "
                "colour of its nucleus; red with a cross: false detection; dashed yellow: missed nucleus",
                ha="center", va="bottom", fontsize=8)
    figure.tight_layout(rect=(0, 0.03, 1, 0.96 if title else 1))
    return _save_figure(figure, path)


# -- feature maps and filters -----------------------------------------------------------------------
def _all_layers(root) -> list:
    """``root`` and every layer nested in it, depth first, each once."""
    found, stack, seen = [], [root], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        stack.extend(reversed(getattr(layer, "layers", [])))
    return found


def _find_layer(model, chain, layer):
    """The layer meant by ``layer``: itself, a name (searched at any depth) or an index into
    the chain / ``model.layers``."""
    from minicnn.layers.base import Layer
    if isinstance(layer, Layer):
        return layer
    candidates = chain if chain is not None else model.layers
    if isinstance(layer, (int, np.integer)):
        if not -len(candidates) <= layer < len(candidates):
            raise ValueError(f"feature_maps: layer index {layer} is out of range for "
                             f"{len(candidates)} layers")
        return candidates[layer]
    if isinstance(layer, str):
        roots = chain if chain is not None else [model]
        for root in roots:
            for item in _all_layers(root):
                if item.name == layer:
                    return item
        names = [item.name for root in roots for item in _all_layers(root)]
        raise ValueError(f"feature_maps: no layer named {layer!r}; layers: {names}")
    raise TypeError(f"feature_maps: layer must be a Layer, a name or an index, "
                    f"got {type(layer).__name__}")


class _CallRecorder:
    """Wraps the ``call`` of some layers for one forward pass, recording the order of first
    calls (and each one's first output when ``keep_outputs``); ``restore()`` puts them back."""

    def __init__(self, layers, keep_outputs=True):
        self.layers, self.keep_outputs = list(layers), keep_outputs
        self.outputs, self.order = {}, []
        for layer in self.layers:
            object.__setattr__(layer, "call", self._recording(layer, layer.call))

    def _recording(self, layer, original):
        def call(inputs, training=False, **kwargs):
            output = original(inputs, training=training, **kwargs)
            if all(layer is not seen for seen in self.order):
                self.order.append(layer)
                if self.keep_outputs:
                    self.outputs[id(layer)] = output
            return output
        return call

    def restore(self):
        for layer in self.layers:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")


def _device_of(layers) -> str:
    for layer in layers:
        if layer.weights:
            return layer.weights[0].device
    return "cpu"


def feature_maps(model_or_layer_chain, image, layer) -> np.ndarray:
    """The activations of ``layer`` for one image: (H', W', C') for a convolutional layer.

    model_or_layer_chain: a Model (or any Layer) or a list of layers applied in order.
    image: (H, W, C) or (H, W) (one channel). layer: a Layer, its name, or an index into the
    list / ``model.layers``. Runs in inference mode (``training=False``) without a graph: the
    course's "extract the characteristics" a trained convolution finds in an image.
    """
    image = _host(image).astype(np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"feature_maps: image must be (H, W, C) or (H, W), got shape {image.shape}")
    chain = list(model_or_layer_chain) if isinstance(model_or_layer_chain, (list, tuple)) else None
    target = _find_layer(model_or_layer_chain, chain, layer)
    batch = Tensor(backend.to_device(image[None], _device_of(chain or [model_or_layer_chain])))
    with no_grad():
        if chain is not None:
            output, x = None, batch
            for item in chain:
                x = item(x, training=False)
                if item is target:
                    output = x
                    break
            if output is None:
                raise ValueError(f"feature_maps: layer {target.name!r} is not in the chain")
        else:
            recorder = _CallRecorder([target])
            try:
                model_or_layer_chain(batch, training=False)
            finally:
                recorder.restore()
            if id(target) not in recorder.outputs:
                raise ValueError(f"feature_maps: layer {target.name!r} was not called by the "
                                 "model's forward pass")
            output = recorder.outputs[id(target)]
    if isinstance(output, (list, tuple)):
        output = output[0]
    return _host(output)[0]


def plot_feature_maps(maps, path, max_maps: int = 16, title: str | None = None) -> str:
    """A grid of the first ``max_maps`` channels of ``maps`` (H, W, C), each on its own scale."""
    maps = _host(maps)
    if maps.ndim == 2:
        maps = maps[..., None]
    if maps.ndim != 3:
        raise ValueError(f"plot_feature_maps: maps must be (H, W, C), got shape {maps.shape}")
    if max_maps < 1:
        raise ValueError(f"plot_feature_maps: max_maps must be >= 1, got {max_maps}")
    count = min(max_maps, maps.shape[-1])
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    figure = _new_figure(2.2 * columns, 2.2 * rows + 0.5)
    for k in range(count):
        axes = figure.add_subplot(rows, columns, k + 1)
        axes.imshow(maps[..., k], cmap="viridis", interpolation="nearest")
        axes.set_title(f"map {k}", fontsize=8)
        _hide_axes(axes)
    figure.suptitle(title or f"feature maps ({count} of {maps.shape[-1]}, "
                             f"{maps.shape[0]}x{maps.shape[1]})", fontsize=10)
    figure.tight_layout()
    return _save_figure(figure, path)


def _kernel_of(conv_layer) -> np.ndarray:
    """The (kh, kw, in, out) kernel of a Conv2D-like layer (or the array itself)."""
    if isinstance(conv_layer, (Tensor, np.ndarray)) or backend.is_gpu_array(conv_layer):
        kernel = _host(conv_layer)
    else:
        weights = getattr(conv_layer, "weights", None)
        if weights is None:
            raise TypeError(f"plot_filters: expected a convolution layer or a kernel array, "
                            f"got {type(conv_layer).__name__}")
        named = getattr(conv_layer, "kernel", None)
        if named is None:
            named = next((w for w in weights if w.ndim == 4), None)
        if named is None:
            raise ValueError(f"plot_filters: layer {getattr(conv_layer, 'name', '?')!r} has no "
                             "4-D kernel (is it built? call it on a batch first)")
        kernel = _host(named)
    if kernel.ndim != 4:
        raise ValueError(f"plot_filters: kernel must be (kh, kw, in, out), got shape {kernel.shape}")
    return kernel


def plot_filters(conv_layer, path, max_in: int = 8, max_out: int = 16) -> str:
    """The learned kernels of a Conv2D (kernel (kh, kw, in, out)).

    A first layer on RGB input (in = 3): one colour tile per output channel (each filter
    scaled to [0, 1]); on one channel: one grey tile per output channel. Otherwise one tile per
    (input, output) pair, rows = input channels (at most ``max_in``), columns = output channels
    (at most ``max_out``), on one symmetric blue-white-red scale so signs compare.
    """
    kernel = _kernel_of(conv_layer)
    kh, kw, n_in, n_out = kernel.shape
    outs = min(n_out, max_out)
    if n_in == 3:
        columns = math.ceil(math.sqrt(outs))
        rows = math.ceil(outs / columns)
        figure = _new_figure(1.6 * columns, 1.6 * rows + 0.5)
        for k in range(outs):
            tile = kernel[..., k]
            span = tile.max() - tile.min()
            tile = (tile - tile.min()) / (span if span > 0 else 1.0)
            axes = figure.add_subplot(rows, columns, k + 1)
            axes.imshow(tile, interpolation="nearest")
            axes.set_title(f"out {k}", fontsize=7)
            _hide_axes(axes)
    else:
        ins = min(n_in, max_in)
        limit = float(np.abs(kernel[:, :, :ins, :outs]).max()) or 1.0
        figure = _new_figure(1.2 * outs + 1.0, 1.2 * ins + 0.6)
        for i in range(ins):
            for k in range(outs):
                axes = figure.add_subplot(ins, outs, i * outs + k + 1)
                axes.imshow(kernel[:, :, i, k], cmap="bwr", vmin=-limit, vmax=limit,
                            interpolation="nearest")
                _hide_axes(axes)
                if i == 0:
                    axes.set_title(f"out {k}", fontsize=7)
                if k == 0:
                    axes.set_ylabel(f"in {i}", fontsize=7)
    name = getattr(conv_layer, "name", "kernel")
    figure.suptitle(f"{name}: {kh}x{kw} filters, {n_in} in, {n_out} out", fontsize=9)
    figure.tight_layout()
    return _save_figure(figure, path)


# -- gradient flow ----------------------------------------------------------------------------------
def _own_weights(layer, kernels_only: bool) -> list:
    """The trainable weights a layer owns itself (not its sub-layers'); only the kernels
    (names ending in "kernel") when ``kernels_only``."""
    weights = list(getattr(layer, "_trainable_weights", []))
    if kernels_only:
        weights = [w for w in weights if (w.name or "").endswith("kernel")]
    return weights


def gradient_flow(model, x, y, loss, kernels_only: bool = True, training: bool = True) -> list:
    """After one forward and backward pass, the gradient norm reaching each layer's weights.

    Returns [(layer name, ||dL/dW||_2), ...] in depth order (the order the forward pass first
    calls each layer that owns weights), W being the layer's kernel(s) (all its trainable
    weights with ``kernels_only=False``). x: (N, H, W, C); y: the targets ``loss(y, model(x))``
    takes; loss: a ``minicnn.losses`` object, name, or callable. The model's gradients are reset
    first and left as computed; its non-trainable state (batch-norm moving statistics) is put
    back as it was. ``training`` is passed to the model (False: batch normalisation uses its
    moving statistics, dropout is off).
    """
    from minicnn import losses as losses_module
    loss_fn = losses_module.get(loss) if isinstance(loss, str) else loss
    device = model.device if model.weights else "cpu"
    x = x if isinstance(x, Tensor) else Tensor(backend.to_device(_host(x), device))
    layers = _all_layers(model)
    if not all(layer.built for layer in layers):
        with no_grad():                      # build every nested layer (some are made in build)
            model(x, training=False)
        layers = _all_layers(model)
    owners = [layer for layer in layers if _own_weights(layer, kernels_only)]
    state = [(w, w.data.copy()) for w in model.non_trainable_weights]
    recorder = _CallRecorder(owners, keep_outputs=False)
    try:
        model.zero_grad()
        loss_fn(y, model(x, training=training)).backward()
    finally:
        recorder.restore()
        for weight, saved in state:
            weight.data[...] = saved
    flow = []
    for layer in recorder.order:
        squares = 0.0
        for weight in _own_weights(layer, kernels_only):
            if weight.grad is not None:
                squares += float((_host(weight.grad).astype(np.float64) ** 2).sum())
        flow.append((layer.name, math.sqrt(squares)))
    return flow


def plot_gradient_flow(results: dict, path, title: str | None = None) -> str:
    """Gradient norm against layer depth (log scale), one curve per label, overlaid.

    results: {label: [(layer name, norm), ...]} as returned by ``gradient_flow``.
    """
    if not isinstance(results, dict) or not results:
        raise ValueError("plot_gradient_flow: results must be a non-empty dict "
                         "{label: [(layer name, norm), ...]}")
    figure = _new_figure(8.0, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    for label, flow in results.items():
        norms = np.array([norm for _, norm in flow], dtype=np.float64)
        norms = np.where(norms > 0, norms, np.nan)          # log scale: zero norms not drawn
        axes.plot(np.arange(1, len(norms) + 1), norms, marker="o", markersize=3,
                  label=f"{label} (first {flow[0][1]:.2e}, last {flow[-1][1]:.2e})")
    axes.set_yscale("log")
    axes.set_xlabel("layer (input side -> output side)")
    axes.set_ylabel("||dL/dW|| (log scale)")
    axes.set_title(title or "gradient reaching each layer's weights")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


def compare_gradient_flow(path=None, depth: int = 6, seed: int = 0, filters: int = 4,
                          image_size: int = 16, batch_size: int = 8, num_classes: int = 4,
                          batch_norm: bool = False) -> dict:
    """A deep plain CNN against the same CNN with residual bridges: gradient norm per layer.

    Builds ``SmallCNN(num_classes, filters, blocks=depth, kind=...)`` for kind "plain" and
    "residual" (same seed), runs one batch of synthetic data (N(0, 1) images, random labels,
    sparse cross-entropy on logits) through each, and returns
    {"plain": [(layer, norm), ...], "residual": [...]}, drawing both curves when ``path`` is
    given. The 1x1 projections on the residual net's bridges are left out, so both lists name
    the same layers (stem, two convolutions per block, head) at the same depths.

    batch_norm=False (default) runs the batch-norm layers in inference mode: freshly built
    (moving mean 0, variance 1, gamma 1, beta 0) they are the identity, so these are the nets
    without normalisation. There, with Glorot weights and ReLU, each plain conv layer halves the
    signal's variance on the way in and the error's on the way back, and at depth 6 (13 convs)
    the first layer's gradient is about a thousand times smaller than with the bridges, through
    which the error reaches the first layers undiminished (He et al. 2016): the course's point.
    batch_norm=True normalises with batch statistics (a real training step), which by itself
    keeps the plain net's gradients from vanishing (Ioffe and Szegedy 2015): both curves stay flat.
    """
    from minicnn.losses import SparseCategoricalCrossentropy
    from minicnn.models import SmallCNN
    from minicnn.rng import seed as seed_everything
    if depth < 1:
        raise ValueError(f"compare_gradient_flow: depth must be >= 1, got {depth}")
    data = np.random.default_rng(seed)
    x = data.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)
    y = data.integers(0, num_classes, size=batch_size)
    loss = SparseCategoricalCrossentropy(from_logits=True)
    results = {}
    for kind in ("plain", "residual"):
        seed_everything(seed)
        model = SmallCNN(num_classes, filters=filters, blocks=depth, kind=kind)
        flow = gradient_flow(model, x, y, loss, training=batch_norm)
        bridges = {stage.projection.name for stage in model.stages
                   if getattr(stage, "projection", None) is not None}
        results[kind] = [(name, norm) for name, norm in flow if name not in bridges]
    if path is not None:
        plot_gradient_flow(results, path, title=(
            f"gradient flow: SmallCNN, {depth} blocks, plain vs residual, "
            f"{'with' if batch_norm else 'without'} batch norm (seed {seed})"))
    return results
