"""scripts/bench_report.py on hand-built benchmark-matrix JSONs whose medians and ratios are known."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_report.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_report"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


br = _load_script()

MACHINE = {"system": "Linux", "release": "6.1", "cpu": {"brand_raw": "Test CPU", "count": 2}}

# (model, layer, method, k, batch, device) -> case -> images/s of rep0 and rep1; the medians are in comments.
GROUPS = {
    ("resnet18", "layer4", "gradcam", 5, 16, "cpu"): {
        "fastattr-eager": (100, 110),  # 105
        "fastattr-compiled": (120, 130),  # 125
        "fastattr-onnxruntime": (200, 220),  # 210, the best fastattr
        "article": (4, 6),  # 5 (2 images per call, whatever the batch)
        "captum": (40, 50),  # 45, the best peer
        "pytorch-grad-cam": (20, 30),  # 25
        "eager-inference": (150, 170),  # 160, the floor
        "compiled-inference": (160, 180),  # 170
        "onnxruntime-inference": (240, 260),  # 250, fastattr-onnxruntime's own backend
    },
    # Behind on both counts: 52 / 72 = 0.72x the floor, 52 / 49 = 1.06x captum.
    ("resnet50", "layer3", "gradcam", 1, 1, "cpu"): {
        "fastattr-eager": (50, 54),  # 52
        "article": (2, 2),  # 2
        "captum": (48, 50),  # 49
        "eager-inference": (70, 74),  # 72
    },
    # Saliency: the floor is forward-backward-to-input (38 / 40 = 0.95x), not eager-inference (0.38x).
    ("resnet18", "layer4", "saliency", 1, 2, "cpu"): {
        "fastattr-eager": (30, 34),  # 32
        "fastattr-compiled": (36, 40),  # 38, the best fastattr
        "captum": (10, 14),  # 12
        "forward-backward-to-input": (38, 42),  # 40
        "eager-inference": (100, 100),  # 100
        "compiled-inference": (50, 50),  # 50
    },
    # Ahead of the floor (100 / 105 = 0.95x) but behind pytorch-grad-cam (100 / 120 = 0.83x).
    ("resnet18", "layer4", "gradcam", 1, 2, "cuda"): {
        "fastattr-eager": (100, 100),
        "pytorch-grad-cam": (120, 120),
        "eager-inference": (105, 105),
    },
}
LABEL_A = "resnet18 layer4 gradcam top-5, batch 16, cpu"
LABEL_B = "resnet50 layer3 gradcam top-1, batch 1, cpu"
LABEL_C = "resnet18 input saliency top-1, batch 2, cpu"
LABEL_D = "resnet18 layer4 gradcam top-1, batch 2, cuda"


def label(model, layer, method, k, n, device) -> str:
    return f"{model} {layer if method == 'gradcam' else 'input'} {method} top-{k}, batch {n}, {device}"


def bench_entry(key: tuple, case: str, rep: int, images_per_s: float) -> dict:
    model, layer, method, k, n, device = key
    params = dict(rep=rep, case=case, name=model, layer=layer, method=method, k=k, n=n, device=device)
    info = dict(group=label(*key), model=model, layer=layer, method=method, k=k, case=case, device=device,
                batch=2 if case == "article" else n, size=64, threads=2, torch="2.99.0", images_per_s=images_per_s)
    return {"name": f"test_matrix[rep{rep}-{case}]", "params": params, "extra_info": info}


def matrix(groups: dict = GROUPS, datetime: str = "2026-01-02T03:04:05+00:00") -> dict:
    benchmarks = [bench_entry(key, case, rep, values[rep])
                  for rep in (0, 1) for key, cases in groups.items() for case, values in cases.items()]
    return {"machine_info": MACHINE, "datetime": datetime, "benchmarks": benchmarks}


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def by_label(results) -> dict:
    return {r.label: r for r in results}


def test_medians_floor_and_ratios_of_a_group():
    result = by_label(br.matrix_groups(matrix()))[LABEL_A]
    assert result.group == br.Group("resnet18", "layer4", "gradcam", 5, 16, "cpu")
    assert result.medians["fastattr-onnxruntime"] == 210 and result.medians["article"] == 5
    assert result.floor_case == "eager-inference" and result.floor == 160
    assert result.ratios() == pytest.approx({"floor": 210 / 160, "same-backend": 210 / 250, "article": 42.0,
                                             "peer": 210 / 45})


def test_pivot_row_cells():
    results = by_label(br.matrix_groups(matrix()))
    assert br.table_row(results[LABEL_A]) == [
        "resnet18", "layer4", "gradcam top-5", "16", "cpu", "160", "105", "125", "**210**", "5.00", "45.0",
        "25.0", "1.31", "0.84", "42.0", "4.67"]
    # Missing cases are "-"; the batch is the group's, though extra_info's batch is 2 for the article.
    assert br.table_row(results[LABEL_B]) == [
        "resnet50", "layer3", "gradcam top-1", "1", "cpu", "72.0", "**52.0**", "-", "-", "2.00", "49.0", "-",
        "0.72", "0.72", "26.0", "1.06"]
    # Saliency: floor is forward-backward-to-input, same backend is compiled-inference, the target "input".
    assert br.table_row(results[LABEL_C]) == [
        "resnet18", "input", "saliency top-1", "2", "cpu", "40.0", "32.0", "**38.0**", "-", "-", "12.0", "-",
        "0.95", "0.76", "-", "3.17"]


def test_report_header_columns_and_order():
    text = br.report(matrix())
    lines = text.splitlines()
    assert lines[0] == ("Machine: Test CPU, 2 cores, Linux 6.1; torch 2.99.0; run 2026-01-02T03:04.")
    assert "median over 2 reps" in text and "floor: eager-inference" in text
    header = next(line for line in lines if line.startswith("| model |"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == list(br.COLUMNS)
    rows = [line for line in lines if line.startswith("| resnet")]
    assert [row.split(" | ")[:5] for row in rows] == [  # sorted by device, model, target, method, k, batch
        ["| resnet18", "input", "saliency top-1", "2", "cpu"], ["| resnet18", "layer4", "gradcam top-5", "16", "cpu"],
        ["| resnet50", "layer3", "gradcam top-1", "1", "cpu"], ["| resnet18", "layer4", "gradcam top-1", "2", "cuda"]]


def test_not_ahead_lists_exactly_the_groups_behind():
    lines = br.not_ahead(br.matrix_groups(matrix()))
    assert [line.split(": ", 1)[0] for line in lines] == [f"- {LABEL_B}", f"- {LABEL_D}"]
    b, d = lines
    assert "fastattr-eager is 1.06x captum" in b and "0.72x the floor, eager-inference" in b
    assert "fastattr-eager is 0.83x pytorch-grad-cam" in d and "floor" not in d
    assert br.report(matrix()).rstrip().endswith(d)


def test_not_ahead_when_everything_is_ahead():
    data = matrix({key: GROUPS[key] for key in GROUPS if label(*key) in (LABEL_A, LABEL_C)})
    assert br.not_ahead(br.matrix_groups(data)) == []
    assert br.report(data).rstrip().endswith("- nowhere in this run")


def test_group_batch_from_the_group_string_without_params():
    data = matrix()
    for bench in data["benchmarks"]:
        bench["params"] = {}
    result = by_label(br.matrix_groups(data))[LABEL_A]
    assert result.group.batch == 16 and br.table_row(result)[3] == "16"


def test_readme_block_replacement_keeps_the_text_around(tmp_path):
    results = write(tmp_path, "cpu-matrix.json", matrix())
    readme = tmp_path / "README.md"
    before = "# Title\n\nintro\n"
    after = "\noutro\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n"
    readme.write_text(before + "<!-- bench:cpu-matrix -->\nold table\n<!-- /bench:cpu-matrix -->" + after)
    assert br.main(["table", str(results), "--readme", str(readme)]) == 0
    expected = before + "<!-- bench:cpu-matrix -->\n" + br.report(matrix()) + "<!-- /bench:cpu-matrix -->" + after
    assert readme.read_text() == expected
    assert br.main(["table", str(results), "--readme", str(readme)]) == 0  # idempotent
    assert readme.read_text() == expected


def test_readme_without_the_block_is_an_error(tmp_path):
    results = write(tmp_path, "cpu-matrix.json", matrix())
    readme = tmp_path / "README.md"
    readme.write_text("no block here\n")
    with pytest.raises(SystemExit, match="bench:cpu-matrix"):
        br.main(["table", str(results), "--readme", str(readme)])
    assert readme.read_text() == "no block here\n"


def test_table_prints(tmp_path, capsys):
    assert br.main(["table", str(write(tmp_path, "m.json", matrix()))]) == 0
    assert capsys.readouterr().out == br.report(matrix())


def slowed(factors: dict[str, float]) -> dict:
    """The fixture with group A's cases scaled by `factors`, its article dropped and a case added."""
    groups = copy.deepcopy(GROUPS)
    a = groups[("resnet18", "layer4", "gradcam", 5, 16, "cpu")]
    for case, factor in factors.items():
        a[case] = tuple(v * factor for v in a[case])
    del a["article"]
    a["forward-backward-to-input"] = (1, 1)
    return matrix(groups)


def test_compare_flags_a_20_percent_slowdown_not_a_5_percent_one(tmp_path, capsys):
    old = write(tmp_path, "old.json", matrix())
    new = write(tmp_path, "new.json", slowed({"fastattr-eager": 0.80, "fastattr-compiled": 0.95}))
    assert br.main(["compare", str(old), str(new), "--threshold", "0.10"]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if "REGRESSION" in line]
    assert flagged == [f"| {LABEL_A} | fastattr-eager | 105 | 84.0 | 0.80 | REGRESSION |"]
    assert f"| {LABEL_A} | fastattr-compiled | 125 | 119 | 0.95 |  |" in out
    assert f"Only in the old file:\n- {LABEL_A} / article\n" in out
    assert f"Only in the new file:\n- {LABEL_A} / forward-backward-to-input\n" in out
    assert "1 regression (new/old under 0.90)" in out
    # A looser threshold lets the same 20 % through.
    assert br.main(["compare", str(old), str(new), "--threshold", "0.25"]) == 0


def test_compare_passes_a_5_percent_slowdown(tmp_path, capsys):
    old = write(tmp_path, "old.json", matrix())
    new = write(tmp_path, "new.json", slowed({"fastattr-eager": 0.95, "captum": 1.30}))
    assert br.main(["compare", str(old), str(new)]) == 0
    assert "REGRESSION" not in capsys.readouterr().out
    comparison = br.compare(br.load(old), br.load(new), threshold=0.10)
    assert comparison.regressions == []
    assert len(comparison.rows) == sum(len(cases) for cases in GROUPS.values()) - 1


def test_compare_rejects_a_threshold_outside_0_1(tmp_path):
    old = write(tmp_path, "old.json", matrix())
    with pytest.raises(SystemExit):
        br.main(["compare", str(old), str(old), "--threshold", "10"])


def test_chart_writes_a_png_of_the_requested_width(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "matrix.png"
    assert br.main(["chart", str(write(tmp_path, "m.json", matrix())), "-o", str(out), "--width", "1000"]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 995 <= width <= 1005 and 300 <= height <= 4000


def test_chart_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import raise ImportError
    with pytest.raises(SystemExit, match="matplotlib"):
        br.chart(matrix(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
