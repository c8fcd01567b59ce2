"""The `fastattr` command line.

    fastattr explain IMAGE_OR_FOLDER... [--model NAME|FILE] [--weights FILE] [--layer L] [--methods gradcam,saliency]
        [--k 3] [--batch-size B] [--device cpu|cuda] [--compile] [--onnx FILE] [--samples 16] [--noise 0.15]
        [--steps 32]
        [--ray [--address ADDR] [--workers N]] -o OUTDIR
    fastattr layers MODEL
    fastattr export --model resnet18 [--weights FILE] --layer layer4 --methods gradcam,saliency --k 5 \\
        [--input-size 224] [--with-classes] [--format onnx|pt2|aoti] -o model.onnx
    fastattr serve [--model NAME] [--onnx FILE] [--port 8000] [--max-batch-size 16] [--samples 16] [--noise 0.15]
        [--steps 32]
    fastattr bench --model resnet50 --methods gradcam --k 5 --batch-sizes 1,16 --backend eager|compiled|onnx|inference
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .methods import METHODS

METHOD_NAMES = tuple(METHODS)

def load_model(name: str, weights: Path | None) -> torch.nn.Module:
    """`fastattr.zoo.load_model`, with its errors as command-line errors (exit status 2)."""
    from . import zoo
    from .errors import FastattrError

    try:
        return zoo.load_model(name, weights)
    except FastattrError as exc:
        raise SystemExit(_usage_error(str(exc))) from None


def _method_options(args: argparse.Namespace) -> dict:
    """The SmoothGrad and IG options given on the command line (not given: the Explainer's or the export's)."""
    from .explain import SAMPLING

    return {name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None}


def _add_method_options(parser: argparse.ArgumentParser) -> None:
    from .explain import SAMPLING

    parser.add_argument("--samples", type=int,
                        help=f"smoothgrad: noisy copies per image (default {SAMPLING['samples']}, or an export's)")
    parser.add_argument("--noise", type=float,
                        help="smoothgrad: noise std as a fraction of each image's value range (default "
                             f"{SAMPLING['noise']}, or an export's)")
    parser.add_argument("--steps", type=int,
                        help=f"ig: Gauss-Legendre points on the path (default {SAMPLING['steps']}, or an export's)")


def _usage_error(message: str) -> int:
    print(f"fastattr: error: {message}", file=sys.stderr)
    return 2


def export(args: argparse.Namespace) -> int:
    import fastattr

    model = load_model(args.model, args.weights)
    methods = tuple(m for m in args.methods.split(",") if m)
    shape = (3, args.input_size, args.input_size)
    common = dict(layer=args.layer, methods=methods, k=args.k, input_shape=shape, with_classes=args.with_classes,
                  **_method_options(args))
    try:
        if args.format == "onnx":
            path = fastattr.export_onnx(model, args.output, **common)
        else:
            path = fastattr.export_program(model, args.output, aoti=args.format == "aoti", **common)
    except fastattr.FastattrError as exc:
        return _usage_error(str(exc))
    print(f"wrote {path} ({args.format}; inputs images [N, {', '.join(map(str, shape))}]"
          f"{' and classes [N, %d]' % args.k if args.with_classes else ''}; outputs logits, classes, "
          f"{', '.join(methods)})")
    return 0


def _explainer(args: argparse.Namespace):
    """(explain_batch, input size, class count) for `explain`: an onnxruntime session or a torch Explainer."""
    import fastattr
    from . import zoo
    from .export import refuse_other_sampling

    methods = tuple(m for m in args.methods.split(",") if m)
    export_file = args.onnx or (Path(args.model) if args.model.endswith((".onnx", ".pt2")) else None)
    if export_file is not None:
        if args.onnx is not None and args.model != zoo.PRETRAINED:
            raise fastattr.InputError(f"--onnx {args.onnx} and --model {args.model}: the export is the model; "
                                      "pass one of them")
        loaded = fastattr.load_program(export_file) if export_file.suffix == ".pt2" else fastattr.OnnxExplainer(export_file)
        if args.k is not None and args.k != loaded.k:
            raise fastattr.InputError(f"--k {args.k}: {export_file} was exported for k={loaded.k}; drop --k or "
                                      "export again with --k")
        refuse_other_sampling(loaded.meta, export_file, _method_options(args), flag="--")
        return loaded, loaded.meta["input_shape"][-1], loaded.meta["num_classes"]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise fastattr.InputError("--device cuda: torch sees no CUDA device here; use --device cpu")
    model = load_model(args.model, args.weights).to(args.device)
    layer = args.layer or zoo.default_layer(args.model, model)
    explainer = fastattr.Explainer(model, layer=layer, methods=methods, compile=args.compile, **_method_options(args))
    k = 3 if args.k is None else args.k
    return (lambda images: explainer(images, k=k)), args.input_size, None


def explain(args: argparse.Namespace) -> int:
    from . import files, zoo
    from .errors import FastattrError

    if args.ray:
        return _explain_on_ray(args)
    try:
        explain_batch, size, num_classes = _explainer(args)
        names = zoo.imagenet_classes() if num_classes in (None, 1000) else None
        report = files.explain_files(args.paths, explain_batch, args.output, size=size, batch_size=args.batch_size,
                                     class_names=names, device=args.device, progress=not args.no_progress)
    except FastattrError as exc:
        return _usage_error(str(exc))
    print(f"wrote {len(report.written)} images and {report.results} to {args.output}")
    if report.passed_over:
        print(f"passed over {len(report.passed_over)} files without an image suffix in the folders given: "
              f"{', '.join(map(str, report.passed_over[:5]))}{' ...' if len(report.passed_over) > 5 else ''}")
    if report.failed:
        print(f"skipped {len(report.failed)} files that are not readable images:", file=sys.stderr)
        for path, reason in report.failed:
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


def _explain_on_ray(args: argparse.Namespace) -> int:
    from . import raydata
    from .errors import FastattrError

    out = args.output / "parquet"
    try:
        failed = raydata.explain_to_parquet(
            [str(p) for p in args.paths], out, model=args.model, weights=args.weights, layer=args.layer,
            methods=tuple(m for m in args.methods.split(",") if m), k=3 if args.k is None else args.k,
            input_size=args.input_size, onnx=str(args.onnx) if args.onnx else None, workers=args.workers,
            batch_size=args.batch_size, address=args.address, method_options=_method_options(args))
    except FastattrError as exc:
        return _usage_error(str(exc))
    print(f"wrote Parquet to {out}")
    if failed:
        print(f"skipped {len(failed)} files that are not readable images:", file=sys.stderr)
        for reason in failed:
            print(f"  {reason}", file=sys.stderr)
        return 1
    return 0


def list_layers(args: argparse.Namespace) -> int:
    import fastattr
    from . import zoo

    model = load_model(args.model, None)
    default = zoo.default_layer(args.model, model)
    names = fastattr.layers(model)
    for name in names if default in names else [*names, default]:
        print(f"{name}  (default)" if name == default else name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr", description="Explain PyTorch vision models fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import zoo

    xp = commands.add_parser("explain", help="explain image files: overlay PNGs and results.jsonl")
    xp.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched recursively")
    xp.add_argument("--model", default=zoo.PRETRAINED, metavar="NAME_OR_FILE",
                    help=f"{zoo.PRETRAINED} (pretrained, the default), a torchvision model name, or a fastattr "
                         "export: a .pt2 program (fastattr export --format pt2) or an .onnx file")
    xp.add_argument("--weights", type=Path, help="a state-dict file for a torchvision model (else random weights)")
    xp.add_argument("--layer", help="target layer by module path (default: the model's last feature map)")
    xp.add_argument("--methods", default="gradcam,saliency",
                    help="comma-separated method names: " + ",".join(METHOD_NAMES))
    xp.add_argument("--k", type=int, help="classes explained per image, the top-k (default 3)")
    xp.add_argument("--batch-size", type=int, default=8)
    xp.add_argument("--input-size", type=int, default=224, help="images are resized and centre-cropped to this")
    xp.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    xp.add_argument("--compile", action="store_true", help="torch.compile the attribution (slow first batch)")
    _add_method_options(xp)
    xp.add_argument("--onnx", type=Path, help="run a `fastattr export` ONNX file in onnxruntime instead of torch")
    xp.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    from . import serve

    sv = commands.add_parser("serve", help="explain images over HTTP (Ray Serve, dynamic batching); needs fastattr[serve]")
    serve.add_arguments(sv)
    sv.set_defaults(run=serve.run)
    ex = commands.add_parser("export", help="write the attribution graph as ONNX or a torch.export program")
    ex.add_argument("--model", required=True, help="a torchvision model name, e.g. resnet50")
    ex.add_argument("--weights", type=Path, help="a state-dict file for the model (default: random weights)")
    ex.add_argument("--layer", help="target layer by module path (default: the last convolutional block)")
    ex.add_argument("--methods", default="gradcam,saliency",
                    help="comma-separated method names: " + ",".join(METHOD_NAMES))
    ex.add_argument("--k", type=int, default=5, help="classes explained per image (the top-k)")
    ex.add_argument("--input-size", type=int, default=224, help="image height and width")
    ex.add_argument("--with-classes", action="store_true", help="take class indices as a second input")
    ex.add_argument("--format", choices=("onnx", "pt2", "aoti"), default="onnx")
    _add_method_options(ex)
    ex.add_argument("-o", "--output", type=Path, required=True)
    ex.set_defaults(run=export)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
