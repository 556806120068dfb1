"""Convolution kernels: forward and forward+backward time, GFLOP/s, share of NumPy's own matmul
rate, and the ratio to PyTorch (CPU, same thread count) when torch is importable.

Benchmark with the OpenBLAS kernel OpenBLAS picks itself (this environment's OPENBLAS_CORETYPE
forces an older, ~1.5x slower one): ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python ...``.

    python benchmarks/bench_conv.py                   # table
    python benchmarks/bench_conv.py --json out.json   # and a JSON file
    python benchmarks/bench_conv.py --algorithm im2col --cases 32x32   # force one algorithm
    python benchmarks/bench_conv.py --kernels plain   # the readable kernels (mc.config.kernels)

Forward+backward computes dx, dw and db (PyTorch: the input requires grad) with the kernel calls
minicnn's Functions make: for a convolution conv2d_forward, then conv2d_transpose (dx),
conv2d_backward_filter (dw) and bias_gradient (db). Each time is the best of ``--rounds`` medians
of ``--repeat`` runs (after two warm-up runs): the machine this was written on is shared, and a
burst of load from elsewhere should spoil a round, not the table. PyTorch runs afterwards in a
child process of the same interpreter (run this with a Python that has torch), in its default
NCHW layout and in channels_last; the ratio columns divide our forward+backward time by each.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import dispatch  # noqa: E402
from kernels import shapes  # noqa: E402
from kernels.config import settings  # noqa: E402
from kernels.fast import conv2d as fast_conv  # noqa: E402
from kernels.fast import runtime, scratch  # noqa: E402

BATCH = 8
# name, kind, H(=W), C_in, C_out (or depth multiplier), kernel, stride, dilation
CASES = [
    ("128x128 3->16", "conv", 128, 3, 16, 3, 1, 1),
    ("128x128 16->16", "conv", 128, 16, 16, 3, 1, 1),
    ("64x64 32->32", "conv", 64, 32, 32, 3, 1, 1),
    ("32x32 64->64", "conv", 32, 64, 64, 3, 1, 1),
    ("16x16 128->128", "conv", 16, 128, 128, 3, 1, 1),
    ("8x8 256->256", "conv", 8, 256, 256, 3, 1, 1),
    ("64x64 32->32 dil2", "conv", 64, 32, 32, 3, 1, 2),
    ("64x64 32->32 s2", "conv", 64, 32, 32, 3, 2, 1),
    ("64x64 depthwise 32", "depthwise", 64, 32, 1, 3, 1, 1),
    ("32x32 T 64->32 k2s2", "transpose", 32, 64, 32, 2, 2, 1),
]


def median_ms(fn, repeat):
    fn()
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def numpy_matmul_gflops(repeat):
    """float32 matmul rate of NumPy's BLAS on 2048x2048 matrices."""
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    ms = median_ms(lambda: a @ a, repeat)
    return 2 * 2048 ** 3 / ms / 1e6


def blas_description():
    """NumPy's BLAS and version, the CPU kernel OpenBLAS runs (threadpoolctl's "architecture"),
    its threads, and the OPENBLAS_* variables that pick the kernel."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        text = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy
        text = "unknown"
    try:
        from threadpoolctl import threadpool_info
        for pool in threadpool_info():
            if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", ""):
                text += (f" (core type {pool.get('architecture')}, "
                         f"{pool.get('num_threads')} threads)")
    except ImportError:
        text += " (pip install threadpoolctl for the core type)"
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                    if k in os.environ)
    return text + (f" [{env}]" if env else " [OPENBLAS_CORETYPE unset]")


def conv_kernels():
    """(forward, input gradient, filter gradient) as minicnn calls them, or the tuned twins with
    ``--algorithm`` forced."""
    if ALGORITHM is None:
        return dispatch.conv2d_forward, dispatch.conv2d_transpose, dispatch.conv2d_backward_filter
    force = dict(algorithm=ALGORITHM)
    return (lambda *a, **k: fast_conv.conv2d_forward(*a, **k, **force),
            lambda *a, **k: fast_conv.conv2d_transpose(*a, **k, **force),
            lambda *a, **k: fast_conv.conv2d_backward_filter(*a, **k, **force))


def make_case(kind, size, c_in, c_out, k, stride, dilation, rng):
    """Arrays and the two closures (forward, forward+backward) for one case; plus its FLOPs."""
    x = rng.standard_normal((BATCH, size, size, c_in), dtype=np.float32)
    conv = dict(strides=(stride, stride), dilation=(dilation, dilation), padding="same")
    forward_kernel, input_gradient, filter_gradient = conv_kernels()
    if kind == "conv":
        w = rng.standard_normal((k, k, c_in, c_out), dtype=np.float32) * 0.1
        b = np.zeros(c_out, np.float32)
        g = rng.standard_normal(forward_kernel(x, w, b, **conv).shape, dtype=np.float32)

        def forward():
            return forward_kernel(x, w, b, **conv)

        def forward_backward():
            forward_kernel(x, w, b, **conv)
            return (input_gradient(g, w, output_size=(size, size), **conv),
                    filter_gradient(x, g, kernel_size=(k, k), **conv), dispatch.bias_gradient(g))
        flops = 2 * g.size * k * k * c_in
    elif kind == "depthwise":
        w = rng.standard_normal((k, k, c_in, c_out), dtype=np.float32) * 0.1
        g = rng.standard_normal(dispatch.depthwise_conv2d_forward(x, w, **conv).shape,
                                dtype=np.float32)

        def forward():
            return dispatch.depthwise_conv2d_forward(x, w, **conv)

        def forward_backward():
            dispatch.depthwise_conv2d_forward(x, w, **conv)
            return (dispatch.depthwise_conv2d_backward_input(g, w, input_size=(size, size), **conv),
                    dispatch.depthwise_conv2d_backward_filter(x, g, kernel_size=(k, k), **conv))
        flops = 2 * g.size * k * k
    else:  # transposed, Keras' rule: kernel (k, k, out, in), output size from kernels.shapes
        w = rng.standard_normal((k, k, c_out, c_in), dtype=np.float32) * 0.1
        b = np.zeros(c_out, np.float32)
        output_size, pads = shapes.conv_transpose2d_geometry((size, size), (k, k), stride, 1,
                                                             "same")
        twin = dict(strides=(stride, stride), padding=pads)
        g = rng.standard_normal((BATCH, *output_size, c_out), dtype=np.float32)

        def forward():
            return input_gradient(x, w, b, output_size=output_size, **twin)

        def forward_backward():
            input_gradient(x, w, b, output_size=output_size, **twin)
            return (forward_kernel(g, w, **twin), filter_gradient(g, x, kernel_size=(k, k), **twin),
                    dispatch.bias_gradient(g))
        flops = 2 * x.size * k * k * c_out
    return forward, forward_backward, flops


def torch_case(torch, kind, size, c_in, c_out, k, stride, dilation, channels_last):
    """The same case in PyTorch; returns (forward, forward_backward) closures."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c_in, size, size, generator=gen)
    pad = dilation * (k - 1) // 2 if stride == 1 else (k - 1) // 2
    if kind == "conv":
        layer = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dilation)
    elif kind == "depthwise":
        layer = torch.nn.Conv2d(c_in, c_in * c_out, k, stride=stride, padding=pad,
                                dilation=dilation, groups=c_in)
    else:
        layer = torch.nn.ConvTranspose2d(c_in, c_out, k, stride=stride)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        layer = layer.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with torch.no_grad():
        g = torch.randn_like(layer(x))

    def forward():
        with torch.no_grad():
            return layer(x)

    def forward_backward():
        layer(x).backward(g)
    return forward, forward_backward


ALGORITHM = None


def best_of_rounds(timed, args):
    """Each closure's best (over ``rounds``) median of ``repeat`` runs: a burst of load from
    elsewhere on a shared machine then spoils a round, not the result."""
    best = {key: float("inf") for key in timed}
    for _ in range(args.rounds):
        for key, fn in timed.items():
            best[key] = min(best[key], median_ms(fn, args.repeat))
    return best


def time_ours(cases, args, matmul_rate):
    rng = np.random.default_rng(0)
    rows = []
    for name, kind, size, c_in, c_out, k, stride, dilation in cases:
        forward, forward_backward, flops = make_case(kind, size, c_in, c_out, k, stride,
                                                     dilation, rng)
        best = best_of_rounds({"forward_ms": forward, "forward_backward_ms": forward_backward},
                              args)
        algo = "-"
        if kind != "depthwise":
            in_hw = (size * stride, size * stride) if kind == "transpose" else (size, size)
            channels = c_out if kind == "transpose" else c_in
            geometry = shapes.conv_geometry("bench", in_hw, (k, k), strides=stride,
                                            dilation=dilation, padding="same")
            algo = "plain" if settings.kernels == "plain" else \
                ALGORITHM or fast_conv.choose_algorithm(geometry, channels)
        gflops = 3 * flops / best["forward_backward_ms"] / 1e6
        rows.append({"case": name, "algorithm": algo,
                     **{key: round(value, 3) for key, value in best.items()},
                     "gflops": round(gflops, 1), "share_of_matmul": round(gflops / matmul_rate, 3)})
        scratch.release()
    return rows


def time_torch(cases, args):
    """PyTorch's times per case, or None without torch. Runs in its own process (``--torch-only``):
    its OpenMP threads keep spinning after each call and would slow NumPy's BLAS threads down."""
    try:
        import torch  # only here: the engine never imports it
    except ImportError:
        return None
    torch.set_num_threads(args.threads)
    results = {"version": torch.__version__}
    for name, kind, size, c_in, c_out, k, stride, dilation in cases:
        timed = {}
        for label, channels_last in (("torch", False), ("torch_channels_last", True)):
            t_fwd, t_both = torch_case(torch, kind, size, c_in, c_out, k, stride, dilation,
                                       channels_last)
            timed[f"{label}_forward_ms"] = t_fwd
            timed[f"{label}_forward_backward_ms"] = t_both
        results[name] = {key: round(value, 3) for key, value in best_of_rounds(timed, args).items()}
    return results


def main(argv=None):
    global ALGORITHM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per median")
    parser.add_argument("--rounds", type=int, default=3, help="medians per case; best counts")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--cases", default="", help="run only cases whose name contains this")
    parser.add_argument("--algorithm", choices=fast_conv.ALGORITHMS,
                        help="force an algorithm of the tuned convolution")
    parser.add_argument("--kernels", choices=("fast", "plain"), default="fast",
                        help="mc.config.kernels: the tuned twins (default) or the plain kernels")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch threads (minicnn: MINICNN_NUM_THREADS, default all cores)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="kernels.fast.runtime.retain_freed_memory() here and in PyTorch's "
                             "process")
    args = parser.parse_args(argv)
    ALGORITHM = args.algorithm
    if args.algorithm and args.kernels == "plain":
        parser.error("--algorithm picks an algorithm of the tuned kernels, not of the plain ones")
    settings.kernels = args.kernels
    if args.retain_freed_memory:
        runtime.retain_freed_memory()
    cases = [case for case in CASES if args.cases in case[0]]
    if args.torch_only:
        print(json.dumps(time_torch(cases, args)))
        return None

    matmul_rate = numpy_matmul_gflops(args.repeat)
    rows = time_ours(cases, args, matmul_rate)
    torch_times = None
    if not args.no_torch:
        command = [sys.executable, __file__, "--torch-only", "--cases", args.cases, "--repeat",
                   str(args.repeat), "--rounds", str(args.rounds), "--threads", str(args.threads)]
        command += ["--retain-freed-memory"] if args.retain_freed_memory else []
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        torch_times = json.loads(done.stdout.strip().splitlines()[-1])
    if torch_times is not None:
        for row in rows:
            row.update(torch_times[row["case"]])
            for label in ("torch", "torch_channels_last"):
                row[f"ratio_{label}"] = round(row["forward_backward_ms"]
                                              / row[f"{label}_forward_backward_ms"], 2)

    header = {
        "numpy": np.__version__, "blas": blas_description(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "numpy_matmul_gflops": round(matmul_rate, 1),
        "torch": None if torch_times is None else
        f"{torch_times['version']} ({args.threads} threads)",
        "batch": BATCH, "repeat": args.repeat, "rounds": args.rounds,
        "kernels": settings.kernels, "algorithm": ALGORITHM or "auto",
        "conv_threads": runtime.piece_threads(),
        "retain_freed_memory": args.retain_freed_memory,
    }
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    columns = ("case", "algo", "fwd ms", "f+b ms", "GFLOP/s", "%matmul",
               "torch fwd", "torch f+b", "ratio", "CL f+b", "ratio CL")
    print("{:<21}{:>8}{:>8}{:>8}{:>9}{:>8}{:>10}{:>10}{:>7}{:>8}{:>9}".format(*columns))
    for row in rows:
        print("{:<21}{:>8}{:>8.2f}{:>8.2f}{:>9.1f}{:>7.0f}%".format(
            row["case"], row["algorithm"], row["forward_ms"], row["forward_backward_ms"],
            row["gflops"], 100 * row["share_of_matmul"]), end="")
        if torch_times is not None:
            print("{:>10.2f}{:>10.2f}{:>7.2f}{:>8.2f}{:>9.2f}".format(
                row["torch_forward_ms"], row["torch_forward_backward_ms"], row["ratio_torch"],
                row["torch_channels_last_forward_backward_ms"],
                row["ratio_torch_channels_last"]), end="")
        print()
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
