"""Shared by tests/ and benchmarks/: one torch thread per pytest-xdist worker, so that two workers on two cores
do not each start two threads (a run's own -n 0 keeps torch's default)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
