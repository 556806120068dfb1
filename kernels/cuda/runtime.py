"""Compiling and launching the CUDA sources of this folder (CuPy ``RawModule``).

``load("pool.cu")`` compiles a source once per process (NVRTC through CuPy, ``--std=c++14``) and
caches the module; ``kernel("pool.cu", "max_pool2d_forward_f32_u8")`` fetches one
``extern "C" __global__`` function; ``launch(...)`` runs it over ``total`` elements with
``THREADS`` threads per block and at most ``MAX_BLOCKS`` blocks (every kernel is a grid-stride
loop, so any size is covered). CuPy is reached only through ``kernels.backend``: importing this
module does not import it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from kernels import backend

SOURCE_DIR = Path(__file__).resolve().parent
COMPILE_OPTIONS = ("--std=c++14",)
THREADS = 256            # threads per block of the elementwise / gather kernels
MAX_BLOCKS = 8192        # 2M threads in flight: several waves on any current GPU
DTYPE_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}


@functools.lru_cache(maxsize=None)
def load(source_name: str):
    """The compiled ``cupy.RawModule`` of ``kernels/cuda/<source_name>`` (once per process)."""
    path = SOURCE_DIR / source_name
    if path.suffix != ".cu" or not path.is_file():
        raise ValueError(f"kernels.cuda.load: no CUDA source {source_name!r} in {SOURCE_DIR}")
    cp = backend.cupy_module()
    return cp.RawModule(code=path.read_text(), options=COMPILE_OPTIONS)


@functools.lru_cache(maxsize=None)
def kernel(source_name: str, name: str):
    """One ``extern "C" __global__`` function of a source, as a ``cupy.RawKernel``."""
    return load(source_name).get_function(name)


def blocks_for(total: int, threads: int = THREADS) -> int:
    """Blocks of a grid-stride launch over ``total`` items: enough for one item per thread,
    capped at MAX_BLOCKS (the loop covers the rest)."""
    return max(1, min(-(-int(total) // threads), MAX_BLOCKS))


def launch(source_name: str, name: str, total: int, args) -> None:
    """Run kernel ``name`` over ``total`` items (nothing to do when total is 0)."""
    if total <= 0:
        return
    kernel(source_name, name)((blocks_for(total),), (THREADS,), tuple(args))


def i64(value) -> np.int64:
    """A ``long long`` kernel argument (CuPy passes a bare Python int as long long too; this
    keeps every call site explicit)."""
    return np.int64(value)


def i32(value) -> np.int32:
    """An ``int`` kernel argument (flags, modes)."""
    return np.int32(value)


def dtype_suffix(fn: str, dtype) -> str:
    """'f32' or 'f64', the suffix of the kernel instantiated for ``dtype``; TypeError otherwise."""
    try:
        return DTYPE_SUFFIX[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise TypeError(f"{fn}: the CUDA kernels take float32 or float64 arrays, got dtype "
                        f"{dtype}") from None


def require_gpu(fn: str, mirrors: str, **arrays) -> None:
    """TypeError unless every named array is a CuPy array (checked without importing CuPy)."""
    for name, array in arrays.items():
        if array is not None and not backend.is_gpu_array(array):
            raise TypeError(f"{fn}: {name} must be a CuPy array (device 'gpu'), got "
                            f"{type(array).__module__}.{type(array).__name__}; for NumPy arrays "
                            f"use {mirrors}")


def same_dtype(fn: str, **arrays):
    """The one floating dtype shared by the named arrays (float32 stays float32), or TypeError."""
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        detail = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"{fn}: all arrays must share one dtype, got {detail}")
    dtype = next(iter(dtypes.values()))
    dtype_suffix(fn, dtype)
    return dtype


def contiguous(array):
    """A C-contiguous version of a CuPy array (the kernels index flat memory)."""
    return backend.get_array_module(array).ascontiguousarray(array)
