"""`fastattr bench`: latency and throughput of explaining (or plain inference) on this machine.

    fastattr bench --model resnet50 --methods gradcam --k 5 --batch-sizes 1,16 --backend eager --device cpu \\
        [--warmup 3] [--iters 20 | --seconds 30] [--json bench.json] [--no-progress]

    fastattr bench --model resnet50.onnx --batch-sizes 1,8          # a fastattr export: .onnx or .pt2

    fastattr bench --model resnet18 --methods scorecam              # a perturbation method, as any method

    fastattr bench --model resnet18 --metric deletion --metric-steps 32   # a faithfulness metric of the maps

For each batch size it builds random images (fixed seed), makes `--warmup` untimed calls (the first one,
which compiles for `--backend compiled`, is reported as `first_call_s`), then times `--iters` calls and/or
calls for `--seconds`, and prints p50 / p90 / p99 / mean latency in ms and images/s (the batch over the
median). What is timed is built as every entry point builds it (`fastattr.pipeline`): `eager` and `compiled` run
`fastattr.Explainer`, `onnx` and `pt2` export the graph to a temporary file and run it in onnxruntime or as a
torch.export program; `inference` is the plain model forward under `torch.inference_mode`, the floor to
compare with. A file given as `--model` carries its own methods, k, layer and input size. `--metric NAME` times
`fastattr.metrics.METRICS[NAME]` of the first method's maps of each batch (made once, untimed) instead of the
explanation; it needs the torch model (`eager` or `compiled`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import pipeline
from .errors import FastattrError
from .options import add_metric_arguments, add_spec_arguments, spec_from_args, usage_error

__all__ = ["add_arguments", "run", "latency_stats", "settings_of", "target_of", "Settings", "Target"]

# The timing's own options; what is timed takes the spec's defaults (`fastattr.pipeline.DEFAULTS`).
BACKENDS = (*pipeline.BACKENDS, "inference")
DEFAULTS = {"iters": 20}


class _Usage(Exception):
    """A mistake in the command's arguments, reported as `fastattr: error: ...` with exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `bench` options to `parser` (the `fastattr bench` subcommand's parser)."""
    add_spec_arguments(parser, backends=BACKENDS)
    parser.add_argument("--batch-sizes", default="1,16", metavar="LIST",
                        help="comma-separated batch sizes (default: 1,16)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N",
                        help="untimed calls per batch size, the first reported as first_call_s (it compiles, for "
                             "--backend compiled); default: 3")
    parser.add_argument("--iters", type=int, metavar="N",
                        help=f"timed calls per batch size (default: {DEFAULTS['iters']}, or as many as --seconds "
                             "allows)")
    parser.add_argument("--seconds", type=float, metavar="S",
                        help="time budget per batch size for the timed calls; with --iters, whichever ends first")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the rows and the settings to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_metric_arguments(parser, "--metric", "time this faithfulness metric (fastattr.metrics: deletion, insertion, "
                         "road, ...) of the first method's maps, made once per batch size, instead of explaining")


def latency_stats(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """p50 / p90 / p99 / mean latency in ms (percentiles interpolated linearly) and images/s (`batch` over the
    median) of the per-call `seconds` of one batch size.

    >>> latency_stats([0.1, 0.2, 0.3, 0.4], batch=4)["images_per_s"]
    16.0
    """
    if len(seconds) == 0:
        raise ValueError("latency_stats: no timings")
    if batch < 1:
        raise ValueError(f"latency_stats: batch must be >= 1, got {batch}")
    values = np.asarray(seconds, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99], method="linear")
    return {"p50_ms": float(p50) * 1e3, "p90_ms": float(p90) * 1e3, "p99_ms": float(p99) * 1e3,
            "mean_ms": float(values.mean()) * 1e3, "images_per_s": batch / float(p50)}


@dataclass
class Settings:
    batch_sizes: list[int]
    device: torch.device
    warmup: int
    iters: int | None
    seconds: float | None
    metric: str | None = None
    metric_steps: int = 32


@dataclass
class Target:
    """What is timed: `call(*make_inputs(n))` is one call on a batch of n."""

    call: Callable[..., object]
    make_inputs: Callable[[int], tuple[Tensor, ...]]
    model: str
    backend: str
    methods: list[str]
    k: int | None
    layer: str | None
    input_shape: tuple[int, ...]
    extra: dict = field(default_factory=dict)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describes: print the table, write the JSON if asked; 0, or 2 on a usage error."""
    try:
        settings = settings_of(args)
        target = target_of(args, settings)
        rows = [_bench_batch(target, n, settings, progress=not args.no_progress) for n in settings.batch_sizes]
    except (_Usage, FastattrError) as exc:
        return usage_error(str(exc))
    meta = _metadata(target, settings)
    print(_table(meta, rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


def _parse_batch_sizes(text: str) -> list[int]:
    """Batch sizes from `text` such as "1,16"; raises `_Usage` naming the bad entry."""
    sizes = []
    for part in text.split(","):
        try:
            n = int(part.strip())
        except ValueError:
            n = 0
        if n < 1:
            raise _Usage(f"--batch-sizes {text!r}: {part.strip()!r} is not a positive integer; pass e.g. 1,16")
        sizes.append(n)
    return sizes


def settings_of(args: argparse.Namespace) -> Settings:
    """Check the arguments that need no model, so that such mistakes are reported before any loading."""
    sizes = _parse_batch_sizes(args.batch_sizes)
    if args.warmup < 0:
        raise _Usage(f"--warmup: must be >= 0, got {args.warmup}")
    if args.iters is not None and args.iters < 1:
        raise _Usage(f"--iters: must be >= 1, got {args.iters}")
    if args.seconds is not None and not (args.seconds > 0 and math.isfinite(args.seconds)):
        raise _Usage(f"--seconds: must be a positive number, got {args.seconds}")
    iters = DEFAULTS["iters"] if args.iters is None and args.seconds is None else args.iters
    metric = None
    if args.metric is not None:
        from . import metrics

        names = metrics.parse_metrics(args.metric)
        if len(names) != 1:
            raise _Usage(f"--metric {args.metric!r}: times one metric; pass one of {', '.join(metrics.METRICS)}")
        metric = names[0]
        if args.metric_steps < 1:
            raise _Usage(f"--metric-steps: must be >= 1, got {args.metric_steps}")
        if (args.backend or "eager") not in ("eager", "compiled") or Path(args.model or "").suffix in (".onnx", ".pt2"):
            raise _Usage(f"--metric: scores perturbed images with the torch model; use a model name with --backend "
                         f"eager or compiled, not {args.model if Path(args.model or '').suffix else args.backend}")
    return Settings(sizes, torch.device(args.device), args.warmup, iters, args.seconds, metric, args.metric_steps)


def target_of(args: argparse.Namespace, settings: Settings) -> Target:
    """What `args` times, built through `fastattr.pipeline` (or the plain model, for `--backend inference`)."""
    if args.backend == "inference":
        spec = spec_from_args(args, backend=None)
        if spec.export_file is not None:
            raise _Usage(f"--backend inference: times a model's plain forward; {args.model!r} is an export, so pass a "
                         "model name")
        model = pipeline.load_model(spec, "--")
        size = spec.input_size or pipeline.DEFAULTS["input_size"]
        shape = (3, size, size)

        def infer(images: Tensor) -> Tensor:
            with torch.inference_mode():
                return model(images)
        return Target(infer, _images(shape, settings.device), model=args.model, backend="inference", methods=[],
                       k=None, layer=None, input_shape=shape)
    built = pipeline.build(spec_from_args(args), "--")
    shape = (3, built.input_size, built.input_size)
    # onnxruntime takes its inputs from the host; the torch backends from the model's device.
    device = torch.device("cpu") if built.backend == "onnx" else settings.device
    make_images = _images(shape, device)

    def make_inputs(n: int) -> tuple[Tensor, ...]:
        if built.fixed_k is None or not built.takes_classes:
            return make_images(n)
        classes = torch.randint(0, built.num_classes, (n, built.fixed_k), generator=torch.Generator().manual_seed(1))
        return (*make_images(n), classes.to(device))

    if settings.metric is not None:
        return _metric_target(built, make_images, args.model, settings)
    call = _device_checked(built, args.model, settings.device) if built.backend == "pt2" else built
    return Target(call, make_inputs, model=args.model, backend=built.backend, methods=list(built.methods),
                   k=built.k, layer=built.layer, input_shape=shape, extra=dict(built.info))


def _metric_target(built: pipeline.Pipeline, make_images: Callable[[int], tuple[Tensor]], model: str,
                   settings: Settings) -> Target:
    """The metric `settings.metric` of the first method's maps: each batch's explanation is made with its
    images, outside the timed calls."""
    from . import metrics

    method, score = built.methods[0], metrics.METRICS[settings.metric]

    def make_inputs(n: int) -> tuple[Tensor, ...]:
        (images,) = make_images(n)
        out = built(images)
        return images, out.maps[method].to(images.dtype), out.classes

    def call(images: Tensor, maps: Tensor, classes: Tensor) -> Tensor:
        return score(built.model, images, maps, classes, settings.metric_steps)
    return Target(call, make_inputs, model=model, backend=built.backend, methods=[method], k=built.k,
                  layer=built.layer, input_shape=(3, built.input_size, built.input_size),
                  extra={**built.info, "metric": settings.metric, "metric_steps": settings.metric_steps})


def _device_checked(program: Callable[..., object], path: str, device: torch.device) -> Callable[..., object]:
    """A .pt2 program runs on the device it was exported for: say so instead of a deep torch error."""
    checked = False

    def call(*inputs: Tensor) -> object:
        nonlocal checked
        if checked:
            return program(*inputs)
        try:
            out = program(*inputs)
        except FastattrError:
            raise
        except Exception as exc:  # noqa: BLE001 - most often a device mismatch; the message is kept
            raise _Usage(f"--model {path!r} cannot run on {device} ({type(exc).__name__}: {str(exc)[:300]}); "
                         "was it exported for another device?") from None
        checked = True
        return out
    return call


def _images(shape: Sequence[int], device: torch.device) -> Callable[[int], tuple[Tensor]]:
    def make(n: int) -> tuple[Tensor]:
        # Seeded the same for every batch size and backend, so rows and runs see the same images.
        images = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        return (images,)
    return make


def _bench_batch(target: Target, n: int, settings: Settings, progress: bool) -> dict:
    inputs = target.make_inputs(n)
    cuda = settings.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # disable=None lets tqdm turn itself off when stderr is not a terminal (logs, CI).
    with tqdm(total=settings.iters, desc=f"batch {n} warm-up", unit="call", file=sys.stderr, leave=False,
              disable=None if progress else True) as bar:
        first_call_s = _timed(target.call, inputs, sync) if settings.warmup else None
        for _ in range(settings.warmup - 1):
            _timed(target.call, inputs, sync)
        bar.reset(total=settings.iters)  # the rate shown is that of the timed calls, the warm-up left out
        bar.set_description(f"batch {n}")
        times = _time_calls(target.call, inputs, sync, settings.iters, settings.seconds, bar.update)
    return {"batch": n, **latency_stats(times, n), "first_call_s": first_call_s, "calls": len(times)}


def _timed(call: Callable[..., object], inputs: tuple[Tensor, ...], sync: Callable[[], None]) -> float:
    # Synchronising before the start too keeps GPU work queued by an earlier call out of this one's time.
    sync()
    start = time.perf_counter()
    call(*inputs)
    sync()
    return time.perf_counter() - start


def _time_calls(call: Callable[..., object], inputs: tuple[Tensor, ...], sync: Callable[[], None],
                iters: int | None, seconds: float | None, tick: Callable[[int], object]) -> list[float]:
    """Time `iters` calls, or calls until `seconds` have passed (at least one), whichever ends first."""
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(_timed(call, inputs, sync))
        tick(1)
        if iters is not None and len(times) >= iters:
            return times
        if seconds is not None and time.perf_counter() - start >= seconds:
            return times


def _metadata(target: Target, settings: Settings) -> dict:
    device = settings.device
    return {"model": target.model, "backend": target.backend, "methods": target.methods, "k": target.k,
            "layer": target.layer, "input_shape": list(target.input_shape), "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "warmup": settings.warmup,
            "iters": settings.iters, "seconds": settings.seconds, **target.extra}


def _table(meta: dict, rows: list[dict]) -> str:
    what = (f"{','.join(meta['methods'])} k={meta['k']}" if meta["methods"] else "plain inference")
    what = f"{meta['metric']} of {what}" if meta.get("metric") else what
    title = (f"{meta['model']}: {what}, {meta['backend']} on {meta['device']} ({meta['threads']} threads), "
             f"images {'x'.join(map(str, meta['input_shape']))}, torch {meta['torch']}")
    header = (f"{'batch':>5}  {'p50 ms':>9}  {'p90 ms':>9}  {'p99 ms':>9}  {'mean ms':>9}  {'images/s':>9}  "
              f"{'first call s':>12}")
    lines = [title, header]
    for r in rows:
        first = "-" if r["first_call_s"] is None else f"{r['first_call_s']:.2f}"
        lines.append(f"{r['batch']:>5}  {r['p50_ms']:>9.2f}  {r['p90_ms']:>9.2f}  {r['p99_ms']:>9.2f}  "
                     f"{r['mean_ms']:>9.2f}  {r['images_per_s']:>9.1f}  {first:>12}")
    return "\n".join(lines)
