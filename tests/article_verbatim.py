"""The article's two implementations exactly as printed, to check that fastattr.reference keeps their numbers."""

import torch


def compute_saliency_map(model, input_image, target_class=None):
    """Compute saliency map using gradients."""
    input_image = input_image.clone().detach()
    input_image.requires_grad_()

    output = model(input_image)

    # Determine target class
    if target_class is None:
        target_class = output.argmax(dim=1).item()

    model.zero_grad()
    output[0, target_class].backward()

    # Get gradients and create saliency map
    gradients = input_image.grad.data[0]
    saliency_map = torch.abs(gradients).sum(dim=0).cpu().numpy()

    # Normalize to [0, 1]
    saliency_map = (saliency_map - saliency_map.min()) / (saliency_map.max() - saliency_map.min() + 1e-8)

    return saliency_map


class GradCAM:
    def __init__(self, model, target_layer):
        self.model = model
        self.target_layer = target_layer
        self.activations = None
        self.gradients = None
        self.target_layer.register_forward_hook(self._on_forward)

    def _on_forward(self, module, inputs, output):
        self.activations = output.detach()
        def _on_backward(grad):
            self.gradients = grad.detach()
        output.register_hook(_on_backward)

    def __call__(self, x, class_idx=None):
        self.model.zero_grad(set_to_none=True)
        output = self.model(x)

        if class_idx is None:
            class_idx = int(output.argmax(dim=1).item())

        score = output[:, class_idx].sum()
        score.backward()

        # Channel-wise mean of gradients
        weights = self.gradients.mean(dim=(2, 3), keepdim=True)
        cam = (weights * self.activations).sum(dim=1, keepdim=False)
        cam = cam.relu()[0]

        # Normalize to [0, 1]
        cam -= cam.min()
        cam /= cam.max().clamp_min(1e-8)

        return cam.detach().cpu().numpy(), class_idx
