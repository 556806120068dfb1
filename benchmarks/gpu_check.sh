#!/usr/bin/env bash
# One pass over everything that needs a GPU, in under 8 minutes on one H200 (issue 14):
#    1. nvidia-smi -L                          7. minicnn train --device gpu --precision float32
#    2. install (editable, no deps; else PYTHONPATH)  8. the same with --precision bf16 (test Dice
#    3. versions, ml_dtypes, CuPy's bfloat16             beside float32's)
#    4. the CUDA kernel tests (incl. fused Adam) 9. per-op profile of the large step (f32, bf16)
#    5. every "gpu" test case, one run          10. each CUDA kernel vs its array-code twin
#    6. U-Net step (base 32, depth 4, 16x256^2x3) 11. small / tiny steps: GPU vs minicnn's CPU path
#       at float32 / tf32 / bf16 vs PyTorch at the same setting (TF32 on both; autocast bf16)
# Each step is timed and capped (a shared deadline of GPU_CHECK_BUDGET_S seconds, 450 unless
# set); a failed step does not stop the others; the exit status is non-zero if any step failed.
# A step that cannot run here (bf16 without ml_dtypes, or a CuPy without bfloat16) is "skipped"
# with the reason, not failed.
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh      (GPU_CHECK_SKIP_INSTALL=1: no pip step)
# Writes under ${OUT:-/tmp/gpu_check}: gpu_check.log (every step's output), summary.txt (the
# final tables), env.txt, cuda_kernels.xml and gpu_tests.xml (JUnit), bench_precisions.json,
# bench_small.json, bench_kernels.json, profile.json, and the two training runs in
# train_float32/ and train_bf16/ (results.json holds the test Dice).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
EPOCHS=${GPU_CHECK_TRAIN_EPOCHS:-8}
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
    ROWS+=("$(printf '%-16s %-11s %8s  %s' "$1" "$STEP_STATUS" "$STEP_SECONDS" "$figure")")
}

skip() {     # skip NAME WHY: not run here, not a failure
    STEP_STATUS=skipped STEP_SECONDS=0
    echo "=== $1: skipped ($2)" | tee -a "$LOG"
    record "$1" "$2"
}

trim() { sed -e 's/^[[:space:]=]*//' -e 's/[[:space:]=]*$//'; }
pytest_figure() { grep -E '[0-9]+ (passed|failed|error|skipped)' "$STEP_OUT" | tail -n 1 | trim; }
json_field() {   # json_field FILE KEY: a top-level value of a JSON file, or nothing
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2" \
        2>/dev/null
}

# 1. the GPU
run_step nvidia-smi 20 nvidia-smi -L
record nvidia-smi "$(head -n 1 "$STEP_OUT" | cut -c1-60)"

# 2. install (no registry: no deps, no build isolation), else PYTHONPATH
if [[ ${GPU_CHECK_SKIP_INSTALL:-0} == 1 ]]; then
    skip install "GPU_CHECK_SKIP_INSTALL=1: PYTHONPATH=$PWD"
else
    run_step install 60 "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .
    if [[ $STEP_STATUS == ok ]]; then
        record install "editable install"
    else
        FAILED=$((FAILED - 1))                 # not a failure: PYTHONPATH below does the same
        STEP_STATUS="fallback"
        record install "pip failed: PYTHONPATH=$PWD"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 3. versions; can this CuPy hold bfloat16 arrays (ml_dtypes)?
run_step env 30 "$PYTHON" - <<'PY'
import importlib, platform
import numpy as np
print(f"python {platform.python_version()}, numpy {np.__version__}")
for name in ("cupy", "torch", "scipy", "ml_dtypes"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as error:
        print(f"{name}: not available ({type(error).__name__}: {error})")
from kernels import backend
cp = backend.cupy_module()
props = cp.cuda.runtime.getDeviceProperties(0)
print(f"gpu {props['name'].decode()}, compute capability {cp.cuda.Device().compute_capability}")
try:
    import ml_dtypes
    x = cp.asarray(np.arange(4, dtype=ml_dtypes.bfloat16))
    y = (x @ x.reshape(4, 1)).get()
    print(f"bf16: yes (CuPy bfloat16 array, product {float(y[0])}, dtype {y.dtype})")
except Exception as error:
    print(f"bf16: no ({type(error).__name__}: {str(error)[:100]})")
PY
cp "$STEP_OUT" "$OUT/env.txt" 2>/dev/null
BF16=$(grep -q '^bf16: yes' "$OUT/env.txt" 2>/dev/null && echo yes || echo no)
record env "$(grep -E '^(cupy|torch|ml_dtypes)' "$OUT/env.txt" | tr '\n' ' ' | cut -c1-60); bf16 $BF16"

# 4. the CUDA kernels against their NumPy twins (the fused Adam kernel included); the nvcc
#    compile checks run on any machine with nvcc (CI), so not here
run_step cuda-kernels 100 "$PYTHON" -m pytest tests/kernels/test_cuda.py tests/gpu/test_fused_adam.py \
    -k "not compiles_with_nvcc" -rs -p no:cacheprovider --junitxml "$OUT/cuda_kernels.xml"
record cuda-kernels "$(pytest_figure)"

# 5. every device-parametrised "gpu" case, one run (issue 9 left this unverified)
run_step gpu-tests 130 "$PYTHON" -m pytest tests -k gpu -rs -p no:cacheprovider \
    --ignore=tests/kernels/test_cuda.py --ignore=tests/gpu/test_fused_adam.py \
    --junitxml "$OUT/gpu_tests.xml"
record gpu-tests "$(pytest_figure)"

# 5b. NCCL (issue 13): a 1-rank NCCL communicator, allreduce/broadcast on CuPy arrays, the
#     gradient buckets and SyncBatchNorm through it
run_step nccl 40 "$PYTHON" benchmarks/gpu_nccl_check.py
record nccl "$(grep -m1 -oE 'NCCL CHECK (PASSED|FAILED)' "$STEP_OUT")"

# 6. U-Net step at float32 / TF32 / bf16 against PyTorch + cuDNN at the same setting
PRECISIONS=float32,tf32
[[ $BF16 == yes ]] && PRECISIONS=$PRECISIONS,bf16
run_step bench-precision 150 "$PYTHON" benchmarks/bench_gpu.py --cases large \
    --precisions "$PRECISIONS" --steps 5 --timeout 100 --json "$OUT/bench_precisions.json"
figure=$("$PYTHON" benchmarks/bench_gpu.py --figure precisions "$OUT/bench_precisions.json")
[[ $BF16 == yes ]] || figure="bf16 skipped (no CuPy bfloat16); $figure"
record bench-precision "$figure"

# 7-8. training on nuclei: float32, then bf16, test Dice side by side
train() {   # train PRECISION
    run_step "train-$1" 110 "$PYTHON" -m minicnn.cli train --dataset nuclei --device gpu \
        --precision "$1" --epochs "$EPOCHS" --out "$OUT/train_$1"
    local dice
    dice=$(json_field "$OUT/train_$1/results.json" test_dice)
    record "train-$1" "${dice:+test Dice $dice}"
}
train float32
if [[ $BF16 == yes ]]; then
    train bf16
else
    skip train-bf16 "this CuPy has no bfloat16 (ml_dtypes missing?): see env.txt"
fi

# 9. where the step's time goes: per-op table (CUDA events around every function)
run_step profile 70 "$PYTHON" benchmarks/bench_gpu.py --profile --cases large \
    --precisions "float32$([[ $BF16 == yes ]] && echo ,bf16)" --steps 3 --timeout 60 \
    --json "$OUT/profile.json"
record profile "$(grep -m1 -E '^Conv2D +backward' "$STEP_OUT" | trim | cut -c1-60)"

# 10. each CUDA kernel against its array-code twin (the NumPy kernel on CuPy arrays)
run_step bench-kernels 60 "$PYTHON" benchmarks/bench_gpu.py --kernels --steps 5 \
    --json "$OUT/bench_kernels.json"
figure=$("$PYTHON" benchmarks/bench_gpu.py --figure kernels "$OUT/bench_kernels.json")
record bench-kernels "${figure:-$(tail -n 1 "$STEP_OUT" | cut -c1-70)}"

# 11. small and tiny steps: the GPU against minicnn's own CPU path (and PyTorch)
run_step bench-small 80 "$PYTHON" benchmarks/bench_gpu.py --cases small,tiny --steps 5 \
    --cpu-steps 2 --no-channels-last --timeout 60 --json "$OUT/bench_small.json"
record bench-small "see table"

# final tables: the steps, then the issue's targets
{
    echo
    printf '%-16s %-11s %8s  %s\n' step status seconds "key figure"
    printf '%s\n' "${ROWS[@]}"
    echo
    "$PYTHON" benchmarks/bench_gpu.py --summary "$OUT" 2>&1
    echo "total $(($(date +%s) - START)) s; $FAILED step(s) failed; logs in $OUT"
} | tee "$SUMMARY" | tee -a "$LOG"
rm -f "$OUT"/.step_*.out
((FAILED == 0))
