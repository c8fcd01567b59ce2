"""One ONNX file computes logits, classes and maps; onnxruntime's output equals the torch path.

Tolerance (float32, measured here): logits within 1e-4; maps by the measure of test_compile (Pearson
correlation >= 0.999 per map, max abs <= 0.1 of the normalised maps), since saliency's ReLU masks flip
with summation order; Grad-CAM typically agrees to ~1e-5. Classes must be equal.
"""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import fastattr
from models import ARCHS, COMPILABLE_METHODS, MINI_ARCHS, images, model, two_conv_net
from test_compile import WRONG_INPUTS, assert_same_explanation

# Six architecture families at reduced depth (tests/models.py's MINI_ARCHS: the same classes and ops in a graph
# a fraction of the size, so the suite stays within its time; whole models in docs/export.md and the benchmarks).
# The tests reading the one mini-resnet18 export run in one pytest-xdist worker, which makes it once.
ONE_EXPORT = pytest.mark.xdist_group("onnx-mini-resnet18")
ONNX_ARCHS = [pytest.param("mini-resnet18", marks=ONE_EXPORT), "mini-vgg11_bn", "mini-mobilenet_v3_small",
              "mini-efficientnet_b0", "mini-densenet121", "mini-convnext_tiny"]
LAYERS = {**ARCHS, **MINI_ARCHS}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}

    def get(name):
        if name not in paths:
            paths[name] = fastattr.export_onnx(model(name), folder / f"{name}.onnx", layer=LAYERS[name][1],
                                               methods=("gradcam", "saliency"), k=3, input_shape=(3, 64, 64))
        return paths[name]
    return get


@pytest.mark.slow  # an ONNX export of a whole model
@pytest.mark.parametrize("name", ONNX_ARCHS)
def test_onnxruntime_equals_the_torch_path_for_batch_1_and_3_from_one_file(exports, name):
    explainer = fastattr.OnnxExplainer(exports(name))
    eager = fastattr.Explainer(model(name), layer=LAYERS[name][1], methods=("gradcam", "saliency"))
    for n in (1, 3):
        x = images(n, seed=20 + n)
        assert_same_explanation(explainer(x), eager(x, k=3))


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
def test_the_exported_file_passes_the_full_onnx_check_with_a_dynamic_batch(exports):
    path = exports("mini-resnet18")
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [o.name for o in graph.output] == ["logits", "classes", "gradcam", "saliency"]
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    assert not any(n.op_type.endswith("Backward") for n in graph.node)


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
def test_weights_are_stored_once(exports):
    path = exports("mini-resnet18")
    weights = sum(p.numel() for p in model("mini-resnet18").parameters()) * 4
    size = path.stat().st_size + sum(f.stat().st_size for f in path.parent.glob(path.name + ".data"))
    assert weights <= size < 1.3 * weights


# The class-index tests read one export, made once in one pytest-xdist worker.
CLASSES_EXPORT = pytest.mark.xdist_group("onnx-mini-resnet18-classes")


@pytest.fixture(scope="module")
def classes_export(tmp_path_factory):
    return fastattr.export_onnx(model("mini-resnet18"), tmp_path_factory.mktemp("onnx") / "classes.onnx", layer="layer4",
                                methods=("gradcam",), k=2, input_shape=(3, 64, 64), with_classes=True)


@CLASSES_EXPORT
def test_explicit_classes_as_a_second_input(classes_export):
    x, classes = images(3), torch.tensor([[1, 2], [999, 0], [5, 5]])
    want = fastattr.Explainer(model("mini-resnet18"), layer="layer4")(x, classes=classes)
    assert_same_explanation(fastattr.OnnxExplainer(classes_export)(x, classes), want)


@CLASSES_EXPORT
@pytest.mark.slow  # exports
@pytest.mark.parametrize("bad", [1000, -1])
def test_a_class_index_outside_the_models_classes_is_refused_before_onnxruntime_gathers_it(classes_export, bad):
    # The graph gathers each class's weight row: onnxruntime would fail on 1000 and read -1 as class 999.
    # Checked by fastattr.targets, as every caller's classes are: the same TargetError as the torch path's.
    with pytest.raises(fastattr.TargetError, match=r"classes: index -?[0-9]+ out of range for a model with 1000 outputs \(valid 0\.\.999\)"):
        fastattr.OnnxExplainer(classes_export)(images(2), torch.tensor([[3, 4], [bad, 0]]))


@pytest.mark.slow  # an ONNX export of a whole model
@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_a_gradcam_export_keeps_the_batch_dynamic_whether_its_k_classes_vmap_or_loop(tmp_path, layer):
    # At layer4 the K-class backward is vmapped (above it: pooling and the classifier); at layer3 vmapping
    # would fix the batch size, so the export traces the K calls instead.
    path = fastattr.export_onnx(model("mini-resnet18"), tmp_path / "cam.onnx", layer=layer, methods=("gradcam",), k=3,
                                input_shape=(3, 64, 64))
    explainer, eager = fastattr.OnnxExplainer(path), fastattr.Explainer(model("mini-resnet18"), layer=layer)
    for n in (1, 3):
        x = images(n, seed=30 + n)
        assert_same_explanation(explainer(x), eager(x, k=3))


@pytest.mark.slow  # an ONNX export of a whole model
def test_a_vmapped_k_that_would_fix_the_batch_is_refused_with_the_fix(tmp_path):
    with pytest.raises(fastattr.ExportError, match=r"with k_form='vmap' the traced graph fixes the batch size at "
                                                   r"\d+; export with k_form='loop'"):
        fastattr.export_onnx(model("mini-resnet18"), tmp_path / "cam.onnx", layer="layer3", methods=("gradcam",), k=3,
                             input_shape=(3, 64, 64), k_form="vmap")


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
def test_concurrent_runs_equal_sequential_runs(exports):
    import threading

    explainer = fastattr.OnnxExplainer(exports("mini-resnet18"))
    inputs = [images(2, seed=40 + i) for i in range(6)]
    want = [explainer(x) for x in inputs]
    got = [None] * 6
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, explainer(inputs[i]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert torch.equal(g.classes, w.classes) and torch.equal(g.maps["gradcam"], w.maps["gradcam"])


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
@pytest.mark.parametrize("call,message", WRONG_INPUTS)
def test_wrong_inputs_are_refused_with_the_expected_shape(exports, call, message):
    with pytest.raises(fastattr.InputError, match=message):
        call(fastattr.OnnxExplainer(exports("mini-resnet18")))


def test_a_file_that_is_not_a_fastattr_export_is_refused(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(fastattr.InputError, match=r"is not an ONNX model onnxruntime can load"):
        fastattr.OnnxExplainer(tmp_path / "junk.onnx")
    torch.onnx.export(nn.Linear(2, 2), (torch.zeros(1, 2),), str(tmp_path / "plain.onnx"), dynamo=True)
    with pytest.raises(fastattr.InputError, match=r"an ONNX model but not a fastattr export"):
        fastattr.OnnxExplainer(tmp_path / "plain.onnx")


@pytest.mark.slow  # an ONNX export
def test_a_float64_export_that_onnxruntime_has_no_convolution_for_is_refused_with_the_float32_fix(tmp_path):
    # The export is valid ONNX; onnxruntime's CPU provider has no float64 Conv, so only loading it fails.
    path = fastattr.export_onnx(two_conv_net().double(), tmp_path / "f64.onnx", layer="2", methods="gradcam", k=1,
                                input_shape=(3, 8, 8))
    with pytest.raises(fastattr.InputError, match=r"NotImplemented: .*Conv.*; export the model in float32"):
        fastattr.OnnxExplainer(path)


def test_an_op_without_onnx_translation_is_named(tmp_path):
    class Conv1d(nn.Module):  # a 1-D convolution above the layer: its input gradient has no translation here
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.line = nn.Conv1d(4, 4, 3)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(self.line(self.conv(x).flatten(2)).mean(-1))

    with pytest.raises(fastattr.ExportError, match=r"gradient of a 1-D convolution has no ONNX translation"):
        fastattr.export_onnx(Conv1d().eval(), tmp_path / "x.onnx", layer="conv", methods=("gradcam", "saliency"),
                             k=2, input_shape=(3, 16, 16))


@pytest.mark.slow  # an ONNX export of a whole model
def test_the_command_line_exports_a_torchvision_model_with_a_weights_file(tmp_path):
    weights = tmp_path / "resnet18.pt"
    torch.save(model("resnet18").state_dict(), weights)
    done = subprocess.run([sys.executable, "-m", "fastattr", "export", "--model", "resnet18", "--weights", str(weights),
                           "--layer", "layer4", "--methods", "gradcam, layercam", "--k", "2", "--input-size", "64",
                           "-o", str(tmp_path / "cli.onnx")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cli.onnx" in done.stdout
    x = images(2)
    want = fastattr.Explainer(model("resnet18"), layer="layer4", methods=("gradcam", "layercam"))(x, k=2)
    assert_same_explanation(fastattr.OnnxExplainer(tmp_path / "cli.onnx")(x), want)


def test_the_command_line_names_an_unknown_model(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastattr", "export", "--model", "resnet19", "-o",
                           str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown name 'resnet19'; closest: 'resnet18'" in done.stderr


@pytest.mark.slow  # an ONNX export of a whole model
def test_average_pooling_and_silu_gradients_export_for_odd_sizes(tmp_path):
    # Odd sizes, which the architectures above at 64x64 never reach: 17x17 leaves a row and a column over at
    # each stride-2 step of the avg_pool2d and silu gradients.
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)
            self.pool = nn.AvgPool2d(2)
            self.act = nn.SiLU()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(self.act(self.pool(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    net = Pooled().eval()
    path = fastattr.export_onnx(net, tmp_path / "pooled.onnx", layer="conv", methods=("gradcam", "saliency"), k=2,
                                input_shape=(3, 17, 17))
    x = torch.randn(3, 3, 17, 17, generator=torch.Generator().manual_seed(3))
    want = fastattr.Explainer(net, layer="conv", methods=("gradcam", "saliency"))(x, k=2)
    assert_same_explanation(fastattr.OnnxExplainer(path)(x), want)


@pytest.mark.parametrize("stride, padding, dilation, groups", [
    (1, 1, 1, 1), (1, 0, 1, 1), (1, 2, 2, 1), (1, 1, 1, 4), (1, (0, 2), 1, 2), (2, 1, 1, 1), (2, 0, 1, 4)])
def test_a_convolutions_input_gradient_equals_autograds_as_a_conv_or_a_transposed_conv(stride, padding, dilation,
                                                                                       groups):
    from fastattr import _export as graph

    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 8, 9, 9, dtype=torch.float64, generator=g), torch.randn(12, 8 // groups, 3, 3, dtype=torch.float64, generator=g)
    out = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=g)
    pair = (lambda v: (v, v) if isinstance(v, int) else v)
    want = torch.ops.aten.convolution_backward(grad_output, x, weight, None, pair(stride), pair(padding), pair(dilation),
                                               False, [0, 0], groups, [True, False, False])[0]
    got = graph.ONNX_DECOMPOSITIONS[torch.ops.aten.convolution_backward.default](
        grad_output, x, weight, None, pair(stride), pair(padding), pair(dilation), False, [0, 0], groups,
        [True, False, False])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
def test_unstrided_convolution_gradients_export_as_convs_and_relu_gradients_as_products(exports):
    # With both, onnxruntime's call of resnet18's saliency at batch 16 went from 657-709 ms to 504-516 ms
    # (benchmarks/results/onnx-profile.md).
    strided = sum(m.stride != (1, 1) for m in model("mini-resnet18").modules() if isinstance(m, nn.Conv2d))
    ops = [n.op_type for n in onnx.load(str(exports("mini-resnet18"))).graph.node]
    assert (strided, ops.count("ConvTranspose")) == (7, 3 * 7)  # saliency's backward traced once per class, k=3
    assert "Where" not in ops


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's pattern in small: a block that permutes to [N, H, W, C] and back, so the activation that
    reaches the global average pool has channels-last strides."""

    def __init__(self):
        super().__init__()
        self.stem, self.mix = nn.Conv2d(3, 8, 3, stride=2), nn.Linear(8, 8)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.mix(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(self.pool(x).flatten(1))


@pytest.mark.slow  # an ONNX export of a whole model
def test_global_average_pooling_of_a_channels_last_activation_exports(tmp_path):
    torch.manual_seed(0)
    net = ChannelsLastBlock().eval()
    path = fastattr.export_onnx(net, tmp_path / "cl.onnx", layer="stem", k=2, input_shape=(3, 17, 17))
    x = images(3)[:, :, :17, :17]
    assert_same_explanation(fastattr.OnnxExplainer(path)(x),
                            fastattr.Explainer(net, layer="stem", methods=("gradcam", "saliency"))(x, k=2))


@pytest.mark.slow  # an ONNX export of a whole model
def test_weights_can_live_beside_the_file_as_external_data(tmp_path):
    # Asked for, below the limit: the same save, check and load path on a mini-resnet18.
    path = fastattr.export_onnx(model("mini-resnet18"), tmp_path / "ext.onnx", layer="layer4", methods=("gradcam",),
                                k=2, input_shape=(3, 64, 64), external_data=True)
    weights = sum(p.numel() for p in model("mini-resnet18").parameters()) * 4
    data = (tmp_path / "ext.onnx.data").stat().st_size
    assert path.stat().st_size < weights / 10
    assert 0.9 * weights < data < 1.1 * weights  # batch norms fold into the convolutions: a little under the weights
    x = images(2)
    assert_same_explanation(fastattr.OnnxExplainer(path)(x), fastattr.Explainer(model("mini-resnet18"), layer="layer4")(x, k=2))


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
def test_constants_are_folded_except_where_folding_would_store_a_weight_twice(exports):
    graph = onnx.load(str(exports("mini-resnet18"))).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    sizes |= {o: 1 for n in graph.node if n.op_type == "Constant" for o in n.output}
    foldable = [(n.op_type, [sizes[i] for i in n.input]) for n in graph.node
                if n.op_type != "Constant" and n.input and all(i in sizes for i in n.input if i)]
    # Those left would each store a weight a second time: the classifier's transposed for the backward, and each
    # unstrided convolution's, flipped for its input gradient (onnxruntime folds them in memory when it loads).
    unstrided = [m.weight.numel() for m in model("mini-resnet18").modules() if isinstance(m, nn.Conv2d) and m.stride == (1, 1)]
    assert sorted(foldable) == sorted([("Transpose", [512 * 1000])] + [("Reshape", [n, 5]) for n in unstrided])


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
def test_maps_are_upsampled_by_two_matmuls_not_by_a_resize_or_index_gathers(exports):
    # Traced through autograd, a bilinear resize becomes four GatherNDs: resnet18's top-5 Grad-CAM in onnxruntime
    # ran at 0.72x its plain inference with them, 0.94x with one Resize (benchmarks/results/cpu-backends.json);
    # as R_h @ maps @ R_w^T (with the gather below) the ops resnet18's explanation adds took 3.3 ms a call at batch 16
    # instead of 6 ms (benchmarks/results/onnx-profile.md).
    nodes = onnx.load(str(exports("mini-resnet18"))).graph.node
    producer = {o: n for n in nodes for o in n.output}
    last = producer["gradcam"]  # Grad-CAM's 2x2 maps; saliency's are at the input's size already
    assert (last.op_type, producer[last.input[0]].op_type) == ("MatMul", "MatMul")
    assert not {"Resize", "GatherND"} & {n.op_type for n in nodes}


@pytest.mark.parametrize("align_corners", [False, True])
def test_a_resize_as_interpolation_matrices_equals_torchs_bilinear_resize(align_corners):
    from fastattr import _export as graph

    def upsample(maps):
        return torch.nn.functional.interpolate(maps, size=(9, 11), mode="bilinear", align_corners=align_corners)

    maps = torch.rand(5, 3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    traced = graph.resize_ops_for_onnx(graph.trace(upsample, (maps,)))
    assert torch.ops.aten.matmul.default in {n.target for n in traced.graph.nodes}
    torch.testing.assert_close(traced(maps), upsample(maps), rtol=0, atol=1e-15)


@ONE_EXPORT
@pytest.mark.slow  # an ONNX export of a whole model
def test_the_classifiers_backward_gathers_the_classes_weight_rows_instead_of_multiplying_by_one_hots(exports):
    # One-hot cotangents [K * N, 1000] times the weight [1000, 512] in resnet18: the same numbers as a row gather.
    graph = onnx.load(str(exports("mini-resnet18"))).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    transposed = {o: shapes.get(n.input[0], [])[::-1] for n in graph.node if n.op_type == "Transpose" for o in n.output}
    gathered = [shapes.get(n.input[0]) or transposed.get(n.input[0]) for n in graph.node if n.op_type == "Gather"]
    assert [1000, 512] in gathered
    assert "Equal" not in [n.op_type for n in graph.node]  # no one-hot is built


@pytest.mark.slow  # an ONNX export of a whole model
def test_every_method_exports_to_one_file_whose_outputs_equal_the_torch_path(tmp_path):
    # SmoothGrad's noise is an input of the graph ("noise", [N, samples, C, H, W]); OnnxExplainer draws it from
    # the export's seed as the Explainer does, or takes it from the caller. Ablation-CAM's copies run through
    # the head above layer4 alone, which the export holds; the other perturbation methods it refuses.
    names = (*COMPILABLE_METHODS, "ablationcam")
    options = dict(layer="layer4", methods=names, samples=2, steps=2)
    path = fastattr.export_onnx(model("mini-resnet18"), tmp_path / "all.onnx", k=2, input_shape=(3, 64, 64), **options)
    explainer = fastattr.OnnxExplainer(path)
    assert explainer.meta["inputs"] == ["images", "noise"]
    assert explainer.meta["outputs"] == ["logits", "classes", *names, "completeness"]
    eager = fastattr.Explainer(model("mini-resnet18"), **options)
    for n in (1, 3):
        x = images(n, seed=30 + n)
        got, want = explainer(x), eager(x, k=2)
        assert_same_explanation(got, want)
        torch.testing.assert_close(got.completeness, want.completeness, rtol=1e-3, atol=1e-3)
    noise = torch.randn(1, 2, 3, 64, 64)
    assert_same_explanation(explainer(images(1), noise=noise), eager(images(1), k=2, noise=noise))


@pytest.mark.slow  # an ONNX export of a whole model
def test_a_flat_saliency_map_stays_zero_in_onnxruntime(tmp_path):
    # A zero head gives zero gradients; saliency's normalisation then divides 0 by eps. onnxscript's optimiser
    # removes a scalar `+ 1e-8` as `+ 0` (absolute tolerance 1e-8), which made the exported map 0 / 0 = NaN.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    nn.init.zeros_(net[4].weight)
    path = fastattr.export_onnx(net, tmp_path / "flat.onnx", layer="1", methods="saliency", k=1, input_shape=(3, 16, 16))
    out = fastattr.OnnxExplainer(path)(torch.randn(2, 3, 16, 16))
    assert torch.equal(out.maps["saliency"], torch.zeros(2, 1, 16, 16))


def wide_net() -> nn.Module:
    """A conv and a linear layer of 2.2 MB in float32 for 16x16 images (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 350)).eval()


@pytest.mark.slow  # an ONNX export
def test_weights_past_the_inline_limit_are_written_beside_the_file_once(tmp_path, monkeypatch):
    # The limit stands below protobuf's 2 GB; lowered here to 1 MB so that a 2.2 MB model crosses it the way a
    # 2.2 GB one crosses the real limit (the same code path, without writing 2 GB). Unasked, the weights go to
    # `<path>.data`, once: the file is the size of the parameters, not twice it.
    assert fastattr.export.EXTERNAL_DATA_BYTES < 2**31
    monkeypatch.setattr(fastattr.export, "EXTERNAL_DATA_BYTES", 2**20)
    net = wide_net()
    weights = sum(p.numel() for p in net.parameters()) * 4
    assert weights > 2**21
    path = fastattr.export_onnx(net, tmp_path / "big.onnx", layer="1", methods=("gradcam", "saliency"), k=2,
                                input_shape=(3, 16, 16))
    assert path.stat().st_size < 2**17
    assert 0.99 * weights < (tmp_path / "big.onnx.data").stat().st_size < 1.01 * weights  # tiny tensors stay inline
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert_same_explanation(fastattr.OnnxExplainer(path)(x),
                            fastattr.Explainer(net, layer="1", methods=("gradcam", "saliency"))(x, k=2))


@pytest.mark.slow  # an ONNX export
def test_weights_under_the_inline_limit_stay_in_the_file(tmp_path):
    net = wide_net()
    path = fastattr.export_onnx(net, tmp_path / "small.onnx", layer="1", methods="gradcam", k=1, input_shape=(3, 16, 16))
    assert not (tmp_path / "small.onnx.data").exists()
    assert path.stat().st_size > sum(p.numel() for p in net.parameters()) * 4
