"""One U-Net training step (forward, loss, backward, Adam update): minicnn against PyTorch.

Each engine runs in its own process (so peak resident memory is its own), on the same number of
CPU threads, for the same architecture: UNet(num_classes, base_filters, depth), 3x3 'same'
convolutions with bias, BatchNorm (eps 1e-3, Keras momentum 0.99 = PyTorch momentum 0.01), ReLU,
2x2 max pooling, ConvTranspose k=2 s=2, concatenation, a 1x1 head, softmax cross-entropy, Adam.

    python benchmarks/bench_unet.py                       # every case, PyTorch if importable
    python benchmarks/bench_unet.py --cases recipe        # one case
    python benchmarks/bench_unet.py --torch-python /path/to/venv/bin/python --json out.json
    python benchmarks/bench_unet.py --profile             # minicnn's time per phase and per op
    python benchmarks/bench_unet.py --retain-freed-memory # glibc keeps freed memory, both engines
    python benchmarks/bench_unet.py --set kernels=plain   # any mc.config setting, minicnn's run

Prints the machine (cores, NumPy's BLAS and the OpenBLAS kernel it runs, the OPENBLAS_*
variables), median step times, the ratio minicnn / PyTorch, peak RSS of each process, and (with
--profile) where minicnn's time goes: per phase, per operation, and per kernel (every kernel of
``kernels.dispatch``: the convolution's input and filter gradients separately).

The OpenBLAS kernel matters: OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU runs NumPy's products
~1.5x slower than the kernel OpenBLAS picks itself. To measure without it, unset it (and
OPENBLAS_L2_SIZE) for the benchmark command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_unet.py ...

``--retain-freed-memory`` calls ``kernels.fast.runtime.retain_freed_memory()`` in the minicnn process
and the same ``mallopt`` settings in the PyTorch one (both engines page-fault on fresh
activations by default; the comparison stays like for like).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# recipe: what ``minicnn train`` runs by default (minicnn/cli.py: --depth 3, --base-filters 16,
# --batch-size 8, --crop 64, the nuclei image's 1 channel, --classes 2, sparse cross-entropy from
# logits, Adam 1e-3)
CASES = {
    "recipe": dict(base=16, depth=3, batch=8, size=64, channels=1, classes=2, steps=20),
    "large": dict(base=16, depth=4, batch=8, size=128, channels=3, classes=3, steps=5),
    "small": dict(base=8, depth=3, batch=4, size=64, channels=1, classes=3, steps=20),
}


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- minicnn ------------------------------------------------------------------------------------
def retain_freed_memory_glibc() -> bool:
    """The settings of ``kernels.fast.runtime.retain_freed_memory`` for a process without minicnn."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, 32 << 20)) and bool(mallopt(-1, 1 << 30))   # MMAP, TRIM thresholds


def parse_setting(text):
    """``NAME=VALUE`` (VALUE a Python literal, or a bare word such as plain) -> (NAME, VALUE)."""
    import ast
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set takes NAME=VALUE, got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return name.strip(), value.strip()


def minicnn_worker(case: dict, profile: bool, retain: bool, overrides=()) -> dict:
    import numpy as np
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from kernels.config import settings
    from kernels.fast import runtime
    retained = runtime.retain_freed_memory() if retain else False
    for name, value in overrides:                  # mc.config for this run (--set NAME=VALUE)
        setattr(settings, name, value)
    import minicnn as mc
    from minicnn import losses, optimizers
    from minicnn.models import UNet
    mc.seed(0)
    rs = np.random.default_rng(0)
    x = rs.random((case["batch"], case["size"], case["size"], case["channels"]), dtype=np.float32)
    y = rs.integers(0, case["classes"], size=x.shape[:3])
    model = UNet(num_classes=case["classes"], base_filters=case["base"], depth=case["depth"])
    model.build((None,) + x.shape[1:])
    loss_fn = losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = optimizers.Adam(1e-3)
    phases = {"forward": [], "loss": [], "backward": [], "update": []}

    def step():
        t0 = time.perf_counter()
        out = model(x, training=True)
        t1 = time.perf_counter()
        loss = loss_fn(y, out)
        t2 = time.perf_counter()
        model.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        opt.step(model.trainable_weights)
        t4 = time.perf_counter()
        for name, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name].append(value)
        return t4 - t0

    for _ in range(2):
        step()
    for values in phases.values():
        values.clear()
    op_times = install_op_timers() if profile else None
    kernel_times = install_kernel_timers() if profile else None
    times = [step() for _ in range(case["steps"])]
    result = {"median_ms": 1000 * float(np.median(times)), "min_ms": 1000 * float(min(times)),
              "peak_rss_mb": peak_rss_mb(), "retained_freed_memory": retained,
              "trainable": int(sum(w.size for w in model.trainable_weights)),
              "threads": settings.threads, "kernels": settings.kernels,
              "conv_threads": runtime.piece_threads(),
              "phases_ms": {k: 1000 * float(np.median(v)) for k, v in phases.items()}}
    for name, totals in (("ops_ms_per_step", op_times), ("kernels_ms_per_step", kernel_times)):
        if totals is not None:
            result[name] = {k: 1000 * v / case["steps"]
                            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    if profile:
        result["profile"] = profile_table(result["ops_ms_per_step"],
                                          {k: 1000 * float(np.mean(v)) for k, v in phases.items()})
    return result


def profile_table(ops_ms: dict, phases_ms: dict) -> list:
    """Rows ``(label, forward ms, backward ms)`` per step: each Function class (its forward and
    backward; the loss's Function among them), the Python between the Functions (layers, the
    tape, autograd's walk: a phase's time less its Functions' time), the optimizer, the step.
    Times are means over the timed steps."""
    per_class: dict = {}
    for key, ms in ops_ms.items():
        cls, method = key.rsplit(".", 1)
        per_class.setdefault(cls, [0.0, 0.0])[method == "backward"] += ms
    rows = sorted(((cls, f, b) for cls, (f, b) in per_class.items()), key=lambda r: -(r[1] + r[2]))
    forward_ops = sum(r[1] for r in rows)
    backward_ops = sum(r[2] for r in rows)
    rows.append(("Functions, total", forward_ops, backward_ops))
    rows.append(("Python between Functions (layers, tape, autograd)",
                 phases_ms["forward"] + phases_ms["loss"] - forward_ops,
                 phases_ms["backward"] - backward_ops))
    rows.append(("optimizer (Adam update)", 0.0, phases_ms["update"]))
    rows.append(("step", phases_ms["forward"] + phases_ms["loss"],
                 phases_ms["backward"] + phases_ms["update"]))
    return rows


def install_kernel_timers() -> dict:
    """Time every kernel called through ``kernels.dispatch`` (profile mode only): wall time of
    all its calls, whichever implementation ran (the convolution's input gradient is
    ``conv2d_transpose``, its filter gradient ``conv2d_backward_filter``)."""
    from kernels import dispatch
    totals: dict = {}

    def timed(name, original):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        setattr(dispatch, name, wrapper)

    for name, original in dispatch.KERNELS.items():
        timed(name, original)
    return totals


def install_op_timers() -> dict:
    """Wrap every Function subclass's forward and backward with a timer (profile mode only)."""
    from minicnn.tensor import Function
    totals: dict = {}

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    def timed(cls, method):
        original = cls.__dict__[method]

        def wrapper(self, *args):
            start = time.perf_counter()
            try:
                return original(self, *args)
            finally:
                key = f"{cls.__name__}.{method}"
                totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
        setattr(cls, method, wrapper)

    for cls in set(subclasses(Function)):
        for method in ("forward", "backward"):
            if method in cls.__dict__:
                timed(cls, method)
    return totals


# -- PyTorch twin ---------------------------------------------------------------------------------
def torch_unet(cin, classes, base, depth):
    """The PyTorch twin of ``minicnn.models.UNet`` (same layers, same parameter count)."""
    import torch
    from torch import nn

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
            nn.ReLU(inplace=True))

    class TorchUNet(nn.Module):
        def __init__(self, cin, classes, base, depth):
            super().__init__()
            widths = [base * 2 ** i for i in range(depth + 1)]
            self.down = nn.ModuleList()
            c = cin
            for w in widths[:-1]:
                self.down.append(block(c, w))
                c = w
            self.bottom = block(widths[-2], widths[-1])
            self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                     for i in reversed(range(depth)))
            self.dec = nn.ModuleList(block(2 * widths[i], widths[i]) for i in reversed(range(depth)))
            self.head = nn.Conv2d(base, classes, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            skips = []
            for b in self.down:
                x = b(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottom(x)
            for up, b in zip(self.ups, self.dec):
                x = b(torch.cat([up(x), skips.pop()], dim=1))
            return self.head(x)

    return TorchUNet(cin, classes, base, depth)


def torch_worker(case: dict, channels_last: bool) -> dict:
    import numpy as np
    import torch
    from torch import nn
    torch.manual_seed(0)


    rs = np.random.default_rng(0)
    x = torch.from_numpy(rs.random((case["batch"], case["channels"], case["size"], case["size"]),
                                   dtype=np.float32))
    y = torch.from_numpy(rs.integers(0, case["classes"],
                                     size=(case["batch"], case["size"], case["size"])))
    model = torch_unet(case["channels"], case["classes"], case["base"], case["depth"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(2):
        step()
    times = [step() for _ in range(case["steps"])]
    return {"median_ms": 1000 * float(np.median(times)), "peak_rss_mb": peak_rss_mb(),
            "trainable": int(sum(p.numel() for p in model.parameters())),
            "threads": torch.get_num_threads(), "version": torch.__version__}


# -- orchestration -------------------------------------------------------------------------------
def run_worker(python: str, engine: str, case: str, extra=(), env=None) -> dict:
    command = [python, os.path.abspath(__file__), "--worker", engine, "--case", case, *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def blas_name() -> str:
    """NumPy's BLAS, its version, threads and the CPU kernel it runs (threadpoolctl's
    "architecture": OpenBLAS's core type), plus the OPENBLAS_* variables that choose it."""
    import numpy  # noqa: F401  (threadpoolctl lists only loaded libraries)
    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}"
                    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))
    try:
        from threadpoolctl import threadpool_info
        pools = [f"{p['internal_api']} {p.get('version')} ({p['num_threads']} threads, core type "
                 f"{p.get('architecture')}, {os.path.basename(p.get('filepath', ''))})"
                 for p in threadpool_info() if p.get("user_api") == "blas"]
        return (", ".join(pools) or "unknown") + f"; {env}"
    except ImportError:
        return f"unknown (pip install threadpoolctl to see it); {env}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--torch-python", default=sys.executable,
                        help="interpreter that has torch (default: this one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of both engines (minicnn: MINICNN_NUM_THREADS and "
                             "OPENBLAS_NUM_THREADS; PyTorch: set_num_threads)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--steps", type=int, help="timed steps per case (default: recipe 20, "
                        "large 5, small 20), after two warm-up steps")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="glibc mallopt in both engines' processes (see the docstring)")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--set", dest="overrides", type=parse_setting, action="append",
                        default=[], metavar="NAME=VALUE",
                        help="an mc.config setting for minicnn's run, e.g. kernels=plain or "
                             "conv_parallel_min_macs=4194304 (repeatable)")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--worker", choices=["minicnn", "torch", "torch-cl"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps:
        for case in CASES.values():
            case["steps"] = args.steps
    if args.worker:
        case = CASES[args.case]
        if args.worker == "minicnn":
            result = minicnn_worker(case, args.profile, args.retain_freed_memory, args.overrides)
        else:
            retained = retain_freed_memory_glibc() if args.retain_freed_memory else False
            import torch
            torch.set_num_threads(args.threads)
            result = torch_worker(case, channels_last=args.worker == "torch-cl")
            result["retained_freed_memory"] = retained
        print(json.dumps(result))
        return 0

    shared = ["--threads", str(args.threads)] + \
        (["--retain-freed-memory"] if args.retain_freed_memory else []) + \
        (["--steps", str(args.steps)] if args.steps else [])
    minicnn_env = {"MINICNN_NUM_THREADS": str(args.threads),
                   "OPENBLAS_NUM_THREADS": str(args.threads)}
    rows = {}
    header = {"cpu_cores": os.cpu_count(), "threads": args.threads, "numpy_blas": blas_name(),
              "retain_freed_memory": args.retain_freed_memory,
              "settings": dict(args.overrides),
              "python": sys.version.split()[0]}
    print(f"CPU cores: {header['cpu_cores']}, threads: {args.threads}, "
          f"freed memory retained (glibc mallopt): {'yes' if args.retain_freed_memory else 'no'}")
    print(f"numpy BLAS: {header['numpy_blas']}")
    for name in args.cases.split(","):
        mine = run_worker(sys.executable, "minicnn", name,
                          shared + (["--profile"] if args.profile else [])
                          + [f"--set={name}={value!r}" for name, value in args.overrides],
                          minicnn_env)
        if args.no_torch:
            theirs = theirs_cl = {"error": "--no-torch"}
        else:
            theirs = run_worker(args.torch_python, "torch", name, shared)
            theirs_cl = run_worker(args.torch_python, "torch-cl", name, shared)
        rows[name] = {"case": CASES[name], "minicnn": mine, "torch": theirs,
                      "torch_channels_last": theirs_cl}
    print(f"\n{'case':<8}{'minicnn ms':>12}{'torch ms':>10}{'ratio':>8}{'torch CL ms':>13}"
          f"{'minicnn MB':>12}{'torch MB':>10}{'mem ratio':>11}  params (minicnn / torch)")
    for name, row in rows.items():
        mine, theirs, cl = row["minicnn"], row["torch"], row["torch_channels_last"]
        if "error" in mine:
            print(f"{name:<8} minicnn failed: {mine['error']}")
            continue
        if "error" in theirs:
            print(f"{name:<8}{mine['median_ms']:>12.1f}   (PyTorch unavailable: {theirs['error']})"
                  f"{mine['peak_rss_mb']:>12.0f} MB")
            continue
        print(f"{name:<8}{mine['median_ms']:>12.1f}{theirs['median_ms']:>10.1f}"
              f"{mine['median_ms'] / theirs['median_ms']:>8.2f}"
              f"{cl.get('median_ms', float('nan')):>13.1f}{mine['peak_rss_mb']:>12.0f}"
              f"{theirs['peak_rss_mb']:>10.0f}{mine['peak_rss_mb'] / theirs['peak_rss_mb']:>11.2f}"
              f"  {mine['trainable']:,} / {theirs['trainable']:,}")
    for name, row in rows.items():
        mine = row["minicnn"]
        if "phases_ms" in mine:
            print(f"\n{name}: minicnn phases (median ms): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in mine["phases_ms"].items())
                  + f"; conv threads: {mine['conv_threads']}")
        if "profile" in mine:
            print(f"{name}: minicnn per op and phase (ms per step, mean; forward includes the "
                  f"loss, backward the update):")
            print(f"    {'':<52}{'forward':>9}{'backward':>10}{'total':>8}")
            for label, forward, backward in mine["profile"]:
                print(f"    {label:<52}{forward:>9.1f}{backward:>10.1f}{forward + backward:>8.1f}")
        if "kernels_ms_per_step" in mine:
            print(f"{name}: minicnn time per kernel (ms per step):")
            for label, value in list(mine["kernels_ms_per_step"].items())[:16]:
                print(f"    {label:<52}{value:>9.1f}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"header": header, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
