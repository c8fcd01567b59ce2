"""onnxruntime (CPU provider) against torch eager and torch.compile, each beside its own plain inference.

Goals (ONNX issue), Grad-CAM top-5 at `layer4`: >= 0.9x onnxruntime's own plain inference and >= 1.5x
torch eager inference. Exports and compiles happen outside the timed rounds; `first_call_s` records the
first call (compile) and `export_s` the export of the ONNX file.
"""

import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import fastattr
from harness import FULL, SIZE, first_call, images, model, run, torch_case

# Benchmarks run one at a time, in one process (a figure is worthless beside another run), and are slow.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

MODELS = ("resnet18", "resnet50") if FULL else ("resnet18",)
BATCHES = (1, 16) if FULL else (2,)
FOLDER = Path(tempfile.gettempdir()) / "fastattr-bench-onnx"
CASES = [f"{backend}-{what}" for what in ("inference", "gradcam-top5", "saliency")
         for backend in ("eager", "compiled", "onnxruntime")]
EXPORT_SECONDS: dict[tuple, float] = {}


@functools.cache
def onnx_session(name: str, what: str) -> ort.InferenceSession:
    FOLDER.mkdir(exist_ok=True)
    path = FOLDER / f"{name}-{what}-{SIZE}.onnx"
    start = time.perf_counter()
    if what == "inference":
        x = images(3)
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model(name), (x,), str(path), dynamo=True, opset_version=18, input_names=["images"],
                          dynamic_shapes=({0: batch},))
    else:
        fastattr.export_onnx(model(name), path, layer="layer4" if what == "gradcam" else None, methods=(what,),
                             k=5 if what == "gradcam" else 1, input_shape=(3, SIZE, SIZE))
    EXPORT_SECONDS[(name, what)] = time.perf_counter() - start
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def target(name: str, case: str, x: torch.Tensor):
    backend, what = case.split("-", 1)
    what = what.removesuffix("-top5")
    if backend == "onnxruntime":
        session, feed = onnx_session(name, what), {"images": x.numpy()}
        return lambda: session.run(None, feed)
    return torch_case(name, backend, what, x)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", CASES)
def test_backends(benchmark, rep, name, batch, case):
    fn = target(name, case, images(batch))
    what = case.split("-", 1)[1].removesuffix("-top5")
    export = {"export_s": EXPORT_SECONDS.get((name, what))} if case.startswith("onnxruntime") else {}
    out = first_call(benchmark, fn, rep, **export)
    logits = out[0] if isinstance(out, list) else getattr(out, "logits", out)
    assert np.isfinite(np.asarray(logits)).all()
    run(benchmark, fn, batch, group=f"backends, {name} batch {batch}", model=name, case=case, size=SIZE)
