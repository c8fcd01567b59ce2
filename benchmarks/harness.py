"""Shared set-up for the benchmark suite: models with random weights, fixed inputs, throughput records.

Full run (this machine's figures in benchmarks/results/):
    FASTATTR_BENCH=full .venv/bin/python -m pytest benchmarks --benchmark-json=benchmarks/results/cpu-core.json
Without FASTATTR_BENCH=full the suite runs in smoke mode (resnet18, 64x64, batch 2, one round): that is
what the test command runs, so the suite cannot rot, and no figure from it is worth reading.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torchvision

FULL = os.environ.get("FASTATTR_BENCH") == "full"
SMOKE = not FULL
SIZE = 224 if FULL else 64
BATCH = 16 if FULL else 2
REPS = int(os.environ.get("FASTATTR_BENCH_REPS", 3 if FULL else 1))  # the matrix's full run uses 2 and 1
ROUNDS = int(os.environ.get("FASTATTR_BENCH_ROUNDS", 2 if FULL else 1))


@functools.cache
def model(name: str, layout: str = "contiguous", device: str = "cpu") -> torch.nn.Module:
    """Random weights, the same for every layout and device; "channels_last" converts the model's 4-D
    weights, which the user does (fastattr never changes a model)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)().eval().to(device)
    return net.to(memory_format=torch.channels_last) if layout == "channels_last" else net


@functools.cache
def images(n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def run(benchmark, fn, n_images: int, warmup_rounds: int = 1, **info) -> None:
    """Time `fn()` (after `warmup_rounds` calls outside the timer) and record images/s in extra_info."""
    benchmark.extra_info.update({"batch": n_images, "size": SIZE, "threads": torch.get_num_threads(),
                                 "device": "cpu", "torch": torch.__version__, **info})
    if benchmark.extra_info["device"] == "cuda":
        benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=warmup_rounds, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = n_images / benchmark.stats.stats.median


COMPILE_BACKEND = "inductor" if FULL else "eager"  # smoke mode: the same fullgraph capture, no inductor wait
# torch.compile's mode per torch backend: "cudagraphs" is inductor replaying CUDA graphs (CUDA only).
MODES = {"compiled": None, "cudagraphs": "reduce-overhead"}


@functools.cache
def compiled_model(name: str, layout: str = "contiguous", device: str = "cpu", mode: str | None = None):
    return torch.compile(model(name, layout, device), fullgraph=True, backend=COMPILE_BACKEND, mode=mode)


@functools.cache
def explainer(name: str, method: str, backend: str, layout: str = "contiguous", device: str = "cpu"):
    import fastattr

    compile = {"backend": COMPILE_BACKEND, "mode": MODES[backend]} if backend in MODES else False
    return fastattr.Explainer(model(name, layout, device), layer="layer4" if method == "gradcam" else None,
                              methods=(method,), compile=compile)


def torch_case(name: str, backend: str, what: str, x: torch.Tensor, layout: str = "contiguous"):
    """The callable for `what` ("inference", "gradcam" top-5 at layer4, "saliency" top-1) on torch
    `backend` ("eager", "compiled" or, on CUDA, "cudagraphs"), the model's weights in `layout`
    ("contiguous" or "channels_last") on the images' device. A CUDA case waits for its kernels to end."""
    device = x.device.type
    if what == "inference":
        net = (compiled_model(name, layout, device, MODES[backend]) if backend in MODES
               else model(name, layout, device))
        graphs = backend == "cudagraphs"

        def fn():
            # As the Explainer does with CUDA graphs: each call marked a new step, the output copied out of the
            # graph's memory, which the next replay overwrites. Without both, this case measured 75-2,429 images/s
            # on an H200, below eager in three of four cases.
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode():
                logits = net(x)
            return logits.clone() if graphs else logits
    else:
        e, k = explainer(name, what, backend, layout, device), (5 if what == "gradcam" else None)
        fn = lambda: e(x, k=k)  # noqa: E731
    if device != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize())


def first_call(benchmark, fn, rep: int, **extra) -> object:
    """Call `fn` once outside the timer (it compiles, for a compiled case) and record how long it took."""
    start = time.perf_counter()
    out = fn()
    if rep == 0:
        benchmark.extra_info.update(first_call_s=time.perf_counter() - start, **extra)
    return out
