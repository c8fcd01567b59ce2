"""`fastattr serve`: the Ray Serve deployment over HTTP, on a small model (resnet18, random weights, 64x64)."""

import argparse
import base64
import io
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")
yaml = pytest.importorskip("yaml")
from PIL import Image  # noqa: E402

import fastattr  # noqa: E402
from fastattr import images, serve as fserve, zoo  # noqa: E402
from fastattr.pipeline import Spec, build  # noqa: E402

# Each of these starts Ray on this machine: one such module at a time, in one worker.
pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
SIZE = 64
MAX_BYTES = 700_000   # chelsea.png (241 kB) and coffee.png (467 kB) pass, astronaut.png (792 kB) does not
MAX_PIXELS = 500_000  # a 1000 x 1000 image does not


def photo(name: str) -> bytes:
    return (EXAMPLES / name).read_bytes()


@pytest.fixture(scope="module")
def direct(weights):
    """The explainer the server must agree with: the same model and weights, called on one image at a time."""
    model = zoo.load_model("resnet18", weights)
    explainer = fastattr.Explainer(model, layer=fastattr.default_layer(model), methods=("gradcam", "saliency"))

    def explain(name: str, k: int | None = None, classes: list[int] | None = None) -> fastattr.Explanation:
        image = images.normalize(images.read(EXAMPLES / name, SIZE)[None])
        return explainer(image, classes=classes, k=k)

    return explain


@pytest.fixture(scope="module")
def url(weights):
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(fserve.app({"model": "resnet18", "weights": str(weights), "input_size": SIZE, "max_batch_size": 8,
                              "batch_wait_ms": 100, "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS}),
                  route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, body: bytes, params: dict | None = None, multipart: bool = False) -> requests.Response:
    if multipart:
        return requests.post(f"{url}/explain", files={"image": ("photo.png", body, "image/png")}, data=params,
                             timeout=60)
    return requests.post(f"{url}/explain", data=body, params=params, headers={"Content-Type": "image/png"},
                         timeout=60)


def concurrently(calls: list) -> list[requests.Response]:
    """Run the calls on threads released together, so that the server sees them within one batch wait."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def one(i: int) -> None:
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def array(map_: dict) -> np.ndarray:
    assert map_["dtype"] == "uint8"
    return np.frombuffer(base64.b64decode(map_["data"]), dtype=np.uint8).reshape(map_["shape"])


@pytest.mark.slow  # a live server, or an ONNX export
def test_concurrent_requests_are_batched_and_each_equals_a_direct_call_on_its_image_alone(url, direct):
    cases = [  # (photo, options, multipart, the direct call's k and classes)
        ("chelsea.png", {"k": "1", "maps": "array"}, False, dict(k=1)),
        ("coffee.png", {"k": "3", "maps": "array"}, False, dict(k=3)),
        ("chelsea.png", {"classes": "1,2", "maps": "array"}, True, dict(classes=[1, 2])),
        ("coffee.png", {"classes": "999", "maps": "array"}, False, dict(classes=[999])),
        ("coffee.png", {}, False, dict(k=1)),  # the defaults: top-1, PNG overlays of both methods
        ("chelsea.png", {"k": "2", "maps": "array", "methods": "saliency"}, True, dict(k=2)),
        ("coffee.png", {"k": "5", "maps": "array", "methods": "gradcam"}, False, dict(k=5)),
        ("chelsea.png", {"classes": "0,500,999", "maps": "array"}, False, dict(classes=[0, 500, 999])),
    ]  # eight client threads
    requests.get(url, timeout=60).raise_for_status()
    answers = concurrently([lambda c=c: post(url, photo(c[0]), c[1], c[2]) for c in cases])
    for (name, options, _, target), response in zip(cases, answers):
        assert response.status_code == 200, response.text
        got, want = response.json(), direct(name, **target)
        assert got["classes"] == want.classes[0].tolist()
        assert got["names"] == [zoo.imagenet_classes()[c] for c in got["classes"]]
        probabilities = want.logits[0].softmax(-1)[want.classes[0]]
        assert np.allclose(got["probabilities"], probabilities.tolist(), rtol=0, atol=1e-5)
        if options.get("maps") != "array":
            assert {m: len(v) for m, v in got["maps"].items()} == {"gradcam": 1, "saliency": 1}
            continue
        assert sorted(got["maps"]) == sorted(options.get("methods", "gradcam,saliency").split(","))
        for method, maps in got["maps"].items():
            expected = torch.round(want.maps[method][0].clamp(0, 1) * 255).numpy()
            assert len(maps) == len(got["classes"])
            for served, exact in zip(maps, expected):
                pixels = array(served)
                assert pixels.shape == (SIZE, SIZE)
                assert np.abs(pixels.astype(float) - exact).max() <= 1  # one uint8 step: 1/255
    assert max(a.json()["batch_size"] for a in answers) > 1


@pytest.mark.slow  # a live server, or an ONNX export
def test_bad_requests_get_a_4xx_naming_the_problem_and_do_not_disturb_the_batch(url, direct):
    truncated = photo("chelsea.png")[:2000]
    big = io.BytesIO()
    Image.new("RGB", (1000, 1000), (200, 30, 30)).save(big, format="PNG")  # a few kB, but 1M pixels
    bad = [  # (body, options, multipart, status, words the message must hold)
        (b"hello, I am not an image", {}, False, 400, ["not a readable image"]),
        (truncated, {}, False, 400, ["not a readable image"]),
        (truncated, {}, True, 400, ["not a readable image"]),
        (photo("astronaut.png"), {}, False, 413, ["791555 bytes", "max_bytes"]),
        (big.getvalue(), {}, False, 413, ["1000x1000", "max_pixels"]),
        (photo("chelsea.png"), {"methods": "gradcam,gradcm"}, False, 400, ["'gradcm'", "gradcam, saliency"]),
        (photo("chelsea.png"), {"classes": "5000"}, False, 400, ["5000", "0..999"]),
        (photo("chelsea.png"), {"classes": "3"}, True, 200, []),  # a good one among them
        (photo("chelsea.png"), {"k": "0"}, False, 400, ["k: 0", "1..5"]),
        (photo("chelsea.png"), {"k": "6"}, True, 400, ["k: 6", "--max-k"]),
        (photo("chelsea.png"), {"k": "two"}, False, 400, ["k:", "'two'"]),
        (photo("coffee.png"), {"k": "2"}, False, 200, []),          # and another
        (photo("chelsea.png"), {"k": "2", "classes": "3"}, False, 400, ["not both"]),
        (photo("chelsea.png"), {"maps": "jpeg"}, False, 400, ["maps:", "png, array, none"]),
        (photo("chelsea.png"), {"kk": "2"}, False, 400, ["unknown option 'kk'"]),
        (b"", {}, False, 400, ["no image"]),
    ]
    answers = concurrently([lambda b=b: post(url, b[0], b[1], b[2]) for b in bad])
    for (body, options, _, status, words), response in zip(bad, answers):
        assert response.status_code == status, (options, response.text)
        if status != 200:
            message = response.json()["error"]
            assert all(w in message for w in words), message
    assert answers[7].json()["classes"] == [3]
    assert answers[11].json()["classes"] == direct("coffee.png", k=2).classes[0].tolist()


@pytest.mark.slow  # a live server, or an ONNX export
def test_png_maps_are_overlays_of_the_input_size(url):
    response = post(url, photo("coffee.png"), {"k": "2", "maps": "png", "methods": "gradcam"})
    assert response.status_code == 200, response.text
    maps = response.json()["maps"]
    assert list(maps) == ["gradcam"] and len(maps["gradcam"]) == 2
    for encoded in maps["gradcam"]:
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as overlay:
            assert (overlay.format, overlay.mode, overlay.size) == ("PNG", "RGB", (SIZE, SIZE))


@pytest.mark.slow  # a live server, or an ONNX export
def test_get_root_reports_the_settings_and_other_paths_are_404(url):
    settings = requests.get(url, timeout=60).json()
    assert settings == {"backend": "eager", "model": "resnet18", "methods": ["gradcam", "saliency"], "layer": "layer4",
                        "max_k": 5,
                        "num_classes": 1000, "input_size": SIZE, "named_classes": True, "max_batch_size": 8,
                        "batch_wait_ms": 100.0, "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS,
                        "torch_threads": 1}  # the replica reserves one Ray CPU, and Ray gives torch that many threads
    assert requests.post(f"{url}/explainn", data=b"x", timeout=60).status_code == 404
    assert requests.get(f"{url}/explain", timeout=60).status_code == 405


# --- the Open Inference Protocol (V2) on the same app --------------------------------------------------------------

def triton(url):
    http = pytest.importorskip("tritonclient.http")
    return http, http.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)


def encoded_images(*names):
    http = pytest.importorskip("tritonclient.http")
    images_input = http.InferInput("images", [len(names)], "BYTES")
    images_input.set_data_from_numpy(np.array([photo(n) for n in names], dtype=object))  # binary tensor extension
    return images_input


@pytest.mark.slow  # a live server
def test_v2_health_and_metadata_answer_tritonclient(url):
    _, client = triton(url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fastattr")
    meta = client.get_model_metadata("fastattr")
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [("images", "BYTES", [-1])]
    assert meta["inputs"][0]["parameters"] == {"or": f"FP32 [-1, 3, {SIZE}, {SIZE}], normalised images"}
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        ("logits", "FP32"), ("classes", "INT64"), ("gradcam", "FP32"), ("saliency", "FP32")]
    assert requests.get(f"{url}/v2/models/resnet", timeout=60).status_code == 404


@pytest.mark.slow  # a live server
def test_v2_infer_of_encoded_images_equals_direct_calls(url, direct):
    _, client = triton(url)
    result = client.infer("fastattr", [encoded_images("chelsea.png", "coffee.png")], parameters={"k": 2})
    for i, name in enumerate(("chelsea.png", "coffee.png")):
        want = direct(name, k=2)
        np.testing.assert_allclose(result.as_numpy("logits")[i], want.logits[0].numpy(), rtol=0, atol=1e-5)
        assert result.as_numpy("classes")[i].tolist() == want.classes[0].tolist()
        for method in ("gradcam", "saliency"):
            assert result.as_numpy(method).shape == (2, 2, SIZE, SIZE)
            assert np.abs(result.as_numpy(method)[i] - want.maps[method][0].numpy()).max() <= 1e-5


@pytest.mark.slow  # a live server
def test_v2_infer_of_normalised_fp32_images_in_json_equals_direct_calls_for_named_classes(url, direct):
    http, client = triton(url)
    x = images.normalize(images.read(EXAMPLES / "coffee.png", SIZE)[None]).numpy()
    images_input = http.InferInput("images", list(x.shape), "FP32")
    images_input.set_data_from_numpy(x, binary_data=False)
    outputs = [http.InferRequestedOutput(name, binary_data=False) for name in ("classes", "gradcam")]
    result = client.infer("fastattr", [images_input], outputs=outputs,
                          parameters={"classes": "7,300", "methods": "gradcam"})
    want = direct("coffee.png", classes=[7, 300])
    assert result.as_numpy("classes").tolist() == [[7, 300]]
    assert result.as_numpy("logits") is None and result.as_numpy("saliency") is None  # only the outputs asked for
    assert np.abs(result.as_numpy("gradcam")[0] - want.maps["gradcam"][0].numpy()).max() <= 1e-5


@pytest.mark.slow  # a live server
def test_v2_bad_requests_get_a_4xx_in_the_protocols_error_form_and_do_not_disturb_their_batch(url, direct):
    import json

    def infer(header, binary=b""):
        body = json.dumps(header).encode()
        headers = {"Inference-Header-Content-Length": str(len(body))} if binary else {}
        return requests.post(f"{url}/v2/models/fastattr/infer", data=body + binary, headers=headers, timeout=120)

    def b64(name):
        return base64.b64encode(photo(name)).decode()

    def files(*blobs):  # BYTES in the binary tensor extension: a 4-byte little-endian length, then the bytes
        return b"".join(len(b).to_bytes(4, "little") + b for b in blobs)

    one = {"name": "images", "datatype": "BYTES", "shape": [1]}
    good = {"inputs": [{**one, "data": [b64("coffee.png")]}], "parameters": {"k": 2}}
    bad = [  # (request, binary, status, words the error must hold)
        ({"inputs": [{**one, "datatype": "INT32", "data": [1]}]}, b"", 400, ["datatype 'INT32'", "BYTES", "FP32"]),
        ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}, b"",
         400, [f"[N, 3, {SIZE}, {SIZE}]", "[1, 3, 32, 32]"]),
        ({"inputs": [{**one, "data": [base64.b64encode(b"not an image").decode()]}]}, b"", 400, ["not a readable image"]),
        ({"inputs": [{**one, "parameters": {"binary_data_size": 16}}]}, files(b"not an image"), 400,
         ["not a readable image"]),
        ({"inputs": [{**one, "data": [b64("chelsea.png")]}], "parameters": {"k": 9}}, b"", 400, ["k: 9", "1..5"]),
        ({"inputs": [{**one, "data": [b64("chelsea.png")]}], "parameters": {"methods": "gradcm"}}, b"", 400,
         ["'gradcm'"]),
        ({"inputs": [{**one, "data": [b64("astronaut.png")]}]}, b"", 413, ["max_bytes"]),
        (good, b"", 200, []),
        ({"inputs": [{**one, "shape": [2], "data": [b64("chelsea.png")]}]}, b"", 400, ["says 2 images, got 1"]),
        ({"inputs": [{**one, "name": "image", "data": [b64("chelsea.png")]}]}, b"", 400, ["name it 'images'"]),
        ({"inputs": [{**one, "parameters": {"binary_data_size": "16"}}]}, files(b"not an image"), 400,
         ["binary_data_size must be a byte count"]),
        ({"inputs": [{**one, "data": [b64("chelsea.png")], "parameters": [1]}]}, b"", 400, ["expected an object"]),
        ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                      "data": ["0.5"] * (3 * SIZE * SIZE)}]}, b"", 400, ["must be", "numbers"]),
        ({"inputs": [{**one, "data": [b64("chelsea.png")]}], "parameters": {"binary_data_output": "no"}}, b"", 400,
         ["expected true or false"]),
        ({"inputs": [{**one, "data": [b64("chelsea.png")]}], "parameters": {"priority": 1, "k": 1}}, b"", 200, []),
    ]
    answers = concurrently([lambda b=b: infer(b[0], b[1]) for b in bad])
    for (_, _, status, words), response in zip(bad, answers):
        assert response.status_code == status, response.text
        if status != 200:
            message = response.json()["error"]
            assert all(w in message for w in words), message
    served = {o["name"]: o for o in answers[7].json()["outputs"]}
    assert served["classes"]["data"] == direct("coffee.png", k=2).classes[0].tolist()
    assert requests.post(f"{url}/v2/models/fastattr/infer", data=b"{", timeout=60).status_code == 400


def test_add_arguments_parses_the_serve_options():
    parser = argparse.ArgumentParser()
    fserve.add_arguments(parser)
    args = parser.parse_args(["--model", "resnet50", "--onnx", "m.onnx", "--methods", "gradcam", "--compile",
                              "--input-size", "160", "--max-k", "3", "--max-batch-size", "4", "--batch-wait-ms",
                              "25", "--max-bytes", "1000", "--host", "0.0.0.0", "--port", "9000"])
    assert (args.model, args.onnx, args.methods, args.compile, args.input_size, args.max_k) == (
        "resnet50", Path("m.onnx"), "gradcam", True, 160, 3)
    assert (args.max_batch_size, args.batch_wait_ms, args.max_bytes, args.host, args.port) == (
        4, 25.0, 1000, "0.0.0.0", 9000)
    defaults = parser.parse_args([])
    assert (defaults.model, defaults.weights, defaults.onnx, defaults.compile, defaults.max_k) == (
        "efficientnet_lite0", None, None, False, 5)
    assert (defaults.max_batch_size, defaults.batch_wait_ms, defaults.max_bytes, defaults.port) == (
        16, 10.0, 10_000_000, 8000)
    assert set(fserve.DEFAULTS) <= set(vars(defaults))  # every app argument has its option


def test_serve_takes_the_smoothgrad_and_ig_options():
    parser = argparse.ArgumentParser()
    fserve.add_arguments(parser)
    args = parser.parse_args(["--samples", "4", "--noise", "0", "--steps", "8"])
    assert (args.samples, args.noise, args.steps) == (4, 0.0, 8)
    assert fserve.app_options({"samples": "4", "noise": "0.2", "steps": "8"})["noise"] == 0.2
    with pytest.raises(ValueError, match="samples: expected an int >= 1, got 0"):
        fserve.app_options({"samples": "0"})


def test_a_backend_passes_its_method_options_to_the_explainer(weights):
    # With no noise SmoothGrad averages the plain gradient: the saliency map, whatever the sample count.
    pipeline = build(Spec("resnet18", str(weights), methods=("smoothgrad", "saliency"), input_size=32, samples=3,
                          noise=0.0))
    out = pipeline(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), None, 2)
    torch.testing.assert_close(out.maps["smoothgrad"], out.maps["saliency"], rtol=0, atol=1e-6)


def test_a_batch_of_top_k_and_named_requests_is_answered_as_direct_calls(weights):
    pipeline = build(Spec("resnet18", str(weights), methods="gradcam, saliency", input_size=32))
    cat = fserve.load_image(photo("chelsea.png"), 32, MAX_BYTES, MAX_PIXELS)
    cup = fserve.load_image(photo("coffee.png"), 32, MAX_BYTES, MAX_PIXELS)
    queries = [fserve.parse_query(params, pipeline, max_k=5)
               for params in ({"k": "3"}, {"classes": "7,5", "methods": "gradcam"}, {})]
    assert [(q.k, q.classes, q.methods) for q in queries] == [
        (3, None, ("gradcam", "saliency")), (2, (7, 5), ("gradcam",)), (1, None, ("gradcam", "saliency"))]
    answers = fserve.answer_batch(pipeline, list(zip((cat, cup, cup), queries)))
    for image, query, answer in zip((cat, cup, cup), queries, answers):
        target = dict(classes=torch.tensor([query.classes])) if query.classes else dict(k=query.k)
        want = pipeline(images.normalize(image[None]), **target)
        assert answer.classes.tolist() == want.classes[0].tolist() and answer.batch_size == 3
        assert list(answer.maps) == list(query.methods)
        for method in query.methods:
            torch.testing.assert_close(answer.maps[method], want.maps[method][0], rtol=0, atol=1e-5)
    body = fserve.to_json(answers[1], cup, fserve.Query(2, (7, 5), ("gradcam",), "array"), pipeline.names)
    assert body["classes"] == [7, 5] and body["names"][0] == pipeline.names[7] and body["batch_size"] == 3
    assert body["maps"]["gradcam"][0]["shape"] == [32, 32] and body["maps"]["gradcam"][0]["dtype"] == "uint8"


@pytest.mark.parametrize("methods, sample_batch, asked, served", [
    ("gradcam, smoothgrad", 4, 16, 4),   # a sampled method: at most sample_batch requests
    ("ig", 4, 2, 2),                     # fewer asked than sample_batch: as asked
    ("occlusion", None, 32, 16),         # a perturbation method: the default sample_batch
    ("gradcam, saliency", 4, 64, 64),    # one pass per batch: nothing multiplies it
])
def test_a_server_batches_at_most_sample_batch_requests_when_its_methods_multiply_each_image(
        methods, sample_batch, asked, served):
    pipeline = build(Spec("resnet18", methods=methods, input_size=64, sample_batch=sample_batch))
    assert fserve.batch_size(pipeline, asked) == served


def test_a_batch_of_the_served_size_sends_no_chunk_larger_than_sample_batch_through_the_network(weights):
    pipeline = build(Spec("resnet18", str(weights), methods="smoothgrad", input_size=32, samples=3, sample_batch=4))
    cat = fserve.load_image(photo("chelsea.png"), 32, MAX_BYTES, MAX_PIXELS)
    query = fserve.Query(1, None, ("smoothgrad",), "none")
    sizes = []
    stem = pipeline._explain.model.conv1.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        answers = fserve.answer_batch(pipeline, [(cat, query)] * fserve.batch_size(pipeline, 16))
    finally:
        stem.remove()
    # Four requests, one noisy copy of each per chunk: every forward holds four images, never 16.
    assert len(answers) == 4 and sizes and set(sizes) == {4}


def test_a_named_class_out_of_range_is_a_400_from_the_same_check_as_the_apis(weights):
    pipeline = build(Spec("resnet18", str(weights), methods="gradcam", input_size=32))
    with pytest.raises(fserve.RequestError, match=r"classes: index 1000 out of range .*\(valid 0..999\)") as refused:
        fserve.parse_query({"classes": "5,1000"}, pipeline, max_k=5)
    assert refused.value.status == 400


def test_serve_run_string_arguments_are_converted_and_unknown_ones_refused():
    options = fserve.app_options({"model": "resnet18", "max_batch_size": "16", "batch_wait_ms": "5",
                                  "compile": "true", "methods": "saliency,gradcam", "weights": "none"})
    assert (options["max_batch_size"], options["batch_wait_ms"], options["compile"], options["methods"],
            options["weights"]) == (16, 5.0, True, ("saliency", "gradcam"), None)
    with pytest.raises(ValueError, match="unknown argument 'max_batch'"):
        fserve.app_options({"max_batch": "16"})
    with pytest.raises(ValueError, match="max_batch_size='0'"):
        fserve.app_options({"max_batch_size": "0"})
    with pytest.raises(fastattr.FastattrError, match="'resnet18'"):
        fserve.app_options({"model": "resnt18"})


def test_the_config_file_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "fastattr.serve:app"
    assert [d.name for d in application.deployments] == [fserve.DEPLOYMENT]
    fserve.app_options(application.args)  # every argument is known and valid


@pytest.mark.slow  # a live server, or an ONNX export
def test_an_onnx_backend_answers_a_mixed_batch_as_direct_calls_do(weights, tmp_path):
    # The ONNX backend's k is fixed by the file (3 here), and named classes need a with_classes export.
    model = zoo.load_model("resnet18", weights)
    path = fastattr.export_onnx(model, tmp_path / "r18.onnx", layer="layer4", methods=("gradcam",), k=3,
                                input_shape=(3, SIZE, SIZE), with_classes=True)
    pipeline = build(Spec(str(path)))
    cat, cup = (images.read(EXAMPLES / name, SIZE) for name in ("chelsea.png", "coffee.png"))
    specs = [fserve.parse_query(params, pipeline, max_k=5) for params in ({"k": "2"}, {"classes": "5,7"}, {"k": "3"})]
    answers = fserve.answer_batch(pipeline, list(zip((cat, cup, cup), specs)))
    eager = fastattr.Explainer(model, layer="layer4")
    for image, spec, answer in zip((cat, cup, cup), specs, answers):
        target = dict(classes=list(spec.classes)) if spec.classes else dict(k=spec.k)
        want = eager(images.normalize(image[None]), **target)
        assert answer.classes.tolist() == want.classes[0].tolist() and answer.batch_size == 3
        torch.testing.assert_close(answer.maps["gradcam"], want.maps["gradcam"][0], atol=1e-4, rtol=0)


@pytest.mark.slow  # a live server, or an ONNX export
def test_an_onnx_backend_refuses_sampling_options_other_than_its_export(tmp_path):
    path = fastattr.export_onnx(zoo.load_model("resnet18"), tmp_path / "r18.onnx", layer="layer4", methods=("gradcam",),
                                k=1, input_shape=(3, 32, 32), samples=8)
    with pytest.raises(fastattr.InputError, match=r"samples 4: .* was exported with samples 8; drop samples, or "
                                                  r"export again with --samples 4"):
        build(Spec(str(path), samples=4))
    assert build(Spec(str(path), samples=8, noise=None)).backend == "onnx"
