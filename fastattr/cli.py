"""The `fastattr` command line: argparse, and errors turned into exit codes. Every subcommand builds what it
runs through `fastattr.pipeline` (the model options are declared once, as `fastattr.Spec`'s fields, and made
into flags by `fastattr.options`).

    fastattr explain IMAGE_OR_FOLDER... -o OUTDIR [MODEL OPTIONS] [--batch-size B] [--ray [--address A] [--workers N]]
    fastattr layers MODEL
    fastattr export --model NAME [MODEL OPTIONS] [--with-classes] [--format onnx|pt2|aoti|triton] -o FILE
    fastattr bench [MODEL OPTIONS] [--backend ...|inference] [--batch-sizes 1,16] [--iters 20] [--json FILE]
    fastattr serve [MODEL OPTIONS] [--max-k 5] [--max-batch-size 16] [--port 8000]

MODEL OPTIONS: --model NAME|FILE.onnx|FILE.pt2 --weights FILE --layer L --methods "gradcam, saliency" --k 3
    --input-size 224 --device cpu|cuda --backend eager|compiled|onnx|pt2 --samples 16 --noise 0.15 --steps 32
    --window 16 --stride 8 --sample-batch 16 --with-classes --trusted
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import zoo
from .pipeline import DEFAULTS, Spec, build, export as export_spec, load_model, task_of
from .errors import FastattrError, InputError
from .layers import default_layer, layers
from .options import add_metric_arguments, add_spec_arguments, spec_from_args, usage_error

__all__ = ["main"]


def export(args: argparse.Namespace) -> int:
    spec = spec_from_args(args, with_classes=args.with_classes)
    path = export_spec(spec, args.output, args.format, "--")
    size, k = spec.input_size or DEFAULTS["input_size"], DEFAULTS["k"] if spec.k is None else spec.k
    print(f"wrote {path} ({args.format}; inputs images [N, 3, {size}, {size}]"
          f"{' and classes [N, %d]' % k if args.with_classes else ''}; outputs logits, classes, "
          f"{', '.join(spec.methods or DEFAULTS['methods'])})")
    return 0


def explain(args: argparse.Namespace) -> int:
    from . import files

    # Every check of the options, the inputs and the output before the model loads, and before anything is written.
    _check_at_least_one(("--batch-size", args.batch_size), ("--workers", args.workers),
                        ("--metric-steps", args.metric_steps))
    found, passed_over = files.find_images(args.paths, args.output)
    files.check_output(args.output, "-o")
    if args.metrics is not None:
        from . import metrics

        names = metrics.parse_metrics(args.metrics)
        if args.ray:
            raise InputError("--metrics: written to results.jsonl by the local run; drop --ray or --metrics")
    if args.ray:
        return _explain_on_ray(args, found)
    spec, score = spec_from_args(args), None
    if args.metrics is not None:
        if task_of(spec) != "classify":
            raise InputError(f"--metrics: the faithfulness metrics score a classifier's logits, and the task is "
                             f"{task_of(spec)}; drop --metrics or --task")
        if spec.export_file is not None or (spec.backend or "eager") not in ("eager", "compiled"):
            raise InputError(f"--metrics: scoring perturbed images needs the torch model, and {spec.model} runs on "
                             f"the {spec.backend or spec.export_file.suffix[1:]} backend; use a model name with "
                             "--backend eager or compiled")
    pipeline = build(spec, "--")
    if args.metrics is not None:
        score = lambda images, out: metrics.evaluation(pipeline.model, images.to(pipeline.spec.device),  # noqa: E731
                                                       out.maps, out.classes, names, steps=args.metric_steps)
    report = files.explain_files(found, pipeline, args.output, size=pipeline.input_size,
                                 batch_size=args.batch_size, class_names=pipeline.names, progress=not args.no_progress,
                                 score=score, task=pipeline.task, regions=pipeline.regions, mean=pipeline.mean,
                                 std=pipeline.std)
    print(f"wrote {len(report.written)} images and {report.results} to {args.output}")
    if passed_over:
        print(f"passed over {len(passed_over)} files without an image suffix in the folders given: "
              f"{', '.join(map(str, passed_over[:5]))}{' ...' if len(passed_over) > 5 else ''}")
    return _report_failed([reason for _, reason in report.failed])


def _check_at_least_one(*options: tuple[str, int]) -> None:
    for flag, value in options:
        if value < 1:
            raise InputError(f"{flag}: expected an int >= 1, got {value}")


def _explain_on_ray(args: argparse.Namespace, found: list[Path]) -> int:
    from . import raydata

    out = args.output / "parquet"
    failed = raydata.explain_to_parquet([str(p) for p in found], out, spec_from_args(args), workers=args.workers,
                                        batch_size=args.batch_size, address=args.address)
    print(f"wrote Parquet to {out}")
    return _report_failed(failed)


def _report_failed(failed: list[str]) -> int:
    """1 after listing the files skipped (not readable images, or their PNG not writable), 0 when there are none."""
    if not failed:
        return 0
    print(f"skipped {len(failed)} files:", file=sys.stderr)
    for reason in failed:
        print(f"  {reason}", file=sys.stderr)
    return 1


def list_layers(args: argparse.Namespace) -> int:
    model = load_model(Spec(args.model), "--")
    default = default_layer(model)
    names = layers(model)
    for name in names if default in names else [*names, default]:
        print(f"{name}  (default)" if name == default else name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr", description="Explain PyTorch vision models fast.")
    commands = parser.add_subparsers(dest="command", required=True)

    xp = commands.add_parser("explain", help="explain image files: overlay PNGs and results.jsonl")
    xp.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched recursively")
    add_spec_arguments(xp)
    xp.add_argument("--batch-size", type=int, default=8)
    xp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_metric_arguments(xp, "--metrics", "faithfulness metrics per image, class and method, written to results.jsonl: "
                         "any of deletion, insertion (curve areas), road, average-drop, increase-in-confidence "
                         "(fastattr.metrics)")
    xp.add_argument("--ray", action="store_true",
                    help="run on Ray Data and write Parquet (OUTDIR/parquet) instead of PNGs; needs fastattr[ray]")
    xp.add_argument("--address", help="with --ray: an existing Ray cluster (default: a local one for this run)")
    xp.add_argument("--workers", type=int, default=1, help="with --ray: model replicas (each loads the model once)")
    xp.add_argument("-o", "--output", type=Path, required=True, help="folder for the PNGs and results.jsonl")
    xp.set_defaults(run=explain)

    ly = commands.add_parser("layers", help="list a model's candidate target layers")
    ly.add_argument("model", help=f"{zoo.PRETRAINED} or a torchvision model name")
    ly.set_defaults(run=list_layers)

    from . import bench
    be = commands.add_parser("bench", help="latency and throughput of explaining (or plain inference) here")
    bench.add_arguments(be)
    be.set_defaults(run=bench.run)

    from .serve import command as serve_command
    sv = commands.add_parser("serve", help="explain images over HTTP (Ray Serve, dynamic batching); needs fastattr[serve]")
    serve_command.add_arguments(sv)
    sv.set_defaults(run=serve_command.run)

    ex = commands.add_parser("export", help="write the attribution graph as ONNX or a torch.export program")
    add_spec_arguments(ex, model_required=True, exclude=("backend", "compile", "onnx", "device", "sample_batch", "trusted",
                                                              "window", "stride"))
    ex.add_argument("--format", choices=("onnx", "pt2", "aoti", "triton"), default="onnx",
                    help="onnx (default), pt2, aoti, or triton: a Triton model repository at -o (the ONNX file and "
                         "its config.pbtxt)")
    ex.add_argument("-o", "--output", type=Path, required=True)
    ex.set_defaults(run=export)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FastattrError as exc:
        return usage_error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
