"""Noisy linear imputation (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML 2022): the removed pixels of an image take the values that make each of
them the weighted mean of its eight neighbours, solved jointly, plus a little noise. ROAD (`fastattr.metrics.road`)
removes pixels this way so that the model cannot tell from the hole's shape alone which pixels were removed.

For a removed pixel i with neighbours j inside the image, edge neighbours weighing 1/6 and diagonal ones 1/12:

    sum_j w_ij * x_i - sum_{j removed} w_ij * x_j = sum_{j kept} w_ij * image_j

The authors' code (and pytorch-grad-cam's copy of it) builds this sparse system per image and channel in scipy
and solves it on the host. Here it is solved for a whole batch at once on the images' device by conjugate
gradients, the system applied as a 3x3 convolution: the matrix is symmetric (w_ij = w_ji) and positive definite
on every removed region that touches a kept pixel. A removed region that touches none has no kept value to
spread and becomes 0.

>>> removed = maps >= maps.flatten(1).quantile(0.8, dim=1).view(-1, 1, 1, 1)     # doctest: +SKIP
>>> filled = noisy_linear_imputation(images, removed, noise=0.01)               # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

__all__ = ["NEIGHBOUR_WEIGHTS", "noisy_linear_imputation"]

# The ROAD authors' weights of the eight neighbours: 1/6 for the four that share an edge, 1/12 for the diagonals.
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12),
                     (1 / 6, 0.0, 1 / 6),
                     (1 / 12, 1 / 6, 1 / 12))


def noisy_linear_imputation(images: Tensor, removed: Tensor, *, noise: float = 0.01,
                            generator: torch.Generator | None = None, tolerance: float | None = None,
                            max_iterations: int | None = None) -> Tensor:
    """The images `[B, C, H, W]` with the pixels where `removed` (`[B, 1, H, W]` or `[B, H, W]`, bool or 0/1) is
    set replaced by their linear imputation plus `noise` times a standard normal draw (from `generator`, on the images' device); the
    kept pixels are unchanged. Each channel is its own system with the same matrix.

    tolerance: the relative residual ||b - Ax|| / ||b|| at which an image's system counts as solved (default
        1e-6 in float32, 1e-10 in float64); max_iterations: at most this many conjugate-gradient steps (default
        4 * (H + W), above what an image's largest hole needs).

    >>> x = torch.zeros(1, 1, 3, 3); x[0, 0, 0] = 12.0                       # the top row 12, the rest 0
    >>> noisy_linear_imputation(x, torch.tensor([[[0, 0, 0], [0, 1, 0], [0, 0, 0]]]), noise=0.0)[0, 0, 1, 1]
    tensor(4.)
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise InputError(f"images: expected a float tensor [B, C, H, W], got {list(images.shape)} {images.dtype}")
    removed = removed.unsqueeze(1) if removed.ndim == 3 else removed
    if removed.ndim != 4 or removed.shape[1] != 1 or removed.shape[0] != images.shape[0] \
            or removed.shape[-2:] != images.shape[-2:]:
        raise InputError(f"removed: expected a mask [B, 1, H, W] matching the images {list(images.shape)}, got "
                         f"{list(removed.shape)}")
    b, c, h, w = images.shape
    tolerance = (1e-10 if images.dtype == torch.float64 else 1e-6) if tolerance is None else tolerance
    max_iterations = 4 * (h + w) if max_iterations is None else max_iterations
    out = removed.to(images.dtype)
    kept = 1 - out
    weights = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=images.dtype, device=images.device).expand(c, 1, 3, 3)

    def spread(x: Tensor) -> Tensor:  # sum_j w_ij x_j over the neighbours inside the image (zero padding)
        return F.conv2d(x, weights, padding=1, groups=c)

    # sum_j w_ij over the neighbours inside the image: 1 inside, less at the borders.
    inside = spread(torch.ones(1, c, h, w, dtype=images.dtype, device=images.device))

    def system(x: Tensor) -> Tensor:  # A x, on the removed pixels
        return out * (inside * x - spread(out * x))

    rhs = out * spread(kept * images)
    solution = _conjugate_gradients(system, rhs, out * inside, tolerance, max_iterations)
    filled = kept * images + out * solution
    if noise:
        draw = torch.randn(images.shape, dtype=images.dtype, device=images.device, generator=generator)
        filled = filled + noise * out * draw
    return filled


def _conjugate_gradients(system, rhs: Tensor, diagonal: Tensor, tolerance: float, max_iterations: int) -> Tensor:
    """Jacobi-preconditioned conjugate gradients for every (image, channel) system of the batch at once, from
    x = 0. Convergence is read on the host every `_CHECK_EVERY` steps only, to keep the device busy between."""
    inverse = torch.where(diagonal > 0, 1 / diagonal.clamp_min(1e-30), torch.zeros_like(diagonal))

    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum((2, 3), keepdim=True)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = inverse * r
    p = z.clone()
    rz = dot(r, z)
    goal = (tolerance ** 2) * dot(rhs, rhs)
    for step in range(max_iterations):
        ap = system(p)
        pap = dot(p, ap)
        # A system already solved (or with nothing to solve) has rz = 0: its step is 0, not 0/0.
        alpha = torch.where(pap > 0, rz / pap.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(pap))
        x = x + alpha * p
        r = r - alpha * ap
        if step % _CHECK_EVERY == _CHECK_EVERY - 1 and bool((dot(r, r) <= goal).all()):
            break
        z = inverse * r
        rz_next = dot(r, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(rhs.dtype).tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_next
    return x


_CHECK_EVERY = 8
