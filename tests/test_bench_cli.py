"""`fastattr bench`: the latency statistics, the table and JSON it writes, and its usage errors (exit 2).

The runs use resnet18 at 32x32 with 1 warm-up and 3 timed calls: they check the plumbing, not the speed.
"""

import argparse
import contextlib
import io
import json

import pytest
import torch

from fastattr import METHODS
from fastattr.bench import add_arguments, latency_stats, run

FAST = ["--model", "resnet18", "--input-size", "32", "--batch-sizes", "1,2", "--iters", "3", "--warmup", "1",
        "--no-progress"]


def bench(*argv: str) -> int:
    """`fastattr bench FAST... argv...`; a later option overrides the same one in FAST."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args([*FAST, *argv]))


def test_latency_stats_on_known_values():
    # Linear interpolation at rank p/100 * (n - 1) of the sorted values: p90 -> rank 2.7, p99 -> rank 2.97.
    stats = latency_stats([0.4, 0.1, 0.3, 0.2], batch=4)
    assert stats == pytest.approx({"p50_ms": 250.0, "p90_ms": 370.0, "p99_ms": 397.0, "mean_ms": 250.0,
                                   "images_per_s": 16.0})
    assert latency_stats([0.5], batch=2) == pytest.approx({"p50_ms": 500.0, "p90_ms": 500.0, "p99_ms": 500.0,
                                                           "mean_ms": 500.0, "images_per_s": 4.0})
    with pytest.raises(ValueError):
        latency_stats([], batch=1)


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out" / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = bench("--json", str(path))
    return code, stdout.getvalue(), json.loads(path.read_text())


@pytest.mark.xdist_group("bench-eager-run")  # the module's eager_run is made once
def test_a_run_writes_json_with_one_row_of_positive_numbers_per_batch_size(eager_run):
    code, _, report = eager_run
    assert code == 0
    assert [row["batch"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["calls"] == 3
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "images_per_s", "first_call_s"):
            assert row[key] > 0, key
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["p50_ms"] / 1e3))
    meta = report["meta"]
    assert {k: meta[k] for k in ("model", "backend", "methods", "k", "layer", "device", "input_shape")} == {
        "model": "resnet18", "backend": "eager", "methods": ["gradcam", "saliency"], "k": 3, "layer": "layer4",
        "device": "cpu", "input_shape": [3, 32, 32]}  # fastattr.pipeline.DEFAULTS: the same defaults as every entry point
    assert meta["torch"] == torch.__version__ and meta["threads"] == torch.get_num_threads()


@pytest.mark.xdist_group("bench-eager-run")  # the module's eager_run is made once
def test_the_table_has_the_header_and_one_line_per_batch_size(eager_run):
    _, stdout, report = eager_run
    lines = stdout.strip().splitlines()
    header = lines.index(next(line for line in lines if line.split()[:3] == ["batch", "p50", "ms"]))
    assert lines[header].split() == ["batch", "p50", "ms", "p90", "ms", "p99", "ms", "mean", "ms", "images/s",
                                     "first", "call", "s"]
    rows = lines[header + 1:]
    assert [line.split()[0] for line in rows] == ["1", "2"]
    assert float(rows[0].split()[1]) == pytest.approx(report["rows"][0]["p50_ms"], abs=0.01)


def test_plain_inference_for_a_time_budget():
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench("--backend", "inference", "--batch-sizes", "2", "--seconds", "0.2", "--warmup", "0") == 0
    assert "plain inference" in stdout.getvalue()
    row = stdout.getvalue().strip().splitlines()[-1].split()
    assert row[0] == "2" and row[-1] == "-"  # no warm-up call, so no first-call time


@pytest.mark.slow  # an ONNX export of a whole model
def test_the_onnx_backend_exports_and_runs_in_onnxruntime(tmp_path):
    path = tmp_path / "onnx.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench("--backend", "onnx", "--methods", "gradcam,saliency", "--k", "2", "--json", str(path)) == 0
    report = json.loads(path.read_text())
    assert report["meta"]["backend"] == "onnx" and report["meta"]["methods"] == ["gradcam", "saliency"]
    assert report["meta"]["k"] == 2 and report["meta"]["export_s"] > 0
    assert [row["batch"] for row in report["rows"]] == [1, 2]
    assert all(row["p50_ms"] > 0 and row["images_per_s"] > 0 for row in report["rows"])


def test_an_unknown_model_name_is_a_usage_error_naming_it(capsys):
    assert bench("--model", "resnet1000") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastattr: error:") and "'resnet1000'" in err


def test_an_unknown_method_is_a_usage_error_listing_the_valid_ones(capsys):
    assert bench("--methods", "gradcam,gradcam+") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastattr: error:") and "'gradcam+'" in err
    assert all(repr(name) in err for name in METHODS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    assert bench("--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastattr: error: --device cuda:") and "--device cpu" in err


@pytest.mark.parametrize("sizes", ["1,x", "0", "", "2,-1"])
def test_a_bad_batch_size_list_is_a_usage_error(capsys, sizes):
    assert bench("--batch-sizes", sizes) == 2
    assert capsys.readouterr().err.startswith("fastattr: error: --batch-sizes")


def test_a_backend_conflicting_with_an_export_file_is_a_usage_error(capsys):
    # The backend is checked before the file is read, so the file need not exist.
    assert bench("--model", "resnet18.onnx", "--backend", "eager") == 2
    err = capsys.readouterr().err
    assert "--backend eager" in err and ".onnx" in err


def test_fastattr_bench_subcommand_runs_through_the_cli(tmp_path):
    from fastattr import cli

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--model", "resnet18", "--input-size", "32", "--batch-sizes", "2", "--iters", "2",
                     "--warmup", "1", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["layer"] == "layer4" and [row["batch"] for row in report["rows"]] == [2]


def test_a_metric_of_the_first_methods_maps_is_timed_instead_of_the_explanation(tmp_path):
    path = tmp_path / "metric.json"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert bench("--methods", "gradcam,saliency", "--k", "1", "--metric", "deletion", "--metric-steps", "2",
                     "--json", str(path)) == 0
    report = json.loads(path.read_text())
    assert {k: report["meta"][k] for k in ("methods", "metric", "metric_steps")} == {
        "methods": ["gradcam"], "metric": "deletion", "metric_steps": 2}
    assert [row["batch"] for row in report["rows"]] == [1, 2] and all(r["p50_ms"] > 0 for r in report["rows"])
    assert "deletion of gradcam k=1" in stdout.getvalue()


def test_a_perturbation_method_is_timed_as_any_method(tmp_path):
    path = tmp_path / "occlusion.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench("--methods", "occlusion", "--k", "1", "--batch-sizes", "1", "--json", str(path)) == 0
    report = json.loads(path.read_text())
    assert report["meta"]["methods"] == ["occlusion"] and report["rows"][0]["p50_ms"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--metric", "deletion,road"], "--metric 'deletion,road': times one metric; pass one of deletion, insertion"),
    (["--metric", "roc"], "metrics: unknown 'roc'"),
    (["--metric", "deletion", "--backend", "onnx"], "--metric: scores perturbed images with the torch model; use "
                                                    "a model name with --backend eager or compiled, not onnx"),
    (["--metric", "deletion", "--metric-steps", "0"], "--metric-steps: must be >= 1, got 0"),
])
def test_a_metric_that_cannot_be_timed_is_a_usage_error_before_loading(capsys, argv, message):
    assert bench(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastattr: error:") and message in err
