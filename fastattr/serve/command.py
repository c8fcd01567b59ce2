"""`fastattr serve`: start Ray and the deployment on this machine and serve until Ctrl-C.

    fastattr serve [--model efficientnet_lite0|NAME|FILE.onnx|FILE.pt2] [--backend ...] [--port 8000]
        [--max-k 5] [--max-batch-size 16] [--batch-wait-ms 10] [--max-bytes N] [--max-pixels N]

Its options are a spec's (`fastattr.options`) and the server's (`SERVER_OPTIONS`), declared once each. With a
loopback --host (the default) the Ray instance it starts listens on loopback alone too: the GCS, the raylet, the
workers, the agents and the metrics. Any other --host leaves Ray's servers on every interface, as a node of a
cluster has them.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from pathlib import Path

from ..errors import FastattrError
from ..localray import init_local_ray, is_loopback
from ..options import add_spec_arguments, spec_from_args, usage_error
from .app import DEFAULTS, DEPLOYMENT, SERVER_OPTIONS, app, app_options

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `serve` options to `parser` (the `fastattr serve` subcommand's parser)."""
    add_spec_arguments(parser)
    for name, option in SERVER_OPTIONS.items():
        if name != "num_cpus":  # the command line's --num-cpus is Ray's, below
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(option.default), default=option.default,
                                help=option.help)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                        help="CPUs for Ray and the model (default: all of this machine's)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface); with a loopback "
                             "address Ray's own processes listen on loopback alone too")
    parser.add_argument("--port", type=int, default=8000, help="default: 8000")
    parser.add_argument("--kserve", action="store_true",
                        help="serve with KServe's model server instead of Ray Serve: V1 :predict and :explain, and V2 "
                             "(needs fastattr[kserve])")


def run(args: argparse.Namespace) -> int:
    """Start Ray and the deployment on this machine and serve until Ctrl-C; 2 on a usage error, 1 if it fails."""
    options = {name: getattr(args, name) for name in DEFAULTS}
    for name in ("weights", "onnx", "model"):
        value = options[name]
        if value is None or (name == "model" and Path(value).suffix.lower() not in (".onnx", ".pt2")):
            continue
        if not Path(value).is_file():
            return usage_error(f"--{name} {value}: no such file")
        options[name] = str(Path(value).resolve())  # the replica's working folder may differ from ours
    if args.kserve:
        return _run_kserve(args, options)
    try:
        application = app(options)
    except (ValueError, FastattrError) as exc:
        return usage_error(str(exc).removeprefix("app: "))
    import ray
    from ray import serve

    init_local_ray(args.num_cpus, loopback=is_loopback(args.host))
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name=DEPLOYMENT, route_prefix="/", blocking=False)
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        serve.shutdown()
        ray.shutdown()
        return 130
    except Exception as exc:  # noqa: BLE001 - the replica's error (a bad layer, say), reported as it is
        print(f"fastattr: error: the server did not start: {_why_not_started(exc)}", file=sys.stderr)
        ray.shutdown()
        return 1
    url = f"http://{args.host}:{args.port}"
    print(f"fastattr: serving at {url}/explain (POST an image; GET {url}/ for the settings); Ctrl-C stops",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill` and `docker stop` shut down cleanly too
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _run_kserve(args: argparse.Namespace, options: dict) -> int:
    """Serve with kserve.ModelServer in this process until it is stopped (Ctrl-C or SIGTERM)."""
    try:
        from . import kserve
    except ImportError as exc:
        return usage_error(f"--kserve: KServe is not installed ({exc}); pip install 'fastattr[kserve]'")
    try:
        options = app_options(options)  # the Ray Serve app's conversions and checks (--max-batch-size >= 1, ...)
        server = {name: options.pop(name) for name in SERVER_OPTIONS if name != "num_cpus"}
        options.pop("num_cpus", None)  # Ray's reservation: KServe's server uses this process's threads
        model = kserve.FastattrModel(spec_from_args(options), **server)
    except (ValueError, FastattrError) as exc:
        return usage_error(str(exc).removeprefix("app: "))
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        return 130
    print(f"fastattr: serving with KServe at http://{args.host}:{args.port}/v1/models/{model.name}:predict, "
          f":explain and /v2/models/{model.name}/infer; Ctrl-C stops", flush=True)
    kserve.start(model, args.host, args.port)
    return 0


def _why_not_started(exc: Exception) -> str:
    """The replica's own error (its traceback's last line), which Ray keeps in the deployment's status."""
    from ray import serve

    try:
        message = serve.status().applications[DEPLOYMENT].deployments[DEPLOYMENT].message
        last = [line for line in message.splitlines() if line.strip()][-1].strip()
    except Exception:  # noqa: BLE001 - no status to read: Ray's own message is all there is
        return str(exc)
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
