"""Models and inputs users hit that once gave a wrong answer or a misleading error: an optional forward argument,
non-finite pixels, a 1x1 layer, a missing output key, numpy class indices, and repeated one-shot calls."""

import linecache
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fastattr
from fastattr import reference
from models import images, model


class MaskedNet(nn.Module):
    """A classifier whose forward takes an optional mask, as many vision models' do."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)

    def forward(self, x, mask=None, scale: float = 1.0):
        if mask is not None:
            x = x * mask
        return self.net(x) * scale


def masked_net() -> MaskedNet:
    torch.manual_seed(0)
    return MaskedNet().double().eval()


def test_a_forward_with_an_optional_argument_is_traced_as_called_and_equals_the_reference():
    net, x = masked_net(), images(2, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced: no fallback warning, no FX trace of a given mask
        out = fastattr.explain(net, x, layer="net.layer4", methods=("gradcam", "saliency"), k=2, upsample=False)
    for n in range(2):
        for j, c in enumerate(out.classes[n].tolist()):
            cam, _ = reference.GradCAM(net, net.net.layer4)(x[n:n + 1], c)
            np.testing.assert_allclose(out.maps["gradcam"][n, j].numpy(), cam, rtol=0, atol=1e-10)
            sal = reference.compute_saliency_map(net, x[n:n + 1], c)
            np.testing.assert_allclose(out.maps["saliency"][n, j].numpy(), sal, rtol=0, atol=1e-10)


class SizedNet(nn.Module):
    """A forward with a tuple default, which torch.fx would split into checked placeholders."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)

    def forward(self, x, size=(2, 2)):
        return self.net(nn.functional.interpolate(x, scale_factor=size[0] / 2))


def test_a_forward_with_a_tuple_default_is_explained_as_called():
    net, x = SizedNet().eval(), images(2)
    out = fastattr.explain(net, x, layer="net.layer4", methods=("gradcam",), k=2)
    torch.testing.assert_close(out.logits, net(x).detach())


def test_guided_backprop_traces_an_optional_argument_as_not_given():
    net, x = masked_net(), images(1, torch.float64)
    assert fastattr.explain(net, x, methods=("guided",)).maps["guided"].shape == (1, 1, 64, 64)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_an_image_with_a_non_finite_pixel_is_refused_naming_it(value):
    x = images(3)
    x[1, 0, 5, 5] = value
    with pytest.raises(fastattr.InputError, match=r"images: image 1 of the batch holds NaN or Inf values"):
        fastattr.explain(model("resnet18"), x, layer="layer4")


def test_several_non_finite_images_are_all_named():
    x = images(3)
    x[0, 1, 0, 0] = x[2, 2, 9, 9] = float("nan")
    with pytest.raises(fastattr.InputError, match=r"images: images 0, 2 of the batch hold NaN or Inf"):
        fastattr.Explainer(model("resnet18"), "layer4")(x)


def test_gradcam_at_a_one_by_one_layer_warns_that_its_maps_are_constant():
    with pytest.warns(UserWarning, match=r"layer 'avgpool' of ResNet is 1x1, so gradcam can only give constant"):
        out = fastattr.explain(model("resnet18"), images(1), layer="avgpool", methods=("gradcam", "saliency"))
    assert torch.all(out.maps["gradcam"] == 0)


def test_a_layer_with_a_map_gives_no_one_by_one_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastattr.explain(model("resnet18"), images(1), layer="layer4")


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)

    def forward(self, x):
        return {"logits": self.net(x)}


@pytest.mark.parametrize("output,message", [
    ("nokey", r"output='nokey': the model's output, a dict \(keys \['logits'\]\), has no such entry"),
    (3, r"output=3: the model's output, a dict \(keys \['logits'\]\), has no such entry"),
])
def test_an_output_key_the_model_does_not_return_is_a_model_output_error(output, message):
    with pytest.raises(fastattr.ModelOutputError, match=message):
        fastattr.explain(DictNet().eval(), images(1), layer="net.layer4", output=output)


@pytest.mark.parametrize("numpy_classes,classes", [
    (np.int64(3), 3),                                      # an int: that class for every image
    ([np.int32(3), 5], [3, 5]),                            # a list: shared by the batch
    (np.array([3, 5]), torch.tensor([3, 5])),              # 1-D: one class per image
    (np.array([[3, 5], [1, 2]]), torch.tensor([[3, 5], [1, 2]])),
])
def test_numpy_class_indices_are_taken_as_the_ints_and_tensors_they_are(numpy_classes, classes):
    net, x = model("resnet18"), images(2)
    want = fastattr.explain(net, x, layer="layer4", classes=classes)
    got = fastattr.explain(net, x, layer="layer4", classes=numpy_classes)
    assert torch.equal(got.classes, want.classes)
    assert torch.equal(got.maps["gradcam"], want.maps["gradcam"])


def test_a_reversed_numpy_view_of_classes_is_taken_as_its_values():
    net, x = model("resnet18"), images(2)
    got = fastattr.explain(net, x, layer="layer4", classes=np.array([5, 3])[::-1])
    assert got.classes.tolist() == [[3], [5]]


def test_a_numpy_float_array_of_classes_is_refused_as_a_float_tensor_is():
    with pytest.raises(fastattr.TargetError, match=r"must be an integer tensor, got dtype torch.float64"):
        fastattr.explain(model("resnet18"), images(2), layer="layer4", classes=np.array([1.0, 2.0]))


# --- repeated one-shot calls ------------------------------------------------------------------------------------

def test_repeated_one_shot_calls_reuse_their_explainer_and_grow_no_cache():
    fastattr.clear_cache()
    net, x = model("resnet18"), images(2)
    first = fastattr.explain(net, x, layer="layer4", methods=("gradcam",), k=2)
    lines = len(linecache.cache)
    for _ in range(3):
        again = fastattr.explain(net, x, layer="layer4", methods=("gradcam",), k=2)
    assert len(linecache.cache) == lines
    assert torch.equal(again.maps["gradcam"], first.maps["gradcam"])


def test_a_one_shot_call_after_a_module_is_replaced_explains_the_new_model():
    fastattr.clear_cache()
    net, x = torchvision.models.resnet18(num_classes=10).eval(), images(2)
    fastattr.explain(net, x, layer="layer4")
    net.fc = nn.Linear(512, 3).eval()
    out = fastattr.explain(net, x, layer="layer4", k=3)
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits, net(x).detach())


def test_a_one_shot_call_reads_weights_changed_in_place():
    fastattr.clear_cache()
    net, x = torchvision.models.resnet18(num_classes=10).eval(), images(2)
    fastattr.explain(net, x, layer="layer4")
    with torch.no_grad():
        net.fc.bias.add_(1.0)
    torch.testing.assert_close(fastattr.explain(net, x, layer="layer4").logits, net(x).detach())


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.scale = torchvision.models.resnet18(num_classes=10), 1.0

    def forward(self, x):
        return self.net(x) * self.scale


def test_a_one_shot_call_after_a_plain_attribute_changed_reads_the_new_value():
    fastattr.clear_cache()
    net, x = Scaled().eval(), images(2)
    fastattr.explain(net, x, layer="net.layer4")
    net.scale = 3.0
    torch.testing.assert_close(fastattr.explain(net, x, layer="net.layer4").logits, net(x).detach())


class Gained(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.gain = torchvision.models.resnet18(num_classes=10), (1.0,)

    def forward(self, x):
        return self.net(x) * self.gain[0]


def test_a_one_shot_call_after_a_tuple_attribute_changed_reads_the_new_value():
    fastattr.clear_cache()
    net, x = Gained().eval(), images(2)
    fastattr.explain(net, x, layer="net.layer4")
    net.gain = (3.0,)
    torch.testing.assert_close(fastattr.explain(net, x, layer="net.layer4").logits, net(x).detach())


def test_one_shot_calls_with_other_options_get_their_own_explainer():
    fastattr.clear_cache()
    net, x = model("resnet18"), images(2)
    at3 = fastattr.explain(net, x, layer="layer3", k=1)
    at4 = fastattr.explain(net, x, layer="layer4", k=1)
    assert at3.layer == "layer3" and at4.layer == "layer4"
    assert at3.maps["gradcam"].shape == at4.maps["gradcam"].shape and not torch.equal(at3.maps["gradcam"], at4.maps["gradcam"])
