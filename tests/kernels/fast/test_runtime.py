"""kernels.fast.runtime: the thread pool, the one work-splitting formula, OpenBLAS's thread count
and glibc's malloc setting."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels.config import settings
from kernels.fast import runtime


@pytest.mark.parametrize("n, parts", [(10, 3), (3, 5), (7, 7), (0, 2), (100, 8), (5, 1)])
def test_even_bounds_cover_every_item_once_in_runs_of_equal_size(n, parts):
    bounds = runtime.even_bounds(n, parts)
    edges = [0] + [b for _, b in bounds]
    assert [a for a, _ in bounds] == edges[:-1] and edges[-1] == n      # contiguous, all of n
    sizes = [b - a for a, b in bounds]
    assert all(s > 0 for s in sizes) and len(bounds) == min(n, parts)
    assert max(sizes, default=0) - min(sizes, default=0) <= 1


@pytest.mark.parametrize("n, rows, parts", [(8, 5, 2), (3, 7, 2), (1, 9, 2), (1, 1, 4), (6, 4, 4),
                                            (5, 3, 3), (2, 16, 8), (20, 2, 3)])
def test_split_work_covers_every_output_row_once(n, rows, parts):
    pieces = runtime.split_work(n, rows, parts)
    covered = np.zeros((n, rows), dtype=int)
    for n0, n1, h0, h1 in pieces:
        assert 0 <= n0 < n1 <= n and 0 <= h0 < h1 <= rows
        assert h0 == 0 and h1 == rows or n1 == n0 + 1      # whole images, or one image's band
        covered[n0:n1, h0:h1] += 1
    assert (covered == 1).all()
    sizes = [(n1 - n0) * (h1 - h0) for n0, n1, h0, h1 in pieces]
    if n % parts == 0 or n >= 4 * parts:
        assert len(pieces) == min(n, parts) if n % parts == 0 else len(pieces) == parts
    assert max(sizes) <= 2 * min(sizes) or rows == 1          # shared out about evenly
    assert runtime.split_work(n, rows, 1) == [(0, n, 0, rows)]
    assert all(h0 == 0 and h1 == 1 for _, _, h0, h1 in runtime.image_groups(n, parts))


def test_parallel_map_keeps_order_nests_and_raises():
    """Items come back in order; a map inside a map runs on its caller's thread (no deadlock
    with a pool the outer map keeps busy); an exception reaches the caller."""
    with settings.override(threads=2):
        def inner(i):
            return runtime.parallel_map(lambda j: 10 * i + j, list(range(3)))
        assert runtime.parallel_map(inner, list(range(5))) == [[10 * i + j for j in range(3)]
                                                               for i in range(5)]

        def fails(i):
            if i == 3:
                raise KeyError("three")
            return i
        with pytest.raises(KeyError, match="three"):
            runtime.parallel_map(fails, list(range(4)))
        assert runtime.parallel_map(str, [7]) == ["7"]
    with settings.override(threads=3):                     # a new pool for a new thread count
        assert runtime.parallel_map(lambda i: i * i, list(range(7))) == [i * i for i in range(7)]


def test_pieces_follow_the_threads_setting():
    with settings.override(threads=1):
        assert runtime.piece_threads() == 1
    with settings.override(threads=3):
        assert runtime.piece_threads() == (3 if runtime.blas_threads_controllable() else 1)


def test_single_threaded_blas_restores_the_thread_count():
    if not runtime.blas_threads_controllable():
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can find")
    before = runtime.blas_thread_counts()
    with runtime.single_threaded_blas():
        assert runtime.blas_thread_counts() == [1] * len(before)
        with runtime.single_threaded_blas():                 # nested: still one, restored once
            assert runtime.blas_thread_counts() == [1] * len(before)
        assert runtime.blas_thread_counts() == [1] * len(before)
    assert runtime.blas_thread_counts() == before
    with pytest.raises(KeyError):
        with runtime.single_threaded_blas():
            raise KeyError("inside")
    assert runtime.blas_thread_counts() == before


def test_a_single_piece_threads_its_products_until_the_pool_has_run():
    """In a fresh process a single piece leaves OpenBLAS its threads; after the pool's first
    run every piece, single ones included, holds OpenBLAS to one thread (and restores it)."""
    if not runtime.blas_threads_controllable():
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can find")
    code = ("import json, numpy, kernels.fast.runtime as runtime\n"
            "seen = lambda piece: runtime.blas_thread_counts()\n"
            "first = runtime.run_pieces(seen, [0])[0]\n"
            "runtime.run_pieces(seen, [0, 1])\n"
            "after = runtime.run_pieces(seen, [0])[0]\n"
            "print(json.dumps([first, after, runtime.blas_thread_counts()]))\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "MINICNN_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stderr
    first, after, outside = json.loads(result.stdout)
    assert first == outside and max(first) == 2
    assert after == [1] * len(first)


def test_retain_freed_memory_is_opt_in_and_applies():
    """Not at import (a fresh interpreter's allocations still page-fault); once called, a freed
    large array's memory is reused without new page faults (glibc only)."""
    code = ("import resource, sys, numpy as np, kernels.fast.runtime as runtime\n"
            "if sys.argv[1] == '1': assert runtime.retain_freed_memory()\n"
            "def step(): a = np.ones(1 << 20); b = np.ones(1 << 20); del a, b   # 2 x 8 MB\n"
            "step(); step(); f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(5): step()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n")
    root = Path(__file__).resolve().parents[3]
    counts = []
    for opt in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", code, opt], capture_output=True, text=True,
                              cwd=root, timeout=60)
        if done.returncode != 0 and "AssertionError" in done.stderr:
            pytest.skip("not glibc: retain_freed_memory changes nothing")
        assert done.returncode == 0, done.stderr
        counts.append(int(done.stdout))
    assert counts[0] > 1000 and counts[1] < 50, counts
