"""ROAD (Remove And Debias) and its noisy linear imputation, solved for a whole batch on the images' device."""

import pytest
import torch
import torch.nn.functional as F

import fastattr
from fastattr import metrics
from fastattr.imputation import noisy_linear_imputation
from models import images, model


def mask(rows: list[str]) -> torch.Tensor:
    """A removal mask [1, 1, H, W] drawn with '#' for removed pixels."""
    return torch.tensor([[c == "#" for c in row] for row in rows]).view(1, 1, len(rows), len(rows[0]))


def test_a_removed_pixel_takes_the_weighted_mean_of_its_eight_neighbours():
    # Edge neighbours weigh 1/6, diagonal ones 1/12: (1 + 3 + 7 + 9) / 12 + (2 + 4 + 6 + 8) / 6 = 5/3 + 10/3 = 5.
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    filled = noisy_linear_imputation(x, mask(["...", ".#.", "..."]), noise=0.0)
    assert filled[0, 0, 1, 1].item() == pytest.approx(5.0, abs=1e-12)
    assert torch.equal(filled.flatten()[[0, 1, 2, 3, 5, 6, 7, 8]], x.flatten()[[0, 1, 2, 3, 5, 6, 7, 8]])


def test_a_removed_corner_pixel_averages_over_the_neighbours_inside_the_image():
    # Corner (0, 0): right (2) and below (4) weigh 1/6, the diagonal (5) 1/12, 5/12 in all:
    # (2/6 + 4/6 + 5/12) / (5/12) = (17/12) / (5/12) = 3.4.
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    filled = noisy_linear_imputation(x, mask(["#..", "...", "..."]), noise=0.0)
    assert filled[0, 0, 0, 0].item() == pytest.approx(3.4, abs=1e-12)


def test_two_adjacent_removed_pixels_are_solved_jointly():
    # A 1x4 row (10, a, b, 40): a = (10 + b) / 2 and b = (a + 40) / 2 (only the two edge neighbours are inside),
    # so a = 20 and b = 30.
    x = torch.tensor([[[[10.0, 0.0, 0.0, 40.0]]]], dtype=torch.float64)
    filled = noisy_linear_imputation(x, mask([".##."]), noise=0.0)
    torch.testing.assert_close(filled, torch.tensor([[[[10.0, 20.0, 30.0, 40.0]]]], dtype=torch.float64))


def test_a_removed_region_with_no_kept_neighbour_becomes_zero_and_the_rest_is_still_solved():
    x = torch.full((2, 1, 2, 2), 7.0, dtype=torch.float64)
    removed = torch.stack([mask(["##", "##"])[0], mask(["#.", ".."])[0]])
    filled = noisy_linear_imputation(x, removed, noise=0.0)
    assert filled[0].flatten().tolist() == [0.0, 0.0, 0.0, 0.0]
    assert filled[1].flatten().tolist() == pytest.approx([7.0, 7.0, 7.0, 7.0], abs=1e-12)


def test_the_noise_is_added_to_the_removed_pixels_only_and_follows_the_generator():
    x, removed = images(1, torch.float64), torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.7
    clean = noisy_linear_imputation(x, removed, noise=0.0)
    noisy = noisy_linear_imputation(x, removed, noise=0.5, generator=torch.Generator().manual_seed(3))
    again = noisy_linear_imputation(x, removed, noise=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)
    assert torch.equal(noisy * ~removed, x * ~removed)
    assert (noisy - clean)[removed.expand_as(x)].std().item() == pytest.approx(0.5, rel=0.05)


def test_the_float32_imputation_at_its_default_tolerance_is_within_1e_3_of_the_float64_one():
    # benchmarks/results/road-imputation.md: how far the float32 solution is from float64's at each tolerance;
    # 1e-3 is the bound its default tolerance stays well within on images in [0, 1].
    x = images(4, torch.float64)
    removed = F.interpolate(torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(3)), size=x.shape[-2:],
                            mode="bilinear") > 0.5
    exact = noisy_linear_imputation(x, removed, noise=0.0)
    single = noisy_linear_imputation(x.float(), removed, noise=0.0)
    assert (single.double() - exact).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_are_imputed_in_their_dtype(dtype):
    x = images(1, torch.float32)
    removed = torch.rand(1, 1, *x.shape[-2:], generator=torch.Generator().manual_seed(4)) < 0.5
    half = noisy_linear_imputation(x.to(dtype), removed, noise=0.0)
    assert half.dtype == dtype
    exact = noisy_linear_imputation(x.double(), removed, noise=0.0)
    assert (half.double() - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("share, size", [(0.2, (64, 64)), (0.9, (64, 64)), (0.5, (6, 300))])
def test_the_imputation_equals_pytorch_grad_cams_sparse_solve(share, size):
    # 6x300: a long thin image, whose coarsest grid (6x300) is too large for the exact solve and is smoothed.
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    x = torch.rand(3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    removed = torch.rand(*size, generator=torch.Generator().manual_seed(2)) < share
    # Their mask is 1 where a pixel is kept; they take float32 images and cast scipy's solution to float32.
    theirs = NoisyLinearImputer(noise=0.0)(x.float(), (~removed).float())
    ours = noisy_linear_imputation(x[None], removed[None, None], noise=0.0)[0]
    torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=2e-6)


def road_one_copy_at_a_time(net, x, maps, classes, percentiles):
    """ROAD by its definition, one copy at a time with scipy's sparse solve (pytorch-grad-cam's imputer, no
    noise) and the thresholds of its `RemoveMostRelevantFirst` (numpy's percentile): logit changes [N, K, 2P]."""
    import numpy as np
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    n, k = classes.shape
    changes = torch.zeros(n, k, 2 * len(percentiles), dtype=x.dtype)
    for i in range(n):
        for j in range(k):
            for order, relevance in enumerate([maps[i, j], 1 - maps[i, j]]):
                for t, p in enumerate(percentiles):
                    kept = (relevance < float(np.percentile(relevance.numpy(), p))).float()
                    copy = NoisyLinearImputer(noise=0.0)(x[i].float(), kept).to(x.dtype)
                    with torch.no_grad():
                        after, before = net(copy[None])[0, classes[i, j]], net(x[i:i + 1])[0, classes[i, j]]
                    changes[i, j, order * len(percentiles) + t] = after - before
    return changes


@pytest.mark.slow  # scipy's solve per copy
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_road_equals_removing_and_imputing_each_copy_by_pytorch_grad_cams_definition(name):
    pytest.importorskip("pytorch_grad_cam")
    net, x = model(name, torch.float64), images(2, torch.float64)
    out = fastattr.Explainer(net, methods="gradcam")(x, k=2)
    percentiles = (20, 50, 80)
    got = metrics.road(net, x, out.maps["gradcam"], out.classes, percentiles=percentiles, noise=0.0,
                       probability=False, sample_batch=5)
    want = road_one_copy_at_a_time(net, x, out.maps["gradcam"], out.classes, percentiles)
    torch.testing.assert_close(got.most_relevant_first, want[..., :3], rtol=0, atol=1e-4)
    torch.testing.assert_close(got.least_relevant_first, want[..., 3:], rtol=0, atol=1e-4)
    torch.testing.assert_close(got.combined, (want[..., 3:].mean(-1) - want[..., :3].mean(-1)) / 2, rtol=0, atol=1e-4)


def test_road_with_noise_gives_the_same_scores_whatever_the_chunk_size():
    net, x = model("resnet18"), images(2)
    out = fastattr.Explainer(net, methods="gradcam")(x, k=2)
    one = metrics.road(net, x, out.maps["gradcam"], out.classes, percentiles=(30, 70), sample_batch=1)
    many = metrics.road(net, x, out.maps["gradcam"], out.classes, percentiles=(30, 70), sample_batch=64)
    torch.testing.assert_close(one.combined, many.combined, rtol=0, atol=1e-6)
    other_seed = metrics.road(net, x, out.maps["gradcam"], out.classes, percentiles=(30, 70), seed=1)
    assert not torch.equal(other_seed.most_relevant_first, one.most_relevant_first)


@pytest.mark.slow  # torch.compile's captures of resnet18 (the clean batch and the copies' chunks)
def test_road_of_a_model_compiled_by_torch_compile_equals_road_of_the_model():
    # The copies go to the compiled model channels-last, as to the eager one; "eager" is torch.compile's capture
    # without inductor's code generation (benchmarks/test_perturbation_speed.py times inductor's).
    net, x = model("resnet18"), images(2)
    out = fastattr.Explainer(net, methods="gradcam")(x, k=2)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    want = metrics.road(net, x, out.maps["gradcam"], out.classes, percentiles=(30, 70), sample_batch=3)
    got = metrics.road(compiled, x, out.maps["gradcam"], out.classes, percentiles=(30, 70), sample_batch=3)
    torch.testing.assert_close(got.most_relevant_first, want.most_relevant_first, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.least_relevant_first, want.least_relevant_first, rtol=0, atol=1e-6)


def test_road_of_a_map_on_the_object_is_positive_and_of_the_reversed_map_negative():
    # A 16x16 image, 1 on an 8x8 square (a quarter of it) and 0 around; the logit is the square's sum. The map
    # marks the square (ties broken by a tiny ramp). MoRF removes square pixels first, which imputation fills
    # with less than 1 from the background around: the logit falls. LeRF at p >= 30 removes at most 70 % of the
    # pixels, background alone, whose weight is 0: the logit holds exactly. The reversed map swaps the two.
    h = w = 16
    square = torch.zeros(1, 1, h, w, dtype=torch.float64)
    square[..., 4:12, 4:12] = 1
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(h * w, 1, bias=False)).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(square.flatten()[None])
    on_object = square * 0.9 + torch.linspace(0, 0.01, h * w, dtype=torch.float64).view(1, 1, h, w)
    percentiles, classes = (10, 30, 50, 70, 90), torch.tensor([[0]])
    faithful = metrics.road(net, square, on_object, classes, percentiles=percentiles, noise=0.0, probability=False)
    reversed_ = metrics.road(net, square, 1 - on_object, classes, percentiles=percentiles, noise=0.0,
                             probability=False)
    assert (faithful.most_relevant_first < -0.5).all() and (reversed_.least_relevant_first < -0.5).all()
    assert faithful.least_relevant_first[..., 1:].abs().max() < 1e-9
    assert reversed_.most_relevant_first[..., 1:].abs().max() < 1e-9
    assert faithful.combined.item() > 0.5 and reversed_.combined.item() < -0.5


@pytest.mark.parametrize("bad", [(), (0, 50), (50, 100), (True,), ("50",)])
def test_percentiles_outside_0_100_are_refused_before_any_forward(bad):
    with pytest.raises(fastattr.InputError, match=r"percentiles: expected numbers strictly between 0 and 100"):
        metrics.road(None, torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8), torch.tensor([[0]]), percentiles=bad)


def test_a_mask_of_another_size_than_the_images_is_refused_naming_both():
    with pytest.raises(fastattr.InputError, match=r"removed: expected a mask \[B, 1, H, W\] matching the images "
                                                  r"\[1, 3, 8, 8\], got \[1, 1, 4, 4\]"):
        noisy_linear_imputation(torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 4, 4, dtype=torch.bool))


def test_road_is_a_metric_evaluate_reports():
    assert "road" in metrics.METRICS
    net, x = model("resnet18"), images(1)
    out = fastattr.Explainer(net, methods="gradcam")(x, k=1)
    scores = metrics.evaluate(net, x, out.maps, out.classes, ("road",))
    want = metrics.road(net, x, out.maps["gradcam"], out.classes).combined
    torch.testing.assert_close(scores["gradcam"]["road"], want)
