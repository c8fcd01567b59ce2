"""Small torchvision models with random weights and calibrated batch-norm statistics, for tests.

Random weights with the default running statistics (mean 0, variance 1) let activations shrink or
blow up through a deep net, which leaves maps flat. One training-mode pass over random images with
cumulative averaging gives each batch norm its real statistics, so maps have structure to compare.
"""

from __future__ import annotations

import functools

import torch
import torchvision
from torch import nn

import fastattr
from fastattr.methods import perturbed

SIZE = 64
# The methods that compile into one graph and export (the perturbation methods compile chunk by chunk, and of
# them only ablationcam exports).
COMPILABLE_METHODS = tuple(m for m in fastattr.METHODS if m not in perturbed(tuple(fastattr.METHODS)))

# name -> (default layer, a layer inside the net where the backward above is substantial)
ARCHS = {
    "resnet18": ("layer4", "layer3"),
    "resnet50": ("layer4", "layer3"),
    "vgg11_bn": ("features", "features.14"),
    "mobilenet_v3_small": ("features", "features.9"),
    "efficientnet_b0": ("features", "features.5"),
    "densenet121": ("features.denseblock4", "features.denseblock3.denselayer5"),
    "convnext_tiny": ("features", "features.5.3"),
    "regnet_y_400mf": ("trunk_output", "trunk_output.block3"),
}



def _mini(name: str) -> nn.Module:
    """The torchvision class of `name` with one or two blocks per stage: every kind of op the full model has
    (concatenation, squeeze-excitation, SiLU, hardswish, LayerNorm, GELU, layer scale), in a graph a fraction of
    the size, for the tests whose cost grows with the graph (an ONNX export of the whole densenet121 is the
    slowest export in docs/export.md)."""
    from torchvision.models import convnext, densenet, efficientnet, mobilenetv3, resnet, vgg

    if name == "mini-resnet18":
        return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])
    if name == "mini-densenet121":
        return densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2)
    if name == "mini-efficientnet_b0":
        setting, last_channel = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=1.0, depth_mult=0.25)
        return efficientnet.EfficientNet(setting, dropout=0.2, last_channel=last_channel)
    if name == "mini-mobilenet_v3_small":
        setting, last_channel = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small")
        return mobilenetv3.MobileNetV3(setting[:4], last_channel)
    if name == "mini-vgg11_bn":  # every conv of vgg11_bn; the classifier's 4096-wide layers 256 wide
        net = vgg.VGG(vgg.make_layers(vgg.cfgs["A"], batch_norm=True))
        net.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 256), nn.ReLU(True), nn.Dropout(), nn.Linear(256, 256),
                                       nn.ReLU(True), nn.Dropout(), nn.Linear(256, 1000))
        return net
    if name == "mini-convnext_tiny":
        config = convnext.CNBlockConfig
        return convnext.ConvNeXt([config(16, 32, 1), config(32, 64, 1), config(64, 128, 1), config(128, None, 1)])
    raise KeyError(name)


# The reduced models, as ARCHS: name -> (default layer, an inner layer).
MINI_ARCHS = {
    "mini-resnet18": ("layer4", "layer3"),
    "mini-mobilenet_v3_small": ("features", "features.3"),
    "mini-efficientnet_b0": ("features", "features.5"),
    "mini-densenet121": ("features.denseblock4", "features.denseblock3.denselayer2"),
    "mini-convnext_tiny": ("features", "features.5.0"),
    "mini-vgg11_bn": ("features", "features.14"),
}


@functools.cache
def model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`name` from torchvision (or `MINI_ARCHS`) with random weights and calibrated batch norms, in eval mode."""
    torch.manual_seed(0)
    return calibrated((_mini(name) if name in MINI_ARCHS else getattr(torchvision.models, name)()).to(dtype), dtype)


@functools.cache
def segmenter(name: str, dtype: torch.dtype = torch.float32, num_classes: int = 6) -> nn.Module:
    """torchvision's segmentation model `name` (deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large, ...) with
    `num_classes` classes, random weights and calibrated batch norms, in eval mode; it returns `{"out": [N, C, H, W]}`."""
    torch.manual_seed(0)
    build = getattr(torchvision.models.segmentation, name)
    return calibrated(build(weights=None, weights_backbone=None, num_classes=num_classes).to(dtype), dtype)


@functools.cache
def mini_fcn(dtype: torch.dtype = torch.float32, num_classes: int = 6) -> nn.Module:
    """torchvision's FCN on mini-resnet18's layers (random weights, calibrated), one per dtype as `model` and
    `segmenter` (a cached module cast in place would change every later caller's): a segmentation model whose
    graph exports in seconds; it returns `{"out": [N, C, H, W]}` as torchvision's segmentation models do."""
    from torchvision.models import resnet
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    torch.manual_seed(0)
    backbone = IntermediateLayerGetter(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1]), {"layer4": "out"})
    return calibrated(FCN(backbone, FCNHead(512, num_classes)).to(dtype), dtype)


def two_conv_net() -> nn.Module:
    """Two convolutions, a pooling and a classifier of 10 classes (random weights, eval mode): for the tests of
    what wraps the graph (chunking, loading, trust), whose export time grows with the graph and whose subject
    does not depend on it. Its last convolution is the layer "2"."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def calibrated(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`net` in eval mode, each batch norm's running statistics those of one pass over random images."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, SIZE, SIZE, dtype=dtype, generator=torch.Generator().manual_seed(1)))
    return net.eval()


def images(n: int, dtype: torch.dtype = torch.float32, seed: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))
