"""HTTP for the server: a request read and checked (before any batching), and an answer encoded as JSON.

>>> query = parse_query({"k": "3", "maps": "array"}, pipeline, max_k=5)       # doctest: +SKIP
Query(k=3, classes=None, methods=('gradcam', 'saliency'), maps='array')
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import images as _images, overlay, targets
from ..pipeline import Pipeline
from ..errors import InputError, TargetError
from .batching import Answer, Query

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["RequestError", "Query", "parse_query", "load_image", "read_request", "read_body", "to_json", "MAP_FORMATS", "PARAMS"]

MAP_FORMATS = ("png", "array", "none")
PARAMS = ("k", "classes", "methods", "maps")
FORM_OVERHEAD = 64 * 1024  # bytes a multipart body may hold beyond its image: boundaries, headers, the options


class RequestError(Exception):
    """A request the server refuses: answered with `status` and `{"error": message}`, before any batching."""

    def __init__(self, status: int, message: str, allow: str = "POST"):
        super().__init__(message)
        self.status, self.message, self.allow = status, message, allow  # allow: the methods a 405 names


def _max_k_hint(pipeline: Pipeline, max_k: int) -> str:
    if pipeline.fixed_k is not None and max_k >= pipeline.fixed_k:
        return f"its export was written for k={pipeline.fixed_k}; export again with a larger --k for more"
    return "start it with a larger --max-k (max_k) for more"


def parse_query(params: Mapping[str, str], pipeline: Pipeline, max_k: int) -> Query:
    """Check a request's options (query parameters or form fields, as strings) against what `pipeline` computes
    and the server's `max_k`; raise RequestError(400). Named classes are checked by `fastattr.targets`, as every
    caller's are.

    >>> parse_query({"k": "3", "maps": "array"}, pipeline, max_k=5)          # doctest: +SKIP
    Query(k=3, classes=None, methods=('gradcam', 'saliency'), maps='array')
    """
    if unknown := sorted(set(params) - set(PARAMS)):
        raise RequestError(400, f"unknown option {unknown[0]!r}; valid: {', '.join(PARAMS)}")
    limit = f"this server explains 1..{max_k} classes per request ({_max_k_hint(pipeline, max_k)})"
    if "k" in params and "classes" in params:
        raise RequestError(400, "k and classes: pass k for the top-k classes or classes to name them, not both")
    classes = None
    if "classes" in params:
        try:
            classes = tuple(int(c) for c in params["classes"].split(","))
        except ValueError:
            raise RequestError(400, f"classes: expected comma-separated class indices such as 281,285, got "
                                    f"{params['classes']!r}") from None
        try:
            targets.resolve(list(classes), None, 1, pipeline.num_classes, torch.device("cpu"))
        except TargetError as exc:
            raise RequestError(400, str(exc)) from None
        if len(classes) > max_k:
            raise RequestError(400, f"classes: {len(classes)} given, but {limit}; split the request")
        if not pipeline.takes_classes:
            raise RequestError(400, f"classes: this server's export picks the top-{pipeline.fixed_k} classes "
                                    "itself; ask for k, or serve an export made with --with-classes")
        k = len(classes)
    else:
        text = params.get("k", "1")
        try:
            k = int(text)
        except ValueError:
            raise RequestError(400, f"k: expected an integer in 1..{max_k}, got {text!r}") from None
        if not 1 <= k <= max_k:
            raise RequestError(400, f"k: {k} is out of range; {limit}")
    methods = tuple(dict.fromkeys(m.strip() for m in params.get("methods", "").split(",") if m.strip()))
    if unknown := [m for m in methods if m not in pipeline.methods]:
        raise RequestError(400, f"methods: unknown method {unknown[0]!r}; this server computes "
                                f"{', '.join(pipeline.methods)}")
    maps = params.get("maps", "png")
    if maps not in MAP_FORMATS:
        raise RequestError(400, f"maps: expected one of {', '.join(MAP_FORMATS)}, got {maps!r}")
    return Query(k, classes, methods or pipeline.methods, maps)


def load_image(data: bytes, size: int, max_bytes: int, max_pixels: int) -> Tensor:
    """An uploaded image file as `[3, size, size]` in [0, 1] (`fastattr.images.decode`); RequestError(400) for data
    that is not a readable image (whatever its decoder raised, with its reason), RequestError(413) for one over
    `max_bytes` or `max_pixels`. The work is bounded by the input size and `max_pixels`, whatever the aspect ratio."""
    if not data:
        raise RequestError(400, "image: the request has no image; send the file as the body or as the multipart "
                                "file field 'image'")
    if len(data) > max_bytes:
        raise RequestError(413, _too_many_bytes(len(data), max_bytes))
    _check_pixels(data, max_pixels)
    try:
        return _images.decode(data, size)
    except InputError as exc:
        raise RequestError(400, str(exc)) from None


def _check_pixels(data: bytes, max_pixels: int) -> None:
    """RequestError(413) for an image whose header declares over `max_pixels`, read without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as exc:  # over Pillow's own limit: its message gives the size
        raise RequestError(413, f"image: {str(exc).rstrip('.')}; this server takes at most {max_pixels} pixels "
                                "(max_pixels); resize it first") from None
    except Exception:  # noqa: BLE001 - the decoder, run next, says what is wrong with it
        return
    if width * height > max_pixels:
        raise RequestError(413, f"image: {width}x{height} is {width * height} pixels, over this server's limit of "
                                f"{max_pixels} (max_pixels); resize it first")


def _too_many_bytes(n: int, max_bytes: int) -> str:
    return (f"image: {n} bytes, over this server's limit of {max_bytes} (max_bytes); send a smaller file "
            "(resize or recompress it) or start the server with a larger --max-bytes")


async def read_body(request: Request, limit: int, max_bytes: int) -> bytes:
    """The body of a request, refused with 413 past `limit` bytes (the message names `max_bytes`)."""
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
        return await read_body(request, max_bytes, max_bytes), params
    body = await read_body(request, max_bytes + FORM_OVERHEAD, max_bytes)

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


def _png(image: Tensor) -> str:
    buffer = io.BytesIO()
    overlay.to_pil(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _array(map_: Tensor) -> dict:
    pixels = torch.round(map_.clamp(0, 1) * 255).to(torch.uint8).contiguous()
    return {"shape": list(map_.shape), "dtype": "uint8", "data": base64.b64encode(pixels.numpy().tobytes()).decode()}


def to_json(answer: Answer, image: Tensor, query: Query, names: Sequence[str] | None, task: str = "classify") -> dict:
    """The JSON answer to one request (see the module's docstring)."""
    classes = answer.classes.tolist()
    result = {"classes": classes, "names": [names[c] if names else f"class {c}" for c in classes]}
    if task == "classify":  # logits: the softmax says how sure; another target's scores are read as they are
        result["probabilities"] = answer.logits.softmax(-1)[answer.classes].tolist()
    else:
        result["scores"] = answer.logits[answer.classes].tolist()
    if query.maps == "png":
        result["maps"] = {m: [_png(o) for o in overlay.blend(image[None], v[None])[0]] for m, v in answer.maps.items()}
    elif query.maps == "array":
        result["maps"] = {m: [_array(one) for one in v] for m, v in answer.maps.items()}
    result["batch_size"] = answer.batch_size
    return result
