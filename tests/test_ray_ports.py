"""The Ray instance fastattr starts for itself listens on loopback alone: no process it starts (the GCS, the raylet,
the agents, the workers, Ray Serve's proxy and replicas) takes connections from other machines."""

import os
import socket
import subprocess
import sys
import time

import pytest

from fastattr.localray import is_loopback

# Each slow test here starts Ray on this machine: one such module at a time, in one worker.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "localhost", "LocalHost", "::1", "[::1]",
                                  "::ffff:127.0.0.1"])
def test_is_loopback_accepts_every_way_of_writing_loopback(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.2", "10.0.0.1", "::ffff:192.0.2.2", "fe80::1",
                                  "example.com", ""])
def test_is_loopback_refuses_every_interface_other_addresses_and_host_names(host):
    assert not is_loopback(host)


@pytest.mark.parametrize("host_options, loopback", [([], True), (["--host", "127.0.0.1"], True),
                                                     (["--host", "0.0.0.0"], False), (["--host", "192.0.2.2"], False)])
def test_fastattr_serve_starts_its_ray_on_loopback_alone_unless_its_host_is_beyond_loopback(
        monkeypatch, host_options, loopback):
    import argparse

    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from fastattr.serve import command

    started = []

    def interrupted(**_):  # Ctrl-C as Ray Serve starts: nothing starts, nothing is left to stop
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "init_local_ray", lambda num_cpus, *, loopback: started.append(loopback))
    monkeypatch.setattr(serve, "start", interrupted)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(["--model", "resnet18", *host_options])) == 130
    assert started == [loopback] and not ray.is_initialized()


def listeners(root_pid: int) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """(process name, pid) -> the (address, port) pairs it listens on (TCP), for every process under `root_pid`."""
    import ray  # noqa: F401 - Ray ships psutil, and puts it on the path
    import psutil

    found = {}
    for process in psutil.Process(root_pid).children(recursive=True):
        # psutil 6 renamed connections() net_connections(); the kserve extra keeps psutil 5.
        connections = getattr(process, "net_connections", None) or process.connections
        try:
            found[process.name(), process.pid] = [tuple(c.laddr) for c in connections(kind="inet")
                                                  if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:  # a short-lived worker that is gone already
            continue
    return found


def not_on_loopback(found: dict[tuple[str, int], list[tuple[str, int]]]) -> list[str]:
    return [f"{name} (pid {pid}) on {address}:{port}" for (name, pid), addresses in found.items()
            for address, port in addresses if not is_loopback(address)]


# The Ray instance of a Ray Data job (`fastattr explain --ray`) is checked by tests/test_raydata.py, in the one
# job that module runs.


@pytest.fixture
def served(tmp_path):
    """`fastattr serve` with its defaults (--host 127.0.0.1) on a free port, in its own process: (process, port),
    once it says it is serving. Stopped after with SIGTERM, as `kill` stops it; any Ray process left is killed."""
    import ray  # noqa: F401 - Ray ships psutil, and puts it on the path
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "fastattr", "serve", "--model", "resnet18", "--input-size",
                                   "64", "--port", str(port), "--num-cpus", "2"], stdout=out, stderr=subprocess.STDOUT,
                                  cwd=tmp_path)
    started = []
    try:
        deadline = time.monotonic() + 240
        while "fastattr: serving at" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("fastattr serve did not start:\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        yield server, port
    finally:
        started = psutil.Process(server.pid).children(recursive=True) if server.poll() is None else []
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        _, left = psutil.wait_procs(started, timeout=30)
        for process in left:
            process.kill()


@pytest.mark.slow  # a live server
def test_fastattr_serve_and_every_ray_process_it_starts_listen_on_loopback_alone(served):
    server, port = served
    seen = listeners(server.pid)
    names = {name for name, _ in seen}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own servers were among the processes looked at
    assert any("ServeReplica" in name for name in names), names  # the model's replica opens servers of its own too
    assert port in {p for addresses in seen.values() for _, p in addresses}  # the HTTP proxy, on --port
    assert not_on_loopback(seen) == []
