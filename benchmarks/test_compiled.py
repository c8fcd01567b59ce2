"""Compiled against eager, each beside the same backend's plain inference (issue 3).

Goals on CPU, target at `layer4`: compiled fused top-5 Grad-CAM >= 0.9x compiled plain inference, and
faster than eager plain inference. The first call (compile) is timed apart and kept in extra_info as
`first_call_s`; the rounds measure steady state. In smoke mode the compiled cases use the "eager"
backend, which exercises the same fullgraph capture without inductor's compile time.
"""

import functools
import time

import pytest
import torch

import fastattr
from harness import FULL, SIZE, images, model, run

MODELS = ("resnet18", "resnet50") if FULL else ("resnet18",)
BATCHES = (1, 16) if FULL else (2,)
BACKEND = "inductor" if FULL else "eager"
CASES = ["eager-inference", "compiled-inference", "eager-gradcam-top5", "compiled-gradcam-top5",
         "eager-saliency", "compiled-saliency"]


@functools.cache
def compiled_model(name: str):
    return torch.compile(model(name), fullgraph=True, backend=BACKEND)


@functools.cache
def explainer(name: str, method: str, compiled: bool):
    layer = "layer4" if method == "gradcam" else None
    return fastattr.Explainer(model(name), layer=layer, methods=(method,),
                              compile={"backend": BACKEND} if compiled else False)


def target(name: str, case: str, x: torch.Tensor):
    compiled = case.startswith("compiled")
    if case.endswith("inference"):
        net = compiled_model(name) if compiled else model(name)

        def infer():
            with torch.inference_mode():
                return net(x)
        return infer
    if "gradcam" in case:
        e = explainer(name, "gradcam", compiled)
        return lambda: e(x, k=5)
    e = explainer(name, "saliency", compiled)
    return lambda: e(x)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", CASES)
def test_compiled_vs_eager(benchmark, rep, name, batch, case):
    x = images(batch)
    fn = target(name, case, x)
    start = time.perf_counter()
    fn()  # the first call compiles (for this shape); steady state is what the rounds time
    first_call_s = time.perf_counter() - start
    if rep == 0:
        benchmark.extra_info["first_call_s"] = first_call_s
    run(benchmark, fn, batch, group=f"compiled vs eager, {name} batch {batch}", model=name, case=case,
        backend=BACKEND, size=SIZE)
