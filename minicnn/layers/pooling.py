"""Pooling and up-sampling layers with Keras 3's names, arguments and defaults (channels-last).

    MaxPooling2D(pool_size=(2, 2), strides=None, padding="valid")
        (N, H, W, C) -> (N, oh, ow, C); y[n,i,j,c] = max_(a,b) x[n, i*sh-top+a, j*sw-left+b, c]
    AveragePooling2D(pool_size=(2, 2), strides=None, padding="valid")
        y = mean of the window's real cells ('same' padding is left out of the count, as Keras/TF;
        PyTorch's AvgPool2d counts it by default)
    GlobalAveragePooling2D(keepdims=False)
        (N, H, W, C) -> (N, C) (or (N, 1, 1, C)); y[n,c] = mean_(h,w) x[n,h,w,c]
    UpSampling2D(size=(2, 2), interpolation="nearest")
        (N, H, W, C) -> (N, H*sh, W*sw, C); "nearest" repeats pixels, "bilinear" is Keras 3's
        image resize (half-pixel centres, edges clamped; PyTorch's align_corners=False)

strides default to pool_size; out = floor((n - pool) / stride) + 1 ('valid') or ceil(n / stride)
('same', padded as TF with the odd extra row/column at the bottom/right): kernels.shapes.
"""
from __future__ import annotations

from kernels.shapes import conv_output_length, normalize_tuple, normalize_upsampling
from minicnn.functions import pooling as F
from minicnn.layers.base import Layer, format_shape


def _check_data_format(layer, data_format):
    if data_format not in (None, "channels_last"):
        raise ValueError(f"{layer}: only data_format='channels_last' (NHWC) is supported, "
                         f"got {data_format!r}")


class _Pooling2D(Layer):
    """Shared arguments and output shape of MaxPooling2D and AveragePooling2D."""

    input_ndim = 4
    function = None

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None,
                 name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        kind = type(self).__name__
        _check_data_format(kind, data_format)
        self.pool_size = normalize_tuple(pool_size, 2, f"{kind}: pool_size", minimum=1)
        self.strides = self.pool_size if strides is None else \
            normalize_tuple(strides, 2, f"{kind}: strides", minimum=1)
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(f"{kind}: padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding.lower()

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        out = []
        for axis, size in enumerate((h, w)):
            if size is None:
                out.append(None)
                continue
            try:
                length = conv_output_length(size, self.pool_size[axis], self.strides[axis], 1,
                                            self.padding)
            except ValueError as exc:
                raise ValueError(f"{type(self).__name__} '{self.name}': input shape "
                                 f"{format_shape(input_shape)} is too small for pool_size "
                                 f"{self.pool_size} with padding '{self.padding}': {exc}") from None
            out.append(length)
        return (n, out[0], out[1], c)

    def build(self, input_shape):
        self.compute_output_shape(input_shape)       # fail early, naming the layer

    def call(self, inputs, training=False):
        return self.function(inputs, pool_size=self.pool_size, strides=self.strides,
                             padding=self.padding)

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size, "strides": self.strides,
                "padding": self.padding, "data_format": "channels_last"}


class MaxPooling2D(_Pooling2D):
    """Max pooling. x: (N, H, W, C) -> (N, out_h, out_w, C);
    y[n,i,j,c] = max over the window (padded cells never win); the gradient goes to the first
    maximum of each window (row-major), added up where windows overlap."""

    function = staticmethod(F.max_pool2d)


class AveragePooling2D(_Pooling2D):
    """Average pooling. x: (N, H, W, C) -> (N, out_h, out_w, C);
    y[n,i,j,c] = (1/|window|) sum over the window's real cells (Keras/TF exclude 'same' padding)."""

    function = staticmethod(F.avg_pool2d)


class GlobalAveragePooling2D(Layer):
    """x: (N, H, W, C) -> (N, C), or (N, 1, 1, C) with keepdims; y[n,c] = mean_(h,w) x[n,h,w,c]."""

    input_ndim = 4

    def __init__(self, data_format=None, keepdims=False, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        _check_data_format("GlobalAveragePooling2D", data_format)
        self.keepdims = bool(keepdims)

    def compute_output_shape(self, input_shape):
        n, _, _, c = input_shape
        return (n, 1, 1, c) if self.keepdims else (n, c)

    def call(self, inputs, training=False):
        return F.global_avg_pool2d(inputs, keepdims=self.keepdims)

    def get_config(self):
        return {**super().get_config(), "data_format": "channels_last", "keepdims": self.keepdims}


class UpSampling2D(Layer):
    """x: (N, H, W, C) -> (N, H*sh, W*sw, C).
    nearest:  y[n,i,j,c] = x[n, i // sh, j // sw, c]
    bilinear: y samples x at ((i + 0.5)/sh - 0.5, (j + 0.5)/sw - 0.5), linear between the two
              nearest rows and columns, clamped at the edges (Keras 3 / tf.image.resize)."""

    input_ndim = 4

    def __init__(self, size=(2, 2), data_format=None, interpolation="nearest", name=None,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        _check_data_format("UpSampling2D", data_format)
        self.size, self.interpolation = normalize_upsampling("UpSampling2D", size, interpolation)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        return (n, None if h is None else h * self.size[0],
                None if w is None else w * self.size[1], c)

    def call(self, inputs, training=False):
        return F.upsample2d(inputs, size=self.size, interpolation=self.interpolation)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "data_format": "channels_last",
                "interpolation": self.interpolation}


# Keras' aliases
MaxPool2D = MaxPooling2D
AvgPool2D = AveragePooling2D
GlobalAvgPool2D = GlobalAveragePooling2D
