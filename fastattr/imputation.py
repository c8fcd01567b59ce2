"""Noisy linear imputation (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML 2022): the removed pixels of an image take the values that make each of
them the weighted mean of its eight neighbours, solved jointly, plus a little noise. ROAD (`fastattr.metrics.road`)
removes pixels this way so that the model cannot tell from the hole's shape alone which pixels were removed.

For a removed pixel i with neighbours j inside the image, edge neighbours weighing 1/6 and diagonal ones 1/12:

    sum_j w_ij * x_i - sum_{j removed} w_ij * x_j = sum_{j kept} w_ij * image_j

The authors' code (and pytorch-grad-cam's copy of it) builds this sparse system per image and channel in scipy
and solves it on the host. Here it is solved for a whole batch at once on the images' device by conjugate
gradients preconditioned by a geometric multigrid V-cycle, the system applied as a 3x3 convolution: the matrix is
symmetric (w_ij = w_ji) and positive definite as long as a kept pixel remains. An image with every pixel removed
has no kept value to spread and becomes 0.

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
                            max_iterations: int = 200) -> Tensor:
    """The images `[B, C, H, W]` with the pixels where `removed` (`[B, 1, H, W]` or `[B, H, W]`, bool or 0/1) is
    set replaced by their linear imputation plus `noise` times a standard normal draw (from `generator`, on the
    images' device); the kept pixels are unchanged. Each channel is its own system with the same matrix.

    tolerance: the relative residual ||b - Ax|| / ||b|| at which an image's system counts as solved (default
        1e-6 in float32, 1e-10 in float64); max_iterations: at most this many preconditioned conjugate-gradient
        steps (about ten reach 1e-6 on a 224x224 image with 90 % of it removed).

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
    tolerance = (1e-10 if images.dtype == torch.float64 else 1e-6) if tolerance is None else tolerance
    out = removed.to(images.dtype).expand_as(images).contiguous(memory_format=torch.channels_last)
    kept = 1 - out
    levels = _levels(out)
    solution = _solve(levels, out * levels[0].spread(kept * images), tolerance, max_iterations)
    filled = kept * images + out * solution
    if noise:
        draw = torch.randn(images.shape, dtype=images.dtype, device=images.device, generator=generator)
        filled = filled + noise * out * draw
    return filled


class _Level:
    """The system on one grid: `out` marks the unknown pixels (1); `diagonal` is sum_j w_ij over the neighbours
    inside the grid (1, less at the borders) on the unknowns, 0 elsewhere."""

    def __init__(self, out: Tensor):
        self.out = out
        c = out.shape[1]
        self.weights = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=out.dtype, device=out.device).expand(c, 1, 3, 3)
        self.diagonal = out * self.spread(torch.ones_like(out[:1]))
        self.damped_inverse = _DAMPING * out / self.diagonal.clamp_min(torch.finfo(out.dtype).tiny)

    def spread(self, x: Tensor) -> Tensor:  # sum_j w_ij x_j over the neighbours inside the grid (zero padding)
        # Channels-last: the depthwise 3x3 convolution is several times faster so on CPU, and the
        # elementwise work around it keeps the layout.
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), self.weights, padding=1, groups=x.shape[1])

    def apply(self, x: Tensor) -> Tensor:
        """A x for an x that is 0 off the unknowns (every iterate, residual and direction here is)."""
        return torch.addcmul(self.diagonal * x, self.out, self.spread(x), value=-1)

    def sweep(self, x: Tensor, r: Tensor) -> Tensor:
        """One damped Jacobi sweep for A x = r."""
        return torch.addcmul(x, self.damped_inverse, r - self.apply(x))


def _levels(out: Tensor) -> list[_Level]:
    """The grids of the multigrid, each half the last: a coarse pixel is unknown when its four fine pixels all
    are, so a coarse correction never reaches past a kept pixel."""
    levels = [_Level(out)]
    while min(out.shape[-2:]) > _COARSEST:
        out = -F.max_pool2d(-out, 2, ceil_mode=True)
        levels.append(_Level(out))
    return levels


def _v_cycle(levels: list[_Level], r: Tensor, depth: int = 0) -> Tensor:
    """One multigrid V-cycle for A x = r from x = 0: damped Jacobi sweeps before and after the coarse correction
    (the residual summed over each 2x2 block, the correction copied back to it: prolongation = restriction^T, so
    the cycle is symmetric and preconditions conjugate gradients). The same 3x3 stencil on a grid twice as coarse
    is four times the fine one on smooth functions, which summing rather than averaging the residual accounts for."""
    level = levels[depth]
    x = torch.zeros_like(r)
    sweeps = _COARSEST_SWEEPS if depth == len(levels) - 1 else _SWEEPS
    for _ in range(sweeps):
        x = level.sweep(x, r)
    if depth == len(levels) - 1:
        return x
    coarse = F.avg_pool2d(r - level.apply(x), 2, ceil_mode=True, divisor_override=1)
    h, w = r.shape[-2:]
    correction = _v_cycle(levels, coarse, depth + 1).repeat_interleave(2, -2).repeat_interleave(2, -1)
    x = torch.addcmul(x, level.out, correction[..., :h, :w])
    for _ in range(sweeps):
        x = level.sweep(x, r)
    return x


def _solve(levels: list[_Level], rhs: Tensor, tolerance: float, max_iterations: int) -> Tensor:
    """Conjugate gradients preconditioned by a multigrid V-cycle, for every (image, channel) system of the batch at
    once, from x = 0. A system with nothing to solve (rhs 0: every pixel removed) keeps x = 0."""
    level = levels[0]

    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum((2, 3), keepdim=True)

    def ratio(a: Tensor, b: Tensor) -> Tensor:  # a / b, 0 where b is 0 (a solved system's step)
        return torch.where(b > 0, a / b.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(b))

    x, r = torch.zeros_like(rhs), rhs.clone()
    z = _v_cycle(levels, r)
    p, rz = z, dot(r, z)
    goal = (tolerance ** 2) * dot(rhs, rhs)
    for _ in range(max_iterations):
        ap = level.apply(p)
        alpha = ratio(rz, dot(p, ap))
        x, r = x + alpha * p, r - alpha * ap
        if bool((dot(r, r) <= goal).all()):  # one host read a step: about ten steps, each a whole V-cycle
            break
        z = _v_cycle(levels, r)
        rz, rz_last = dot(r, z), rz
        p = z + ratio(rz, rz_last) * p
    return x


_COARSEST = 8           # grids coarsen while both sides are longer than this
_SWEEPS = 2             # damped Jacobi sweeps before and after each coarse correction
_COARSEST_SWEEPS = 30   # on the coarsest grid, in place of a solve
_DAMPING = 0.8
