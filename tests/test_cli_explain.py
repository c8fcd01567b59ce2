"""`fastattr explain` and `fastattr layers` on the shipped photos."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fastattr import cli

EXAMPLES = Path(__file__).parents[1] / "examples"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png"]


@pytest.fixture
def photos_with_bad_files(tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(EXAMPLES, folder)
    (folder / "notes.jpg").write_text("not an image")
    (folder / "truncated.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes()[:2000])
    return folder


def test_explain_writes_a_grid_and_a_json_line_per_photo_and_reports_bad_files(photos_with_bad_files, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["explain", str(photos_with_bad_files), "--k", "2", "--batch-size", "2", "--no-progress",
                     "-o", str(out)])
    assert code == 1  # some files failed
    err = capsys.readouterr().err
    assert "skipped 2 files" in err and "notes.jpg" in err and "truncated.png" in err
    assert sorted(p.name for p in out.glob("*.png")) == PHOTOS
    with Image.open(out / "chelsea.png") as grid:  # photo + gradcam + saliency columns, 2 rows of 224 tiles
        assert grid.width > 3 * 224 and grid.height > 2 * 224
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(line["file"]).name for line in lines] == PHOTOS
    cat = lines[1]
    assert cat["names"][0] in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert len(cat["classes"]) == len(cat["probabilities"]) == 2
    assert cat["probabilities"][0] >= cat["probabilities"][1] > 0
    assert set(cat["maps"]) == {"gradcam", "saliency"}
    assert all(0 <= v < 224 for stat in cat["maps"]["gradcam"] for v in stat["peak"])


def test_explain_of_readable_photos_only_exits_zero_and_passes_over_the_readme(tmp_path, capsys):
    code = cli.main(["explain", str(EXAMPLES), "--methods", "gradcam", "--k", "1", "--no-progress",
                     "-o", str(tmp_path)])
    assert code == 0
    assert "passed over 1 files" in capsys.readouterr().out
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_explain_with_an_unknown_model_is_a_usage_error_naming_the_closest(tmp_path, capsys):
    # An exit status returned, not a SystemExit raised: only the command line turns errors into exit codes.
    assert cli.main(["explain", str(EXAMPLES), "--model", "resnt18", "-o", str(tmp_path)]) == 2
    assert "'resnet18'" in capsys.readouterr().err


def test_explain_of_a_missing_path_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["explain", str(tmp_path / "nope.png"), "-o", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_explain_with_an_unknown_method_lists_the_valid_ones(tmp_path, capsys):
    assert cli.main(["explain", str(EXAMPLES), "--methods", "gradcam,bogus", "-o", str(tmp_path)]) == 2
    assert "saliency" in capsys.readouterr().err


def test_layers_lists_candidates_and_marks_the_default(capsys):
    assert cli.main(["layers", "efficientnet_lite0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "bn2  (default)" in lines and "blocks.6.0.conv_pwl" in lines


@pytest.mark.slow  # an ONNX export of a whole model
def test_explain_runs_an_onnx_export_and_refuses_a_k_or_noise_other_than_its_own(tmp_path, capsys):
    onnx = tmp_path / "r18.onnx"
    assert cli.main(["export", "--model", "resnet18", "--layer", "layer4", "--methods", "gradcam,layercam",
                     "--k", "2", "--input-size", "64", "-o", str(onnx)]) == 0
    assert cli.main(["explain", str(EXAMPLES / "coffee.png"), "--onnx", str(onnx), "--no-progress",
                     "-o", str(tmp_path / "out")]) == 0
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert len(line["classes"]) == 2 and set(line["maps"]) == {"gradcam", "layercam"}
    assert line["maps"]["gradcam"][0]["peak"][0] < 64
    assert cli.main(["explain", str(EXAMPLES / "coffee.png"), "--onnx", str(onnx), "--k", "3",
                     "-o", str(tmp_path / "out")]) == 2
    assert "exported for k=2" in capsys.readouterr().err
    assert cli.main(["explain", str(EXAMPLES / "coffee.png"), "--onnx", str(onnx), "--noise", "0.3",
                     "-o", str(tmp_path / "out")]) == 2
    assert "--noise 0.3: " in (err := capsys.readouterr().err) and "was exported with noise 0.15; drop --noise" in err


def test_explain_runs_a_pt2_program_given_as_the_model(tmp_path):
    program = tmp_path / "r18.pt2"
    assert cli.main(["export", "--model", "resnet18", "--layer", "layer4", "--methods", "gradcam", "--k", "2",
                     "--input-size", "64", "--format", "pt2", "-o", str(program)]) == 0
    assert cli.main(["explain", str(EXAMPLES / "chelsea.png"), "--model", str(program), "--trusted", "--no-progress",
                     "-o", str(tmp_path / "out")]) == 0
    line = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert len(line["classes"]) == 2 and list(line["maps"]) == ["gradcam"]
    with Image.open(tmp_path / "out" / "chelsea.png") as grid:  # two 64-pixel tiles per row: photo, gradcam
        assert grid.width < 3 * 64


def test_explain_draws_any_method_and_passes_smoothgrad_and_ig_options(tmp_path):
    code = cli.main(["explain", str(EXAMPLES / "coffee.png"), "--model", "resnet18", "--input-size", "64",
                     "--methods", "gradcam++,eigencam,smoothgrad,ig", "--samples", "2", "--steps", "2", "--k", "2",
                     "--no-progress", "-o", str(tmp_path)])
    assert code == 0
    (line,) = (tmp_path / "results.jsonl").read_text().splitlines()
    maps = json.loads(line)["maps"]
    assert list(maps) == ["gradcam++", "eigencam", "smoothgrad", "ig"]
    assert all(len(per_class) == 2 for per_class in maps.values())
    from fastattr.overlay import PAD
    assert Image.open(tmp_path / "coffee.png").size[0] == PAD + 5 * (64 + PAD)  # the photo, then a tile per method


def test_explain_refuses_zero_smoothgrad_samples(tmp_path, capsys):
    assert cli.main(["explain", str(EXAMPLES / "coffee.png"), "--model", "resnet18", "--methods", "smoothgrad",
                     "--samples", "0", "-o", str(tmp_path)]) == 2
    assert "samples: expected an int >= 1, got 0" in capsys.readouterr().err
