"""The benchmark matrix: model x method x batch x backend x device, beside the floors and the peers.

Each group is one (model and target layer, method, K, batch, device); its cases run in the same rounds,
interleaved rep by rep (conftest.py), so the ratios within a group are what to read:

- fastattr on each backend: `fastattr-eager`, `fastattr-compiled` (torch.compile), `fastattr-onnxruntime`;
- the article's code (`article`, one image and one class per call, on 1 or 2 images of the batch);
- the peers a user would pick, K classes as K calls as their docs show: `captum` (LayerGradCam, or
  Saliency) and `pytorch-grad-cam` (GradCAM); skipped when the `bench` extra is not installed;
- the floors: plain inference under `inference_mode` on each backend (`eager-inference`,
  `compiled-inference`, `onnxruntime-inference`; the limit for Grad-CAM) and, for saliency, a bare forward
  plus one backward to the input (`forward-backward-to-input`).

Compiles and exports happen outside the timed rounds (`first_call_s`, `export_s` in extra_info). CUDA
cases synchronise the device before the clock is read, and are skipped without a GPU.

    FASTATTR_BENCH=full FASTATTR_BENCH_REPS=2 FASTATTR_BENCH_ROUNDS=1 .venv/bin/python -m pytest \
        benchmarks/test_matrix.py -k cpu --benchmark-json=benchmarks/results/cpu-matrix.json
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import tempfile
import time
from pathlib import Path

import pytest
import torch

import fastattr
from baselines import (article_gradcam, article_saliency, captum_layer_gradcam, captum_saliency,
                       forward_backward_to_input, grad_cam_package, plain_inference)
from harness import COMPILE_BACKEND, FULL, SIZE, first_call, images, model, run

# Benchmarks run one at a time, in one process (a figure is worthless beside another run), and are slow.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

TARGETS = ([("resnet18", "layer4"), ("resnet50", "layer4"), ("resnet50", "layer3")] if FULL
           else [("resnet18", "layer4")])
# The smoke run (the test suite's) keeps one k per method: each ONNX row is an export of its own.
METHODS = ([("gradcam", 1), ("gradcam", 5), ("saliency", 1), ("saliency", 5)] if FULL
           else [("gradcam", 5), ("saliency", 1)])
BATCHES = (1, 16) if FULL else (2,)
DEVICES = ("cpu", "cuda")
FASTATTR = ("fastattr-eager", "fastattr-compiled", "fastattr-onnxruntime")
FLOORS = ("eager-inference", "compiled-inference", "onnxruntime-inference")
CASES = (*FASTATTR, "article", "captum", "pytorch-grad-cam", *FLOORS, "forward-backward-to-input")
FOLDER = Path(tempfile.gettempdir()) / "fastattr-bench-matrix"
EXPORT_SECONDS: dict[tuple, float] = {}


def groups():
    for name, layer in TARGETS:
        for method, k in METHODS:
            if method == "saliency" and layer != "layer4":
                continue  # saliency has no target layer: the layer3 rows would repeat the layer4 ones
            yield name, layer, method, k


def _skip_unless(device: str, case: str, method: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if case == "pytorch-grad-cam" and method != "gradcam":
        pytest.skip("pytorch-grad-cam has no vanilla-gradient saliency")
    if case == "forward-backward-to-input" and method != "saliency":
        pytest.skip("the saliency floor")
    peer = {"captum": "captum", "pytorch-grad-cam": "pytorch_grad_cam"}.get(case)
    if peer and importlib.util.find_spec(peer) is None:
        pytest.skip(f"{peer} is not installed (the bench extra)")
    if "onnxruntime" in case and _providers(device) is None:
        pytest.skip(f"onnxruntime has no provider for {device}")


def _providers(device: str) -> list[str] | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    return [wanted] if wanted in ort.get_available_providers() else None


@functools.cache
def net(name: str, device: str) -> torch.nn.Module:
    return copy.deepcopy(model(name)).to(device) if device != "cpu" else model(name)  # .to moves in place


@functools.cache
def batch(n: int, device: str) -> torch.Tensor:
    return images(n).to(device)


@functools.cache
def explainer(name: str, layer: str, method: str, compiled: bool, device: str) -> fastattr.Explainer:
    return fastattr.Explainer(net(name, device), layer=layer if method == "gradcam" else None, methods=(method,),
                              compile={"backend": COMPILE_BACKEND} if compiled else False)


@functools.cache
def onnx_session(name: str, layer: str, method: str, k: int, device: str):
    import onnxruntime as ort

    FOLDER.mkdir(exist_ok=True)
    path = FOLDER / f"{name}-{layer}-{method}-k{k}-{SIZE}.onnx"
    start = time.perf_counter()
    if method == "inference":
        batch_dim = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model(name), (images(3),), str(path), dynamo=True, opset_version=18,
                          input_names=["images"], dynamic_shapes=({0: batch_dim},))
    else:
        fastattr.export_onnx(model(name), path, layer=layer if method == "gradcam" else None, methods=(method,),
                             k=k, input_shape=(3, SIZE, SIZE))
    EXPORT_SECONDS[(name, layer, method, k)] = time.perf_counter() - start
    return ort.InferenceSession(str(path), providers=_providers(device))


@functools.cache
def compiled_net(name: str, device: str):
    return torch.compile(net(name, device), fullgraph=True, backend=COMPILE_BACKEND)


def case_fn(case: str, name: str, layer: str, method: str, k: int, x: torch.Tensor):
    """(the callable to time, the images it explains per call)."""
    device = x.device.type
    m = net(name, device)
    if case.startswith("fastattr-") and case != "fastattr-onnxruntime":
        e = explainer(name, layer, method, case == "fastattr-compiled", device)
        return (lambda: e(x, k=k)), len(x)
    if case in ("fastattr-onnxruntime", "onnxruntime-inference"):
        key = (name, layer, method, k) if case == "fastattr-onnxruntime" else (name, "", "inference", 0)
        session = onnx_session(*key, device)
        feed = {"images": x.cpu().numpy()}
        return (lambda: session.run(None, feed)), len(x)
    if case == "eager-inference":
        return (lambda: plain_inference(m, x)), len(x)
    if case == "compiled-inference":
        c = compiled_net(name, device)
        return (lambda: plain_inference(c, x)), len(x)
    if case == "forward-backward-to-input":
        return (lambda: forward_backward_to_input(m, x)), len(x)
    if case == "article":
        # One image and one class per call: its throughput does not depend on the batch, so two images do.
        xs = x[:2]
        fn = (lambda: article_gradcam(m, m.get_submodule(layer), xs, k)) if method == "gradcam" else (
            lambda: article_saliency(m, xs, k))
        return fn, len(xs)
    if case == "captum":
        fn = (lambda: captum_layer_gradcam(m, m.get_submodule(layer), x, k)) if method == "gradcam" else (
            lambda: captum_saliency(m, x, k))
        return fn, len(x)
    raise ValueError(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("name,layer,method,k", list(groups()), ids=lambda v: str(v))
@pytest.mark.parametrize("case", CASES)
def test_matrix(benchmark, rep, case, name, layer, method, k, n, device):
    _skip_unless(device, case, method)
    x = batch(n, device)
    info = dict(group=f"{name} {layer if method == 'gradcam' else 'input'} {method} top-{k}, batch {n}, {device}",
                model=name, layer=layer, method=method, k=k, case=case, device=device)
    if case == "pytorch-grad-cam":
        from pytorch_grad_cam import GradCAM

        m = net(name, device)
        with GradCAM(m, target_layers=[m.get_submodule(layer)]) as cam:  # its hooks live for this case only
            fn = functools.partial(grad_cam_package, cam, m, x, k)
            first_call(benchmark, fn, rep)
            run(benchmark, fn, n, warmup_rounds=0, **info)
        return
    fn, images_per_call = case_fn(case, name, layer, method, k, x)
    if device == "cuda":
        timed = fn
        fn = lambda: (timed(), torch.cuda.synchronize())  # noqa: E731 - kernels are async: time their end
    key = (name, layer, method, k) if case == "fastattr-onnxruntime" else (name, "", "inference", 0)
    exported = {"export_s": EXPORT_SECONDS[key]} if "onnxruntime" in case else {}
    first_call(benchmark, fn, rep, **exported)  # the warm-up: compiles, builds sessions, fills caches
    run(benchmark, fn, images_per_call, warmup_rounds=0, **info)
