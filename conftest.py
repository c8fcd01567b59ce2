"""Shared by tests/ and benchmarks/. Under pytest-xdist each worker runs torch on its share of the cores (one
thread each for the README's two workers on two cores): two workers that each run torch's default of one thread
per core oversubscribe the cores, and the threads' waiting then slows the whole suite (timed with and without on
tests/test_parity.py and tests/test_methods.py; the README's test times are with it). Waiting OpenMP threads
sleep rather than spin for the same reason. The float32 tolerances documented in docs/internals.md hold for
either summation order. Processes the tests start (the command line, Ray's workers) keep their own defaults."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP, so before torch is imported


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, cores // workers))
