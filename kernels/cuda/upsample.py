"""GPU up-sampling by integer factors (``upsample.cu``): nearest and bilinear (Keras/TF
half-pixel centres, clamped edges), forward and backward (a gather: deterministic).

Same signatures and results as ``kernels.upsampling.upsample2d_forward`` / ``upsample2d_backward``;
CuPy arrays in and out.
"""
from __future__ import annotations

from kernels import backend
from kernels.cuda import runtime as rt
from kernels.shapes import normalize_upsampling
from kernels.windows import check_images

SOURCE = "upsample.cu"


def _check(fn, name, a, size, interpolation):
    check_images(fn, name, a)
    return normalize_upsampling(fn, size, interpolation)


def upsample2d_forward_gpu(x, *, size=2, interpolation="nearest"):
    """x: (N, H, W, C) -> y: (N, H*sh, W*sw, C).

    nearest:  y[n, o, q, c] = x[n, o // sh, q // sw, c]
    bilinear: source row r = (o + 0.5) / sh - 0.5 between clamp(floor(r)) and clamp(floor(r) + 1),
              weight r - floor(r); the same along columns (Keras 3 ``UpSampling2D`` /
              TF ``resize`` with half-pixel centres). One thread per output.
    Mirrors ``kernels.upsampling.upsample2d_forward``.
    """
    fn = "upsample2d_forward_gpu"
    rt.require_gpu(fn, "kernels.upsampling.upsample2d_forward", x=x)
    (sh, sw), interpolation = _check(fn, "x", x, size, interpolation)
    suffix = rt.dtype_suffix(fn, x.dtype)
    xp = backend.get_array_module(x)
    x = rt.contiguous(x)
    n, height, width, c = x.shape
    y = xp.empty((n, height * sh, width * sw, c), dtype=x.dtype)
    rt.launch(SOURCE, f"upsample2d_forward_{suffix}", y.size,
              [x, y, *(rt.i64(v) for v in (n, height, width, c, sh, sw)),
               rt.i32(interpolation == "bilinear")])
    return y


def upsample2d_backward_gpu(dy, *, size=2, interpolation="nearest"):
    """The adjoint of ``upsample2d_forward_gpu``. dy: (N, H*sh, W*sw, C) -> dx: (N, H, W, C).

    Each input element gathers, in a fixed order, the dy of the outputs that read it, times the
    weight they read it with (nearest: its sh x sw block, weight 1). Mirrors
    ``kernels.upsampling.upsample2d_backward``.
    """
    fn = "upsample2d_backward_gpu"
    rt.require_gpu(fn, "kernels.upsampling.upsample2d_backward", dy=dy)
    (sh, sw), interpolation = _check(fn, "dy", dy, size, interpolation)
    n, big_h, big_w, c = dy.shape
    if big_h % sh or big_w % sw:
        raise ValueError(f"{fn}: dy of shape {tuple(dy.shape)} is not a multiple of size "
                         f"{(sh, sw)}")
    suffix = rt.dtype_suffix(fn, dy.dtype)
    xp = backend.get_array_module(dy)
    dy = rt.contiguous(dy)
    height, width = big_h // sh, big_w // sw
    dx = xp.empty((n, height, width, c), dtype=dy.dtype)
    rt.launch(SOURCE, f"upsample2d_backward_{suffix}", dx.size,
              [dy, dx, *(rt.i64(v) for v in (n, height, width, c, sh, sw)),
               rt.i32(interpolation == "bilinear")])
    return dx


def upsample_bilinear_gpu(x, *, size=2):
    """Bilinear up-sampling (half-pixel centres): ``upsample2d_forward_gpu(x, size=size,
    interpolation="bilinear")``."""
    return upsample2d_forward_gpu(x, size=size, interpolation="bilinear")


def upsample_bilinear_backward_gpu(dy, *, size=2):
    """Its adjoint: ``upsample2d_backward_gpu(dy, size=size, interpolation="bilinear")``."""
    return upsample2d_backward_gpu(dy, size=size, interpolation="bilinear")
