"""The one place that knows CuPy.

Every kernel finds its array module from its inputs (``xp = get_array_module(x, w)``) and
runs unchanged on NumPy (CPU) or CuPy (NVIDIA GPU) arrays. CuPy is imported lazily, on the
first question about the GPU, so importing ``kernels`` never imports it.

The default device comes from the environment variable ``MINICNN_DEVICE`` ("cpu", "gpu" or
"auto"; unset means "cpu"). Which kernels run CuPy arrays (the hand-written CUDA kernels of
``kernels/cuda`` or the plain array code) is ``kernels.dispatch``'s decision
(``mc.config.cuda_kernels``, from ``MINICNN_CUDA_KERNELS``).

Besides the switch, the few operations whose CuPy spelling differs from NumPy's live here:
``scatter_add`` (``np.add.at``) and ``device_generator`` (random numbers drawn on the GPU),
and the TF32 switch of CuPy's float32 matrix products (``set_tf32``; off unless asked for).
"""
from __future__ import annotations

import importlib
import os
import warnings

import numpy as np

from kernels.config import settings

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
            _apply_tf32(cupy)
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


def nccl_module():
    """CuPy's NCCL binding (``cupy.cuda.nccl``, for minicnn.distributed), or a RuntimeError
    saying what is missing."""
    cupy_module()
    try:
        from cupy.cuda import nccl  # part of CuPy, imported here only, like cupy itself
    except Exception as exc:
        raise RuntimeError(f"NCCL: cupy.cuda.nccl could not be imported ({type(exc).__name__}: "
                           f"{exc})") from exc
    if not getattr(nccl, "available", True):
        raise RuntimeError("NCCL: CuPy finds no NCCL library; install it as CuPy's guide says "
                           "(pip install nvidia-nccl-cu12 with CuPy >= 14, or python -m "
                           "cupyx.tools.install_library --library nccl --cuda 12.x)")
    return nccl


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


def is_floating(dtype) -> bool:
    """True for float16/32/64 and for bfloat16 (``ml_dtypes.bfloat16``, whose NumPy kind is 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


def to_numpy(array) -> np.ndarray:
    """A host (NumPy) view or copy of any array."""
    return array.get() if is_gpu_array(array) else np.asarray(array)


# -- CUDA kernels or array code -------------------------------------------------------------------
CUDA_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))   # what the .cu sources build


def cuda_kernels_enabled(*arrays) -> bool:
    """Whether CuPy arrays run through the CUDA kernels of ``kernels/cuda`` (``mc.config.
    cuda_kernels``, from ``MINICNN_CUDA_KERNELS``) rather than the plain kernels' array code;
    with ``arrays``, also whether each is float32 or float64, the dtypes the CUDA kernels are
    built for: float16 and bfloat16 arrays (mixed precision) take the array code."""
    return settings.cuda_kernels and all(np.dtype(a.dtype) in CUDA_KERNEL_DTYPES for a in arrays)


# -- operations spelled differently on CuPy -------------------------------------------------------
def scatter_add(target, index, values) -> None:
    """``target[index] += values`` in place, adding every repeat of an index (``np.add.at``).

    CuPy: ``cupy.add.at`` (CuPy >= 12), else ``cupyx.scatter_add``. Both use atomics: float
    sums come in no fixed order, so their last bits may change from run to run; float32,
    float64, int32 and uint64 targets are supported (not int64)."""
    if not is_gpu_array(target):
        np.add.at(target, index, values)
        return
    cp = _import_cupy()
    if hasattr(cp.add, "at"):
        cp.add.at(target, index, values)
    else:
        import cupyx  # ships with CuPy; imported here only, like cupy itself
        cupyx.scatter_add(target, index, values)


class DeviceGenerator:
    """Uniform random numbers drawn on the GPU: ``random(size, dtype)`` as
    ``numpy.random.Generator.random``, from CuPy's cuRAND generator seeded with ``seed``."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._state = cupy_module().random.RandomState(self.seed)

    def random(self, size=None, dtype=np.float64):
        """Floats in [0, 1) of shape ``size``, float32 or float64, as a CuPy array."""
        return self._state.random_sample(size=size, dtype=dtype)

    def __repr__(self) -> str:
        return f"DeviceGenerator(seed={self.seed})"


def device_generator(seed: int) -> DeviceGenerator:
    """A GPU random generator seeded with ``seed`` (an int in [0, 2**63)); RuntimeError without
    CuPy and a GPU."""
    return DeviceGenerator(seed)


# -- TF32 (TensorFloat-32) for float32 matrix products on the GPU ---------------------------------
def _tf32_from_environment() -> bool:
    """MINICNN_TF32 (1/0, true/false, on/off) when set, else CuPy's own rule on CUPY_TF32
    (an integer > 0 means on); off when neither is set."""
    value = os.environ.get("MINICNN_TF32")
    if value is not None:
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    try:
        return int(os.environ.get("CUPY_TF32", "0")) > 0
    except ValueError:
        return False


_tf32 = _tf32_from_environment()


def tf32_enabled() -> bool:
    """Whether float32 matrix products on the GPU may use TF32 tensor cores (``set_tf32``)."""
    return _tf32


def set_tf32(enabled: bool) -> None:
    """Let CuPy's float32 matrix products (cuBLAS GEMM: ``@``, ``matmul`` and ``dot`` of 2-D
    operands, ``tensordot``) run on TF32 tensor cores, or keep them in full float32 (the
    default, as PyTorch's ``torch.backends.cuda.matmul.allow_tf32 = False``).

    TF32 rounds each float32 input of a product to 10 explicit mantissa bits (unit roundoff
    2**-11 = 4.9e-4 instead of float32's 2**-24 = 6.0e-8) and accumulates in float32; the
    exponent, hence the range, is float32's. A product's relative error is then about 1e-3
    instead of about 1e-6; it needs an Ampere or newer GPU (compute capability >= 8.0).

    CuPy reads ``CUPY_TF32`` once per process, at its first float32 product, and caches the
    choice. This sets the variable (for a CuPy not yet imported, and for child processes) and,
    when CuPy is imported, replaces the cached choice (``cupy._core._routines_linalg.
    set_compute_type(float32, COMPUTE_TYPE_TF32 | COMPUTE_TYPE_DEFAULT)``), so the switch acts
    on the next product whenever it is called. Not affected: float64 and 16-bit products, and
    CuPy's batched (3-D and up) ``matmul``, which always computes in full float32.
    ``NVIDIA_TF32_OVERRIDE=0`` in the environment disables TF32 in every NVIDIA library.
    """
    global _tf32
    _tf32 = bool(enabled)
    os.environ["CUPY_TF32"] = "1" if _tf32 else "0"
    if _cupy is not None:
        _apply_tf32(_cupy)


def _apply_tf32(cp) -> bool:
    """Set CuPy's cached float32 compute type to match ``_tf32``; False (with a warning when
    TF32 is asked for) if this CuPy has no ``set_compute_type``: then only CUPY_TF32 acts, and
    only before the process's first float32 product."""
    try:
        linalg = importlib.import_module(cp.__name__ + "._core._routines_linalg")
        compute_type = linalg.COMPUTE_TYPE_TF32 if _tf32 else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, compute_type)
        return True
    except Exception as exc:    # no such API in this CuPy, or (TF32 asked) no device to ask
        if _tf32:
            warnings.warn(f"set_tf32: could not set CuPy's float32 compute type "
                          f"({type(exc).__name__}: {exc}); CUPY_TF32=1 acts only if no float32 "
                          "product has run yet in this process", RuntimeWarning, stacklevel=3)
        return False
