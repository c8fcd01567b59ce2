"""The method family's costs (issue 7), CPU, float32, resnet18 at 224x224.

- Methods reading the same passes cost about one pass: four CAMs together against Grad-CAM alone, and
  ("gradcam", "gradcam++", "layercam", "saliency") against saliency alone, whose forward and backward to the
  input they share (Grad-CAM alone stops its backward at `layer4`, so it is cheaper than the four). Goal: <= 1.3x.
- SmoothGrad with 16 samples and Integrated Gradients with 32 steps against captum's NoiseTunnel and
  IntegratedGradients on the same images, top-1 class (captum explains one target per call).
- SmoothGrad's samples folded into the batch against the same passes vmapped over the samples: fastattr folds,
  this group is why.
"""

import warnings

import pytest
import torch
from torch.func import vmap

import fastattr
from baselines import captum_integrated_gradients, captum_smoothgrad
from fastattr import graph
from harness import SMOKE, images, model, run

# Benchmarks run one at a time, in one process (a figure is worthless beside another run), and are slow.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

MODEL = "resnet18"
BATCH = 2 if SMOKE else 8
SAMPLE_BATCH = 1 if SMOKE else 2
SAMPLES, STEPS = (2, 2) if SMOKE else (16, 32)
NOISE = 0.15
FOUR_CAMS = ("gradcam", "gradcam++", "xgradcam", "layercam")
SHARED = ("gradcam", "gradcam++", "layercam", "saliency")

warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")


def explainer(methods, **options):
    return fastattr.Explainer(model(MODEL), layer="layer4", methods=methods, **options)


@pytest.mark.parametrize("case", ["gradcam", "four-cams"])
def test_four_cams_share_one_pass(benchmark, rep, case):
    e, x = explainer(("gradcam",) if case == "gradcam" else FOUR_CAMS), images(BATCH)
    run(benchmark, lambda: e(x, k=5), BATCH, group="cams top-5", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["saliency", "gradcam+gradcam+++layercam+saliency"])
def test_cams_and_saliency_share_one_pass(benchmark, rep, case):
    e, x = explainer(("saliency",) if case == "saliency" else SHARED), images(BATCH)
    run(benchmark, lambda: e(x, k=5), BATCH, group="shared pass top-5", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["fastattr", "captum"])
def test_smoothgrad(benchmark, rep, case):
    x = images(SAMPLE_BATCH)
    if case == "fastattr":
        e = explainer("smoothgrad", samples=SAMPLES, noise=NOISE)
        fn = lambda: e(x)  # noqa: E731
    else:
        # captum's stdev is absolute: the same spread as fastattr's relative noise on these images.
        stdev = NOISE * float((x.amax() - x.amin()))
        fn = lambda: captum_smoothgrad(model(MODEL), x, SAMPLES, stdev)  # noqa: E731
    run(benchmark, fn, SAMPLE_BATCH, group=f"smoothgrad {SAMPLES} samples top-1", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["fastattr", "captum"])
def test_integrated_gradients(benchmark, rep, case):
    x = images(SAMPLE_BATCH)
    if case == "fastattr":
        e = explainer("ig", steps=STEPS)
        fn = lambda: e(x)  # noqa: E731
    else:
        fn = lambda: captum_integrated_gradients(model(MODEL), x, STEPS)  # noqa: E731
    run(benchmark, fn, SAMPLE_BATCH, group=f"integrated gradients {STEPS} steps top-1", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["fold", "vmap"])
def test_sample_passes_fold_into_the_batch(benchmark, rep, case):
    x = images(SAMPLE_BATCH)
    whole = graph.split(model(MODEL), None)
    points = x[:, None] + 0.1 * torch.randn(SAMPLE_BATCH, SAMPLES, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    classes = torch.arange(5 * SAMPLE_BATCH).view(SAMPLE_BATCH, 5)
    if case == "fold":
        fn = lambda: graph.grads_at(whole, points, classes)  # noqa: E731
    else:
        def one_sample(p):
            return graph.forward_backward(whole, p, classes, 5, input_grads=True).input_grads
        fn = lambda: vmap(one_sample, in_dims=1, out_dims=1)(points)  # noqa: E731
    run(benchmark, fn, SAMPLE_BATCH, group=f"{SAMPLES} samples top-5: fold or vmap", model=MODEL, case=case)
