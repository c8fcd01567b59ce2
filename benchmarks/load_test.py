"""Load test of `fastattr serve`: concurrent clients POST real photos over loopback; every answer is checked.

    .venv/bin/python benchmarks/load_test.py --model resnet50 --input-size 224 --clients 16 --requests 96 \
        --max-batch-size 16 -o benchmarks/results/cpu-serving.json
    .venv/bin/python benchmarks/load_test.py --server kserve ... -o benchmarks/results/cpu-serving-kserve.json

With `--server kserve` the server is `fastattr serve --kserve` in its own process, called on V1's `:explain`.

For each configuration it starts Ray Serve in this process (a local Ray instance, loopback only), sends
`--requests` requests of the example photos from `--clients` threads (k=3, maps as uint8 arrays), and
records throughput and p50 / p90 / p99 latency. Every answer is compared with a direct `Explainer` call on
that photo alone (same classes, maps within one uint8 step); lost, failed and wrong answers are counted. The
same backend's offline batched throughput (decoding included, batches of `--max-batch-size`, no Ray or
HTTP) is measured in this process before and after, and the served / offline ratio is reported. The run is
bounded: `--time-limit` seconds per configuration.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [REPO / "examples" / f"{name}.png" for name in ("chelsea", "coffee", "astronaut")]
K = 3


def offline_images_per_s(backend, photos: list[bytes], batch: int, n: int) -> float:
    """Decode `n` photos and explain them `batch` at a time, as a batch job without a server would."""
    from fastattr import images
    from fastattr.serve import load_image

    start = time.perf_counter()
    for first in range(0, n, batch):
        count = min(batch, n - first)
        stack = torch.stack([load_image(photos[(first + i) % len(photos)], backend.input_size, 1 << 30, 1 << 30)
                             for i in range(count)])
        backend(images.normalize(stack), None, K)
    return n / (time.perf_counter() - start)


def expected_answers(backend, photos: list[bytes]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    from fastattr import images
    from fastattr.serve import load_image

    answers = []
    for data in photos:
        out = backend(images.normalize(load_image(data, backend.input_size, 1 << 30, 1 << 30)[None]), None, K).cpu()
        answers.append((out.classes[0].tolist(),
                        {m: (v[0] * 255).round().to(torch.uint8).numpy() for m, v in out.maps.items()}))
    return answers


def wrong(answer: dict, expected: tuple[list[int], dict[str, np.ndarray]]) -> bool:
    classes, maps = expected
    if answer.get("classes") != classes:
        return True
    for method, want in maps.items():
        for j, encoded in enumerate(answer["maps"][method]):
            got = np.frombuffer(base64.b64decode(encoded["data"]), dtype=np.uint8).reshape(encoded["shape"])
            if np.abs(got.astype(int) - want[j].astype(int)).max() > 1:
                return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(url: str, photos: list[bytes], expected, clients: int, requests_n: int, time_limit: float,
           kserve: bool = False) -> dict:
    import requests

    encoded = [base64.b64encode(p).decode() for p in photos]

    def one(i: int) -> tuple[float, int, bool, int]:
        start = time.perf_counter()
        try:
            if kserve:  # KServe's V1 :explain, the same answer inside its "predictions"
                reply = requests.post(f"{url}/v1/models/fastattr:explain", timeout=time_limit,
                                      json={"instances": [{"b64": encoded[i % len(photos)]}],
                                            "parameters": {"k": K, "maps": "array"}})
            else:
                reply = requests.post(f"{url}/explain", data=photos[i % len(photos)], params={"k": K, "maps": "array"},
                                      headers={"Content-Type": "image/png"}, timeout=time_limit)
        except requests.RequestException:
            return time.perf_counter() - start, 0, True, 0
        ok = reply.status_code == 200
        body = (reply.json()["predictions"][0] if kserve else reply.json()) if ok else {}
        return (time.perf_counter() - start, reply.status_code, ok and wrong(body, expected[i % len(photos)]),
                body.get("batch_size", 0))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"requests": requests_n, "wall_s": round(wall, 2), "images_per_s": requests_n / wall,
            "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p90_ms": 1000 * float(np.percentile(latencies, 90)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "errors": sum(r[1] != 200 for r in results), "wrong": sum(r[2] for r in results),
            "mean_batch_size": statistics.mean(r[3] for r in results if r[3]) if any(r[3] for r in results) else 0}


@contextlib.contextmanager
def server_process(command: list[str], url: str, log: BinaryIO, time_limit: float) -> Iterator[subprocess.Popen]:
    """Run a server `command` in its own process (output to `log`), wait until `url`/v2/health/ready answers 200
    (at most `time_limit` seconds; a server that exits or stays unready raises with the end of its log), and stop
    it after: what this load test and tests/test_kserve.py both do to a `fastattr serve --kserve`."""
    import requests

    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + time_limit
        while True:
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the server is not ready: {log.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def served_by_kserve(args: argparse.Namespace, weights: str, url: str, photos: list[bytes], expected) -> dict:
    """Start `fastattr serve --kserve` (kserve.ModelServer, its own process, loopback) and load it."""
    port = url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "fastattr", "serve", "--kserve", "--model", args.model, "--weights", weights,
               "--input-size", str(args.input_size), "--methods", "gradcam", "--max-k", str(K), "--port", port,
               "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
               *(["--backend", "compiled"] if args.backend == "compiled" else [])]
    with tempfile.TemporaryFile() as log, server_process(command, url, log, args.time_limit):
        served(url, photos, expected, args.clients, args.max_batch_size, args.time_limit, kserve=True)  # warm-up
        return served(url, photos, expected, args.clients, args.requests, args.time_limit, kserve=True)


def run_config(args: argparse.Namespace, weights: str) -> dict:
    import ray
    from ray import serve

    import fastattr.serve as fserve
    from fastattr.pipeline import build
    from fastattr.options import spec_from_args

    photos = [p.read_bytes() for p in PHOTOS]
    options = {"model": args.model, "weights": weights, "input_size": args.input_size, "methods": ("gradcam",),
               "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "max_k": K,
               "compile": args.backend == "compiled", "num_cpus": args.num_cpus}
    backend = build(spec_from_args(options))  # the pipeline each replica builds, run here without a server
    expected = expected_answers(backend, photos)
    offline_n = max(2 * args.max_batch_size, args.requests // 2)
    offline_images_per_s(backend, photos, args.max_batch_size, args.max_batch_size)  # warm-up
    offline_before = offline_images_per_s(backend, photos, args.max_batch_size, offline_n)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if args.server == "kserve":
        result = served_by_kserve(args, weights, url, photos, expected)
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(fserve.app(options), route_prefix="/", blocking=False)
            served(url, photos, expected, args.clients, args.max_batch_size, args.time_limit)  # warm-up
            result = served(url, photos, expected, args.clients, args.requests, args.time_limit)
        finally:
            serve.shutdown()
            ray.shutdown()
    offline_after = offline_images_per_s(backend, photos, args.max_batch_size, offline_n)
    offline = (offline_before + offline_after) / 2
    overhead_ms = 1000 * (1 / result["images_per_s"] - 1 / offline)
    return {"server": args.server, "model": args.model, "input_size": args.input_size, "backend": args.backend,
            "methods": ["gradcam"],
            "replica_num_cpus": args.num_cpus, "offline_torch_threads": torch.get_num_threads(),
            "k": K, "clients": args.clients, "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms, **result, "offline_images_per_s": offline,
            "offline_before_after": [offline_before, offline_after],
            "served_over_offline": result["images_per_s"] / offline, "overhead_ms_per_request": overhead_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--backend", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--server", choices=("ray", "kserve"), default="ray",
                        help="ray: the Ray Serve app in this process; kserve: fastattr serve --kserve in its own")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--num-cpus", type=float, default=torch.get_num_threads(),
                        help="the replica's Ray CPUs, which Ray also gives torch as its thread count (default: as "
                             "many as this process's torch threads, so offline and served compute alike)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds per request at most")
    parser.add_argument("-o", "--output", type=Path, help="append this configuration's result to a JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        import torchvision

        torch.manual_seed(0)
        weights = str(Path(folder) / "weights.pth")
        torch.save(torchvision.models.get_model(args.model).state_dict(), weights)
        result = run_config(args, weights)
    print(json.dumps(result, indent=1))
    if args.output:
        runs = json.loads(args.output.read_text())["runs"] if args.output.exists() else []
        machine = {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                   "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
                   "torch": torch.__version__}
        args.output.write_text(json.dumps({"machine": machine, "runs": [*runs, result]}, indent=1) + "\n")
    return 0 if result["errors"] == 0 and result["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
