"""Data-parallel scaling on this machine: 2 ranks x 1 thread against 1 rank x 1 thread, the same
global batch, one U-Net training step (forward, loss, backward, gradient allreduce, Adam).

    python benchmarks/bench_distributed.py                  # 5 rounds, sync BN on and off
    python benchmarks/bench_distributed.py --rounds 3 --steps 4 --sync-bn on --json out.json

U-Net(num_classes=3, base 16, depth 4), global batch 8 x 128 x 128 x 3 (each of 2 ranks 4),
float32. Every worker has MINICNN_NUM_THREADS=1 and OPENBLAS_NUM_THREADS=1 and retains freed
memory (as ``minicnn train`` does). The 1-rank worker is a plain process; the 2-rank one runs
under ``mpiexec -n 2`` (the [mpi] extra; each rank bound to a core, Open MPI's default, or
``--bind-to none``). Rounds alternate which goes first.

Per configuration it reports the median step time (a step ends when the slower rank is done:
the gradient allreduce waits for it), throughput = 8 / step time, the 2-rank / 1-rank
throughput ratio, and per step on the ranks: the time inside collectives (the gradient
allreduce and the batch-norm statistics), which includes waiting for the other rank, and the
time of the gradient allreduce alone measured after a barrier (the transfer itself).
This machine is shared with other sessions: rounds differ; medians and ranges are printed,
with the 1-minute load average before each round. ``--yield-when-idle`` sets Open MPI's
``mpi_yield_when_idle`` (a waiting rank yields its core instead of spinning on it), which helps
when other processes compete for the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASE = dict(base=16, depth=4, batch=8, size=128, channels=3, classes=3)


def worker(steps: int, sync_bn: bool) -> dict:
    """One rank's measurements (run under mpiexec for 2 ranks, plainly for 1)."""
    import numpy as np
    sys.path.insert(0, os.path.join(HERE, ".."))
    from kernels.fast import runtime
    runtime.retain_freed_memory()
    import minicnn as mc
    from minicnn import distributed as D
    from minicnn.models import UNet
    from minicnn.training import batchnorm_layers
    comm = D.init("mpi") if D.launched_size() > 1 else D.init()
    mc.seed(0)
    data = np.random.default_rng(0)
    x = data.random((CASE["batch"], CASE["size"], CASE["size"], CASE["channels"]),
                    dtype=np.float32)
    y = data.integers(0, CASE["classes"], size=x.shape[:3])
    lo, hi = D.shard_bounds(len(x), comm.rank, comm.size)
    x, y = x[lo:hi], y[lo:hi]
    model = UNet(num_classes=CASE["classes"], base_filters=CASE["base"], depth=CASE["depth"])
    for layer in batchnorm_layers(model):
        layer.synchronized = sync_bn
    model.build((None,) + x.shape[1:])
    D.broadcast_weights(model, comm)
    loss_fn = mc.losses.SparseCategoricalCrossentropy(from_logits=True)
    inner = mc.optimizers.Adam(1e-3)
    weights, bn_layers = model.trainable_weights, batchnorm_layers(model)

    def step():
        comm.barrier()
        calls0, comm0 = comm.calls, comm.seconds
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss = loss_fn(y, model(x, training=True))
        model.zero_grad()
        loss.backward()
        t1 = time.perf_counter()
        grads0 = comm.seconds
        D.average_gradients(weights, comm)
        t2 = time.perf_counter()
        gradient_comm = comm.seconds - grads0
        inner.step(weights)
        D.average_moving_statistics(bn_layers, comm)
        t3 = time.perf_counter()
        return {"step": t3 - t0, "compute": (t1 - t0) + (t3 - t2),
                "cpu": time.process_time() - cpu0,
                "collectives": comm.seconds - comm0, "gradient_allreduce": gradient_comm,
                "pack_unpack": (t2 - t1) - gradient_comm, "calls": comm.calls - calls0}

    for _ in range(2):
        step()
    records = [step() for _ in range(steps)]
    flat = np.zeros(sum(w.size for w in weights), np.float32)    # the transfer alone
    alone = []
    for _ in range(10 if comm.size > 1 else 0):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce(flat)
        alone.append(time.perf_counter() - t0)
    result = {key: float(np.median([r[key] for r in records])) for key in records[0]}
    result.update(rank=comm.rank, size=comm.size, sync_bn=sync_bn,
                  allreduce_alone=float(np.median(alone)) if alone else 0.0,
                  gradient_bytes=int(flat.nbytes), weights=int(flat.size),
                  threads=mc.config.threads)
    return result


def run(ranks: int, steps: int, sync_bn: bool, yield_when_idle: bool, bind: str) -> list:
    """The workers' results (one dict per rank)."""
    env = dict(os.environ, MINICNN_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if yield_when_idle:
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(steps),
               "--sync-bn", "on" if sync_bn else "off"]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep +
                               os.environ.get("PATH", ""))
        if mpiexec is None:
            raise SystemExit('bench_distributed: no mpiexec; pip install -e ".[mpi]"')
        command = [mpiexec, "-n", str(ranks), "--oversubscribe", "--bind-to", bind] + command
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return [json.loads(line[len("RESULT "):]) for line in output.splitlines()
            if line.startswith("RESULT ")]


def summary(values) -> str:
    values = sorted(values)
    median = values[len(values) // 2] if len(values) % 2 else \
        (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    return f"{median:8.3f} [{values[0]:.3f}-{values[-1]:.3f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sync-bn", default="both", choices=["both", "on", "off"])
    parser.add_argument("--yield-when-idle", action="store_true",
                        help="OMPI_MCA_mpi_yield_when_idle=1 for the 2-rank runs")
    parser.add_argument("--bind-to", default="core", choices=["core", "none"],
                        help="mpiexec's binding of the 2 ranks (core: Open MPI's default)")
    parser.add_argument("--json", default=None, help="write every round's results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.steps, args.sync_bn == "on")), flush=True)
        return 0
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.sync_bn]
    print(f"U-Net base {CASE['base']} depth {CASE['depth']}, global batch {CASE['batch']}x"
          f"{CASE['size']}x{CASE['size']}x{CASE['channels']}, float32, 1 thread per rank, "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds x {args.steps} timed steps (medians)"
          f"{'; mpi_yield_when_idle' if args.yield_when_idle else ''}")
    rounds = []
    for r in range(args.rounds):
        for sync in settings:
            order = [1, 2] if r % 2 == 0 else [2, 1]
            load = os.getloadavg()[0]
            got = {ranks: run(ranks, args.steps, sync, args.yield_when_idle, args.bind_to)
                   for ranks in order}
            one, two = got[1][0], max(got[2], key=lambda g: g["step"])
            entry = {"round": r, "sync_bn": sync, "one": one, "two": got[2], "load": load,
                     "ratio": one["step"] / two["step"]}
            rounds.append(entry)
            print(f"round {r} load {load:.1f} sync_bn={'on ' if sync else 'off'}: 1 rank "
                  f"{one['step']:.3f} s, "
                  f"2 ranks {two['step']:.3f} s -> {entry['ratio']:.2f}x; collectives "
                  f"{1000 * two['collectives']:.1f} ms (gradients {1000 * two['gradient_allreduce']:.1f}"
                  f", alone {1000 * two['allreduce_alone']:.1f}), {two['calls']} calls", flush=True)
    print("\nmedian [range] over rounds")
    for sync in settings:
        chosen = [e for e in rounds if e["sync_bn"] == sync]
        two = [max(e["two"], key=lambda g: g["step"]) for e in chosen]
        first = two[0]
        print(f"sync_bn={'on' if sync else 'off'}:")
        print(f"  1 rank step (s)            {summary([e['one']['step'] for e in chosen])}")
        print(f"  2 ranks step (s)           {summary([t['step'] for t in two])}")
        print(f"  throughput ratio (2 / 1)   {summary([e['ratio'] for e in chosen])}")
        print(f"  compute on a rank (s)      {summary([t['compute'] for t in two])}")
        print(f"  CPU s per step, 1 rank     {summary([e['one']['cpu'] for e in chosen])}")
        print(f"  CPU s per step, each rank  {summary([t['cpu'] for t in two])}")
        print(f"  1-rank CPU / 2-rank CPU    "
              f"{summary([e['one']['cpu'] / t['cpu'] for e, t in zip(chosen, two)])}"
              "  (the ratio with a free core per rank; waiting ranks spin, so it is a floor)")
        print(f"  collectives per step (ms)  {summary([1000 * t['collectives'] for t in two])}")
        print(f"   of which gradients (ms)   {summary([1000 * t['gradient_allreduce'] for t in two])}")
        print(f"  gradient allreduce alone   {summary([1000 * t['allreduce_alone'] for t in two])} ms"
              f" ({first['gradient_bytes'] / 1e6:.2f} MB, {first['weights']:,} weights)")
        print(f"  pack + unpack (ms)         {summary([1000 * t['pack_unpack'] for t in two])}")
        print(f"  collectives per step       {first['calls']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rounds, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
