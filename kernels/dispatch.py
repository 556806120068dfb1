"""The one place that decides which implementation of a kernel runs: plain, tuned CPU or CUDA.

Every kernel with a twin is listed below with its three implementations: the plain one (the
readable ``kernels/*.py`` a student steps through), its tuned CPU twin (``kernels/fast``) and its
CUDA twin (``kernels/cuda``). The functions of this module carry the plain kernels' names,
signatures and docstrings; each call picks one implementation from its arrays and ``mc.config``:

    mc.config.kernels == "plain"            the plain kernel, whatever the device
    NumPy arrays                            the tuned CPU twin (where there is one), else plain
    CuPy arrays, mc.config.cuda_kernels     the CUDA twin (where there is one, for float32 and
                                            float64 arrays), else plain
    CuPy arrays, not mc.config.cuda_kernels the plain kernel (its array code runs on CuPy)

The arrays are the positional arguments (arrays come first, settings are keyword-only); a tuple
among them (a loss's saved state) counts through its items. ``minicnn`` calls kernels with twins
through this module; kernels without one it calls from their own module.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

from kernels import (activations, arrays, conv2d, cuda, depthwise, losses, normalization, pooling,
                     upsampling)
from kernels.backend import cuda_kernels_enabled, is_floating, is_gpu_array
from kernels.config import settings
from kernels.fast import activations as fast_activations
from kernels.fast import arrays as fast_arrays
from kernels.fast import conv2d as fast_conv2d
from kernels.fast import depthwise as fast_depthwise
from kernels.fast import normalization as fast_normalization
from kernels.fast import pooling as fast_pooling


@dataclass(frozen=True)
class Twins:
    """The implementations of one kernel; ``cuda_applies(*args, **settings)`` says whether the
    CUDA twin covers a call (None: always)."""
    plain: Callable
    fast: Optional[Callable] = None
    cuda: Optional[Callable] = None
    cuda_applies: Optional[Callable] = None


def arrays_of(args):
    """The positional arguments that are arrays, and the array items of tuples among them."""
    items = [b for a in args for b in (a if isinstance(a, tuple) else (a,))]
    return [a for a in items if hasattr(a, "dtype") and hasattr(a, "shape")]


def implementation(twins: Twins, args, kwargs) -> Callable:
    """The function that runs this call (see the module docstring). The CUDA twins take
    float32 and float64 arrays only (``backend.cuda_kernels_enabled``): float16 and bfloat16
    ones run the plain array code."""
    if settings.kernels == "plain":
        return twins.plain
    arrays = arrays_of(args)
    if any(is_gpu_array(a) for a in arrays):
        floating = [a for a in arrays if is_floating(a.dtype)]
        if twins.cuda is not None and cuda_kernels_enabled(*floating) and \
                (twins.cuda_applies is None or twins.cuda_applies(*args, **kwargs)):
            return twins.cuda
        return twins.plain
    return twins.plain if twins.fast is None else twins.fast


def dispatched(plain, fast=None, cuda=None, cuda_applies=None):
    """A function with ``plain``'s name, signature and docstring that runs the implementation
    ``implementation`` picks; its ``twins`` attribute lists them."""
    twins = Twins(plain, fast, cuda, cuda_applies)

    @functools.wraps(plain)
    def run(*args, **kwargs):
        return implementation(twins, args, kwargs)(*args, **kwargs)
    run.twins = twins
    return run


conv2d_forward = dispatched(conv2d.conv2d_forward, fast_conv2d.conv2d_forward,
                            cuda.conv2d_forward_gpu)
conv2d_transpose = dispatched(conv2d.conv2d_transpose, fast_conv2d.conv2d_transpose,
                              cuda.conv2d_transpose_gpu)
conv2d_backward_filter = dispatched(conv2d.conv2d_backward_filter,
                                    fast_conv2d.conv2d_backward_filter,
                                    cuda.conv2d_backward_filter_gpu)
bias_gradient = dispatched(conv2d.bias_gradient, fast_conv2d.bias_gradient)

depthwise_conv2d_forward = dispatched(depthwise.depthwise_conv2d_forward,
                                      fast_depthwise.depthwise_conv2d_forward)
depthwise_conv2d_backward_input = dispatched(depthwise.depthwise_conv2d_backward_input,
                                             fast_depthwise.depthwise_conv2d_backward_input)
depthwise_conv2d_backward_filter = dispatched(depthwise.depthwise_conv2d_backward_filter,
                                              fast_depthwise.depthwise_conv2d_backward_filter)

max_pool2d_forward = dispatched(pooling.max_pool2d_forward, fast_pooling.max_pool2d_forward,
                                cuda.max_pool2d_forward_gpu)
# max pooling's CUDA backward (kernels/cuda/pool.py) is no faster than the array code: not used
max_pool2d_backward = dispatched(pooling.max_pool2d_backward, fast_pooling.max_pool2d_backward)
avg_pool2d_forward = dispatched(pooling.avg_pool2d_forward, fast_pooling.avg_pool2d_forward)
avg_pool2d_backward = dispatched(pooling.avg_pool2d_backward, fast_pooling.avg_pool2d_backward)

upsample2d_forward = dispatched(upsampling.upsample2d_forward, None, cuda.upsample2d_forward_gpu)
upsample2d_backward = dispatched(upsampling.upsample2d_backward, None,
                                 cuda.upsample2d_backward_gpu)

batch_norm_forward_training = dispatched(normalization.batch_norm_forward_training,
                                         fast_normalization.batch_norm_forward_training,
                                         cuda.batch_norm_forward_training_gpu)
batch_norm_forward_inference = dispatched(normalization.batch_norm_forward_inference,
                                          fast_normalization.batch_norm_forward_inference,
                                          cuda.batch_norm_forward_inference_gpu)
batch_norm_backward = dispatched(normalization.batch_norm_backward,
                                 fast_normalization.batch_norm_backward,
                                 cuda.batch_norm_backward_gpu)

batch_norm_relu_forward_training = dispatched(normalization.batch_norm_relu_forward_training,
                                              fast_normalization.batch_norm_relu_forward_training,
                                              cuda.batch_norm_relu_forward_training_gpu)
batch_norm_relu_backward = dispatched(normalization.batch_norm_relu_backward,
                                      fast_normalization.batch_norm_relu_backward,
                                      cuda.batch_norm_relu_backward_gpu)

relu_forward = dispatched(activations.relu_forward, fast_activations.relu_forward)
relu_backward = dispatched(activations.relu_backward, fast_activations.relu_backward)

# The fused CUDA cross-entropy covers logits only (from_logits=True; the saved state's flag).
sparse_categorical_crossentropy_forward = dispatched(
    losses.sparse_categorical_crossentropy_forward, None,
    cuda.sparse_categorical_crossentropy_forward_gpu,
    cuda_applies=lambda *arrays, from_logits, **_: from_logits)
sparse_categorical_crossentropy_backward = dispatched(
    losses.sparse_categorical_crossentropy_backward, None,
    cuda.sparse_categorical_crossentropy_backward_gpu,
    cuda_applies=lambda grad, saved: saved[0])

concatenate = dispatched(arrays.concatenate, fast_arrays.concatenate)

KERNELS = {name: f for name, f in list(globals().items()) if hasattr(f, "twins")}
