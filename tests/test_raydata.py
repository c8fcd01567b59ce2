"""Offline batch explanation on Ray Data: a folder in, Parquet rows equal to direct calls out."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fastattr
from fastattr import cli, images, raydata
from fastattr.pipeline import Spec

# These start Ray on this machine: one such module at a time, in one worker. Only the first test runs without Ray.
pytestmark = pytest.mark.xdist_group("ray")

pytest.importorskip("ray.data")

EXAMPLES = Path(__file__).parents[1] / "examples"
# The Parquet's columns as Arrow types, a list column as list<its values' type>: plain types, none of Ray's own.
SCHEMA = {"path": "string", "classes": "list<int64>", "names": "list<string>", "probabilities": "list<float>",
          "shape": "list<int32>", "map_gradcam": "list<uint8>", "map_saliency": "list<uint8>",
          "map_smoothgrad": "list<uint8>"}
# Reads the output as someone without Ray would, in a process that never imports it: pyarrow and pandas alone.
READ_WITHOUT_RAY = """
import pickle, sys
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

table = pq.read_table(sys.argv[1])
frame = table.to_pandas()
schema = {f.name: f"list<{f.type.value_type}>" if pa.types.is_list(f.type) else str(f.type) for f in table.schema}
rows = {row.path: {"classes": list(row.classes), "names": list(row.names), "probabilities": np.asarray(row.probabilities),
                   **{c: np.asarray(getattr(row, c)).reshape(row.shape) for c in frame.columns if c.startswith("map_")}}
        for row in frame.itertuples(index=False)}
assert "ray" not in sys.modules, sorted(m for m in sys.modules if m.startswith("ray"))
with open(sys.argv[2], "wb") as f:
    pickle.dump({"schema": schema, "rows": rows}, f)
"""


def read_without_ray(out: Path, scratch: Path) -> dict:
    """{"schema": column -> type, "rows": path -> {column -> value, maps as [K, H, W] arrays}} as a process that
    has no Ray reads the Parquet in `out`."""
    dump = scratch / "rows.pickle"
    read = subprocess.run([sys.executable, "-c", READ_WITHOUT_RAY, str(out), str(dump)], capture_output=True,
                          text=True, timeout=120)
    assert read.returncode == 0, read.stderr
    return pickle.loads(dump.read_bytes())


@pytest.fixture(scope="module", autouse=True)
def no_ray_left_running():
    """ray.data.read_parquet starts Ray by itself; stop it so that later tests can start their own."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def folder_and_weights(tmp_path_factory):
    """20 files: 19 crops of the example photos and one corrupt PNG; resnet18 weights saved to a file so
    that the Ray workers and the direct calls run the same model."""
    folder = tmp_path_factory.mktemp("photos")
    photos = [Image.open(EXAMPLES / f"{name}.png").convert("RGB") for name in ("chelsea", "coffee", "astronaut")]
    for i in range(19):
        photo = photos[i % 3]
        photo.crop((5 * i, 3 * i, photo.width - 2 * i, photo.height - i)).save(folder / f"photo{i:02d}.png")
    (folder / "photo19.png").write_bytes((EXAMPLES / "coffee.png").read_bytes()[:1500])
    torch.manual_seed(0)
    weights = folder.parent / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    return folder, weights


def test_a_worker_turns_a_batch_of_file_bytes_into_rows_and_an_error_for_an_unreadable_file(folder_and_weights):
    folder, weights = folder_and_weights
    spec = Spec(model="resnet18", weights=str(weights), layer="layer4", methods="gradcam", k=2, input_size=32)
    files = [folder / "photo00.png", folder / "photo19.png", folder / "photo01.png"]
    rows = raydata.ExplainBatch(spec)({"path": np.array([str(f) for f in files]),
                                       "bytes": np.array([f.read_bytes() for f in files], dtype=object)})
    assert rows["error"][0] == rows["error"][2] == "" and "photo19.png" in rows["error"][1]
    assert rows["classes"][1].tolist() == [-1, -1] and not rows["map_gradcam"][1].any()
    want = fastattr.build(spec)(images.normalize(torch.stack([images.read(files[i], 32) for i in (0, 2)])))
    assert rows["classes"][[0, 2]].tolist() == want.classes.tolist()
    assert np.array_equal(rows["map_gradcam"][[0, 2]], (want.maps["gradcam"].clamp(0, 1) * 255).round().byte().numpy())
    assert rows["names"][0].tolist() == [fastattr.zoo.imagenet_classes()[c] for c in want.classes[0].tolist()]


def test_rows_become_plain_arrow_columns_with_the_maps_flattened_beside_their_shape(folder_and_weights):
    folder, weights = folder_and_weights
    spec = Spec(model="resnet18", weights=str(weights), layer="layer4", k=2, input_size=32)
    files = [folder / "photo00.png", folder / "photo19.png", folder / "photo01.png"]
    batch = {"path": np.array([str(f) for f in files]), "bytes": np.array([f.read_bytes() for f in files], dtype=object)}
    rows = raydata.ExplainBatch(spec)(batch)
    table = raydata.to_arrow(rows)
    assert {f.name: str(f.type) for f in table.schema} == {
        "path": "string", "error": "string", "classes": "list<item: int64>", "names": "list<item: string>",
        "probabilities": "list<item: float>", "shape": "list<item: int32>", "map_gradcam": "list<item: uint8>",
        "map_saliency": "list<item: uint8>"}
    frame = table.to_pandas()
    for i, row in enumerate(frame.itertuples(index=False)):
        assert row.path == str(files[i]) and row.error == rows["error"][i] and list(row.shape) == [2, 32, 32]
        assert list(row.classes) == rows["classes"][i].tolist() and list(row.names) == rows["names"][i].tolist()
        for method in ("gradcam", "saliency"):
            assert np.array_equal(np.asarray(getattr(row, f"map_{method}")).reshape(row.shape), rows[f"map_{method}"][i])


@pytest.fixture(scope="module")
def job(folder_and_weights, tmp_path_factory):
    """One `fastattr explain --ray` job over the folder, the command line in this process, as every test of the
    job's output reads it: (exit status, stderr, the Parquet folder, the TCP listeners of every process under this
    one while Ray still ran). Starting Ray and its job is most of this module's time, so it runs once."""
    import contextlib
    import io
    import os

    import ray
    from test_ray_ports import listeners

    folder, weights = folder_and_weights
    out = tmp_path_factory.mktemp("out")
    seen, shutdown = {}, ray.shutdown

    def look_then_shut_down(*args, **kwargs):  # the job is done and every process it started still runs
        seen.update(listeners(os.getpid()))
        shutdown(*args, **kwargs)

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr), \
            contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(ray, "shutdown", look_then_shut_down)
        # --noise 0: SmoothGrad is then saliency, which shows that the sampling options reached the workers.
        code = cli.main(["explain", str(folder), "--ray", "--model", "resnet18", "--weights", str(weights),
                         "--layer", "layer4", "--methods", "gradcam, saliency, smoothgrad", "--noise", "0",
                         "--samples", "2", "--k", "2", "--input-size", "64", "--workers", "2", "--batch-size", "4",
                         "--no-progress", "-o", str(out)])
    return code, stderr.getvalue(), out / "parquet", seen


@pytest.mark.slow  # a local Ray cluster
def test_the_corrupt_file_is_reported_with_exit_status_1_and_has_no_row(job):
    import pyarrow.parquet as pq

    code, stderr, out, _ = job
    assert code == 1
    assert "photo19.png" in stderr and "not a readable image" in stderr
    paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert len(paths) == 19 and not any(p.endswith("photo19.png") for p in paths)


@pytest.mark.slow  # a local Ray cluster
def test_the_parquet_reads_back_without_ray_in_plain_types_and_each_row_equals_a_direct_call(job,
                                                                                               folder_and_weights,
                                                                                               tmp_path):
    _, _, out, _ = job
    folder, weights = folder_and_weights
    read = read_without_ray(out, tmp_path)
    assert read["schema"] == SCHEMA
    model = fastattr.zoo.load_model("resnet18", weights)
    direct = fastattr.Explainer(model, layer="layer4", methods=("gradcam", "saliency"))
    assert sorted(Path(p).name for p in read["rows"]) == [f"photo{i:02d}.png" for i in range(19)]
    for path, row in read["rows"].items():
        want = direct(images.normalize(images.read(path, 64)[None]), k=2)
        assert row["classes"] == want.classes[0].tolist()
        np.testing.assert_allclose(row["probabilities"], want.logits.softmax(-1)[0, want.classes[0]].numpy(),
                                   atol=1e-5)
        assert row["names"] == [fastattr.zoo.imagenet_classes()[c] for c in want.classes[0]]
        for method in ("gradcam", "saliency"):
            expected = (want.maps[method][0] * 255).round().numpy()
            assert row[f"map_{method}"].shape == (2, 64, 64) and row[f"map_{method}"].dtype == np.uint8
            assert np.abs(row[f"map_{method}"].astype(np.float64) - expected).max() <= 1


@pytest.mark.slow  # a local Ray cluster
def test_the_sampling_options_reach_the_workers(job):
    import pyarrow.parquet as pq

    # Without noise SmoothGrad is saliency (with the default noise of 0.15 it is not).
    table = pq.read_table(job[2], columns=["map_smoothgrad", "map_saliency"])
    assert table.num_rows == 19
    assert table.column("map_smoothgrad").to_pylist() == table.column("map_saliency").to_pylist()


@pytest.mark.slow  # a local Ray cluster
def test_the_ray_instance_of_the_job_listens_on_loopback_alone(job):
    from test_ray_ports import not_on_loopback

    seen = job[3]
    names = {name for name, _ in seen}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own servers were among the processes looked at
    assert any(seen.values())
    assert not_on_loopback(seen) == []
