"""Output sizes and padding of convolution, pooling and transposed convolution: one place only.

Rules (per spatial axis, ``k_eff = (k - 1) * d + 1`` the dilated kernel extent):

- 'valid':  out = floor((n - k_eff) / s) + 1, no padding; needs n >= k_eff.
- 'same':   out = ceil(n / s); total padding = max((out - 1) * s + k_eff - n, 0), split as
            Keras/TensorFlow do: before = total // 2, after = total - before (the odd extra
            row/column goes at the bottom/right; PyTorch pads symmetrically instead).
- explicit: an int p (p before and after) or a pair (before, after);
            out = floor((n + before + after - k_eff) / s) + 1.
- transposed convolution (Keras' ``deconv_output_length``):
            without output_padding: 'valid' -> n * s + max(k_eff - s, 0), 'same' -> n * s;
            with output_padding p:  (n - 1) * s + k_eff - 2 * pad + p, pad = k_eff // 2 for 'same'
            and 0 for 'valid'. Its padding is the padding of the forward convolution that maps
            the transposed output back to the transposed input: the 'same' rule on the output
            without output_padding, and before = max(k_eff // 2 - ceil(p / 2), 0) with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PADDING_NAMES = ("valid", "same")


def normalize_tuple(value, n: int, name: str, minimum: int | None = None) -> tuple:
    """``3 -> (3, 3)``; a sequence of length n stays; anything else raises ValueError naming ``name``."""
    if isinstance(value, (int,)) and not isinstance(value, bool):
        values = (int(value),) * n
    else:
        try:
            values = tuple(int(v) for v in value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}") from None
        if len(values) != n:
            raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    if minimum is not None and min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values


def normalize_padding(padding, n: int = 2):
    """'valid' / 'same' (any case), or explicit padding as n pairs ``((before, after), ...)``.

    Accepts an int p, a tuple of n ints (symmetric per axis) or n pairs.
    """
    if isinstance(padding, str):
        name = padding.lower()
        if name not in PADDING_NAMES:
            raise ValueError(f"padding must be 'valid', 'same' or explicit sizes, got {padding!r}")
        return name
    if isinstance(padding, int) and not isinstance(padding, bool):
        pairs = ((padding, padding),) * n
    else:
        items = tuple(padding)
        if len(items) != n:
            raise ValueError(f"explicit padding needs {n} entries, got {padding!r}")
        pairs = tuple((int(p), int(p)) if isinstance(p, int) else tuple(int(q) for q in p)
                      for p in items)
    if any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(f"explicit padding must be non-negative (before, after) pairs, got {padding!r}")
    return pairs


INTERPOLATIONS = ("nearest", "bilinear")


def normalize_upsampling(fn: str, size, interpolation):
    """Up-sampling settings: integer factors ``(sh, sw) >= 1`` and 'nearest' or 'bilinear'."""
    size = normalize_tuple(size, 2, "size", minimum=1)
    if not isinstance(interpolation, str) or interpolation.lower() not in INTERPOLATIONS:
        raise ValueError(f"{fn}: interpolation must be one of {INTERPOLATIONS}, "
                         f"got {interpolation!r}")
    return size, interpolation.lower()


def dilated_extent(kernel: int, dilation: int) -> int:
    """Extent of a kernel of size ``kernel`` with holes: (k - 1) * d + 1."""
    return (kernel - 1) * dilation + 1


def conv_padding_1d(size: int, kernel: int, stride: int, dilation: int, padding) -> tuple[int, int]:
    """(before, after) padding of one axis; ``padding`` is 'valid', 'same' or a (before, after) pair."""
    if padding == "valid":
        return 0, 0
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + dilated_extent(kernel, dilation) - size, 0)
        return total // 2, total - total // 2
    return int(padding[0]), int(padding[1])


def conv_output_length(size: int, kernel: int, stride: int = 1, dilation: int = 1,
                       padding="valid") -> int:
    """Output length of one axis of a convolution or pooling window; raises if it would be < 1."""
    if stride < 1 or dilation < 1 or kernel < 1:
        raise ValueError(f"kernel, stride and dilation must be >= 1, got kernel={kernel}, "
                         f"stride={stride}, dilation={dilation}")
    if size < 1:
        raise ValueError(f"input size must be >= 1, got {size}")
    before, after = conv_padding_1d(size, kernel, stride, dilation, padding)
    extent = dilated_extent(kernel, dilation)
    padded = size + before + after
    if padded < extent:
        raise ValueError(
            f"kernel of size {kernel} with dilation {dilation} spans {extent} pixels, more than the "
            f"input's {size} (padded: {padded}); the output would be empty")
    return (padded - extent) // stride + 1


def conv2d_geometry(in_hw, kernel_hw, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """Output size and padding of a 2D convolution.

    Returns ``(out_h, out_w), ((top, bottom), (left, right))``.
    """
    padding = normalize_padding(padding, 2)
    strides = normalize_tuple(strides, 2, "strides")
    dilation = normalize_tuple(dilation, 2, "dilation_rate")
    kernel_hw = normalize_tuple(kernel_hw, 2, "kernel_size")
    out, pads = [], []
    for axis in range(2):
        axis_padding = padding if isinstance(padding, str) else padding[axis]
        args = (in_hw[axis], kernel_hw[axis], strides[axis], dilation[axis])
        out.append(conv_output_length(*args, padding=axis_padding))
        pads.append(conv_padding_1d(*args, padding=axis_padding))
    return tuple(out), tuple(pads)


@dataclass(frozen=True)
class Geometry:
    """One sliding window's shapes: a convolution's, a depthwise convolution's or a pooling's."""
    in_hw: tuple          # (H, W) of the input
    kernel_hw: tuple      # (kh, kw): kernel or pool size
    out_hw: tuple         # (Ho, Wo)
    strides: tuple        # (sh, sw)
    dilation: tuple       # (dh, dw)
    pads: tuple           # ((top, bottom), (left, right))

    @property
    def padded_hw(self):
        (top, bottom), (left, right) = self.pads
        return self.in_hw[0] + top + bottom, self.in_hw[1] + left + right

    @property
    def tiles_exactly(self) -> bool:
        """The windows cover the input exactly once: kernel == stride, no dilation, no padding,
        H and W multiples of the kernel (the U-Net's 2x2 pooling and up-convolution)."""
        (ho, wo), (kh, kw) = self.out_hw, self.kernel_hw
        return self.kernel_hw == self.strides and self.dilation == (1, 1) \
            and (ho * kh, wo * kw) == self.in_hw and self.pads == ((0, 0), (0, 0))


def conv_geometry(fn: str, in_hw, kernel_hw, *, strides=1, dilation=1, padding="valid"):
    """The ``Geometry`` of a convolution window; ValueError naming ``fn`` and the shapes when the
    settings are invalid (a stride or dilation below 1, an empty output, an unknown padding)."""
    in_hw, kernel_hw = tuple(int(v) for v in in_hw), tuple(int(v) for v in kernel_hw)
    try:
        strides = normalize_tuple(strides, 2, "strides", minimum=1)
        dilation = normalize_tuple(dilation, 2, "dilation_rate", minimum=1)
        out_hw, pads = conv2d_geometry(in_hw, kernel_hw, strides, dilation, padding)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc} (input {in_hw}, kernel {kernel_hw}, strides {strides}, "
                         f"dilation {dilation}, padding {padding!r})") from None
    return Geometry(in_hw, kernel_hw, out_hw, strides, dilation, pads)


def pool_geometry(fn: str, in_hw, pool_size, *, strides=None, padding="valid"):
    """The ``Geometry`` of a pooling window (strides default to the pool size, as Keras)."""
    try:
        pool_size = normalize_tuple(pool_size, 2, "pool_size", minimum=1)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc}") from None
    return conv_geometry(fn, in_hw, pool_size, strides=pool_size if strides is None else strides,
                         padding=padding)


def pool2d_geometry(in_hw, pool_size, strides=None, padding="valid"):
    """Pooling is a convolution window without dilation; strides default to the pool size (Keras)."""
    pool_size = normalize_tuple(pool_size, 2, "pool_size")
    strides = pool_size if strides is None else strides
    return conv2d_geometry(in_hw, pool_size, strides, (1, 1), padding)


def conv_transpose_output_length(size: int, kernel: int, stride: int = 1, dilation: int = 1,
                                 padding="valid", output_padding=None) -> int:
    """Keras' rule for the output length of a transposed convolution along one axis."""
    if stride < 1 or dilation < 1 or kernel < 1 or size < 1:
        raise ValueError(f"size, kernel, stride and dilation must be >= 1, got size={size}, "
                         f"kernel={kernel}, stride={stride}, dilation={dilation}")
    extent = dilated_extent(kernel, dilation)
    if output_padding is None:
        if padding == "valid":
            return size * stride + max(extent - stride, 0)
        return size * stride
    if not 0 <= output_padding < stride:
        raise ValueError(f"output_padding must be >= 0 and smaller than the stride, "
                         f"got output_padding={output_padding}, stride={stride}")
    pad = extent // 2 if padding == "same" else 0
    length = (size - 1) * stride + extent - 2 * pad + output_padding
    if length < 1:
        raise ValueError(f"transposed convolution output would be empty: size={size}, "
                         f"kernel={kernel}, stride={stride}, output_padding={output_padding}")
    return length


def conv_transpose2d_geometry(in_hw, kernel_hw, strides=(1, 1), dilation=(1, 1), padding="valid",
                              output_padding=None):
    """Output size of a 2D transposed convolution and the padding of its forward twin.

    The transposed convolution maps ``in_hw`` to ``out_hw``; the forward convolution with the
    returned padding maps ``out_hw`` back to ``in_hw``. Returns ``out_hw, pads``.
    """
    padding = normalize_padding(padding, 2)
    if not isinstance(padding, str):
        raise ValueError("transposed convolution takes padding 'valid' or 'same'")
    strides = normalize_tuple(strides, 2, "strides")
    dilation = normalize_tuple(dilation, 2, "dilation_rate")
    kernel_hw = normalize_tuple(kernel_hw, 2, "kernel_size")
    if output_padding is not None:
        output_padding = normalize_tuple(output_padding, 2, "output_padding")
    out, pads = [], []
    for axis in range(2):
        op = None if output_padding is None else output_padding[axis]
        args = (kernel_hw[axis], strides[axis], dilation[axis])
        length = conv_transpose_output_length(in_hw[axis], *args, padding=padding,
                                              output_padding=op)
        extent = dilated_extent(kernel_hw[axis], dilation[axis])
        if padding == "same" and op is not None:
            # Keras' rule (its JAX and PyTorch backends; TensorFlow agrees where it is defined)
            before = max(extent // 2 - math.ceil(op / 2), 0)
        else:
            before = conv_padding_1d(length, *args, padding=padding)[0]
        # The forward twin maps ``length`` back onto ``in_hw``; surplus rows at the end (from
        # output_padding) are never read by it and receive zeros.
        after = max((in_hw[axis] - 1) * strides[axis] + extent - length - before, 0)
        if (length + before + after - extent) // strides[axis] + 1 != in_hw[axis]:
            raise ValueError(f"transposed convolution settings are inconsistent on axis {axis}: "
                             f"input {in_hw[axis]}, kernel {kernel_hw[axis]}, stride "
                             f"{strides[axis]}, output_padding {op}")
        out.append(length)
        pads.append((before, after))
    return tuple(out), tuple(pads)
