"""NCCL on a real GPU: minicnn.distributed's NCCL communicator, its allreduce and broadcast on
CuPy arrays (reduced on the device), the gradient buckets and SyncBatchNorm through it.

    python benchmarks/gpu_nccl_check.py            # 1 rank; MPI (singleton) bootstraps NCCL
                                                   #   when mpi4py imports, else 1-process host
    mpiexec -n 2 python benchmarks/gpu_nccl_check.py   # one rank per GPU, on >= 2 GPUs
    (as root: OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpiexec ...)

Needs CuPy with NCCL (the [gpu] extra) and a GPU; mpi4py (the [mpi] extra) only for several
ranks. Prints one line per check and the timings, then "NCCL CHECK PASSED" (exit 0) or the
failures (exit 1). About half a minute on an H200.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from kernels import backend  # noqa: E402
from minicnn import distributed as D  # noqa: E402
from minicnn.functions.normalization import BatchNorm  # noqa: E402
from minicnn.tensor import Tensor  # noqa: E402

failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def make_communicator():
    """NCCL over MPI when mpi4py imports (or several ranks were launched), else over the
    1-process host communicator (a 1-rank NCCL clique needs no id broadcast)."""
    try:
        return D.init("nccl"), "MPI"
    except RuntimeError as error:
        if D.launched_size() > 1 or "mpi4py" not in str(error):
            raise
        return D.NCCLCommunicator(D.Communicator()), "1-process host (no mpi4py)"


def timed(fn, repeats=20):
    cp = backend.cupy_module()
    fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        cp.cuda.get_current_stream().synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> int:
    cp = backend.cupy_module()
    nccl = backend.nccl_module()
    comm, bootstrap = make_communicator()
    n, r = comm.size, comm.rank
    name = cp.cuda.runtime.getDeviceProperties(comm.device)["name"].decode()
    print(f"rank {r} of {n}: GPU {comm.device} ({name}), CuPy {cp.__version__}, NCCL "
          f"{nccl.get_version()}, bootstrapped over {bootstrap}", flush=True)

    host_calls = comm.host.calls
    for dtype in ("float16", "float32", "float64"):
        for op, want in (("sum", n * (n + 1) / 2), ("mean", (n + 1) / 2), ("max", n)):
            a = cp.full(1000, r + 1, dtype=dtype)
            comm.allreduce(a, op)
            check(f"allreduce {op} {dtype} on the device", bool(cp.all(a == want)),
                  f"{float(a[0])} (want {want})")
    b = cp.arange(10, dtype=cp.float32) * (r + 1)
    comm.broadcast(b, root=0)
    check("broadcast from rank 0", bool(cp.all(b == cp.arange(10, dtype=cp.float32))))
    check("CuPy arrays never staged through the host", comm.host.calls == host_calls,
          f"{comm.host.calls - host_calls} host collectives")
    h = np.full(4, r + 1.0)
    comm.allreduce(h)
    check("NumPy arrays through MPI", bool(np.all(h == n * (n + 1) / 2)))

    # gradient buckets: the U-Net's 1.94 M float32 gradients, in place on the device
    rng = cp.random.default_rng(0)
    shapes = [(3, 3, 16, 16)] * 8 + [(3, 3, 256, 256)] * 3 + [(256,)] * 20
    grads = [rng.standard_normal(s, dtype=cp.float32) * (r + 1) for s in shapes]
    like = [g for g in grads]
    buckets = D.plan_buckets(like)
    flats = [D.flatten([grads[i] for i in b], [like[i] for i in b], cp.float32) for b in buckets]
    for flat in flats:
        comm.allreduce(flat, "mean")
    back = [v for b, f in zip(buckets, flats) for v in D.unflatten(f, [like[i] for i in b])]
    want_scale = (n + 1) / 2 / (r + 1)
    error = max(float(cp.abs(v - g * want_scale).max()) for v, g in zip(back, grads))
    check(f"bucketed mean of {sum(g.size for g in grads):,} gradients in {len(buckets)} "
          "allreduce(s)", error < 1e-5, f"max error {error:.2e}")

    # SyncBatchNorm on CuPy arrays through NCCL against BatchNorm (CUDA kernels) on one rank's
    # data; with n ranks of identical shares the global statistics are the local ones
    x = rng.standard_normal((8, 64, 64, 32), dtype=cp.float32) * 2 + 1
    dy = rng.standard_normal(x.shape, dtype=cp.float32)
    gamma, beta = cp.linspace(0.5, 1.5, 32, dtype=cp.float32), cp.zeros(32, cp.float32)
    outputs = []
    for fn in (BatchNorm(1e-3), D.SyncBatchNorm(1e-3, comm)):
        ts = [Tensor(a, requires_grad=True) for a in (x, gamma, beta)]
        y = fn(*ts)
        y.backward(dy)
        outputs.append([y.data, ts[0].grad, ts[1].grad])     # dgamma: this rank's share
    for label, a, b in zip(("y", "dx", "dgamma"), outputs[0], outputs[1]):
        err = float(cp.abs(a - b).max() / (cp.abs(a).max() + 1e-12))
        check(f"SyncBatchNorm {label} equals BatchNorm on identical shares", err < 1e-4,
              f"relative error {err:.2e}")

    flat = cp.zeros(1_944_083, cp.float32)
    ms = timed(lambda: comm.allreduce(flat))
    print(f"timing: allreduce of 7.78 MB (the U-Net's gradients) {ms:.3f} ms "
          f"({flat.nbytes / ms / 1e6:.1f} GB/s algorithm bandwidth, {n} rank(s))")

    def sync_bn():
        D.SyncBatchNorm(1e-3, comm)(Tensor(x, requires_grad=True), gamma, beta).backward(dy)

    def plain_bn():
        BatchNorm(1e-3)(Tensor(x, requires_grad=True), gamma, beta).backward(dy)
    print(f"timing: batch norm forward+backward 8x64x64x32: BatchNorm {timed(plain_bn):.3f} ms, "
          f"SyncBatchNorm {timed(sync_bn):.3f} ms")
    comm.barrier()
    if failures:
        print(f"NCCL CHECK FAILED on rank {r}: {failures}")
        return 1
    print(f"NCCL CHECK PASSED (rank {r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
