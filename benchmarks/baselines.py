"""What a user would run without fastattr, written as captum and torchcam do it, for the same classes."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastattr import reference


def plain_inference(model: nn.Module, x: Tensor) -> Tensor:
    with torch.inference_mode():
        return model(x)


def forward_backward_to_input(model: nn.Module, x: Tensor) -> Tensor:
    """The floor for saliency: one forward, one backward to the input for the top-1 class, no parameter grads."""
    x = x.detach().requires_grad_()
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.max(1).values.sum(), x)
    return grad.abs().sum(1)


def retain_graph_loop(model: nn.Module, layer: nn.Module | None, x: Tensor, k: int) -> Tensor:
    """One forward with a hook on the layer, then K `autograd.grad` calls to the layer (or the input when
    `layer` is None), keeping the graph between them: torchcam's and captum's way for K classes."""
    kept: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, out: kept.append(out)) if layer is not None else None
    try:
        x = x.detach().requires_grad_(layer is None)
        logits = model(x)
    finally:
        if handle is not None:
            handle.remove()
    classes = logits.topk(k, 1).indices
    wrt = kept[0] if layer is not None else x
    maps = []
    for j in range(k):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, j:j + 1]).sum(), wrt, retain_graph=j < k - 1)
        if layer is None:
            maps.append(grad.abs().sum(1))
        else:
            maps.append((grad.mean((2, 3), keepdim=True) * wrt.detach()).sum(1).relu())
    return torch.stack(maps, 1)


def article_gradcam(model: nn.Module, layer: nn.Module, x: Tensor, k: int) -> list:
    """The article's GradCAM, one call per (image, class) for the image's top-k classes."""
    cam = reference.GradCAM(model, layer)
    with torch.inference_mode():
        top = model(x).topk(k, 1).indices
    return [cam(x[n:n + 1], int(c)) for n in range(x.shape[0]) for c in top[n]]


def article_saliency(model: nn.Module, x: Tensor, k: int) -> list:
    with torch.inference_mode():
        top = model(x).topk(k, 1).indices
    return [reference.compute_saliency_map(model, x[n:n + 1], int(c)) for n in range(x.shape[0]) for c in top[n]]


# --- the libraries a user would pick instead, used as their documentation shows, K classes as K calls ---

def top_classes(model: nn.Module, x: Tensor, k: int) -> Tensor:
    with torch.no_grad():  # not inference_mode: the peers' autograd would refuse the indices later
        return model(x).topk(k, 1).indices


def captum_layer_gradcam(model: nn.Module, layer: nn.Module, x: Tensor, k: int) -> list[Tensor]:
    """captum's LayerGradCam for each of the top-k classes, upsampled to the input as its docs show."""
    from captum.attr import LayerAttribution, LayerGradCam

    explainer, classes = LayerGradCam(model, layer), top_classes(model, x, k)
    return [LayerAttribution.interpolate(explainer.attribute(x, target=classes[:, j], relu_attributions=True),
                                         tuple(x.shape[-2:]), "bilinear") for j in range(k)]


def captum_saliency(model: nn.Module, x: Tensor, k: int) -> list[Tensor]:
    from captum.attr import Saliency

    explainer, classes = Saliency(model), top_classes(model, x, k)
    return [explainer.attribute(x, target=classes[:, j]) for j in range(k)]


def grad_cam_package(cam, model: nn.Module, x: Tensor, k: int) -> list:
    """pytorch-grad-cam's GradCAM (`cam`, built once by the caller) for each of the top-k classes."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = top_classes(model, x, k)
    return [cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes[:, j]]) for j in range(k)]


def captum_smoothgrad(model: nn.Module, x: Tensor, samples: int, stdev: float) -> Tensor:
    """captum's NoiseTunnel over Saliency (SmoothGrad) for the top-1 class, all samples in one batch."""
    from captum.attr import NoiseTunnel, Saliency

    return NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=samples, stdevs=stdev,
                                                  target=top_classes(model, x, 1)[:, 0])


def captum_integrated_gradients(model: nn.Module, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """captum's IntegratedGradients (Gauss-Legendre, baseline 0) for the top-1 class, with its convergence delta."""
    from captum.attr import IntegratedGradients

    return IntegratedGradients(model).attribute(x, target=top_classes(model, x, 1)[:, 0], n_steps=steps,
                                                method="gausslegendre", return_convergence_delta=True)
