"""Half precision runs the model under autocast; the maps' error against float32 is bounded as measured
(benchmarks/results/half-precision.md: resnet18 Grad-CAM max abs 0.010 in float16, 0.053 in bfloat16)."""

import pytest
import torch

import fastattr
from models import images, model


# Bounds from the measured table with margin: float16 Grad-CAM 0.010 / saliency corr 0.973, bfloat16
# Grad-CAM 0.053 / saliency corr 0.865 (the lowest of one map).
@pytest.mark.parametrize("dtype,bound,correlation", [(torch.float16, 0.05, 0.95), (torch.bfloat16, 0.15, 0.8)])
def test_half_precision_gradcam_stays_near_float32_and_returns_float32(dtype, bound, correlation):
    net, x = model("resnet18"), images(4)
    full = fastattr.Explainer(net, layer="layer4", methods=("gradcam", "saliency"))(x, k=3)
    half = fastattr.Explainer(net, layer="layer4", methods=("gradcam", "saliency"), dtype=dtype)(x, classes=full.classes)
    assert half.logits.dtype == half.maps["gradcam"].dtype == half.maps["saliency"].dtype == torch.float32
    assert (half.maps["gradcam"] - full.maps["gradcam"]).abs().max() <= bound
    assert torch.corrcoef(torch.stack([half.maps["saliency"].flatten(), full.maps["saliency"].flatten()]))[0, 1] >= correlation
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_an_unsupported_half_dtype_is_refused():
    with pytest.raises(fastattr.InputError, match=r"dtype: expected None, torch.bfloat16 or torch.float16, got torch.float64"):
        fastattr.Explainer(model("resnet18"), dtype=torch.float64)
