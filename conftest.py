"""Shared by tests/ and benchmarks/. Under pytest-xdist each worker gets an equal share of the cores for torch's
threads (one each for the README's two workers on two cores): two workers that each run torch's default of one
thread per core oversubscribe the cores, and the OpenMP threads' waiting then slows the whole suite (timed with
and without, on tests/test_parity.py and tests/test_methods.py). Waiting threads sleep rather than spin for the
same reason. The float32 tolerances documented in
docs/internals.md hold for either summation order."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Read when torch loads OpenMP, so set before torch is imported; subprocesses the tests start inherit them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
