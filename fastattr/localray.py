"""The Ray instance a front end starts on this machine for itself: `fastattr serve` and `fastattr explain --ray`
(without `--address`) both start theirs here, listening on loopback alone.

>>> init_local_ray(4, log_to_driver=False)                                       # doctest: +SKIP
>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
(True, True, False)
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import os
import sys
from collections.abc import Iterator

__all__ = ["init_local_ray", "is_loopback"]


# Ray Serve kills an HTTP proxy that does not answer its readiness check in time, or fails its health check
# (each with its own timeout) three times in a row, and `serve.run` then fails with ActorDiedError. On a small
# machine whose cores are busy (a replica compiling, a test suite beside it) the proxy is alive but slow to be
# scheduled: CI's run of tests/test_serve_soak.py failed this way on 2 cores. A local instance gives the proxy
# a minute; a user's own `runtime_env` env_vars still win.
PATIENT_SERVE_PROXY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def init_local_ray(num_cpus: int, *, loopback: bool = True, **options) -> None:
    """Start a Ray instance on this machine: `ray.init(num_cpus=..., **options)`, without the dashboard. With
    `loopback` (the default) all its processes listen on loopback alone: the GCS, the raylet, the workers, the
    agents and the metrics (Ray's own switch), and Ray Serve's replicas (a setup hook in each worker, whatever
    `runtime_env` says besides). Without it Ray's servers listen on every interface, as a cluster node's do. Either
    way Ray Serve's HTTP proxy is given a minute to answer its checks (`PATIENT_SERVE_PROXY`)."""
    import ray

    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**PATIENT_SERVE_PROXY, **(runtime_env.get("env_vars") or {})}
    if loopback:
        runtime_env = {"worker_process_setup_hook": f"{__name__}._grpc_servers_on_loopback", **runtime_env}
    options["runtime_env"] = runtime_env
    with _ray_on_loopback() if loopback else contextlib.nullcontext():
        ray.init(num_cpus=num_cpus, include_dashboard=False, **options)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface: localhost, 127.0.0.1 and the rest of 127/8, ::1,
    and 127/8 written as IPv6 (::ffff:127.0.0.1, as a dual-stack socket reports its address). A host name other
    than localhost is not: it may be the name other machines reach this one by."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@contextlib.contextmanager
def _ray_on_loopback() -> Iterator[None]:
    """While Ray starts a local instance, have it take loopback as this machine's address.

    Ray binds its servers to every interface unless the node's address is loopback, and it replaces a loopback
    address given to `ray.init` by the one other machines reach this one at, unless clusters are switched off:
    the single-machine mode it uses on macOS and Windows. That switch is read from the environment when Ray is
    first imported and from its constant afterwards, so both are set here, and restored once Ray has started:
    a later `ray start --address` in this process's children must still be able to join a cluster."""
    constants = importlib.import_module("ray._private.ray_constants")
    variable, attribute = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "ENABLE_RAY_CLUSTER"
    saved_variable, saved_attribute = os.environ.get(variable), getattr(constants, attribute, True)
    os.environ[variable] = "0"
    setattr(constants, attribute, False)
    try:
        yield
    finally:
        setattr(constants, attribute, saved_attribute)
        if saved_variable is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved_variable


def _grpc_servers_on_loopback() -> None:
    """Run in each worker of a loopback instance as it starts (its `worker_process_setup_hook`): a gRPC server that
    a worker opens on every interface opens on loopback instead.

    Ray takes the node's address for its own servers, but Ray Serve's replicas open their inter-deployment gRPC
    server on `[::]:0`, a fixed address with no setting: without this each replica of `fastattr serve` would take
    requests for the model from any machine, whatever --host says. The node's address is loopback here, which is
    where Serve looks for that server."""
    tls_utils = importlib.import_module("ray._common.tls_utils")
    add_port = getattr(tls_utils, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "on_loopback", False):  # another Ray, or patched already
        return

    def add_port_on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return add_port(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    add_port_on_loopback.on_loopback = True
    tls_utils.add_port_to_grpc_server = add_port_on_loopback
    replica = sys.modules.get("ray.serve._private.replica")  # imported before the hook ran: its own reference too
    if replica is not None and getattr(replica, "add_port_to_grpc_server", None) is add_port:
        replica.add_port_to_grpc_server = add_port_on_loopback
