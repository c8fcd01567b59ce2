"""The Ray Serve application: one "fastattr" deployment, built from its arguments through `fastattr.pipeline`.

    serve run fastattr.serve:app model=resnet50 weights=resnet50.pth max_batch_size=16
    serve deploy serve_config.yaml

The arguments are a `Spec`'s (model, weights, layer, methods, onnx, compile, device, backend, input_size,
samples, noise, steps, sample_batch, trusted) and the server's own (`SERVER_OPTIONS`); `DEFAULTS` has them all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import zoo
from ..pipeline import Pipeline, build, check_trusted, task_of
from ..errors import FastattrError, InputError
from ..options import convert, spec_from_args, spec_options
from .batching import Answer, Query, answer_batch, batch_size
from . import v2
from .http import RequestError, load_image, parse_query, read_body, read_request, to_json

if TYPE_CHECKING:
    from ray.serve import Application
    from starlette.requests import Request
    from starlette.responses import JSONResponse

__all__ = ["ExplainService", "app", "app_options", "DEFAULTS", "DEPLOYMENT", "SERVER_OPTIONS"]

log = logging.getLogger("fastattr.serve")

DEPLOYMENT = "fastattr"


@dataclass(frozen=True)
class Option:
    """A server argument: its default, how a string (from `serve run`) or YAML value converts, its least value."""

    default: Any
    convert: Callable[[Any], Any]
    at_least: float | None
    help: str


# The server's own arguments, declared once: `fastattr serve` makes its options from this table.
SERVER_OPTIONS: dict[str, Option] = {
    "max_k": Option(5, int, 1, "most classes one request may ask for (default: 5)"),
    "max_batch_size": Option(16, int, 1, "most requests explained in one batch (default: 16; at most --sample-batch "
                                         "when smoothgrad, ig or a perturbation method is served)"),
    "batch_wait_ms": Option(10.0, float, 0, "how long a batch waits for more requests after its first (default: 10)"),
    "max_bytes": Option(10_000_000, int, 1, "largest image file accepted, in bytes (default: 10000000); larger ones "
                                            "get 413"),
    "max_pixels": Option(40_000_000, int, 1, "largest image accepted, in pixels (default: 40000000); larger ones get 413"),
    "num_cpus": Option(1.0, float, 0, "each replica's Ray CPU reservation"),
}
# The app's arguments: a spec's (`fastattr.options.spec_options`: None is the spec's default, or an export's own),
# then the server's.
DEFAULTS: dict[str, Any] = {**{name: option["default"] for name, option in spec_options().items()},
                            **{name: o.default for name, o in SERVER_OPTIONS.items()}}


class ExplainService:
    """The Ray Serve deployment (named "fastattr"): builds the pipeline once, then answers `POST /explain`.

    Args: a spec's (model, weights, layer, methods, onnx, compile, device, backend, input_size, samples, noise,
    steps, sample_batch, trusted; see `fastattr.build.Spec`), then max_k, max_batch_size and batch_wait_ms (the dynamic batching: a
    batch runs when it is full or when its first request has waited this long; at most sample_batch requests
    when sampled or perturbed methods are served, `batching.batch_size`), max_bytes and max_pixels
    (larger images are answered 413).

    >>> handle = serve.run(serve.deployment(ExplainService).bind(model="resnet18", max_batch_size=8))  # doctest: +SKIP
    """

    def __init__(self, max_k: int = 5, max_batch_size: int = 16, batch_wait_ms: float = 10.0,
                 max_bytes: int = 10_000_000, max_pixels: int = 40_000_000, **spec_options: Any):
        from ray import serve

        spec = spec_from_args(spec_options)
        if spec.threshold is not None:
            raise InputError("threshold: a request to this server asks for its k or its classes; explain every class "
                             "above a threshold with fastattr explain, or the API's k=fastattr.targets.Above(t)")
        if task_of(spec) == "detect" and spec.k is None:  # a detector's outputs are its top-k detections: max_k of them
            spec = replace(spec, k=max_k)
        self.pipeline = build(spec)
        p = self.pipeline
        if not 1 <= max_k <= p.num_classes:
            raise InputError(f"max_k: {max_k} is not in 1..{p.num_classes} ({p.description} has {p.num_classes} outputs)")
        self.max_k = min(max_k, p.fixed_k or max_k)
        # A compiled pipeline runs every pass at max_k, so that few graphs compile, and all at start-up.
        self.fixed_k = self.max_k if p.backend == "compiled" else None
        if p.backend == "compiled":
            p.warmup(k=self.max_k)
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        size = batch_size(p, max_batch_size)
        # @serve.batch applied per instance, so that the batch size and wait are start-up options.
        self.explain_batch = serve.batch(max_batch_size=size,
                                         batch_wait_timeout_s=batch_wait_ms / 1000)(self._explain_batch)
        self.settings = {"backend": p.backend, "model": _shown_model(p), "methods": list(p.methods), "layer": p.layer,
                         "max_k": self.max_k,
                         "num_classes": p.num_classes, "input_size": p.input_size, "named_classes": p.takes_classes,
                         "max_batch_size": size, "batch_wait_ms": batch_wait_ms, "max_bytes": max_bytes,
                         "max_pixels": max_pixels, "torch_threads": torch.get_num_threads()}
        if size < max_batch_size:  # a client reading the settings learns why its batches are smaller than asked
            self.settings["max_batch_size_asked"] = max_batch_size
            self.settings["max_batch_size_why"] = (f"at most sample_batch ({p.sample_batch}): the methods served "
                                                   "multiply each image, in chunks of that many images")
        log.info("fastattr: serving %s", self.settings)

    async def _explain_batch(self, items: list[tuple[Tensor, Query]]) -> list[Answer]:
        return await asyncio.to_thread(answer_batch, self.pipeline, items, self.fixed_k)

    async def __call__(self, request: Request) -> JSONResponse:
        from starlette.responses import JSONResponse

        try:
            path = request.scope["path"].removeprefix(request.scope.get("root_path", "")).rstrip("/")
            if path == "" and request.method in ("GET", "HEAD"):
                return JSONResponse(self.settings)
            if path == "/v2" or path.startswith("/v2/"):
                return await self._v2(request, path)
            if path != "/explain":
                raise RequestError(404, f"no endpoint {request.scope['path']!r}; POST an image to /explain, or GET "
                                        "/ for the server's settings")
            if request.method != "POST":
                raise RequestError(405, f"/explain takes POST (the image as the body), not {request.method}")
            data, params = await read_request(request, self.max_bytes)
            query = parse_query(params, self.pipeline, self.max_k)
            image = await asyncio.to_thread(load_image, data, self.pipeline.input_size, self.max_bytes,
                                            self.max_pixels)
            answer = await self.explain_batch((image, query))
            if answer.error is not None:
                raise RequestError(422, answer.error)
            return JSONResponse(await asyncio.to_thread(to_json, answer, image, query, self.pipeline.names,
                                                        self.pipeline.task))
        except RequestError as exc:
            headers = {"Allow": exc.allow} if exc.status == 405 else None
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


    async def _v2(self, request: Request, path: str):
        """The Open Inference Protocol's paths (`fastattr.serve.v2`): health, metadata and infer."""
        from starlette.responses import JSONResponse, Response

        model = f"/v2/models/{v2.MODEL}"
        reads = {"/v2": lambda: v2.server_metadata(), "/v2/health/live": lambda: {"live": True},
                 "/v2/health/ready": lambda: {"ready": True}, model: lambda: v2.metadata(self.pipeline, self.max_k),
                 f"{model}/versions/{v2.VERSION}": lambda: v2.metadata(self.pipeline, self.max_k),
                 f"{model}/ready": lambda: {"name": v2.MODEL, "ready": True},
                 f"{model}/versions/{v2.VERSION}/ready": lambda: {"name": v2.MODEL, "ready": True}}
        if path in reads:
            if request.method not in ("GET", "HEAD"):
                raise RequestError(405, f"{path} takes GET, not {request.method}", allow="GET, HEAD")
            return JSONResponse(reads[path]())
        if path not in (f"{model}/infer", f"{model}/versions/{v2.VERSION}/infer"):
            raise RequestError(404, f"no endpoint {path!r}; this server's model is {v2.MODEL!r}: GET {model} for its "
                                    f"metadata, POST {model}/infer")
        if request.method != "POST":
            raise RequestError(405, f"{path} takes POST, not {request.method}")
        body = await read_body(request, self.max_bytes + V2_OVERHEAD, self.max_bytes)
        header, binary = v2.split_body(body, request.headers.get(v2.HEADER.lower()))
        infer = await asyncio.to_thread(v2.parse_infer, header, binary, self.pipeline, self.max_k, self.max_bytes,
                                        self.max_pixels)
        answers = await asyncio.gather(*(self.explain_batch(item) for item in infer.items))
        if refused := [f"image {i}: {a.error}" for i, a in enumerate(answers) if a.error is not None]:
            raise RequestError(422, "; ".join(refused))
        content, headers = await asyncio.to_thread(v2.encode_outputs, infer,
                                                   v2.stacked(answers, infer.items[0][1].methods))
        return Response(content, headers=headers)


# Bytes an infer request may hold beyond max_bytes of image data: its JSON header and the elements' lengths.
V2_OVERHEAD = 64 * 1024


def _shown_model(pipeline: Pipeline) -> str:
    """The model as `GET /` shows it: a model name, or an export file's base name, which keeps where the server
    keeps its files from its clients."""
    file = pipeline.spec.export_file
    return pipeline.description if file is None else file.name


def app_options(args: Mapping[str, Any]) -> dict[str, Any]:
    """`DEFAULTS` updated with `args` (strings from `serve run`, or YAML values), converted and checked;
    raises ValueError naming the bad argument, or the spec's own error."""
    if unknown := sorted(set(args) - set(DEFAULTS)):
        raise ValueError(f"app: unknown argument {unknown[0]!r}; valid: {', '.join(DEFAULTS)}")
    options = dict(DEFAULTS)
    for name, value in args.items():
        option = SERVER_OPTIONS.get(name)
        try:
            options[name] = option.convert(value) if option else convert(name, value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"app: {name}={value!r}: {exc}") from None
        if option and options[name] < option.at_least:
            raise ValueError(f"app: {name}={value!r}: must be at least {option.at_least}")
    try:
        spec = spec_from_args(options)  # the spec checks its own options, before any replica starts
        check_trusted(spec)
    except FastattrError as exc:
        raise ValueError(f"app: {exc}") from None
    if spec.export_file is None:
        zoo.check_name(spec.model)
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
