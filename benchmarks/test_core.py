"""The core engine against the floors it aims for and the loops users write, CPU, float32.

Goals (issue 2), resnet50 at 224x224, batch 16:
- fused top-5 Grad-CAM at `layer4` >= 0.85x plain inference, and >= 12x the article's reference;
- fused top-5 Grad-CAM at `layer3` (heavy head) at least as fast as the retain-graph loop;
- batched saliency >= 0.9x a bare forward + backward to the input; top-5 saliency >= the retain-graph loop.
"""

import pytest

import fastattr
from baselines import (article_gradcam, article_saliency, forward_backward_to_input, plain_inference,
                       retain_graph_loop)
from harness import BATCH, SMOKE, images, model, run

# Benchmarks run one at a time, in one process (a figure is worthless beside another run), and are slow.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

MODEL = "resnet18" if SMOKE else "resnet50"
REFERENCE_IMAGES = 1 if SMOKE else 2  # the article works one image at a time: its throughput needs no full batch


def explainer(layer, methods, k_form):
    return fastattr.Explainer(model(MODEL), layer=layer, methods=methods, k_form=k_form)


@pytest.mark.parametrize("case", ["inference", "fastattr-loop", "fastattr-vmap", "article"])
def test_gradcam_top5_layer4(benchmark, rep, case):
    net, x = model(MODEL), images()
    if case == "inference":
        fn, n = (lambda: plain_inference(net, x)), BATCH
    elif case == "article":
        xs = x[:REFERENCE_IMAGES]
        fn, n = (lambda: article_gradcam(net, net.layer4, xs, 5)), REFERENCE_IMAGES
    else:
        e = explainer("layer4", ("gradcam",), case.split("-")[1])
        fn, n = (lambda: e(x, k=5)), BATCH
    run(benchmark, fn, n, group="gradcam top-5 layer4", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["inference", "fastattr-loop", "fastattr-vmap", "retain-graph-loop"])
def test_gradcam_top5_layer3(benchmark, rep, case):
    net, x = model(MODEL), images()
    if case == "inference":
        fn = lambda: plain_inference(net, x)  # noqa: E731
    elif case == "retain-graph-loop":
        fn = lambda: retain_graph_loop(net, net.layer3, x, 5)  # noqa: E731
    else:
        e = explainer("layer3", ("gradcam",), case.split("-")[1])
        fn = lambda: e(x, k=5)  # noqa: E731
    run(benchmark, fn, BATCH, group="gradcam top-5 layer3", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["forward-backward-to-input", "fastattr"])
def test_saliency_top1(benchmark, rep, case):
    net, x = model(MODEL), images()
    if case == "fastattr":
        e = explainer(None, ("saliency",), "loop")
        fn = lambda: e(x)  # noqa: E731
    else:
        fn = lambda: forward_backward_to_input(net, x)  # noqa: E731
    run(benchmark, fn, BATCH, group="saliency top-1", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["retain-graph-loop", "fastattr-loop", "fastattr-vmap", "article"])
def test_saliency_top5(benchmark, rep, case):
    net, x = model(MODEL), images()
    if case == "retain-graph-loop":
        fn, n = (lambda: retain_graph_loop(net, None, x, 5)), BATCH
    elif case == "article":
        xs = x[:REFERENCE_IMAGES]
        fn, n = (lambda: article_saliency(net, xs, 5)), REFERENCE_IMAGES
    else:
        e = explainer(None, ("saliency",), case.split("-")[1])
        fn, n = (lambda: e(x, k=5)), BATCH
    run(benchmark, fn, n, group="saliency top-5", model=MODEL, case=case)


@pytest.mark.parametrize("case", ["inference", "fastattr"])
def test_gradcam_and_saliency_top5_one_pass(benchmark, rep, case):
    net, x = model(MODEL), images()
    if case == "inference":
        fn = lambda: plain_inference(net, x)  # noqa: E731
    else:
        e = explainer("layer4", ("gradcam", "saliency"), "loop")
        fn = lambda: e(x, k=5)  # noqa: E731
    run(benchmark, fn, BATCH, group="gradcam+saliency top-5", model=MODEL, case=case)
