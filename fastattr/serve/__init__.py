"""`fastattr serve`: Grad-CAM and saliency maps over HTTP, on Ray Serve, with dynamic batching.

The package: `http` (requests read and checked, answers encoded), `batching` (a batch in at most two passes),
`app` (the Ray Serve deployment and its arguments) and `command` (`fastattr serve`).

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

Batching is exact: requests that arrive within `batch_wait_ms` of a batch's first (up to `max_batch_size`, at most
`sample_batch` when SmoothGrad, IG or a perturbation method is served: `batch_size`) run as
one batch, in at most two passes, one for the top-k requests (at the largest k among them: a top-k list is a
prefix of a longer one) and one for those naming classes (each row padded to the longest by repeating its last
class), and each answer is what `fastattr.Explainer` returns for that image alone: the same classes,
probabilities within 1e-5 and maps within float rounding, so maps=array bytes differ by at most one step
(1/255). The backend, chosen at start-up, is the eager `Explainer`, the compiled one (`compile=True`: every
pass runs at k = max_k, so that few graphs compile, all at start-up) or an ONNX export (`onnx=FILE`, run in
onnxruntime: its k, input size and methods are the file's, and naming classes needs an export made with
`--with-classes`); any backend of `fastattr.pipeline` serves (`backend=pt2` too).
"""

from .app import DEFAULTS, DEPLOYMENT, SERVER_OPTIONS, ExplainService, app, app_options
from .batching import Answer, Query, answer_batch, batch_size
from .command import add_arguments, run
from .http import RequestError, load_image, parse_query, read_request, to_json

__all__ = ["ExplainService", "app", "app_options", "add_arguments", "run", "answer_batch", "batch_size", "parse_query",
           "load_image", "read_request", "to_json", "Answer", "Query", "RequestError", "DEFAULTS", "DEPLOYMENT", "SERVER_OPTIONS"]
