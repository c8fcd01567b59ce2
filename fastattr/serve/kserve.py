"""fastattr as a KServe model: KServe's V1 protocol (`:predict`, `:explain`) and the Open Inference Protocol (V2),
served by `kserve.ModelServer`, built from a spec as every front end is (`fastattr serve --kserve`).

    POST /v1/models/fastattr:predict   {"instances": [{"b64": "<image file>"}, ...], "parameters": {"k": 3}}
    POST /v1/models/fastattr:explain   the same, with the maps ("maps": "array" or "png" in the parameters)
    POST /v2/models/fastattr/infer     as the Ray Serve app's V2 (`fastattr.serve.v2`), but KServe's REST server
                                       decodes binary BYTES as UTF-8: image files go as base64 strings in JSON

Requests are checked before any batching (the /explain and V2 checks and messages) and refused with KServe's
`{"error": message}` and 400 (KServe has no other status for bad input: an image over the limits, or one a
detector finds too few detections in, is a 400 here); the images of all requests then share dynamic batches
(`Batcher`: at most `max_batch_size` images, or `sample_batch` for the methods that multiply each image,
waiting at most `batch_wait_ms` after the first), each answer exactly the Ray Serve app's. Needs the `kserve`
extra.

>>> start(FastattrModel(Spec("resnet50", "r50.pth")), "127.0.0.1", 8080)        # until stopped   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sys

import numpy as np
import torch

# kserve parses the process's command line when it is imported (its model server's defaults), and argparse's prefix
# matching can read another program's options as its own, or exit on them: it sees none of ours.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
finally:
    sys.argv = _argv

from ..errors import InputError
from ..pipeline import Spec, build, task_of
from . import v2
from .batching import Answer, Query, answer_batch, batch_size
from .http import RequestError, load_image, parse_query, to_json

__all__ = ["FastattrModel", "Batcher", "start"]


class Batcher:
    """Dynamic batching of checked items: the first item starts a batch, which runs when `max_batch_size` items
    have come or `batch_wait_ms` has passed, in a worker thread; each caller awaits its own answer. A caller that
    went away (its request cancelled) is left out; the batching task is kept, and made again if it ever ends."""

    def __init__(self, run, max_batch_size: int, batch_wait_ms: float):
        self.run, self.max_batch_size, self.wait = run, max_batch_size, batch_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def __call__(self, item: tuple[torch.Tensor, Query]) -> Answer:
        if self.queue is None:  # made on the server's event loop, at the first request
            self.queue = asyncio.Queue()
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._serve())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((item, done))
        return await done

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            batch = [(item, done) for item, done in batch if not done.done()]  # callers still waiting
            if not batch:
                continue
            try:
                answers = await asyncio.to_thread(self.run, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of this batch hears of it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), answer in zip(batch, answers, strict=True):
                if not done.done():
                    done.set_result(answer)


class FastattrModel(kserve.Model):
    """A KServe model explaining with `fastattr.build(spec)`: `predict` gives the classes, `explain` adds the maps
    (V1), and V2 infer requests get the logits, classes and maps as tensors. The options are the Ray Serve
    app's: `max_k` classes per request, dynamic batches of `max_batch_size` waiting `batch_wait_ms`, images over
    `max_bytes` or `max_pixels` refused."""

    def __init__(self, spec: Spec, name: str = v2.MODEL, max_k: int = 5, max_batch_size: int = 16,
                 batch_wait_ms: float = 10.0, max_bytes: int = 10_000_000, max_pixels: int = 40_000_000):
        super().__init__(name)
        if spec.threshold is not None:
            raise InputError("threshold: a request to this server asks for its k or its classes; explain every class "
                             "above a threshold with fastattr explain, or the API's k=fastattr.targets.Above(t)")
        if task_of(spec) == "detect" and spec.k is None:
            spec = replace(spec, k=max_k)
        self.pipeline = p = build(spec)
        if not 1 <= max_k <= p.num_classes:
            raise InputError(f"max_k: {max_k} is not in 1..{p.num_classes}")
        self.max_k = min(max_k, p.fixed_k or max_k)
        # As the Ray Serve app: a compiled pipeline runs every pass at max_k, its graphs all compiled at start-up.
        fixed_k = self.max_k if p.backend == "compiled" else None
        if p.backend == "compiled":
            p.warmup(k=self.max_k)
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        # As the Ray Serve app: at most sample_batch images a batch when the methods multiply each image.
        self.batch = Batcher(lambda items: answer_batch(p, items, fixed_k), batch_size(p, max_batch_size),
                             batch_wait_ms)
        self.ready = True

    def load(self) -> bool:
        return self.ready  # built in __init__: the pipeline is there before the server starts

    def get_input_types(self) -> list[dict]:
        """The V2 metadata's inputs, as the Ray Serve app gives them (`fastattr.serve.v2.metadata`)."""
        return v2.metadata(self.pipeline, self.max_k)["inputs"]

    def get_output_types(self) -> list[dict]:
        return v2.metadata(self.pipeline, self.max_k)["outputs"]

    async def predict(self, payload: dict | InferRequest, headers: dict | None = None) -> dict | InferResponse:
        if isinstance(payload, InferRequest):
            return await self._infer(payload)
        return await self._v1(payload, with_maps=False)

    async def explain(self, payload: dict, headers: dict | None = None) -> dict:
        return await self._v1(payload, with_maps=True)

    async def _v1(self, payload: Any, with_maps: bool) -> dict:
        try:
            if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list) \
                    or not payload["instances"]:
                raise RequestError(400, 'instances: expected {"instances": [{"b64": "<image file>"}, ...]}')
            parameters = payload.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise RequestError(400, "parameters: expected an object such as {\"k\": 3}")
            params = {n: ",".join(map(str, v)) if isinstance(v, list) else str(v) for n, v in parameters.items()}
            params["maps"] = params.get("maps", "array") if with_maps else "none"
            query = parse_query(params, self.pipeline, self.max_k)
            pictures = [await asyncio.to_thread(load_image, _image_bytes(instance), self.pipeline.input_size,
                                                self.max_bytes, self.max_pixels) for instance in payload["instances"]]
            answers = await asyncio.gather(*(self.batch((picture, query)) for picture in pictures))
            _refused(answers)
        except RequestError as exc:
            raise InvalidInput(exc.message) from None
        names, task = self.pipeline.names, self.pipeline.task
        return {"predictions": [await asyncio.to_thread(to_json, a, p, query, names, task)
                                for a, p in zip(answers, pictures)]}

    async def _infer(self, request: InferRequest) -> InferResponse:
        try:
            if len(request.inputs) != 1:
                raise RequestError(400, "inputs: expected one input, 'images'")
            tensor = request.inputs[0]
            values = _elements(tensor) if tensor.datatype == "BYTES" else \
                _fp32(tensor) if tensor.datatype == "FP32" else None
            requested = None if request.request_outputs is None else [
                (o.name, (o.parameters or {}).get("binary_data")) for o in request.request_outputs]
            infer = await asyncio.to_thread(v2.checked, request.id, tensor.name, tensor.datatype, list(tensor.shape),
                                            values, request.parameters or {}, requested, self.pipeline, self.max_k,
                                            self.max_bytes, self.max_pixels)
            answers = await asyncio.gather(*(self.batch(item) for item in infer.items))
            _refused(answers)
        except RequestError as exc:
            raise InvalidInput(exc.message) from None
        values = v2.stacked(answers, infer.items[0][1].methods)
        outputs = []
        for name in infer.outputs:
            output = InferOutput(name=name, shape=list(values[name].shape),
                                 datatype="INT64" if values[name].dtype.kind == "i" else "FP32")
            output.set_data_from_numpy(values[name], binary_data=infer.binary[name])
            outputs.append(output)
        return InferResponse(response_id=request.id or "", model_name=self.name, infer_outputs=outputs,
                             model_version=v2.VERSION)


def _refused(answers: Sequence[Answer]) -> None:
    if refused := [f"image {i}: {a.error}" for i, a in enumerate(answers) if a.error is not None]:
        raise RequestError(422, "; ".join(refused))


def _image_bytes(instance: Any) -> bytes:
    """An image file from a V1 instance: {"b64": ...}, {"image_bytes": {"b64": ...}} (TensorFlow Serving's form)
    or a base64 string."""
    if isinstance(instance, dict):
        instance = instance.get("image_bytes", instance)
        instance = instance.get("b64") if isinstance(instance, dict) else None
    if not isinstance(instance, str):
        raise RequestError(400, 'instances: each instance is an image file in base64: {"b64": "..."}')
    try:
        return base64.b64decode(instance, validate=True)
    except ValueError:
        raise RequestError(400, "instances: an instance is not base64; encode each image file in base64") from None


def _fp32(tensor) -> torch.Tensor:
    # KServe's own decoding of the data against the shape; numeric strings and bools are refused, as by v2.
    try:
        array = tensor.as_numpy()
    except (TypeError, ValueError) as exc:
        raise RequestError(400, f"images: the FP32 data does not fit shape {list(tensor.shape)} ({exc})") from None
    if array.dtype.kind not in "iuf":
        raise RequestError(400, f"images: data must be numbers for shape {list(tensor.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _elements(tensor) -> list[bytes]:
    # A BYTES tensor's elements: KServe's REST server gives JSON strings, read as base64 as v2 reads them (it decodes
    # binary-extension BYTES as UTF-8 before the model sees them, which an image file is not).
    try:
        values = tensor.as_numpy().reshape(-1)
    except (TypeError, ValueError) as exc:
        raise RequestError(400, f"images: the BYTES data does not fit shape {list(tensor.shape)} ({exc})") from None
    elements = []
    for value in values:
        if isinstance(value, bytes):
            elements.append(value)
            continue
        try:
            elements.append(base64.b64decode(str(value), validate=True))
        except ValueError:
            raise RequestError(400, "images: a BYTES element is not base64; send each image file base64-encoded") from None
    return elements


def start(model: FastattrModel, host: str, port: int) -> None:
    """Serve `model` with `kserve.ModelServer` on `host:port` (HTTP only, one worker) until it is stopped."""
    _ModelServer(host, http_port=port, enable_grpc=False, workers=1).start([model])


class _ModelServer(kserve.ModelServer):
    """`kserve.ModelServer` listening on `host`: KServe's REST server binds every interface, as a pod does; a
    machine's server should listen on loopback unless told otherwise, as `fastattr serve` does."""

    def __init__(self, host: str, **options: Any):
        super().__init__(**options)
        self.host = host

    def setup_event_loop(self):
        # Called by start() after it made the REST server's uvicorn config and before the server runs it (kserve
        # 0.21; pyproject's kserve extra requires it).
        super().setup_event_loop()
        config = getattr(self._rest_server, "config", None)
        if config is None:
            raise RuntimeError("fastattr serve --kserve: this kserve version keeps its REST server's address where "
                               "fastattr cannot set it; install the kserve version of fastattr's kserve extra")
        config.host = self.host
