"""Differentiable convolutions over NHWC tensors (``minicnn.Function`` subclasses over
``kernels.conv2d`` and ``kernels.depthwise``), and zero padding / cropping.

    conv2d(x, w, b=None, stride=1, padding="valid", dilation=1)
        x (N, H, W, C), w (kh, kw, C, O), b (O,) -> (N, Ho, Wo, O)
        y[n,i,j,o] = b[o] + sum_{a,b,c} w[a,b,c,o] xpad[n, i*sh + a*dh, j*sw + b*dw, c]
        dx = conv2d_transpose(dy, w) (the same kernel), dw = sum over pixels of x-window * dy
    conv2d_transpose(x, w, b=None, stride=1, padding="valid", dilation=1, output_padding=None)
        x (N, H, W, in), w (kh, kw, out, in) (Keras' layout) -> (N, Ho, Wo, out)
        the input gradient of conv2d; its own backward is conv2d (and conv2d's filter gradient)
    depthwise_conv2d(x, w, b=None, stride=1, padding="valid", dilation=1)
        x (N, H, W, C), w (kh, kw, C, M), b (C*M,) -> (N, Ho, Wo, C*M), channel c*M + m
    separable_conv2d(x, depthwise, pointwise, b=None, stride=1, padding="valid", dilation=1)
        depthwise_conv2d then a 1x1 conv2d with pointwise (1, 1, C*M, O)
    pad2d(x, padding)      zeros around H and W: int, (sym_h, sym_w) or
                           ((top, bottom), (left, right))
    crop2d(x, cropping)    removes rows/columns, same forms as pad2d

padding 'same' follows Keras/TensorFlow (the odd extra row/column at the bottom/right; PyTorch
pads symmetrically). Output sizes and paddings come from ``kernels.shapes``.
"""
from __future__ import annotations

from kernels import conv2d as K
from kernels import depthwise as D
from kernels.shapes import normalize_padding
from minicnn.tensor import Function


def _needs(fn, index):
    """Whether input ``index`` needs a gradient (False for an input that was not given)."""
    return index < len(fn.needs_input_grad) and fn.needs_input_grad[index]


class Conv2D(Function):
    """2D convolution (cross-correlation). Forward keeps what the gradients read: the kernel
    (dx) and, only when the kernel needs a gradient, the forward's workspace (dw: the padded
    input or the window matrix, whichever algorithm ran), so nothing is computed twice."""

    def __init__(self, strides=1, padding="valid", dilation=1):
        self.strides, self.padding, self.dilation = strides, padding, dilation

    def forward(self, x, w, b=None):
        self.x_shape, self.w, self.has_bias = x.shape, w, b is not None
        self.workspace = None
        if not _needs(self, 1):
            return K.conv2d_forward(x, w, b, self.strides, self.dilation, self.padding)
        y, self.workspace = K.conv2d_forward(x, w, b, self.strides, self.dilation, self.padding,
                                             return_workspace=True)
        return y

    def backward(self, g):
        dx, dw, db = K.conv2d_backward(g, None, self.w, self.strides, self.dilation,
                                       self.padding, need_input=_needs(self, 0),
                                       need_filter=_needs(self, 1), need_bias=_needs(self, 2),
                                       workspace=self.workspace, x_shape=self.x_shape)
        return (dx, dw, db) if self.has_bias else (dx, dw)


class Conv2DTranspose(Function):
    """Transposed convolution (Keras' Conv2DTranspose): the input gradient of conv2d with the
    same kernel; its backward is that conv2d (dx) and conv2d's filter gradient (dw)."""

    def __init__(self, strides=1, padding="valid", dilation=1, output_padding=None):
        self.strides, self.padding, self.dilation = strides, padding, dilation
        self.output_padding = output_padding

    def forward(self, x, w, b=None):
        self.x, self.w, self.has_bias = x, w, b is not None   # dw reads x, dx reads w
        return K.conv2d_transpose_forward(x, w, b, self.strides, self.dilation, self.padding,
                                          self.output_padding)

    def backward(self, g):
        dx, dw, db = K.conv2d_transpose_backward(g, self.x, self.w, self.strides, self.dilation,
                                                 self.padding, self.output_padding,
                                                 need_input=_needs(self, 0),
                                                 need_filter=_needs(self, 1),
                                                 need_bias=_needs(self, 2))
        return (dx, dw, db) if self.has_bias else (dx, dw)


class DepthwiseConv2D(Function):
    """Depthwise convolution: each channel with its own ``M`` filters; output channel c*M + m."""

    def __init__(self, strides=1, padding="valid", dilation=1):
        self.strides, self.padding, self.dilation = strides, padding, dilation

    def forward(self, x, w, b=None):
        self.has_bias, self.x_shape = b is not None, x.shape
        self.x = x if _needs(self, 1) else None        # dw reads x
        self.w = w                                     # dx reads w (and w's shape is needed)
        return D.depthwise_conv2d_forward(x, w, b, self.strides, self.dilation, self.padding)

    def backward(self, g):
        dx, dw, db = D.depthwise_conv2d_backward(g, self.x, self.w, self.strides, self.dilation,
                                                 self.padding, need_input=_needs(self, 0),
                                                 need_filter=_needs(self, 1),
                                                 need_bias=_needs(self, 2),
                                                 x_shape=self.x_shape)
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
        y = K.pad_input(x, self.pads)
        return y.copy() if y is x else y

    def backward(self, g):
        dx = K.crop_padding(g, self.pads)
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
        return K.copy_of(x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :])

    def backward(self, g):
        return K.pad_input(g, self.crops)


# -- the functional forms ---------------------------------------------------------------------

def _bias(b):
    return () if b is None else (b,)


def conv2d(x, w, b=None, stride=1, padding="valid", dilation=1):
    return Conv2D(stride, padding, dilation)(x, w, *_bias(b))


def conv2d_transpose(x, w, b=None, stride=1, padding="valid", dilation=1, output_padding=None):
    return Conv2DTranspose(stride, padding, dilation, output_padding)(x, w, *_bias(b))


def depthwise_conv2d(x, w, b=None, stride=1, padding="valid", dilation=1):
    return DepthwiseConv2D(stride, padding, dilation)(x, w, *_bias(b))


def separable_conv2d(x, depthwise, pointwise, b=None, stride=1, padding="valid", dilation=1):
    """Depthwise convolution, then a 1x1 convolution mixing the channels (Keras'
    SeparableConv2D)."""
    return conv2d(depthwise_conv2d(x, depthwise, None, stride, padding, dilation), pointwise, b)


def pad2d(x, padding=1):
    return Pad2D(padding)(x)


def crop2d(x, cropping=((0, 0), (0, 0))):
    return Crop2D(cropping)(x)
