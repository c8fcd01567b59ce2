"""Benchmark cases carry a `rep` parameter, and every configuration of a group runs once per rep before
the next rep, so the configurations compared alternate instead of running all rounds of one before the
next: on a shared 2-core machine a single absolute figure drifts by +-25 %, and interleaving keeps the
ratios honest.

FASTATTR_BENCH_DEADLINE (seconds since the epoch) skips the cases that would start after it, so a run with a
time limit ends normally and writes its JSON (pytest-benchmark writes none when interrupted mid-case)."""

import os
import sys
import time
from pathlib import Path

import pytest

from harness import REPS

HERE = Path(__file__).parent
# The adapters the peers are handed (tests/peer_adapters.py) serve the tests' comparisons and these timings alike.
sys.path.insert(0, str(HERE.parent / "tests"))
DEADLINE = float(os.environ.get("FASTATTR_BENCH_DEADLINE", "inf"))


def pytest_collection_modifyitems(items):
    def key(indexed):
        index, item = indexed
        if HERE not in Path(item.fspath).parents:
            return (0, index, "", 0, (), 0)
        params = getattr(getattr(item, "callspec", None), "params", {})
        # Within a rep, a group's cases run back to back, so what is compared was measured minutes apart at most.
        group = tuple(str(v) for k, v in sorted(params.items()) if k not in ("rep", "case"))
        return (1, str(item.fspath), item.originalname, params.get("rep", 0), group, index)

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


@pytest.fixture(params=range(REPS), ids=lambda r: f"rep{r}")
def rep(request):
    return request.param


@pytest.fixture(autouse=True)
def deadline():
    if time.time() > DEADLINE:
        pytest.skip("past FASTATTR_BENCH_DEADLINE")
