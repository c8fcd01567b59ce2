"""Issue 19's throughput figures, CPU, float32, resnet18 at 224x224 (benchmarks/results/cpu-perturbation.json).

The perturbation methods and the deletion metric are forward-bound: their limit is P forwards per image at
batched plain-inference throughput, so each case records `forwards_per_image`, and the report divides the
plain-inference images/s by it. Peers on the same images, layer and class (the top-1):
- Score-CAM: pytorch-grad-cam's `ScoreCAM` (its default 16 masked images per forward) at "layer4";
- Ablation-CAM: pytorch-grad-cam's `AblationCAM` (its default 32 ablations per forward) at "layer4" and
  "layer3": it reruns the whole network per ablated channel, fastattr only the head above the layer;
- occlusion: captum's `Occlusion` with `perturbations_per_eval=16` (its batching; the default is 1), a 32-pixel
  window and stride 16;
- deletion: 32 steps (33 forwards), no peer installed here;
- ROAD: pytorch-grad-cam's `ROADCombined` at its percentiles 10, 20, ..., 90 (a scipy solve per image, channel
  and removal, and a clean forward per percentile and order); fastattr's `metrics.road` at the same, one clean
  forward and 18 imputed copies (19 forwards), its imputation solved in torch.
"""

import pytest
import torch

import fastattr
from fastattr import metrics
from harness import FULL, SIZE, images, model, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

NAME, CHUNK = "resnet18", 16
WINDOW, STRIDE, STEPS = (32, 16, 32) if FULL else (32, 16, 4)
WINDOWS = (-(-(SIZE - WINDOW) // STRIDE) + 1) ** 2
CHANNELS = {"layer4": 512, "layer3": 256}


def fastattr_case(method: str, layer: str = "layer4"):
    e = fastattr.Explainer(model(NAME), layer=layer, methods=method, window=WINDOW, stride=STRIDE, sample_batch=CHUNK)
    x = images(1)
    return lambda: e(x, k=1)


def grad_cam_case(cam_class, layer: str, **options):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, x = model(NAME), images(1)
    with torch.no_grad():
        target = [ClassifierOutputTarget(int(net(x).argmax()))]
    cam = cam_class(model=net, target_layers=[net.get_submodule(layer)], **options)
    return lambda: cam(input_tensor=x, targets=target)


def captum_occlusion_case():
    from captum.attr import Occlusion

    net, x = model(NAME), images(1)
    with torch.no_grad():
        target = int(net(x).argmax())
    peer = Occlusion(net)
    return lambda: peer.attribute(x, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, STRIDE, STRIDE),
                                  baselines=0, target=target, perturbations_per_eval=CHUNK)


def deletion_case():
    net, x = model(NAME), images(1)
    out = fastattr.Explainer(net, layer="layer4", methods="gradcam")(x, k=1)
    return lambda: metrics.deletion(net, x, out.maps["gradcam"], out.classes, steps=STEPS, sample_batch=CHUNK)


def road_case():
    net, x = model(NAME), images(1)
    out = fastattr.Explainer(net, layer="layer4", methods="gradcam")(x, k=1)
    return lambda: metrics.road(net, x, out.maps["gradcam"], out.classes, sample_batch=CHUNK)


def grad_cam_road_case():
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net, x = model(NAME), images(1)
    out = fastattr.Explainer(net, layer="layer4", methods="gradcam")(x, k=1)
    maps, target = out.maps["gradcam"][:, 0].numpy(), [ClassifierOutputSoftmaxTarget(int(out.classes[0, 0]))]
    peer = ROADCombined(percentiles=list(metrics.ROAD_PERCENTILES))
    return lambda: peer(x, maps, target, net)


def plain_case():
    net, x = model(NAME), images(CHUNK)

    def infer():
        with torch.no_grad():
            return net(x)
    return infer


CASES = {
    # case: (group, images per call, forwards per image, how to build it)
    "plain-inference": ("plain inference", CHUNK, 1, plain_case),
    "fastattr-scorecam": ("scorecam layer4", 1, CHANNELS["layer4"], lambda: fastattr_case("scorecam")),
    "pytorch-grad-cam-scorecam": ("scorecam layer4", 1, CHANNELS["layer4"], lambda: grad_cam_case(
        __import__("pytorch_grad_cam").ScoreCAM, "layer4")),
    "fastattr-ablationcam-layer4": ("ablationcam layer4", 1, CHANNELS["layer4"], lambda: fastattr_case("ablationcam")),
    "pytorch-grad-cam-ablationcam-layer4": ("ablationcam layer4", 1, CHANNELS["layer4"], lambda: grad_cam_case(
        __import__("pytorch_grad_cam").AblationCAM, "layer4")),
    "fastattr-ablationcam-layer3": ("ablationcam layer3", 1, CHANNELS["layer3"],
                                    lambda: fastattr_case("ablationcam", "layer3")),
    "pytorch-grad-cam-ablationcam-layer3": ("ablationcam layer3", 1, CHANNELS["layer3"], lambda: grad_cam_case(
        __import__("pytorch_grad_cam").AblationCAM, "layer3")),
    "fastattr-occlusion": ("occlusion", 1, WINDOWS, lambda: fastattr_case("occlusion")),
    "captum-occlusion": ("occlusion", 1, WINDOWS, captum_occlusion_case),
    "fastattr-deletion": ("deletion", 1, STEPS + 1, deletion_case),
    "fastattr-road": ("road", 1, 2 * len(metrics.ROAD_PERCENTILES) + 1, road_case),
    "pytorch-grad-cam-road": ("road", 1, 2 * len(metrics.ROAD_PERCENTILES) + 1, grad_cam_road_case),
}


@pytest.mark.parametrize("case", list(CASES))
def test_perturbation(benchmark, rep, case):
    group, n, forwards, build = CASES[case]
    if case.startswith("pytorch-grad-cam"):
        pytest.importorskip("pytorch_grad_cam")
    if case.startswith("captum"):
        pytest.importorskip("captum")
    run(benchmark, build(), n, group=group, model=NAME, case=case, forwards_per_image=forwards)
