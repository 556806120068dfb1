"""One U-Net training step on the GPU: minicnn (CuPy) against PyTorch with cuDNN, same GPU.

A step is ``loss = loss_fn(y, model(x, training=True)); model.zero_grad(); loss.backward();
opt.step(model.trainable_weights)`` for minicnn's ``UNet(num_classes, base_filters, depth)``
(3x3 'same' convolutions with bias, BatchNormalization, ReLU, MaxPooling2D(2),
Conv2DTranspose(k=2, s=2), Concatenate, 1x1 head), SparseCategoricalCrossentropy(from_logits=True)
and Adam. The PyTorch twin: Conv2d(3x3, padding=1), BatchNorm2d(eps=1e-3, momentum=0.01) (Keras'
momentum 0.99), ReLU, MaxPool2d(2), ConvTranspose2d(k=2, s=2), cat, 1x1 head, CrossEntropyLoss,
Adam(eps=1e-7), cuDNN on (benchmark mode), NCHW and channels_last.

    python benchmarks/bench_gpu.py                         # cases large and small, table
    python benchmarks/bench_gpu.py --cases small --steps 5 --json out.json
    python benchmarks/bench_gpu.py --kernels               # CUDA kernels vs their array-code twins

Times are medians of ``--steps`` steps after ``--warmup`` steps, each step bracketed by a
device synchronisation (CuPy's current stream / torch.cuda.synchronize). Each engine runs in its
own process (its memory pool and its peak memory are its own). minicnn's CPU path runs on the
small case for comparison. Without a GPU the script says why and exits 0; it exits 1 when
minicnn's GPU step (or, with --kernels, a CUDA kernel) failed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "large": dict(base=32, depth=4, batch=16, size=256, channels=3, classes=3),
    "small": dict(base=16, depth=4, batch=4, size=128, channels=3, classes=3),
}
ENGINES = ("minicnn-gpu", "torch-cudnn", "torch-cudnn-cl", "minicnn-cpu")
CPU_CASES = ("small",)          # minicnn's CPU path is timed on these only


def case_data(case):
    """The same input batch and labels for every engine: x (N, H, W, C) float32, y (N, H, W)."""
    import numpy as np
    rs = np.random.default_rng(0)
    x = rs.random((case["batch"], case["size"], case["size"], case["channels"]), dtype=np.float32)
    y = rs.integers(0, case["classes"], size=x.shape[:3])
    return x, y


def timed_steps(step, sync, warmup, steps):
    """Median, min and all step times (seconds), each step between two synchronisations."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


# -- minicnn --------------------------------------------------------------------------------------
def minicnn_worker(case, device, warmup, steps):
    sys.path.insert(0, str(ROOT))
    import minicnn as mc
    from kernels import backend
    from minicnn import losses, optimizers
    from minicnn.models import UNet

    mc.seed(0)
    x, y = case_data(case)
    model = UNet(num_classes=case["classes"], base_filters=case["base"], depth=case["depth"])
    model.build((None,) + x.shape[1:])
    model.to(device)
    x, y = backend.to_device(x, device), backend.to_device(y, device)
    loss_fn = losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = optimizers.Adam(learning_rate=1e-3)
    if device == "gpu":
        cp = backend.cupy_module()

        def sync():
            cp.cuda.get_current_stream().synchronize()
    else:
        def sync():
            pass
    last = {}

    def step():
        loss = loss_fn(y, model(x, training=True))
        model.zero_grad()
        loss.backward()
        opt.step(model.trainable_weights)
        last["loss"] = loss

    compile_start = time.perf_counter()
    step()                                   # first step: CuPy compiles its kernels here
    sync()
    first_step = time.perf_counter() - compile_start
    times = timed_steps(step, sync, max(warmup - 1, 0), steps)
    result = {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
              "first_step_s": first_step, "steps": steps,
              "loss": float(last["loss"].numpy()),
              "trainable": int(sum(w.size for w in model.trainable_weights))}
    if device == "gpu":
        pool = cp.get_default_memory_pool()
        result["gpu_pool_mb"] = pool.total_bytes() / 2**20
        result["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return result


# -- PyTorch twin ---------------------------------------------------------------------------------
def torch_worker(case, channels_last, warmup, steps):
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False        # minicnn computes in float32
    torch.backends.cudnn.allow_tf32 = False
    x_np, y_np = case_data(case)
    device = torch.device("cuda")
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(y_np).to(device)
    from bench_unet import torch_unet     # the same twin as the CPU benchmark
    model = torch_unet(case["channels"], case["classes"], case["base"], case["depth"]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = torch.nn.CrossEntropyLoss()
    last = {}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        last["loss"] = loss

    torch.cuda.reset_peak_memory_stats()
    times = timed_steps(step, torch.cuda.synchronize, max(warmup, 1), steps)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "steps": steps, "loss": float(last["loss"].item()),
            "trainable": int(sum(p.numel() for p in model.parameters())),
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "gpu": torch.cuda.get_device_name(0), "version": torch.__version__,
            "cudnn": torch.backends.cudnn.version()}


# -- the CUDA kernels against the NumPy kernels run on CuPy arrays ----------------------------
def kernel_cases():
    """(name, CUDA wrapper call, array-code twin call) on U-Net-sized float32 CuPy arrays."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from kernels import backend, conv2d, cuda, losses, normalization, pooling
    cp = backend.cupy_module()
    rs = np.random.default_rng(0)

    def gpu(shape):
        return cp.asarray(rs.standard_normal(shape, dtype=np.float32))

    x3, x32, x32h = gpu((16, 256, 256, 3)), gpu((16, 256, 256, 32)), gpu((16, 128, 128, 32))
    g3 = conv2d.conv_geometry("bench", (256, 256), (3, 3), padding="same")
    cols = conv2d.im2col(x3, g3)
    y_pool, argmax = cuda.max_pool2d_forward_gpu(x32)
    dy_pool = gpu(y_pool.shape)
    _, _, _, x_centered, inv_std = cuda.batch_norm_forward_training_gpu(x32)
    logits = gpu((16, 256, 256, 3))
    labels = cp.asarray(rs.integers(0, 3, (16, 256, 256)))
    ones = cp.ones(labels.shape, dtype=np.float32)
    dy_up = gpu((16, 256, 256, 32))

    def twin_cross_entropy():
        _, saved = losses.sparse_categorical_crossentropy_forward(labels, logits, True)
        return losses.sparse_categorical_crossentropy_backward(ones, saved)

    return [
        ("im2col 16x256x256x3, 3x3 same", lambda: cuda.im2col_gpu(x3, g3),
         lambda: conv2d.im2col(x3, g3)),
        ("col2im 16x256x256x3, 3x3 same", lambda: cuda.col2im_gpu(cols, x3.shape, g3),
         lambda: conv2d.col2im(cols, x3.shape, g3)),
        ("max pool 2x2 fwd 16x256x256x32", lambda: cuda.max_pool2d_forward_gpu(x32),
         lambda: pooling.max_pool2d_forward(x32)),
        ("max pool 2x2 bwd", lambda: cuda.max_pool2d_backward_gpu(dy_pool, argmax, x32.shape),
         lambda: pooling.max_pool2d_backward(dy_pool, argmax, x32.shape)),
        ("batch norm fwd 16x256x256x32", lambda: cuda.batch_norm_forward_training_gpu(x32),
         lambda: normalization.batch_norm_forward_training(x32)),
        ("batch norm bwd", lambda: cuda.batch_norm_backward_gpu(x32, x_centered, inv_std),
         lambda: normalization.batch_norm_backward(x32, x_centered, inv_std)),
        ("softmax CE fwd+bwd 16x256x256x3", lambda: cuda.softmax_cross_entropy_gpu(logits, labels),
         twin_cross_entropy),
        ("bilinear x2 fwd 16x128x128x32", lambda: cuda.upsample_bilinear_gpu(x32h, 2),
         lambda: pooling.upsample2d_forward(x32h, 2, "bilinear")),
        ("bilinear x2 bwd", lambda: cuda.upsample_bilinear_backward_gpu(dy_up, 2),
         lambda: pooling.upsample2d_backward(dy_up, 2, "bilinear")),
    ]


def kernel_bench(repeat):
    """Median ms of each CUDA wrapper and of its twin (the NumPy kernel on CuPy arrays)."""
    from kernels import backend
    cp = backend.cupy_module()
    sync = cp.cuda.get_current_stream().synchronize
    rows = {}
    for name, mine, twin in kernel_cases():
        row = {}
        for label, fn in (("cuda_ms", mine), ("twin_ms", twin)):
            try:
                if label == "twin_ms":            # the NumPy code on CuPy arrays, no CUDA kernels
                    with backend.array_code_only():
                        times = timed_steps(fn, sync, 2, repeat)
                else:
                    times = timed_steps(fn, sync, 2, repeat)
                row[label] = 1e3 * statistics.median(times)
            except Exception as error:                     # report it, time the others
                row[label] = None
                row[label.replace("_ms", "_error")] = f"{type(error).__name__}: {error}"[:120]
        rows[name] = row
    print(f"\n{'CUDA kernel (float32)':<34}{'CUDA ms':>10}{'twin ms':>10}{'speed-up':>10}")
    for name, row in rows.items():
        mine, twin = row["cuda_ms"], row["twin_ms"]
        cells = [f"{v:>10.3f}" if v is not None else f"{'failed':>10}" for v in (mine, twin)]
        speedup = f"{twin / mine:>10.1f}" if mine and twin else f"{'':>10}"
        print(f"{name:<34}{cells[0]}{cells[1]}{speedup}")
        for key in ("cuda_error", "twin_error"):
            if key in row:
                print(f"    {key}: {row[key]}")
    print("twin: the NumPy kernel of kernels/ run on the same CuPy arrays (array code, no CUDA C)")
    return rows


def any_failed(rows, key):
    """True when some row's ``key`` entry is missing, None (no time) or an error."""
    for row in rows.values():
        value = row.get(key)
        if value is None or (isinstance(value, dict) and "error" in value):
            return True
    return False


# -- orchestration --------------------------------------------------------------------------------
def run_worker(python, engine, case, args):
    command = [python, os.path.abspath(__file__), "--worker", engine, "--case", case,
               "--warmup", str(args.warmup), "--steps", str(args.steps_for(engine))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                    os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def gpu_status():
    """(True, name) when CuPy sees a GPU, else (False, why)."""
    sys.path.insert(0, str(ROOT))
    from kernels import backend
    try:
        cp = backend.cupy_module()
    except RuntimeError as error:
        return False, str(error)
    return True, cp.cuda.runtime.getDeviceProperties(0)["name"].decode()


def describe(case):
    c = CASES[case]
    return (f"UNet(base {c['base']}, depth {c['depth']}), batch {c['batch']} x {c['size']} x "
            f"{c['size']} x {c['channels']}, {c['classes']} classes")


def print_table(rows):
    print(f"\n{'case':<7}{'engine':<16}{'median ms':>11}{'min ms':>9}{'vs torch':>10}"
          f"{'memory MB':>11}{'loss':>9}  params")
    for case, engines in rows.items():
        reference = engines.get("torch-cudnn", {}).get("median_ms")
        for engine, result in engines.items():
            if "error" in result:
                print(f"{case:<7}{engine:<16}  failed: {result['error'][:90]}")
                continue
            ratio = result["median_ms"] / reference if reference else float("nan")
            memory = result.get("gpu_pool_mb", result.get("gpu_peak_mb", float("nan")))
            print(f"{case:<7}{engine:<16}{result['median_ms']:>11.1f}{result['min_ms']:>9.1f}"
                  f"{ratio:>10.2f}{memory:>11.0f}{result['loss']:>9.4f}  {result['trainable']:,}")
    print("vs torch: median time / PyTorch (cuDNN, NCHW) median time on the same GPU; memory: "
          "CuPy pool size (minicnn) or torch peak allocated")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="large,small", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per GPU engine")
    parser.add_argument("--cpu-steps", type=int, default=3,
                        help="timed steps of minicnn's CPU path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per engine and case")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-cpu", action="store_true", help="skip minicnn's CPU path")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="interpreter that has torch (default: this one)")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--kernels", action="store_true",
                        help="time the CUDA kernels against their array-code twins, then stop")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps_for = lambda engine: args.cpu_steps if engine == "minicnn-cpu" else args.steps

    if args.worker:
        case = CASES[args.case]
        if args.worker.startswith("minicnn"):
            device = "cpu" if args.worker == "minicnn-cpu" else "gpu"
            result = minicnn_worker(case, device, args.warmup, args.steps)
        else:
            result = torch_worker(case, args.worker == "torch-cudnn-cl", args.warmup, args.steps)
        print(json.dumps(result))
        return 0

    ok, what = gpu_status()
    if not ok:
        print(f"bench_gpu: no GPU, nothing to time ({what})")
        return 0
    if args.kernels:
        print(f"GPU: {what}; median of {args.steps} runs after 2 warm-up runs")
        rows = kernel_bench(args.steps)
        if args.json_path:
            Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_path).write_text(json.dumps({"gpu": what, "kernels": rows}, indent=2))
        return 1 if any_failed(rows, "cuda_ms") else 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
    print(f"GPU: {what}; {args.warmup} warm-up steps, median of {args.steps} (CPU: "
          f"{args.cpu_steps}); CPU cores: {os.cpu_count()}")
    rows = {}
    for case in cases:
        print(f"{case}: {describe(case)}", flush=True)
        engines = ["minicnn-gpu"]
        if not args.no_torch:
            engines += ["torch-cudnn", "torch-cudnn-cl"]
        if not args.no_cpu and case in CPU_CASES:
            engines.append("minicnn-cpu")
        rows[case] = {}
        for engine in engines:
            python = args.torch_python if engine.startswith("torch") else sys.executable
            started = time.perf_counter()
            rows[case][engine] = result = run_worker(python, engine, case, args)
            status = result.get("error") or f"median {result['median_ms']:.1f} ms"
            print(f"  {engine:<15} {status}  ({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(rows)
    if args.json_path:
        payload = {"gpu": what, "cases": {c: CASES[c] for c in cases}, "results": rows,
                   "warmup": args.warmup, "steps": args.steps, "cpu_steps": args.cpu_steps}
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(payload, indent=2))
    return 1 if any_failed(rows, "minicnn-gpu") else 0      # exit 1: minicnn failed on the GPU


if __name__ == "__main__":
    sys.exit(main())
