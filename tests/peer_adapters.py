"""What the peers need handed to them to score or explain what fastattr does, shared by the tests that compare
with them and the benchmarks that time them (benchmarks/conftest.py puts this folder on the path)."""

import contextlib

from torch import nn


class GivenMaps:
    """A torchcam CAM extractor that hands torchcam's metrics fastattr's maps of one class, so that both score
    the same maps (torchcam's `_CAMExtractor` protocol: the model, a call giving the maps, fusing, hooks off)."""

    def __init__(self, net, maps):
        self.model, self.maps = net, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, **_):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return contextlib.nullcontext()


class OutMap(nn.Module):
    """A torchvision segmentation model's `["out"]`, as pytorch-grad-cam's segmentation tutorial wraps it."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)["out"]
