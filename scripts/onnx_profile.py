"""Where onnxruntime spends a call: per-operator time of ONNX files, from onnxruntime's own profiler.

    .venv/bin/python scripts/onnx_profile.py plain.onnx resnet18-gradcam.onnx --batch 16 [--runs 20] [--threads 2]

Each file gets random float32 images `[batch, *its input's shape]` on input "images", a warm-up call, then
`--runs` profiled calls; prints the total kernel time per call and the slowest operator types.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(path: Path, batch: int, runs: int, threads: int) -> tuple[float, collections.Counter]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / path.stem)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else batch for d in session.get_inputs()[0].shape]
    feed = {"images": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    # The warm-up call is profiled too: spread over runs + 1 calls.
    return sum(per_op.values()) / (runs + 1) / 1000, collections.Counter(
        {op: us / (runs + 1) / 1000 for op, us in per_op.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    for path in args.files:
        total, per_op = profile(path, args.batch, args.runs, args.threads)
        print(f"{path.name}: {total:.2f} ms a call (batch {args.batch})")
        for op, ms in per_op.most_common(args.top):
            print(f"  {op:<20} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
