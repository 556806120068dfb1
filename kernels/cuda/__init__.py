"""Hand-written CUDA kernels for the GPU path, compiled at run time by CuPy (``RawModule``).

One ``.cu`` source per operation family, each with a Python module of wrappers that take and
return CuPy arrays and have the signature (and results) of the plain kernel they replace:

    conv.cu / conv.py              im2col_gpu, col2im_gpu, and on them        kernels.conv2d
                                   conv2d_forward_gpu, conv2d_transpose_gpu,
                                   conv2d_backward_filter_gpu
    pool.cu / pool.py              max_pool2d_forward_gpu, _backward_gpu      kernels.pooling
    upsample.cu / upsample.py      upsample2d_forward_gpu, _backward_gpu      kernels.upsampling
    batchnorm.cu / batchnorm.py    batch_norm_forward_training_gpu,           kernels.normalization
                                   batch_norm_forward_inference_gpu,
                                   batch_norm_backward_gpu (+ batch_norm_statistics_gpu),
                                   batch_norm_relu_forward_training_gpu,
                                   batch_norm_relu_backward_gpu (the same, then / after a ReLU)
    softmax_ce.cu / softmax_ce.py  sparse_categorical_crossentropy_forward_gpu,  kernels.losses
                                   _backward_gpu (+ the fused softmax_cross_entropy_gpu)
    adam.cu / adam.py              adam_update_gpu: Adam on every weight in   minicnn.optimizers.Adam
                                   one launch (twin: adam_update_reference)

Every kernel is deterministic: reductions run in a fixed order and the backward passes are
gathers (each output element sums its own contributions), never atomics. ``kernels.dispatch``
lists which plain kernel each wrapper replaces and runs it for CuPy arrays
(``mc.config.cuda_kernels``).

Importing this package does not import CuPy: ``load`` reaches it through ``kernels.backend``
on the first launch.
"""
from kernels.cuda.adam import adam_update_gpu, adam_update_reference
from kernels.cuda.batchnorm import (batch_norm_backward_gpu, batch_norm_forward_inference_gpu,
                                    batch_norm_forward_training_gpu, batch_norm_relu_backward_gpu,
                                    batch_norm_relu_forward_training_gpu,
                                    batch_norm_statistics_gpu)
from kernels.cuda.conv import (col2im_gpu, conv2d_backward_filter_gpu, conv2d_forward_gpu,
                               conv2d_transpose_gpu, im2col_gpu)
from kernels.cuda.pool import max_pool2d_backward_gpu, max_pool2d_forward_gpu
from kernels.cuda.runtime import COMPILE_OPTIONS, SOURCE_DIR, kernel, load
from kernels.cuda.softmax_ce import (softmax_cross_entropy_gpu,
                                     sparse_categorical_crossentropy_backward_gpu,
                                     sparse_categorical_crossentropy_forward_gpu)
from kernels.cuda.upsample import (upsample2d_backward_gpu, upsample2d_forward_gpu,
                                   upsample_bilinear_backward_gpu, upsample_bilinear_gpu)

# Every extern "C" kernel each source must define (the tests compile the sources and check).
KERNEL_NAMES = {
    "conv.cu": [f"{k}_{t}" for t in ("f32", "f64") for k in ("im2col", "col2im")],
    "pool.cu": [f"max_pool2d_{d}_{t}_{i}" for d in ("forward", "backward")
                for t in ("f32", "f64") for i in ("u8", "i32")],
    "upsample.cu": [f"upsample2d_{d}_{t}" for d in ("forward", "backward") for t in ("f32", "f64")],
    "batchnorm.cu": [f"bn_{k}_{t}" for k in ("partial_sums", "finalize_stats", "finalize_sums",
                                             "normalize", "backward_dx") for t in ("f32", "f64")],
    "softmax_ce.cu": [f"softmax_ce_{d}_{t}" for d in ("forward", "backward")
                      for t in ("f32", "f64")],
    "adam.cu": [f"adam_multi_{t}" for t in ("f32", "f64")],
}

__all__ = [
    "load", "kernel", "SOURCE_DIR", "COMPILE_OPTIONS", "KERNEL_NAMES",
    "im2col_gpu", "col2im_gpu", "conv2d_forward_gpu", "conv2d_transpose_gpu",
    "conv2d_backward_filter_gpu", "max_pool2d_forward_gpu", "max_pool2d_backward_gpu",
    "upsample2d_forward_gpu", "upsample2d_backward_gpu", "upsample_bilinear_gpu",
    "upsample_bilinear_backward_gpu", "batch_norm_statistics_gpu",
    "batch_norm_forward_training_gpu", "batch_norm_forward_inference_gpu",
    "batch_norm_backward_gpu", "batch_norm_relu_forward_training_gpu",
    "batch_norm_relu_backward_gpu", "softmax_cross_entropy_gpu",
    "sparse_categorical_crossentropy_forward_gpu", "sparse_categorical_crossentropy_backward_gpu",
    "adam_update_gpu", "adam_update_reference",
]
