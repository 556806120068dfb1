"""What the sliding-window kernels share (convolution, depthwise convolution, pooling): argument
checks, padding and cropping of NHWC images, and the view of one kernel tap.

    tap(xpad, g, i, j)[n, oy, ox, c] = xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]

is what kernel tap (or pool cell) (i, j) meets at every output position: a strided view of the
padded input of shape (N, Ho, Wo, C), no copy; writing into it writes into ``xpad`` (the adjoints
add their gradients back through it). ``g`` is a ``kernels.shapes.Geometry``.
"""
from __future__ import annotations

from kernels.backend import get_array_module, is_floating
from kernels.shapes import conv_geometry


def check_images(fn: str, name: str, x):
    """x must be 4-D (N, H, W, C)."""
    if x.ndim != 4:
        raise ValueError(f"{fn}: {name} must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")


def check_float(fn: str, **arrays):
    """One floating dtype for all the named arrays (None skipped; bfloat16 counts): float32 stays
    float32."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    for name, dtype in dtypes.items():
        if not is_floating(dtype):
            raise TypeError(f"{fn}: {name} must be a floating array, got dtype {dtype}")
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"{fn}: all arrays must share one dtype, got {detail}")


def check_kernel(fn: str, x, w, b, kind: str, layout: str, bias_size):
    """x (N, H, W, C) and a 4-D kernel w of ``layout`` whose third axis is C; b (bias_size,) or
    None (``bias_size``: a function of w's shape); one floating dtype for all."""
    check_images(fn, "x", x)
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D {layout}, got shape {tuple(w.shape)}")
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"{fn}: x of shape {tuple(x.shape)} has {x.shape[3]} channels but the "
                         f"{kind} of shape {tuple(w.shape)} expects {w.shape[2]}")
    if b is not None and tuple(b.shape) != (bias_size(w.shape),):
        raise ValueError(f"{fn}: bias must have shape ({bias_size(w.shape)},) to match the {kind} "
                         f"{tuple(w.shape)}, got {tuple(b.shape)}")
    check_float(fn, x=x, w=w, b=b)


def check_shape(fn: str, name: str, a, expected):
    """a.shape must be ``expected`` (e.g. a gradient must have its output's shape)."""
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"{fn}: {name} must have the shape {tuple(expected)}, "
                         f"got {tuple(a.shape)}")


def filter_geometry(fn, x, grad_y, *, kernel_size, strides=1, dilation=1, padding="valid"):
    """Check ``x: (N, H, W, C)`` and ``grad_y: (N, Ho, Wo, O)`` for a ``kernel_size`` window
    (a filter gradient's inputs); return its ``Geometry``."""
    check_images(fn, "x", x)
    check_images(fn, "grad_y", grad_y)
    check_float(fn, x=x, grad_y=grad_y)
    g = conv_geometry(fn, x.shape[1:3], kernel_size, strides=strides, dilation=dilation,
                      padding=padding)
    check_shape(fn, "grad_y", grad_y, (x.shape[0], *g.out_hw, grad_y.shape[3]))
    return g


def pad(x, pads, value=0):
    """``x: (N, H, W, C)`` with ``pads = ((top, bottom), (left, right))`` rows and columns of
    ``value`` around H and W: a new array (``x`` itself when there is no padding)."""
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    out = xp.full((n, h + top + bottom, w + left + right, c), value, dtype=x.dtype)
    out[:, top:top + h, left:left + w] = x
    return out


def crop(xpad, pads):
    """The inverse of ``pad``: the interior as a new C-contiguous array (``xpad`` itself when
    there is no padding)."""
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return xpad
    return copy_of(xpad[:, top:xpad.shape[1] - bottom, left:xpad.shape[2] - right])


def copy_of(view):
    """A new C-contiguous array holding the values of ``view``."""
    out = get_array_module(view).empty(view.shape, dtype=view.dtype)
    out[...] = view
    return out


def product(a, b):
    """``a @ b`` in a's dtype (NumPy's product of bfloat16 arrays, ml_dtypes, is float32)."""
    return (a @ b).astype(a.dtype, copy=False)


def tap(xpad, g, i: int, j: int):
    """The view ``xpad[:, i*dh :: sh, j*dw :: sw]`` cut to (N, Ho, Wo, C): kernel tap (i, j) at
    every output position (see the module docstring)."""
    (ho, wo), (sh, sw), (dh, dw) = g.out_hw, g.strides, g.dilation
    return xpad[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
