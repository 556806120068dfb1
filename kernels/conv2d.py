"""2D convolution, NHWC input and HWIO kernel: forward, both backwards, and the transposed twin.

Shapes: ``x: (N, H, W, C)``, ``w: (kh, kw, C, O)``, ``b: (O,)``, ``y: (N, Ho, Wo, O)``.
With ``xpad`` the zero-padded input (padding from ``kernels.shapes.conv2d_geometry``)::

    y[n, oy, ox, o] = b[o] + sum_{i, j, c} w[i, j, c, o] * xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]

This is a cross-correlation, as in every deep-learning library. The course writes it centred on
the output pixel, ``(f * w)(x, y) = sum_{dx=-a..a} sum_{dy=-b..b} w(a+dx, b+dy) f(x+dx, y+dy)``;
``conv2d_reference`` keeps that form.

Fast algorithms, picked by ``choose_algorithm`` from the shapes (measured with
benchmarks/bench_conv.py; the forward and the filter gradient share one, since the filter
gradient reads the forward's workspace):

- ``"im2col"`` (Chainer): copy every kernel window into one matrix
  ``cols: (N*Ho*Wo, kh*kw*C)`` and do ONE matrix product ``y = cols @ w``. Any stride. The filter
  gradient reuses ``cols``: ``dw = cols.T @ dy``. Used for strides > 1, 1x1 kernels, few input
  channels (a 3-channel image: K = 27 is a good product, K = 3 is not), small images, and
  always on the GPU (CuPy arrays), where ``im2col``/``col2im`` are the CUDA kernels of
  ``kernels.cuda`` and one large product per layer is what the GPU does well.
- ``"shifted"`` (stride 1): flatten the padded input over ``(N, Hp, Wp)``; kernel offset (i, j)
  is then a *contiguous* slice of rows starting ``i*dh*Wp + j*dw`` further on, so
  ``y = sum_ij xflat[shift_ij:] @ w[i, j]``. The kw offsets of one kernel row are copied side
  by side once per chunk of rows (``row_taps``, L2-sized), giving kh products of K = kw*C
  instead of kh*kw thin ones. The rows that straddle a border are computed and dropped
  (``Hp*Wp / (Ho*Wo)`` extra work). Used for 8 or more channels on images where that waste is
  small (32x32 and larger with a 3x3 kernel), where the im2col copy costs about as much as the
  product.

Input gradient: for stride 1 it is itself a forward convolution (of dy, padded by the window's
reach minus the padding, with the kernel turned 180 degrees and its channel axes swapped), so
it runs the same tuned kernels; for larger strides ``col2im(dy @ w.T)``.

Threads (NumPy): every kernel cuts its work into pieces of whole images (or bands of rows of
one image when the images do not share out evenly, see ``split_work``), one per thread of
``kernels.cpu.parallel_map`` ($MINICNN_NUM_THREADS), and holds OpenBLAS to one thread
per product meanwhile (``single_threaded_blas``). OpenBLAS splitting each thin product itself
left the copies and sums around it on one core and spun its helper thread between calls;
measured on two cores, the U-Net's conv backward went from 2.8x to 1.9x its forward and the
large training step from 300-310 to 229-242 ms (benchmarks/RESULTS.md). Convolutions too small
to share out run as one piece (``_PARALLEL_MIN_MACS``).
Partial sums over pieces (dw, db) are added in piece order: results are deterministic for a
given thread count.

Temporaries that never leave a call are reused between calls (``scratch``, per thread): on the
CPU a fresh multi-megabyte array costs a page fault per page, comparable to the products
themselves (``kernels.cpu.retain_freed_memory`` does the same for every array, process-wide,
opt-in).

Backward (chain rule on the sum above)::

    dw[i, j, c, o] = sum_{n, oy, ox} xpad[n, oy*sh + i*dh, ox*sw + j*dw, c] * dy[n, oy, ox, o]
    dxpad[n, oy*sh + i*dh, ox*sw + j*dw, c] += sum_o w[i, j, c, o] * dy[n, oy, ox, o]
    db[o] = sum_{n, oy, ox} dy[n, oy, ox, o]

Transposed convolution (Keras ``Conv2DTranspose``, kernel ``(kh, kw, out, in)``) is the input
gradient of the forward convolution whose HWIO kernel is that same array: its forward *is*
``conv2d_backward_input`` and its backward *is* ``conv2d_forward`` plus ``conv2d_backward_filter``
with the two activations swapped (see ``conv2d_transpose_*``).

References: Dumoulin & Visin, "A guide to convolution arithmetic for deep learning" (2016);
Chainer ``chainer/utils/conv.py``; Keras 3 ``Conv2D`` / ``Conv2DTranspose`` documentation.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from kernels import cuda
from kernels.backend import cuda_kernels_enabled, get_array_module, is_floating
from kernels.cpu import (blas_threads_controllable, num_threads, parallel_map, recently_parallel,
                         single_threaded_blas)
from kernels.shapes import (conv2d_geometry, conv_transpose2d_geometry, normalize_padding,
                            normalize_tuple)

ALGORITHMS = ("im2col", "shifted")

# "shifted" computes the whole padded grid; above this much extra work im2col wins (measured:
# 64x64 and 32x32 images with a 3x3 'same' kernel are below it, 16x16 (1.27) is above).
_SHIFTED_MAX_WASTE = 1.2
# Below this many input channels one product per offset is too thin (K = C) to run fast.
_SHIFTED_MIN_CHANNELS = 8


# --------------------------------------------------------------------------- checks and geometry

@dataclass(frozen=True)
class ConvGeometry:
    """Everything the kernels need to know about one convolution's shapes."""
    in_hw: tuple          # (H, W) of the input
    kernel_hw: tuple      # (kh, kw)
    out_hw: tuple         # (Ho, Wo)
    strides: tuple        # (sh, sw)
    dilation: tuple       # (dh, dw)
    pads: tuple           # ((top, bottom), (left, right))

    @property
    def padded_hw(self):
        (top, bottom), (left, right) = self.pads
        return self.in_hw[0] + top + bottom, self.in_hw[1] + left + right


def conv_geometry(fn: str, in_hw, kernel_hw, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """Normalise the settings and compute output size and padding (via ``kernels.shapes``).

    Raises ValueError naming ``fn`` and the shapes when the settings are invalid.
    """
    try:
        strides = normalize_tuple(strides, 2, "strides", minimum=1)
        dilation = normalize_tuple(dilation, 2, "dilation_rate", minimum=1)
        out_hw, pads = conv2d_geometry(tuple(in_hw), tuple(kernel_hw), strides, dilation, padding)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc} (input {tuple(in_hw)}, kernel {tuple(kernel_hw)}, "
                         f"strides {strides}, dilation {dilation}, padding {padding!r})") from None
    return ConvGeometry(tuple(in_hw), tuple(kernel_hw), out_hw, strides, dilation, pads)


def _check_float(fn: str, **arrays):
    """Same floating dtype everywhere: float32 stays float32 (no silent upcast)."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    for name, dtype in dtypes.items():
        if not is_floating(dtype):
            raise TypeError(f"{fn}: {name} must be a floating array, got dtype {dtype}")
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"{fn}: all arrays must share one dtype, got {detail}")


def _check_conv_args(fn: str, x, w, b=None, x_name="x"):
    """x: (N, H, W, C), w: (kh, kw, C, O), b: (O,) or None."""
    if x.ndim != 4:
        raise ValueError(f"{fn}: {x_name} must be 4-D (N, H, W, C), got shape {tuple(x.shape)}")
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D (kh, kw, C_in, C_out), got shape {tuple(w.shape)}")
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"{fn}: {x_name} of shape {tuple(x.shape)} has {x.shape[3]} channels but "
                         f"the kernel of shape {tuple(w.shape)} expects {w.shape[2]}")
    if b is not None and tuple(b.shape) != (w.shape[3],):
        raise ValueError(f"{fn}: bias must have shape ({w.shape[3]},) to match the kernel "
                         f"{tuple(w.shape)}, got {tuple(b.shape)}")
    _check_float(fn, **{x_name: x, "w": w, "b": b})


def _check_grad_shape(fn: str, grad_y, expected):
    if tuple(grad_y.shape) != tuple(expected):
        raise ValueError(f"{fn}: grad_y must have the output's shape {tuple(expected)}, "
                         f"got {tuple(grad_y.shape)}")


def choose_algorithm(geometry: ConvGeometry, in_channels: int, xp=np) -> str:
    """'shifted' for stride-1 k>1 convolutions of at least 8 input channels on images where the
    padded border adds little work; 'im2col' otherwise, and always on the GPU (CuPy arrays:
    one large product per layer, the window copy a CUDA kernel). The input gradient of a
    stride-1 convolution is a forward convolution with ``in_channels`` = the output channels,
    and chooses by the same rule. Measured in benchmarks/bench_conv.py."""
    if xp is not np:
        return "im2col"
    kh, kw = geometry.kernel_hw
    if geometry.strides != (1, 1) or kh * kw == 1 or in_channels < _SHIFTED_MIN_CHANNELS:
        return "im2col"
    hp, wp = geometry.padded_hw
    waste = hp * wp / (geometry.out_hw[0] * geometry.out_hw[1])
    return "shifted" if waste <= _SHIFTED_MAX_WASTE else "im2col"


def _resolve_algorithm(fn, algorithm, geometry, in_channels, xp=np):
    if algorithm is None:
        return choose_algorithm(geometry, in_channels, xp)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{fn}: algorithm must be one of {ALGORITHMS} or None, "
                         f"got {algorithm!r}")
    if algorithm == "shifted" and geometry.strides != (1, 1):
        raise ValueError(f"{fn}: algorithm 'shifted' needs strides (1, 1), "
                         f"got {geometry.strides}")
    return algorithm


# --------------------------------------------------------------------------- reference loops

def conv2d_reference(x, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """The course's formula as plain loops (slow on purpose; tests hold the fast kernels to it).

    ``(f * w)(x, y) = sum_{dx=-a..a} sum_{dy=-b..b} w(a+dx, b+dy) f(x+dx, y+dy)`` summed over the
    input channels, for each output channel; the window centre moves by the stride, the taps
    are ``dilation`` pixels apart, pixels outside the image are zero (padding).
    """
    _check_conv_args("conv2d_reference", x, w, b)
    n_batch, height, width, _ = x.shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry("conv2d_reference", (height, width), (kh, kw), strides, dilation, padding)
    (top, _), (left, _) = g.pads
    a, bb = (kh - 1) // 2, (kw - 1) // 2      # centre tap of the kernel (w(a, b) in the formula)
    y = np.zeros((n_batch, *g.out_hw, n_out), dtype=x.dtype)
    for n in range(n_batch):
        for oy in range(g.out_hw[0]):
            for ox in range(g.out_hw[1]):
                cy = oy * g.strides[0] - top + a * g.dilation[0]       # window centre in x
                cx = ox * g.strides[1] - left + bb * g.dilation[1]
                for o in range(n_out):
                    total = 0.0 if b is None else b[o]
                    for dy in range(-a, kh - a):                      # -a..a for odd kernels
                        for dx in range(-bb, kw - bb):
                            iy, ix = cy + dy * g.dilation[0], cx + dx * g.dilation[1]
                            if 0 <= iy < height and 0 <= ix < width:  # outside: zero padding
                                total += np.dot(w[a + dy, bb + dx, :, o], x[n, iy, ix, :])
                    y[n, oy, ox, o] = total
    return y


def conv2d_backward_reference(x, w, grad_y, strides=(1, 1), dilation=(1, 1), padding="valid"):
    """Both gradients as plain loops: each output pixel sends ``w * dy`` back to the input pixels
    of its window and ``x * dy`` to the kernel taps. Returns ``(dx, dw, db)``."""
    _check_conv_args("conv2d_backward_reference", x, w)
    n_batch, height, width, _ = x.shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry("conv2d_backward_reference", (height, width), (kh, kw), strides, dilation,
                      padding)
    _check_grad_shape("conv2d_backward_reference", grad_y, (n_batch, *g.out_hw, n_out))
    (top, _), (left, _) = g.pads
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for n in range(n_batch):
        for oy in range(g.out_hw[0]):
            for ox in range(g.out_hw[1]):
                for i in range(kh):
                    for j in range(kw):
                        iy = oy * g.strides[0] + i * g.dilation[0] - top
                        ix = ox * g.strides[1] + j * g.dilation[1] - left
                        if 0 <= iy < height and 0 <= ix < width:
                            for o in range(n_out):
                                dx[n, iy, ix, :] += w[i, j, :, o] * grad_y[n, oy, ox, o]
                                dw[i, j, :, o] += x[n, iy, ix, :] * grad_y[n, oy, ox, o]
    db = grad_y.sum(axis=(0, 1, 2))
    return dx, dw, db


def conv2d_transpose_reference(y, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid",
                               output_padding=None):
    """Transposed convolution as plain loops: every input pixel stamps the kernel, scaled by its
    values, onto the output at ``stride`` times its position. ``w: (kh, kw, out, in)`` (Keras)."""
    _check_transpose_args("conv2d_transpose_reference", y, w, b)
    n_batch, height, width, _ = y.shape
    kh, kw, n_out, _ = w.shape
    out_hw, pads = _transpose_geometry("conv2d_transpose_reference", (height, width), (kh, kw),
                                       strides, dilation, padding, output_padding)
    sh, sw = normalize_tuple(strides, 2, "strides")
    dh, dw_ = normalize_tuple(dilation, 2, "dilation_rate")
    (top, _), (left, _) = pads
    out = np.zeros((n_batch, *out_hw, n_out), dtype=y.dtype)
    for n in range(n_batch):
        for iy in range(height):
            for ix in range(width):
                for i in range(kh):
                    for j in range(kw):
                        oy, ox = iy * sh + i * dh - top, ix * sw + j * dw_ - left
                        if 0 <= oy < out_hw[0] and 0 <= ox < out_hw[1]:
                            out[n, oy, ox, :] += w[i, j, :, :] @ y[n, iy, ix, :]
    if b is not None:
        out += b
    return out


# --------------------------------------------------------------------------- threads and memory

def conv_threads(xp) -> int:
    """How many pieces a convolution on arrays of module ``xp`` is cut into: ``num_threads()``
    ($MINICNN_NUM_THREADS) for NumPy arrays when BLAS can be held to one thread per call; 1 for
    CuPy (one launch does the whole array) or when it cannot (the BLAS threads each product)."""
    if xp is not np:
        return 1
    threads = num_threads()
    return threads if threads > 1 and blas_threads_controllable() else 1


def split_work(n: int, rows: int, parts: int):
    """Cut ``n`` images of ``rows`` output rows into about ``parts`` equal pieces
    ``(n0, n1, h0, h1)``: images n0..n1-1, their rows h0..h1-1.

    Whole images when they share out evenly (or are many); otherwise every image is cut into
    bands of rows (one image per piece), so that one image on two threads still runs in two
    halves. Each piece's output is one contiguous block of ``(N, Ho, Wo, O)``.
    """
    if parts <= 1:
        return [(0, n, 0, rows)]
    if n % parts == 0 or n >= 4 * parts or rows == 1:
        bounds = [n * k // parts for k in range(parts + 1)]
        return [(a, b, 0, rows) for a, b in zip(bounds, bounds[1:]) if b > a]
    bands = min(rows, parts // math.gcd(n, parts))
    edges = [rows * k // bands for k in range(bands + 1)]
    return [(i, i + 1, a, b) for i in range(n) for a, b in zip(edges, edges[1:]) if b > a]


def image_groups(n: int, parts: int):
    """``split_work`` restricted to whole images (for work whose pieces must not share an
    image, e.g. the scatter of ``col2im``)."""
    return split_work(n, 1, min(n, parts))


def run_pieces(fn, pieces, xp=np):
    """[fn(piece) for piece in pieces] in piece order (sums over pieces are deterministic): on
    the thread pool, BLAS held to one thread, when there are several.

    A single piece (a convolution too small to share out) keeps BLAS on one thread too while
    the kernels' own threads are in use (``recently_parallel``): a threaded product would wake
    OpenBLAS's helper threads, which then spin for ~0.1 s on the cores the next pieces need
    (measured: +60 ms on a 250 ms U-Net step). In a model too small for pieces anywhere, the
    pool stays idle and OpenBLAS may thread the products itself (1.2-1.5x faster on the small
    U-Net's 4x64x64 layers than one thread).
    """
    if xp is not np or conv_threads(np) == 1:
        return [fn(piece) for piece in pieces] if len(pieces) == 1 else parallel_map(fn, pieces)
    if len(pieces) == 1 and not recently_parallel():
        return [fn(pieces[0])]
    with single_threaded_blas():
        return [fn(pieces[0])] if len(pieces) == 1 else parallel_map(fn, pieces)


# --------------------------------------------------------------------------- building blocks

_scratch = threading.local()


def scratch(xp, slot: str, shape, dtype, zero=False):
    """A buffer for an array that never leaves one kernel call, reused from call to call.

    A fresh multi-megabyte NumPy array page-faults on first touch (the OS hands out zeroed
    pages): measured, that costs as much as the matrix products of a 64x64, 32-channel layer.
    So temporaries are kept, per thread and per ``slot``, grown to the largest size seen. CuPy
    has its own memory pool: there this is plain ``empty``/``zeros``. Contents are undefined
    unless ``zero``. ``clear_scratch()`` releases them.
    """
    if xp is not np:
        return xp.zeros(shape, dtype=dtype) if zero else xp.empty(shape, dtype=dtype)
    cache = _scratch.__dict__
    size, key = math.prod(shape), (slot, np.dtype(dtype))
    if key not in cache or cache[key].size < size:
        cache[key] = np.empty(size, dtype=dtype)
    out = cache[key][:size].reshape(shape)
    if zero:
        out.fill(0)
    return out


def clear_scratch():
    """Free the reusable temporaries of this thread."""
    _scratch.__dict__.clear()


def pad_input(x, pads, slot=None, out=None):
    """Zero-padded copy ``(N, H+top+bottom, W+left+right, C)``; ``x`` itself when no padding.

    With ``slot`` the copy is a reused temporary (see ``scratch``): only for arrays that stay
    inside the call. With ``out`` it is written there. Only the border is zeroed; NumPy arrays
    are padded in pieces of whole images on the conv threads.
    """
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0 and out is None:
        return x
    xp = get_array_module(x)
    n, h, w, c = x.shape
    shape = (n, h + top + bottom, w + left + right, c)
    if out is None:
        out = xp.empty(shape, dtype=x.dtype) if slot is None else scratch(xp, slot, shape,
                                                                           x.dtype)
    groups = image_groups(n, conv_threads(xp)) if x.size > _PARALLEL_MIN_SIZE else [(0, n, 0, 1)]
    run_pieces(lambda p: pad_images(x, out, pads, p[0], p[1]), groups, xp)
    return out


def pad_images(x, out, pads, n0, n1):
    """``out[n0:n1]`` = images n0..n1-1 of x with a zero border ``pads`` (only the border is
    written with zeros)."""
    (top, _), (left, _) = pads
    h, w = x.shape[1:3]
    block, inner = out[n0:n1], out[n0:n1, top:top + h]
    block[:, :top] = 0
    block[:, top + h:] = 0
    inner[:, :, :left] = 0
    inner[:, :, left + w:] = 0
    inner[:, :, left:left + w] = x[n0:n1]


def crop_padding(xpad, pads):
    """Inverse of ``pad_input``: the interior as a new C-contiguous array (``xpad`` itself when
    there is no padding)."""
    (top, bottom), (left, right) = pads
    if top == bottom == left == right == 0:
        return xpad
    return copy_of(xpad[:, top:xpad.shape[1] - bottom, left:xpad.shape[2] - right, :])


def copy_of(view):
    """A new C-contiguous array with the values of ``view`` (always a copy: a kernel's results
    must never share memory with its reused ``scratch`` buffers)."""
    xp = get_array_module(view)
    out = xp.empty(view.shape, dtype=view.dtype)
    out[...] = view
    return out


def window_view(xpad, geometry: ConvGeometry):
    """A view (no copy, not to be written) of every window:
    ``v[n, oy, ox, i, j, c] = xpad[n, oy*sh + i*dh, ox*sw + j*dw, c]``."""
    xp = get_array_module(xpad)
    n, _, _, c = xpad.shape
    s_n, s_h, s_w, s_c = xpad.strides
    (sh, sw), (dh, dw) = geometry.strides, geometry.dilation
    shape = (n, *geometry.out_hw, *geometry.kernel_hw, c)
    strides = (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c)
    return xp.lib.stride_tricks.as_strided(xpad, shape=shape, strides=strides)


def _is_pointwise(geometry: ConvGeometry) -> bool:
    """1x1 kernel, stride 1, no padding: the windows are the pixels themselves."""
    return geometry.kernel_hw == (1, 1) and geometry.strides == (1, 1) \
        and geometry.pads == ((0, 0), (0, 0))


def im2col(x, geometry: ConvGeometry, slot=None):
    """``cols: (N, Ho, Wo, kh, kw, C)``, every kernel window copied once (one strided copy).

    A 1x1 stride-1 unpadded convolution needs no copy: ``cols`` is then ``x`` itself. With
    ``slot`` the matrix is a reused temporary (see ``scratch``). On CuPy arrays it is the CUDA
    kernel ``kernels.cuda.im2col_gpu`` (unless ``kernels.backend.cuda_kernels_enabled()`` is
    off).
    """
    xp = get_array_module(x)
    if xp is not np and cuda_kernels_enabled(x):
        return cuda.im2col_gpu(x, geometry)
    n, _, _, c = x.shape
    shape = (n, *geometry.out_hw, *geometry.kernel_hw, c)
    if _is_pointwise(geometry):
        return x.reshape(shape)
    cols = xp.empty(shape, dtype=x.dtype) if slot is None else scratch(xp, slot, shape, x.dtype)
    cols[...] = window_view(pad_input(x, geometry.pads, slot="im2col_pad"), geometry)
    return cols


def _tiles_exactly(geometry: ConvGeometry, x_shape) -> bool:
    """Windows that tile the image exactly (kernel == stride, no padding, no dilation: the
    U-Net's 2x2 up-sampling)."""
    (ho, wo), (kh, kw) = geometry.out_hw, geometry.kernel_hw
    return (kh, kw) == geometry.strides and geometry.dilation == (1, 1) \
        and (ho * kh, wo * kw) == tuple(x_shape[1:3]) and geometry.pads == ((0, 0), (0, 0))


def col2im(cols, x_shape, geometry: ConvGeometry, out=None):
    """Adjoint of ``im2col``: add every window ``cols[:, :, :, i, j, :]`` back where it was read.

    Returns ``(N, H, W, C)`` (written into ``out`` when given). Windows that tile the image
    exactly are a pure reshuffle, done as one transposed copy. On CuPy arrays it is the CUDA
    kernel ``kernels.cuda.col2im_gpu`` (a gather, no atomics).
    """
    xp = get_array_module(cols)
    if xp is not np and cuda_kernels_enabled(cols) and out is None:
        return cuda.col2im_gpu(cols, x_shape, geometry)
    n, height, width, c = x_shape
    (ho, wo), (kh, kw) = geometry.out_hw, geometry.kernel_hw
    if out is None:
        out = xp.empty(x_shape, dtype=cols.dtype)
    if _tiles_exactly(geometry, x_shape):                    # no overlap: a reshuffle
        out.reshape(n, ho, kh, wo, kw, c)[...] = cols.transpose(0, 1, 3, 2, 4, 5)
        return out
    (top, bottom), (left, right) = geometry.pads
    if geometry.pads == ((0, 0), (0, 0)):
        xpad = out
        xpad.fill(0)
    else:
        xpad = scratch(xp, "col2im", (n, *geometry.padded_hw, c), cols.dtype, zero=True)
    for i in range(kh):
        for j in range(kw):
            xpad[tap_slices(geometry, i, j)] += cols[:, :, :, i, j, :]
    if xpad is not out:
        out[...] = xpad[:, top:top + height, left:left + width]
    return out


def tap_slices(geometry: ConvGeometry, i: int, j: int):
    """Index of the padded-input pixels that kernel tap (i, j) reads for all outputs:
    ``xpad[tap_slices(g, i, j)]`` is ``(N, Ho, Wo, C)``, ``[n, oy, ox]`` being
    ``xpad[n, oy*sh + i*dh, ox*sw + j*dw]``."""
    (ho, wo), (sh, sw), (dh, dw) = geometry.out_hw, geometry.strides, geometry.dilation
    rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
    columns = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
    return (slice(None), rows, columns, slice(None))


def sum_over_pixels(grad):
    """``grad: (N, H, W, C) -> (C,)``, the bias gradient, as ``ones @ grad``: a BLAS product is
    about ten times faster than NumPy's reduction over leading axes here, and sums in blocks.
    Large NumPy arrays: one single-threaded product per block of rows on the conv threads, the
    partial sums added in order (a threaded BLAS call here would wake OpenBLAS's own threads,
    which then spin for a while on the cores the conv threads use)."""
    xp = get_array_module(grad)
    rows = grad.reshape(-1, grad.shape[-1])
    if xp is not np:
        return xp.ones(rows.shape[0], dtype=grad.dtype) @ rows
    parts = conv_threads(xp) if rows.size > _PARALLEL_MIN_SIZE else 1
    bounds = [rows.shape[0] * k // parts for k in range(parts + 1)]
    ones = np.ones(bounds[1] - bounds[0] + 1, dtype=grad.dtype)

    def piece(p):
        return ones[:p[1] - p[0]] @ rows[p[0]:p[1]]
    with single_threaded_blas():
        return _sum_parts(run_pieces(piece, list(zip(bounds, bounds[1:]))))


def add_bias(y, b, crop=None):
    """``y[...] = crop + b`` (or ``y += b`` without ``crop``), b: (C,) over y: (..., W, C).

    The bias is tiled along W so that NumPy's inner loop runs over W*C values rather than C:
    with 8-16 channels that is 5x faster. ``crop``: a view whose rows of W*C values are each
    contiguous (the output inside a padded grid)."""
    xp = get_array_module(y)
    width, c = y.shape[-2], y.shape[-1]
    rows = y.reshape(*y.shape[:-2], width * c)
    source = rows if crop is None else crop.reshape(*crop.shape[:-2], width * c)
    xp.add(source, xp.tile(b, width) if width > 1 else b, out=rows)
    return y


def row_shifts(geometry: ConvGeometry):
    """Offsets, in rows of the flattened padded input, of each kernel tap (i, j) ("shifted")."""
    wp = geometry.padded_hw[1]
    (kh, kw), (dh, dw) = geometry.kernel_hw, geometry.dilation
    return [(i, j, i * dh * wp + j * dw) for i in range(kh) for j in range(kw)]


def embed_in_padded_grid(grad_y, geometry: ConvGeometry):
    """``dy`` placed at the top-left of a zero ``(N, Hp, Wp, O)`` grid, flattened to rows:
    the layout in which "shifted" computed the output (the dropped border rows get zero)."""
    xp = get_array_module(grad_y)
    n, ho, wo, n_out = grad_y.shape
    hp, wp = geometry.padded_hw
    grid = scratch(xp, "dy_grid", (n, hp, wp, n_out), grad_y.dtype, zero=True)
    grid[:, :ho, :wo, :] = grad_y
    return grid.reshape(n * hp * wp, n_out)


class _Grid:
    """Where piece ``(n0, n1, h0, h1)`` of a stride-1 output lives in the flattened padded grid
    ("shifted"): its first grid row ``start``, the ``count`` rows computed (the last rows'
    dropped border columns are cut where the windows would run past the array) and the
    ``(images, grid_h, Wp)`` block they fill (whole padded images, or one band of rows)."""

    def __init__(self, geometry: ConvGeometry, n_images: int, piece):
        hp, wp = geometry.padded_hw
        n0, n1, h0, h1 = piece
        self.images, self.rows = n1 - n0, h1 - h0
        self.grid_h = hp if self.images > 1 else self.rows
        self.start = (n0 * hp + h0) * wp
        limit = n_images * hp * wp - row_shifts(geometry)[-1][2]
        self.count = min(((self.images - 1) * self.grid_h + self.rows) * wp, limit - self.start)
        self.size = self.images * self.grid_h * wp
        self.wp = wp

    def crop(self, grid, out_w):
        """The piece's outputs ``(images, rows, Wo, O)`` in a grid of ``size`` rows."""
        return grid.reshape(self.images, self.grid_h, self.wp, -1)[:, :self.rows, :out_w]


# Below this many values (4 MB of float32) an array is padded or summed on one thread; below
# this many multiply-adds a convolution runs as one piece. The pool's hand-off costs 30 us and
# two threads' many small NumPy calls contend for the GIL: measured on the small U-Net's
# 4x64x64 layers (9-19 M multiply-adds), two pieces were no faster than one.
_PARALLEL_MIN_SIZE = 1 << 20
_PARALLEL_MIN_MACS = 1 << 25


# --------------------------------------------------------------------------- forward

def conv2d_forward(x, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid",
                   algorithm=None, return_workspace=False):
    """y = conv2d(x, w) + b. ``x: (N, H, W, C)``, ``w: (kh, kw, C, O)``, ``b: (O,)`` or None.

    ``padding``: 'valid', 'same' (Keras/TensorFlow split, extra at the bottom/right) or explicit
    (see ``kernels.shapes``). ``algorithm``: None (auto), 'im2col' or 'shifted'.
    With ``return_workspace=True`` returns ``(y, workspace)``: the array the filter gradient
    reads (im2col: the window matrix; shifted: the padded input), to hand to
    ``conv2d_backward(..., workspace=...)`` so it is not rebuilt.
    NumPy arrays are computed in pieces of whole images (or bands of rows) on ``conv_threads``
    threads, each piece's products on one BLAS thread; the bias is added while the piece's
    output is in cache.
    """
    fn = "conv2d_forward"
    _check_conv_args(fn, x, w, b)
    xp = get_array_module(x, w)
    n, height, width, c = x.shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry(fn, (height, width), (kh, kw), strides, dilation, padding)
    algorithm = _resolve_algorithm(fn, algorithm, g, c, xp=xp)
    y, workspace = _forward(x, w, b, g, algorithm, keep=return_workspace)
    return (y, workspace) if return_workspace else y


def _forward(x, w, b, g, algorithm, keep, slot="workspace"):
    """(y, workspace) of the resolved ``algorithm``; the workspace a new array when ``keep``,
    else a reused temporary in ``slot`` (shifted) or nothing (im2col)."""
    xp = get_array_module(x, w)
    n, c, n_out = x.shape[0], x.shape[3], w.shape[3]
    y = xp.empty((n, *g.out_hw, n_out), dtype=x.dtype)
    pieces = _pieces(xp, n, g, c * n_out)
    if algorithm == "im2col":
        return y, _forward_im2col(x, w, b, g, y, pieces, keep=keep)
    return y, _forward_shifted(x, w, b, g, y, pieces, keep=keep, slot=slot)


def _pieces(xp, n, g, macs_per_tap):
    """``split_work`` for this convolution: one piece when it is small or not on NumPy."""
    parts = conv_threads(xp)
    macs = n * g.out_hw[0] * g.out_hw[1] * g.kernel_hw[0] * g.kernel_hw[1] * macs_per_tap
    return split_work(n, g.out_hw[0], parts if macs >= _PARALLEL_MIN_MACS else 1)


def _forward_im2col(x, w, b, g, y, pieces, keep):
    """y = cols @ w per piece, ``cols`` the piece's windows: kept (and returned) when ``keep``,
    else a per-thread temporary. CuPy: one ``im2col`` (the CUDA kernel) and one product."""
    xp = get_array_module(x, w)
    kh, kw, c, n_out = w.shape
    k = kh * kw * c
    w_mat = w.reshape(k, n_out)
    if xp is not np:
        cols = im2col(x, g, slot=None if keep else "workspace")
        xp.matmul(cols.reshape(-1, k), w_mat, out=y.reshape(-1, n_out))
        if b is not None:
            y += b
        return cols
    windows = None
    if _is_pointwise(g):                            # the windows are the pixels: no copy
        cols_all = im2col(x, g)
    else:
        windows = window_view(pad_input(x, g.pads, slot="im2col_pad"), g)
        cols_all = xp.empty((x.shape[0], *g.out_hw, kh, kw, c), dtype=x.dtype) if keep else None

    def piece(p):
        n0, n1, h0, h1 = p
        if cols_all is not None:
            cols = cols_all[n0:n1, h0:h1]
        else:
            cols = scratch(xp, "cols", (n1 - n0, h1 - h0, g.out_hw[1], kh, kw, c), x.dtype)
        if windows is not None:
            cols[...] = windows[n0:n1, h0:h1]
        xp.matmul(cols.reshape(-1, k), w_mat, out=y[n0:n1, h0:h1].reshape(-1, n_out))
        if b is not None:
            add_bias(y[n0:n1, h0:h1], b)
    run_pieces(piece, pieces, xp)
    return cols_all


def _forward_shifted(x, w, b, g, y, pieces, keep=False, slot="workspace"):
    """y = sum_ij xpad_rows[shift_ij + r] @ w[i, j] over the flattened padded grid, grouped by
    kernel row: ``y = sum_i row_taps[i*dh*Wp + r] @ w[i]`` (``row_taps``: the kw taps of a row
    side by side, see ``row_taps``), kh products of K = kw*C. Per piece, in chunks of rows
    whose taps stay in cache; a piece of whole images pads them itself first (they are then in
    cache for the products), and the piece's outputs (and the bias) are copied out of its
    per-thread grid while they are in cache. Returns the padded input (a new array when
    ``keep``, else the reused temporary ``slot``; x itself without padding)."""
    xp = get_array_module(x, w)
    n, _, _, c = x.shape
    hp, wp = g.padded_hw
    (kh, kw), dh = g.kernel_hw, g.dilation[0]
    n_out = w.shape[3]
    padded = g.pads != ((0, 0), (0, 0))
    if not padded:
        xpad = x
    elif keep:
        xpad = xp.empty((n, hp, wp, c), dtype=x.dtype)
    else:
        xpad = scratch(xp, slot, (n, hp, wp, c), x.dtype)
    pad_in_pieces = padded and all(p[2:] == (0, g.out_hw[0]) for p in pieces)
    if padded and not pad_in_pieces:           # bands read their neighbours' rows: pad first
        pad_input(x, g.pads, out=xpad)
    rows = xpad.reshape(-1, c)
    w_rows = xp.ascontiguousarray(w).reshape(kh, kw * c, n_out)
    chunk = _chunk_rows(kw * c, x.itemsize)

    def piece(p):
        n0, n1, h0, h1 = p
        if pad_in_pieces:
            pad_images(x, xpad, g.pads, n0, n1)
        place = _Grid(g, n, p)
        grid = scratch(xp, "y_grid", (place.size, n_out), y.dtype)
        for first in range(0, place.count, chunk):
            count = min(chunk, place.count - first)
            taps = row_taps(rows, place.start + first, count, g)
            acc = grid[first:first + count]
            term = scratch(xp, "term", (count, n_out), y.dtype)
            for i in range(kh):
                xp.matmul(taps[i * dh * wp:i * dh * wp + count], w_rows[i],
                          out=acc if i == 0 else term)
                if i:
                    acc += term
        if b is None:
            y[n0:n1, h0:h1] = place.crop(grid, g.out_hw[1])
        else:
            add_bias(y[n0:n1, h0:h1], b, crop=place.crop(grid, g.out_hw[1]))
    run_pieces(piece, pieces, xp)
    return xpad


# About this many bytes of ``row_taps`` per chunk (L2-sized: the chunk's kh products and the
# sums over them then run from cache; measured 5-45% faster than whole pieces at 64x64-128x128).
_TAPS_BYTES = 2 << 20


def _chunk_rows(row_values, itemsize):
    return int(min(16384, max(1024, _TAPS_BYTES // (row_values * itemsize))))


def row_taps(rows, start, count, g, slot="row_taps"):
    """``taps[t] = [rows[start + t + j*dw] for j in 0..kw-1]`` for t < count + (kh-1)*dh*Wp:
    the kw taps of each row of the flattened padded grid side by side, ``(span, kw*C)`` (a
    per-thread temporary). Kernel row i's taps for grid rows start..start+count-1 are then the
    contiguous rows ``taps[i*dh*Wp:i*dh*Wp + count]``."""
    xp = get_array_module(rows)
    (kh, kw), (dh, dw) = g.kernel_hw, g.dilation
    c = rows.shape[1]
    span = count + (kh - 1) * dh * g.padded_hw[1]
    taps = scratch(xp, slot, (span, kw, c), rows.dtype)
    taps[...] = xp.lib.stride_tricks.as_strided(
        rows[start:], shape=(span, kw, c),
        strides=(rows.strides[0], dw * rows.strides[0], rows.strides[1]))
    return taps.reshape(span, kw * c)


# --------------------------------------------------------------------------- backward

def conv2d_backward(grad_y, x, w, strides=(1, 1), dilation=(1, 1), padding="valid",
                    need_input=True, need_filter=True, need_bias=True, workspace=None,
                    algorithm=None, x_shape=None):
    """Gradients of ``conv2d_forward`` as ``(dx, dw, db)``; any not needed is None.

    ``grad_y: (N, Ho, Wo, O)``. ``x`` is needed only for the filter gradient (or pass the
    ``workspace`` that ``conv2d_forward(..., return_workspace=True)`` returned, with the same
    ``algorithm``); for the input gradient alone pass ``x=None, x_shape=(N, H, W, C)``.

    - dw: one reduction over the pixels, in pieces whose partial sums are added in piece order
      (deterministic); db comes with it, from the same pieces while ``dy`` is in cache.
    - dx, stride 1: the duality made literal: the input gradient of a stride-1 convolution is
      the *forward* convolution of ``dy`` with the kernel turned by 180 degrees and its two
      channel axes swapped, on ``dy`` padded by ``(k-1)*d - pad`` on each side (a negative
      amount crops). So it runs the tuned forward kernels.
    - dx, stride > 1: ``col2im(dy @ w.T)``, one piece per group of whole images.
    """
    fn = "conv2d_backward"
    if x is not None:
        _check_conv_args(fn, x, w)
        x_shape = x.shape
    elif x_shape is None:
        raise ValueError(f"{fn}: pass x, or x_shape when only the input gradient is wanted")
    elif need_filter and workspace is None:
        raise ValueError(f"{fn}: the filter gradient needs x or the forward's workspace")
    x_shape = tuple(int(s) for s in x_shape)
    if len(x_shape) != 4 or w.ndim != 4 or x_shape[3] != w.shape[2]:
        raise ValueError(f"{fn}: input shape {x_shape} does not fit kernel {tuple(w.shape)} "
                         "(expected (N, H, W, C) and (kh, kw, C, O))")
    _check_float(fn, grad_y=grad_y, w=w)
    xp = get_array_module(grad_y, w)
    n, height, width, c = x_shape
    kh, kw, _, n_out = w.shape
    g = conv_geometry(fn, (height, width), (kh, kw), strides, dilation, padding)
    _check_grad_shape(fn, grad_y, (n, *g.out_hw, n_out))
    dx = dw = db = dy_grid = None
    filter_algorithm = _resolve_algorithm(fn, algorithm, g, c, xp=xp) if need_filter else None
    if need_input:
        if g.strides == (1, 1):
            dx, dy_grid = _input_gradient_as_forward(grad_y, w, x_shape, g, algorithm,
                                                     share=filter_algorithm == "shifted")
        else:
            dx = _input_gradient_im2col(grad_y, w, x_shape, g)
    if filter_algorithm == "im2col":    # same algorithm as the forward, whose workspace it reads
        if workspace is not None:
            _check_workspace(fn, workspace, (n, *g.out_hw, kh, kw, c))
        dw, db = _filter_gradient_im2col(workspace, x, grad_y, w.shape, g, need_bias)
    elif filter_algorithm == "shifted":
        if workspace is None:
            workspace = pad_input(x, g.pads, slot="workspace")
        _check_workspace(fn, workspace, (n, *g.padded_hw, c))
        dw, db = _filter_gradient_shifted(workspace, grad_y, w.shape, g, need_bias, dy_grid)
    elif need_bias:
        db = _bias_gradient(grad_y, _pieces(xp, n, g, n_out))
    return dx, dw, db


def _sum_parts(parts):
    """The per-piece partial sums added in piece order (None stays None)."""
    if parts[0] is None:
        return None
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def _bias_gradient(grad_y, pieces):
    """db = sum of dy over the pixels, per piece then added in order."""
    def piece(p):
        n0, n1, h0, h1 = p
        return sum_over_pixels(grad_y[n0:n1, h0:h1])
    return _sum_parts(run_pieces(piece, pieces, get_array_module(grad_y)))


def _filter_gradient_im2col(cols_all, x, grad_y, w_shape, g, need_bias):
    """dw = cols.T @ dy: ``(kh*kw*C, N*Ho*Wo) @ (N*Ho*Wo, O)``, per piece (partial sums added
    in order); ``cols_all`` the forward's window matrix, or None to build each piece's from x."""
    xp = get_array_module(grad_y)
    n, kh, kw, c, n_out = grad_y.shape[0], *w_shape
    k = kh * kw * c
    if cols_all is None and (xp is not np or _is_pointwise(g)):
        cols_all = im2col(x, g, slot="workspace")
    windows = None if cols_all is not None else \
        window_view(pad_input(x, g.pads, slot="im2col_pad"), g)

    def piece(p):
        n0, n1, h0, h1 = p
        if cols_all is not None:
            cols = cols_all[n0:n1, h0:h1]
        else:
            cols = scratch(xp, "cols", (n1 - n0, h1 - h0, g.out_hw[1], kh, kw, c), grad_y.dtype)
            cols[...] = windows[n0:n1, h0:h1]
        dy = grad_y[n0:n1, h0:h1].reshape(-1, n_out)
        dw = cols.reshape(-1, k).T @ dy
        return dw, (sum_over_pixels(dy) if need_bias else None)
    parts = run_pieces(piece, _pieces(xp, n, g, c * n_out), xp)
    return _sum_parts([p[0] for p in parts]).reshape(w_shape), _sum_parts([p[1] for p in parts])


def _filter_gradient_shifted(xpad, grad_y, w_shape, g, need_bias, dy_grid=None):
    """dw[i, j] = sum_r xpad_rows[shift_ij + r].T @ dy_rows[r] over the flattened padded grid,
    ``dy_rows`` being dy at the top-left of the padded grid (zero on the dropped border).

    Grouped by kernel row as the forward: ``dw[i] = sum_r row_taps[i*dh*Wp + r].T @ dy_rows[r]``,
    kh products of M = kw*C per chunk of rows (the chunk's taps in cache: long thin products
    that stream the whole piece ran 1.3-2x slower), partial sums added in order. db comes from
    the same piece of dy. ``dy_grid``: ``(rows, offset)``, dy already in a zero-bordered grid of
    the same (Hp, Wp) (the input gradient's padded dy), dy_rows[r] = rows[offset + r]; else
    each piece places its dy in a per-thread grid."""
    xp = get_array_module(xpad, grad_y)
    n, _, wp, c = xpad.shape
    (kh, kw), dh = g.kernel_hw, g.dilation[0]
    n_out = w_shape[3]
    rows = xpad.reshape(-1, c)
    wo = g.out_hw[1]
    chunk = _chunk_rows(kw * c, xpad.itemsize)

    def piece(p):
        n0, n1, h0, h1 = p
        place = _Grid(g, n, p)
        if dy_grid is not None:
            shared, offset = dy_grid
            grid = shared[offset + place.start:offset + place.start + place.count]
        else:
            grid = scratch(xp, "dy_grid", (place.size, n_out), grad_y.dtype)
            inside = grid.reshape(place.images, place.grid_h, wp, n_out)
            inside[:, :place.rows, wo:] = 0
            inside[:, place.rows:] = 0
            inside[:, :place.rows, :wo] = grad_y[n0:n1, h0:h1]
        dw = xp.empty((kh, kw * c, n_out), dtype=grad_y.dtype)
        part = scratch(xp, "dw_part", (kw * c, n_out), grad_y.dtype)
        for first in range(0, place.count, chunk):
            count = min(chunk, place.count - first)
            taps = row_taps(rows, place.start + first, count, g)
            dy_rows = grid[first:first + count]
            for i in range(kh):
                taps_i = taps[i * dh * wp:i * dh * wp + count].T
                if first == 0:
                    xp.matmul(taps_i, dy_rows, out=dw[i])
                else:
                    xp.matmul(taps_i, dy_rows, out=part)
                    dw[i] += part
        db = sum_over_pixels(grad_y[n0:n1, h0:h1]) if need_bias else None
        return dw, db
    parts = run_pieces(piece, _pieces(xp, n, g, c * n_out), xp)
    return _sum_parts([p[0] for p in parts]).reshape(w_shape), _sum_parts([p[1] for p in parts])


def flipped_kernel(w):
    """``(kh, kw, C, O) -> (kh, kw, O, C)``: turned by 180 degrees, channel axes swapped (the
    kernel whose forward convolution is the input gradient of ``w``'s)."""
    xp = get_array_module(w)
    return xp.ascontiguousarray(w[::-1, ::-1].transpose(0, 1, 3, 2))


def _input_gradient_as_forward(grad_y, w, x_shape, g, algorithm=None, share=False):
    """dx of a stride-1 convolution as the forward convolution of dy with ``flipped_kernel(w)``.

    From y[oy] = sum_i w[i] xpad[oy + i*d]: dx[r] = sum_i w[i].T dy[r + top - i*d]; with
    i' = kh-1-i that reads dy padded by ``(kh-1)*d - top`` above (and ``(kh-1)*d - bottom``
    below) at r + i'*d: a correlation. Paddings larger than the window's reach give a negative
    amount: those rows of dy only ever saw zeros and are cropped away.

    Returns ``(dx, dy_grid)``. With ``share`` and a 'same'-like padding (top + bottom and
    left + right equal to the reach, so the padded dy has the forward's (Hp, Wp)), the padded
    dy the forward ran on is also the filter gradient's dy grid: ``dy_grid = (rows, offset)``
    with dy at the top-left ``offset`` rows further on (its zero border is the grid's dropped
    border); else None.
    """
    (kh, kw), (dh, dw) = g.kernel_hw, g.dilation
    reach_h, reach_w = (kh - 1) * dh, (kw - 1) * dw
    (top, bottom), (left, right) = g.pads
    amounts = ((reach_h - top, reach_h - bottom), (reach_w - left, reach_w - right))
    crop = [[max(0, -a) for a in pair] for pair in amounts]
    if any(v for pair in crop for v in pair):
        (ct, cb), (cl, cr) = crop
        grad_y = copy_of(grad_y[:, ct:grad_y.shape[1] - cb, cl:grad_y.shape[2] - cr])
    pads = tuple(tuple(max(0, a) for a in pair) for pair in amounts)
    share = share and not any(v for pair in crop for v in pair) \
        and top + bottom == reach_h and left + right == reach_w
    fn = "conv2d_backward (input gradient)"
    w_flip = flipped_kernel(w)
    twin = conv_geometry(fn, grad_y.shape[1:3], (kh, kw), (1, 1), g.dilation, pads)
    algorithm = _resolve_algorithm(fn, algorithm, twin, grad_y.shape[3],
                                   xp=get_array_module(grad_y))
    dx, workspace = _forward(grad_y, w_flip, None, twin, algorithm, keep=False, slot="dy_pad")
    if dx.shape != tuple(x_shape):          # cannot happen for a valid geometry; guards a bug
        raise AssertionError(f"{fn}: {dx.shape} vs {x_shape}")
    if not share or algorithm != "shifted":
        return dx, None
    offset = pads[0][0] * g.padded_hw[1] + pads[1][0]
    return dx, (workspace.reshape(-1, grad_y.shape[3]), offset)


def _input_gradient_im2col(grad_y, w, x_shape, g):
    """dx = col2im(dy @ w.T): each window's gradient, scattered back where it was read; per
    group of whole images (windows of different images never overlap)."""
    xp = get_array_module(grad_y, w)
    kh, kw, c, n_out = w.shape
    k = kh * kw * c
    w_t = w.reshape(k, n_out).T
    n = x_shape[0]
    if xp is not np:
        dcols = xp.matmul(grad_y.reshape(-1, n_out), w_t)
        return col2im(dcols.reshape(n, *g.out_hw, kh, kw, c), x_shape, g)
    dx = xp.empty(x_shape, dtype=grad_y.dtype)
    pieces = _pieces(xp, n, g, c * n_out)
    pieces = image_groups(n, len(pieces)) if len(pieces) > 1 else pieces

    def piece(p):
        n0, n1 = p[0], p[1]
        dcols = scratch(xp, "dcols", (n1 - n0, *g.out_hw, kh, kw, c), grad_y.dtype)
        xp.matmul(grad_y[n0:n1].reshape(-1, n_out), w_t, out=dcols.reshape(-1, k))
        col2im(dcols, (n1 - n0, *x_shape[1:]), g, out=dx[n0:n1])
    run_pieces(piece, pieces, xp)
    return dx


def _check_workspace(fn, workspace, expected):
    if tuple(workspace.shape) != tuple(expected):
        raise ValueError(f"{fn}: workspace of shape {tuple(workspace.shape)} does not match "
                         f"this convolution (expected {tuple(expected)}; same algorithm as the "
                         "forward?)")


def conv2d_backward_input(grad_y, w, x_shape, strides=(1, 1), dilation=(1, 1), padding="valid",
                          algorithm=None):
    """dL/dx of ``conv2d_forward``: ``(N, H, W, C)`` from ``grad_y: (N, Ho, Wo, O)``."""
    return conv2d_backward(grad_y, None, w, strides, dilation, padding, need_input=True,
                           need_filter=False, need_bias=False, algorithm=algorithm,
                           x_shape=x_shape)[0]


def conv2d_backward_filter(x, grad_y, w_shape, strides=(1, 1), dilation=(1, 1), padding="valid",
                           need_bias=True, workspace=None, algorithm=None):
    """(dL/dw, dL/db) of ``conv2d_forward``: ``(kh, kw, C, O)`` and ``(O,)`` (db: None if not
    needed). ``workspace``: what ``conv2d_forward(..., return_workspace=True)`` returned, to skip
    its rebuild (x may then be None).
    """
    w_shape = tuple(int(s) for s in w_shape)
    if len(w_shape) != 4:
        raise ValueError(f"conv2d_backward_filter: w_shape must be (kh, kw, C, O), "
                         f"got {w_shape}")
    xp = get_array_module(grad_y)
    w_like = xp.empty(w_shape, dtype=grad_y.dtype)      # only its shape and dtype are read
    _, dw, db = conv2d_backward(grad_y, x, w_like, strides, dilation, padding, need_input=False,
                                need_filter=True, need_bias=need_bias, workspace=workspace,
                                algorithm=algorithm)
    return dw, db


# --------------------------------------------------------------------------- transposed twin

def _transpose_geometry(fn, in_hw, kernel_hw, strides, dilation, padding, output_padding):
    """Output size (Keras' rule) and the explicit padding of the forward twin."""
    try:
        if isinstance(normalize_padding(padding, 2), tuple):
            raise ValueError("transposed convolution takes padding 'valid' or 'same', "
                             f"got {padding!r}")
        return conv_transpose2d_geometry(tuple(in_hw), tuple(kernel_hw), strides, dilation,
                                         padding, output_padding)
    except ValueError as exc:
        raise ValueError(f"{fn}: {exc} (input {tuple(in_hw)}, kernel {tuple(kernel_hw)}, "
                         f"strides {strides}, dilation {dilation}, output_padding "
                         f"{output_padding})") from None


def _check_transpose_args(fn: str, y, w, b=None):
    """y: (N, H, W, in), w: (kh, kw, out, in), b: (out,) or None."""
    if y.ndim != 4:
        raise ValueError(f"{fn}: y must be 4-D (N, H, W, C), got shape {tuple(y.shape)}")
    if w.ndim != 4:
        raise ValueError(f"{fn}: w must be 4-D (kh, kw, C_out, C_in), got shape {tuple(w.shape)}")
    if y.shape[3] != w.shape[3]:
        raise ValueError(f"{fn}: y of shape {tuple(y.shape)} has {y.shape[3]} channels but the "
                         f"transposed kernel of shape {tuple(w.shape)} (kh, kw, out, in) "
                         f"expects {w.shape[3]}")
    if b is not None and tuple(b.shape) != (w.shape[2],):
        raise ValueError(f"{fn}: bias must have shape ({w.shape[2]},) to match the kernel "
                         f"{tuple(w.shape)}, got {tuple(b.shape)}")
    _check_float(fn, y=y, w=w, b=b)


def conv2d_transpose_output_shape(y_shape, w_shape, strides=(1, 1), dilation=(1, 1),
                                  padding="valid", output_padding=None):
    """``(N, Ho, Wo, out)`` of ``conv2d_transpose_forward`` for ``y: (N, H, W, in)``."""
    out_hw, _ = _transpose_geometry("conv2d_transpose", y_shape[1:3], w_shape[:2], strides,
                                    dilation, padding, output_padding)
    return (y_shape[0], *out_hw, w_shape[2])


def conv2d_transpose_forward(y, w, b=None, strides=(1, 1), dilation=(1, 1), padding="valid",
                             output_padding=None, algorithm=None):
    """Transposed convolution: ``y: (N, H, W, in)``, ``w: (kh, kw, out, in)`` (Keras) ->
    ``(N, Ho, Wo, out)``, Ho by Keras' rule (``kernels.shapes``).

    It IS the input gradient of the convolution with HWIO kernel ``w`` mapping (Ho, Wo) to
    (H, W); for k = s = 2 that is one matrix product and a reshuffle (see ``col2im``).
    """
    fn = "conv2d_transpose_forward"
    _check_transpose_args(fn, y, w, b)
    out_shape = conv2d_transpose_output_shape(y.shape, w.shape, strides, dilation, padding,
                                              output_padding)
    _, pads = _transpose_geometry(fn, y.shape[1:3], w.shape[:2], strides, dilation, padding,
                                  output_padding)
    out = conv2d_backward_input(y, w, out_shape, strides, dilation, pads, algorithm)
    if b is not None:
        add_bias(out, b)
    return out


def conv2d_transpose_backward(grad_out, y, w, strides=(1, 1), dilation=(1, 1), padding="valid",
                              output_padding=None, need_input=True, need_filter=True,
                              need_bias=True, algorithm=None):
    """Gradients ``(dy, dw, db)`` of ``conv2d_transpose_forward`` (None where not needed).

    The forward twin maps ``grad_out`` (shape of the transposed output) back to ``y``'s shape:
    ``dy = conv2d_forward(grad_out, w)`` and ``dw = conv2d_backward_filter(x=grad_out, grad_y=y)``.
    """
    _check_transpose_args("conv2d_transpose_backward", y, w)
    _, pads = _transpose_geometry("conv2d_transpose_backward", y.shape[1:3], w.shape[:2],
                                  strides, dilation, padding, output_padding)
    dy = workspace = None
    if need_input:
        dy, workspace = conv2d_forward(grad_out, w, None, strides, dilation, pads, algorithm,
                                       return_workspace=True)
    dw = None
    if need_filter:
        dw, _ = conv2d_backward_filter(grad_out, y, w.shape, strides, dilation, pads,
                                       need_bias=False, workspace=workspace, algorithm=algorithm)
    db = sum_over_pixels(grad_out) if need_bias else None
    return dy, dw, db
