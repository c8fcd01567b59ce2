"""The one construction path: a Spec's defaults and checks, and what build returns (fast; exports are in
test_front_ends.py)."""

import pytest
import torch

import fastattr
from fastattr.pipeline import DEFAULTS, Spec, build, class_names, parse_methods

SIZE = 32


def test_a_method_list_may_have_spaces_after_its_commas():
    assert parse_methods("gradcam, saliency") == ("gradcam", "saliency")
    assert parse_methods(" gradcam,saliency ,") == ("gradcam", "saliency")
    assert Spec(methods="gradcam, ig").methods == ("gradcam", "ig")


def test_an_unknown_method_in_a_spec_names_the_valid_ones():
    with pytest.raises(fastattr.MethodError, match=r"unknown method 'gradcam\+'; valid: 'gradcam', 'gradcam\+\+'"):
        Spec(methods="gradcam, gradcam+")


@pytest.mark.parametrize("field,value,message", [
    ("k", 0, "k: expected an int >= 1, got 0"), ("input_size", -3, "input_size: expected an int >= 1, got -3"),
    ("samples", 1.5, "samples: expected an int >= 1, got 1.5"), ("noise", -0.1, "noise: expected a number >= 0"),
    ("device", "tpu", "device: expected one of cpu, cuda, got 'tpu'"),
    ("backend", "tensorrt", "backend: expected one of eager, compiled, onnx, pt2, got 'tensorrt'"),
    ("device", None, "device: expected a value \\(default 'cpu'\\), got None"),
    ("window", 0, "window: expected an int >= 1, got 0"),
])
def test_a_bad_spec_option_is_refused_when_the_spec_is_made(field, value, message):
    with pytest.raises(fastattr.InputError, match=message):
        Spec(**{field: value})


def test_class_names_label_a_model_with_1000_outputs_only():
    assert len(class_names(1000)) == 1000 and class_names(1000)[281] == "tabby"
    assert class_names(10) is None and class_names(1001) is None


def test_what_a_spec_leaves_out_comes_from_one_table(weights):
    pipeline = build(Spec("resnet18", weights, input_size=SIZE))
    assert (pipeline.methods, pipeline.k, pipeline.layer) == (DEFAULTS["methods"], DEFAULTS["k"], "layer4")
    assert (pipeline.backend, pipeline.fixed_k, pipeline.num_classes, pipeline.takes_classes) == ("eager", None, 1000, True)
    assert pipeline.names == class_names(1000)


def test_a_pipeline_explains_as_an_explainer_of_the_same_model_does(weights):
    pipeline = build(Spec("resnet18", weights, "layer3", "gradcam, saliency", k=2, input_size=SIZE))
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    want = fastattr.Explainer(fastattr.zoo.load_model("resnet18", weights), "layer3", ("gradcam", "saliency"))
    for got, expected in ((pipeline(images), want(images, k=2)),
                          (pipeline(images, torch.tensor([[1, 2]] * 3)), want(images, classes=[1, 2]))):
        assert torch.equal(got.classes, expected.classes)
        for method in ("gradcam", "saliency"):
            torch.testing.assert_close(got.maps[method], expected.maps[method], rtol=0, atol=0)


def test_warmup_runs_the_top_k_and_the_named_classes_at_batch_1_and_2(weights):
    pipeline = build(Spec("resnet18", weights, methods="gradcam", input_size=SIZE))
    assert pipeline.warmup(k=4) > 0


@pytest.mark.parametrize("given,message", [
    (dict(backend="eager"), r"--backend eager: 'm.onnx' is a .onnx export, which sets the backend \(onnx\)"),
    (dict(weights="w.pt"), r"--weights: 'm.onnx' is an export that holds its weights; drop --weights"),
    ({}, r"--model m.onnx: no such file"),
])
def test_an_export_file_is_checked_before_it_is_read(given, message):
    with pytest.raises(fastattr.InputError, match=message):
        build(Spec("m.onnx", **given), "--")


def test_a_file_that_is_not_an_export_is_refused_as_a_model(tmp_path):
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(fastattr.InputError, match="a file must be a fastattr export ending in .onnx or .pt2"):
        build(Spec(str(tmp_path / "weights.pth")))


def test_an_unknown_model_name_names_the_closest():
    with pytest.raises(fastattr.FastattrError, match="unknown name 'resnt18'; closest: 'resnet18'"):
        build(Spec("resnt18"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading():
    with pytest.raises(fastattr.InputError, match="device cuda: no GPU available"):
        build(Spec("resnet18", device="cuda"))


def test_every_spec_field_is_a_command_line_flag_and_a_server_argument():
    import argparse
    import dataclasses
    import importlib

    from fastattr import options

    parser = argparse.ArgumentParser()
    options.add_spec_arguments(parser)
    flags = {action.dest for action in parser._actions}
    app = importlib.import_module("fastattr.serve.app")
    for field in dataclasses.fields(Spec):
        assert field.name in flags and field.name in app.DEFAULTS, field.name


def test_the_server_converts_its_string_and_yaml_arguments_by_each_options_kind():
    from fastattr import options

    assert options.convert("k", "3") == 3 and options.convert("k", 224.0) == 224
    assert options.convert("noise", "0.2") == 0.2 and options.convert("layer", "none") is None
    assert options.convert("trusted", "no") is False and options.convert("methods", ["gradcam"]) == ("gradcam",)
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        options.convert("trusted", "maybe")
