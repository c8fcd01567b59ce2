"""`fastattr serve --kserve`: the real kserve.ModelServer on loopback, called with tritonclient.http (V2) and plain
HTTP (V1 :predict and :explain); each answer equals a direct Explainer call on the image alone, and bad requests
get KServe's {"error": ...} with a 400 while the good ones sent with them succeed."""

import base64
import importlib.util
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

# The server runs in a process of its own; this one needs only to know that kserve is installed (importing it here
# would let it parse pytest's command line).
if importlib.util.find_spec("kserve") is None:
    pytest.skip("kserve is not installed (the kserve extra)", allow_module_level=True)
http = pytest.importorskip("tritonclient.http")
requests = pytest.importorskip("requests")

import fastattr  # noqa: E402
from fastattr import images, zoo  # noqa: E402
from load_test import server_process  # noqa: E402  (benchmarks/, on the path from tests/conftest.py)

# A server process, started once: one pytest-xdist worker runs the module.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kserve")]
EXAMPLES = Path(__file__).parents[1] / "examples"
SIZE = 64


@pytest.fixture(scope="module")
def url(weights, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fastattr", "serve", "--kserve", "--model", "resnet18", "--weights", str(weights),
               "--input-size", str(SIZE), "--port", str(port), "--max-bytes", "700000", "--batch-wait-ms", "100"]
    log = tmp_path_factory.mktemp("kserve-log") / "server.log"  # a file: KServe logs every request
    with log.open("w+b") as out, server_process(command, address, out, time_limit=120):
        yield address


@pytest.fixture(scope="module")
def direct(weights):
    model = zoo.load_model("resnet18", weights)
    explainer = fastattr.Explainer(model, layer=fastattr.default_layer(model), methods=("gradcam", "saliency"))
    return lambda name, **target: explainer(images.normalize(images.read(EXAMPLES / name, SIZE)[None]), **target)


def b64(name):
    return base64.b64encode((EXAMPLES / name).read_bytes()).decode()


def test_v2_health_metadata_and_infer_with_tritonclient_equal_direct_calls(url, direct):
    client = http.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fastattr")
    meta = client.get_model_metadata("fastattr")
    assert [i["name"] for i in meta["inputs"]] == ["images"]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "classes", "gradcam", "saliency"]
    # KServe's REST server decodes binary BYTES elements as UTF-8, which an image file is not: the files go as
    # base64 strings in JSON (fastattr's reading of JSON BYTES), which KServe passes through.
    images_input = http.InferInput("images", [2], "BYTES")
    images_input.set_data_from_numpy(np.array([b64(n) for n in ("chelsea.png", "coffee.png")], dtype=object),
                                     binary_data=False)
    # tritonclient sends a request without binary data with no content type, which KServe's REST server then reads
    # as binary and refuses for want of Inference-Header-Content-Length: say it is JSON.
    result = client.infer("fastattr", [images_input], parameters={"k": 2},
                          headers={"Content-Type": "application/json"})
    for i, name in enumerate(("chelsea.png", "coffee.png")):
        want = direct(name, k=2)
        np.testing.assert_allclose(result.as_numpy("logits")[i], want.logits[0].numpy(), rtol=0, atol=1e-5)
        assert result.as_numpy("classes")[i].tolist() == want.classes[0].tolist()
        for method in ("gradcam", "saliency"):
            assert np.abs(result.as_numpy(method)[i] - want.maps[method][0].numpy()).max() <= 1e-5


def test_v1_predict_and_explain_equal_direct_calls(url, direct):
    predicted = requests.post(f"{url}/v1/models/fastattr:predict", timeout=120,
                              json={"instances": [{"b64": b64("coffee.png")}], "parameters": {"k": 3}}).json()
    want = direct("coffee.png", k=3)
    assert predicted["predictions"][0]["classes"] == want.classes[0].tolist()
    assert "maps" not in predicted["predictions"][0]
    explained = requests.post(f"{url}/v1/models/fastattr:explain", timeout=120,
                              json={"instances": [{"image_bytes": {"b64": b64("chelsea.png")}}],
                                    "parameters": {"classes": [5, 7], "methods": "gradcam"}}).json()
    got, want = explained["predictions"][0], direct("chelsea.png", classes=[5, 7])
    assert got["classes"] == [5, 7] and list(got["maps"]) == ["gradcam"]
    for served, exact in zip(got["maps"]["gradcam"], want.maps["gradcam"][0]):
        pixels = np.frombuffer(base64.b64decode(served["data"]), dtype=np.uint8).reshape(served["shape"])
        assert np.abs(pixels.astype(float) - torch.round(exact.clamp(0, 1) * 255).numpy()).max() <= 1


def test_bad_requests_get_a_400_in_kserves_error_form_and_the_good_ones_beside_them_succeed(url, direct):
    one = {"name": "images", "datatype": "BYTES", "shape": [1]}
    v2 = f"{url}/v2/models/fastattr/infer"
    v1 = f"{url}/v1/models/fastattr:predict"
    cases = [  # (url, request, status, words the error must hold)
        (v2, {"inputs": [{**one, "datatype": "INT32", "data": [1]}]}, 400, ["datatype 'INT32'"]),
        (v2, {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}, 400,
         [f"[N, 3, {SIZE}, {SIZE}]"]),
        (v2, {"inputs": [{**one, "data": [base64.b64encode(b"not an image").decode()]}]}, 400, ["not a readable image"]),
        (v2, {"inputs": [{**one, "data": [b64("chelsea.png")]}], "parameters": {"k": 9}}, 400, ["k: 9"]),
        (v2, {"inputs": [{**one, "data": [b64("chelsea.png")]}], "parameters": {"methods": "gradcm"}}, 400,
         ["'gradcm'"]),
        (v2, {"inputs": [{**one, "data": [b64("astronaut.png")]}]}, 400, ["max_bytes"]),
        (v2, {"inputs": [{**one, "data": [b64("coffee.png")]}], "parameters": {"k": 2}}, 200, []),
        (v1, {"instances": [{"b64": "aGVsbG8="}]}, 400, ["not a readable image"]),
        (v1, {"instances": [{"b64": b64("chelsea.png")}], "parameters": {"k": 0}}, 400, ["k: 0"]),
        (v1, {"instances": "x"}, 400, ["instances"]),
        (v1, {"instances": [{"b64": b64("chelsea.png")}], "parameters": {"k": 1}}, 200, []),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda c: requests.post(c[0], data=json.dumps(c[1]), timeout=120,
                                                        headers={"content-type": "application/json"}), cases))
    for (_, _, status, words), response in zip(cases, answers):
        assert response.status_code == status, response.text
        if status != 200:
            assert all(w in response.json()["error"] for w in words), response.json()
    served = {o["name"]: o for o in answers[6].json()["outputs"]}
    assert served["classes"]["data"] == direct("coffee.png", k=2).classes[0].tolist()
    assert answers[10].json()["predictions"][0]["classes"] == direct("chelsea.png", k=1).classes[0].tolist()


def test_a_bad_server_option_is_a_usage_error_before_the_model_loads():
    done = subprocess.run([sys.executable, "-m", "fastattr", "serve", "--kserve", "--model", "resnet18",
                           "--max-batch-size", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "max_batch_size=0: must be at least 1" in done.stderr


def test_the_kserve_batcher_holds_at_most_sample_batch_images_when_the_methods_multiply_each_image():
    from fastattr.serve import kserve as fkserve  # imported with its own command line hidden from kserve

    sampled = fkserve.FastattrModel(fastattr.Spec("resnet18", methods="ig", input_size=SIZE, sample_batch=4),
                                    max_batch_size=16)
    plain = fkserve.FastattrModel(fastattr.Spec("resnet18", methods="saliency", input_size=SIZE, sample_batch=4),
                                  max_batch_size=16)
    assert (sampled.batch.max_batch_size, plain.batch.max_batch_size) == (4, 16)
