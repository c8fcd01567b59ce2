"""One-hot cotangents, and the matcher that finds them again in a traced graph.

The K-class backward starts from `one_hot(classes)`; the ONNX export replaces each product of such a one-hot
with a weight matrix by the row gather it equals (`fastattr._export.passes`). The matcher lives here, beside
the ops it matches, so that a change to one is a change to the other.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

__all__ = ["one_hot", "one_hot_classes"]


def one_hot(classes: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """`[N, K]` class indices -> `[K, N, num_classes]` one-hot cotangents (traceable, unlike F.one_hot, whose
    range check reads data).

    >>> one_hot(torch.tensor([[2]]), 4, torch.float32)
    tensor([[[0., 0., 1., 0.]]])
    """
    return (classes.T[..., None] == torch.arange(num_classes, device=classes.device)).to(dtype)


def one_hot_classes(node: fx.Node) -> fx.Node | None:
    """`classes [..., 1]` if `node` is the aten trace of `one_hot`'s comparison, `classes == arange(n)`; else None."""
    if not (isinstance(node, fx.Node) and node.target is torch.ops.aten.eq.Tensor):
        return None
    classes, arange = node.args
    if not (isinstance(arange, fx.Node) and arange.target is torch.ops.aten.arange.default and len(arange.args) == 1):
        return None
    value = classes.meta.get("val")
    return classes if value is not None and value.ndim and value.shape[-1] == 1 else None
