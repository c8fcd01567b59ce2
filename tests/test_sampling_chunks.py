"""SmoothGrad and Integrated Gradients run their N * samples (N * steps) points in chunks of `sample_batch` images:
the maps are those of one pass over all points, and memory does not grow with samples or steps."""


import pytest
import torch

import fastattr
import peak
from models import images, model, two_conv_net

POINTS = {"samples": 7, "steps": 9}  # odd counts, so chunks of 2 or 4 points per image leave a remainder


def explain(net, x, method, sample_batch, **options):
    return fastattr.Explainer(net, methods=(method,), sample_batch=sample_batch, **POINTS, **options)(x, k=2)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("method", ["smoothgrad", "ig"])
@pytest.mark.parametrize("sample_batch", [1, 4, 8, 5])
def test_chunked_maps_equal_one_pass_over_all_points_in_float64(arch, method, sample_batch):
    net, x = model(arch, torch.float64), images(2, torch.float64)
    whole = explain(net, x, method, None)
    chunked = explain(net, x, method, sample_batch)
    assert torch.equal(chunked.classes, whole.classes)
    torch.testing.assert_close(chunked.maps[method], whole.maps[method], rtol=0, atol=1e-12)
    assert chunked.maps[method].std() > 0.01  # a map with structure, not a constant both sides agree on


def test_chunked_integrated_gradients_keeps_the_completeness_error_of_one_pass():
    net, x = model("resnet18", torch.float64), images(2, torch.float64)
    whole, chunked = explain(net, x, "ig", None), explain(net, x, "ig", 4)
    torch.testing.assert_close(chunked.completeness, whole.completeness, rtol=0, atol=1e-10)


def test_a_given_noise_draw_gives_the_same_smoothgrad_chunked_or_not():
    net, x = model("resnet18", torch.float64), images(3, torch.float64)
    noise = torch.randn(3, POINTS["samples"], *x.shape[1:], dtype=torch.float64)
    whole = fastattr.Explainer(net, methods=("smoothgrad",), sample_batch=None, **POINTS)(x, k=1, noise=noise)
    chunked = fastattr.Explainer(net, methods=("smoothgrad",), sample_batch=3, **POINTS)(x, k=1, noise=noise)
    torch.testing.assert_close(chunked.maps["smoothgrad"], whole.maps["smoothgrad"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_sample_batch_that_is_not_a_positive_int_is_refused(bad):
    with pytest.raises(fastattr.MethodError, match=r"sample_batch: expected an int >= 1"):
        fastattr.Explainer(model("resnet18"), methods=("ig",), sample_batch=bad)


def test_the_default_chunk_is_sixteen_images():
    assert fastattr.Explainer(model("resnet18"), methods=("ig",)).sample_batch == 16


def added_peak_mib(method: str, count: int, sample_batch: int | None) -> float:
    return peak.added_peak_mib(f"""
        import torch, torchvision, fastattr
        torch.set_num_threads(1)
        net = torchvision.models.resnet18(num_classes=10).eval()
        x = torch.randn(2, 3, 96, 96)
        explainer = fastattr.Explainer(net, methods=({method!r},), samples={count}, steps={count},
                                       sample_batch={sample_batch!r})
        fastattr.Explainer(net, layer="layer4", methods=("gradcam",))(x)  # the model and one plain pass in memory
        """, "explainer(x)")


@pytest.mark.slow
@peak.needs_vmhwm
@pytest.mark.parametrize("method", ["ig", "smoothgrad"])
def test_peak_memory_is_flat_in_the_number_of_points(method):
    few, many = added_peak_mib(method, 8, 8), added_peak_mib(method, 64, 8)
    unchunked = added_peak_mib(method, 64, None)
    # 64 points per image at once hold eight times the autograd state of 8: the measure sees that growth,
    # and the chunked pass does not show it.
    assert unchunked > 3 * max(few, 50), (few, many, unchunked)
    assert many < 1.25 * few + 40, (few, many, unchunked)


def test_a_spec_passes_its_sample_batch_to_the_explainer_and_the_command_line_has_it():
    from fastattr import Spec, build, options

    assert build(Spec("resnet18", methods=("ig",), input_size=64, sample_batch=4))._explain.sample_batch == 4
    assert build(Spec("resnet18", methods=("ig",), input_size=64))._explain.sample_batch == 16
    parser = __import__("argparse").ArgumentParser()
    options.add_spec_arguments(parser)
    assert options.spec_from_args(parser.parse_args(["--sample-batch", "3"])).sample_batch == 3


# Each export format: how it is written, and how it is loaded with a given sample_batch.
EXPORTS = {
    "onnx": (fastattr.export_onnx, lambda path, sample_batch: fastattr.OnnxExplainer(path, sample_batch=sample_batch)),
    "pt2": (fastattr.export_program,
            lambda path, sample_batch: fastattr.load_program(path, trusted=True, sample_batch=sample_batch)),
}


@pytest.mark.slow  # an export
@pytest.mark.parametrize("fmt", EXPORTS)
def test_a_loaded_export_called_on_fewer_images_at_a_time_gives_the_maps_of_one_call(tmp_path, fmt):
    export, load = EXPORTS[fmt]
    net = two_conv_net()  # what is chunked is the points of each image, whatever the model
    path = export(net, tmp_path / f"sg-ig.{fmt}", methods=("smoothgrad", "ig"), k=2, input_shape=(3, 64, 64), **POINTS)
    x = images(5)
    whole = load(path, None)
    for sample_batch in (1, 20):  # one image a call (7 and 9 points each), then two
        calls = []
        chunked = load(path, sample_batch)
        chunked._run = lambda *args, run=chunked._run: calls.append(args[0].shape[0]) or run(*args)
        got, want = chunked(x), whole(x)
        assert calls == ([1] * 5 if sample_batch == 1 else [2, 2, 1])
        assert torch.equal(got.classes, want.classes)
        for method in ("smoothgrad", "ig"):
            torch.testing.assert_close(got.maps[method], want.maps[method], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.completeness, want.completeness, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # torch.compile's capture of the whole graph
def test_the_compiled_graph_runs_all_points_of_fewer_images_per_call_and_equals_eager():
    net = model("resnet18")
    options = dict(methods=("smoothgrad", "ig"), layer="layer4", sample_batch=20, **POINTS)  # 2 images a call
    eager, compiled = fastattr.Explainer(net, **options), fastattr.Explainer(net, compile={"backend": "eager"}, **options)
    for n in (2, 5):
        x = images(n, seed=n)
        want, got = eager(x, k=2), compiled(x, k=2)
        assert torch.equal(got.classes, want.classes)
        for method in ("smoothgrad", "ig"):
            torch.testing.assert_close(got.maps[method], want.maps[method], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.completeness, want.completeness, rtol=1e-4, atol=1e-4)
    # Calls of 2 images and of 1 (the last of five): the batch dimension's two graphs, whatever N was.
    assert {shape[0] for shape, *_ in compiled.compile_seconds} == {1, 2}


def test_a_graph_that_runs_all_points_takes_max_1_sample_batch_over_points_images_a_call():
    from fastattr.explain import images_per_call

    assert [images_per_call(32, 16, 8), images_per_call(8, 16, 8), images_per_call(5, 16, 8)] == [1, 2, 3]
    assert images_per_call(32, None, 8) == 8 and images_per_call(1, 16, 8) == 8
