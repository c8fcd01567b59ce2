"""A `Spec` on the command line: its options, declared once for every subcommand, and the spec they give.

>>> parser = argparse.ArgumentParser(); add_spec_arguments(parser)            # doctest: +SKIP
>>> spec = spec_from_args(parser.parse_args(["--model", "resnet18", "--methods", "gradcam, saliency"]))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import InputError
from .pipeline import BACKENDS, DEFAULTS, Spec, parse_methods

__all__ = ["ALIASES", "add_spec_arguments", "convert", "spec_from_args", "spec_options", "usage_error"]


def usage_error(message: str) -> int:
    """Print `message` as a command's usage error and return its exit status, 2."""
    print(f"fastattr: error: {message}", file=sys.stderr)
    return 2


# Two command-line spellings that are not spec fields: --onnx FILE is --model FILE, --compile is --backend compiled.
ALIASES: dict[str, dict[str, Any]] = {
    "compile": {"kind": bool, "help": "the same as --backend compiled"},
    "onnx": {"kind": str, "metavar": "FILE", "help": "the same as --model FILE.onnx"},
}


def spec_options() -> dict[str, dict[str, Any]]:
    """Every option a front end takes for a spec, by name: the `Spec` fields' declarations (kind, least, help,
    choices, metavar, default) and the `ALIASES`."""
    options = {f.name: {**f.metadata, "default": f.default} for f in fields(Spec)}
    return {**options, **{name: {"default": False if o["kind"] is bool else None, **o} for name, o in ALIASES.items()}}


def add_spec_arguments(parser: argparse.ArgumentParser, *, backends: Sequence[str] = BACKENDS,
                       model_required: bool = False, exclude: Sequence[str] = ()) -> None:
    """Add the options of a `Spec` (and `ALIASES`) to `parser`, less those whose names are in `exclude`. Only
    --model and --device have defaults here: a value not given is the spec's default, or an export file's own."""
    for name, option in spec_options().items():
        if name in exclude:
            continue
        flag, kind = f"--{name.replace('_', '-')}", option["kind"]
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=option["help"])
            continue
        arguments = {"help": option["help"], "metavar": option.get("metavar"),
                     "type": {int: int, float: float}.get(kind, Path if name in ("weights", "onnx") else str)}
        if name == "backend":  # `fastattr bench` adds plain inference to the backends
            arguments["choices"] = tuple(backends)
            arguments["help"] = option["help"].replace(", ".join(BACKENDS), ", ".join(backends), 1)
        elif option.get("choices"):
            arguments["choices"] = option["choices"]
        if name == "model":
            arguments["required"], arguments["default"] = model_required, None if model_required else option["default"]
        elif name == "device":
            arguments["default"] = option["default"]
        parser.add_argument(flag, **arguments)


def add_metric_arguments(parser: argparse.ArgumentParser, metric_flag: str, description: str) -> None:
    """The faithfulness-metric options `fastattr explain` (--metrics) and `fastattr bench` (--metric) share: the
    metric flag itself, and the steps of the deletion and insertion curves."""
    parser.add_argument(metric_flag, metavar="LIST" if metric_flag.endswith("s") else "NAME", help=description)
    parser.add_argument("--metric-steps", type=int, default=32, metavar="N",
                        help=f"with {metric_flag}: steps of the deletion and insertion curves (default 32)")


def convert(name: str, value: Any) -> Any:
    """A spec option's value from a string (`serve run`'s arguments) or a YAML value, by its declared kind: None,
    "", "none" and "None" are not given (None), except for a yes/no option; numbers from strings; other values
    as they are, for the spec to check. Raises ValueError naming what was expected."""
    kind = spec_options()[name]["kind"]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if value in (None, "", "none", "None"):
        return None
    if kind in (int, float) and isinstance(value, str):
        return kind(value)
    if kind is int and isinstance(value, float) and value.is_integer():  # YAML's 224.0
        return int(value)
    if kind is tuple:  # a method list, "gradcam, saliency" or a YAML sequence
        return parse_methods(value)
    return str(value) if kind is str else value


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
