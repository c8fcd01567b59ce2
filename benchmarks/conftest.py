"""Shared set-up for the benchmark suite: models with random weights, fixed inputs, throughput records.

Full run (this machine's figures in benchmarks/results/):
    .venv/bin/python -m pytest benchmarks --benchmark-json=benchmarks/results/cpu.json
Smoke run (CI: tiny inputs, nothing timed):
    FASTATTR_BENCH_SMOKE=1 .venv/bin/python -m pytest benchmarks --benchmark-disable
Cases carry a `rep` parameter so that the configurations compared with each other alternate, rep by rep,
instead of running all rounds of one before the next: on a shared 2-core machine a single absolute
figure drifts by +-25 %, and interleaving keeps the ratios honest.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torchvision

SMOKE = os.environ.get("FASTATTR_BENCH_SMOKE") == "1"
SIZE = 64 if SMOKE else 224
BATCH = 2 if SMOKE else 16
REPS = 1 if SMOKE else 3
ROUNDS = 1 if SMOKE else 2


@functools.cache
def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


@functools.cache
def images(n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def run(benchmark, fn, n_images: int, **info) -> None:
    """Time `fn()` (one warm-up outside the timer) and record images/s in extra_info."""
    benchmark.extra_info.update(info, batch=n_images, size=SIZE, threads=torch.get_num_threads(),
                                device="cpu", torch=torch.__version__)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = n_images / benchmark.stats.stats.median


def pytest_collection_modifyitems(items):
    # Run every configuration of a group once per rep before the next rep: rounds interleave.
    def key(item):
        callspec = getattr(item, "callspec", None)
        rep = callspec.params.get("rep", 0) if callspec else 0
        return (item.fspath.strpath, item.originalname, rep)

    items.sort(key=key)


@pytest.fixture(params=range(REPS), ids=lambda r: f"rep{r}")
def rep(request):
    return request.param
