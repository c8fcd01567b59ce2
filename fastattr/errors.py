"""fastattr's exceptions: each says what was wrong, what was received and how to fix it."""

from __future__ import annotations


class FastattrError(Exception):
    """Base class of every error fastattr raises on purpose."""


class LayerError(FastattrError, ValueError):
    """The target layer does not exist, is not reached by the forward, or is reached twice."""


class TargetError(FastattrError, ValueError):
    """Classes or k do not fit the model's outputs or the batch."""


class InputError(FastattrError, ValueError):
    """The images have the wrong rank, channel count, dtype or device."""


class ModelOutputError(FastattrError, TypeError):
    """The model's output is not a logits tensor and no `output=` says how to pick one."""


class MethodError(FastattrError, ValueError):
    """An unknown method name."""


class CompileError(FastattrError, ValueError):
    """A compile option that cannot apply to this model or device."""


class ExportError(FastattrError, ValueError):
    """A part of the attribution graph that cannot be exported, named with the op."""


def at_least(name: str, value, least: float, kind: type = int, error: type[FastattrError] = InputError):
    """`value` if it is a `kind` (an int, or for float any real number, never a bool) of at least `least`; else
    `error` naming the option. The one check of every numeric option (a spec's, an Explainer's, a loader's).

    >>> at_least("steps", 8, 1)
    8
    """
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value < least:
        what = "a number" if kind is float else "an int"
        raise error(f"{name}: expected {what} >= {least:g}, got {value!r}")
    return float(value) if kind is float else value
