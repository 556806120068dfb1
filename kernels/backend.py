"""The one place that knows CuPy.

Every kernel finds its array module from its inputs (``xp = get_array_module(x, w)``) and
runs unchanged on NumPy (CPU) or CuPy (NVIDIA GPU) arrays. CuPy is imported lazily, on the
first question about the GPU, so importing ``kernels`` never imports it.

The default device comes from the environment variable ``MINICNN_DEVICE`` ("cpu", "gpu" or
"auto"; unset means "cpu").
"""
from __future__ import annotations

import os

import numpy as np

DEVICES = ("cpu", "gpu")
_cupy = None          # the cupy module once imported successfully
_cupy_error = None    # why it could not be imported


def _import_cupy():
    """Return the cupy module or None, importing it at most once."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy  # the only import of cupy in the project
            _cupy = cupy
        except Exception as exc:  # ImportError, or a broken CUDA install
            _cupy_error = exc
    return _cupy


def cupy_module():
    """The cupy module, or raise a RuntimeError saying what is missing and how to install it."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(
            "device 'gpu' needs CuPy, which could not be imported "
            f"({type(_cupy_error).__name__}: {_cupy_error}). Install the wheel matching your CUDA: "
            "pip install cupy-cuda12x  (CUDA 12)  or  pip install cupy-cuda13x  (CUDA 13)")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise RuntimeError(f"device 'gpu': CuPy is installed but sees no CUDA device ({exc})") from exc
    if count < 1:
        raise RuntimeError("device 'gpu': CuPy is installed but sees no CUDA device")
    return cp


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        cupy_module()
        return True
    except RuntimeError:
        return False


def is_gpu_array(array) -> bool:
    """True for a CuPy array (checked without importing CuPy)."""
    return type(array).__module__.startswith("cupy")


def get_array_module(*arrays):
    """numpy, or cupy when any argument is a CuPy array (the DeZero/Chainer switch)."""
    for a in arrays:
        if is_gpu_array(a):
            return _import_cupy()
    return np


def device_of(array) -> str:
    """'gpu' for a CuPy array, else 'cpu'."""
    return "gpu" if is_gpu_array(array) else "cpu"


def check_device(device: str) -> str:
    """Normalise a device name: 'cpu', 'gpu' ('cuda' accepted), or 'auto' (gpu when available)."""
    name = str(device).lower()
    if name == "cuda":
        name = "gpu"
    if name == "auto":
        return "gpu" if gpu_available() else "cpu"
    if name not in DEVICES:
        raise ValueError(f"device must be 'cpu', 'gpu' or 'auto', got {device!r}")
    return name


def default_device() -> str:
    """The device named by MINICNN_DEVICE ('cpu' when unset)."""
    return check_device(os.environ.get("MINICNN_DEVICE", "cpu") or "cpu")


def to_device(array, device: str | None = None):
    """Copy ``array`` to ``device`` ('cpu' -> NumPy, 'gpu' -> CuPy); no copy if it is there already."""
    device = default_device() if device is None else check_device(device)
    if device == "gpu":
        cp = cupy_module()
        return array if is_gpu_array(array) else cp.asarray(array)
    if is_gpu_array(array):
        return array.get()
    return np.asarray(array)


def to_numpy(array) -> np.ndarray:
    """A host (NumPy) view or copy of any array."""
    return array.get() if is_gpu_array(array) else np.asarray(array)
