"""Convolution layers with Keras 3's names, arguments, defaults and weight shapes (channels-last).

    Conv2D(filters, kernel_size, strides=(1, 1), padding="valid", dilation_rate=(1, 1),
           activation=None, use_bias=True, kernel_initializer="glorot_uniform",
           bias_initializer="zeros")
        (N, H, W, C) -> (N, Ho, Wo, filters); weights kernel (kh, kw, C, filters), bias (filters,)
        y = activation(conv2d(x, kernel) + bias); conv2d is a cross-correlation (see kernels.conv2d)
    Conv2DTranspose(filters, kernel_size, strides, padding, output_padding=None, dilation_rate, ...)
        kernel (kh, kw, filters, C); the input gradient of Conv2D; output size by Keras' rule
    DepthwiseConv2D(kernel_size, strides, padding, depth_multiplier=1, dilation_rate, ...,
                    depthwise_initializer="glorot_uniform")
        kernel (kh, kw, C, depth_multiplier), bias (C * depth_multiplier,); channel c*M + m
    SeparableConv2D(filters, kernel_size, strides, padding, dilation_rate, depth_multiplier=1, ...,
                    depthwise_initializer, pointwise_initializer, bias_initializer)
        depthwise then a 1x1 convolution: depthwise_kernel (kh, kw, C, M),
        pointwise_kernel (1, 1, C*M, filters), bias (filters,)
    SpatialSeparableConv2D(filters, kernel_size, strides, padding, dilation_rate, ...)
        not in Keras: the course's spatially separable convolution, a (kh x 1) convolution
        (vertical_kernel (kh, 1, C, filters), no bias) then a (1 x kw) one
        (horizontal_kernel (1, kw, filters, filters), bias (filters,)); the same output size as a
        (kh x kw) Conv2D, with kh*C*F + kw*F*F + F weights instead of kh*kw*C*F + F
    ZeroPadding2D(padding=(1, 1))    zeros around H and W
    Cropping2D(cropping=((0, 0), (0, 0)))   rows/columns cut from the borders

padding 'same' follows Keras/TensorFlow: out = ceil(n / stride), the odd extra row/column of
padding at the bottom/right (PyTorch pads symmetrically). As Keras 3, strides > 1 together with
dilation_rate > 1 is refused. Output sizes come from kernels.shapes.
"""
from __future__ import annotations

import numpy as np

from kernels.shapes import conv_output_length, conv_transpose_output_length, normalize_tuple
from minicnn.functions import activations as A
from minicnn.functions import conv as F
from minicnn.layers.base import Layer, format_shape
from minicnn.layers.core import _activation_name, initializer_config
from minicnn.tensor import Tensor


def _check_positive_int(layer, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{layer}: {name} must be a positive int, got {value!r}")
    return int(value)


def _check_unsupported(layer, **arguments):
    for name, value in arguments.items():
        if value is not None:
            raise ValueError(f"{layer}: {name} is not supported (got {value!r})")


def _check_data_format(layer, data_format):
    if data_format not in (None, "channels_last"):
        raise ValueError(f"{layer}: only data_format='channels_last' (NHWC) is supported, "
                         f"got {data_format!r}")


class _BaseConv(Layer):
    """What every convolution layer shares: kernel size, strides, padding, dilation, activation,
    the Keras checks of those arguments, and the output shape."""

    input_ndim = 4

    def __init__(self, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), activation=None, use_bias=True, bias_initializer="zeros",
                 name=None, kernel_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, kernel_constraint=None, bias_constraint=None,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        kind = type(self).__name__
        _check_data_format(kind, data_format)
        _check_unsupported(kind, kernel_regularizer=kernel_regularizer,
                           bias_regularizer=bias_regularizer,
                           activity_regularizer=activity_regularizer,
                           kernel_constraint=kernel_constraint, bias_constraint=bias_constraint)
        self.kernel_size = normalize_tuple(kernel_size, 2, f"{kind}: kernel_size", minimum=1)
        self.strides = normalize_tuple(strides, 2, f"{kind}: strides", minimum=1)
        self.dilation_rate = normalize_tuple(dilation_rate, 2, f"{kind}: dilation_rate",
                                             minimum=1)
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:
            raise ValueError(f"{kind}: `strides > 1` not supported in conjunction with "
                             f"`dilation_rate > 1` (as Keras). Received: strides={self.strides} "
                             f"and dilation_rate={self.dilation_rate}")
        if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
            raise ValueError(f"{kind}: padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding.lower()
        self.activation = activation
        self.fn = A.get(activation)
        self.use_bias = bool(use_bias)
        self.bias_initializer = bias_initializer
        self.bias = None

    def _cast(self, inputs):
        """The input in the layer's compute dtype, as Keras autocasts: a constant (an image
        batch, even uint8) is converted; a tensor that needs a gradient must already match
        (under a mixed policy ``Layer.__call__`` has cast it already)."""
        if inputs.dtype == self.compute_dtype:
            return inputs
        if inputs.requires_grad:
            raise TypeError(f"{type(self).__name__} '{self.name}': input dtype {inputs.dtype} "
                            f"differs from the layer's {self.compute_dtype}; build the layer "
                            f"with dtype='{inputs.dtype}' or cast the input first")
        return Tensor(inputs.data.astype(self.compute_dtype))

    def _input_channels(self, input_shape):
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(f"{type(self).__name__} '{self.name}': expected input (N, H, W, C) "
                             f"with known channels, got shape {format_shape(input_shape)}")
        return int(input_shape[-1])

    def _spatial(self, input_shape, length):
        """Output (Ho, Wo) from ``length(size, axis)``; None stays None; errors name the layer."""
        out = []
        for axis, size in enumerate(input_shape[1:3]):
            if size is None:
                out.append(None)
                continue
            try:
                out.append(length(size, axis))
            except ValueError as exc:
                raise ValueError(f"{type(self).__name__} '{self.name}': input shape "
                                 f"{format_shape(input_shape)} does not fit kernel_size "
                                 f"{self.kernel_size}, strides {self.strides}, dilation_rate "
                                 f"{self.dilation_rate}, padding '{self.padding}': {exc}") from None
        return tuple(out)

    def _conv_spatial(self, input_shape, kernel_size=None):
        kernel_size = kernel_size or self.kernel_size
        return self._spatial(input_shape, lambda size, axis: conv_output_length(
            size, kernel_size[axis], self.strides[axis], self.dilation_rate[axis], self.padding))

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "strides": self.strides,
                "padding": self.padding, "data_format": "channels_last",
                "dilation_rate": self.dilation_rate,
                "activation": _activation_name(self.activation), "use_bias": self.use_bias,
                "bias_initializer": initializer_config(self.bias_initializer)}


class Conv2D(_BaseConv):
    """2D convolution: x (N, H, W, C) -> (N, Ho, Wo, filters);
    y = activation(conv2d(x, kernel) + bias), kernel (kh, kw, C, filters), bias (filters,)."""

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), groups=1, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", name=None,
                 **kwargs):
        super().__init__(kernel_size, strides, padding, data_format, dilation_rate, activation,
                         use_bias, bias_initializer, name=name, **kwargs)
        self.filters = _check_positive_int(type(self).__name__, "filters", filters)
        if groups != 1:
            raise ValueError(f"{type(self).__name__}: groups={groups!r} is not supported "
                             "(only 1; DepthwiseConv2D covers groups == channels)")
        self.kernel_initializer = kernel_initializer

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        self.compute_output_shape(input_shape)       # fail early, naming the layer
        self.kernel = self.add_weight("kernel", (*self.kernel_size, channels, self.filters),
                                      self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self._conv_spatial(input_shape), self.filters)

    def call(self, inputs, training=False):
        y = F.conv2d(self._cast(inputs), self.cast_weight(self.kernel),
                     self.cast_weight(self.bias), strides=self.strides, padding=self.padding,
                     dilation=self.dilation_rate)
        return self.fn(y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "groups": 1,
                "kernel_initializer": initializer_config(self.kernel_initializer)}


class Conv2DTranspose(_BaseConv):
    """Transposed convolution: x (N, H, W, C) -> (N, Ho, Wo, filters), kernel
    (kh, kw, filters, C) as Keras; Ho = H*s + max(k_eff - s, 0) ('valid'), H*s ('same'), or with
    output_padding p: (H-1)*s + k_eff + p ('valid'), (H-1)*s + k_eff % 2 + p ('same')."""

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", output_padding=None,
                 data_format=None, dilation_rate=(1, 1), activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", name=None,
                 **kwargs):
        super().__init__(kernel_size, strides, padding, data_format, dilation_rate, activation,
                         use_bias, bias_initializer, name=name, **kwargs)
        kind = type(self).__name__
        self.filters = _check_positive_int(kind, "filters", filters)
        self.output_padding = None
        if output_padding is not None:
            self.output_padding = normalize_tuple(output_padding, 2, f"{kind}: output_padding",
                                                  minimum=0)
            if any(p >= s for p, s in zip(self.output_padding, self.strides)):
                raise ValueError(f"{kind}: `output_padding` must be < `strides`. "
                                 f"output_padding={self.output_padding}, strides={self.strides}")
        self.kernel_initializer = kernel_initializer

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        self.compute_output_shape(input_shape)
        self.kernel = self.add_weight("kernel", (*self.kernel_size, self.filters, channels),
                                      self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer)

    def compute_output_shape(self, input_shape):
        def length(size, axis):
            op = None if self.output_padding is None else self.output_padding[axis]
            return conv_transpose_output_length(size, self.kernel_size[axis], self.strides[axis],
                                                self.dilation_rate[axis], self.padding, op)
        return (input_shape[0], *self._spatial(input_shape, length), self.filters)

    def call(self, inputs, training=False):
        y = F.conv2d_transpose(self._cast(inputs), self.cast_weight(self.kernel),
                               self.cast_weight(self.bias), strides=self.strides,
                               padding=self.padding, dilation=self.dilation_rate,
                               output_padding=self.output_padding)
        return self.fn(y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "output_padding": self.output_padding,
                "kernel_initializer": initializer_config(self.kernel_initializer)}


class DepthwiseConv2D(_BaseConv):
    """Depthwise convolution: x (N, H, W, C) -> (N, Ho, Wo, C * depth_multiplier); kernel
    (kh, kw, C, depth_multiplier), bias (C * depth_multiplier,); output channel c*M + m is
    input channel c with filter m."""

    def __init__(self, kernel_size, strides=(1, 1), padding="valid", depth_multiplier=1,
                 data_format=None, dilation_rate=(1, 1), activation=None, use_bias=True,
                 depthwise_initializer="glorot_uniform", bias_initializer="zeros", name=None,
                 depthwise_regularizer=None, depthwise_constraint=None, **kwargs):
        super().__init__(kernel_size, strides, padding, data_format, dilation_rate, activation,
                         use_bias, bias_initializer, name=name,
                         kernel_regularizer=depthwise_regularizer,
                         kernel_constraint=depthwise_constraint, **kwargs)
        self.depth_multiplier = _check_positive_int(type(self).__name__, "depth_multiplier",
                                                    depth_multiplier)
        self.depthwise_initializer = depthwise_initializer

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        self.compute_output_shape(input_shape)
        self.kernel = self.add_weight("kernel", (*self.kernel_size, channels,
                                                 self.depth_multiplier),
                                      self.depthwise_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (channels * self.depth_multiplier,),
                                        self.bias_initializer)

    def compute_output_shape(self, input_shape):
        channels = self._input_channels(input_shape)
        return (input_shape[0], *self._conv_spatial(input_shape),
                channels * self.depth_multiplier)

    def call(self, inputs, training=False):
        y = F.depthwise_conv2d(self._cast(inputs), self.cast_weight(self.kernel),
                               self.cast_weight(self.bias), strides=self.strides,
                               padding=self.padding, dilation=self.dilation_rate)
        return self.fn(y)

    def get_config(self):
        return {**super().get_config(), "depth_multiplier": self.depth_multiplier,
                "depthwise_initializer": initializer_config(self.depthwise_initializer)}


class SeparableConv2D(_BaseConv):
    """Depthwise-separable convolution: a depthwise convolution (depthwise_kernel
    (kh, kw, C, M)), then a 1x1 convolution (pointwise_kernel (1, 1, C*M, filters)) plus bias."""

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), depth_multiplier=1, activation=None, use_bias=True,
                 depthwise_initializer="glorot_uniform", pointwise_initializer="glorot_uniform",
                 bias_initializer="zeros", name=None, depthwise_regularizer=None,
                 pointwise_regularizer=None, depthwise_constraint=None,
                 pointwise_constraint=None, **kwargs):
        super().__init__(kernel_size, strides, padding, data_format, dilation_rate, activation,
                         use_bias, bias_initializer, name=name,
                         kernel_regularizer=depthwise_regularizer or pointwise_regularizer,
                         kernel_constraint=depthwise_constraint or pointwise_constraint,
                         **kwargs)
        kind = type(self).__name__
        self.filters = _check_positive_int(kind, "filters", filters)
        self.depth_multiplier = _check_positive_int(kind, "depth_multiplier", depth_multiplier)
        self.depthwise_initializer = depthwise_initializer
        self.pointwise_initializer = pointwise_initializer

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        self.compute_output_shape(input_shape)
        mult = self.depth_multiplier
        self.depthwise_kernel = self.add_weight("depthwise_kernel",
                                                (*self.kernel_size, channels, mult),
                                                self.depthwise_initializer)
        self.pointwise_kernel = self.add_weight("pointwise_kernel",
                                                (1, 1, channels * mult, self.filters),
                                                self.pointwise_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self._conv_spatial(input_shape), self.filters)

    def call(self, inputs, training=False):
        y = F.separable_conv2d(self._cast(inputs), self.cast_weight(self.depthwise_kernel),
                               self.cast_weight(self.pointwise_kernel),
                               self.cast_weight(self.bias), strides=self.strides,
                               padding=self.padding, dilation=self.dilation_rate)
        return self.fn(y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "depth_multiplier": self.depth_multiplier,
                "depthwise_initializer": initializer_config(self.depthwise_initializer),
                "pointwise_initializer": initializer_config(self.pointwise_initializer)}


class SpatialSeparableConv2D(_BaseConv):
    """The course's spatially separable convolution (not a Keras layer): a (kh x 1) convolution
    C -> filters, then a (1 x kw) convolution filters -> filters plus bias. Strides, dilation
    and padding act on the rows in the first and on the columns in the second, so the output
    has the shape of a (kh x kw) Conv2D; with filters = C = 1 it is the rank-one kernel
    vertical (x) horizontal, e.g. Sobel = [1, 2, 1]^T [1, 0, -1]."""

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", name=None,
                 **kwargs):
        super().__init__(kernel_size, strides, padding, data_format, dilation_rate, activation,
                         use_bias, bias_initializer, name=name, **kwargs)
        self.filters = _check_positive_int(type(self).__name__, "filters", filters)
        self.kernel_initializer = kernel_initializer

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        self.compute_output_shape(input_shape)
        (kh, kw), f = self.kernel_size, self.filters
        self.vertical_kernel = self.add_weight("vertical_kernel", (kh, 1, channels, f),
                                               self.kernel_initializer)
        self.horizontal_kernel = self.add_weight("horizontal_kernel", (1, kw, f, f),
                                                 self.kernel_initializer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (f,), self.bias_initializer)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self._conv_spatial(input_shape), self.filters)

    def call(self, inputs, training=False):
        (sh, sw), (dh, dw) = self.strides, self.dilation_rate
        # 'same' pads only along the axis whose kernel is longer than 1 (the other has k = 1,
        # stride 1), so both steps together pad exactly as a (kh x kw) 'same' Conv2D.
        rows = F.conv2d(self._cast(inputs), self.cast_weight(self.vertical_kernel),
                        strides=(sh, 1), padding=self.padding, dilation=(dh, 1))
        y = F.conv2d(rows, self.cast_weight(self.horizontal_kernel), self.cast_weight(self.bias),
                     strides=(1, sw), padding=self.padding, dilation=(1, dw))
        return self.fn(y)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_initializer": initializer_config(self.kernel_initializer)}


class ZeroPadding2D(Layer):
    """Zeros around the image: (N, H, W, C) -> (N, top + H + bottom, left + W + right, C).
    padding: int, (symmetric_height, symmetric_width) or ((top, bottom), (left, right))."""

    input_ndim = 4

    def __init__(self, padding=(1, 1), data_format=None, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        _check_data_format("ZeroPadding2D", data_format)
        self.padding = F.normalize_pad2d(padding, "padding", "ZeroPadding2D")

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        (top, bottom), (left, right) = self.padding
        return (n, None if h is None else h + top + bottom,
                None if w is None else w + left + right, c)

    def call(self, inputs, training=False):
        return F.pad2d(inputs, self.padding)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "data_format": "channels_last"}


class Cropping2D(Layer):
    """Rows/columns cut from the borders: (N, H, W, C) -> (N, H - top - bottom, W - left - right,
    C). cropping: int, (symmetric_height, symmetric_width) or ((top, bottom), (left, right))."""

    input_ndim = 4

    def __init__(self, cropping=((0, 0), (0, 0)), data_format=None, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        _check_data_format("Cropping2D", data_format)
        self.cropping = F.normalize_pad2d(cropping, "cropping", "Cropping2D")

    def build(self, input_shape):
        self.compute_output_shape(input_shape)        # fail early, naming the layer

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        out = [None if size is None else size - a - b
               for size, (a, b) in zip((h, w), self.cropping)]
        if any(size is not None and size < 1 for size in out):
            raise ValueError(f"Cropping2D '{self.name}': cropping {self.cropping} leaves nothing "
                             f"of input shape {format_shape(input_shape)}")
        return (n, out[0], out[1], c)

    def call(self, inputs, training=False):
        return F.crop2d(inputs, self.cropping)

    def get_config(self):
        return {**super().get_config(), "cropping": self.cropping,
                "data_format": "channels_last"}


# Keras' aliases
Convolution2D = Conv2D
Convolution2DTranspose = Conv2DTranspose
SeparableConvolution2D = SeparableConv2D
