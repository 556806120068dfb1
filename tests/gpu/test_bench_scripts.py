"""The GPU check's non-GPU logic, on any machine: benchmarks/gpu_check.sh parses, and
benchmarks/bench_gpu.py's profile (CPU timer), key figures and target table work on the files
its workers write."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import backend

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu  # noqa: E402


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_profile_times_every_function_on_the_cpu_and_restores_them():
    from minicnn.functions.conv import Conv2D
    forward, backward = Conv2D.forward, Conv2D.backward
    # depth 1: three blocks of two convolutions, and the 1x1 head
    micro = dict(base=2, depth=1, batch=1, size=16, channels=3, classes=3)
    result = bench_gpu.profile_worker(micro, "cpu", warmup=1, steps=2, precision="float32")
    assert Conv2D.forward is forward and Conv2D.backward is backward
    rows = {(r["op"], r["phase"]): r for r in result["rows"]}
    assert rows[("Conv2D", "forward")]["calls"] == 7 == rows[("Conv2D", "backward")]["calls"]
    assert rows[("Adam.step", "update")]["calls"] == 1
    assert ("SparseCategoricalCrossentropy", "forward") in rows
    assert all(r["ms"] >= 0 for r in result["rows"])
    assert sum(r["ms"] for r in result["rows"]) <= result["profiled_step_ms"] * 1.01
    bench_gpu.print_profile("tiny", result)          # the table prints


def fake_outputs(tmp_path, bf16_error=None):
    def write(name, payload):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload))
    results = {"large/float32": {"minicnn-gpu": {"median_ms": 60.0},
                                 "torch-cudnn": {"median_ms": 50.0}},
               "large/tf32": {"minicnn-gpu": {"median_ms": 70.0},
                              "torch-cudnn": {"median_ms": 40.0}},
               "large/bf16": {"minicnn-gpu": {"median_ms": 30.0} if bf16_error is None
                              else {"error": bf16_error},
                              "torch-cudnn": {"median_ms": 30.0}}}
    write("bench_precisions.json", {"results": results})
    write("train_float32/results.json", {"test_dice": 0.930})
    write("train_bf16/results.json", {"test_dice": 0.925})
    write("bench_small.json", {"results": {
        "small/float32": {"minicnn-gpu": {"median_ms": 20.0}, "minicnn-cpu": {"median_ms": 400.0}},
        "tiny/float32": {"minicnn-gpu": {"median_ms": 15.0}, "minicnn-cpu": {"median_ms": 9.0}}}})
    write("bench_kernels.json", {"kernels": {"a": {"cuda_ms": 1.0, "twin_ms": 3.0},
                                             "b": {"cuda_ms": 2.0, "twin_ms": 2.0},
                                             "c": {"cuda_ms": None, "twin_ms": 1.0}}})


def test_targets_table_says_which_are_met(tmp_path):
    fake_outputs(tmp_path)
    lines = "\n".join(bench_gpu.summary_lines(str(tmp_path)))
    assert "large/float32, <= 1.25x PyTorch" in lines
    verdicts = [line.split()[-1] for line in lines.splitlines() if "<= 1.25x" in line]
    assert verdicts == ["yes", "NO", "yes"]                  # 1.20, 1.75, 1.00
    assert "0.0050  yes" in lines                            # Dice gap 0.005
    assert "small/float32" in lines and lines.count("  NO") == 2     # tf32, and tiny on the GPU


def test_targets_table_names_a_skipped_bf16_and_missing_files(tmp_path):
    fake_outputs(tmp_path, bf16_error="RuntimeError: bfloat16 needs the ml_dtypes package")
    lines = "\n".join(bench_gpu.summary_lines(str(tmp_path)))
    assert "skipped: bfloat16 needs ml_dtypes" in lines
    empty = "\n".join(bench_gpu.summary_lines(str(tmp_path / "nothing")))
    assert "no bench_precisions.json" in empty and "float32 None" in empty


def test_key_figures(tmp_path):
    fake_outputs(tmp_path)
    assert bench_gpu.key_figure("kernels", tmp_path / "bench_kernels.json") == \
        "speed-up over array code 1.0x..3.0x (1 failed)"
    assert bench_gpu.key_figure("precisions", tmp_path / "bench_precisions.json") == \
        "vs torch: float32 1.20x, tf32 1.75x, bf16 1.00x"
    assert bench_gpu.key_figure("kernels", tmp_path / "missing.json") == ""


@pytest.mark.skipif(backend.gpu_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_the_benchmark_says_why(capsys):
    assert bench_gpu.main(["--cases", "large"]) == 0
    assert "no GPU, nothing to time" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_gpu.main(["--precisions", "fp8"])
