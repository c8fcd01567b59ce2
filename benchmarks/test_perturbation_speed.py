"""Issue 19's throughput figures, CPU, float32, resnet18 and resnet50 at 224x224
(benchmarks/results/cpu-perturbation.json).

The perturbation methods and the deletion metric are forward-bound: their limit is P forwards per image at
batched plain-inference throughput, so each case records `forwards_per_image`, and the report divides the
plain-inference images/s of its model by it. Peers on the same images, layer and class (the top-1):
- Score-CAM: pytorch-grad-cam's `ScoreCAM` (its default 16 masked images per forward) and torchcam's `ScoreCAM`
  (batch_size 16) at "layer4";
- Ablation-CAM: pytorch-grad-cam's `AblationCAM` (its default 32 ablations per forward) at "layer4" and
  "layer3": it reruns the whole network per ablated channel, fastattr only the head above the layer;
- occlusion: captum's `Occlusion` with `perturbations_per_eval=16` (its batching; the default is 1), a 32-pixel
  window and stride 16;
- deletion: 32 steps (33 forwards) against Quantus's `PixelFlipping`, whose features are (channel, pixel) pairs
  and whose step must divide the pixels: 1568 features a step, 96 steps (forwards) for the curve, every third
  of them one of fastattr's (tests/test_metrics.py); deletion and insertion together (baseline 0, softmax)
  against torchcam's `DeletionInsertionMetric` at the same 32 steps;
- ROAD: pytorch-grad-cam's `ROADCombined` at its percentiles 10, 20, ..., 90 (a scipy solve per image, channel
  and removal, and a clean forward per percentile and order); fastattr's `metrics.road` at the same, one clean
  forward and 18 imputed copies (19 forwards), its imputation solved in torch.
Compiled cases (`-compiled`) compile each chunk's forward with inductor (the warm-up call compiles); ROAD's
forwards a model wrapped by `torch.compile`, as a user of `metrics.road` would.
resnet50 runs the groups whose peers finish in minutes. With FASTATTR_BENCH_LONG=1 it also runs the cases of
minutes a call here: Score-CAM (fastattr's, eager and compiled, and both peers'), pytorch-grad-cam's Ablation-CAM
(the whole of resnet50 forwarded 2048 times an image at layer4, 1024 at layer3) beside fastattr's at layer3, and
the compiled occlusion. The eager ones of them run one timed call and no warm-up call (`ONE_CALL`: at a thousand
forwards a warm-up would double the minutes and change nothing the timer sees); a compiled case keeps its
warm-up, which compiles.
"""

import importlib
import os

import pytest
import torch

import fastattr
from fastattr import metrics
from harness import COMPILE_BACKEND, FULL, SIZE, images, model, run
from peer_adapters import GivenMaps

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

# Smoke mode (the test command) runs resnet18 alone: every case of resnet50 is one of resnet18's.
MODELS = ("resnet18", "resnet50") if FULL else ("resnet18",)
LONG = FULL and os.environ.get("FASTATTR_BENCH_LONG") == "1"

CHUNK = 16
WINDOW, STRIDE, STEPS = (32, 16, 32) if FULL else (32, 16, 4)
WINDOWS = (-(-(SIZE - WINDOW) // STRIDE) + 1) ** 2
CHANNELS = {("resnet18", "layer4"): 512, ("resnet18", "layer3"): 256, ("resnet50", "layer4"): 2048,
            ("resnet50", "layer3"): 1024}


def fastattr_case(name: str, method: str, layer: str = "layer4", compiled: bool = False):
    compile = {"backend": COMPILE_BACKEND} if compiled else False
    e = fastattr.Explainer(model(name), layer=layer, methods=method, window=WINDOW, stride=STRIDE, sample_batch=CHUNK,
                           compile=compile)
    x = images(1)
    return lambda: e(x, k=1)


def top_class(net, x) -> int:
    with torch.no_grad():
        return int(net(x).argmax())


def grad_cam_case(name: str, cam_class, layer: str, **options):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net, x = model(name), images(1)
    target = [ClassifierOutputTarget(top_class(net, x))]
    cam = cam_class(model=net, target_layers=[net.get_submodule(layer)], **options)
    return lambda: cam(input_tensor=x, targets=target)


def torchcam_score_cam_case(name: str):
    from torchcam.methods import ScoreCAM

    net, x = model(name), images(1)
    target = top_class(net, x)

    def explain():
        with ScoreCAM(net, "layer4", batch_size=CHUNK, input_shape=tuple(x.shape[1:])) as extractor:
            with torch.no_grad():
                scores = net(x)
            return extractor(class_idx=target, scores=scores)
    return explain


def captum_occlusion_case(name: str):
    from captum.attr import Occlusion

    net, x = model(name), images(1)
    target = top_class(net, x)
    peer = Occlusion(net)
    return lambda: peer.attribute(x, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, STRIDE, STRIDE),
                                  baselines=0, target=target, perturbations_per_eval=CHUNK)


def gradcam_of(net, x):
    return fastattr.Explainer(net, layer="layer4", methods="gradcam")(x, k=1)


def deletion_case(name: str):
    net, x = model(name), images(1)
    out = gradcam_of(net, x)
    return lambda: metrics.deletion(net, x, out.maps["gradcam"], out.classes, steps=STEPS, sample_batch=CHUNK)


def quantus_deletion_case(name: str):
    import quantus

    net, x = model(name), images(1)
    out = gradcam_of(net, x)
    # Quantus flips (channel, pixel) features, HW / STEPS of them a step (it takes no step that is not a divisor of
    # HW): every third of its 3 * STEPS steps has removed the pixels of one of fastattr's steps.
    peer = quantus.PixelFlipping(features_in_step=SIZE * SIZE // STEPS, perturb_baseline=0.0, normalise=False,
                                 abs=False, disable_warnings=True)
    a = out.maps["gradcam"].numpy()
    return lambda: peer(model=net, x_batch=x.numpy(), y_batch=out.classes[:, 0].numpy(), a_batch=a, softmax=True,
                        device="cpu")


def deletion_insertion_case(name: str):
    net, x = model(name), images(1)
    out = gradcam_of(net, x)
    maps, classes = out.maps["gradcam"], out.classes

    def both():
        return (metrics.deletion(net, x, maps, classes, steps=STEPS, baseline=0.0, sample_batch=CHUNK),
                metrics.insertion(net, x, maps, classes, steps=STEPS, baseline=0.0, sample_batch=CHUNK))
    return both


def torchcam_deletion_insertion_case(name: str):
    from torchcam.metrics import DeletionInsertionMetric

    net, x = model(name), images(1)
    out = gradcam_of(net, x)
    given = GivenMaps(net, out.maps["gradcam"][:, 0])
    target = int(out.classes[0, 0])

    def both():
        peer = DeletionInsertionMetric(given, lambda z: z.softmax(-1), steps=STEPS)
        peer.update(x, class_idx=target)
        return peer.summary()
    return both


def road_case(name: str, compiled: bool = False):
    net, x = model(name), images(1)
    out = gradcam_of(net, x)
    # Compiled: the metric forwards a compiled model (a wrapper: the model itself is unchanged); the warm-up call
    # compiles its three batch sizes (the clean image, a chunk of 16 copies, the last 2).
    scored = torch.compile(net, backend=COMPILE_BACKEND) if compiled else net
    return lambda: metrics.road(scored, x, out.maps["gradcam"], out.classes, sample_batch=CHUNK)


def grad_cam_road_case(name: str):
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net, x = model(name), images(1)
    out = gradcam_of(net, x)
    maps, target = out.maps["gradcam"][:, 0].numpy(), [ClassifierOutputSoftmaxTarget(int(out.classes[0, 0]))]
    peer = ROADCombined(percentiles=list(metrics.ROAD_PERCENTILES))
    return lambda: peer(x, maps, target, net)


def plain_case(name: str):
    net, x = model(name), images(CHUNK)

    def infer():
        with torch.no_grad():
            return net(x)
    return infer


def cases(name: str) -> dict:
    """case: (group, images per call, forwards per image, how to build it), the peers' cases named after them."""
    pgc = importlib.import_module
    road_forwards = 2 * len(metrics.ROAD_PERCENTILES) + 1
    out = {
        "plain-inference": ("plain inference", CHUNK, 1, lambda: plain_case(name)),
        "fastattr-ablationcam-layer4": ("ablationcam layer4", 1, CHANNELS[name, "layer4"],
                                        lambda: fastattr_case(name, "ablationcam")),
        "fastattr-occlusion": ("occlusion", 1, WINDOWS, lambda: fastattr_case(name, "occlusion")),
        "captum-occlusion": ("occlusion", 1, WINDOWS, lambda: captum_occlusion_case(name)),
        "fastattr-deletion": ("deletion", 1, STEPS + 1, lambda: deletion_case(name)),
        "quantus-deletion": ("deletion", 1, 3 * STEPS, lambda: quantus_deletion_case(name)),
        "fastattr-road": ("road", 1, road_forwards, lambda: road_case(name)),
        "fastattr-road-compiled": ("road", 1, road_forwards, lambda: road_case(name, compiled=True)),
        "pytorch-grad-cam-road": ("road", 1, road_forwards, lambda: grad_cam_road_case(name)),
    }
    # Score-CAM, the peers' Ablation-CAM and the compiled forms: resnet18's always, resnet50's (minutes a call)
    # with FASTATTR_BENCH_LONG=1.
    if name == "resnet18" or LONG:
        layer4, layer3 = CHANNELS[name, "layer4"], CHANNELS[name, "layer3"]
        out |= {
            "fastattr-scorecam": ("scorecam layer4", 1, layer4, lambda: fastattr_case(name, "scorecam")),
            "fastattr-scorecam-compiled": ("scorecam layer4", 1, layer4,
                                           lambda: fastattr_case(name, "scorecam", compiled=True)),
            "pytorch-grad-cam-scorecam": ("scorecam layer4", 1, layer4, lambda: grad_cam_case(
                name, pgc("pytorch_grad_cam").ScoreCAM, "layer4")),
            "torchcam-scorecam": ("scorecam layer4", 1, layer4, lambda: torchcam_score_cam_case(name)),
            "pytorch-grad-cam-ablationcam-layer4": ("ablationcam layer4", 1, layer4, lambda: grad_cam_case(
                name, pgc("pytorch_grad_cam").AblationCAM, "layer4")),
            "fastattr-ablationcam-layer3": ("ablationcam layer3", 1, layer3,
                                            lambda: fastattr_case(name, "ablationcam", "layer3")),
            "fastattr-ablationcam-layer3-compiled": ("ablationcam layer3", 1, layer3,
                                                     lambda: fastattr_case(name, "ablationcam", "layer3", True)),
            "pytorch-grad-cam-ablationcam-layer3": ("ablationcam layer3", 1, layer3, lambda: grad_cam_case(
                name, pgc("pytorch_grad_cam").AblationCAM, "layer3")),
            "fastattr-occlusion-compiled": ("occlusion", 1, WINDOWS,
                                            lambda: fastattr_case(name, "occlusion", compiled=True)),
        }
    if name == "resnet18":
        out |= {
            "fastattr-deletion-insertion": ("deletion and insertion", 1, 2 * (STEPS + 1),
                                            lambda: deletion_insertion_case(name)),
            "torchcam-deletion-insertion": ("deletion and insertion", 1, 2 * (STEPS + 1),
                                            lambda: torchcam_deletion_insertion_case(name)),
        }
    return out


CASES = {(name, case): spec for name in MODELS for case, spec in cases(name).items()}
# The eager cases that forward the whole of resnet50 1024 or 2048 times an image: one timed call, no warm-up.
ONE_CALL = {("resnet50", case) for case in ("fastattr-scorecam", "pytorch-grad-cam-scorecam", "torchcam-scorecam",
                                            "pytorch-grad-cam-ablationcam-layer4",
                                            "pytorch-grad-cam-ablationcam-layer3")}
PEERS = {"pytorch-grad-cam": "pytorch_grad_cam", "captum": "captum", "torchcam": "torchcam", "quantus": "quantus"}


@pytest.mark.parametrize("name,case", list(CASES), ids=[f"{n}-{c}" for n, c in CASES])
def test_perturbation(benchmark, rep, name, case):
    group, n, forwards, build = CASES[name, case]
    if peer := next((p for p in PEERS if case.startswith(p + "-")), None):
        pytest.importorskip(PEERS[peer])
    run(benchmark, build(), n, warmup_rounds=0 if (name, case) in ONE_CALL else 1, group=f"{group} {name}",
        model=name, case=f"{name}-{case}", forwards_per_image=forwards)
