"""A `Spec` on the command line: its options, declared once for every subcommand, and the spec they give.

>>> parser = argparse.ArgumentParser(); add_spec_arguments(parser)            # doctest: +SKIP
>>> spec = spec_from_args(parser.parse_args(["--model", "resnet18", "--methods", "gradcam, saliency"]))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import zoo
from .pipeline import BACKENDS, DEFAULTS, Spec
from .errors import InputError
from .explain import SAMPLE_BATCH, SAMPLING
from .methods import METHODS

__all__ = ["add_spec_arguments", "spec_from_args", "usage_error"]


def usage_error(message: str) -> int:
    """Print `message` as a command's usage error and return its exit status, 2."""
    print(f"fastattr: error: {message}", file=sys.stderr)
    return 2


def add_spec_arguments(parser: argparse.ArgumentParser, *, backends: Sequence[str] = BACKENDS,
                       model_required: bool = False, exclude: Sequence[str] = ()) -> None:
    """Add the options of a `Spec` to `parser`, less those whose names are in `exclude`. Only --model and
    --device have defaults here: a value not given is the spec's default, or an export file's own."""
    add = _adder(parser, exclude)
    add("--model", required=model_required, default=None if model_required else DEFAULTS["model"],
                        metavar="NAME_OR_FILE",
                        help=f"{zoo.PRETRAINED} (pretrained, the default), a torchvision model name, or a fastattr "
                             "export: an .onnx file or a .pt2 program")
    add("--weights", type=Path, metavar="FILE",
                        help="a state-dict file for a torchvision model (default: random weights)")
    add("--layer", help="target layer by module path (default: the model's last feature map)")
    add("--methods", metavar="LIST",
                        help=f"comma-separated method names (default: {','.join(DEFAULTS['methods'])}, or an "
                             f"export's): {', '.join(METHODS)}")
    add("--k", type=int, help=f"classes explained per image, the top-k (default {DEFAULTS['k']}, "
                                              "or an export's)")
    add("--input-size", type=int, metavar="PIXELS",
                        help=f"images are resized and centre-cropped to this (default {DEFAULTS['input_size']}, "
                             "or an export's)")
    add("--device", choices=("cpu", "cuda"), default=DEFAULTS["device"])
    add("--backend", choices=tuple(backends),
                        help=f"{', '.join(backends)} (default {DEFAULTS['backend']}; an export file sets its own)")
    add("--compile", action="store_true", help="the same as --backend compiled")
    add("--onnx", type=Path, metavar="FILE", help="the same as --model FILE.onnx")
    add("--samples", type=int,
                        help=f"smoothgrad: noisy copies per image (default {SAMPLING['samples']}, or an export's)")
    add("--noise", type=float,
                        help="smoothgrad: noise std as a fraction of each image's value range (default "
                             f"{SAMPLING['noise']}, or an export's)")
    add("--steps", type=int,
                        help=f"ig: Gauss-Legendre points on the path (default {SAMPLING['steps']}, or an export's)")
    add("--sample-batch", type=int, metavar="IMAGES",
                        help="smoothgrad, ig: the most noisy copies or path points one pass sends through the network, "
                             f"which bounds their memory (default {SAMPLE_BATCH})")
    add("--trusted", action="store_true",
                        help="load a .pt2 --model file, which runs code as it is loaded (an AOTInductor package's "
                             "native library, a torch.export program's pickles): only for files you made or trust")


def _adder(parser: argparse.ArgumentParser, exclude: Sequence[str]):
    def add(flag: str, **kwargs) -> None:
        if flag.lstrip("-").replace("-", "_") not in exclude:
            parser.add_argument(flag, **kwargs)
    return add


def spec_from_args(args: argparse.Namespace | Mapping[str, Any], **overrides) -> Spec:
    """The `Spec` that parsed options (or a mapping of them) give, `onnx` and `compile` folded into model and
    backend; keys that are not spec options are ignored."""
    options = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    if options.get("onnx") is not None:
        if options.get("model") not in (None, DEFAULTS["model"], str(options["onnx"])):
            raise InputError(f"--onnx {options['onnx']} and --model {options['model']}: the export is the model; "
                             "pass one of them")
        options["model"] = str(options["onnx"])
    if options.get("compile"):
        if options.get("backend") not in (None, "compiled"):
            raise InputError(f"--compile and --backend {options['backend']}: pass one of them")
        options["backend"] = "compiled"
    options.update(overrides)
    return Spec.from_options(options)
