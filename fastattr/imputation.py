"""Noisy linear imputation (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation
Strategy for Attribution Methods", ICML 2022): the removed pixels of an image take the values that make each of
them the weighted mean of its eight neighbours, solved jointly, plus a little noise. ROAD (`fastattr.metrics.road`)
removes pixels this way so that the model cannot tell from the hole's shape alone which pixels were removed.

For a removed pixel i with neighbours j inside the image, edge neighbours weighing 1/6 and diagonal ones 1/12:

    sum_j w_ij * x_i - sum_{j removed} w_ij * x_j = sum_{j kept} w_ij * image_j

The authors' code (and pytorch-grad-cam's copy of it) builds this sparse system per image and channel in scipy
and solves it on the host. Here it is solved for a whole batch at once on the images' device by conjugate
gradients preconditioned by a geometric multigrid V-cycle (Jacobi sweeps, a direct solve on a small coarsest
grid), the system applied as a 3x3 convolution: the matrix is symmetric (w_ij = w_ji) and positive definite as
long as a kept pixel remains. An image with every pixel removed has no kept value to spread and becomes 0.

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
        1e-4 in float32, where the float32 solution is within twice the distance from the float64 one that no
        tolerance gets below, and 1e-10 in float64: benchmarks/results/road-imputation.md); max_iterations: at
        most this many preconditioned conjugate-gradient steps (each a V-cycle; the results file has the counts).

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
    tolerance = (1e-10 if images.dtype == torch.float64 else 1e-4) if tolerance is None else tolerance
    mask = removed.to(images.dtype)
    out = _as_systems(mask.expand_as(images))
    levels = _levels(out)
    solution = _solve(levels, out * levels[0].spread((1 - out) * _as_systems(images)), tolerance, max_iterations)
    filled = (1 - mask) * images + mask * solution.view(images.shape)
    if noise:
        draw = torch.randn(images.shape, dtype=images.dtype, device=images.device, generator=generator)
        filled = filled + noise * mask * draw
    return filled


def _as_systems(x: Tensor) -> Tensor:
    """`[B, C, H, W]` as the `B * C` channels of one channels-last image `[1, B * C, H, W]`: every (image, channel)
    system is solved at once, and on CPU the depthwise stencil, and still more the pooling and the upsampling,
    run faster with many channels than with an image's three (benchmarks/results/road-imputation.md)."""
    return x.reshape(1, -1, *x.shape[-2:]).contiguous(memory_format=torch.channels_last)


class _Level:
    """The system on one grid, every tensor channels-last (the depthwise 3x3 convolution is several times faster
    so on CPU): `out` marks the unknown pixels (1); `diagonal` is sum_j w_ij over the neighbours inside the grid
    (1, less at the borders) on the unknowns, `inverse` its inverse there, both 0 elsewhere.

    Every vector here (iterate, residual, direction) is 0 off the unknowns. The work is written in place on the
    stencil's fresh output where it can be: on CPU a new fine-grid tensor for each elementwise step cost more than
    the step itself (allocation and first-touch page faults), which made the solve dearer than the forwards it
    feeds (benchmarks/results/road-imputation.md has the solve's time now)."""

    def __init__(self, out: Tensor):
        self.out = out
        c = out.shape[1]
        self.weights = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=out.dtype, device=out.device).expand(c, 1, 3, 3)
        self.diagonal = out * self.spread(torch.ones_like(out))
        self.inverse = out / self.diagonal.clamp_min(torch.finfo(out.dtype).tiny)
        self.minus_out = -out
        self.inverse_matrix: Tensor | None = None

    def spread(self, x: Tensor) -> Tensor:
        """sum_j w_ij x_j over the neighbours inside the grid (zero padding): a new tensor."""
        return F.conv2d(x, self.weights, padding=1, groups=x.shape[1])

    def apply(self, x: Tensor) -> Tensor:
        """A x = diagonal x - out spread(x)."""
        return self.spread(x).mul_(self.minus_out).addcmul_(self.diagonal, x)

    def residual(self, r: Tensor, x: Tensor) -> Tensor:
        """r - A x."""
        return self.spread(x).mul_(self.out).add_(r).addcmul_(self.diagonal, x, value=-1)

    def smooth(self, x: Tensor | None, inverse_r: Tensor, sweeps: int) -> Tensor:
        """`sweeps` Jacobi sweeps x <- D^-1 (r + spread(x)) from x (None: 0, whose first sweep is D^-1 r), given
        D^-1 r. Jacobi without damping: the stencil's high frequencies have D^-1 W within [-1/3, 1/3], which an
        undamped sweep reduces most."""
        if x is None:  # the first sweep from 0; a copy if it is the only one, since callers add into x
            x, sweeps = (inverse_r if sweeps > 1 else inverse_r.clone()), sweeps - 1
        for _ in range(sweeps):
            x = self.spread(x).mul_(self.inverse).add_(inverse_r)
        return x

    def factor(self) -> None:
        """Makes `solve` exact on this (coarsest) grid: A of each system (channel) as a dense matrix, the identity
        on the known pixels, inverted once, so a matrix product per cycle. Only for a grid of at most
        `_DIRECT` pixels; a larger coarsest grid (a long thin image) is smoothed by `_COARSEST_SWEEPS` sweeps."""
        h, w = self.out.shape[-2:]
        if h * w > _DIRECT:
            return
        out = self.out.reshape(-1, 1, h, w)  # one system a row
        n = out.shape[0]
        basis = out.unsqueeze(1) * torch.eye(h * w, dtype=out.dtype, device=out.device).view(1, h * w, 1, h, w)
        columns = torch.addcmul(self.diagonal.reshape(-1, 1, h, w).unsqueeze(1) * basis, out.unsqueeze(1),
                                F.conv2d(basis.flatten(0, 1), self.weights[:1], padding=1).unflatten(0, (n, h * w)),
                                value=-1)  # [n, m, 1, h, w]: A e_k
        matrix = columns.flatten(2).transpose(1, 2) + torch.diag_embed(1 - out.flatten(1))
        # A system whose every pixel is unknown is singular (the constants); its right-hand side is 0 (nothing
        # kept to spread), so a shift of one rounding error that makes every matrix invertible changes no answer.
        # Half precision has no inverse in torch: the matrix is inverted in float32 and used in the images' dtype.
        wide = torch.promote_types(out.dtype, torch.float32)
        shift = torch.finfo(wide).eps * torch.eye(h * w, dtype=wide, device=out.device)
        self.inverse_matrix = torch.linalg.inv(matrix.to(wide) + shift).to(out.dtype)

    def solve(self, r: Tensor) -> Tensor:
        if self.inverse_matrix is None:
            return self.smooth(None, self.inverse * r, _COARSEST_SWEEPS)
        m = self.inverse_matrix.shape[-1]
        return (self.inverse_matrix @ r.reshape(-1, m, 1)).view(r.shape) * self.out


def _levels(out: Tensor) -> list[_Level]:
    """The grids of the multigrid, each half the last, until a side is at most 8 (see `factor`): a
    coarse pixel is unknown when its four fine pixels all are, so a coarse correction never reaches past a kept
    pixel."""
    levels = [_Level(out)]
    while min(out.shape[-2:]) > _COARSEST:
        out = -F.max_pool2d(-out, 2, ceil_mode=True)
        levels.append(_Level(out.contiguous(memory_format=torch.channels_last)))
    levels[-1].factor()
    return levels


def _restrict(r: Tensor) -> Tensor:
    """Each 2x2 block of the fine grid summed into its coarse pixel (a grid of odd size padded with zeros)."""
    return F.avg_pool2d(r, 2, ceil_mode=True, divisor_override=1)


def _prolong(coarse: Tensor, h: int, w: int) -> Tensor:
    """Each coarse pixel copied to its 2x2 block of the h x w grid (the transpose of `_restrict`)."""
    ch, cw = coarse.shape[-2:]
    return F.interpolate(coarse, size=(2 * ch, 2 * cw), mode="nearest")[..., :h, :w]


def _v_cycle(levels: list[_Level], r: Tensor, depth: int = 0) -> Tensor:
    """One multigrid V-cycle for A x = r from x = 0: Jacobi sweeps before and after the coarse correction, a
    direct solve on the coarsest grid when it is small (`factor`). Restriction is the transpose of the
    prolongation and the sweeps are the same before and after, so the cycle is symmetric and preconditions
    conjugate gradients. The coarse grids keep the 3x3 stencil; on smooth functions it is four times the fine
    one's, which the restriction's weights, summing to 4 per coarse pixel, account for."""
    level = levels[depth]
    if depth == len(levels) - 1:
        return level.solve(r)
    inverse_r = level.inverse * r
    x = level.smooth(None, inverse_r, _SWEEPS)
    coarse = _restrict(level.residual(r, x)).mul_(levels[depth + 1].out)
    x = x.addcmul_(level.out, _prolong(_v_cycle(levels, coarse, depth + 1), *r.shape[-2:]))
    return level.smooth(x, inverse_r, _SWEEPS)


def _solve(levels: list[_Level], rhs: Tensor, tolerance: float, max_iterations: int) -> Tensor:
    """Conjugate gradients preconditioned by a multigrid V-cycle, for every (image, channel) system of the batch at
    once, from x = 0. A system with nothing to solve (rhs 0: every pixel removed) keeps x = 0."""
    level = levels[0]
    n, c, h, w = rhs.shape
    ones = torch.ones(1, 1, h * w, dtype=rhs.dtype, device=rhs.device)

    def dot(u: Tensor, v: Tensor) -> Tensor:
        """sum over pixels of u * v, one per system: a product with a row of ones, which on CPU runs twice as
        fast as `sum` over the pixels of a channels-last tensor (benchmarks/results/road-imputation.md)."""
        return (ones @ (u * v).permute(0, 2, 3, 1).reshape(n, h * w, c)).view(n, c, 1, 1)

    def ratio(a: Tensor, b: Tensor) -> Tensor:  # a / b, 0 where b is 0 (a solved system's step)
        return torch.where(b > 0, a / b.clamp_min(torch.finfo(b.dtype).tiny), torch.zeros_like(b))

    x, r = torch.zeros_like(rhs), rhs.clone()
    p = _v_cycle(levels, r)
    rz = dot(r, p)
    goal = (tolerance ** 2) * dot(rhs, rhs)
    for _ in range(max_iterations):
        ap = level.apply(p)
        alpha = ratio(rz, dot(p, ap))
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        if bool((dot(r, r) <= goal).all()):  # one host read a step, against a whole V-cycle
            break
        z = _v_cycle(levels, r)
        rz, rz_last = dot(r, z), rz
        p = z.addcmul_(ratio(rz, rz_last), p)
    return x


_COARSEST = 8           # grids coarsen while both sides are longer than this
_SWEEPS = 2             # Jacobi sweeps before and after each coarse correction
_DIRECT = 256           # the coarsest grid is solved exactly when it has at most this many pixels,
_COARSEST_SWEEPS = 30   # and smoothed by this many sweeps otherwise
