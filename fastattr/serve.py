"""`fastattr serve`: Grad-CAM and saliency maps over HTTP, on Ray Serve, with dynamic batching.

    fastattr serve [--model efficientnet_lite0] [--onnx FILE] [--compile] [--port 8000] [--max-batch-size 16]
    serve run fastattr.serve:app model=resnet50 weights=resnet50.pth max_batch_size=16   # on a Ray cluster
    serve deploy serve_config.yaml                                                      # the same, from a file

Needs the `serve` extra: `pip install 'fastattr[serve]'` (Ray Serve and python-multipart).

Endpoints:

    POST /explain   the image file as the body (raw bytes, any content type but multipart), or as the file field
                    "image" of a multipart/form-data form; options as query parameters or form fields:
                      k=3              explain the top-k classes (1..max_k; default 1), or
                      classes=281,285  explain these classes (at most max_k, each in 0..num_classes-1)
                      methods=gradcam  the maps to return, comma-separated (default: all the server computes)
                      maps=png         png: base64 PNG overlays of each map on the input image (resized and
                                       centre-cropped to the input size); array: each map as base64 uint8
                                       round(map * 255), row-major, with its shape; none: no maps (default png)
    GET  /          the server's settings: backend, model, methods, max_k, num_classes, input size and limits

    $ curl --data-binary @cat.jpg 'localhost:8000/explain?k=3&maps=array'
    $ curl -F image=@cat.jpg -F classes=281,285 localhost:8000/explain

An answer (200):

    {"classes": [281, 285], "names": ["tabby", "Egyptian cat"], "probabilities": [0.61, 0.22],
     "maps": {"gradcam": ["iVBORw0KG...", "iVBORw0KG..."], ...},        # maps=png: one PNG per class
     "batch_size": 4}                                                   # the batch this request ran in

with maps=array each map is {"shape": [H, W], "dtype": "uint8", "data": "<base64>"}. probabilities are the
softmax of the logits, at those classes. Errors are {"error": "what was wrong and how to fix it"}: 400 for data
that is not a readable image (or is truncated) and for a bad option, 413 for an image over max_bytes or
max_pixels, 404 and 405 for another path or HTTP method. A bad request never reaches a batch, so it cannot
affect the others.

Batching is exact: requests that arrive within `batch_wait_ms` of a batch's first (up to `max_batch_size`) run as
one batch, in at most two passes, one for the top-k requests (at the largest k among them: a top-k list is a
prefix of a longer one) and one for those naming classes (each row padded to the longest by repeating its last
class), and each answer is what `fastattr.Explainer` returns for that image alone: the same classes,
probabilities within 1e-5 and maps within float rounding, so maps=array bytes differ by at most one step
(1/255). The backend, chosen at start-up, is the eager `Explainer`, the compiled one (`compile=True`: every
pass runs at k = max_k, so that few graphs compile, all at start-up) or an ONNX export (`onnx=FILE`, run in
onnxruntime: its k, input size and methods are the file's, and naming classes needs an export made with
`--with-classes`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import images as _images, methods as _methods, overlay, zoo
from .errors import FastattrError, InputError
from .explain import SAMPLING, Explainer, Explanation

if TYPE_CHECKING:
    from ray.serve import Application
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = ["ExplainService", "app", "app_options", "add_arguments", "run", "build_backend", "explain_batch", "parse_spec",
           "load_image", "Backend", "Spec", "RequestError", "DEFAULTS", "DEPLOYMENT"]

log = logging.getLogger("fastattr.serve")

DEPLOYMENT = "fastattr"
DEFAULT_METHODS = ("gradcam", "saliency")
MAP_FORMATS = ("png", "array", "none")
PARAMS = ("k", "classes", "methods", "maps")
FORM_OVERHEAD = 64 * 1024  # bytes a multipart body may hold beyond its image: boundaries, headers, the options

# The application's arguments (`app(args)`, `serve run fastattr.serve:app NAME=VALUE`, a config file's `args:`),
# with their defaults. All but num_cpus go to `ExplainService`; num_cpus is each replica's Ray CPU reservation.
DEFAULTS: dict[str, Any] = {
    "model": zoo.PRETRAINED, "weights": None, "layer": None, "methods": None, "onnx": None, "compile": False,
    "device": "cpu", "input_size": None, "max_k": 5, "max_batch_size": 16, "batch_wait_ms": 10.0,
    "max_bytes": 10_000_000, "max_pixels": 40_000_000, "num_cpus": 1.0,
    **dict.fromkeys(SAMPLING),  # None: the Explainer's default, or an ONNX export's own
}


class RequestError(Exception):
    """A request the server refuses: answered with `status` and `{"error": message}`, before any batching."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- The backend: the eager, compiled or ONNX explainer, chosen at start-up ------------------------------------


@dataclass(frozen=True)
class Backend:
    """One way to run the attribution: `run(images [N, 3, S, S] normalised, classes [N, k] or None, k)` returns
    an `Explanation` on the CPU. `fixed_k`: the k every pass runs with (None: the batch's largest)."""

    kind: str                      # "eager", "compiled" or "onnx"
    description: str               # the model name or the ONNX file, for messages and GET /
    run: Callable[[Tensor, Tensor | None, int], Explanation]
    methods: tuple[str, ...]
    num_classes: int
    input_size: int
    max_k: int
    fixed_k: int | None
    takes_classes: bool            # False for an ONNX export without --with-classes


def _on_cpu(out: Explanation) -> Explanation:
    return Explanation(out.logits.detach().float().cpu(), out.classes.detach().cpu(),
                       {m: v.detach().float().cpu() for m, v in out.maps.items()}, out.layer)


def build_backend(model: str = zoo.PRETRAINED, weights: str | None = None, layer: str | None = None,
                  methods: Sequence[str] | None = None, onnx: str | None = None, compile: bool = False,
                  device: str = "cpu", input_size: int | None = None, max_k: int = 5,
                  method_options: Mapping[str, Any] | None = None) -> Backend:
    """Load the model (or the ONNX export) once and check it runs at the input size. `method_options`
    (`samples`, `noise`, `steps`; None: the default) go to the `Explainer`; an ONNX export has its own, fixed at
    export, and refuses others.

    >>> backend = build_backend("resnet18", methods=("gradcam",), input_size=64)   # doctest: +SKIP
    >>> backend.run(images, None, 3).maps["gradcam"].shape                        # [N, 3, 64, 64]  # doctest: +SKIP
    """
    given = {name: value for name, value in (method_options or {}).items() if value is not None}
    if onnx is not None:
        return _onnx_backend(onnx, methods, compile, input_size, max_k, given)
    size = 224 if input_size is None else input_size
    net = zoo.load_model(model, weights).to(device)
    explainer = Explainer(net, layer=layer or zoo.default_layer(model, net), methods=methods or DEFAULT_METHODS,
                          compile=compile, **given)
    with torch.inference_mode():
        num_classes = int(net(torch.zeros(1, 3, size, size, device=device)).shape[1])
    if not 1 <= max_k <= num_classes:
        raise InputError(f"max_k: {max_k} is not in 1..{num_classes} ({model} has {num_classes} outputs)")

    def run(images: Tensor, classes: Tensor | None, k: int) -> Explanation:
        return _on_cpu(explainer.run(images.to(device), None if classes is None else classes.to(device), k))

    if compile:  # compile every graph a request can need now (N = 1 and N >= 2, top-k and named classes)
        for n in (1, 2):
            images = torch.zeros(n, 3, size, size, device=device)
            run(images, None, max_k)
            run(images, torch.zeros(n, max_k, dtype=torch.long), max_k)
    return Backend("compiled" if compile else "eager", model, run, explainer.methods, num_classes, size, max_k,
                   max_k if compile else None, True)


def _onnx_backend(path: str, methods: Sequence[str] | None, compile: bool, input_size: int | None,
                  max_k: int, method_options: Mapping[str, Any]) -> Backend:
    from .export import OnnxExplainer, refuse_other_sampling

    if compile:
        raise InputError("compile: applies to the torch backends; an ONNX export runs in onnxruntime, drop one")
    onnx = OnnxExplainer(path)
    refuse_other_sampling(onnx.meta, path, method_options)
    size = onnx.meta["input_shape"][-1]
    if input_size is not None and input_size != size:
        raise InputError(f"input_size {input_size}: {path} was exported for {size}x{size}; drop input_size or "
                         "export again with --input-size")
    chosen = _methods.resolve(methods) if methods else onnx.methods
    if missing := [m for m in chosen if m not in onnx.methods]:
        raise InputError(f"methods: {path} computes {', '.join(onnx.methods)}, not {', '.join(missing)}; export "
                         "again with --methods to add them")
    with_classes, dtype = onnx.meta["with_classes"], getattr(torch, onnx.meta["dtype"])

    def run(images: Tensor, classes: Tensor | None, k: int) -> Explanation:
        images = images.to(dtype)
        if classes is None and with_classes:  # the export takes classes only: find the top-k first
            probe = onnx(images, torch.zeros(len(images), onnx.k, dtype=torch.long))
            classes = probe.logits.topk(onnx.k, dim=1).indices
        return _on_cpu(onnx(images, classes))

    return Backend("onnx", str(path), run, chosen, onnx.meta["num_classes"], size, min(max_k, onnx.k), onnx.k,
                   with_classes)


# -- Requests: parsed and checked one by one, before batching --------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What one request asks for: the top-`k` (classes None) or the named `classes` (k = their count)."""

    k: int
    classes: tuple[int, ...] | None
    methods: tuple[str, ...]
    maps: str


def _max_k_hint(backend: Backend) -> str:
    if backend.kind == "onnx" and backend.max_k == backend.fixed_k:
        return f"its ONNX export was written for k={backend.fixed_k}; export again with a larger --k for more"
    return "start it with a larger --max-k (max_k) for more"


def parse_spec(params: Mapping[str, str], backend: Backend) -> Spec:
    """Check a request's options (query parameters or form fields, as strings); raise RequestError(400).

    >>> parse_spec({"k": "3", "maps": "array"}, backend)          # doctest: +SKIP
    Spec(k=3, classes=None, methods=('gradcam', 'saliency'), maps='array')
    """
    if unknown := sorted(set(params) - set(PARAMS)):
        raise RequestError(400, f"unknown option {unknown[0]!r}; valid: {', '.join(PARAMS)}")
    limit = f"this server explains 1..{backend.max_k} classes per request ({_max_k_hint(backend)})"
    if "k" in params and "classes" in params:
        raise RequestError(400, "k and classes: pass k for the top-k classes or classes to name them, not both")
    classes = None
    if "classes" in params:
        try:
            classes = tuple(int(c) for c in params["classes"].split(","))
        except ValueError:
            raise RequestError(400, f"classes: expected comma-separated class indices such as 281,285, got "
                                    f"{params['classes']!r}") from None
        if bad := [c for c in classes if not 0 <= c < backend.num_classes]:
            raise RequestError(400, f"classes: {bad[0]} is out of range for a model with {backend.num_classes} "
                                    f"outputs (valid 0..{backend.num_classes - 1})")
        if len(classes) > backend.max_k:
            raise RequestError(400, f"classes: {len(classes)} given, but {limit}; split the request")
        if not backend.takes_classes:
            raise RequestError(400, f"classes: this server's ONNX export picks the top-{backend.fixed_k} classes "
                                    "itself; ask for k, or serve an export made with --with-classes")
        k = len(classes)
    else:
        text = params.get("k", "1")
        try:
            k = int(text)
        except ValueError:
            raise RequestError(400, f"k: expected an integer in 1..{backend.max_k}, got {text!r}") from None
        if not 1 <= k <= backend.max_k:
            raise RequestError(400, f"k: {k} is out of range; {limit}")
    methods = tuple(dict.fromkeys(m.strip() for m in params.get("methods", "").split(",") if m.strip()))
    if unknown := [m for m in methods if m not in backend.methods]:
        raise RequestError(400, f"methods: unknown method {unknown[0]!r}; this server computes "
                                f"{', '.join(backend.methods)}")
    maps = params.get("maps", "png")
    if maps not in MAP_FORMATS:
        raise RequestError(400, f"maps: expected one of {', '.join(MAP_FORMATS)}, got {maps!r}")
    return Spec(k, classes, methods or backend.methods, maps)


def load_image(data: bytes, size: int, max_bytes: int, max_pixels: int) -> Tensor:
    """An uploaded image file as `[3, size, size]` in [0, 1] (`fastattr.images.decode`); RequestError(400) for data
    that is not a readable image, RequestError(413) for one over `max_bytes` or `max_pixels`."""
    from PIL import Image

    if not data:
        raise RequestError(400, "image: the request has no image; send the file as the body or as the multipart "
                                "file field 'image'")
    if len(data) > max_bytes:
        raise RequestError(413, _too_many_bytes(len(data), max_bytes))
    try:  # the header gives the size without decoding the pixels
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError:
        width = height = max_pixels + 1
    except Exception:  # noqa: BLE001 - decode below says what is wrong with it
        width = height = 0
    if width * height > max_pixels:
        raise RequestError(413, f"image: {width}x{height} is {width * height} pixels, over this server's limit of "
                                f"{max_pixels} (max_pixels); resize it first")
    try:
        return _images.decode(data, size)
    except InputError as exc:
        raise RequestError(400, str(exc)) from None


def _too_many_bytes(n: int, max_bytes: int) -> str:
    return (f"image: {n} bytes, over this server's limit of {max_bytes} (max_bytes); send a smaller file "
            "(resize or recompress it) or start the server with a larger --max-bytes")


async def _read_body(request: Request, limit: int, max_bytes: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, _too_many_bytes(int(length), max_bytes))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, _too_many_bytes(len(body), max_bytes))
    return bytes(body)


async def read_request(request: Request, max_bytes: int) -> tuple[bytes, dict[str, str]]:
    """(the image file's bytes, the options) of a POST: a raw body with options in the query, or a multipart form
    with the file field "image" and options in the query or in form fields."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    params = dict(request.query_params)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _read_body(request, max_bytes, max_bytes), params
    body = await _read_body(request, max_bytes + FORM_OVERHEAD, max_bytes)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=len(PARAMS))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the client's form
        raise RequestError(400, f"multipart form: cannot parse it ({getattr(exc, 'detail', None) or exc}); send "
                                "one file field 'image' and the options as fields or query parameters") from None
    data = None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "image":
                raise RequestError(400, f"multipart form: the file field is named {name!r}; name it 'image'")
            data = await value.read()
        elif name == "image":
            raise RequestError(400, "multipart form: 'image' is a text field; send the image as a file "
                                    "(curl -F image=@photo.jpg)")
        else:
            params[name] = value
    await form.close()
    if data is None:
        raise RequestError(400, "multipart form: no file field 'image'; send the image as one "
                                "(curl -F image=@photo.jpg)")
    return data, params


# -- Batches: at most two passes, then one answer per request --------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One request's share of a batch: its logits `[C]`, classes `[K]` and maps (method -> `[K, H, W]`)."""

    logits: Tensor
    classes: Tensor
    maps: dict[str, Tensor]
    batch_size: int


def explain_batch(backend: Backend, items: Sequence[tuple[Tensor, Spec]]) -> list[Answer]:
    """Explain a batch of checked requests (display image `[3, S, S]` in [0, 1], Spec) in at most two passes.

    >>> top3, dog = Spec(3, None, ("gradcam",), "png"), Spec(1, (207,), ("gradcam",), "png")   # doctest: +SKIP
    >>> [a.classes.tolist() for a in explain_batch(backend, [(cat, top3), (cat, dog)])]   # doctest: +SKIP
    [[281, 285, 282], [207]]
    """
    images = _images.normalize(torch.stack([image for image, _ in items]))
    answers: list[Answer | None] = [None] * len(items)
    for named in (False, True):
        rows = [i for i, (_, spec) in enumerate(items) if (spec.classes is not None) == named]
        if not rows:
            continue
        specs = [items[i][1] for i in rows]
        k = backend.fixed_k or max(spec.k for spec in specs)
        table = torch.tensor([[*s.classes, *s.classes[-1:] * (k - s.k)] for s in specs]) if named else None
        out = backend.run(images[rows], table, k)
        for j, (i, spec) in enumerate(zip(rows, specs)):
            answers[i] = Answer(out.logits[j], out.classes[j, :spec.k],
                                {m: out.maps[m][j, :spec.k] for m in spec.methods}, len(items))
    return answers  # type: ignore[return-value]


def _png(image: Tensor) -> str:
    buffer = io.BytesIO()
    overlay.to_pil(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _array(map_: Tensor) -> dict:
    pixels = torch.round(map_.clamp(0, 1) * 255).to(torch.uint8).contiguous()
    return {"shape": list(map_.shape), "dtype": "uint8", "data": base64.b64encode(pixels.numpy().tobytes()).decode()}


def to_json(answer: Answer, image: Tensor, spec: Spec, names: Sequence[str] | None) -> dict:
    """The JSON answer to one request (see the module's docstring)."""
    classes = answer.classes.tolist()
    result = {"classes": classes,
              "names": [names[c] if names else f"class {c}" for c in classes],
              "probabilities": answer.logits.softmax(-1)[answer.classes].tolist()}
    if spec.maps == "png":
        result["maps"] = {m: [_png(o) for o in overlay.blend(image[None], v[None])[0]] for m, v in answer.maps.items()}
    elif spec.maps == "array":
        result["maps"] = {m: [_array(one) for one in v] for m, v in answer.maps.items()}
    result["batch_size"] = answer.batch_size
    return result


# -- The deployment --------------------------------------------------------------------------------------------


class ExplainService:
    """The Ray Serve deployment (named "fastattr"): builds the explainer once, then answers `POST /explain`.

    Args: those of `build_backend` (model, weights, layer, methods, onnx, compile, device, input_size, max_k),
    samples, noise and steps (smoothgrad's and ig's, as `Explainer` takes them; None: its default, or an ONNX
    export's own, which refuses others), then max_batch_size and
    batch_wait_ms (the dynamic batching: a batch runs when it is full or when its first request has waited
    this long), max_bytes and max_pixels (larger images are answered 413).

    >>> handle = serve.run(serve.deployment(ExplainService).bind(model="resnet18", max_batch_size=8))  # doctest: +SKIP
    """

    def __init__(self, model: str = zoo.PRETRAINED, weights: str | None = None, layer: str | None = None,
                 methods: Sequence[str] | None = None, onnx: str | None = None, compile: bool = False,
                 device: str = "cpu", input_size: int | None = None, max_k: int = 5, max_batch_size: int = 16,
                 batch_wait_ms: float = 10.0, max_bytes: int = 10_000_000, max_pixels: int = 40_000_000,
                 samples: int | None = None, noise: float | None = None, steps: int | None = None):
        from ray import serve

        self.backend = build_backend(model, weights, layer, methods, onnx, compile, device, input_size, max_k,
                                     {"samples": samples, "noise": noise, "steps": steps})
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.names = zoo.imagenet_classes() if self.backend.num_classes == 1000 else None
        # @serve.batch applied per instance, so that the batch size and wait are start-up options.
        self.explain_batch = serve.batch(max_batch_size=max_batch_size,
                                         batch_wait_timeout_s=batch_wait_ms / 1000)(self._explain_batch)
        b = self.backend
        self.settings = {"backend": b.kind, "model": b.description, "methods": list(b.methods), "max_k": b.max_k,
                         "num_classes": b.num_classes, "input_size": b.input_size, "named_classes": b.takes_classes,
                         "max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms, "max_bytes": max_bytes,
                         "max_pixels": max_pixels, "torch_threads": torch.get_num_threads()}
        log.info("fastattr: serving %s", self.settings)

    async def _explain_batch(self, items: list[tuple[Tensor, Spec]]) -> list[Answer]:
        return await asyncio.to_thread(explain_batch, self.backend, items)

    async def __call__(self, request: Request) -> JSONResponse:
        from starlette.responses import JSONResponse

        try:
            path = request.scope["path"].removeprefix(request.scope.get("root_path", "")).rstrip("/")
            if path == "" and request.method in ("GET", "HEAD"):
                return JSONResponse(self.settings)
            if path != "/explain":
                raise RequestError(404, f"no endpoint {request.scope['path']!r}; POST an image to /explain, or GET "
                                        "/ for the server's settings")
            if request.method != "POST":
                raise RequestError(405, f"/explain takes POST (the image as the body), not {request.method}")
            data, params = await read_request(request, self.max_bytes)
            spec = parse_spec(params, self.backend)
            image = await asyncio.to_thread(load_image, data, self.backend.input_size, self.max_bytes,
                                            self.max_pixels)
            answer = await self.explain_batch((image, spec))
            return JSONResponse(await asyncio.to_thread(to_json, answer, image, spec, self.names))
        except RequestError as exc:
            headers = {"Allow": "POST"} if exc.status == 405 else None
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


# -- The application builder: `serve run fastattr.serve:app NAME=VALUE ...` and config files -------------------


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`convert`, reading None, "", "none" and "None" as not given (None)."""
    return lambda value: None if value in (None, "", "none", "None") else convert(value)


def _methods_list(value: Any) -> tuple[str, ...] | None:
    if value in (None, "", "none", "None"):
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    return _methods.resolve(tuple(n.strip() for n in names if n.strip()))


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "model": str, "weights": _optional(str), "layer": _optional(str), "methods": _methods_list, "onnx": _optional(str),
    "compile": _bool, "device": str, "input_size": _optional(int), "max_k": int, "max_batch_size": int,
    "batch_wait_ms": float, "max_bytes": int, "max_pixels": int, "num_cpus": float, "samples": _optional(int),
    "noise": _optional(float), "steps": _optional(int),
}
_AT_LEAST = {"input_size": 1, "max_k": 1, "max_batch_size": 1, "batch_wait_ms": 0, "max_bytes": 1, "max_pixels": 1,
             "num_cpus": 0, "samples": 1, "noise": 0, "steps": 1}


def app_options(args: Mapping[str, Any]) -> dict[str, Any]:
    """`DEFAULTS` updated with `args` (strings from `serve run`, or YAML values), converted and checked;
    raises ValueError naming the bad argument."""
    if unknown := sorted(set(args) - set(DEFAULTS)):
        raise ValueError(f"app: unknown argument {unknown[0]!r}; valid: {', '.join(DEFAULTS)}")
    options = dict(DEFAULTS)
    for name, value in args.items():
        try:
            options[name] = _CONVERT[name](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"app: {name}={value!r}: {exc}") from None
        low = _AT_LEAST.get(name)
        if low is not None and options[name] is not None and options[name] < low:
            raise ValueError(f"app: {name}={value!r}: must be at least {low}")
    if options["device"] not in ("cpu", "cuda"):
        raise ValueError(f"app: device={options['device']!r}: expected cpu or cuda")
    if options["onnx"] is None and options["model"] not in zoo.model_names():
        zoo.load_model(options["model"])  # raises naming the closest known models
    return options


def app(args: Mapping[str, Any] | None = None) -> Application:
    """The Ray Serve application: one "fastattr" deployment built from `args` (names and defaults: `DEFAULTS`).

    >>> serve.run(fastattr.serve.app({"model": "resnet18", "max_batch_size": 8}))   # doctest: +SKIP

    or `serve run fastattr.serve:app model=resnet18 max_batch_size=8`, or a config file's `args:`.
    """
    options = app_options(args or {})
    try:
        from ray import serve
    except ImportError:
        raise FastattrError("serve: needs Ray Serve; pip install 'fastattr[serve]'") from None
    num_cpus = options.pop("num_cpus")
    deployment = serve.deployment(
        ExplainService, name=DEPLOYMENT, max_ongoing_requests=max(32, 4 * options["max_batch_size"]),
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": 1 if options["device"] == "cuda" else 0})
    return deployment.bind(**options)


# -- `fastattr serve` ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` options to `parser` (the `fastattr serve` subcommand's parser)."""
    from . import cli

    parser.add_argument("--model", default=zoo.PRETRAINED,
                        help=f"{zoo.PRETRAINED} (pretrained, the default) or a torchvision model name")
    parser.add_argument("--weights", type=Path, metavar="FILE",
                        help="a state-dict file for a torchvision model (default: random weights)")
    parser.add_argument("--layer", help="target layer by module path (default: the model's last feature map)")
    parser.add_argument("--methods", metavar="LIST",
                        help=f"comma-separated method names (default: {','.join(DEFAULT_METHODS)}, or an ONNX "
                             "file's)")
    parser.add_argument("--onnx", type=Path, metavar="FILE",
                        help="serve a `fastattr export` ONNX file in onnxruntime instead of the torch model")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the attribution (compiles at start-up, which takes a while)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    parser.add_argument("--input-size", type=int, metavar="PIXELS",
                        help="images are resized and centre-cropped to this (default: 224, or an ONNX file's)")
    parser.add_argument("--max-k", type=int, default=DEFAULTS["max_k"],
                        help="most classes one request may ask for (default: 5)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULTS["max_batch_size"],
                        help="most requests explained in one batch (default: 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=DEFAULTS["batch_wait_ms"],
                        help="how long a batch waits for more requests after its first (default: 10)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULTS["max_bytes"],
                        help="largest image file accepted, in bytes (default: 10000000); larger ones get 413")
    parser.add_argument("--max-pixels", type=int, default=DEFAULTS["max_pixels"],
                        help="largest image accepted, in pixels (default: 40000000); larger ones get 413")
    cli._add_method_options(parser)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs for Ray and the model (default: all of this machine's)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000")


def run(args: argparse.Namespace) -> int:
    """Start Ray and the deployment on this machine and serve until Ctrl-C; 2 on a usage error, 1 if it fails."""
    from . import cli

    options = {name: getattr(args, name) for name in DEFAULTS}
    for name in ("weights", "onnx"):
        if options[name] is not None:
            if not options[name].is_file():
                return cli._usage_error(f"--{name} {options[name]}: no such file")
            options[name] = str(options[name].resolve())
    try:
        application = app(options)
    except (ValueError, FastattrError) as exc:
        return cli._usage_error(str(exc).removeprefix("app: "))
    import ray
    from ray import serve

    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name=DEPLOYMENT, route_prefix="/", blocking=False)
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        serve.shutdown()
        ray.shutdown()
        return 130
    except Exception as exc:  # noqa: BLE001 - the replica's error (a bad layer, say), reported as it is
        print(f"fastattr: error: the server did not start: {_why_not_started(exc)}", file=sys.stderr)
        ray.shutdown()
        return 1
    url = f"http://{args.host}:{args.port}"
    print(f"fastattr: serving at {url}/explain (POST an image; GET {url}/ for the settings); Ctrl-C stops",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill` and `docker stop` shut down cleanly too
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _why_not_started(exc: Exception) -> str:
    """The replica's own error (its traceback's last line), which Ray keeps in the deployment's status."""
    from ray import serve

    try:
        message = serve.status().applications[DEPLOYMENT].deployments[DEPLOYMENT].message
        last = [line for line in message.splitlines() if line.strip()][-1].strip()
    except Exception:  # noqa: BLE001 - no status to read: Ray's own message is all there is
        return str(exc)
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
