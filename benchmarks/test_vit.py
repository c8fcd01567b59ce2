"""Vision transformers (issue 9), CPU, float32: ViT-B/16 at 224x224, batch 16, top-5 Grad-CAM at the last
block's first norm, against plain inference and pytorch-grad-cam with the `reshape_transform` its docs give
for ViTs; the K-class backward as a loop and vmapped, to pick the form by measurement.

pytorch-grad-cam makes one forward and one full backward per class; it runs on 4 of the 16 images (its cost
per image does not depend on the batch), without a warm-up round, to keep the run short.
"""

import functools

import pytest
import torch
import torchvision

import fastattr
from baselines import grad_cam_package, plain_inference
from harness import SMOKE, run

# Benchmarks run one at a time, in one process (a figure is worthless beside another run), and are slow.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

BATCH, PEER_BATCH = (2, 1) if SMOKE else (16, 4)
SIZE, PATCH = (32, 8) if SMOKE else (224, 16)
GROUP = f"vit top-5 gradcam {SIZE}px"


@functools.cache
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    if SMOKE:
        return torchvision.models.VisionTransformer(image_size=SIZE, patch_size=PATCH, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64).eval()
    return torchvision.models.vit_b_16().eval()


@functools.cache
def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def vit_reshape_transform(tensor: torch.Tensor, height: int = SIZE // PATCH, width: int = SIZE // PATCH):
    """pytorch-grad-cam's documented reshape for ViTs: drop the class token, tokens to a grid, channels first."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


@pytest.mark.parametrize("case", ["inference", "fastattr-loop", "fastattr-vmap", "pytorch-grad-cam"])
def test_vit_gradcam_top5(benchmark, rep, case):
    net = vit()
    if case == "inference":
        x = images(BATCH)
        fn, n, warmup = (lambda: plain_inference(net, x)), BATCH, 1
    elif case == "pytorch-grad-cam":
        from pytorch_grad_cam import GradCAM

        x = images(PEER_BATCH)
        cam = GradCAM(model=net, target_layers=[net.encoder.layers[-1].ln_1], reshape_transform=vit_reshape_transform)
        fn, n, warmup = (lambda: grad_cam_package(cam, net, x, 5)), PEER_BATCH, 0
    else:
        x = images(BATCH)
        e = fastattr.Explainer(net, methods="gradcam", k_form=case.split("-")[1])
        fn, n, warmup = (lambda: e(x, k=5)), BATCH, 1
    run(benchmark, fn, n, warmup_rounds=warmup, group=GROUP, model="vit_b_16" if not SMOKE else "vit-2-blocks",
        case=case)
