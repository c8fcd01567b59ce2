"""fastattr.reference keeps the article's numbers and, unlike the article, leaves nothing behind."""

import copy

import numpy as np
import pytest
import torchvision

import article_verbatim
from fastattr import reference
from models import images, model


@pytest.mark.parametrize("class_idx", [None, 3])
def test_reference_gradcam_gives_the_articles_numbers(class_idx):
    net, x = model("resnet18"), images(1)
    ours = reference.GradCAM(net, net.layer4)(x, class_idx)
    scratch = copy.deepcopy(net)
    theirs = article_verbatim.GradCAM(scratch, scratch.layer4)(x, class_idx)
    assert ours[1] == theirs[1]
    assert np.array_equal(ours[0], theirs[0])


@pytest.mark.parametrize("target_class", [None, 3])
def test_reference_saliency_gives_the_articles_numbers(target_class):
    net, x = model("resnet18"), images(1)
    scratch = copy.deepcopy(net)
    assert np.array_equal(reference.compute_saliency_map(net, x, target_class),
                          article_verbatim.compute_saliency_map(scratch, x, target_class))


def test_reference_gradcam_removes_its_hook_after_each_call_unlike_the_article():
    net = model("resnet18")
    reference.GradCAM(net, net.layer4)(images(1))
    assert not net.layer4._forward_hooks
    scratch = copy.deepcopy(net)
    article_verbatim.GradCAM(scratch, scratch.layer4)
    assert len(scratch.layer4._forward_hooks) == 1


def test_reference_gradcam_removes_its_hook_when_the_call_raises():
    net = model("resnet18")
    with pytest.raises(IndexError):
        reference.GradCAM(net, net.layer4)(images(1), class_idx=5000)
    assert not net.layer4._forward_hooks


def test_reference_puts_parameter_grads_back():
    net = torchvision.models.resnet18(num_classes=10).eval()
    reference.GradCAM(net, net.layer4)(images(1))
    reference.compute_saliency_map(net, images(1))
    assert all(p.grad is None for p in net.parameters())
