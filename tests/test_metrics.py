"""Faithfulness metrics: deletion and insertion curves, confidence change, average drop and increase in confidence."""

import pytest
import torch
from torch import nn

import fastattr
from fastattr import metrics
from models import images, model
from peer_adapters import GivenMaps


def linear_net() -> nn.Module:
    """Logits of a 1-channel 2x2 image x: class 0 = x . (1, 2, 3, 4), class 1 = x . (4, 3, 2, 1), raster order."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    return net.double().eval()


ONES = torch.ones(1, 1, 2, 2, dtype=torch.float64)
RISING = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64).view(1, 1, 2, 2)  # ranks pixel 3 first
CLASS_0 = torch.tensor([[0]])


def test_deletion_removes_the_highest_ranked_pixels_first_and_scores_after_each_step():
    # Pixels go in the order 3, 2, 1, 0, taking 4, 3, 2, 1 off class 0's logit of 10.
    curve = metrics.deletion(linear_net(), ONES, RISING, CLASS_0, steps=4, probability=False)
    assert curve.scores.tolist() == [[[10.0, 6.0, 3.0, 1.0, 0.0]]]
    assert curve.area.tolist() == [[0.25 * (10 / 2 + 6 + 3 + 1 + 0 / 2)]]  # 3.75


def test_insertion_reveals_the_highest_ranked_pixels_first_from_the_baseline():
    curve = metrics.insertion(linear_net(), ONES, RISING, CLASS_0, steps=4, baseline=0.0, probability=False)
    assert curve.scores.tolist() == [[[0.0, 4.0, 7.0, 9.0, 10.0]]]
    assert curve.area.tolist() == [[0.25 * (0 / 2 + 4 + 7 + 9 + 10 / 2)]]  # 6.25


def test_steps_that_do_not_divide_the_pixels_take_the_rounded_share_of_them():
    # 4 pixels in 3 steps: round(4/3) = 1, round(8/3) = 3, then all 4 removed.
    curve = metrics.deletion(linear_net(), ONES, RISING, CLASS_0, steps=3, probability=False)
    assert curve.scores.tolist() == [[[10.0, 6.0, 1.0, 0.0]]]


def test_each_class_is_deleted_in_the_order_of_its_own_map():
    # Class 1's map ranks pixel 0 first (weight 4), then 1, 2, 3.
    maps = torch.cat([RISING, RISING.flip(-1).flip(-2)], 1)
    curve = metrics.deletion(linear_net(), ONES, maps, torch.tensor([[0, 1]]), steps=4, probability=False)
    assert curve.scores.tolist() == [[[10.0, 6.0, 3.0, 1.0, 0.0], [10.0, 6.0, 3.0, 1.0, 0.0]]]
    worst = metrics.deletion(linear_net(), ONES, RISING.expand(1, 2, 2, 2), torch.tensor([[0, 1]]), steps=4,
                             probability=False)
    assert worst.scores[0, 1].tolist() == [10.0, 9.0, 7.0, 4.0, 0.0]  # class 1 deleted in class 0's order


def test_scores_are_probabilities_by_default():
    curve = metrics.deletion(linear_net(), ONES, RISING, CLASS_0, steps=4)
    # After step 1 (pixel 3 removed) the logits are (10 - 4, 10 - 1) = (6, 9): class 0's probability is 1 / (1 + e^3).
    torch.testing.assert_close(curve.scores[0, 0, 1], 1 / (1 + torch.tensor(3.0, dtype=torch.float64).exp()))
    assert curve.scores[0, 0, 0].item() == 0.5 and curve.scores[0, 0, -1].item() == 0.5


def reference_curve(net, x, maps, classes, steps, baseline, reveal):
    """One copy at a time: the top round(s * HW / steps) pixels of each map replaced (or revealed)."""
    n, k = classes.shape
    h, w = x.shape[-2:]
    scores = torch.zeros(n, k, steps + 1, dtype=x.dtype)
    for i in range(n):
        for j in range(k):
            order = maps[i, j].flatten().argsort(descending=True, stable=True)
            for s in range(steps + 1):
                taken = torch.zeros(h * w, dtype=x.dtype)
                taken[order[:round(s * h * w / steps)]] = 1
                taken = taken.view(1, h, w)
                copy = baseline[i] * (1 - taken) + x[i] * taken if reveal else x[i] * (1 - taken) + baseline[i] * taken
                with torch.no_grad():
                    scores[i, j, s] = net(copy[None]).softmax(-1)[0, classes[i, j]]
    return scores


@pytest.mark.slow  # float64 copies one at a time
@pytest.mark.parametrize("reveal", [False, True])
def test_curves_on_resnet18_equal_building_each_copy_one_at_a_time(reveal):
    net, x = model("resnet18", torch.float64), images(2, torch.float64)
    out = fastattr.Explainer(net, layer="layer3", methods="gradcam")(x, k=2)
    maps = out.maps["gradcam"]
    baseline = metrics.blurred(x) if reveal else torch.zeros_like(x)
    got = (metrics.insertion if reveal else metrics.deletion)(net, x, maps, out.classes, steps=8, sample_batch=6)
    want = reference_curve(net, x, maps, out.classes, 8, baseline, reveal)
    torch.testing.assert_close(got.scores, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.area, torch.trapezoid(want, dx=1 / 8, dim=-1), rtol=1e-9, atol=1e-12)


def test_any_chunk_size_gives_the_same_curve():
    net, x = model("resnet18"), images(2)
    out = fastattr.Explainer(net, layer="layer3", methods="gradcam")(x, k=2)
    one = metrics.deletion(net, x, out.maps["gradcam"], out.classes, steps=6, sample_batch=1)
    many = metrics.deletion(net, x, out.maps["gradcam"], out.classes, steps=6, sample_batch=64)
    torch.testing.assert_close(one.scores, many.scores, rtol=0, atol=1e-6)


def test_a_map_at_one_with_everything_keeps_the_confidence_and_at_zero_gives_the_black_image_score():
    net, x = linear_net(), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    # logits (30, 20); times a map of ones: the same; times zeros: (0, 0).
    assert metrics.confidence_change(net, x, torch.ones(1, 1, 2, 2, dtype=torch.float64), CLASS_0,
                                     probability=False).tolist() == [[0.0]]
    assert metrics.confidence_change(net, x, torch.zeros(1, 1, 2, 2, dtype=torch.float64), CLASS_0,
                                     probability=False).tolist() == [[-30.0]]
    half = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]], dtype=torch.float64)  # keeps pixels 2, 3: logits (25, 10)
    assert metrics.confidence_change(net, x, half, torch.tensor([[0, 1]]).view(1, 2)[:, :1],
                                     probability=False).tolist() == [[-5.0]]


def test_average_drop_and_increase_in_confidence_follow_the_grad_cam_plus_plus_definitions():
    net, x = linear_net(), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    half = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]], dtype=torch.float64).expand(1, 2, 2, 2)
    classes = torch.tensor([[0, 1]])
    # logits (30, 20) -> (25, 10) for both classes' map: class 0's probability rises, class 1's falls.
    p, q = torch.tensor([30.0, 20.0]).softmax(0), torch.tensor([25.0, 10.0]).softmax(0)
    drop = metrics.average_drop(net, x, half, classes)
    torch.testing.assert_close(drop[0], ((p - q).clamp_min(0) / p).double())
    assert metrics.increase_in_confidence(net, x, half, classes).tolist() == [[True, False]]


@pytest.mark.slow  # a peer's pass per class
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_confidence_change_equals_pytorch_grad_cams_cam_mult_image_confidence_change(name):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net, x = model(name), images(2)
    out = fastattr.Explainer(net, methods="gradcam")(x, k=2)
    ours = metrics.confidence_change(net, x, out.maps["gradcam"], out.classes)
    for j in range(2):
        theirs = CamMultImageConfidenceChange()(x, out.maps["gradcam"][:, j].numpy(),
                                                [ClassifierOutputSoftmaxTarget(int(c)) for c in out.classes[:, j]], net)
        torch.testing.assert_close(ours[:, j], torch.from_numpy(theirs), rtol=0, atol=1e-6)


@pytest.mark.slow  # a peer's curves one image at a time
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_deletion_and_insertion_equal_torchcams_deletion_insertion_metric(name):
    # Where the definitions coincide: steps dividing the pixels (torchcam steps by ceil(HW / steps) pixels), a
    # baseline of 0 for both curves (torchcam's default; fastattr's insertion defaults to the blurred image), softmax.
    pytest.importorskip("torchcam")
    from torchcam.metrics import DeletionInsertionMetric

    net, x = model(name), images(2)
    out = fastattr.Explainer(net, methods="gradcam")(x, k=1)
    maps, classes = out.maps["gradcam"], out.classes
    ours_deletion = metrics.deletion(net, x, maps, classes, steps=16, baseline=0.0).area[:, 0]
    ours_insertion = metrics.insertion(net, x, maps, classes, steps=16, baseline=0.0).area[:, 0]
    for i in range(2):
        peer = DeletionInsertionMetric(GivenMaps(net, maps[i:i + 1, 0]), lambda z: z.softmax(-1), steps=16)
        peer.update(x[i:i + 1], class_idx=int(classes[i, 0]))
        theirs = peer.summary()
        assert theirs["deletion_auc"] == pytest.approx(ours_deletion[i].item(), abs=1e-6)
        assert theirs["insertion_auc"] == pytest.approx(ours_insertion[i].item(), abs=1e-6)


@pytest.mark.slow  # a peer's curves in numpy
def test_the_deletion_curve_equals_quantus_pixel_flipping_after_each_step():
    # Quantus flips (channel, pixel) features, HW / steps of them a step, a map broadcast over the 3 channels: the
    # three features of a pixel tie and sort together, so every third of its steps has removed whole pixels, the
    # same as one of fastattr's. It reports the scores after each step (no clean score first).
    pytest.importorskip("quantus")
    import quantus

    # Maps without ties: fastattr breaks them in raster order, Quantus's argsort in no set order (Grad-CAM's zeros).
    net, x = model("resnet18"), images(2)
    maps = torch.rand(2, 1, *x.shape[-2:], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[3], [7]])
    steps, pixels = 16, x.shape[-2] * x.shape[-1]
    ours = metrics.deletion(net, x, maps, classes, steps=steps, baseline=0.0).scores[:, 0, 1:]
    flipping = quantus.PixelFlipping(features_in_step=pixels // steps, perturb_baseline=0.0, normalise=False,
                                     abs=False, disable_warnings=True)
    theirs = flipping(model=net, x_batch=x.numpy(), y_batch=classes[:, 0].numpy(), a_batch=maps.numpy(),
                      softmax=True, device="cpu")
    theirs = torch.tensor(theirs, dtype=ours.dtype)
    assert theirs.shape == (2, 3 * steps)
    torch.testing.assert_close(ours, theirs[:, 2::3], rtol=0, atol=1e-6)


# --- refusals ---------------------------------------------------------------------------------------------

def test_maps_of_another_size_than_the_images_are_refused_naming_both():
    with pytest.raises(fastattr.InputError, match=r"maps: expected one map per image and class at the images' size "
                                                  r"\[1, 1, 2, 2\] .* got \[1, 1, 4, 4\]"):
        metrics.deletion(linear_net(), ONES, torch.zeros(1, 1, 4, 4, dtype=torch.float64), CLASS_0)


def test_classes_that_do_not_fit_the_batch_are_refused():
    with pytest.raises(fastattr.TargetError, match=r"classes: expected integer class indices \[N=1, K\]"):
        metrics.insertion(linear_net(), ONES, RISING, torch.tensor([0]))


@pytest.mark.parametrize("option,bad,message", [("steps", 0, "steps: expected an int >= 1, got 0"),
                                                ("sample_batch", 0, "sample_batch: expected an int >= 1, got 0"),
                                                ("baseline", "mean", "baseline: expected a number, an image"),
                                                ("baseline", torch.zeros(3, 2, 2), "baseline: expected an image")])
def test_bad_options_are_refused_before_any_forward(option, bad, message):
    with pytest.raises(fastattr.InputError, match=message):
        metrics.deletion(linear_net(), ONES, RISING, CLASS_0, **{option: bad})


def test_confidence_metrics_refuse_maps_outside_0_1():
    with pytest.raises(fastattr.InputError, match=r"maps: expected values in \[0, 1\]"):
        metrics.average_drop(linear_net(), ONES, RISING * 10, CLASS_0)


def test_a_model_in_training_mode_is_refused():
    with pytest.raises(fastattr.InputError, match="training mode"):
        metrics.deletion(linear_net().train(), ONES, RISING, CLASS_0)


# --- the command line -------------------------------------------------------------------------------------

@pytest.mark.slow  # the command line end to end
def test_fastattr_explain_writes_each_metric_per_method_and_class_as_a_direct_call_gives(tmp_path):
    import json
    from pathlib import Path

    from fastattr import cli, images as fimages, zoo
    from fastattr.pipeline import Spec, build

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(__import__("torchvision").models.resnet18().state_dict(), weights)
    photo = Path(__file__).parents[1] / "examples" / "chelsea.png"
    options = ["--model", "resnet18", "--weights", str(weights), "--layer", "layer3", "--methods", "gradcam, saliency",
               "--k", "2", "--input-size", "64"]
    assert cli.main(["explain", str(photo), *options, "--metrics", "deletion, average-drop", "--metric-steps", "4",
                     "--no-progress", "-o", str(tmp_path / "out")]) == 0
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    pipeline = build(Spec("resnet18", str(weights), "layer3", ("gradcam", "saliency"), 2, 64))
    x = fimages.normalize(fimages.read(photo, 64)[None])
    out = pipeline(x)
    want = metrics.evaluate(zoo.load_model("resnet18", weights), x, out.maps, out.classes,
                            ("deletion", "average-drop"), steps=4)
    assert set(line["metrics"]) == {"gradcam", "saliency"}
    for method, by_metric in want.items():
        assert set(line["metrics"][method]) == {"deletion", "average-drop"}
        for name, values in by_metric.items():
            assert line["metrics"][method][name] == pytest.approx(values[0].tolist(), abs=1e-4)
    # The deletion curves beside the overlays: one row per class (2), one panel (deletion), two methods' legends.
    from PIL import Image

    from fastattr import overlay as ov

    assert line["curves"] == "chelsea-curves.png"
    with Image.open(tmp_path / "out" / "chelsea-curves.png") as chart:
        row = ov.CAPTION_H + ov.PLOT_H + ov.AXIS_H + 2 * ov.LEGEND_H + ov.PAD
        assert chart.size == (ov.PAD + ov.AXIS_W + ov.PLOT_W + ov.PAD, ov.PAD + ov.TITLE_H + 2 * row)


def test_fastattr_explain_refuses_an_unknown_metric_before_loading_the_model(tmp_path, capsys):
    from pathlib import Path

    from fastattr import cli

    photo = Path(__file__).parents[1] / "examples" / "chelsea.png"
    assert cli.main(["explain", str(photo), "--metrics", "deletion,roc", "-o", str(tmp_path / "out")]) == 2
    assert "metrics: unknown 'roc'; valid: deletion, insertion, average-drop, increase-in-confidence, road" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fastattr_explain_refuses_metrics_on_an_export_backend_before_exporting(tmp_path, capsys):
    from pathlib import Path

    from fastattr import cli

    photo = Path(__file__).parents[1] / "examples" / "chelsea.png"
    assert cli.main(["explain", str(photo), "--model", "resnet18", "--backend", "onnx", "--metrics", "deletion",
                     "-o", str(tmp_path / "out")]) == 2
    assert "--metrics: scoring perturbed images needs the torch model, and resnet18 runs on the onnx backend; use " \
           "a model name with --backend eager or compiled" in capsys.readouterr().err


def test_fastattr_explain_refuses_metrics_with_ray_before_starting_it(tmp_path, capsys):
    from pathlib import Path

    from fastattr import cli

    photo = Path(__file__).parents[1] / "examples" / "chelsea.png"
    assert cli.main(["explain", str(photo), "--ray", "--metrics", "deletion", "-o", str(tmp_path / "out")]) == 2
    assert "--metrics: written to results.jsonl by the local run; drop --ray or --metrics" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
