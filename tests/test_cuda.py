"""The CUDA paths, against the reference on the CPU. Skipped without a GPU; `scripts/cuda_check.sh` runs
them on one.

Tolerances. float64 on CUDA equals the CPU reference to 1e-9: only the order of summation differs. float32
maps are compared as test_compile compares them: max abs <= 0.1 of the normalised maps, Pearson correlation
>= 0.999 per map, logits to 1e-4. These tests turn TF32 off: torch's default runs cuDNN's convolutions in
TF32 (10 bits of mantissa), which moved logits by up to 2e-3 and left a layer3 Grad-CAM at correlation 0.996
with the reference on an H200; benchmarks/results/half-precision-cuda.md measures TF32's effect per model.
"""

import copy

import numpy as np
import pytest
import torch

import fastattr
from models import images, model
from test_compile import assert_order_sensitive_close, assert_same_explanation
from test_parity import reference_maps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GRADCAM_AND_SALIENCY = dict(layer="layer3", methods=("gradcam", "saliency"), upsample=False)


def on_cuda(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return copy.deepcopy(model(name, dtype)).cuda()


@pytest.fixture(autouse=True)
def full_float32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_cpu(out: fastattr.Explanation) -> fastattr.Explanation:
    return fastattr.Explanation(out.logits.cpu(), out.classes.cpu(), {k: v.cpu() for k, v in out.maps.items()},
                                out.layer)


def test_float64_attribution_on_cuda_equals_the_cpu_reference():
    x = images(2, torch.float64)
    out = fastattr.Explainer(on_cuda("resnet18", torch.float64), **GRADCAM_AND_SALIENCY)(x.cuda(), k=3)
    assert out.maps["gradcam"].is_cuda and out.classes.is_cuda
    cam, sal = reference_maps(model("resnet18", torch.float64), x, "layer3", out.classes.cpu())
    np.testing.assert_allclose(out.maps["gradcam"].cpu().numpy(), cam, rtol=0, atol=1e-9)
    np.testing.assert_allclose(out.maps["saliency"].cpu().numpy(), sal, rtol=0, atol=1e-9)


def test_float32_attribution_on_cuda_stays_near_the_cpu_reference():
    x = images(2)
    out = fastattr.Explainer(on_cuda("resnet18"), **GRADCAM_AND_SALIENCY)(x.cuda(), k=3)
    cam, sal = reference_maps(model("resnet18"), x, "layer3", out.classes.cpu())
    assert_order_sensitive_close(out.maps["gradcam"].cpu().numpy(), cam)
    assert_order_sensitive_close(out.maps["saliency"].cpu().numpy(), sal)


def test_images_on_the_cpu_for_a_cuda_model_are_refused_with_the_fix():
    with pytest.raises(fastattr.InputError, match=r"images: on cpu but the model is on cuda:0; use images.to\('cuda:0'\)"):
        fastattr.Explainer(on_cuda("resnet18"), layer="layer4")(images(2), k=1)


def test_compiled_attribution_on_cuda_equals_eager_for_k_1_and_3():
    net, x = on_cuda("resnet18"), images(3).cuda()
    compiled = fastattr.Explainer(net, compile=True, **GRADCAM_AND_SALIENCY)
    eager = fastattr.Explainer(net, **GRADCAM_AND_SALIENCY)
    for k in (1, 3):
        assert_same_explanation(on_cpu(compiled(x, k=k)), on_cpu(eager(x, k=k)))
    assert len(compiled.compile_seconds) == 2


def test_reduce_overhead_results_survive_the_next_call():
    # CUDA graphs replay into the same output memory; an Explanation must not change when the next call runs.
    net = on_cuda("resnet18")
    graphs = fastattr.Explainer(net, compile={"mode": "reduce-overhead"}, **GRADCAM_AND_SALIENCY)
    eager = fastattr.Explainer(net, **GRADCAM_AND_SALIENCY)
    batches = [images(2, seed=s).cuda() for s in (3, 4, 5)]
    outs = [graphs(x, k=3) for x in batches]
    for x, out in zip(batches, outs):
        assert_same_explanation(on_cpu(out), on_cpu(eager(x, k=3)))


@pytest.mark.parametrize("dtype,bound,correlation", [(torch.float16, 0.05, 0.95), (torch.bfloat16, 0.15, 0.8)])
def test_half_precision_on_cuda_stays_near_float32(dtype, bound, correlation):
    net, x = on_cuda("resnet18"), images(4).cuda()
    full = fastattr.Explainer(net, layer="layer4", methods=("gradcam", "saliency"))(x, k=3)
    half = fastattr.Explainer(net, layer="layer4", methods=("gradcam", "saliency"), dtype=dtype)(x, classes=full.classes)
    assert half.maps["gradcam"].dtype == torch.float32
    error = (half.maps["gradcam"] - full.maps["gradcam"]).abs().max().item()
    corr = torch.corrcoef(torch.stack([half.maps["saliency"].flatten(), full.maps["saliency"].flatten()]))[0, 1].item()
    assert error <= bound and corr >= correlation, (error, corr)


def test_a_program_exported_from_a_cuda_model_runs_on_cuda(tmp_path):
    net = on_cuda("resnet18")
    path = fastattr.export_program(net, tmp_path / "cuda.pt2", layer="layer4", k=2, input_shape=(3, 64, 64))
    x = images(3, seed=8).cuda()
    out = fastattr.load_program(path, trusted=True)(x)
    assert out.maps["gradcam"].is_cuda
    assert_same_explanation(on_cpu(out), on_cpu(fastattr.Explainer(net, layer="layer4")(x, k=2)))


def test_an_onnx_export_of_a_cuda_model_runs_in_onnxruntime_on_the_cpu(tmp_path):
    pytest.importorskip("onnxruntime")
    path = fastattr.export_onnx(on_cuda("resnet18"), tmp_path / "cuda.onnx", layer="layer4", k=2,
                                input_shape=(3, 64, 64))
    x = images(3, seed=9)
    assert_same_explanation(fastattr.OnnxExplainer(path)(x),
                            fastattr.Explainer(model("resnet18"), layer="layer4", methods=("gradcam", "saliency"))(x, k=2))


def test_an_aoti_package_from_a_cuda_model_equals_eager(tmp_path):
    net = on_cuda("resnet18")
    path = fastattr.export_program(net, tmp_path / "cuda-aoti.pt2", layer="layer4", k=2, input_shape=(3, 64, 64),
                                   aoti=True)
    x = images(3, seed=10).cuda()
    assert_same_explanation(on_cpu(fastattr.load_program(path, trusted=True)(x)),
                            on_cpu(fastattr.Explainer(net, layer="layer4")(x, k=2)))
