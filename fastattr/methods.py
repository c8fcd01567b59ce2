"""Attribution methods as pure functions of tensors, and the registry that names them.

Shapes are batch first: `acts [N, C, h, w]` and `grads [N, K, C, h, w]` (K explained classes) give a
map `[N, K, h, w]`. A method at the input takes the images and their gradients in the same layout.
A method touches no hooks, devices, batching, resizing or normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import Tensor

from . import postprocess
from .errors import MethodError


def gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al., 2017): ReLU(sum_c mean_ij(dy/dA_c) * A_c).

    >>> gradcam(torch.ones(1, 2, 3, 3), torch.ones(1, 1, 2, 3, 3)).shape  # doctest: +SKIP
    torch.Size([1, 1, 3, 3])
    """
    return (grads.mean((-2, -1), keepdim=True) * acts.unsqueeze(1)).sum(-3).relu()


def saliency(images: Tensor, grads: Tensor) -> Tensor:
    """Vanilla-gradient saliency (Simonyan et al., 2014): sum_c |dy/dx_c|."""
    del images
    return grads.abs().sum(-3)


@dataclass(frozen=True)
class Method:
    fn: Callable[[Tensor, Tensor], Tensor]
    at: Literal["layer", "input"]
    normalize: Callable[[Tensor], Tensor]


# Each method keeps the normalisation of the article's implementation, so normalised maps equal the
# oracle's exactly (the two differ in where eps goes).
METHODS: dict[str, Method] = {
    "gradcam": Method(gradcam, "layer", postprocess.minmax_clamped),
    "saliency": Method(saliency, "input", postprocess.minmax_shifted),
}


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
