"""Shared by tests/ and benchmarks/. Two pytest-xdist workers on two cores each run torch's two threads; an
OpenMP thread that spins while it waits would take the core the other worker needs, so waiting threads sleep.
The thread count itself stays torch's own: it sets the float32 summation order that the documented saliency
tolerances were measured with (tests/test_parity.py)."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP, so before torch is imported
