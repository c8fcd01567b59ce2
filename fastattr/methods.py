"""Attribution methods as pure functions of tensors, and the registry that names them.

A method reads some of what the passes produce, batch first, with K explained classes:

    acts          [N, C, h, w]          the target layer's output
    acts_grads    [N, K, C, h, w]       d logit_k / d acts
    images        [N, C, H, W]
    input_grads   [N, K, C, H, W]       d logit_k / d images
    noisy_saliency [N, K, H, W]         the mean over S noisy copies of each image of sum_c |d logit_k / d x_c|
    deltas        [N, C, H, W]          images - baseline (Integrated Gradients)
    path_grads    [N, K, C, H, W]       the input gradient integrated along baseline -> image, by quadrature
    guided_grads  [N, K, C, H, W]       input gradients with the guided ReLU backward rule
    class_scores  [N, K]                the explained classes' logits
    ablated_scores [N, K, C]            the logits with channel c of acts zeroed (`fastattr.perturb`)
    masked_scores [N, K, C]             the logits of the image times channel c of acts, resized, min-max normalised
    occlusion_drops [N, K, H, W]        per pixel, the mean logit drop of the occluding windows that cover it

and returns a map `[N, K, h, w]` (layer methods) or `[N, K, H, W]` (input methods); a map `[N, 1, ...]`
holds for every class. A method touches no hooks, devices or batching; which passes run is decided by the
union of what the chosen methods read (`Method.reads`), so methods that read the same tensors share a pass.

Input-gradient maps reduce channels as the article's saliency does, sum_c |.|, for every gradient method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import postprocess
from .errors import MethodError


def _cam(weights: Tensor, acts: Tensor) -> Tensor:
    """ReLU(sum_c weights_c * A_c), the form every CAM shares; `weights` is `[N, K, C, 1, 1]` or `[N, K, C, h, w]`."""
    if weights.shape[-2:] == (1, 1):
        # One weight per channel: a batched matrix product, not a [N, K, C, h, w] product summed over C.
        return torch.einsum("nkc,nchw->nkhw", weights[..., 0, 0], acts).relu()
    return (weights * acts.unsqueeze(1)).sum(-3).relu()


def _spatial_sum(t: Tensor) -> Tensor:
    return t.sum((-2, -1), keepdim=True)


# --- CAMs at a layer ------------------------------------------------------------------------------------

def gradcam(acts: Tensor, acts_grads: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., 2017): ReLU(sum_c mean_ij(dy/dA_c) * A_c).

    >>> gradcam(torch.ones(1, 2, 3, 3), torch.ones(1, 1, 2, 3, 3)).shape  # doctest: +SKIP
    torch.Size([1, 1, 3, 3])
    """
    return _cam(acts_grads.mean((-2, -1), keepdim=True), acts)


def gradcam_plus_plus(acts: Tensor, acts_grads: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al., 2018, eq. 19 with the exponential output's derivatives):
    alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3), weights_c = sum_ij alpha_ij ReLU(g_ij).

    Where the denominator is 0 (then g_ij = 0 too, except on a measure-zero set) alpha is 0.
    """
    g2 = acts_grads.square()
    denominator = 2 * g2 + _spatial_sum(acts).unsqueeze(1) * g2 * acts_grads
    alpha = g2 / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return _cam(_spatial_sum(alpha * acts_grads.relu()), acts)


def xgradcam(acts: Tensor, acts_grads: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al., 2020): weights_c = sum_ij (A_ij / sum_ab A_ab) g_ij; a channel whose
    activations sum to 0 gets weight 0."""
    a = acts.unsqueeze(1)
    total = _spatial_sum(a)
    return _cam(_spatial_sum(a * acts_grads) / torch.where(total == 0, torch.ones_like(total), total), acts)


def hirescam(acts: Tensor, acts_grads: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin, 2020): ReLU(sum_c g_c * A_c), the gradient kept per position."""
    return _cam(acts_grads, acts)


def gradcam_elementwise(acts: Tensor, acts_grads: Tensor) -> Tensor:
    """Element-wise Grad-CAM (as pytorch-grad-cam's GradCAMElementWise): sum_c ReLU(g_c * A_c)."""
    return (acts_grads * acts.unsqueeze(1)).relu().sum(-3)


def layercam(acts: Tensor, acts_grads: Tensor) -> Tensor:
    """LayerCAM (Jiang et al., 2021): ReLU(sum_c ReLU(g_c) * A_c)."""
    return _cam(acts_grads.relu(), acts)


def _top_eigenvector(gram: Tensor, squarings: int = 12) -> Tensor:
    """The unit eigenvector of the largest eigenvalue of symmetric PSD `gram [N, d, d]`.

    Repeated squaring (gram^(2^12), rescaled by its trace each time) leaves a rank-one v v^T whenever the top
    eigenvalue exceeds the next by more than 1 part in ~600; its column of largest diagonal is then along v.
    Only MatMul, ArgMax and Gather: compiles and exports to ONNX, which has no SVD or eigensolver.
    """
    tiny = torch.finfo(gram.dtype).tiny
    power = gram
    for _ in range(squarings):
        power = power / power.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(tiny)
        power = power @ power
    column = power.diagonal(dim1=-2, dim2=-1).argmax(-1)
    vector = power.gather(-1, column[:, None, None].expand(-1, power.shape[1], 1)).squeeze(-1)
    return vector / vector.norm(dim=-1, keepdim=True).clamp_min(tiny)


def principal_projection(acts: Tensor) -> Tensor:
    """`[N, h, w]`: each position's centred activation vector projected on the first principal component
    of the positions (pytorch-grad-cam's `get_2d_projection`), the component's sign chosen so that the
    projection correlates positively with the channel-summed activation (SVD's sign is arbitrary)."""
    n, c, h, w = acts.shape
    rows = acts.flatten(2).transpose(1, 2)  # [N, hw, C]
    rows = rows - rows.mean(1, keepdim=True)
    if h * w <= c:  # the smaller Gram matrix has the same top component: v = rows^T u / |rows^T u|
        component = (rows.transpose(1, 2) @ _top_eigenvector(rows @ rows.transpose(1, 2)).unsqueeze(-1)).squeeze(-1)
        component = component / component.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(acts.dtype).tiny)
    else:
        component = _top_eigenvector(rows.transpose(1, 2) @ rows)
    projection = (rows @ component.unsqueeze(-1)).squeeze(-1)  # [N, hw]
    agreement = (projection * acts.sum(1).flatten(1)).sum(-1, keepdim=True)
    return (projection * torch.where(agreement < 0, -1.0, 1.0).to(acts.dtype)).view(n, h, w)


def eigencam(acts: Tensor) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin, 2020): ReLU of the activations' first principal component, the same
    map for every class (gradient-free). Returns `[N, 1, h, w]`."""
    return principal_projection(acts).relu().unsqueeze(1)


# --- perturbation CAMs at a layer (no gradients) --------------------------------------------------------

def ablationcam(acts: Tensor, class_scores: Tensor, ablated_scores: Tensor) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): weights_c = (y - y_c) / y, the relative drop of the class
    score y when channel c of the layer is zeroed, then ReLU(sum_c weights_c * A_c). A zero score gives
    weight 0 instead of a division by 0.

    >>> ablationcam(torch.ones(1, 2, 3, 3), torch.full((1, 1), 4.0), torch.tensor([[[3.0, 4.0]]])).shape  # doctest: +SKIP
    torch.Size([1, 1, 3, 3])
    """
    y = class_scores.unsqueeze(-1)
    weights = torch.where(y == 0, torch.zeros_like(ablated_scores), (y - ablated_scores) / torch.where(y == 0, 1, y))
    return _cam(weights[..., None, None], acts)


def scorecam(acts: Tensor, masked_scores: Tensor) -> Tensor:
    """Score-CAM (Wang et al., CVPR-W 2020): weights_c = softmax_c(y(x * norm(up(A_c)))), the softmax over
    channels of the class logit (pytorch-grad-cam's form) on the image masked by each channel's activation,
    resized with half-pixel centres (the authors' code) and min-max normalised; then ReLU(sum_c weights_c * A_c)."""
    return _cam(masked_scores.softmax(-1)[..., None, None], acts)


# --- perturbation at the input (no gradients) -------------------------------------------------------------

def occlusion(occlusion_drops: Tensor) -> Tensor:
    """Occlusion (Zeiler & Fergus, ECCV 2014; captum's `Occlusion`): per pixel, the mean drop of the class
    score over the sliding windows that cover it, each window set to the baseline in every channel."""
    return occlusion_drops


# --- gradients at the input -----------------------------------------------------------------------------

def _channel_abs_sum(attribution: Tensor) -> Tensor:
    return attribution.abs().sum(-3)


def saliency(input_grads: Tensor) -> Tensor:
    """Vanilla-gradient saliency (Simonyan et al., 2014): sum_c |dy/dx_c|."""
    return _channel_abs_sum(input_grads)


def input_x_gradient(images: Tensor, input_grads: Tensor) -> Tensor:
    """Input x Gradient (Shrikumar et al., 2016): sum_c |x_c * dy/dx_c|."""
    return _channel_abs_sum(images.unsqueeze(1) * input_grads)


def smoothgrad(noisy_saliency: Tensor) -> Tensor:
    """SmoothGrad (Smilkov et al., 2017) over saliency: (1/S) sum_s sum_c |dy/dx_c (x + noise_s)|.

    The mean is taken in the pass that computes the gradients, chunk by chunk (the sampled read
    `noisy_saliency`, `SAMPLED`), so the S gradients are never held at once; the method is that mean.
    """
    return noisy_saliency


def integrated_gradients(deltas: Tensor, path_grads: Tensor) -> Tensor:
    """Integrated Gradients (Sundararajan et al., 2017): sum_c |(x - x') * integral_0^1 dy/dx(x' + a(x - x')) da|."""
    return _channel_abs_sum(deltas.unsqueeze(1) * path_grads)


def gauss_legendre(steps: int) -> tuple[list[float], list[float]]:
    """Integrated Gradients' path points in (0, 1) and their weights (summing to 1): the Gauss-Legendre rule,
    placed as captum's default method places it."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return ((nodes + 1) / 2).tolist(), (weights / 2).tolist()


def completeness_error(deltas: Tensor, path_grads: Tensor, gains: Tensor) -> Tensor:
    """`[N, K]`: IG's attributions summed over the input minus `gains = y(x) - y(x')`; 0 for the exact integral."""
    return (deltas.unsqueeze(1) * path_grads).sum((-3, -2, -1)) - gains


def guided_backprop(guided_grads: Tensor) -> Tensor:
    """Guided Backpropagation (Springenberg et al., 2015): sum_c |guided dy/dx_c|, every ReLU passing back
    only positive gradients where its input was positive."""
    return _channel_abs_sum(guided_grads)


def guided_gradcam(acts: Tensor, acts_grads: Tensor, guided_grads: Tensor) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al., 2017): Grad-CAM resized bilinearly to the input, times guided
    backpropagation, sum_c |.| (the Grad-CAM factor is >= 0, so it leaves the channel sum)."""
    return postprocess.upsample(gradcam(acts, acts_grads), guided_grads.shape[-2:]) * guided_backprop(guided_grads)


# --- the registry ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampled:
    """A read made from the input gradients at many points around each image: the weighted sum over the points
    of `fold(grads)`, `grads [N, P, K, C, H, W]` a chunk's gradients and the result `[N, P, K, ...]`.

    along: "noise" (SmoothGrad's points: image + noise * (max - min) * draw, `samples` of them, weights 1/samples;
           the draw is an input of the graph) or "path" (Integrated Gradients' points: baseline + alpha * (image -
           baseline), `steps` Gauss-Legendre nodes and weights).
    """

    along: str
    fold: Callable[[Tensor], Tensor]


# The sampled reads, each computed in chunks of points by the one sampled pass (`fastattr.explain`): a new
# sampling method (SmoothGrad over another gradient map, say) is an entry here and a method reading it.
SAMPLED: dict[str, Sampled] = {
    "noisy_saliency": Sampled("noise", saliency),
    "path_grads": Sampled("path", lambda grads: grads),
}


@dataclass(frozen=True)
class Method:
    fn: Callable[..., Tensor]
    reads: tuple[str, ...]            # names of the tensors above, passed positionally
    normalize: Callable[[Tensor], Tensor]


_CAM = ("acts", "acts_grads")


def _cam_method(fn: Callable[..., Tensor]) -> Method:
    return Method(fn, _CAM, postprocess.minmax_clamped)


def _input_method(fn: Callable[..., Tensor], *reads: str) -> Method:
    return Method(fn, reads, postprocess.minmax_shifted)


# Grad-CAM and saliency keep the article's normalisations, so their maps equal the oracle's exactly (the two
# differ in where eps goes); the other CAMs follow Grad-CAM's and the other gradient maps saliency's.
METHODS: dict[str, Method] = {
    "gradcam": _cam_method(gradcam),
    "gradcam++": _cam_method(gradcam_plus_plus),
    "xgradcam": _cam_method(xgradcam),
    "hirescam": _cam_method(hirescam),
    "layercam": _cam_method(layercam),
    "gradcam-elementwise": _cam_method(gradcam_elementwise),
    "eigencam": Method(eigencam, ("acts",), postprocess.minmax_clamped),
    "ablationcam": Method(ablationcam, ("acts", "class_scores", "ablated_scores"), postprocess.minmax_clamped),
    "scorecam": Method(scorecam, ("acts", "masked_scores"), postprocess.minmax_clamped),
    "saliency": _input_method(saliency, "input_grads"),
    "inputxgrad": _input_method(input_x_gradient, "images", "input_grads"),
    "smoothgrad": _input_method(smoothgrad, "noisy_saliency"),
    "ig": _input_method(integrated_gradients, "deltas", "path_grads"),
    "guided": _input_method(guided_backprop, "guided_grads"),
    "guided-gradcam": _input_method(guided_gradcam, "acts", "acts_grads", "guided_grads"),
    "occlusion": _input_method(occlusion, "occlusion_drops"),
}


# The reads made by forwarding many perturbed copies (`fastattr.perturb`): no gradient.
PERTURBED = frozenset({"ablated_scores", "masked_scores", "occlusion_drops"})
# The perturbation reads whose copies go through the whole model: no export holds them (an exported graph has
# no chunks). Ablation-CAM's copies go through the head above the layer only, which an export may hold.
THROUGH_THE_MODEL = frozenset({"masked_scores", "occlusion_drops"})


def _reading(names: tuple[str, ...], reads) -> tuple[str, ...]:
    return tuple(name for name in names if set(METHODS[name].reads) & reads)


def perturbed(names: tuple[str, ...]) -> tuple[str, ...]:
    """The named methods that read a perturbation pass (compiled forward by forward)."""
    return _reading(names, PERTURBED)


def unexportable(names: tuple[str, ...]) -> tuple[str, ...]:
    """The named methods no export holds: those that forward perturbed copies through the whole model."""
    return _reading(names, THROUGH_THE_MODEL)


def sampled(names: tuple[str, ...]) -> tuple[str, ...]:
    """The named methods that read a sampled pass (`SAMPLED`: SmoothGrad's noisy copies, IG's path points)."""
    return _reading(names, SAMPLED.keys())


def reads(names: tuple[str, ...]) -> frozenset[str]:
    """Every tensor the named methods read: what the passes must produce."""
    return frozenset(r for name in names for r in METHODS[name].reads)


def resolve(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Check method names and return them as a tuple, in order, without repeats."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(dict.fromkeys(names))
    if not names:
        raise MethodError("methods: empty; pass at least one of " + ", ".join(repr(m) for m in METHODS))
    for name in names:
        if name not in METHODS:
            raise MethodError(f"methods: unknown method {name!r}; valid: " + ", ".join(repr(m) for m in METHODS))
    return names
