#!/usr/bin/env bash
# The CUDA half of the benchmark matrix, in one go, on a machine with a GPU (under 8 minutes).
#
#     bash scripts/cuda_bench.sh            # from the repository root; writes benchmarks/results/cuda-*.json
#
# It needs only what a bare GPU machine has: python with torch (>= 2.11), torchvision, pytest-benchmark and,
# for the onnxruntime cases, onnxruntime with the CUDA provider. fastattr runs from the source tree
# (PYTHONPATH), nothing is installed; what is missing (captum, pytorch-grad-cam, onnxruntime's CUDA
# provider) is skipped by the suite. Part 1 is every eager, article and peer case with its floors; part 2
# the compiled cases and part 3 the onnxruntime cases of resnet50's top-5 Grad-CAM at layer4, whose compiles
# and exports take most of the time. Each part has its own time limit and results file, so a slow compile
# cannot lose part 1's figures.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FASTATTR_BENCH=full
mkdir -p benchmarks/results
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
run() {  # NAME LIMIT_S -k EXPRESSION
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_matrix.py "$@" \
    --benchmark-json="benchmarks/results/$name.json" --benchmark-columns=median,rounds
  echo "$name: exit $?"
}
run cuda-matrix 200 -k "cuda and not compiled and not onnxruntime"
run cuda-matrix-compiled 150 -k "cuda and compiled and resnet50 and layer4 and gradcam-5"
run cuda-matrix-onnxruntime 100 -k "cuda and onnxruntime and resnet50 and layer4 and gradcam-5"
