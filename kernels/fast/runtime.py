"""The CPU side of the tuned kernels: their thread pool, how work is split, OpenBLAS's thread count
and glibc's malloc.

- ``parallel_map(fn, items)``: the one thread pool (``mc.config.threads`` threads, the caller among
  them); results in item order, so sums over them are deterministic.
- ``even_bounds(n, parts)``: the one work-splitting formula, ``n * k // parts``.
- ``split_work`` / ``image_groups``: a convolution's output cut into pieces of whole images or
  bands of rows; ``run_pieces`` runs them on the pool with OpenBLAS held to one thread per
  product (``single_threaded_blas``), whenever the kernels use threads of their own.
- ``retain_freed_memory()``: opt-in, process-wide: keep freed memory for the next step's arrays.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from kernels.config import settings

# -- splitting work -----------------------------------------------------------------------------


def even_bounds(n: int, parts: int):
    """``n`` items cut into ``parts`` contiguous runs of equal size (to one item): the non-empty
    ``(start, stop)`` pairs of ``start = n * k // parts``."""
    edges = [n * k // parts for k in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def split_work(n: int, rows: int, parts: int):
    """Cut ``n`` images of ``rows`` output rows into about ``parts`` equal pieces
    ``(n0, n1, h0, h1)``: images n0..n1-1, their rows h0..h1-1.

    Whole images when they share out evenly (or are many); otherwise every image is cut into
    bands of rows (one image per piece), so that one image on two threads still runs in two
    halves. Each piece's output is one contiguous block of ``(N, Ho, Wo, O)``.
    """
    if parts <= 1:
        return [(0, n, 0, rows)]
    if n % parts == 0 or n >= 4 * parts or rows == 1:
        return [(a, b, 0, rows) for a, b in even_bounds(n, parts)]
    bands = even_bounds(rows, min(rows, parts // math.gcd(n, parts)))
    return [(i, i + 1, a, b) for i in range(n) for a, b in bands]


def image_groups(n: int, parts: int):
    """``split_work`` restricted to whole images: ``(n0, n1, 0, 1)`` (for work whose pieces must
    not share an image, e.g. the scatter of ``col2im``)."""
    return split_work(n, 1, min(n, parts))


def piece_threads() -> int:
    """How many pieces the tuned kernels cut their work into: ``mc.config.threads`` when OpenBLAS
    can be held to one thread per call, else 1 (the BLAS then threads each product itself)."""
    threads = settings.threads
    return threads if threads > 1 and blas_threads_controllable() else 1


def run_pieces(fn, pieces):
    """[fn(piece) for piece in pieces] in piece order (sums over pieces are deterministic), on the
    thread pool and with OpenBLAS held to one thread whenever the kernels have threads of their
    own (``piece_threads() > 1``).

    A single piece (work too small to share out) keeps OpenBLAS on one thread too once the pool
    has run in this process: a threaded product would wake OpenBLAS's helper threads, which then
    spin for ~0.1 s on the cores the pool's next pieces need. In a process whose work never
    filled the pool (a small model: every convolution one piece), OpenBLAS threads the products
    itself, which is faster there (benchmarks/RESULTS.md, issue 12).
    """
    if piece_threads() == 1 or (len(pieces) == 1 and not _pool_state["has_run"]):
        return [fn(piece) for piece in pieces]
    with single_threaded_blas():
        return parallel_map(fn, pieces)


# -- the thread pool ------------------------------------------------------------------------------

_pool, _pool_owner = None, None
_pool_state = {"has_run": False}     # set by the first parallel_map that hands work to the pool
_inside = threading.local()          # set while a thread runs items of a parallel_map


def parallel_map(fn, items):
    """[fn(item) for item in items] on ``mc.config.threads`` threads, the caller being one of them:
    the items are cut into that many contiguous runs (``even_bounds``), all but the first handed to
    a pool of helper threads (one task each), the first run done here. Results come back in item
    order whatever the threads do; a map inside a map runs on its caller's thread."""
    global _pool, _pool_owner
    pool_threads = settings.threads
    threads = min(pool_threads, len(items))
    if threads <= 1 or getattr(_inside, "map", False):    # nested: run here (no deadlock)
        return [fn(item) for item in items]
    if _pool is None or _pool_owner != (os.getpid(), pool_threads):     # new threads or a fork
        if _pool is not None and _pool_owner[0] == os.getpid():
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(pool_threads - 1, thread_name_prefix="minicnn")
        _pool_owner = (os.getpid(), pool_threads)
    runs = [items[a:b] for a, b in even_bounds(len(items), threads)]
    _pool_state["has_run"] = True

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
    NumPy uses another BLAS (then the kernels leave threading to the BLAS)."""
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


def blas_thread_counts() -> list:
    """The thread count of each OpenBLAS library found ([] where none can be controlled)."""
    blas_threads_controllable()
    return [get() for get, _ in _blas_state["setters"]]


@contextlib.contextmanager
def single_threaded_blas():
    """Within this block OpenBLAS runs every product on the calling thread.

    The tuned kernels split their work over threads of their own (pieces of whole images or bands
    of rows, see ``split_work``) rather than let OpenBLAS split each thin product: its threads
    synchronise once per block of K and spin between calls, while the copies and sums around the
    products would run on one core. The previous thread count is restored on leaving (nested and
    concurrent uses count; the last one out restores).
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

    With ``M_MMAP_THRESHOLD`` at 32 MiB (glibc's maximum) and ``M_TRIM_THRESHOLD`` at 1 GiB, a
    freed large array stays in the heap and serves the next one, instead of going back to the OS
    and page-faulting again on first touch (a training step allocates and frees the same large
    activations every step; measured: benchmarks/RESULTS.md). The cost: the process keeps its peak
    heap. Called by the benchmarks and ``minicnn train``, never at import. Returns False where the C
    library is not glibc (nothing is changed).
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
