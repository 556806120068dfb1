"""Tuned CPU twin of ``kernels/activations.py``'s ReLU (same results): one pass per block of
``mc.config.elementwise_block_bytes`` on the threads for arrays larger than two blocks, the
maximum taken against a zero of x's dtype (NumPy 2 runs that as fast as against an array) and the
backward written with ``out=`` (no temporary).
"""
from __future__ import annotations

import numpy as np

from kernels import activations as plain
from kernels.config import settings
from kernels.fast.runtime import parallel_map


def _elementwise(fn, a):
    """fn(s) for slices s of a's flat index: one slice for small arrays, else blocks of
    ``mc.config.elementwise_block_bytes`` on the thread pool (``fn`` writes disjoint blocks)."""
    block = settings.elementwise_block_bytes
    if a.nbytes <= 2 * block:
        fn(slice(None))
        return
    step = max(1, block // a.itemsize)
    parallel_map(fn, [slice(i, i + step) for i in range(0, a.size, step)])


def relu_forward(x):
    """``kernels.activations.relu_forward``."""
    x = np.ascontiguousarray(x)
    y, zero = np.empty_like(x), x.dtype.type(0)
    _elementwise(lambda s: np.maximum(x.reshape(-1)[s], zero, out=y.reshape(-1)[s]), x)
    return y


def relu_backward(dy, y):
    """``kernels.activations.relu_backward``."""
    plain.check_same_shape("relu_backward", dy, y)
    dy, y = np.ascontiguousarray(dy), np.ascontiguousarray(y)
    dx = np.empty_like(dy)
    _elementwise(lambda s: np.multiply(dy.reshape(-1)[s], y.reshape(-1)[s] > 0,
                                       out=dx.reshape(-1)[s]), dy)
    return dx
