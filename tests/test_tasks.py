"""`--task classify|multilabel|segment|detect`: the spec's task picks the target (fastattr.targets) for every
front end, with defaults per model family; the command line reports the target's scores and outlines or boxes
what each row explains. torchvision's segmentation models and detectors and timm's models load by name, with
random weights (nothing is downloaded)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import fastattr
from fastattr import cli, images, overlay, targets, zoo
from fastattr.pipeline import Spec, build, task_of

EXAMPLES = Path(__file__).parents[1] / "examples"
PHOTOS = [EXAMPLES / "chelsea.png", EXAMPLES / "coffee.png"]
SIZE = 64
SEGMENTER, DETECTOR = "lraspp_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large"  # SSDlite: score threshold 0.001


def batch(size=SIZE):
    return images.normalize(torch.stack([images.read(p, size) for p in PHOTOS]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """name -> a state-dict file of the model with random weights: every front end and the test load the same."""
    folder, files = tmp_path_factory.mktemp("weights"), {}

    def get(name):
        if name not in files:
            torch.manual_seed(0)
            files[name] = folder / f"{name}.pt"
            torch.save(zoo.load_model(name).state_dict(), files[name])
        return str(files[name])
    return get


def explained(tmp_path, *options):
    out = tmp_path / "out"
    assert cli.main(["explain", *map(str, PHOTOS), "--no-progress", "-o", str(out), *map(str, options)]) == 0
    return out, [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# --- the task of a spec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,task", [("resnet18", "classify"), ("deeplabv3_resnet50", "segment"),
                                        ("fcn_resnet50", "segment"), ("fasterrcnn_resnet50_fpn", "detect"),
                                        ("ssdlite320_mobilenet_v3_large", "detect"), ("timm:resnet18", "classify")])
def test_a_models_family_sets_its_default_task(model, task):
    assert task_of(Spec(model)) == task
    assert task_of(Spec(model, task="multilabel")) == "multilabel"


@pytest.mark.parametrize("build_model,layer", [
    (lambda tv: tv.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None), "backbone.layer4"),
    (lambda tv: tv.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None), "backbone.16"),
    (lambda tv: tv.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None), "backbone.body.layer4"),
    (lambda tv: tv.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None), "backbone.features.1"),
])
def test_the_default_layer_of_a_segmenter_or_detector_is_its_backbones_last_feature_map(build_model, layer):
    import torchvision

    assert fastattr.default_layer(build_model(torchvision.models)) == layer


def test_class_names_come_from_the_models_published_categories():
    assert zoo.categories("deeplabv3_resnet50", 21)[:3] == ("__background__", "aeroplane", "bicycle")
    assert zoo.categories("fasterrcnn_resnet50_fpn")[1] == "person"
    assert zoo.categories("deeplabv3_resnet50", 5) is None  # another number of outputs: shown by index


def test_a_timm_model_loads_by_name_and_an_unknown_one_is_named_with_the_closest():
    assert type(zoo.load_model("timm:resnet18")).__module__.startswith("timm")
    with pytest.raises(fastattr.FastattrError, match=r"timm has no model 'resnet181'; closest: timm:resnet18"):
        zoo.load_model("timm:resnet181")


def test_detection_on_a_backend_other_than_eager_is_refused_before_loading(capsys):
    code = cli.main(["explain", str(PHOTOS[0]), "-o", "/tmp/never-written", "--model", DETECTOR, "--backend", "onnx"])
    assert code == 2
    assert ("--task detect: torchvision's detectors run on the eager hook path only (torch.fx cannot trace them, so "
            "no compiled graph or export holds them), and the backend is onnx; use --backend eager") in capsys.readouterr().err
    assert not Path("/tmp/never-written").exists()


def test_a_task_for_an_export_file_is_refused(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    with pytest.raises(fastattr.InputError, match=r"--task: .* is an export, whose graph holds its task"):
        build(Spec(str(tmp_path / "m.onnx"), task="segment"), "--")


# --- the command line ------------------------------------------------------------------------------------------

def test_explain_segments_a_segmentation_model_reporting_each_classs_summed_score(tmp_path, weights):
    out, lines = explained(tmp_path, "--model", SEGMENTER, "--weights", weights(SEGMENTER), "--input-size", SIZE, "--k", 2)
    pipeline = build(Spec(SEGMENTER, weights(SEGMENTER), input_size=SIZE, k=2))
    with torch.no_grad():
        scores = targets.segmentation()(pipeline.model(batch()))
    want = pipeline(batch())
    for i, line in enumerate(lines):
        assert line["classes"] == want.classes[i].tolist() and line["layer"] == "backbone.16"
        assert line["names"] == [zoo.categories(SEGMENTER, 21)[c] for c in line["classes"]]
        assert line["scores"] == pytest.approx(scores[i, want.classes[i]].tolist(), rel=1e-4, abs=1e-4)
        assert "probabilities" not in line
    with Image.open(out / "chelsea.png") as grid:  # the winning pixels' outline is drawn in REGION_COLOUR
        assert overlay.REGION_COLOUR in {colour for _, colour in grid.getcolors(1 << 20)}


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
def test_explain_detects_with_a_detector_reporting_each_explained_detections_box(tmp_path, weights):
    out, lines = explained(tmp_path, "--model", DETECTOR, "--weights", weights(DETECTOR), "--input-size", SIZE, "--k", 2,
                           "--methods", "gradcam")
    model = zoo.load_model(DETECTOR, weights(DETECTOR))
    with torch.no_grad():
        found = targets.top_detections(model(batch()), 2)
    for i, line in enumerate(lines):
        assert line["classes"] == [0, 1]
        boxes = torch.tensor([d["box"] for d in line["detections"]])
        torch.testing.assert_close(boxes, found[i]["boxes"], rtol=0, atol=0.06)  # rounded to 0.1 pixel
        assert [d["label"] for d in line["detections"]] == found[i]["labels"].tolist()
        assert line["names"] == [zoo.categories(DETECTOR)[label] for label in found[i]["labels"].tolist()]
        assert line["scores"] == pytest.approx(found[i]["scores"].tolist(), abs=1e-4)
    with Image.open(out / "coffee.png") as grid:
        assert overlay.REGION_COLOUR in {colour for _, colour in grid.getcolors(1 << 20)}


def test_explain_with_task_multilabel_reports_each_labels_sigmoid(tmp_path, weights):
    _, lines = explained(tmp_path, "--model", "resnet18", "--weights", weights("resnet18"), "--task", "multilabel",
                         "--input-size", SIZE, "--k", 2)
    pipeline = build(Spec("resnet18", weights("resnet18"), task="multilabel", input_size=SIZE, k=2))
    with torch.no_grad():
        probabilities = pipeline.model(batch()).sigmoid()
    for i, line in enumerate(lines):
        assert line["classes"] == probabilities[i].topk(2).indices.tolist()
        assert line["scores"] == pytest.approx(probabilities[i].topk(2).values.tolist(), abs=1e-4)


def test_the_server_takes_the_task_as_an_option(weights):
    pytest.importorskip("ray.serve")
    from fastattr import serve

    service_options = serve.app_options({"model": SEGMENTER, "weights": weights(SEGMENTER), "input_size": SIZE, "k": 2})
    service_options.pop("num_cpus")
    service = serve.ExplainService(**service_options)
    assert service.pipeline.task == "segment"
    picture = images.read(PHOTOS[0], SIZE)
    answer = serve.answer_batch(service.pipeline, [(picture, serve.Query(2, None, ("gradcam",), "none"))],
                                service.fixed_k)[0]
    want = build(Spec(SEGMENTER, weights(SEGMENTER), input_size=SIZE, k=2))(batch()[:1])
    assert answer.classes.tolist() == want.classes[0].tolist()
    torch.testing.assert_close(answer.maps["gradcam"], want.maps["gradcam"][0], rtol=0, atol=1e-5)


# --- the overlays ------------------------------------------------------------------------------------------------

def test_a_mask_is_outlined_on_every_tile_of_its_row():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    picture = overlay.grid(torch.zeros(3, 8, 8), {"gradcam": torch.zeros(1, 8, 8)}, ["c"], regions=[mask])
    tile = torch.from_numpy(__import__("numpy").array(picture))[overlay.PAD + overlay.CAPTION_H:][:8, overlay.PAD:][:, :8]
    green = (tile == torch.tensor(overlay.REGION_COLOUR, dtype=torch.uint8)).all(-1)
    ring = mask.clone()
    ring[3:5, 3:5] = False  # the mask's pixels with a neighbour outside it
    assert torch.equal(green, ring)


def test_regions_must_match_the_rows():
    with pytest.raises(fastattr.InputError, match=r"regions must hold one mask, box or None per caption \(1\), got 2"):
        overlay.grid(torch.zeros(3, 8, 8), {}, ["c"], regions=[None, None])


# --- --threshold: every class above it, at most k ------------------------------------------------------------------

def test_above_at_most_keeps_the_highest_classes_over_the_threshold():
    classes, real = targets.passing(torch.tensor([[0.9, 0.8, 0.7, 0.1]]), 0.5, at_most=2)
    assert classes.tolist() == [[0, 1]] and real.tolist() == [[True, True]]


def test_explain_with_a_threshold_marks_the_rows_below_it(tmp_path, weights):
    _, lines = explained(tmp_path, "--model", "resnet18", "--weights", weights("resnet18"), "--task", "multilabel",
                         "--threshold", 0.5, "--input-size", SIZE, "--k", 3)
    pipeline = build(Spec("resnet18", weights("resnet18"), task="multilabel", input_size=SIZE, k=3))
    with torch.no_grad():
        probabilities = pipeline.model(batch()).sigmoid()
    above = (probabilities > 0.5).sum(1)
    width = int(above.clamp(1, 3).max())  # the batch's K: the most classes above 0.5 of any image, at most 3
    for i, line in enumerate(lines):
        top = probabilities[i].topk(width)
        assert line["classes"] == top.indices.tolist()
        assert line["real"] == (top.values > 0.5).tolist()


def test_a_threshold_with_an_export_backend_is_refused(capsys):
    code = cli.main(["explain", str(PHOTOS[0]), "-o", "/tmp/never-written", "--model", "resnet18", "--backend", "onnx",
                     "--threshold", "0.5"])
    assert code == 2
    assert "--threshold: an export explains a fixed k per image, and the backend is onnx" in capsys.readouterr().err


# --- a target refusing one image: the others are still explained ---------------------------------------------------

class RefusesDarkImages:
    """A stand-in pipeline whose target refuses images with a negative mean (as a detector's `detections(k)`
    refuses an image with fewer detections than k), and explains the others with fixed values."""

    mean, std, fixed_k, task = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None, "classify"

    def __call__(self, x, classes=None, k=None):
        if (x.flatten(1).mean(1) < 0).any():
            raise fastattr.TargetError("detections: image 0 has 1 detections above the detector's score threshold")
        n, k = len(x), k or 1
        return fastattr.Explanation(x.flatten(1)[:, :4], torch.arange(k).repeat(n, 1),
                                    {"gradcam": x.mean(1, keepdim=True).expand(n, k, -1, -1)}, "layer")


def test_a_batch_with_an_image_the_target_refuses_answers_the_others_and_says_why_for_it():
    from fastattr.serve import Query, answer_batch

    bright, dark = torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), -0.5)
    query = Query(1, None, ("gradcam",), "none")
    answers = answer_batch(RefusesDarkImages(), [(bright, query), (dark, query), (bright * 2, query)])
    assert [a.error for a in answers] == [None, "detections: image 0 has 1 detections above the detector's score "
                                                "threshold", None]
    assert answers[0].maps["gradcam"].mean().item() == 0.5 and answers[2].maps["gradcam"].mean().item() == 1.0


def test_explain_files_lists_an_image_the_target_refuses_and_writes_the_others(tmp_path):
    from fastattr import files

    def explain(x):  # the white image (mean 1) is refused, shifted to a negative mean
        return RefusesDarkImages()(x - 2 * (x.flatten(1).mean(1) > 0.99).view(-1, 1, 1, 1), k=1)

    white = tmp_path / "white.png"
    Image.new("RGB", (8, 8), (255, 255, 255)).save(white)
    report = files.explain_files([PHOTOS[0], white, PHOTOS[1]], explain, tmp_path / "out", size=SIZE, batch_size=3,
                                 mean=(0, 0, 0), std=(1, 1, 1), progress=False)
    assert [p.name for p in report.written] == ["chelsea.png", "coffee.png"]
    assert [(p.name, "detections: image 0 has 1" in why) for p, why in report.failed] == [("white.png", True)]


def test_a_detection_pipeline_takes_images_in_0_1_which_the_detector_normalises_itself():
    pipeline = build(Spec(DETECTOR, input_size=SIZE, k=1))
    assert (pipeline.mean, pipeline.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert build(Spec(SEGMENTER, input_size=SIZE, k=1)).mean == zoo.IMAGENET_MEAN


def test_metrics_of_a_task_other_than_classify_are_refused(capsys):
    code = cli.main(["explain", str(PHOTOS[0]), "-o", "/tmp/never-written", "--model", SEGMENTER, "--metrics",
                     "deletion"])
    assert code == 2 and "--metrics: the faithfulness metrics score a classifier's logits, and the task is segment" \
        in capsys.readouterr().err
