"""`fastattr explain --ray --address` against a real Ray cluster of two nodes on this machine, started as a user
starts one (`ray start --head`, then `ray start --address` for the second node), on loopback alone (every process of
both nodes listens there and nowhere else): one of the model's workers is killed mid-job, the second node runs
batches too, and the Parquet still holds every image once, equal to direct calls."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fastattr
from fastattr import images
from fastattr.pipeline import Spec
from test_ray_ports import listeners, not_on_loopback

pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

# These start Ray on this machine: one such module at a time, in one worker.
pytestmark = pytest.mark.xdist_group("ray")

IMAGES = 200
SIZE = 64
# `ray start --node-ip-address 127.0.0.1` and `ray.init(address="127.0.0.1:PORT")` swap loopback for the address other
# machines reach this one at (`services.resolve_ip_for_localhost`), and bind to every interface; only Ray's
# single-machine mode keeps loopback, and that mode refuses a second node. So the nodes and the job run with that
# swap turned off: each keeps the loopback address it is given, and listens there alone.
ON_LOOPBACK = """import sys
from ray._private import services
assert callable(services.resolve_ip_for_localhost)  # what this replaces is still there
services.resolve_ip_for_localhost = lambda host: host
"""
RAY = ON_LOOPBACK + "from ray.scripts.scripts import main\nsys.argv[0] = 'ray'\nmain()\n"
FASTATTR = ON_LOOPBACK + "from fastattr.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node (1 CPU) and a second node joined to it (2 CPUs and a resource of its own, "node2"), each a
    `ray start --block` process with the Ray processes it starts under it: (address, environment for its clients,
    the ids of the two `ray start` processes).

    Ray's temporary folder is a new one (short: it holds Unix sockets), so that nothing else on this machine finds
    this cluster as "the current one"; its token is a new one too. `ray stop` would stop every Ray process on this
    machine, other people's included, so the cluster is stopped by process id: each `ray start` and everything under
    it."""
    import ray  # noqa: F401 - Ray ships psutil, and puts it on the path
    import psutil

    logs = tmp_path_factory.mktemp("cluster")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = free_port()
    environment = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    nodes = []

    def start(name: str, *options: str) -> None:
        log = logs / f"{name}.log"
        with log.open("w") as out:
            node = subprocess.Popen([sys.executable, "-c", RAY, "start", "--block", "--node-ip-address", "127.0.0.1",
                                     "--temp-dir", temp, "--disable-usage-stats", "--dashboard-agent-listen-port",
                                     str(free_port()), "--metrics-export-port", str(free_port()), *options],
                                    stdout=out, stderr=subprocess.STDOUT, env=environment)
        nodes.append(node)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            if node.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start ({name}) did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    try:
        start("head", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
              "--ray-client-server-port", str(free_port()))
        start("node2", "--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--resources", json.dumps({"node2": 1}))
        yield f"127.0.0.1:{port}", environment, [node.pid for node in nodes]
    finally:
        processes = []
        for node in nodes:
            try:
                processes += [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for process in processes:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(processes, timeout=3)
        for process in left:
            process.kill()
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def photos_and_spec(tmp_path_factory):
    """200 random 64x64 PNGs, and the spec the job runs: resnet18 with weights saved to a file, so that the
    workers on both nodes and the direct calls here run the same model."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"photo{i:03d}.png")
    torch.manual_seed(0)
    weights = folder.parent / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    return folder, Spec(model="resnet18", weights=str(weights), methods="gradcam,saliency", k=2, input_size=SIZE)


def explaining_workers(pids: list[int]) -> list:
    """The processes under `pids` that run a batch of `ExplainBatchToArrow` now (Ray titles a worker with the
    method it runs: `ray::MapWorker(MapBatches(ExplainBatchToArrow)).submit`, `.__init__` while it loads)."""
    import psutil

    found = []
    for pid in pids:
        for process in psutil.Process(pid).children(recursive=True):
            try:
                title = " ".join(process.cmdline())
            except psutil.NoSuchProcess:
                continue
            if "ExplainBatch" in title and "__init__" not in title and ".submit" in title:
                found.append(process)
    return found


@pytest.mark.slow  # a Ray cluster of two nodes and a job of 200 images
def test_a_job_on_a_two_node_cluster_whose_worker_is_killed_mid_job_writes_every_image_once_as_direct_calls(
        cluster, photos_and_spec, tmp_path):
    import psutil

    address, environment, ray_starts = cluster
    folder, spec = photos_and_spec
    log = tmp_path / "job.log"
    with log.open("w") as out:
        job = subprocess.Popen([sys.executable, "-c", FASTATTR, "explain", str(folder), "-o", str(tmp_path / "out"),
                                "--ray", "--address", address, "--workers", "2", "--batch-size", "4", "--model",
                                "resnet18", "--weights", spec.weights, "--methods", "gradcam,saliency", "--k", "2",
                                "--input-size", str(SIZE), "--no-progress"],
                               stdout=out, stderr=subprocess.STDOUT, env=environment)
    node2_worked = False  # whether a worker under the second node's `ray start` was seen running a batch
    try:
        deadline = time.monotonic() + 240
        while not (working := explaining_workers(ray_starts)):
            assert job.poll() is None, f"the job ended before a worker was seen at work:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        node2_worked = bool(explaining_workers(ray_starts[1:]))
        working[0].kill()  # SIGKILL, by its id, while it runs a batch: no chance to finish it
        assert job.poll() is None  # mid-job: the job was still running when its worker died
        # Mid-job, the model's workers among them: what every process of both nodes listens on.
        seen = {**listeners(ray_starts[0]), **listeners(ray_starts[1])}
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            node2_worked = node2_worked or bool(explaining_workers(ray_starts[1:]))
            time.sleep(0.2)
        assert job.wait(10) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()

    assert [name for name, _ in seen].count("raylet") == 2 and "gcs_server" in {name for name, _ in seen}, seen
    assert not_on_loopback(seen) == []
    assert node2_worked  # the job's batches ran on the second node too, not on the head alone

    frame = pq.read_table(tmp_path / "out" / "parquet").to_pandas()
    assert sorted(Path(p).name for p in frame.path) == sorted(f"photo{i:03d}.png" for i in range(IMAGES))  # each once
    pipeline = fastattr.build(spec)
    rows = {Path(row.path).name: row for row in frame.itertuples(index=False)}
    files = sorted(folder.iterdir())
    for start in range(0, IMAGES, 50):
        batch = files[start:start + 50]
        want = pipeline(images.normalize(torch.stack([images.read(f, SIZE) for f in batch])))
        for i, file in enumerate(batch):
            row = rows[file.name]
            assert list(row.classes) == want.classes[i].tolist(), file.name
            for method in ("gradcam", "saliency"):
                stored = np.asarray(getattr(row, f"map_{method}")).reshape(row.shape).astype(np.int16)
                exact = (want.maps[method][i].clamp(0, 1) * 255).round().numpy()
                assert np.abs(stored - exact).max() <= 1, (file.name, method)  # one uint8 step: 1/255
