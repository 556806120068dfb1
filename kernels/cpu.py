"""The CPU side of the kernels' runtime: their thread pool, OpenBLAS's thread count, glibc's malloc.

- ``parallel_map(fn, items)``: the kernels' one thread pool ($MINICNN_NUM_THREADS threads, the
  caller among them; results in item order, so sums over them are deterministic).
- ``single_threaded_blas()``: hold OpenBLAS to one thread per product while the kernels split the
  work themselves (the convolutions, see kernels/conv2d.py).
- ``retain_freed_memory()``: opt-in, process-wide: keep freed memory for the next step's arrays.
Measured effects of each: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# -- the thread pool --------------------------------------------------------------------------------

_cpus = {}


def num_threads() -> int:
    """Threads for the blocked kernels: $MINICNN_NUM_THREADS, else the CPUs this process may use
    (at most 8; asked once per process: the kernels call this a few hundred times a step)."""
    value = os.environ.get("MINICNN_NUM_THREADS")
    if value:
        return max(1, int(value))
    pid = os.getpid()
    if pid not in _cpus:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count()
        _cpus.clear()
        _cpus[pid] = max(1, min(8, cpus or 1))
    return _cpus[pid]


_pool, _pool_owner = None, None
_inside = threading.local()          # set while a thread runs items of a parallel_map
_last_parallel = [float("-inf")]     # time.monotonic() of the last map that used the pool


def recently_parallel(seconds=0.5) -> bool:
    """Whether a ``parallel_map`` used the thread pool within the last ``seconds`` (a model
    large enough to run its kernels on several threads does so every few milliseconds)."""
    return time.monotonic() - _last_parallel[0] < seconds


def parallel_map(fn, items):
    """[fn(item) for item in items] on ``num_threads()`` threads, the caller being one of them:
    the items are cut into that many contiguous runs, all but the first handed to a pool of
    helper threads (one task each), the first run done here (one hand-off per helper, not per
    item, and no thread left waiting). The convolution and activation kernels use it too.
    Results come back in item order whatever the threads do, so sums over them stay
    deterministic."""
    global _pool, _pool_owner
    pool_threads = num_threads()
    threads = min(pool_threads, len(items))
    if threads <= 1 or getattr(_inside, "map", False):    # nested: run here (no deadlock)
        return [fn(item) for item in items]
    if _pool is None or _pool_owner != (os.getpid(), pool_threads):     # new after a fork
        _pool = ThreadPoolExecutor(pool_threads - 1, thread_name_prefix="minicnn")
        _pool_owner = (os.getpid(), pool_threads)
    _last_parallel[0] = time.monotonic()
    bounds = [len(items) * k // threads for k in range(threads + 1)]
    runs = [items[a:b] for a, b in zip(bounds, bounds[1:])]

    def run_all(run):
        _inside.map = True
        try:
            return [fn(item) for item in run]
        finally:
            _inside.map = False
    helpers = [_pool.submit(run_all, run) for run in runs[1:]]
    try:
        results = run_all(runs[0])
    finally:
        done = [helper.result() for helper in helpers]     # wait (and raise) before leaving
    for part in done:
        results.extend(part)
    return results


# -- OpenBLAS's own threads -----------------------------------------------------------------------

def _openblas_thread_setters():
    """``(get, set)`` pairs for the OpenBLAS libraries loaded in this process (NumPy's wheel
    bundles one, SciPy's another), found by name in ``/proc/self/maps``; [] elsewhere or when
    NumPy uses another BLAS (then the convolutions leave threading to the BLAS)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if "openblas" in line.rsplit("/", 1)[-1].lower()})
    except OSError:
        return []
    setters = []
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_", "64_"), ("scipy_", ""), ("", ""), ("", "64_")):
            get = getattr(library, f"{prefix}openblas_get_num_threads{suffix}", None)
            set_ = getattr(library, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                setters.append((get, set_))
                break
    return setters


_blas_lock = threading.Lock()
_blas_state = {"setters": None, "depth": 0, "saved": []}


def blas_threads_controllable() -> bool:
    """Whether ``single_threaded_blas`` can pin NumPy's BLAS to one thread (OpenBLAS on Linux)."""
    if _blas_state["setters"] is None:
        with _blas_lock:
            if _blas_state["setters"] is None:
                _blas_state["setters"] = _openblas_thread_setters()
    return bool(_blas_state["setters"])


@contextlib.contextmanager
def single_threaded_blas():
    """Within this block OpenBLAS runs every product on the calling thread.

    The convolutions split their work over ``num_threads()`` threads of their own (each piece a
    set of whole images or a band of rows, see ``split_work``) rather than let OpenBLAS split
    each thin product: its threads synchronise once per block of K and spin between calls,
    while the copies and sums around the products ran on one core. The previous thread count
    is restored on leaving (nested and concurrent uses count, the last one out restores).
    """
    blas_threads_controllable()
    with _blas_lock:
        if _blas_state["depth"] == 0:
            _blas_state["saved"] = [get() for get, _ in _blas_state["setters"]]
            for _, set_ in _blas_state["setters"]:
                set_(1)
        _blas_state["depth"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_state["depth"] -= 1
            if _blas_state["depth"] == 0:
                for (_, set_), count in zip(_blas_state["setters"], _blas_state["saved"]):
                    set_(count)


# -- memory ----------------------------------------------------------------------------------------

def retain_freed_memory(mmap_threshold=32 << 20, trim_threshold=1 << 30) -> bool:
    """Opt-in, process-wide: let glibc's malloc keep freed memory for the next allocations.

    A training step allocates and frees the same large activations every step. By default glibc
    serves each one above 128 KiB-32 MiB (its adaptive threshold) with a fresh ``mmap`` and gives
    it back on ``free``; the next step's array then page-faults on first touch (the kernel hands
    out zeroed pages): measured ~12,000 faults and 20-30 ms of a 300 ms U-Net step on two cores.
    With ``M_MMAP_THRESHOLD`` at 32 MiB (glibc's maximum) and ``M_TRIM_THRESHOLD`` at 1 GiB,
    freed blocks stay in the heap and are reused. The cost: the process keeps its peak heap.
    Called by the benchmarks (and meant for the CLI's training commands), never at import.
    Returns False where the C library is not glibc (nothing is changed).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3           # glibc's <malloc.h> parameter numbers
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold))) and \
        bool(mallopt(m_trim_threshold, int(trim_threshold)))
