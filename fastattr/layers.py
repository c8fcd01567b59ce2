"""Target layers by name: the candidates, the default (decided here and nowhere else) and the lookup.

>>> fastattr.layers(torchvision.models.resnet18())[-3:]   # doctest: +SKIP
['layer4.1.bn2', 'layer4.1.relu', 'layer4.1']
>>> fastattr.default_layer(torchvision.models.resnet18())  # doctest: +SKIP
'layer4'
"""

from __future__ import annotations

import difflib

from torch import nn

from .errors import LayerError

__all__ = ["layers", "default_layer", "get_layer"]

def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def layers(model: nn.Module) -> list[str]:
    """Module paths that make sense as Grad-CAM target layers: those holding a convolution, the modules
    beside the convolutions inside them (norms, activations, pools), and transformer blocks with their first
    norms, in definition order.

    Any module path that `model.get_submodule` accepts may be used as a target; this is the short list.

    >>> fastattr.layers(torchvision.models.resnet18())[-3:]  # doctest: +SKIP
    ['layer4.1.bn2', 'layer4.1.relu', 'layer4.1']
    """
    names = []
    with_conv = {name for name, m in model.named_modules() if _has_conv(m)}
    norms = set(_block_norms(model))
    blocks = {n.rpartition(".")[0] for n in norms}
    for name, module in model.named_modules():
        if not name:
            continue
        parent = name.rpartition(".")[0]
        if name in with_conv or name in norms or name in blocks or (
                parent and parent in with_conv and not list(module.children())):
            names.append(name)
    return names


def _block_norms(model: nn.Module) -> list[str]:
    """The first norms (`ln_1` in torchvision, `norm1` in timm and Swin, `layernorm_before` in Hugging Face's ViT,
    DeiT and Swin) of the transformer blocks, in order."""
    return [f"{name}.{child}" if name else child for name, m in model.named_modules()
            for child in ("ln_1", "norm1", "layernorm_before") if isinstance(getattr(m, child, None), nn.LayerNorm)]


def _hugging_face_stages(model: nn.Module) -> str | None:
    """The last stage of a Hugging Face convolutional classifier (ConvNeXt, ResNet: `convnext.encoder.stages.3`),
    whose base model and encoder return ModelOutputs rather than maps; None for other models."""
    prefix = getattr(model, "base_model_prefix", None)
    if not type(model).__module__.startswith("transformers.") or not prefix:
        return None
    stages = getattr(getattr(getattr(model, prefix, None), "encoder", None), "stages", None)
    return f"{prefix}.encoder.stages.{len(stages) - 1}" if isinstance(stages, nn.ModuleList) and len(stages) else None


# Modules that keep a feature map's layout: a default layer extends over them, so that the map explained is the one
# the pooling reads (timm's EfficientNets end `conv_head`, then `bn2`, a BatchNorm with its activation).
_MAP_PRESERVING = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)


def default_layer(model: nn.Module) -> str:
    """The target layer used when none is named, for every entry point (the API, the command line, the server,
    the exports, Ray Data).

    For a transformer, the last block's first norm, whose tokens the block's attention still mixes
    (`encoder.layers.encoder_layer_11.ln_1` in torchvision's ViT-B/16, `blocks.11.norm1` in timm's ViTs,
    `features.7.1.norm1` in Swin-T). Else the last direct child of the model that holds a convolution, extended
    over the norms and activations that directly follow it: `layer4` for a ResNet, `features` for VGG, MobileNet,
    EfficientNet, DenseNet and ConvNeXt, `trunk_output` for RegNet, `bn2` for timm's EfficientNets (the
    pretrained default, `fastattr.zoo.efficientnet_lite0`). For torchvision's segmentation models and detectors,
    the last feature map of their backbone's classification network (`backbone.layer4` in DeepLabV3-ResNet50 and
    FCN, `backbone.body.layer4` in Faster R-CNN, RetinaNet and FCOS, `backbone.features.1` in SSDlite), not their
    heads. For Hugging Face's classifiers, the last block's first norm (`layernorm_before`) or the last stage
    (`convnext.encoder.stages.3`).

    >>> default_layer(torchvision.models.resnet18())   # doctest: +SKIP
    'layer4'
    """
    if (backbone := _dense_backbone(model)) is not None:
        path, module = backbone
        return f"{path}.{default_layer(module)}"
    norms = _block_norms(model)
    if norms:
        return norms[-1]
    if (stage := _hugging_face_stages(model)) is not None:
        return stage
    children = list(model.named_children())
    for i in reversed(range(len(children))):
        if _has_conv(children[i][1]):
            while i + 1 < len(children) and isinstance(children[i + 1][1], _MAP_PRESERVING):
                i += 1
            return children[i][0]
    raise LayerError(
        f"layer: {type(model).__name__} has no convolution to default to; name a layer, e.g. "
        f"layer={next((n for n, _ in model.named_children()), 'NAME')!r}")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule(name)`, with an error that lists the nearest valid names."""
    if not isinstance(name, str):
        raise LayerError(f"layer: expected a module path such as 'layer4' or 'features.28', got {type(name).__name__}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        all_names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, all_names, n=3, cutoff=0.5)
        hint = f"closest: {', '.join(repr(c) for c in close)}. " if close else ""
        raise LayerError(
            f"layer: no module {name!r} in {type(model).__name__}; {hint}"
            f"fastattr.layers(model) lists the {len(layers(model))} candidates") from None


def _dense_backbone(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of the classification network inside a torchvision segmentation model or detector, else None:
    its last feature map is where their heads start, and a default taken over the whole model would be a head."""
    module = type(model).__module__
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module) or not module.startswith(("torchvision.models.segmentation",
                                                                     "torchvision.models.detection")):
        return None
    for name in ("body", "features"):  # FPN detectors wrap it in .body, SSD in .features
        if isinstance(getattr(backbone, name, None), nn.Module):
            return f"backbone.{name}", getattr(backbone, name)
    return "backbone", backbone
