"""One construction path: every front end (the command line, bench, the server, Ray Data) builds from the same spec
and gives the same explanation for the same images, on the eager, onnx and pt2 backends, including an export that
takes class indices; and the pretrained model's default layer is the same through every entry point."""

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import fastattr
from fastattr import bench, cli, files, images, zoo
from fastattr.pipeline import Spec, build

# One pytest-xdist worker runs the module, so its exports (the `specs` fixture) are made once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("front-ends")]

EXAMPLES = Path(__file__).parents[1] / "examples"
PHOTOS = [EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png"]
SIZE, K = 64, 2
# Two methods at layer4: what is compared is how each front end builds and answers, whatever the method; a
# saliency backward through the whole model would triple each of the three exports (test_onnx exports it).
METHODS = ("gradcam", "layercam")


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, Spec]:
    """The same resnet18 as a named model with weights, and as three exports: ONNX, ONNX with class indices, pt2.

    Made once per test run, in a folder every pytest-xdist worker shares (under a lock): pytest may set a module
    fixture up more than once, and the exports are the slow part of this module."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else \
        tmp_path_factory.getbasetemp()
    folder = root / "front-ends"
    weights, onnx, onnx_classes, pt2 = (folder / name for name in ("resnet18.pt", "r18.onnx", "r18-classes.onnx",
                                                                    "r18.pt2"))
    with FileLock(str(root / "front-ends.lock")):
        if not (folder / "made").exists():
            folder.mkdir(exist_ok=True)
            torch.manual_seed(0)
            torch.save(torchvision.models.resnet18().state_dict(), weights)
            model = zoo.load_model("resnet18", weights)
            common = dict(layer="layer4", methods=METHODS, k=K, input_shape=(3, SIZE, SIZE))
            fastattr.export_onnx(model, onnx, **common)
            fastattr.export_onnx(model, onnx_classes, with_classes=True, **common)
            fastattr.export_program(model, pt2, **common)
            (folder / "made").touch()
    return {"eager": Spec("resnet18", str(weights), "layer4", METHODS, K, SIZE), "onnx": Spec(str(onnx)),
            "onnx-classes": Spec(str(onnx_classes)), "pt2": Spec(str(pt2), trusted=True)}


def batch() -> torch.Tensor:
    return images.normalize(torch.stack([images.read(p, SIZE) for p in PHOTOS]))


def expected(spec: Spec, classes: torch.Tensor | None = None) -> fastattr.Explanation:
    return build(spec)(batch(), classes).cpu()


def options(spec: Spec) -> list[str]:
    """The command-line options of `spec` (the methods with a space after the comma, as people type them)."""
    if spec.export_file is not None:
        return ["--model", spec.model, *(["--trusted"] if spec.trusted else [])]
    return ["--model", spec.model, "--weights", spec.weights, "--layer", spec.layer, "--methods", "gradcam, layercam",
            "--k", str(spec.k), "--input-size", str(spec.input_size)]


BACKENDS = ["eager", "onnx", "onnx-classes", "pt2"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_command_line_explains_as_the_built_pipeline_does(specs, backend, tmp_path):
    spec = specs[backend]
    assert cli.main(["explain", *map(str, PHOTOS), *options(spec), "--no-progress", "-o", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    want = expected(spec)
    for i, line in enumerate(lines):
        assert line["classes"] == want.classes[i].tolist()
        for method in METHODS:
            assert line["maps"][method] == files.map_statistics(want.maps[method][i].clamp(0, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_times_what_the_built_pipeline_computes(specs, backend):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([*options(specs[backend]), "--batch-sizes", "2", "--no-progress"])
    target = bench.target_of(args, bench.settings_of(args))
    got, want = target.call(batch()).cpu(), expected(specs[backend])
    assert torch.equal(got.classes, want.classes)
    for method in METHODS:
        torch.testing.assert_close(got.maps[method], want.maps[method], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_server_answers_as_the_built_pipeline_does(specs, backend):
    pytest.importorskip("ray.serve")
    from fastattr import serve

    spec = specs[backend]
    args = {"model": spec.model, "weights": spec.weights, "layer": spec.layer, "input_size": spec.input_size,
            "methods": ",".join(spec.methods) if spec.methods else None, "trusted": spec.trusted or None}
    service_options = serve.app_options({name: value for name, value in args.items() if value is not None})
    service_options.pop("num_cpus")
    service = serve.ExplainService(**service_options)
    pictures = [images.read(p, SIZE) for p in PHOTOS]
    queries = [serve.Query(K, None, METHODS, "none"), serve.Query(1, None, ("gradcam",), "none")]
    answers = serve.answer_batch(service.pipeline, list(zip(pictures, queries)), service.fixed_k)
    want = expected(spec)
    for i, (query, answer) in enumerate(zip(queries, answers)):
        assert answer.classes.tolist() == want.classes[i, :query.k].tolist()
        for method in query.methods:
            # The server's batch is assembled on its own; on some CPUs (seen on an AMD EPYC) a float32 map can
            # differ from the direct call's in the last bits once normalised.
            torch.testing.assert_close(answer.maps[method], want.maps[method][i, :query.k], rtol=0, atol=1e-5)
    if service.pipeline.takes_classes:  # named classes go through the checked path, as the API's do
        named = serve.answer_batch(service.pipeline, [(pictures[0], serve.Query(2, (5, 7), METHODS, "none"))],
                                   service.fixed_k)[0]
        want = expected(spec, torch.tensor([[5, 7], [5, 7]]))
        assert named.classes.tolist() == [5, 7]
        torch.testing.assert_close(named.maps["gradcam"], want.maps["gradcam"][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ray_data_rows_hold_what_the_built_pipeline_computes(specs, backend):
    pytest.importorskip("ray.data")
    from fastattr import raydata

    rows = raydata.ExplainBatch(specs[backend])({"path": np.array([str(p) for p in PHOTOS]),
                                                 "bytes": np.array([p.read_bytes() for p in PHOTOS], dtype=object)})
    want = expected(specs[backend])
    assert rows["classes"].tolist() == want.classes.tolist() and list(rows["error"]) == ["", ""]
    for method in METHODS:
        stored = (want.maps[method].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(rows[f"map_{method}"], stored)


def test_an_export_refuses_a_k_other_than_its_own_in_every_front_end(specs, tmp_path, capsys):
    path = specs["onnx"].model
    with pytest.raises(fastattr.InputError, match="was exported for k=2"):
        build(Spec(path, k=3))
    assert cli.main(["explain", str(PHOTOS[0]), "--model", path, "--k", "3", "-o", str(tmp_path)]) == 2
    assert "--k 3: " in capsys.readouterr().err


# --- the pretrained model's default layer, through every entry point -------------------------------------------

LAYER = "bn2"  # timm's BatchNorm + ReLU6 after conv_head: the last feature map, which the pooling reads


def test_the_api_defaults_to_the_pretrained_models_last_feature_map():
    assert fastattr.default_layer(zoo.efficientnet_lite0()) == LAYER
    assert fastattr.Explainer(zoo.efficientnet_lite0()).layer == LAYER


def test_the_construction_path_defaults_to_the_same_layer():
    assert build(Spec(input_size=SIZE)).layer == LAYER


def test_fastattr_layers_marks_the_same_default(capsys):
    assert cli.main(["layers", zoo.PRETRAINED]) == 0
    assert f"{LAYER}  (default)" in capsys.readouterr().out.splitlines()


def test_fastattr_explain_explains_the_same_default(tmp_path):
    assert cli.main(["explain", str(PHOTOS[0]), "--methods", "gradcam", "--input-size", str(SIZE), "--no-progress",
                     "-o", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.jsonl").read_text())["layer"] == LAYER


def test_fastattr_export_exports_the_same_default(tmp_path):
    out = tmp_path / "lite0.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["export", "--model", zoo.PRETRAINED, "--methods", "gradcam", "--k", "1", "--input-size",
                         str(SIZE), "-o", str(out)]) == 0
    assert fastattr.OnnxExplainer(out).meta["layer"] == LAYER


def test_fastattr_bench_times_the_same_default(tmp_path):
    out = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["bench", "--methods", "gradcam", "--input-size", str(SIZE), "--batch-sizes", "1", "--iters",
                         "1", "--warmup", "0", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["layer"] == LAYER


def test_the_server_explains_the_same_default():
    pytest.importorskip("ray.serve")
    from fastattr import serve

    options = serve.app_options({"methods": "gradcam", "input_size": str(SIZE)})
    options.pop("num_cpus")
    assert serve.ExplainService(**options).settings["layer"] == LAYER


def test_ray_data_explains_the_same_default():
    pytest.importorskip("ray.data")
    from fastattr import raydata

    assert raydata.ExplainBatch(Spec(methods="gradcam", input_size=SIZE)).pipeline.layer == LAYER
