"""Issue 20's throughput figure, CPU, float32 (benchmarks/results/cpu-targets.json): Grad-CAM of a segmentation
target for the top-5 classes of torchvision's DeepLabV3-ResNet50 (21 classes, random weights) at 256x256, at
"backbone.layer4".

fastattr explains the 5 classes in one call: one forward, 5 backwards of the head above the layer. pytorch-grad-cam
explains one `SemanticSegmentationTarget` per call, as its segmentation tutorial does: the same 5 classes, each
with the mask of the pixels whose argmax is that class (fastattr's `targets.segmentation()` by definition), each
call a forward and a backward through the whole network.
"""

import functools

import pytest
import torch
import torchvision

import fastattr
from fastattr import targets
from harness import FULL, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

SIZE, K, LAYER = (256 if FULL else 64), 5, "backbone.layer4"


@functools.cache
def deeplab() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None).eval()


@functools.cache
def image() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def fastattr_case():
    explainer = fastattr.Explainer(deeplab(), LAYER, "gradcam", output=targets.segmentation())
    return lambda: explainer(image(), k=K)


class OutMap(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["out"]


def grad_cam_case():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    net, x = deeplab(), image()
    with torch.no_grad():
        out = net(x)["out"]
    scores = targets.segmentation()(out)[0]
    argmax = out[0].argmax(0)
    masks = {int(c): (argmax == c).float().numpy() for c in scores.topk(K).indices}
    wrapped = OutMap(net).eval()

    def explain():
        maps = []
        for c, mask in masks.items():
            with GradCAM(model=wrapped, target_layers=[net.get_submodule(LAYER)]) as cam:
                maps.append(cam(input_tensor=x, targets=[SemanticSegmentationTarget(c, mask)]))
        return maps
    return explain


CASES = {"fastattr-segmentation-top5": fastattr_case, "pytorch-grad-cam-segmentation-top5": grad_cam_case}


@pytest.mark.parametrize("case", list(CASES))
def test_segmentation_top5(benchmark, rep, case):
    if case.startswith("pytorch-grad-cam"):
        pytest.importorskip("pytorch_grad_cam")
    run(benchmark, CASES[case](), 1, group="segmentation gradcam top-5", model="deeplabv3_resnet50", case=case,
        size=SIZE, targets=K)
