"""The kernels' runtime settings: one object, read from the environment once (``mc.config``).

    from kernels.config import settings        # the same object as minicnn.config
    settings.threads                           # e.g. 2
    settings.kernels = "plain"                 # from now on: the readable kernels
    with settings.override(kernels="plain", threads=1):
        ...                                    # for this block only (tests, benchmarks, a debugger)

Which implementation runs (``kernels.dispatch``):

    kernels           "fast": the tuned CPU twins of ``kernels/fast`` where one exists; "plain":
                      the readable kernels (one thread, no scratch), e.g. to step through them
                      [MINICNN_KERNELS]
    cuda_kernels      CuPy arrays run the CUDA kernels of ``kernels/cuda`` (True) or the plain
                      kernels' array code on CuPy (False) [MINICNN_CUDA_KERNELS]

How the tuned CPU kernels run (none of these changes a result beyond float rounding):

    threads           threads of the tuned kernels (default: the CPUs this process may use, at
                      most 8) [MINICNN_NUM_THREADS]
    scratch           "reuse": temporaries that never leave a call are kept between calls (a fresh
                      multi-megabyte array page-faults on first touch); "fresh": allocated each
                      call [MINICNN_SCRATCH]
    keep_workspaces   the forward convolution keeps its workspace (padded input or window matrix)
                      for the filter gradient of the same input (``kernels/fast/memo.py``);
                      ``minicnn.no_grad()`` turns it off for its block: no backward will come
    parallel_min_bytes       arrays smaller than this are padded, summed, pooled or joined on one
                             thread
    elementwise_block_bytes  elementwise passes (ReLU) over larger arrays run in blocks this size
    batchnorm_block_bytes    batch norm's rows are processed in blocks of about this size
    conv_parallel_min_macs   convolutions below this many multiply-adds run as one piece
    conv_chunk_bytes         bytes of a convolution's row taps per chunk ...
    conv_chunk_rows          ... clamped to (fewest, most) rows
    shifted_min_channels     the "shifted" convolution needs at least this many input channels ...
    shifted_max_waste        ... and a padded grid at most this much larger than the output
    depthwise_block_bytes    stride-1 depthwise rows per block on one thread ...
    depthwise_threaded_block_bytes  ... and per block on several threads
    depthwise_tile_values    depthwise weight rows are tiled to about this many values

The measurements behind each default are in benchmarks/RESULTS.md. The object is process-wide (not
per thread); ``override`` restores the previous values on leaving, even after an exception.
"""
from __future__ import annotations

import contextlib
import numbers
import os

KERNEL_PATHS = ("fast", "plain")
SCRATCH_POLICIES = ("reuse", "fresh")
_FALSE = ("0", "false", "no", "off")


def _available_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cpus or 1))


def _choice(options):
    def check(name, value):
        if value not in options:
            raise ValueError(f"mc.config.{name} must be one of {options}, got {value!r}")
        return value
    return check


def _bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"mc.config.{name} must be True or False, got {value!r}")
    return value


def _int_at_least(minimum):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"mc.config.{name} must be an int >= {minimum}, got {value!r}")
        return int(value)
    return check


def _number_at_least(minimum):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= minimum:
            raise ValueError(f"mc.config.{name} must be a number >= {minimum}, got {value!r}")
        return float(value)
    return check


def _row_range(name, value):
    try:
        low, high = (int(v) for v in value)
    except (TypeError, ValueError):
        low = high = 0
    if not 1 <= low <= high:
        raise ValueError(f"mc.config.{name} must be (fewest, most) rows, 1 <= fewest <= most, "
                         f"got {value!r}")
    return low, high


# name: (default, check). Defaults of the thresholds are measured: benchmarks/RESULTS.md.
FIELDS = {
    "kernels": ("fast", _choice(KERNEL_PATHS)),
    "cuda_kernels": (True, _bool),
    "threads": (None, _int_at_least(1)),                 # None: _available_cpus()
    "scratch": ("reuse", _choice(SCRATCH_POLICIES)),
    "keep_workspaces": (True, _bool),
    "parallel_min_bytes": (4 << 20, _int_at_least(0)),   # hand-off 30 us; small calls: the GIL
    "elementwise_block_bytes": (1 << 20, _int_at_least(1)),
    "batchnorm_block_bytes": (1 << 20, _int_at_least(1)),    # one L2: recipe -9 % vs 2 MiB
    "conv_parallel_min_macs": (1 << 25, _int_at_least(0)),   # below: OpenBLAS threads it (RESULTS)
    "conv_chunk_bytes": (2 << 20, _int_at_least(1)),     # L2-sized: 5-45% faster than whole pieces
    "conv_chunk_rows": ((1024, 16384), _row_range),
    "shifted_min_channels": (8, _int_at_least(1)),       # fewer: products of K = C are too thin
    "shifted_max_waste": (1.2, _number_at_least(1.0)),   # 32x32 3x3 'same' is 1.13, 16x16 1.27
    "depthwise_block_bytes": (1 << 20, _int_at_least(1)),    # in cache: backward 1.9x faster
    "depthwise_threaded_block_bytes": (64 << 20, _int_at_least(1)),   # fewer, longer calls
    "depthwise_tile_values": (1024, _int_at_least(1)),       # inner loop of k*C values: 1.5x
}

ENVIRONMENT = {"kernels": "MINICNN_KERNELS", "cuda_kernels": "MINICNN_CUDA_KERNELS",
               "threads": "MINICNN_NUM_THREADS", "scratch": "MINICNN_SCRATCH"}


class Settings:
    """The kernels' runtime settings (see the module docstring), checked on assignment."""

    __slots__ = tuple(FIELDS)

    def __init__(self, **values):
        for name, (default, _) in FIELDS.items():
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"mc.config: unknown settings {sorted(values)}; "
                            f"known: {', '.join(FIELDS)}")

    @classmethod
    def from_environment(cls, environ=None) -> "Settings":
        """Defaults, with MINICNN_KERNELS, MINICNN_CUDA_KERNELS, MINICNN_NUM_THREADS and
        MINICNN_SCRATCH applied where set (ValueError naming the variable when invalid)."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, variable in ENVIRONMENT.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            if name == "threads":
                try:
                    values[name] = int(text)
                except ValueError:
                    raise ValueError(f"{variable} must be an int >= 1, got {text!r}") from None
            elif name == "cuda_kernels":
                values[name] = text.lower() not in _FALSE
            else:
                values[name] = text.lower()
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{exc} (from the environment: "
                             + ", ".join(f"{ENVIRONMENT[k]}={v!r}" for k, v in values.items())
                             + ")") from None

    def __setattr__(self, name, value):
        if name not in FIELDS:
            raise AttributeError(f"mc.config has no setting {name!r}; known: {', '.join(FIELDS)}")
        if name == "threads" and value is None:
            value = _available_cpus()
        object.__setattr__(self, name, FIELDS[name][1](name, value))

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in FIELDS}

    @contextlib.contextmanager
    def override(self, **changes):
        """Within this block the named settings take these values; all are restored on leaving."""
        saved = self.as_dict()
        try:
            for name, value in changes.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in saved.items():
                object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return "mc.config(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


settings = Settings.from_environment()
