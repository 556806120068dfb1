#!/usr/bin/env bash
# One pass over everything that needs a GPU, in under 8 minutes on one H100:
#   nvidia-smi -L; install minicnn (editable, no registry; else PYTHONPATH=.); the CUDA kernel
#   tests; every device-parametrised test's "gpu" case; bench_conv.py (if it has a GPU flag);
#   bench_gpu.py --kernels (each CUDA kernel vs its array-code twin); bench_gpu.py (U-Net
#   training step vs PyTorch/cuDNN); a short `minicnn train --device gpu` on nuclei.
# Each step is timed and capped (a shared deadline, GPU_CHECK_BUDGET_S seconds); a failed step
# does not stop the others; the exit status is non-zero if any step failed.
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh     (GPU_CHECK_SKIP_INSTALL=1: no pip step)
# Writes ${OUT:-/tmp/gpu_check}/gpu_check.log (every step's output), summary.txt (the final
# table), bench_kernels.json, bench_gpu.json, and the training run in ${TRAIN_OUT:-$OUT/train}.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
TRAIN_OUT=${TRAIN_OUT:-$OUT/train}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1
START=$(date +%s)
FAILED=0
ROWS=()

# run_step NAME CAP_SECONDS COMMAND...: time it, cap it by CAP and by what is left of BUDGET,
# append its output to the log (the last lines to the console), set STEP_STATUS/STEP_SECONDS.
run_step() {
    local name=$1 cap=$2
    STEP_OUT=""
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    ((left < cap)) && cap=$left
    local out="$OUT/.step_$name.out"
    if ((cap < 5)); then
        echo "=== $name: not run, the ${BUDGET}s budget is spent" | tee -a "$LOG" >"$out"
        STEP_STATUS=no-time STEP_SECONDS=0
    else
        echo "=== $name (cap ${cap}s): $*" | tee -a "$LOG"
        local t0 t1 rc
        t0=$(date +%s.%N)
        timeout --kill-after=10 "$cap" "$@" >"$out" 2>&1
        rc=$?
        t1=$(date +%s.%N)
        cat "$out" >>"$LOG"
        tail -n 5 "$out"
        STEP_SECONDS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
        if ((rc == 0)); then
            STEP_STATUS=ok
        elif ((rc == 124 || rc == 137)); then
            STEP_STATUS="timeout"
        else
            STEP_STATUS="FAILED($rc)"
        fi
        echo "=== $name: $STEP_STATUS in ${STEP_SECONDS}s" | tee -a "$LOG"
    fi
    [[ $STEP_STATUS == ok ]] || FAILED=$((FAILED + 1))
    STEP_OUT=$out
}

record() {   # record NAME KEY_FIGURE (a failed step without a figure shows its last line)
    local figure=$2
    if [[ -z $figure && $STEP_STATUS != ok && -s ${STEP_OUT:-} ]]; then
        figure=$(grep -v '^[[:space:]]*$' "$STEP_OUT" | tail -n 1 | trim | cut -c1-70)
    fi
    ROWS+=("$(printf '%-14s %-11s %8s  %s' "$1" "$STEP_STATUS" "$STEP_SECONDS" "$figure")")
}

skip() {     # skip NAME WHY
    STEP_STATUS=skipped STEP_SECONDS=0
    echo "=== $1: skipped ($2)" | tee -a "$LOG"
    record "$1" "$2"
}

trim() { sed -e 's/^[[:space:]=]*//' -e 's/[[:space:]=]*$//'; }
pytest_figure() { grep -E '[0-9]+ (passed|failed|error)' "$STEP_OUT" | tail -n 1 | trim; }

# 1. the GPU
run_step nvidia-smi 20 nvidia-smi -L
record nvidia-smi "$(head -n 1 "$STEP_OUT" | cut -c1-60)"

# 2. install (no registry: no deps, no build isolation), else PYTHONPATH
if [[ ${GPU_CHECK_SKIP_INSTALL:-0} == 1 ]]; then
    skip install "GPU_CHECK_SKIP_INSTALL=1: PYTHONPATH=$PWD"
else
    run_step install 120 "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .
    if [[ $STEP_STATUS == ok ]]; then
        record install "editable install"
    else
        FAILED=$((FAILED - 1))                 # not a failure: PYTHONPATH below does the same
        STEP_STATUS="fallback"
        record install "pip failed: PYTHONPATH=$PWD"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 3. the CUDA kernels against their NumPy twins, then every device-parametrised GPU case
run_step cuda-kernels 120 "$PYTHON" -m pytest tests/kernels/test_cuda.py -rs -p no:cacheprovider
record cuda-kernels "$(pytest_figure)"
run_step gpu-tests 150 "$PYTHON" -m pytest tests -k gpu -p no:cacheprovider \
    --ignore=tests/kernels/test_cuda.py
record gpu-tests "$(pytest_figure)"

# 4. convolution benchmark, only if it can run on the GPU
if grep -q -- "--device" benchmarks/bench_conv.py; then
    run_step bench-conv 60 "$PYTHON" benchmarks/bench_conv.py --device gpu --no-torch --repeat 3
    record bench-conv "$(tail -n 1 "$STEP_OUT" | cut -c1-60)"
else
    skip bench-conv "bench_conv.py has no GPU flag (CPU only)"
fi

# 5. each CUDA kernel against its array-code twin (the NumPy kernel on CuPy arrays)
run_step bench-kernels 90 "$PYTHON" benchmarks/bench_gpu.py --kernels --steps 5 \
    --json "$OUT/bench_kernels.json"
figure=$("$PYTHON" - "$OUT/bench_kernels.json" <<'PY' 2>/dev/null
import json, sys
rows = json.load(open(sys.argv[1]))["kernels"]
ups = [r["twin_ms"] / r["cuda_ms"] for r in rows.values() if r.get("cuda_ms") and r.get("twin_ms")]
failed = sum(r.get("cuda_ms") is None for r in rows.values())
print(f"speed-up over array code {min(ups):.1f}x..{max(ups):.1f}x" if ups else "no timings",
      f"({failed} failed)" if failed else "")
PY
)
record bench-kernels "${figure:-$(tail -n 1 "$STEP_OUT" | cut -c1-70)}"

# 6. U-Net training step: minicnn on the GPU vs PyTorch + cuDNN (and minicnn's CPU path)
run_step bench-gpu 200 "$PYTHON" benchmarks/bench_gpu.py --steps 5 --cpu-steps 2 --timeout 120 \
    --json "$OUT/bench_gpu.json"
figure=$("$PYTHON" - "$OUT/bench_gpu.json" <<'PY' 2>/dev/null
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
parts = []
for case, engines in rows.items():
    mine, ref = engines.get("minicnn-gpu", {}), engines.get("torch-cudnn", {})
    if "median_ms" not in mine:
        parts.append(f"{case}: minicnn failed")
        continue
    text = f"{case}: {mine['median_ms']:.0f} ms"
    if "median_ms" in ref:
        text += f" ({mine['median_ms'] / ref['median_ms']:.1f}x torch)"
    parts.append(text)
print("; ".join(parts))
PY
)
record bench-gpu "${figure:-$(head -n 1 "$STEP_OUT" | cut -c1-70)}"

# 7. a short training run on the GPU (nuclei)
run_step train 150 "$PYTHON" -m minicnn.cli train --dataset nuclei --device gpu --epochs 2 \
    --steps-per-epoch 50 --out "$TRAIN_OUT"
record train "$(grep -E 'val dice' "$STEP_OUT" | tail -n 1 | trim | cut -c1-60)"

# final table
{
    echo
    printf '%-14s %-11s %8s  %s\n' step status seconds "key figure"
    printf '%s\n' "${ROWS[@]}"
    echo "total $(($(date +%s) - START)) s; $FAILED step(s) failed; logs in $OUT"
} | tee "$SUMMARY" | tee -a "$LOG"
rm -f "$OUT"/.step_*.out
((FAILED == 0))
