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

SIZE = 64

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


@functools.cache
def model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)().to(dtype)
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
