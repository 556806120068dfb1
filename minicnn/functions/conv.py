"""Differentiable convolutions over NHWC tensors (``minicnn.Function`` subclasses over the kernels
of ``kernels.conv2d`` and ``kernels.depthwise``, run through ``kernels.dispatch``), and zero
padding / cropping. Settings are keyword-only, named as Keras' layers (``strides`` plural).

    conv2d(x, w, b=None, *, strides=1, padding="valid", dilation=1)
        x (N, H, W, C), w (kh, kw, C, O), b (O,) -> (N, Ho, Wo, O)
        y[n,i,j,o] = b[o] + sum_{a,b,c} w[a,b,c,o] xpad[n, i*sh + a*dh, j*sw + b*dw, c]
        dx = conv2d_transpose of dy with the same kernel; dw = sum over windows of x-window * dy
    conv2d_transpose(x, w, b=None, *, strides=1, padding="valid", dilation=1, output_padding=None)
        x (N, H, W, in), w (kh, kw, out, in) (Keras' layout) -> (N, Ho, Wo, out), Ho by Keras' rule
        the input gradient of a conv2d; its own backward is that conv2d (dx) and conv2d's filter
        gradient (dw)
    depthwise_conv2d(x, w, b=None, *, strides=1, padding="valid", dilation=1)
        x (N, H, W, C), w (kh, kw, C, M), b (C*M,) -> (N, Ho, Wo, C*M), channel c*M + m
    separable_conv2d(x, depthwise, pointwise, b=None, *, strides=1, padding="valid", dilation=1)
        depthwise_conv2d then a 1x1 conv2d with pointwise (1, 1, C*M, O)
    pad2d(x, padding)      zeros around H and W: int, (sym_h, sym_w) or
                           ((top, bottom), (left, right))
    crop2d(x, cropping)    removes rows/columns, same forms as pad2d

padding 'same' follows Keras/TensorFlow (the odd extra row/column at the bottom/right; PyTorch
pads symmetrically). Output sizes and paddings come from ``kernels.shapes``.
"""
from __future__ import annotations

from kernels import dispatch as K
from kernels.shapes import conv_transpose2d_geometry, normalize_padding
from kernels.windows import copy_of, crop, pad
from minicnn.tensor import Function


def _needs(fn):
    """Whether x, w and b need a gradient (False for a bias that was not given)."""
    return (fn.needs_input_grad + (False,))[:3]


class Conv2D(Function):
    """2D convolution (a cross-correlation) and its gradients, by the duality of kernels.conv2d:
    dx is the transposed convolution of dy, dw the filter gradient, db the sum of dy."""

    def __init__(self, strides=1, padding="valid", dilation=1):
        self.settings = dict(strides=strides, dilation=dilation, padding=padding)

    def forward(self, x, w, b=None):
        self.input_size, self.w, self.has_bias = x.shape[1:3], w, b is not None
        self.x = x if self.needs_input_grad[1] else None         # only dw reads x
        return K.conv2d_forward(x, w, b, **self.settings)

    def backward(self, g):
        need_x, need_w, need_b = _needs(self)
        dx = K.conv2d_transpose(g, self.w, output_size=self.input_size, **self.settings) \
            if need_x else None
        dw = K.conv2d_backward_filter(self.x, g, kernel_size=self.w.shape[:2], **self.settings) \
            if need_w else None
        db = K.bias_gradient(g) if need_b else None
        return (dx, dw, db) if self.has_bias else (dx, dw)


class Conv2DTranspose(Function):
    """Transposed convolution (Keras' Conv2DTranspose): the input gradient of a conv2d with the
    same kernel, whose backward is that conv2d (dx) and conv2d's filter gradient (dw)."""

    def __init__(self, strides=1, padding="valid", dilation=1, output_padding=None):
        self.strides, self.dilation = strides, dilation
        self.padding, self.output_padding = padding, output_padding

    def forward(self, x, w, b=None):
        output_size, pads = transpose_geometry(x, w, self.strides, self.dilation, self.padding,
                                               self.output_padding)
        # the convolution it transposes maps the output (output_size) back onto x
        self.twin = dict(strides=self.strides, dilation=self.dilation, padding=pads)
        self.x, self.w, self.has_bias = x, w, b is not None      # dw reads x, dx reads w
        return K.conv2d_transpose(x, w, b, output_size=output_size, **self.twin)

    def backward(self, g):
        need_x, need_w, need_b = _needs(self)
        dx = K.conv2d_forward(g, self.w, **self.twin) if need_x else None
        dw = K.conv2d_backward_filter(g, self.x, kernel_size=self.w.shape[:2], **self.twin) \
            if need_w else None
        db = K.bias_gradient(g) if need_b else None
        return (dx, dw, db) if self.has_bias else (dx, dw)


def transpose_geometry(x, w, strides, dilation, padding, output_padding):
    """Keras' output size of a transposed convolution of ``x: (N, H, W, in)`` with ``w: (kh, kw,
    out, in)``, and the padding of the convolution that maps it back (``kernels.shapes``)."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d_transpose: x and w must be 4-D ((N, H, W, in) and (kh, kw, out, "
                         f"in)), got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    try:
        if not isinstance(normalize_padding(padding, 2), str):
            raise ValueError(f"transposed convolution takes padding 'valid' or 'same', "
                             f"got {padding!r}")
        return conv_transpose2d_geometry(x.shape[1:3], w.shape[:2], strides, dilation, padding,
                                         output_padding)
    except ValueError as exc:
        raise ValueError(f"conv2d_transpose: {exc} (input {tuple(x.shape)}, kernel "
                         f"{tuple(w.shape)}, strides {strides}, dilation {dilation}, "
                         f"output_padding {output_padding})") from None


class DepthwiseConv2D(Function):
    """Depthwise convolution: each channel with its own ``M`` filters; output channel c*M + m."""

    def __init__(self, strides=1, padding="valid", dilation=1):
        self.settings = dict(strides=strides, dilation=dilation, padding=padding)

    def forward(self, x, w, b=None):
        self.input_size, self.w, self.has_bias = x.shape[1:3], w, b is not None
        self.x = x if self.needs_input_grad[1] else None         # only dw reads x
        return K.depthwise_conv2d_forward(x, w, b, **self.settings)

    def backward(self, g):
        need_x, need_w, need_b = _needs(self)
        dx = K.depthwise_conv2d_backward_input(g, self.w, input_size=self.input_size,
                                               **self.settings) if need_x else None
        dw = K.depthwise_conv2d_backward_filter(self.x, g, kernel_size=self.w.shape[:2],
                                                **self.settings) if need_w else None
        db = K.bias_gradient(g) if need_b else None
        return (dx, dw, db) if self.has_bias else (dx, dw)


def normalize_pad2d(padding, name="padding", fn="pad2d"):
    """Keras' ZeroPadding2D/Cropping2D forms -> ((top, bottom), (left, right)), all >= 0."""
    try:
        pairs = normalize_padding(padding, 2) if not isinstance(padding, str) else None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{fn}: {name} must be an int, (symmetric_height, symmetric_width) or "
                         f"((top, bottom), (left, right)) of ints >= 0, got {padding!r} "
                         f"({exc})") from None
    if pairs is None:
        raise ValueError(f"{fn}: {name} must be sizes, not a name, got {padding!r}")
    return pairs


class Pad2D(Function):
    """Zeros around the image: (N, H, W, C) -> (N, top + H + bottom, left + W + right, C);
    dx = the interior of dy."""

    def __init__(self, padding=1):
        self.pads = normalize_pad2d(padding)

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"pad2d: x must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
        y = pad(x, self.pads)
        return y.copy() if y is x else y

    def backward(self, g):
        dx = crop(g, self.pads)
        return dx.copy() if dx is g else dx


class Crop2D(Function):
    """Rows/columns cut from the borders: (N, H, W, C) -> (N, H - top - bottom, W - left - right,
    C); dx = dy with zeros where the border was."""

    def __init__(self, cropping=((0, 0), (0, 0))):
        self.crops = normalize_pad2d(cropping, "cropping", "crop2d")

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"crop2d: x must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
        (top, bottom), (left, right) = self.crops
        if top + bottom >= x.shape[1] or left + right >= x.shape[2]:
            raise ValueError(f"crop2d: cropping {self.crops} leaves nothing of an input of shape "
                             f"{tuple(x.shape)}")
        return copy_of(x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :])

    def backward(self, g):
        return pad(g, self.crops)


# -- the functional forms ---------------------------------------------------------------------

def _bias(b):
    return () if b is None else (b,)


def conv2d(x, w, b=None, *, strides=1, padding="valid", dilation=1):
    return Conv2D(strides, padding, dilation)(x, w, *_bias(b))


def conv2d_transpose(x, w, b=None, *, strides=1, padding="valid", dilation=1,
                     output_padding=None):
    return Conv2DTranspose(strides, padding, dilation, output_padding)(x, w, *_bias(b))


def depthwise_conv2d(x, w, b=None, *, strides=1, padding="valid", dilation=1):
    return DepthwiseConv2D(strides, padding, dilation)(x, w, *_bias(b))


def separable_conv2d(x, depthwise, pointwise, b=None, *, strides=1, padding="valid", dilation=1):
    """Depthwise convolution, then a 1x1 convolution mixing the channels (Keras'
    SeparableConv2D)."""
    mid = depthwise_conv2d(x, depthwise, strides=strides, padding=padding, dilation=dilation)
    return conv2d(mid, pointwise, b)


def pad2d(x, padding=1):
    return Pad2D(padding)(x)


def crop2d(x, cropping=((0, 0), (0, 0))):
    return Crop2D(cropping)(x)
