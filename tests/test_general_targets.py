"""Targets beyond a class logit (fastattr.targets): segmentation, multi-label, embeddings and any callable equal
the article's Grad-CAM and saliency computed by hooks and autograd, one backward per target.

The reference wraps the model so that its output is the target's scores `[N, M]` and hands it to
`fastattr.reference` (the article's hooks: `output[:, c].sum().backward()`), one image and one score at a
time. Float64, so the fast path must agree to 1e-8: the target composes into the head and its K scores are
differentiated by the same one forward and K-cotangent backward as class logits.
"""

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import fastattr
from fastattr import reference, targets
from models import images, mini_fcn, model, segmenter
from peer_adapters import OutMap

TOL = 1e-8
# name -> a layer with a spatial map of a few cells at 64x64 (the backbones run at output stride 16 or more).
SEGMENTERS = {"deeplabv3_mobilenet_v3_large": "backbone.13", "lraspp_mobilenet_v3_large": "backbone.12"}
CLASSIFIERS = {"resnet18": "layer3", "mobilenet_v3_small": "features.9"}
# (batch, K): K = 1 and 3, batch 1 and 2.
SHAPES = [(1, 1), (2, 3)]


class Scored(nn.Module):
    """`net` whose output is the target's scores, for the article's reference code."""

    def __init__(self, net: nn.Module, target):
        super().__init__()
        self.net, self.target = net, target

    def forward(self, x):
        return self.target(self.net(x))


def article_maps(net, layer, target, x, classes):
    """The article's Grad-CAM `[N, K, h, w]` and saliency `[N, K, H, W]` of `target`'s scores, one backward each."""
    scored = Scored(net, target)
    cam = [[reference.GradCAM(scored, net.get_submodule(layer))(x[n:n + 1], int(c))[0] for c in row]
           for n, row in enumerate(classes)]
    sal = [[reference.compute_saliency_map(scored, x[n:n + 1], int(c)) for c in row] for n, row in enumerate(classes)]
    return torch.from_numpy(np.array(cam)), torch.from_numpy(np.array(sal))


def assert_equals_the_article(net, layer, target, x, k):
    out = fastattr.Explainer(net, layer, ("gradcam", "saliency"), output=target, upsample=False)(x, k=k)
    cam, sal = article_maps(net, layer, target, x, out.classes)
    assert out.classes.shape == (x.shape[0], k)
    torch.testing.assert_close(out.maps["gradcam"], cam, rtol=0, atol=TOL)
    torch.testing.assert_close(out.maps["saliency"], sal, rtol=0, atol=TOL)
    torch.testing.assert_close(out.logits, target(net(x)), rtol=0, atol=TOL)
    return out


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmentation_of_the_argmax_region_equals_the_article_per_class(name, n, k):
    net = segmenter(name, torch.float64)
    out = assert_equals_the_article(net, SEGMENTERS[name], targets.segmentation(), images(n, torch.float64), k)
    assert (out.maps["gradcam"].flatten(2).amax(-1) > 0).all()  # the regions are not empty: the maps have content


def test_segmentation_scores_are_each_classs_output_summed_over_its_argmax_pixels():
    out = {"out": torch.tensor([[[[1.0, 3.0]], [[2.0, 0.5]]]])}  # [1, 2 classes, 1, 2 pixels]
    # pixel 0: class 1 wins (2 > 1); pixel 1: class 0 wins (3 > 0.5)
    assert targets.segmentation()(out).tolist() == [[3.0, 2.0]]


def test_segmentation_with_a_mask_sums_every_class_over_the_mask():
    out = {"out": torch.tensor([[[[1.0, 3.0]], [[2.0, 0.5]]]])}
    assert targets.segmentation(torch.tensor([[True, False]]))(out).tolist() == [[1.0, 2.0]]


def test_segmentation_with_a_mask_equals_the_article():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:40, 8:48] = True
    net = segmenter("deeplabv3_mobilenet_v3_large", torch.float64)
    assert_equals_the_article(net, SEGMENTERS["deeplabv3_mobilenet_v3_large"], targets.segmentation(mask),
                              images(2, torch.float64), 3)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_multilabel_probabilities_equal_the_article(name, n, k):
    assert_equals_the_article(model(name, torch.float64), CLASSIFIERS[name], targets.multilabel,
                              images(n, torch.float64), k)


def embedder(name, dtype=torch.float64):
    """A copy of `name` with its classifier replaced by the identity: an embedding model `[N, D]`."""
    net = copy.deepcopy(model(name, dtype))
    if "resnet18" in name:
        return nn.Sequential(*list(net.children())[:-1], nn.Flatten()).eval()
    return nn.Sequential(net.features, net.avgpool, nn.Flatten()).eval()


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_similarity_to_reference_embeddings_equals_the_article(name, n, k):
    net = embedder(name)
    layer = {"resnet18": "6", "mobilenet_v3_small": "0.9"}[name]  # CLASSIFIERS' layers in the Sequential
    with torch.no_grad():
        concepts = net(images(4, torch.float64, seed=9))
    assert_equals_the_article(net, layer, targets.similarity(concepts), images(n, torch.float64), k)


def test_similarity_is_the_cosine_of_the_embedding_and_each_reference():
    scores = targets.similarity(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))(torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(scores, torch.tensor([[1.0, 2 ** -0.5], [0.0, 2 ** -0.5]]))


@pytest.mark.parametrize("n,k", SHAPES)
def test_a_callable_target_equals_the_article(n, k):
    def log_odds_against_class_0(logits):
        return logits[:, 1:] - logits[:, :1]

    assert_equals_the_article(model("resnet18", torch.float64), "layer3", log_odds_against_class_0,
                              images(n, torch.float64), k)


# --- k=Above(t): every class above a threshold, padded --------------------------------------------------------

def test_above_takes_each_images_classes_over_the_threshold_padded_with_the_next_highest():
    classes, real = targets.passing(torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.3, 0.6]]), 0.5)
    assert classes.tolist() == [[0, 2], [2, 1]]
    assert real.tolist() == [[True, True], [True, False]]


def test_above_with_no_class_over_the_threshold_explains_the_top_one_marked_not_real():
    classes, real = targets.passing(torch.tensor([[0.1, 0.3]]), 0.5)
    assert classes.tolist() == [[1]] and real.tolist() == [[False]]


def test_an_explainer_with_above_equals_one_given_those_classes_and_reports_which_are_real():
    net, x = model("resnet18"), images(2)
    explainer = fastattr.Explainer(net, "layer3", ("gradcam",), output=targets.multilabel)
    out = explainer(x, k=targets.Above(0.6))
    given = explainer(x, classes=out.classes)
    assert out.real.shape == out.classes.shape and out.classes.shape[1] >= 1
    assert torch.equal(out.real, out.logits.gather(1, out.classes) > 0.6)
    assert out.real.any(1).all() or out.classes.shape[1] == 1
    torch.testing.assert_close(out.maps["gradcam"], given.maps["gradcam"])
    assert given.real is None


# --- bad targets: a clear error, before any backward --------------------------------------------------------

def refused(net, layer, target, x, error, message, **call):
    """Assert the error, and return the batch sizes of the forwards the target saw: the probe's one image when
    the error comes before any work."""
    seen = []

    @functools.wraps(target)
    def counted(out):
        batch = out["out"] if isinstance(out, dict) else out
        seen.append(len(batch))  # a tensor's first dimension, or a detector's list of per-image dicts
        return target(out)

    with pytest.raises(error, match=message):
        fastattr.Explainer(net, layer, output=counted)(x, **call)
    return seen


def test_a_mask_of_the_wrong_size_is_refused_at_the_first_forward():
    seen = refused(segmenter("lraspp_mobilenet_v3_large"), SEGMENTERS["lraspp_mobilenet_v3_large"],
                   targets.segmentation(torch.ones(32, 32)), images(2), fastattr.TargetError,
                   r"segmentation: mask is \[32, 32\] but the model's class maps are \[64, 64\]; give a mask \[H, W\]")
    assert seen == [1]


def test_a_segmentation_target_on_a_classifier_is_refused():
    seen = refused(model("resnet18"), "layer3", targets.segmentation(), images(2), fastattr.TargetError,
                   r"segmentation: expects class maps \[N, C, H, W\] \(or a dict with 'out'\), got \[1, 1000\]")
    assert seen == [1]


def test_references_of_another_size_than_the_embedding_are_refused():
    refused(model("resnet18"), "layer3", targets.similarity(torch.ones(2, 512)), images(2), fastattr.TargetError,
            r"similarity: the model's embedding is \[1, 1000\], the references \[R, D\] are \[2, 512\]")


def test_a_callable_returning_one_row_for_the_batch_is_refused_before_the_backward():
    def batch_mean(logits):
        return logits.mean(0, keepdim=True)

    seen = refused(model("resnet18"), "layer3", batch_mean, images(2), fastattr.ModelOutputError,
                   r"the target batch_mean returned a tensor of shape \[1, 1000\] for 2 image\(s\); a target must "
                   r"return scores \[N=2, M\]")
    assert seen == [1, 2]  # the probe's one image passes; the batch's forward stops before its backward


@pytest.mark.parametrize("build,message", [
    (lambda: targets.segmentation(torch.ones(2, 3, 4)), r"mask must be a tensor \[H, W\]"),
    (lambda: targets.similarity(torch.ones(2, 3, 4)), r"reference must be a floating tensor \[D\] or \[R, D\]"),
    (lambda: targets.similarity(torch.ones(4, dtype=torch.long)), r"reference must be a floating tensor"),
    (lambda: targets.Above(float("nan")), r"the threshold must be a finite number, got nan"),
])
def test_malformed_targets_are_refused_when_built(build, message):
    with pytest.raises(fastattr.TargetError, match=message):
        build()


def test_above_with_named_classes_is_refused():
    explainer = fastattr.Explainer(model("resnet18"), "layer3", output=targets.multilabel)
    with pytest.raises(fastattr.TargetError, match=r"got both \(k=Above\)"):
        explainer(images(1), classes=[1], k=targets.Above(0.5))


# --- compile and export ---------------------------------------------------------------------------------------

def traceable_target(kind, dtype=torch.float32):
    """(model, layer, target, the target's formula written out here) of each traceable target kind, on small
    models. The formulas are plain tensor code that torch.fx traces when a model wraps them."""
    if kind == "segmentation":
        def formula(out):
            maps = out["out"]
            wins = torch.nn.functional.one_hot(maps.argmax(1), maps.shape[1]).movedim(-1, 1).to(maps.dtype)
            return (maps * wins).sum((2, 3))
        return mini_fcn(dtype), "backbone.layer3", targets.segmentation(), formula
    if kind == "multilabel":
        return model("mini-resnet18", dtype), "layer3", targets.multilabel, torch.sigmoid
    if kind == "similarity":
        net = embedder("mini-resnet18", dtype)
        with torch.no_grad():
            concepts = net(images(3, dtype, seed=9))

        def cosine(e):
            return (e @ concepts.T) / (e.norm(dim=1, keepdim=True) * concepts.norm(dim=1)).clamp_min(1e-8)
        return net, "6", targets.similarity(concepts), cosine

    def log_odds(logits):
        return logits[:, 1:] - logits[:, :1]
    return model("mini-resnet18", dtype), "layer3", log_odds, log_odds


TRACEABLE = ["segmentation", "multilabel", "similarity", "callable"]


@pytest.mark.parametrize("kind", TRACEABLE)
def test_a_float64_target_model_leaves_the_float32_one_other_tests_share_as_it_was(kind):
    # The models are cached: a float64 one made by casting the float32 one in place made a later ONNX export
    # float64, which onnxruntime cannot run (its CPU Conv has no float64 kernel), in whichever worker ran both.
    float32, *_ = traceable_target(kind)
    float64, *_ = traceable_target(kind, torch.float64)
    assert float64 is not float32
    assert {p.dtype for p in float32.parameters()} == {torch.float32}
    assert {p.dtype for p in float64.parameters()} == {torch.float64}


@pytest.mark.slow  # torch.compile
@pytest.mark.parametrize("target", TRACEABLE)
def test_a_compiled_explainer_of_a_target_equals_eager(target):
    net, layer, fn, _ = traceable_target(target)
    options = dict(layer=layer, methods=("gradcam", "saliency"), output=fn)
    x = images(2)
    compiled = fastattr.Explainer(net, compile={"backend": "eager"}, **options)(x, k=3)
    eager = fastattr.Explainer(net, **options)(x, k=3)
    assert torch.equal(compiled.classes, eager.classes)
    for name in eager.maps:
        torch.testing.assert_close(compiled.maps[name], eager.maps[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", [pytest.param(t, marks=[] if t == "multilabel" else [pytest.mark.slow])
                                    for t in TRACEABLE])  # every method: the perturbation passes make it long
def test_every_method_explains_a_target_as_it_explains_a_model_whose_logits_are_the_targets_scores(target):
    # A target composes into the head: every method — gradient, sampled, guided, perturbation — reads the K scores
    # as it reads K logits, so it must equal the same method on the model wrapped to return the target's formula
    # (written out in traceable_target), whose own logit path the article's parity tests hold.
    net, layer, fn, formula = traceable_target(target, torch.float64)
    x = images(2, torch.float64)
    options = dict(methods=tuple(fastattr.METHODS), samples=2, steps=2, window=32, stride=32, upsample=False)
    got = fastattr.Explainer(net, layer, output=fn, **options)(x, k=2)
    want = fastattr.Explainer(Scored(net, formula).eval(), "net." + layer, **options)(x, classes=got.classes)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-10)
    for method in fastattr.METHODS:
        torch.testing.assert_close(got.maps[method], want.maps[method], rtol=0, atol=1e-8, msg=method)


# --- pytorch-grad-cam's targets ---------------------------------------------------------------------------------
# pytorch-grad-cam 1.5.7 explains one target per call and image through hooks; its maps are min-max normalised at
# the layer, resized with cv2 and normalised again (tests/test_peers.py), so fastattr's resized map is compared
# after the same renormalisation, within test_peers' tolerance. Its SemanticSegmentationTarget is
# `(output[c] * mask).sum()` on one image's `[C, H, W]`: fastattr's `segmentation(mask)` by definition. Its
# SimilarityToConceptTarget lives in its tutorial, not its package: `CosineSimilarity(dim=0)(output, concept)`,
# fastattr's `similarity` for one reference; the tutorial's class is written out below.

def pytorch_grad_cam_maps(net, layer, x, targets_per_class):
    """pytorch-grad-cam's Grad-CAM `[N, K, H, W]`: one call per class j, with targets_per_class[j] per image."""
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    maps = []
    for per_image in targets_per_class:
        with pytorch_grad_cam.GradCAM(model=net, target_layers=[net.get_submodule(layer)]) as cam:
            maps.append(cam(input_tensor=x, targets=per_image))
    return torch.from_numpy(np.stack(maps, 1))


def test_segmentation_with_a_mask_equals_pytorch_grad_cams_semantic_segmentation_target():
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
    from test_peers import NORMALISED_TOL, assert_close_to_peer, renormalised

    name = "deeplabv3_mobilenet_v3_large"
    net, x, classes = segmenter(name), images(2), [1, 4]
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[16:40, 8:48] = 1
    ours = fastattr.Explainer(net, SEGMENTERS[name], output=targets.segmentation(torch.from_numpy(mask)))(x, classes)
    theirs = pytorch_grad_cam_maps(OutMap(net).eval(), "net." + SEGMENTERS[name], x,
                                   [[SemanticSegmentationTarget(c, mask)] * len(x) for c in classes])
    assert_close_to_peer(renormalised(ours.maps["gradcam"]), theirs, NORMALISED_TOL)


class SimilarityToConceptTarget:
    """pytorch-grad-cam's tutorial target (Pixel Attribution for embeddings), as the tutorial writes it."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def test_similarity_equals_pytorch_grad_cams_tutorial_similarity_to_concept_target():
    from test_peers import NORMALISED_TOL, assert_close_to_peer, renormalised

    net = embedder("resnet18", torch.float32)
    with torch.no_grad():
        concepts = net(images(2, seed=4))  # concepts whose four maps all have positive cells (some seeds give a zero map)
    x = images(2)
    ours = fastattr.Explainer(net, "6", output=targets.similarity(concepts))(x, classes=[0, 1])
    theirs = pytorch_grad_cam_maps(net, "6", x, [[SimilarityToConceptTarget(c)] * len(x) for c in concepts])
    assert_close_to_peer(renormalised(ours.maps["gradcam"]), theirs, NORMALISED_TOL)


@pytest.mark.slow  # ONNX exports
@pytest.mark.parametrize("target", ["segmentation", "multilabel", "similarity"])
def test_a_target_exports_to_onnx_and_onnxruntime_equals_eager(target, tmp_path):
    from test_compile import assert_same_explanation

    if target == "segmentation":  # torchvision's FCN on reduced resnet18 layers: lraspp's export alone takes 80 s
        net, layer, fn = mini_fcn(), "backbone.layer3", targets.segmentation()
    elif target == "multilabel":
        net, layer, fn = model("mini-resnet18"), "layer3", targets.multilabel
    else:
        net, layer = model("mini-resnet18"), "layer3"
        with torch.no_grad():
            fn = targets.similarity(net(images(3, seed=9)))
    options = dict(layer=layer, methods=("gradcam", "saliency"), output=fn)
    path = fastattr.export_onnx(net, tmp_path / f"{target}.onnx", k=2, input_shape=(3, 64, 64), **options)
    x = images(2)
    assert_same_explanation(fastattr.OnnxExplainer(path)(x), fastattr.Explainer(net, **options)(x, k=2))


# --- detection: torchvision's detectors, on the eager hook path ---------------------------------------------------
# name -> (layer, builder options): small inputs, so the detectors' transforms resize 64x64 images to 128 at most;
# FCOS's random classification head starts at its prior (0.01), below its default score threshold of 0.2.
DETECTORS = {"fasterrcnn_mobilenet_v3_large_fpn": ("backbone.body.13", {"min_size": 128, "max_size": 128}),
             "fcos_resnet50_fpn": ("backbone.body.layer3", {"min_size": 128, "max_size": 128, "score_thresh": 0.001})}


@functools.cache
def detector(name, dtype=torch.float64):
    torch.manual_seed(0)
    build = getattr(__import__("torchvision").models.detection, name)
    return build(weights=None, weights_backbone=None, num_classes=5, **DETECTORS[name][1]).to(dtype).eval()


def detection_batch(n, dtype=torch.float64):
    """`n` images: one, then copies of it a little perturbed, so that every image has the boxes named from the first."""
    x = images(1, dtype)
    return torch.cat([x, x + 1e-4 * images(n - 1, dtype, seed=5)]) if n > 1 else x


def top_boxes(net, x, m):
    """The first image's `m` highest-scoring detections: the boxes and labels to name."""
    with torch.no_grad():
        d = net(x[:1])[0]
    assert len(d["scores"]) >= m
    return d["boxes"][:m], d["labels"][:m]


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.slow  # float64 detectors, one eager call per image and box for the reference
@pytest.mark.parametrize("name", DETECTORS)
def test_the_score_of_each_named_box_equals_the_article(name, n, k):
    net, x = detector(name), detection_batch(n)
    named, labels = top_boxes(net, x, 3)
    out = assert_equals_the_article(net, DETECTORS[name][0], targets.boxes(named, labels), x, k)
    assert (out.maps["gradcam"].flatten(2).amax(-1) > 0).any()


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_the_top_k_detections_scores_equal_the_article(n):
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    assert_equals_the_article(detector(name), DETECTORS[name][0], targets.detections(3), detection_batch(n), 3)


def test_detections_are_each_images_k_highest_scores_in_descending_order():
    out = [{"boxes": torch.zeros(3, 4), "labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.25, 0.75, 0.5])}]
    assert targets.detections(2)(out).tolist() == [[0.75, 0.5]]
    assert targets.top_detections(out, 2)[0]["labels"].tolist() == [2, 3]


def test_an_image_with_fewer_detections_than_k_is_refused():
    out = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([1]), "scores": torch.tensor([0.9])}]
    with pytest.raises(fastattr.TargetError, match=r"detections: the image has 1 detections above the detector's "
                                                   r"score threshold, fewer than the 2 this target scores; make it "
                                                   r"with a smaller k"):
        targets.detections(2)(out)


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
def test_the_box_target_plus_iou_equals_pytorch_grad_cams_faster_rcnn_box_score_target():
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    from test_peers import NORMALISED_TOL, assert_close_to_peer, renormalised

    name = "fasterrcnn_mobilenet_v3_large_fpn"
    net, x = detector(name, torch.float32), detection_batch(1, torch.float32)
    named, labels = top_boxes(net, x, 2)
    layer = DETECTORS[name][0]
    raw = fastattr.Explainer(net, layer, output=targets.boxes(named, labels, plus_iou=True),
                             normalize=False)(x, classes=[0, 1]).maps["gradcam"]
    theirs = pytorch_grad_cam_maps(FirstImage(net).eval(), "net." + layer, x,
                                   [[FasterRCNNBoxScoreTarget([int(labels[m])], named[m:m + 1].numpy())] for m in (0, 1)])
    # This random detector's scores barely depend on the layer: its raw maps span d ~ 1e-10, where the 1e-7 that
    # pytorch-grad-cam adds to each min-max denominator (scale_cam_image, once per layer and once after the layer
    # mean) is no longer negligible. Its maps are ours min-max normalised times r / (1e-7 + r), r = d / (1e-7 + d).
    span = raw.flatten(-2).amax(-1) - raw.flatten(-2).amin(-1)
    first = span / (1e-7 + span)
    assert_close_to_peer(renormalised(raw) * (first / (1e-7 + first))[..., None, None], theirs, NORMALISED_TOL)


class FirstImage(nn.Module):
    """A detector called as pytorch-grad-cam calls a model, its per-image dicts as they are."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
@pytest.mark.parametrize("change,message", [
    (lambda named, labels: (named + 40, labels), r"named box 0 .* of label \d has no predicted box of that label above "
                                                 r"IoU 0.5 in image 0 \(the closest: "),
    (lambda named, labels: (named, labels * 0 + 9), r"named box 0 .* of label 9 has no predicted box of that label"),
])
def test_a_box_with_no_match_or_a_label_the_detector_lacks_is_refused_before_any_backward(change, message):
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    net, x = detector(name, torch.float32), detection_batch(1, torch.float32)
    named, labels = change(*top_boxes(net, x, 1))
    seen = refused(net, DETECTORS[name][0], targets.boxes(named, labels), x, fastattr.TargetError, message)
    assert seen == [1]


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
def test_a_detector_is_refused_for_export_saying_why(tmp_path):
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    net, x = detector(name, torch.float32), detection_batch(1, torch.float32)
    named, labels = top_boxes(net, x, 1)
    with pytest.raises(fastattr.ExportError, match=r"output: a detection target cannot be exported: the detector's "
                                                   r"proposals, non-maximum suppression and box matching depend on each "
                                                   r"image"):
        fastattr.export_onnx(net, tmp_path / "d.onnx", layer=DETECTORS[name][0], k=1, input_shape=(3, 64, 64),
                             output=targets.boxes(named, labels))


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
def test_explaining_a_detector_leaves_it_as_it_was_after_success_and_after_a_refused_box():
    name = "fasterrcnn_mobilenet_v3_large_fpn"
    net, x = detector(name, torch.float32), detection_batch(1, torch.float32)
    named, labels = top_boxes(net, x, 1)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [(p.requires_grad, p.grad) for p in net.parameters()]
    explainer = fastattr.Explainer(net, DETECTORS[name][0], ("gradcam", "saliency"), output=targets.boxes(named, labels))
    explainer(x)
    with pytest.raises(fastattr.TargetError):
        fastattr.Explainer(net, DETECTORS[name][0], output=targets.boxes(named + 40, labels))(x)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())
    assert not net.training and all(not m.training for m in net.modules())
    assert [(p.requires_grad, p.grad) for p in net.parameters()] == flags
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


@pytest.mark.slow  # a detector through every gradient method on the eager hook path
@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
def test_every_gradient_method_the_eager_path_runs_explains_a_detector():
    # Guided backpropagation rewrites a torch.fx trace and Ablation-CAM runs the traced head: both are refused for
    # a model torch.fx cannot trace, saying why; the other methods run on the hook path.
    # SmoothGrad and IG differentiate their points through the whole model with torch.func, which cannot
    # differentiate torchvision's roi_align (an autograd.Function without setup_context): refused at the call.
    from fastattr.methods import SAMPLED

    name = "fasterrcnn_mobilenet_v3_large_fpn"
    net, x = detector(name, torch.float32), detection_batch(1, torch.float32)
    sampled = tuple(m for m in fastattr.METHODS if set(fastattr.METHODS[m].reads) & SAMPLED.keys())
    methods = tuple(m for m in fastattr.METHODS if m not in ("guided", "guided-gradcam", "ablationcam", *sampled))
    out = fastattr.Explainer(net, DETECTORS[name][0], methods, output=targets.detections(2), window=32,
                             stride=32)(x, k=2)
    for method in methods:
        assert out.maps[method].shape == (1, 2, 64, 64) and bool(torch.isfinite(out.maps[method]).all()), method
    for method, why in (("guided", "torch.fx cannot trace FasterRCNN"), ("ablationcam", "needs a model torch.fx can "
                                                                                     "trace")):
        with pytest.raises(fastattr.MethodError, match=why):
            fastattr.Explainer(net, DETECTORS[name][0], method, output=targets.detections(2))
    with pytest.raises(fastattr.MethodError, match=rf"methods: {', '.join(sampled)} differentiate the whole of "
                                                   r"FasterRCNN with torch.func, .* \(torchvision's detectors: roi_align\)"):
        fastattr.Explainer(net, DETECTORS[name][0], sampled, output=targets.detections(2), samples=2, steps=2)(x, k=2)
