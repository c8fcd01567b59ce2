"""Each bad input gets an error that names the problem and the fix, before any work is done."""

import pytest
import torch
import torchvision
from torch import nn

import fastattr
from models import images, model


def test_unknown_layer_lists_the_nearest_names_and_where_to_find_all():
    with pytest.raises(fastattr.LayerError, match=r"no module 'layer4.2.conv1' in ResNet; closest: 'layer4.1.conv1'.*"
                                                  r"fastattr.layers\(model\) lists the \d+ candidates"):
        fastattr.Explainer(model("resnet18"), layer="layer4.2.conv1")


def test_a_layer_that_the_forward_never_calls_is_refused():
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(fastattr.LayerError, match=r"'unused' exists in ResNet but its forward never calls it"):
        fastattr.Explainer(net, layer="unused")


def test_a_layer_called_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(self.block(self.block(x)).mean((2, 3)))

    with pytest.raises(fastattr.LayerError, match=r"'block' is called 2 times in one forward of Twice"):
        fastattr.Explainer(Twice(), layer="block")


def test_a_layer_above_the_logits_is_refused():
    class Aside(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.side = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            self.side(x)
            return self.conv(x).mean((2, 3))

    with pytest.raises(fastattr.LayerError, match=r"output of Aside does not depend on 'side'"):
        fastattr.Explainer(Aside(), layer="side")


@pytest.mark.parametrize("bad,message", [
    (torch.zeros(3, 64, 64), r"expected a batch \[N, C, H, W\], got shape \[3, 64, 64\]; for a single image pass image\[None\]"),
    (torch.zeros(1, 1, 3, 64, 64), r"expected a batch \[N, C, H, W\], got shape \[1, 1, 3, 64, 64\]"),
    (torch.zeros(2, 1, 64, 64), r"ResNet takes 3 channels, got 1 \(shape \[2, 1, 64, 64\]\)"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), r"expected a floating point tensor, got torch.uint8"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.float64), r"dtype torch.float64 differs from the model's parameters \(torch.float32\)"),
    (torch.zeros(0, 3, 64, 64), r"the batch is empty"),
    (torch.zeros(2, 3, 64, 64).numpy(), r"expected a torch.Tensor \[N, C, H, W\], got ndarray"),
])
def test_bad_images_raise_a_clear_error(bad, message):
    explainer = fastattr.Explainer(model("resnet18"), methods=("gradcam", "saliency"))
    with pytest.raises(fastattr.InputError, match=message):
        explainer(bad)


def test_an_image_too_small_for_the_model_says_so():
    explainer = fastattr.Explainer(torchvision.models.vgg11().eval(), layer="features.0")
    with pytest.raises(fastattr.InputError, match=r"VGG cannot run on shape \[1, 3, 8, 8\]"):
        explainer(torch.zeros(1, 3, 8, 8))


def test_class_index_out_of_range_names_the_valid_range():
    with pytest.raises(fastattr.TargetError, match=r"index 1000 out of range for a model with 1000 outputs \(valid 0..999\)"):
        fastattr.explain(model("resnet18"), images(2), classes=[3, 1000])


def test_k_larger_than_the_number_of_classes_is_refused():
    with pytest.raises(fastattr.TargetError, match=r"k: must be an int in 1..1000 .* got 1001"):
        fastattr.explain(model("resnet18"), images(1), k=1001)


def test_unknown_method_lists_the_valid_names():
    with pytest.raises(fastattr.MethodError, match=r"unknown method 'gradcam\+'; valid: 'gradcam', 'gradcam\+\+', "
                       r"'xgradcam', .* 'guided', 'guided-gradcam', 'occlusion'$"):
        fastattr.Explainer(model("resnet18"), methods=("gradcam+",))


class TupleNet(nn.Module):
    def __init__(self, as_dict=False, key="scores"):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)
        self.as_dict, self.key = as_dict, key

    def forward(self, x):
        features = self.conv(x)
        logits = self.fc(features.mean((2, 3)))
        return {self.key: logits, "features": features} if self.as_dict else (logits, features)


def test_a_model_returning_a_tuple_needs_output_to_pick_the_logits():
    with pytest.raises(fastattr.ModelOutputError, match=r"TupleNet returns a tuple, not a logits tensor; say which part "
                                                        r"holds the logits with output=0"):
        fastattr.explain(TupleNet().eval(), images(1), layer="conv")


def test_a_model_returning_a_dict_is_told_its_keys():
    with pytest.raises(fastattr.ModelOutputError, match=r"returns a dict with keys \['scores', 'features'\].*output='scores'"):
        fastattr.explain(TupleNet(as_dict=True).eval(), images(1), layer="conv")


def test_a_dict_holding_logits_is_read_by_that_key_as_hugging_faces_model_outputs_are():
    net = TupleNet(as_dict=True, key="logits").eval()
    out = fastattr.explain(net, images(2), layer="conv", k=2)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, net(images(2))["logits"])


@pytest.mark.parametrize("as_dict,output", [(False, 0), (True, "scores"), (False, lambda out: out[0])])
def test_output_picks_the_logits_from_a_tuple_or_dict(as_dict, output):
    net = TupleNet(as_dict).eval()
    out = fastattr.explain(net, images(2), layer="conv", methods=("gradcam", "saliency"), output=output, k=2)
    with torch.no_grad():
        expected = net(images(2))
    torch.testing.assert_close(out.logits, expected["scores"] if as_dict else expected[0])
    assert out.maps["gradcam"].shape == (2, 2, 64, 64)
