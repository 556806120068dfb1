"""U-Net (Ronneberger, Fischer and Brox, 2015), assembled from minicnn's Keras-named layers.

``depth`` poolings. Encoder level l (0..depth-1): two (Conv2D 3x3 -> BatchNormalization -> ReLU)
with ``base_filters * 2**l`` filters, then MaxPooling2D(2). Bottleneck: the same block with
``base_filters * 2**depth`` filters (then Dropout when ``dropout > 0``, the paper's drop-out at the
end of the contracting path). Decoder level l (depth-1..0): Conv2DTranspose(base_filters * 2**l,
2, strides=2), Concatenate([up, encoder map]) — the encoder map cropped to the decoder's size
first when ``padding="valid"`` (the paper's "copy and crop") — then the two-conv block. A 1x1
Conv2D head returns ``num_classes`` logits per pixel.

Shapes: x (N, H, W, C) -> logits (N, H', W', num_classes); H' = H with 'same' padding (H a
multiple of 2**depth), and ``output_size(H)`` with 'valid' (572 -> 388 at depth 4).
"""
from __future__ import annotations

from minicnn import layers as kl
from minicnn.layers.base import Layer
from minicnn.layers.normalization import batch_norm_relu
from minicnn.models.model import Model


class ConvBlock(Layer):
    """Two (Conv2D 3x3 -> BatchNormalization -> ReLU): the unit of every U-Net level. Each batch
    norm's output goes to its ReLU alone, so in training the pair runs as one
    (``layers.normalization.batch_norm_relu``)."""

    input_ndim = 4

    def __init__(self, filters, padding="same", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.filters, self.padding = filters, padding
        self.conv1 = kl.Conv2D(filters, 3, padding=padding)
        self.bn1 = kl.BatchNormalization()
        self.relu1 = kl.ReLU()
        self.conv2 = kl.Conv2D(filters, 3, padding=padding)
        self.bn2 = kl.BatchNormalization()
        self.relu2 = kl.ReLU()

    def call(self, x, training=False):
        x = batch_norm_relu(self.bn1, self.relu1, self.conv1(x), training)
        return batch_norm_relu(self.bn2, self.relu2, self.conv2(x), training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "padding": self.padding}


class CropToMatch(Layer):
    """Centre-crop the first input (N, H, W, C) to the height and width of the second
    (N, h, w, c): the U-Net's "copy and crop" bridge. Odd margins leave the extra row/column
    at the bottom/right."""

    def call(self, inputs, training=False):
        x, reference = inputs
        (top, bottom), (left, right) = self._margins(x.shape, reference.shape)
        return x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :]

    def _margins(self, shape, reference):
        dh, dw = shape[1] - reference[1], shape[2] - reference[2]
        if dh < 0 or dw < 0:
            raise ValueError(f"CropToMatch '{self.name}': cannot crop {tuple(shape)} to the size "
                             f"of {tuple(reference)}")
        return (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)

    def compute_output_shape(self, input_shape):
        shape, reference = input_shape
        return (shape[0], reference[1], reference[2], shape[3])


def _level_sizes(size: int, depth: int, padding: str):
    """Spatial size after each stage, or None where the input size does not fit the depth."""
    shrink = 4 if padding == "valid" else 0
    encoder = []
    for _ in range(depth):
        size -= shrink
        if size < 2 or size % 2:
            return None
        encoder.append(size)
        size //= 2
    size -= shrink
    if size < 1:
        return None
    for _ in range(depth):
        size = size * 2 - shrink
        if size < 1:
            return None
    return encoder, size


class UNet(Model):
    """U-Net for semantic segmentation: (N, H, W, C) images -> (N, H', W', num_classes) logits.

    padding: "same" keeps the size (H must be a multiple of 2**depth); "valid" is the 2015
    paper's unpadded net with copy-and-crop bridges (use ``input_size_for(output)``).
    """

    input_ndim = 4

    def __init__(self, num_classes, base_filters=16, depth=4, padding="same", dropout=0.0,
                 name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if padding not in ("same", "valid"):
            raise ValueError(f"UNet: padding must be 'same' or 'valid', got {padding!r}")
        if depth < 1 or base_filters < 1 or num_classes < 1:
            raise ValueError(f"UNet: depth, base_filters and num_classes must be >= 1, got "
                             f"{depth}, {base_filters}, {num_classes}")
        self.num_classes, self.base_filters, self.depth = num_classes, base_filters, depth
        self.padding, self.dropout = padding, dropout
        width = [base_filters * 2 ** level for level in range(depth + 1)]
        self.encoder = [ConvBlock(width[level], padding) for level in range(depth)]
        self.pools = [kl.MaxPooling2D(2) for _ in range(depth)]
        self.bottleneck = ConvBlock(width[depth], padding)
        self.drop = kl.Dropout(dropout) if dropout > 0 else None
        self.ups = [kl.Conv2DTranspose(width[level], 2, strides=2) for level in reversed(range(depth))]
        self.crops = [CropToMatch() for _ in range(depth)] if padding == "valid" else []
        self.merges = [kl.Concatenate() for _ in range(depth)]
        self.decoder = [ConvBlock(width[level], padding) for level in reversed(range(depth))]
        self.head = kl.Conv2D(num_classes, 1)

    def call(self, x, training=False):
        self.check_input_size(x.shape[1:3])
        skips = []
        for block, pool in zip(self.encoder, self.pools):
            x = block(x, training=training)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x, training=training)
        if self.drop is not None:
            x = self.drop(x, training=training)
        for level, (up, merge, block) in enumerate(zip(self.ups, self.merges, self.decoder)):
            x = up(x)
            skip = skips.pop()
            if self.crops:
                skip = self.crops[level]([skip, x])
            x = block(merge([x, skip]), training=training)
        return self.head(x)

    # -- sizes ---------------------------------------------------------------------------------
    def output_size(self, input_size: int) -> int:
        """Output height (or width) for an input height (or width); ValueError if it does not fit."""
        sizes = _level_sizes(input_size, self.depth, self.padding)
        if sizes is None:
            raise ValueError(self._size_message(input_size))
        return sizes[1]

    def input_size_for(self, output_size: int) -> int:
        """The smallest input size whose output is at least ``output_size`` (equal for 'valid'
        nets whenever one exists)."""
        size = 1
        while _level_sizes(size, self.depth, self.padding) is None or \
                _level_sizes(size, self.depth, self.padding)[1] < output_size:
            size += 1
        return size

    def valid_sizes_near(self, size: int, count: int = 2) -> list:
        """The nearest input sizes that fit this depth and padding, below and above ``size``."""
        below = [s for s in range(size - 1, 0, -1) if _level_sizes(s, self.depth, self.padding)]
        above, s = [], size + 1
        while len(above) < count:
            if _level_sizes(s, self.depth, self.padding):
                above.append(s)
            s += 1
        return sorted(below[:count] + above)

    def _size_message(self, size) -> str:
        rule = (f"a multiple of 2**depth = {2 ** self.depth}" if self.padding == "same"
                else "one whose every encoder map has an even size")
        return (f"UNet(depth={self.depth}, padding={self.padding!r}): input size {size} does not "
                f"fit; it must be {rule}. Nearest sizes that work: {self.valid_sizes_near(size)}")

    def check_input_size(self, hw) -> None:
        for size in hw:
            if size is not None and _level_sizes(size, self.depth, self.padding) is None:
                raise ValueError(self._size_message(size))

    def get_config(self):
        return {"name": self.name, "num_classes": self.num_classes,
                "base_filters": self.base_filters, "depth": self.depth,
                "padding": self.padding, "dropout": self.dropout}


def predict_image(model: UNet, image, tile: int = 256, batch_size: int = 4):
    """Class scores (H, W, num_classes) of a whole image (H, W, C) of any size, by overlap-tile.

    Output tiles of at most ``tile`` pixels a side are each predicted from an input window
    ``margin`` pixels larger on every side, the image mirrored at its borders (the U-Net
    paper's overlap-tile strategy; the margin is 0 with 'same' padding).
    """
    import numpy as np
    image = np.asarray(image, dtype=np.float32)
    unit = 2 ** model.depth
    plan = []                                   # per axis: (output tile, input window, count)
    for length in image.shape[:2]:
        wanted = min(tile, -(-length // unit) * unit)
        window = model.input_size_for(wanted)
        out = model.output_size(window)
        plan.append((out, window, -(-length // out)))
    (out_h, win_h, rows), (out_w, win_w, cols) = plan
    margin_h, margin_w = (win_h - out_h) // 2, (win_w - out_w) // 2
    padded = np.pad(image, ((margin_h, rows * out_h - image.shape[0] + win_h - out_h - margin_h),
                            (margin_w, cols * out_w - image.shape[1] + win_w - out_w - margin_w),
                            (0, 0)), mode="symmetric")
    corners = [(r * out_h, c * out_w) for r in range(rows) for c in range(cols)]
    scores = np.zeros((rows * out_h, cols * out_w, model.num_classes), dtype=np.float32)
    for start in range(0, len(corners), batch_size):
        chunk = corners[start:start + batch_size]
        windows = np.stack([padded[r:r + win_h, c:c + win_w] for r, c in chunk])
        for (r, c), piece in zip(chunk, model.predict(windows, batch_size=batch_size)):
            scores[r:r + out_h, c:c + out_w] = piece
    return scores[:image.shape[0], :image.shape[1]]
