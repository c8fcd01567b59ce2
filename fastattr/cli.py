"""The `fastattr` command line.

    fastattr export --model resnet18 [--weights FILE] --layer layer4 --methods gradcam,saliency --k 5 \\
        [--input-size 224] [--with-classes] [--format onnx|pt2|aoti] -o model.onnx
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import torch


def load_model(name: str, weights: Path | None) -> torch.nn.Module:
    """A torchvision model by name, with random weights or those of a state-dict file (`weights_only`)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise SystemExit(_usage_error(f"unknown torchvision model {name!r}{hint}"))
    model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:  # noqa: BLE001
            raise SystemExit(_usage_error(f"--weights {str(weights)!r}: cannot load it into {name} "
                                          f"({type(exc).__name__}: {str(exc)[:300]})")) from None
    return model.eval()


def _usage_error(message: str) -> int:
    print(f"fastattr: error: {message}", file=sys.stderr)
    return 2


def export(args: argparse.Namespace) -> int:
    import fastattr

    model = load_model(args.model, args.weights)
    methods = tuple(m for m in args.methods.split(",") if m)
    shape = (3, args.input_size, args.input_size)
    common = dict(layer=args.layer, methods=methods, k=args.k, input_shape=shape, with_classes=args.with_classes)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastattr", description="Explain PyTorch vision models fast.")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write the attribution graph as ONNX or a torch.export program")
    ex.add_argument("--model", required=True, help="a torchvision model name, e.g. resnet50")
    ex.add_argument("--weights", type=Path, help="a state-dict file for the model (default: random weights)")
    ex.add_argument("--layer", help="target layer by module path (default: the last convolutional block)")
    ex.add_argument("--methods", default="gradcam,saliency", help="comma-separated method names")
    ex.add_argument("--k", type=int, default=5, help="classes explained per image (the top-k)")
    ex.add_argument("--input-size", type=int, default=224, help="image height and width")
    ex.add_argument("--with-classes", action="store_true", help="take class indices as a second input")
    ex.add_argument("--format", choices=("onnx", "pt2", "aoti"), default="onnx")
    ex.add_argument("-o", "--output", type=Path, required=True)
    ex.set_defaults(run=export)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
