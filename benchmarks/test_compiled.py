"""Compiled against eager, each beside the same backend's plain inference (issue 3).

Goals on CPU, target at `layer4`: compiled fused top-5 Grad-CAM >= 0.9x compiled plain inference, and
faster than eager plain inference. The first call (compile) is timed apart and kept in extra_info as
`first_call_s`; the rounds measure steady state. In smoke mode the compiled cases use the "eager"
backend, which exercises the same fullgraph capture without inductor's compile time.

Both weight layouts run: at batch 1 on this CPU, compiled inference of a contiguous model measured
1.02-1.08x eager, and slower in a quick check (inductor converts the weights to channels-last on every
call), so the goals are read per layout, each case against the same model's inference.

With FASTATTR_BENCH_DEVICE=cuda the cases run on the GPU (weights as built), and a third backend joins:
`cudagraphs`, inductor with `mode="reduce-overhead"`, which replays CUDA graphs (scripts/cuda_check.sh).
"""

import os

import pytest

from harness import COMPILE_BACKEND, FULL, SIZE, first_call, images, run, torch_case

# Benchmarks run one at a time, in one process (a figure is worthless beside another run), and are slow.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

DEVICE = os.environ.get("FASTATTR_BENCH_DEVICE", "cpu")
ON = "" if DEVICE == "cpu" else f" {DEVICE}"  # group names, as the CPU results files have them

MODELS = ("resnet18", "resnet50") if FULL else ("resnet18",)
BATCHES = (1, 16) if FULL else (2,)
LAYOUTS = ("contiguous",) if DEVICE == "cuda" else ("contiguous", "channels_last") if FULL else ("channels_last",)
BACKENDS = ("eager", "compiled", "cudagraphs") if DEVICE == "cuda" else ("eager", "compiled")
CASES = [f"{backend}-{what}" for what in ("inference", "gradcam", "saliency") for backend in BACKENDS]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", CASES)
def test_compiled_vs_eager(benchmark, rep, name, batch, layout, case):
    backend, what = case.split("-")
    fn = torch_case(name, backend, what, images(batch).to(DEVICE), layout)
    first_call(benchmark, fn, rep)
    run(benchmark, fn, batch, group=f"compiled vs eager, {name} batch {batch} {layout}{ON}", model=name,
        case=case + ("-top5" if what == "gradcam" else ""), backend=COMPILE_BACKEND, size=SIZE, layout=layout,
        device=DEVICE)
