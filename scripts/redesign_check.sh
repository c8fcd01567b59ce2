#!/usr/bin/env bash
# Old (a checkout of 8f2c74f at /tmp/base: git worktree add /tmp/base 8f2c74f) and new (this checkout) fastattr bench, interleaved round by round, same venv.
set -u
PY=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
OUT=${OUT:-$(cd "$(dirname "$0")/.." && pwd)/benchmarks/results/redesign-check}
mkdir -p "$OUT"
for round in 1 2 3; do
  for side in old new; do
    dir=/tmp/base; [ $side = new ] && dir=$(cd "$(dirname "$0")/.." && pwd)
    for backend in eager onnx; do
      (cd $dir && $PY -m fastattr bench --model resnet18 --methods gradcam --k 5 --batch-sizes 1,16 --backend $backend \
        --warmup 2 --iters 8 --no-progress --json "$OUT/$side-$backend-round$round.json" > /dev/null 2>&1) || echo "failed $side $backend $round"
    done
  done
done
