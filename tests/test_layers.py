"""Target layers by module path: defaults, candidates, and a layer whose output the model modifies in place."""

import pytest
import torch
import torchvision
from torch import nn

import fastattr
from models import ARCHS, images


@pytest.mark.parametrize("name,expected", [
    ("resnet18", "layer4"), ("resnet50", "layer4"), ("vgg11_bn", "features"), ("mobilenet_v3_small", "features"),
    ("efficientnet_b0", "features"), ("densenet121", "features"), ("convnext_tiny", "features"),
    ("regnet_y_400mf", "trunk_output"),
])
def test_the_default_layer_is_the_last_child_holding_a_convolution(name, expected):
    assert fastattr.default_layer(getattr(torchvision.models, name)()) == expected


def test_explain_without_a_layer_uses_the_default_and_reports_it():
    out = fastattr.explain(torchvision.models.resnet18(num_classes=10).eval(), images(1))
    assert out.layer == "layer4" and out.maps["gradcam"].shape == (1, 1, 64, 64)


def test_saliency_alone_needs_no_layer():
    out = fastattr.explain(torchvision.models.resnet18(num_classes=10).eval(), images(1), methods="saliency")
    assert out.layer is None and out.maps["saliency"].shape == (1, 1, 64, 64)


def test_layers_lists_blocks_and_the_modules_beside_their_convolutions():
    names = fastattr.layers(torchvision.models.vgg11_bn())
    assert names[0] == "features" and "features.14" in names and "features.28" in names
    assert not any(n.startswith("classifier") for n in names)
    resnet = fastattr.layers(torchvision.models.resnet18())
    assert {"layer3", "layer4", "layer4.1", "layer4.1.bn2", "layer3.0.downsample"} <= set(resnet)
    assert "fc" not in resnet and "avgpool" not in resnet


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_listed_layer_name_is_a_real_module(name):
    net = getattr(torchvision.models, name)()
    for layer in fastattr.layers(net):
        net.get_submodule(layer)


def test_gradcam_uses_the_layer_output_even_when_the_model_later_changes_it_in_place():
    # head: relu_(A) -> mean -> (+m, -m). For class 1, alpha = -3/16 over A = [[1, -2], [3, 4]], so the map
    # is relu(-3/16 * A) = [[0, 6/16], [0, 0]]; a hook that kept an alias of A would see relu(A) and give 0.
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Conv2d(1, 1, 1, bias=False)
            with torch.no_grad():
                self.layer.weight.fill_(1.0)

        def forward(self, x):
            m = torch.relu_(self.layer(x)).mean((1, 2, 3))
            return torch.stack([m, -m], dim=1)

    x = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]], dtype=torch.float64)
    out = fastattr.explain(InPlace().double().eval(), x, layer="layer", classes=[1], normalize=False)
    expected = torch.tensor([[[[0.0, 6 / 16], [0.0, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(out.maps["gradcam"], expected, rtol=0, atol=1e-15)
