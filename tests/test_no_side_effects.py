"""The model and the input are left exactly as they were, after success and after a raising call."""

import threading

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules import module as nn_module

import fastattr
from fastattr import reference
from models import images, model


def snapshot(net: nn.Module):
    return {
        "hooks": [(name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks)) for name, m in net.named_modules()],
        "global hooks": (len(nn_module._global_forward_hooks), len(nn_module._global_forward_pre_hooks),
                         len(nn_module._global_backward_hooks)),
        "training": [m.training for m in net.modules()],
        "requires_grad": [p.requires_grad for p in net.parameters()],
        "grad": [p.grad for p in net.parameters()],
        "state": {k: v.clone() for k, v in net.state_dict().items()},
    }


def assert_same(before, after):
    for key in ("hooks", "global hooks", "training", "requires_grad"):
        assert before[key] == after[key], key
    assert all(a is b for a, b in zip(before["grad"], after["grad"])), "a parameter's .grad changed"
    assert before["state"].keys() == after["state"].keys()
    for k in before["state"]:
        assert torch.equal(before["state"][k], after["state"][k]), k


def frozen_resnet():
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.layer1.requires_grad_(False)  # a partly frozen model stays partly frozen
    net.fc.weight.grad = torch.ones_like(net.fc.weight)  # an existing .grad stays as it is
    return net


@pytest.mark.parametrize("methods", [("gradcam",), ("saliency",), ("gradcam", "saliency")])
def test_a_successful_call_leaves_model_and_input_unchanged(methods):
    net, x = frozen_resnet(), images(2)
    x_before, before = x.clone(), snapshot(net)
    fastattr.explain(net, x, layer="layer3", methods=methods, k=3)
    assert_same(before, snapshot(net))
    assert torch.equal(x, x_before) and not x.requires_grad and x.grad is None


@pytest.mark.parametrize("bad_call", [
    lambda net, x: fastattr.explain(net, x, layer="layer3", classes=[10]),
    lambda net, x: fastattr.explain(net, x, layer="layer9"),
    lambda net, x: fastattr.explain(net, x[:, :1], layer="layer3"),
    # fails inside the forward-backward, after the trunk ran
    lambda net, x: fastattr.explain(net, x, layer="layer3", methods=("gradcam", "saliency"),
                                    output=lambda out: out[:, :, None]),
])
def test_a_raising_call_leaves_model_and_input_unchanged(bad_call):
    net, x = frozen_resnet(), images(2)
    x_before, before = x.clone(), snapshot(net)
    with pytest.raises(fastattr.FastattrError):
        bad_call(net, x)
    assert_same(before, snapshot(net))
    assert torch.equal(x, x_before) and not x.requires_grad


@pytest.mark.parametrize("method", sorted(fastattr.METHODS))
def test_a_model_in_training_mode_is_refused_before_any_work_and_left_unchanged(method):
    net = torchvision.models.resnet18(num_classes=10).train()
    before = snapshot(net)
    with pytest.raises(fastattr.InputError, match=r"ResNet is in training mode \('conv1', 'bn1', 'relu' and 6\d more\).*call model.eval\(\) before explaining"):
        fastattr.explain(net, images(2), layer="layer4", methods=(method,), samples=2, steps=2)
    assert_same(before, snapshot(net))
    assert all(m.training for m in net.modules())


@pytest.mark.parametrize("export", [fastattr.export_onnx, fastattr.export_program], ids=["onnx", "program"])
def test_export_refuses_a_model_in_training_mode(export, tmp_path):
    net = torchvision.models.resnet18(num_classes=10).train()
    before = snapshot(net)
    with pytest.raises(fastattr.InputError, match=r"ResNet is in training mode .*call model.eval\(\) before explaining"):
        export(net, tmp_path / "model", layer="layer4", input_shape=(3, 64, 64))
    assert_same(before, snapshot(net))
    assert all(m.training for m in net.modules()) and list(tmp_path.iterdir()) == []


def test_one_submodule_left_in_training_mode_is_named_in_the_refusal():
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.layer2[1].bn1.train()
    with pytest.raises(fastattr.InputError, match=r"ResNet's modules are in training mode \('layer2.1.bn1'\), where"):
        fastattr.explain(net, images(2), layer="layer4")


@pytest.mark.parametrize("method", sorted(fastattr.METHODS))
def test_the_same_model_in_eval_mode_is_explained_and_left_unchanged(method):
    net = torchvision.models.resnet18(num_classes=10).eval()
    before = snapshot(net)
    out = fastattr.explain(net, images(2), layer="layer4", methods=(method,), samples=2, steps=2, k=2)
    assert out.maps[method].shape == (2, 2, 64, 64) and torch.isfinite(out.maps[method]).all()
    assert_same(before, snapshot(net))


def test_eight_threads_on_one_model_get_the_results_of_sequential_calls():
    net = model("resnet18")
    explainer = fastattr.Explainer(net, layer="layer3", methods=("gradcam", "saliency"))
    inputs = [images(2, seed=100 + i) for i in range(8)]
    sequential = [explainer(x, k=3) for x in inputs]
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        for _ in range(2):
            results[i] = explainer(inputs[i], k=3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert torch.equal(got.classes, want.classes)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
        for key in want.maps:
            torch.testing.assert_close(got.maps[key], want.maps[key], rtol=0, atol=1e-5)


def test_plain_inference_beside_the_explainer_is_unaffected():
    net, x = model("resnet18"), images(2)
    with torch.inference_mode():
        before = net(x)
    fastattr.explain(net, x, methods=("gradcam", "saliency"), k=2)
    with torch.inference_mode():
        assert torch.equal(net(x), before)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the eager hook path runs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        f = self.features(x)
        if f.mean() > -1e9:
            f = f * 2
        return self.fc(f.mean((2, 3)))


def test_an_untraceable_model_takes_the_eager_path_with_a_warning_and_matches_reference():
    torch.manual_seed(0)
    net, x = Branchy().double().eval(), images(2, torch.float64)
    before = snapshot(net)
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace Branchy .*using the eager hook path"):
        explainer = fastattr.Explainer(net, layer="features", methods=("gradcam", "saliency"), upsample=False)
    assert not explainer.split.traced
    out = explainer(x, k=2)
    for n in range(2):
        for j in range(2):
            c = int(out.classes[n, j])
            cam, _ = reference.GradCAM(net, net.features)(x[n:n + 1], c)
            np.testing.assert_allclose(out.maps["gradcam"][n, j].numpy(), cam, rtol=0, atol=1e-10)
            sal = reference.compute_saliency_map(net, x[n:n + 1], c)
            np.testing.assert_allclose(out.maps["saliency"][n, j].numpy(), sal, rtol=0, atol=1e-10)
    assert_same(before, snapshot(net))


class BranchyNorm(Branchy):
    """Branchy with a batch norm, whose running statistics a forward in training mode would update."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2))


# The methods an untraceable model runs, the layer methods on the eager hook path and the input methods on the model
# itself: all but those that rewrite or cut a torch.fx trace (guided backpropagation's ReLUs, Ablation-CAM's head).
UNTRACED_METHODS = sorted(set(fastattr.METHODS) - {"guided", "guided-gradcam", "ablationcam"})


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace BranchyNorm:UserWarning")
@pytest.mark.parametrize("method", UNTRACED_METHODS)
def test_an_untraceable_model_in_training_mode_is_refused_and_left_unchanged(method):
    net = BranchyNorm().train()
    before = snapshot(net)
    with pytest.raises(fastattr.InputError, match=r"BranchyNorm is in training mode \('features', 'features.0', "
                                                  r"'features.1' and \d more\).*call model.eval\(\) before explaining"):
        fastattr.explain(net, images(2), layer="features", methods=(method,), samples=2, steps=2)
    assert_same(before, snapshot(net))
    assert all(m.training for m in net.modules())


def test_the_eager_path_removes_its_hook_when_the_call_raises():
    net = Branchy().eval()
    with pytest.warns(UserWarning):
        explainer = fastattr.Explainer(net, layer="features", output=lambda out: out[:, :, None])
    before = snapshot(net)
    with pytest.raises(fastattr.ModelOutputError):
        explainer(images(1))
    assert_same(before, snapshot(net))


def test_every_method_leaves_the_model_as_it_was():
    net, x = model("resnet18"), images(2)
    before = snapshot(net)
    fastattr.explain(net, x, layer="layer4", methods=tuple(fastattr.METHODS), k=2, samples=2, steps=2)
    assert_same(before, snapshot(net))
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in net.modules())


def test_guided_backprop_on_a_model_torch_fx_cannot_trace_is_refused_naming_the_cause():
    with pytest.raises(fastattr.MethodError, match=r"guided backpropagation rewrites the ReLUs of a torch.fx trace, "
                       r"and torch.fx cannot trace Branchy"):
        fastattr.Explainer(Branchy().eval(), methods="guided")


def test_smoothgrad_and_ig_run_on_the_eager_hook_path_too():
    torch.manual_seed(0)
    net, x = Branchy().double().eval(), images(1, torch.float64)
    with pytest.warns(UserWarning, match="eager hook path"):
        out = fastattr.explain(net, x, layer="features", methods=("gradcam", "smoothgrad", "ig"), k=2, samples=2,
                               steps=64, normalize=False)
    assert out.maps["smoothgrad"].shape == (1, 2, 64, 64)
    # the net is piecewise linear, so 64 Gauss-Legendre points leave little of the path integral out
    assert out.completeness.abs().max() < 1e-2 * out.logits.abs().max()
