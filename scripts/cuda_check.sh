#!/usr/bin/env bash
# What a machine with a GPU checks, in one go (under 9 minutes on one H200 with 16 cores):
#
#     bash scripts/cuda_check.sh [RESULTS_DIR]   # from anywhere; default benchmarks/results
#
# 1. tests/test_cuda.py (the CUDA paths against the CPU reference) and, beside it, the CPU suite less its
#    slowest exports under this machine's torch (GPU machines have an older torch than the set-up pins);
# 2. benchmarks/test_compiled.py on CUDA: eager, compiled and CUDA graphs (mode="reduce-overhead"), each
#    beside the same backend's plain inference -> cuda-compiled.json;
# 3. scripts/half_precision.py on CUDA -> half-precision-cuda.md.
# It needs only what a bare GPU machine has (torch >= 2.11, torchvision, pytest, pytest-benchmark,
# pytest-xdist, onnxruntime): fastattr runs from the source tree, nothing is installed. Each step has its
# own time limit; the benchmarks skip the cases that would start past theirs, so the JSON is written.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=$(realpath -m "${1:-benchmarks/results}")
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, torchvision; assert torch.cuda.is_available(), 'no CUDA device'
print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader 2>/dev/null
limited() {  # SECONDS COMMAND...: run it, interrupted (as Ctrl-C) after SECONDS
  local seconds=$1; shift
  timeout -s INT -k 20 "$seconds" "$@"
  local status=$?
  echo "[exit $status, limit ${seconds}s: $2 $3 $4]"
}

OMP_NUM_THREADS=2 limited 200 "$PY" -m pytest -q -p no:cacheprovider -n 6 tests \
  -k "not cuda and not densenet121 and not convnext_tiny and not efficientnet_b0" > "$RESULTS/cpu-tests.log" 2>&1 &
limited 200 "$PY" -m pytest -q -p no:cacheprovider -rA tests/test_cuda.py tests/test_overlay.py -k cuda 2>&1 \
  | tee "$RESULTS/cuda-tests.log" | grep -v "^PASSED"
wait
echo "--- CPU suite under $("$PY" -c 'import torch; print(torch.__version__)'):"
tail -25 "$RESULTS/cpu-tests.log"

FASTATTR_BENCH=full FASTATTR_BENCH_DEVICE=cuda FASTATTR_BENCH_REPS=${REPS:-2} FASTATTR_BENCH_ROUNDS=${ROUNDS:-20} \
  FASTATTR_BENCH_DEADLINE=$(($(date +%s) + 200)) limited 270 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_compiled.py \
  --benchmark-json="$RESULTS/cuda-compiled.json" --benchmark-columns=median,rounds --benchmark-group-by=group \
  > "$RESULTS/cuda-compiled.log" 2>&1
tail -5 "$RESULTS/cuda-compiled.log"
[ -s "$RESULTS/cuda-compiled.json" ] && "$PY" scripts/bench_table.py "$RESULTS/cuda-compiled.json"

limited 50 "$PY" scripts/half_precision.py --device cuda --compiled -o "$RESULTS/half-precision-cuda.md" \
  > "$RESULTS/half-precision-cuda.log" 2>&1
cat "$RESULTS/half-precision-cuda.md" 2>/dev/null || tail -20 "$RESULTS/half-precision-cuda.log"
