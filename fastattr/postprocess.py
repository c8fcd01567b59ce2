"""Post-processing of maps `[N, K, h, w]`: upsampling and per-map min-max normalisation, in torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of `[N, K, h, w]` maps to `size`, a no-op when the size already matches."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _extrema(maps: Tensor) -> tuple[Tensor, Tensor]:
    flat = maps.flatten(-2)
    return flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]


def minmax_clamped(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """(m - min) / max(max - min, eps) per map: the article's Grad-CAM normalisation."""
    lo, hi = _extrema(maps)
    return (maps - lo) / (hi - lo).clamp_min(eps)


def minmax_shifted(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """(m - min) / (max - min + eps) per map: the article's saliency normalisation."""
    lo, hi = _extrema(maps)
    # eps as a [1, 1, 1, 1] tensor, not a scalar: onnxscript's optimiser drops `x + c` for a scalar c within 1e-8
    # of 0, so an exported flat map would become 0 / 0.
    return (maps - lo) / (hi - lo + torch.full((1,) * maps.ndim, eps, dtype=maps.dtype, device=maps.device))
