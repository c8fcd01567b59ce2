"""The article's two implementations, kept as the oracle every fast path is tested against.

Source: "Torch 402: Saliency Maps and Grad-CAM" (`shared/reference/saliency-and-gradcam-article.md`).
The numbers are the article's: same target choice (argmax of image 0), same reductions, same
normalisation. Two departures, neither changing a number: Grad-CAM's hooks live for one call and are
removed in ``finally`` (the article registers them for the object's lifetime), and the parameters'
``.grad`` is put back as it was, so using the oracle leaves the model as it found it.

This module is never made faster; it is the definition.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["compute_saliency_map", "GradCAM"]


def _saved_grads(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(p, p.grad) for p in model.parameters()]


def _restore_grads(saved: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    for p, grad in saved:
        p.grad = grad


def compute_saliency_map(model: nn.Module, input_image: torch.Tensor, target_class: int | None = None) -> np.ndarray:
    """Vanilla-gradient saliency of image 0: |d logit_c / d x| summed over channels, min-max normalised.

    >>> sal = compute_saliency_map(model, image[None])  # doctest: +SKIP
    """
    saved = _saved_grads(model)
    try:
        input_image = input_image.clone().detach()
        input_image.requires_grad_()

        output = model(input_image)

        if target_class is None:
            target_class = output.argmax(dim=1).item()

        model.zero_grad()
        output[0, target_class].backward()

        gradients = input_image.grad.data[0]
        saliency_map = torch.abs(gradients).sum(dim=0).cpu().numpy()

        saliency_map = (saliency_map - saliency_map.min()) / (saliency_map.max() - saliency_map.min() + 1e-8)
        return saliency_map
    finally:
        _restore_grads(saved)


class GradCAM:
    """Grad-CAM of image 0 at `target_layer`: ReLU(sum_c mean_ij(dy/dA_c) * A_c), min-max normalised.

    >>> heatmap, class_idx = GradCAM(model, model.layer4)(image[None])  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module):
        self.model = model
        self.target_layer = target_layer
        self.activations = None
        self.gradients = None

    def _on_forward(self, module, inputs, output):
        self.activations = output.detach()

        def _on_backward(grad):
            self.gradients = grad.detach()

        output.register_hook(_on_backward)

    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> tuple[np.ndarray, int]:
        saved = _saved_grads(self.model)
        handle = self.target_layer.register_forward_hook(self._on_forward)
        try:
            self.model.zero_grad(set_to_none=True)
            output = self.model(x)

            if class_idx is None:
                class_idx = int(output.argmax(dim=1).item())

            score = output[:, class_idx].sum()
            score.backward()

            weights = self.gradients.mean(dim=(2, 3), keepdim=True)
            cam = (weights * self.activations).sum(dim=1, keepdim=False)
            cam = cam.relu()[0]

            cam -= cam.min()
            cam /= cam.max().clamp_min(1e-8)

            return cam.detach().cpu().numpy(), class_idx
        finally:
            handle.remove()
            self.activations = self.gradients = None
            _restore_grads(saved)
