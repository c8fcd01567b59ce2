"""The Open Inference Protocol (KServe's V2, spoken by Triton and MLServer) over HTTP: its paths, tensors and errors.

    GET  /v2                      server metadata          GET /v2/health/live, /v2/health/ready
    GET  /v2/models/fastattr      model metadata           GET /v2/models/fastattr/ready
    POST /v2/models/fastattr/infer

An infer request holds one input, `images`: BYTES `[N]`, each element an encoded image file (PNG, JPEG, ...),
decoded and resized as `POST /explain` does; or FP32 `[N, 3, S, S]`, images already normalised as the model
expects, at the server's input size S. Its `parameters` may hold `k` (the top-k, default 1), `classes` (class
indices, a list or "281,285") and `methods` ("gradcam,saliency"). The outputs are `logits` FP32 `[N, C]`,
`classes` INT64 `[N, K]` and one FP32 `[N, K, S, S]` map per method, named after it. Tensors travel as JSON
`data` or, with the protocol's binary tensor extension (`Inference-Header-Content-Length`; what tritonclient
sends), as raw little-endian bytes after the JSON header; BYTES elements are each a 4-byte little-endian length
and the bytes. In JSON, where the protocol's BYTES are text, an image file is a base64 string (as MLServer's
`content_type: base64`). The protocol's own parameters (`binary_data_output`, `priority`, `timeout`, sequence
ids) are read or passed over. Errors are `{"error": message}` with a 4xx status.

>>> header, binary = split_body(body, request.headers.get("inference-header-content-length"))   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..pipeline import Pipeline
from .batching import Answer, Query
from .http import RequestError, load_image, parse_query

__all__ = ["MODEL", "VERSION", "Infer", "split_body", "parse_infer", "checked", "metadata", "server_metadata",
           "stacked", "encode_outputs"]

MODEL, VERSION = "fastattr", "1"
DATATYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}
HEADER = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Infer:
    """A checked infer request: the images as batch items (normalised images when `normalized`, else display
    images in [0, 1]), the query they share, and how each output is sent."""

    id: str | None
    items: list[tuple[Tensor, Query]]
    outputs: list[str]
    binary: dict[str, bool]


def server_metadata() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("fastattr")
    except PackageNotFoundError:  # run from a source tree without installing
        release = "unknown"
    return {"name": "fastattr", "version": release, "extensions": ["binary_tensor_data"]}


def metadata(pipeline: Pipeline, max_k: int) -> dict:
    """The model's V2 metadata: its inputs (the images, as encoded files or normalised FP32) and outputs."""
    s, c = pipeline.input_size, pipeline.num_classes
    return {"name": MODEL, "versions": [VERSION], "platform": "fastattr",
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1],
                        "parameters": {"or": f"FP32 [-1, 3, {s}, {s}], normalised images"}}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, c]},
                        {"name": "classes", "datatype": "INT64", "shape": [-1, -1]},
                        *({"name": m, "datatype": "FP32", "shape": [-1, -1, s, s]} for m in pipeline.methods)],
            "parameters": {"k": f"1..{max_k}, the top-k classes (default 1)", "classes": "class indices to explain",
                           "methods": f"any of {','.join(pipeline.methods)}"}}


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header of an infer request and the binary tensor data after it (empty without the extension)."""
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise RequestError(400, f"{HEADER}: {header_length!r} is not a length within the body's {len(body)} bytes")
        cut = int(header_length)
    else:
        cut = len(body)
    try:
        header = json.loads(body[:cut])
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"infer: the request is not JSON ({exc}); send {{\"inputs\": [...]}}") from None
    if not isinstance(header, dict):
        raise RequestError(400, "infer: the request must be a JSON object with \"inputs\"")
    return header, body[cut:]


def parse_infer(header: dict, binary: bytes, pipeline: Pipeline, max_k: int, max_bytes: int,
                max_pixels: int) -> Infer:
    """Check an infer request (its JSON header and binary tensor data) against what `pipeline` computes and the
    server's limits; raise RequestError (400, or 413 for an image over the limits) naming the problem, before any
    batching."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, "inputs: expected one input, 'images' (BYTES [N] encoded image files, or FP32 "
                                "[N, 3, S, S] normalised images)")
    tensor = inputs[0]
    parameters = _parameters(header, "the request")
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    size = _parameters(tensor, "images").get("binary_data_size")
    if size is not None and (type(size) is not int or not 0 <= size <= len(binary)):
        raise RequestError(400, f"images: binary_data_size must be a byte count within the {len(binary)} binary "
                                f"bytes sent, got {size!r}")
    if size is not None and size != len(binary):
        raise RequestError(400, f"images: binary_data_size is {size}, but {len(binary)} binary bytes follow the header")
    _check_shape(shape)
    if datatype == "BYTES":
        values = _bytes_elements(binary) if size is not None else _base64_elements(tensor.get("data"))
    elif datatype == "FP32":
        values = _fp32(binary if size is not None else None, tensor.get("data"), shape)
    else:
        values = None
    requested = header.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise RequestError(400, "outputs: expected a list of {\"name\": ...}")
        requested = [(o.get("name"), _parameters(o, f"output {o.get('name')!r}").get("binary_data")) for o in requested]
    return checked(header.get("id"), tensor.get("name"), datatype, shape, values, parameters, requested, pipeline,
                   max_k, max_bytes, max_pixels)


def checked(request_id: str | None, name: Any, datatype: Any, shape: list[int], values: Any,
            parameters: Mapping[str, Any], requested: list[tuple[Any, Any]] | None, pipeline: Pipeline, max_k: int,
            max_bytes: int, max_pixels: int) -> Infer:
    """An infer request's input (`values`: the encoded files of a BYTES tensor, or the FP32 images `[N, 3, S, S]`),
    parameters and requested outputs ((name, binary_data or None)), as decoded from HTTP here or by KServe's
    server, checked; raise RequestError naming the problem."""
    if name != "images":
        raise RequestError(400, f"inputs: the input is named {name!r}; name it 'images'")
    query = parse_query(_query_params(parameters), pipeline, max_k)
    _check_shape(shape)
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise RequestError(400, f"images: BYTES images have shape [N] (one encoded file each), got {shape}")
        if len(values) != shape[0]:
            raise RequestError(400, f"images: shape {shape} says {shape[0]} images, got {len(values)}")
        items = [(load_image(f, pipeline.input_size, max_bytes, max_pixels), query) for f in values]
    elif datatype == "FP32":
        s = pipeline.input_size
        if len(shape) != 4 or shape[1:] != [3, s, s]:
            raise RequestError(400, f"images: FP32 images must be [N, 3, {s}, {s}] (normalised, at this server's "
                                    f"input size), got {shape}")
        if not bool(torch.isfinite(values).all()):
            raise RequestError(400, "images: the FP32 images hold NaN or Inf values")
        normalized = Query(query.k, query.classes, query.methods, query.maps, normalized=True)
        items = [(image, normalized) for image in values]
    else:
        raise RequestError(400, f"images: datatype {datatype!r}; send BYTES (encoded image files) or FP32 "
                                "(normalised images)")
    if not items:
        raise RequestError(400, "images: the request holds no image")
    names = ["logits", "classes", *query.methods]
    every_binary = _flag(parameters, "binary_data_output", False)
    if requested is None:
        return Infer(request_id, items, names, {name: every_binary for name in names})
    unknown = [n for n, _ in requested if n not in names]
    if unknown:
        raise RequestError(400, f"outputs: unknown output {unknown[0]!r}; this request gives {', '.join(names)}")
    return Infer(request_id, items, [n for n, _ in requested],
                 {n: _flag({"binary_data": b} if b is not None else {}, "binary_data", every_binary)
                  for n, b in requested})


def _check_shape(shape: Any) -> None:
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(400, f"images: shape must be a list of sizes, got {shape!r}")


def _parameters(holder: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise RequestError(400, f"parameters of {what}: expected an object such as {{\"k\": 3}}, got "
                                f"{type(parameters).__name__}")
    return parameters


def _flag(parameters: Mapping[str, Any], name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(400, f"{name}: expected true or false, got {value!r}")
    return value


# The protocol's own request parameters, which say how to run or send the request, not what to explain.
PROTOCOL_PARAMETERS = ("binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                       "headers")


def _query_params(parameters: Mapping[str, Any]) -> dict[str, str]:
    # The request's parameters as the strings parse_query reads (its checks and messages are the /explain ones).
    params = {}
    for name, value in parameters.items():
        if name in PROTOCOL_PARAMETERS:
            continue
        if name in ("classes", "methods") and isinstance(value, list):
            value = ",".join(map(str, value))
        params[name] = str(value)
    return {**params, "maps": "none"}


def _bytes_elements(data: bytes) -> list[bytes]:
    # The binary tensor extension's BYTES: each element a 4-byte little-endian length, then its bytes.
    elements, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise RequestError(400, "images: the BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", data, at)
        if at + 4 + length > len(data):
            raise RequestError(400, f"images: a BYTES element says {length} bytes, but {len(data) - at - 4} follow")
        elements.append(data[at + 4:at + 4 + length])
        at += 4 + length
    return elements


def _base64_elements(data: Any) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise RequestError(400, "images: BYTES data in JSON must be a list of base64 strings, one image file each "
                                "(or send it with the binary tensor extension)")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except ValueError:
        raise RequestError(400, "images: a BYTES element is not base64; send each image file base64-encoded") from None


def _fp32(data: bytes | None, values: Any, shape: list[int]) -> Tensor:
    count = math.prod(shape)  # Python's exact product: numpy's wraps around on a crafted shape
    if data is not None:
        if len(data) != 4 * count:
            raise RequestError(400, f"images: shape {shape} needs {4 * count} bytes of FP32, got {len(data)}")
        return torch.from_numpy(np.frombuffer(data, dtype=DATATYPES["FP32"]).astype(np.float32).reshape(shape))
    try:
        array = np.asarray(values) if isinstance(values, list) else None
    except ValueError:  # ragged lists
        array = None
    # numpy reads numeric strings and bools as numbers when asked for floats: only integer or float data passes
    if array is None or array.dtype.kind not in "iuf" or array.size != count:
        raise RequestError(400, f"images: data must be {count} numbers for shape {shape}")
    return torch.from_numpy(array.astype(np.float32).reshape(shape))


def stacked(answers: Sequence[Answer], methods: Sequence[str]) -> dict[str, np.ndarray]:
    """The outputs of an infer request, one row per image, from its images' answers."""
    return {"logits": torch.stack([a.logits for a in answers]).float().numpy(),
            "classes": torch.stack([a.classes for a in answers]).long().numpy(),
            **{m: torch.stack([a.maps[m] for a in answers]).float().numpy() for m in methods}}


def encode_outputs(request: Infer, values: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The infer response's body and headers: JSON data, or the binary tensor extension for the outputs asked so."""
    outputs, blobs = [], []
    for name in request.outputs:
        array = values[name]
        datatype = "INT64" if array.dtype.kind == "i" else "FP32"
        out = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.binary[name]:
            blob = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array.reshape(-1).tolist()
        outputs.append(out)
    response = {"model_name": MODEL, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}

