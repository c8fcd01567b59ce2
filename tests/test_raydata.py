"""Offline batch explanation on Ray Data: a folder in, Parquet rows equal to direct calls out."""

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


@pytest.fixture(scope="module")
def parquet(folder_and_weights, tmp_path_factory):
    folder, weights = folder_and_weights
    out = tmp_path_factory.mktemp("out") / "explained"
    failed = raydata.explain_to_parquet(str(folder), out, Spec(model="resnet18", weights=str(weights), layer="layer4",
                                        k=2, input_size=64), workers=2, batch_size=4)
    return out, failed


@pytest.mark.slow  # a local Ray cluster
def test_the_corrupt_file_is_reported_and_has_no_row(parquet):
    import pyarrow.parquet as pq

    out, failed = parquet
    assert len(failed) == 1 and "photo19.png" in failed[0] and "not a readable image" in failed[0]
    paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert len(paths) == 19 and not any(p.endswith("photo19.png") for p in paths)


@pytest.mark.slow  # a local Ray cluster
def test_each_row_equals_a_direct_call_on_that_image(parquet, folder_and_weights):
    import ray.data  # registers the tensor column type

    out, _ = parquet
    folder, weights = folder_and_weights
    model = fastattr.zoo.load_model("resnet18", weights)
    direct = fastattr.Explainer(model, layer="layer4", methods=("gradcam", "saliency"))
    for row in ray.data.read_parquet(str(out)).iter_rows():
        want = direct(images.normalize(images.read(row["path"], 64)[None]), k=2)
        assert row["classes"].tolist() == want.classes[0].tolist()
        np.testing.assert_allclose(row["probabilities"], want.logits.softmax(-1)[0, want.classes[0]].numpy(),
                                   atol=1e-5)
        assert list(row["names"]) == [fastattr.zoo.imagenet_classes()[c] for c in want.classes[0]]
        for method in ("gradcam", "saliency"):
            expected = (want.maps[method][0] * 255).round().numpy()
            assert row[f"map_{method}"].shape == (2, 64, 64)
            assert np.abs(row[f"map_{method}"].astype(np.float64) - expected).max() <= 1


@pytest.mark.slow  # a local Ray cluster
def test_the_command_line_writes_parquet_and_exits_1_for_the_corrupt_file(folder_and_weights, tmp_path, capsys):
    folder, weights = folder_and_weights
    code = cli.main(["explain", str(folder), "--ray", "--model", "resnet18", "--weights", str(weights),
                     "--input-size", "32", "--k", "1", "--methods", "saliency,smoothgrad", "--noise", "0",
                     "--samples", "2", "-o", str(tmp_path)])
    assert code == 1
    assert "photo19.png" in capsys.readouterr().err
    assert list((tmp_path / "parquet").glob("*.parquet"))
    # --noise reached the workers: without noise SmoothGrad is saliency (with the default 0.15 it is not)
    import ray.data

    for row in ray.data.read_parquet(str(tmp_path / "parquet")).iter_rows():
        assert np.array_equal(row["map_smoothgrad"], row["map_saliency"])
