"""Issue 18's throughput figures, CPU, float32, 224x224 (benchmarks/results/cpu-sampling.json).

- SmoothGrad (16 samples) and Integrated Gradients (32 steps) with their points in chunks of `sample_batch`
  images (the default 16, and 4) against one pass over all points (`sample_batch=None`, the form before
  chunking), on a batch small enough for one pass to fit. Goal: the default chunk within 10 % of one pass.
- `fastattr.explain`, the one-shot call, against calls of one reused Explainer, and against a one-shot call
  whose Explainer is built anew each time (the cache cleared): the cost a call paid before it was kept.
  Goal: the one-shot call within 10 % of the reused Explainer.
"""

import pytest

import fastattr
from harness import SMOKE, images, model, run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmarks")]

SAMPLING_MODEL, SAMPLING_BATCH = "resnet18", 2
POINTS = {"smoothgrad": 2 if SMOKE else 16, "ig": 2 if SMOKE else 32}
CHUNKS = {"one-pass": None, "chunks-of-16": 16, "chunks-of-4": 4}
ONE_SHOT_MODEL, ONE_SHOT_BATCH = ("resnet18", 2) if SMOKE else ("resnet50", 16)


@pytest.mark.parametrize("sampler", ["smoothgrad", "ig"])
@pytest.mark.parametrize("case", list(CHUNKS))
def test_chunked_points_against_one_pass(benchmark, rep, sampler, case):
    e = fastattr.Explainer(model(SAMPLING_MODEL), methods=(sampler,), samples=POINTS[sampler], steps=POINTS[sampler],
                           sample_batch=CHUNKS[case])
    x = images(SAMPLING_BATCH)
    run(benchmark, lambda: e(x), SAMPLING_BATCH, group=f"{sampler} {POINTS[sampler]} points top-1",
        model=SAMPLING_MODEL, case=case)


@pytest.mark.parametrize("case", ["reused-explainer", "one-shot", "one-shot-cleared"])
def test_one_shot_against_a_reused_explainer(benchmark, rep, case):
    net, x = model(ONE_SHOT_MODEL), images(ONE_SHOT_BATCH)
    fastattr.clear_cache()
    if case == "reused-explainer":
        e = fastattr.Explainer(net, "layer4")
        fn = lambda: e(x)  # noqa: E731
    elif case == "one-shot":
        fn = lambda: fastattr.explain(net, x, "layer4")  # noqa: E731
    else:
        def fn():
            fastattr.clear_cache()
            return fastattr.explain(net, x, "layer4")
    run(benchmark, fn, ONE_SHOT_BATCH, group="one-shot gradcam top-1", model=ONE_SHOT_MODEL, case=case)
