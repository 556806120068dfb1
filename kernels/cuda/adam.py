"""Adam over all weights in one launch (``adam.cu``), and its NumPy twin.

One Adam step (Keras 3 ``Adam``, no amsgrad) for K weights at once; with t the step number
(iterations + 1), each weight k and each of its elements:

    m_k <- m_k + (g_k - m_k) * (1 - beta_1)
    v_k <- v_k + (g_k * g_k - v_k) * (1 - beta_2)
    w_k <- w_k - (m_k / (sqrt(v_k) + epsilon)) * alpha,  alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)

``adam_update_gpu`` does it for CuPy arrays with ONE kernel launch (instead of about ten
array operations per weight), from tables of the arrays' device addresses and the running
sums of their sizes (``flat_offsets``). ``adam_update_reference`` is the same step on NumPy
arrays, written over the same flat index space (each element finds its weight in
``flat_offsets`` as the kernel does); the tests hold it to ``minicnn.optimizers.Adam`` on the
CPU and the kernel to it on a GPU. Arrays are updated in place; all share one dtype (float32
or float64).
"""
from __future__ import annotations

import math

import numpy as np

from kernels import backend
from kernels.cuda import runtime as rt

SOURCE = "adam.cu"
_tables = {"host": None, "device": None}     # the last address table sent to the GPU


def flat_offsets(sizes) -> np.ndarray:
    """(K + 1,) int64: 0, then the running sums of ``sizes``; weight k owns the flat elements
    offsets[k] <= idx < offsets[k + 1]."""
    return np.concatenate([[0], np.cumsum(np.asarray(list(sizes), dtype=np.int64))]).astype(
        np.int64)


def owners(offsets, idx) -> np.ndarray:
    """The weight of each flat index: the largest k with offsets[k] <= idx (the kernel's binary
    search, ``minicnn_owner``)."""
    return np.searchsorted(offsets[:-1], idx, side="right") - 1


def adam_step_constants(learning_rate, beta_1, beta_2, t):
    """alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t), the step size of Adam's step t >= 1."""
    return learning_rate * math.sqrt(1.0 - beta_2 ** t) / (1.0 - beta_1 ** t)


def _check(fn, weights, grads, ms, vs):
    lists = {"weights": weights, "grads": grads, "m": ms, "v": vs}
    counts = {name: len(items) for name, items in lists.items()}
    if len(set(counts.values())) != 1 or not weights:
        raise ValueError(f"{fn}: weights, grads, m and v must be non-empty lists of one length, "
                         f"got {counts}")
    dtype = np.dtype(weights[0].dtype)
    for k in range(len(weights)):
        shapes = {name: tuple(items[k].shape) for name, items in lists.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{fn}: weight {k}: shapes differ: {shapes}")
        dtypes = {name: np.dtype(items[k].dtype) for name, items in lists.items()}
        if set(dtypes.values()) != {dtype}:
            raise TypeError(f"{fn}: weight {k}: all arrays must be {dtype}, got {dtypes}")
    return dtype


def adam_update_reference(weights, grads, ms, vs, learning_rate, beta_1, beta_2, epsilon, t):
    """The fused step on NumPy arrays (in place): every element of every weight, found by its
    flat index as in the kernel. Contiguous arrays; one dtype."""
    dtype = _check("adam_update_reference", weights, grads, ms, vs)
    offsets = flat_offsets(w.size for w in weights)
    idx = np.arange(offsets[-1])
    k_of, i_of = owners(offsets, idx), idx - offsets[owners(offsets, idx)]
    flat = {name: np.concatenate([a.reshape(-1) for a in arrays]) for name, arrays in
            (("w", weights), ("g", grads), ("m", ms), ("v", vs))}
    cast = dtype.type
    alpha = cast(adam_step_constants(learning_rate, beta_1, beta_2, t))
    g, m, v, w = flat["g"], flat["m"], flat["v"], flat["w"]
    m += (g - m) * cast(1.0 - beta_1)
    v += (g * g - v) * cast(1.0 - beta_2)
    w -= (m / (np.sqrt(v) + cast(epsilon))) * alpha
    for name, arrays in (("w", weights), ("m", ms), ("v", vs)):
        for k, array in enumerate(arrays):
            array.reshape(-1)[i_of[k_of == k]] = flat[name][k_of == k]


def adam_update_gpu(weights, grads, ms, vs, learning_rate, beta_1, beta_2, epsilon, t):
    """The fused step on CuPy arrays (in place), one launch for all K weights.

    weights, grads, ms, vs: lists of K C-contiguous CuPy arrays, weight k's four of one shape,
    all float32 (or all float64). Mirrors ``adam_update_reference``."""
    fn = "adam_update_gpu"
    dtype = _check(fn, weights, grads, ms, vs)
    suffix = rt.dtype_suffix(fn, dtype)
    for name, arrays in (("weights", weights), ("grads", grads), ("m", ms), ("v", vs)):
        for k, a in enumerate(arrays):
            rt.require_gpu(fn, "kernels.cuda.adam.adam_update_reference", **{f"{name}[{k}]": a})
            if not a.flags.c_contiguous:
                raise ValueError(f"{fn}: {name}[{k}] must be C-contiguous (updated in place)")
    k = len(weights)
    offsets = flat_offsets(w.size for w in weights)
    table = address_table(weights, grads, ms, vs, offsets)
    cast = dtype.type
    rt.launch(SOURCE, f"adam_multi_{suffix}", int(offsets[-1]),
              [table[:k], table[k:2 * k], table[2 * k:3 * k], table[3 * k:4 * k],
               table[4 * k:].view(np.int64), rt.i32(k), rt.i64(offsets[-1]),
               cast(adam_step_constants(learning_rate, beta_1, beta_2, t)),
               cast(1.0 - beta_1), cast(1.0 - beta_2), cast(epsilon)])


def address_table(weights, grads, ms, vs, offsets):
    """One device array (5K + 1,) uint64: the K addresses of the weights, of the gradients, of
    m, of v, then the K + 1 offsets. Copied to the GPU only when it changed since the last step
    (CuPy's memory pool mostly hands the gradients the same addresses every step)."""
    host = np.concatenate([np.array([a.data.ptr for a in arrays], dtype=np.uint64)
                           for arrays in (weights, grads, ms, vs)] + [offsets.view(np.uint64)])
    device = _tables["device"]
    cached = _tables["host"]
    if device is None or cached.shape != host.shape or not np.array_equal(cached, host) or \
            device.device.id != weights[0].device.id:
        device = backend.get_array_module(weights[0]).asarray(host)
        _tables["host"], _tables["device"] = host, device
    return device
