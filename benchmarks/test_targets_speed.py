"""Issue 20's throughput figures, CPU, float32 (benchmarks/results/cpu-targets.json): Grad-CAM of a segmentation
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
from peer_adapters import OutMap

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


# Detection: Faster R-CNN-ResNet50-FPN (91 classes, random weights) resizing its input to DETECTION_SIZE, Grad-CAM at
# "backbone.body.layer4" of the 5 highest-scoring detections. Its random classifier scores every class near 1/91,
# below the default box threshold of 0.05, so the threshold is 0.001 (the detector then keeps 100 boxes).
# fastattr: `targets.detections(5)`, one forward and 5 backwards above the layer, on the eager hook path.
# pytorch-grad-cam: its detection tutorial's way, `FasterRCNNBoxScoreTarget` with the detection's label and box
# (found by a plain forward first, outside the timer), one call per detection, as it gives one map per call.
DETECTION_SIZE, DETECTION_LAYER = (320 if FULL else 64), "backbone.body.layer4"


@functools.cache
def faster_rcnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=DETECTION_SIZE, max_size=DETECTION_SIZE,
        box_score_thresh=0.001).eval()


@functools.cache
def detection_image() -> torch.Tensor:
    return torch.randn(1, 3, DETECTION_SIZE, DETECTION_SIZE, generator=torch.Generator().manual_seed(0))


def fastattr_detection_case():
    explainer = fastattr.Explainer(faster_rcnn(), DETECTION_LAYER, "gradcam", output=targets.detections(K))
    return lambda: explainer(detection_image(), k=K)


def grad_cam_detection_case():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    net, x = faster_rcnn(), detection_image()
    with torch.no_grad():
        top = targets.top_detections(net(x), K)[0]
    boxes = [(int(label), box[None].numpy()) for label, box in zip(top["labels"], top["boxes"])]

    def explain():
        maps = []
        for label, box in boxes:
            with GradCAM(model=net, target_layers=[net.get_submodule(DETECTION_LAYER)]) as cam:
                maps.append(cam(input_tensor=x, targets=[FasterRCNNBoxScoreTarget([label], box)]))
        return maps
    return explain


DETECTION_CASES = {"fastattr-detection-top5": fastattr_detection_case,
                   "pytorch-grad-cam-detection-top5": grad_cam_detection_case}


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
@pytest.mark.parametrize("case", list(DETECTION_CASES))
def test_detection_top5(benchmark, rep, case):
    if case.startswith("pytorch-grad-cam"):
        pytest.importorskip("pytorch_grad_cam")
    run(benchmark, DETECTION_CASES[case](), 1, group="detection gradcam top-5", model="fasterrcnn_resnet50_fpn",
        case=case, size=DETECTION_SIZE, targets=K)
