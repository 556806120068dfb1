"""One U-Net training step on the GPU: minicnn (CuPy) against PyTorch with cuDNN, same GPU,
at each precision; a per-operation profile of minicnn's step; the CUDA kernels against their
array-code twins.

A step is ``loss = loss_fn(y, model(x, training=True)); model.zero_grad(); loss.backward();
opt.step(model.trainable_weights)`` for minicnn's ``UNet(num_classes, base_filters, depth)``
(3x3 'same' convolutions with bias, BatchNormalization, ReLU, MaxPooling2D(2),
Conv2DTranspose(k=2, s=2), Concatenate, 1x1 head), SparseCategoricalCrossentropy(from_logits=True)
and Adam. The PyTorch twin: Conv2d(3x3, padding=1), BatchNorm2d(eps=1e-3, momentum=0.01) (Keras'
momentum 0.99), ReLU, MaxPool2d(2), ConvTranspose2d(k=2, s=2), cat, 1x1 head, CrossEntropyLoss,
Adam(eps=1e-7), cuDNN on (benchmark mode), NCHW and channels_last.

Precisions (``--precisions``), the same setting on both engines:
    float32  strict float32: minicnn's default; torch allow_tf32 off for cuBLAS and cuDNN
    tf32     float32 with TF32 tensor-core products: minicnn ``set_tf32(True)``; torch
             ``backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = True``
    bf16     minicnn's ``mixed_bfloat16`` policy; torch ``autocast(dtype=bfloat16)`` around the
             forward and the loss (float32 weights, no scaler); TF32 off on both
    fp16     minicnn's ``mixed_float16`` with its LossScaleOptimizer; torch autocast(float16)
             with a GradScaler

    python benchmarks/bench_gpu.py                              # large and small, float32
    python benchmarks/bench_gpu.py --cases large --precisions float32,tf32,bf16 --json out.json
    python benchmarks/bench_gpu.py --profile --cases large      # where minicnn's step goes
    python benchmarks/bench_gpu.py --kernels                    # CUDA kernels vs array code
    python benchmarks/bench_gpu.py --cases tiny --allow-cpu     # no GPU: the CPU path only
                                                                # (checks this script's logic)
    python benchmarks/bench_gpu.py --summary $OUT               # gpu_check.sh's target table

Times are medians of ``--steps`` steps after ``--warmup`` steps, each step bracketed by a
device synchronisation (CuPy's current stream / torch.cuda.synchronize). Each engine, case and
precision runs in its own process (its memory pool and peak memory are its own). minicnn's CPU
path runs on the small cases for comparison (``CPU_CASES``).

``--profile`` times every differentiable function's forward and backward (by class: Conv2D,
BatchNorm, MaxPool2D, ..., and the optimizer's step) with CUDA events recorded around each call
on the current stream, summed per step, and prints them with their share of the step; the rest
of the step is time between those calls (Python, launches, host syncs). ``--nvtx`` also pushes
an NVTX range per call, for ``nsys profile``. Without a GPU the script says why and exits 0
(or, with ``--allow-cpu``, times the CPU path with the same code); it exits 1 when minicnn's
GPU step (or, with --kernels, a CUDA kernel) failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CASES = {
    "large": dict(base=32, depth=4, batch=16, size=256, channels=3, classes=3),
    "small": dict(base=16, depth=4, batch=4, size=128, channels=3, classes=3),
    "tiny": dict(base=8, depth=2, batch=2, size=64, channels=3, classes=3),
}
PRECISIONS = ("float32", "tf32", "bf16", "fp16")
ENGINES = ("minicnn-gpu", "torch-cudnn", "torch-cudnn-cl", "minicnn-cpu")
CPU_CASES = ("small", "tiny")      # minicnn's CPU path is timed on these only


def case_data(case):
    """The same input batch and labels for every engine: x (N, H, W, C) float32, y (N, H, W)."""
    import numpy as np
    rs = np.random.default_rng(0)
    x = rs.random((case["batch"], case["size"], case["size"], case["channels"]), dtype=np.float32)
    y = rs.integers(0, case["classes"], size=x.shape[:3])
    return x, y


def timed_steps(step, sync, warmup, steps):
    """All step times (seconds) after ``warmup`` steps, each step between two synchronisations."""
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
def minicnn_step(case, device, precision):
    """(step, sync, model, last) for minicnn at ``precision`` on ``device``: ``step()`` runs one
    training step and keeps its loss in ``last['loss']``."""
    import minicnn as mc
    from kernels import backend
    from minicnn import losses, mixed_precision, optimizers
    from minicnn.models import UNet

    mixed_precision.set_precision(precision)      # RuntimeError: bf16 without ml_dtypes
    mc.seed(0)
    x, y = case_data(case)
    model = UNet(num_classes=case["classes"], base_filters=case["base"], depth=case["depth"])
    model.build((None,) + x.shape[1:])
    model.to(device)
    x, y = backend.to_device(x, device), backend.to_device(y, device)
    loss_fn = losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = optimizers.Adam(learning_rate=1e-3)
    if precision == "fp16":
        opt = mixed_precision.LossScaleOptimizer(opt)
    sync = backend.cupy_module().cuda.get_current_stream().synchronize if device == "gpu" \
        else (lambda: None)
    last = {}

    def step():
        loss = loss_fn(y, model(x, training=True))
        model.zero_grad()
        scale_loss = getattr(opt, "scale_loss", None)
        (loss if scale_loss is None else scale_loss(loss)).backward()
        opt.step(model.trainable_weights)
        last["loss"] = loss
    return step, sync, model, last, opt


def minicnn_worker(case, device, warmup, steps, precision):
    from kernels import backend
    step, sync, model, last, _ = minicnn_step(case, device, precision)
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
        cp = backend.cupy_module()
        result["gpu_pool_mb"] = cp.get_default_memory_pool().total_bytes() / 2**20
        result["gpu"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return result


# -- the per-operation profile ---------------------------------------------------------------------
class OpTimer:
    """Time of each Function's forward and backward, by name, summed per step.

    GPU: a CUDA event recorded on the current stream before and after each outermost call
    (nested calls are inside their caller's time), read after the step's synchronisation; CPU:
    perf_counter. With ``nvtx`` each call is also an NVTX range."""

    def __init__(self, device, nvtx=False):
        self.device, self.depth, self.pending = device, 0, []
        self.totals, self.calls = {}, {}
        self.cp = None
        if device == "gpu":
            from kernels import backend
            self.cp = backend.cupy_module()
        self.nvtx = getattr(getattr(self.cp, "cuda", None), "nvtx", None) if nvtx else None

    def mark(self):
        if self.cp is None:
            return time.perf_counter()
        event = self.cp.cuda.Event()
        event.record()
        return event

    def call(self, name, phase, fn, *args, **kwargs):
        """fn(*args, **kwargs), timed as (name, phase) unless inside another timed call."""
        if self.depth:
            return fn(*args, **kwargs)
        self.depth += 1
        if self.nvtx is not None:
            self.nvtx.RangePush(f"{name}.{phase}")
        start = self.mark()
        try:
            return fn(*args, **kwargs)
        finally:
            self.pending.append((name, phase, start, self.mark()))
            if self.nvtx is not None:
                self.nvtx.RangePop()
            self.depth -= 1

    def wrap(self, method, phase):
        """A Function method timed under the function's name (``name``: LossOp's is its loss)."""
        def timed(fn_self, *args, **kwargs):
            return self.call(getattr(fn_self, "name", type(fn_self).__name__), phase, method,
                             fn_self, *args, **kwargs)
        return timed

    def collect(self):
        """Add the calls of the step just synchronised to the totals (milliseconds)."""
        for name, phase, start, end in self.pending:
            ms = (self.cp.cuda.get_elapsed_time(start, end) if self.cp is not None
                  else 1e3 * (end - start))
            key = (name, phase)
            self.totals[key] = self.totals.get(key, 0.0) + ms
            self.calls[key] = self.calls.get(key, 0) + 1
        self.pending = []


@contextlib.contextmanager
def timing_every_function(timer, optimizer):
    """Wrap forward/backward of every minicnn.Function subclass, and ``optimizer.step``."""
    from minicnn.tensor import Function
    classes, stack = [], [Function]
    while stack:
        cls = stack.pop()
        classes.append(cls)
        stack.extend(cls.__subclasses__())
    saved = []
    for cls in classes:
        for phase, attr in (("forward", "forward"), ("backward", "backward")):
            if attr in vars(cls):
                saved.append((cls, attr, vars(cls)[attr]))
                setattr(cls, attr, timer.wrap(vars(cls)[attr], phase))
    step, name = optimizer.step, f"{type(optimizer).__name__}.step"
    optimizer.step = lambda weights: timer.call(name, "update", step, weights)
    try:
        yield
    finally:
        for cls, attr, method in saved:
            setattr(cls, attr, method)
        del optimizer.step


def profile_worker(case, device, warmup, steps, precision, nvtx=False):
    """Per-op times (ms per step) of ``steps`` profiled steps after ``warmup`` plain ones."""
    step, sync, model, last, opt = minicnn_step(case, device, precision)
    for _ in range(max(warmup, 1)):
        step()
    sync()
    plain = timed_steps(step, sync, 0, steps)
    timer = OpTimer(device, nvtx)
    walls = []
    with timing_every_function(timer, opt):
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            step()
            sync()
            walls.append(time.perf_counter() - start)
            timer.collect()
    rows = [{"op": name, "phase": phase, "calls": timer.calls[(name, phase)] // steps,
             "ms": total / steps} for (name, phase), total in timer.totals.items()]
    rows.sort(key=lambda r: -r["ms"])
    return {"step_ms": 1e3 * statistics.median(plain),
            "profiled_step_ms": 1e3 * statistics.median(walls), "rows": rows, "steps": steps,
            "precision": precision, "device": device}


def print_profile(case, result):
    step = result["profiled_step_ms"]
    print(f"\nprofile: {case} ({describe(case)}), {result['precision']}, {result['device']}; "
          f"step {result['step_ms']:.1f} ms ({step:.1f} ms with the timing events), mean of "
          f"{result['steps']} steps")
    print(f"{'op':<34}{'phase':<10}{'calls':>6}{'ms/step':>10}{'share':>8}")
    timed = 0.0
    for row in result["rows"]:
        timed += row["ms"]
        print(f"{row['op']:<34}{row['phase']:<10}{row['calls']:>6}{row['ms']:>10.2f}"
              f"{100 * row['ms'] / step:>7.1f}%")
    print(f"{'between the timed calls':<50}{step - timed:>10.2f}{100 * (step - timed) / step:>7.1f}%")
    print("ms/step: device time between CUDA events around each outermost call (GPU), or wall "
          "time (CPU); 'between': Python, launches and host syncs outside them")


# -- PyTorch twin ---------------------------------------------------------------------------------
def torch_worker(case, channels_last, warmup, steps, precision):
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32     # as minicnn's switch
    torch.backends.cudnn.allow_tf32 = tf32
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
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
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    last = {}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=low, enabled=low is not None):
            loss = loss_fn(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
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
    import numpy as np
    from kernels import backend, conv2d, cuda, losses, normalization, pooling, upsampling
    from kernels.shapes import conv_geometry
    cp = backend.cupy_module()
    rs = np.random.default_rng(0)

    def gpu(shape):
        return cp.asarray(rs.standard_normal(shape, dtype=np.float32))

    x3, x32, x32h = gpu((16, 256, 256, 3)), gpu((16, 256, 256, 32)), gpu((16, 128, 128, 32))
    g3 = conv_geometry("bench", (256, 256), (3, 3), padding="same")
    cols = conv2d.im2col(x3, g3)
    y_pool, argmax = cuda.max_pool2d_forward_gpu(x32)
    dy_pool = gpu(y_pool.shape)
    _, _, _, x_centered, inv_std = cuda.batch_norm_forward_training_gpu(x32)
    logits = gpu((16, 256, 256, 3))
    labels = cp.asarray(rs.integers(0, 3, (16, 256, 256)))
    ones = cp.ones(labels.shape, dtype=np.float32)
    dy_up = gpu((16, 256, 256, 32))

    def twin_cross_entropy():
        _, saved = losses.sparse_categorical_crossentropy_forward(labels, logits, from_logits=True)
        return losses.sparse_categorical_crossentropy_backward(ones, saved)

    adam_name, adam_step = adam_case(cp)
    return [
        ("im2col 16x256x256x3, 3x3 same", lambda: cuda.im2col_gpu(x3, g3),
         lambda: conv2d.im2col(x3, g3)),
        ("col2im 16x256x256x3, 3x3 same", lambda: cuda.col2im_gpu(cols, x3.shape, g3),
         lambda: conv2d.col2im(cols, x3.shape, g3)),
        ("max pool 2x2 fwd 16x256x256x32", lambda: cuda.max_pool2d_forward_gpu(x32),
         lambda: pooling.max_pool2d_forward(x32)),
        ("max pool 2x2 bwd", lambda: cuda.max_pool2d_backward_gpu(dy_pool, argmax,
                                                                  input_size=x32.shape[1:3]),
         lambda: pooling.max_pool2d_backward(dy_pool, argmax, input_size=x32.shape[1:3])),
        ("batch norm fwd 16x256x256x32", lambda: cuda.batch_norm_forward_training_gpu(x32),
         lambda: normalization.batch_norm_forward_training(x32)),
        ("batch norm bwd", lambda: cuda.batch_norm_backward_gpu(x32, x_centered, inv_std),
         lambda: normalization.batch_norm_backward(x32, x_centered, inv_std)),
        ("softmax CE fwd+bwd 16x256x256x3", lambda: cuda.softmax_cross_entropy_gpu(logits, labels),
         twin_cross_entropy),
        ("bilinear x2 fwd 16x128x128x32", lambda: cuda.upsample_bilinear_gpu(x32h, size=2),
         lambda: upsampling.upsample2d_forward(x32h, size=2, interpolation="bilinear")),
        ("bilinear x2 bwd", lambda: cuda.upsample_bilinear_backward_gpu(dy_up, size=2),
         lambda: upsampling.upsample2d_backward(dy_up, size=2, interpolation="bilinear")),
        (adam_name, adam_step, adam_step),
    ]


def adam_case(cp):
    """(name, one Adam update of a base-32 depth-4 U-Net's weights): with the CUDA kernels on
    it is the fused launch, with ``mc.config.cuda_kernels`` off the per-weight array code."""
    from minicnn import optimizers
    from minicnn.models import UNet
    model = UNet(num_classes=3, base_filters=32, depth=4)
    model.build((None, 64, 64, 3))
    model.to("gpu")
    weights = model.trainable_weights
    for w in weights:
        w.grad = cp.full(w.shape, 1e-3, dtype=w.dtype)
    opt = optimizers.Adam(1e-3)
    opt.build(weights)
    grads = [w.grad for w in weights]
    size = sum(w.size for w in weights)
    return (f"Adam, {len(weights)} U-Net weights ({size / 1e6:.1f}M)",
            lambda: opt.apply_updates(weights, grads, 1e-3))


def kernel_bench(repeat):
    """Median ms of each CUDA wrapper and of its twin (the NumPy kernel on CuPy arrays)."""
    from kernels import backend
    from kernels.config import settings
    cp = backend.cupy_module()
    sync = cp.cuda.get_current_stream().synchronize
    rows = {}
    for name, mine, twin in kernel_cases():
        row = {}
        for label, fn in (("cuda_ms", mine), ("twin_ms", twin)):
            try:
                if label == "twin_ms":            # the plain array code on CuPy, no CUDA kernels
                    with settings.override(cuda_kernels=False):
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
def run_worker(python, engine, case, precision, args, profile=False):
    command = [python, os.path.abspath(__file__), "--worker", engine, "--case", case,
               "--precision", precision, "--warmup", str(args.warmup),
               "--steps", str(args.steps_for(engine))]
    if profile:
        command.append("--profile-worker")
        if args.nvtx:
            command.append("--nvtx")
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


def skipped_reason(result):
    """The 'skipped: ...' text of a worker that could not run this precision, else None."""
    error = result.get("error", "")
    if "ml_dtypes" in error:
        return "skipped: bfloat16 needs ml_dtypes, not installed here"
    return None


def print_table(rows):
    print(f"\n{'case':<7}{'precision':<10}{'engine':<16}{'median ms':>11}{'min ms':>9}"
          f"{'vs torch':>10}{'memory MB':>11}{'loss':>9}  params")
    for (case, precision), engines in rows.items():
        reference = engines.get("torch-cudnn", {}).get("median_ms")
        for engine, result in engines.items():
            head = f"{case:<7}{precision:<10}{engine:<16}"
            if "error" in result:
                print(f"{head}  {skipped_reason(result) or 'failed: ' + result['error'][:90]}")
                continue
            ratio = result["median_ms"] / reference if reference else float("nan")
            memory = result.get("gpu_pool_mb", result.get("gpu_peak_mb", float("nan")))
            print(f"{head}{result['median_ms']:>11.1f}{result['min_ms']:>9.1f}"
                  f"{ratio:>10.2f}{memory:>11.0f}{result['loss']:>9.4f}  {result['trainable']:,}")
    print("vs torch: median time / PyTorch (cuDNN, NCHW) median time at the same precision on the "
          "same GPU; memory: CuPy pool size (minicnn) or torch peak allocated")


# -- gpu_check.sh's figures and final table -------------------------------------------------------
def load_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def key_figure(kind, path) -> str:
    """One line for gpu_check.sh's step table from a JSON this script wrote ('' if none)."""
    data = load_json(path)
    if not data:
        return ""
    if kind == "kernels":
        rows = data["kernels"].values()
        ups = [r["twin_ms"] / r["cuda_ms"] for r in rows if r.get("cuda_ms") and r.get("twin_ms")]
        failed = sum(r.get("cuda_ms") is None for r in rows)
        text = f"speed-up over array code {min(ups):.1f}x..{max(ups):.1f}x" if ups else \
            "no timings"
        return text + (f" ({failed} failed)" if failed else "")
    if kind == "precisions":
        parts = []
        for key, engines in data["results"].items():
            mine, ref = engines.get("minicnn-gpu", {}), engines.get("torch-cudnn", {})
            if "median_ms" in mine and "median_ms" in ref:
                parts.append(f"{key.split('/')[1]} {mine['median_ms'] / ref['median_ms']:.2f}x")
        return "vs torch: " + ", ".join(parts) if parts else ""
    raise ValueError(f"key_figure: unknown kind {kind!r}")


def summary_lines(out) -> list:
    """The issue's targets from gpu_check.sh's outputs in ``out``: each U-Net step against
    PyTorch (<= 1.25x), bf16's test Dice against float32's (within 0.01), and the small cases'
    GPU step against minicnn's CPU step (faster)."""
    lines = [f"{'target (issue 14)':<44}{'minicnn':>10}{'PyTorch':>10}{'ratio':>8}  met"]
    bench = load_json(os.path.join(out, "bench_precisions.json"))
    for key, engines in (bench or {}).get("results", {}).items():
        mine, ref = engines.get("minicnn-gpu", {}), engines.get("torch-cudnn", {})
        name = f"U-Net step {key}, <= 1.25x PyTorch"
        if "median_ms" in mine and "median_ms" in ref:
            ratio = mine["median_ms"] / ref["median_ms"]
            lines.append(f"{name:<44}{mine['median_ms']:>8.1f}ms{ref['median_ms']:>8.1f}ms"
                         f"{ratio:>8.2f}  {'yes' if ratio <= 1.25 else 'NO'}")
        else:
            why = skipped_reason(mine) or mine.get("error") or ref.get("error") or "missing"
            lines.append(f"{name:<44}  {why[:60]}")
    if not bench:
        lines.append("U-Net step: no bench_precisions.json")
    dice = {p: (load_json(os.path.join(out, f"train_{p}", "results.json")) or {}).get("test_dice")
            for p in ("float32", "bf16")}
    if None not in dice.values():
        gap = abs(dice["bf16"] - dice["float32"])
        lines.append(f"{'test Dice bf16 within 0.01 of float32':<44}{dice['bf16']:>10.4f}"
                     f"{dice['float32']:>10.4f}{gap:>8.4f}  {'yes' if gap <= 0.01 else 'NO'}")
    else:
        lines.append(f"test Dice: {', '.join(f'{p} {d}' for p, d in dice.items())}")
    small = load_json(os.path.join(out, "bench_small.json"))
    if small:
        lines.append(f"{'small cases (issue 9)':<44}{'GPU':>10}{'CPU':>10}{'ratio':>8}  met")
        for key, engines in small["results"].items():
            gpu, cpu = engines.get("minicnn-gpu", {}), engines.get("minicnn-cpu", {})
            if "median_ms" in gpu and "median_ms" in cpu:
                ratio = gpu["median_ms"] / cpu["median_ms"]
                lines.append(f"{'GPU step faster than the CPU, ' + key:<44}"
                             f"{gpu['median_ms']:>8.1f}ms{cpu['median_ms']:>8.1f}ms{ratio:>8.2f}"
                             f"  {'yes' if ratio < 1 else 'NO'}")
    return lines


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="large,small", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--precisions", default="float32",
                        help=f"comma list of {list(PRECISIONS)}")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per GPU engine")
    parser.add_argument("--cpu-steps", type=int, default=3,
                        help="timed steps of minicnn's CPU path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per engine and case")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-cpu", action="store_true", help="skip minicnn's CPU path")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="also time PyTorch with channels_last (float32 only)")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="interpreter that has torch (default: this one)")
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--kernels", action="store_true",
                        help="time the CUDA kernels against their array-code twins, then stop")
    parser.add_argument("--profile", action="store_true",
                        help="per-op profile of minicnn's step (each case and precision)")
    parser.add_argument("--nvtx", action="store_true", help="with --profile: NVTX ranges too")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, time (or profile) minicnn's CPU path instead")
    parser.add_argument("--figure", nargs=2, metavar=("KIND", "JSON"),
                        help="print gpu_check.sh's key figure (kernels | precisions), then stop")
    parser.add_argument("--summary", metavar="OUT",
                        help="print the targets table of gpu_check.sh's outputs, then stop")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps_for = lambda engine: args.cpu_steps if engine == "minicnn-cpu" else args.steps

    if args.figure:
        print(key_figure(*args.figure))
        return 0
    if args.summary:
        print("\n".join(summary_lines(args.summary)))
        return 0
    if args.worker:
        case = CASES[args.case]
        device = "cpu" if args.worker == "minicnn-cpu" else "gpu"
        if args.profile_worker:
            result = profile_worker(case, device, args.warmup, args.steps, args.precision,
                                    args.nvtx)
        elif args.worker.startswith("minicnn"):
            result = minicnn_worker(case, device, args.warmup, args.steps, args.precision)
        else:
            result = torch_worker(case, args.worker == "torch-cudnn-cl", args.warmup, args.steps,
                                  args.precision)
        print(json.dumps(result))
        return 0

    cases = [c for c in args.cases.split(",") if c]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [c for c in cases if c not in CASES] + [p for p in precisions
                                                       if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown case(s) or precision(s) {unknown}; cases {sorted(CASES)}, "
                     f"precisions {list(PRECISIONS)}")
    ok, what = gpu_status()
    if not ok and not args.allow_cpu:
        print(f"bench_gpu: no GPU, nothing to time ({what})")
        return 0
    if args.kernels:
        if not ok:
            print(f"bench_gpu: the CUDA kernels need a GPU ({what})")
            return 0
        print(f"GPU: {what}; median of {args.steps} runs after 2 warm-up runs")
        rows = kernel_bench(args.steps)
        if args.json_path:
            write_json(args.json_path, {"gpu": what, "kernels": rows})
        return 1 if any_failed(rows, "cuda_ms") else 0
    gpu_engine = "minicnn-gpu" if ok else "minicnn-cpu"
    print(f"{'GPU: ' + what if ok else 'no GPU (' + what.splitlines()[0] + '): CPU path only'}; "
          f"{args.warmup} warm-up steps, median of {args.steps} (CPU: {args.cpu_steps}); "
          f"CPU cores: {os.cpu_count()}")
    if args.profile:
        profiles = {}
        for case in cases:
            for precision in precisions:
                result = run_worker(sys.executable, gpu_engine, case, precision, args,
                                    profile=True)
                profiles[f"{case}/{precision}"] = result
                if "error" in result:
                    print(f"profile {case} {precision}: "
                          f"{skipped_reason(result) or 'failed: ' + result['error']}")
                else:
                    print_profile(case, result)
        if args.json_path:
            write_json(args.json_path, {"gpu": what if ok else None, "profiles": profiles})
        return 1 if ok and any("error" in r and not skipped_reason(r)
                               for r in profiles.values()) else 0
    rows = {}
    for case in cases:
        print(f"{case}: {describe(case)}", flush=True)
        for precision in precisions:
            engines = [gpu_engine]
            if ok and not args.no_torch:
                engines.append("torch-cudnn")
                if args.channels_last and precision == "float32":
                    engines.append("torch-cudnn-cl")
            if ok and not args.no_cpu and case in CPU_CASES and precision == "float32":
                engines.append("minicnn-cpu")
            rows[(case, precision)] = {}
            for engine in engines:
                python = args.torch_python if engine.startswith("torch") else sys.executable
                started = time.perf_counter()
                rows[(case, precision)][engine] = result = run_worker(python, engine, case,
                                                                      precision, args)
                status = skipped_reason(result) or result.get("error") or \
                    f"median {result['median_ms']:.1f} ms"
                print(f"  {precision:<8} {engine:<15} {status}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(rows)
    if args.json_path:
        payload = {"gpu": what if ok else None, "cases": {c: CASES[c] for c in cases},
                   "precisions": precisions,
                   "results": {f"{case}/{precision}": engines
                               for (case, precision), engines in rows.items()},
                   "warmup": args.warmup, "steps": args.steps, "cpu_steps": args.cpu_steps}
        write_json(args.json_path, payload)
    failed = [r for engines in rows.values() for e, r in engines.items()
              if e.startswith("minicnn") and "error" in r and not skipped_reason(r)]
    return 1 if failed else 0            # exit 1: minicnn failed


if __name__ == "__main__":
    sys.exit(main())
