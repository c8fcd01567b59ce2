"""Which classes to explain: the one place where `classes=` and `k=` are read.

Accepted forms, for a batch of N images and a model with `num_classes` outputs:

- ``classes=None, k=None``: the top-1 class of each image;
- ``classes=None, k=K``: the top-K classes of each image, in descending order of logit;
- ``classes=c`` (an int): class c for every image;
- ``classes=[c1, c2, ...]`` (a list or tuple of ints): the same classes for every image;
- ``classes=tensor[N]``: one class per image;  ``classes=tensor[N, K]``: K classes per image.

numpy integers and integer arrays are taken as the ints and tensors they are.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import TargetError

Classes = int | Sequence[int] | Tensor | None


@dataclass(frozen=True)
class Targets:
    """Explicit classes `[N, K]` (int64, on the images' device), or None to take the top-k of the logits."""

    classes: Tensor | None
    k: int


def resolve(classes: Classes, k: int | None, n: int, num_classes: int, device: torch.device) -> Targets:
    """Check `classes`/`k` against the batch size and the number of outputs; raise before any work."""
    if classes is not None and k is not None:
        raise TargetError(f"classes and k: got both (k={k}); pass classes= to name them or k= for the top-k, not both")
    classes = _from_numpy(classes)
    if classes is None:
        k = 1 if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
            raise TargetError(f"k: must be an int in 1..{num_classes} (the model has {num_classes} outputs), got {k!r}")
        return Targets(None, k)

    if isinstance(classes, Tensor):
        if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
            raise TargetError(f"classes: must be an integer tensor, got dtype {classes.dtype}; use classes.long()")
        if classes.ndim == 0:
            table = classes.reshape(1, 1).expand(n, 1)
        elif classes.ndim == 1:
            if classes.shape[0] != n:
                raise TargetError(
                    f"classes: a 1-D tensor gives one class per image, so needs {n} entries for {n} images, "
                    f"got {classes.shape[0]}; pass a list to share classes across the batch")
            table = classes[:, None]
        elif classes.ndim == 2:
            if classes.shape[0] != n or classes.shape[1] == 0:
                raise TargetError(f"classes: a 2-D tensor must be [N={n}, K>=1], got {list(classes.shape)}")
            table = classes
        else:
            raise TargetError(f"classes: expected a tensor [N] or [N, K], got shape {list(classes.shape)}")
    elif _is_index(classes):
        table = torch.tensor([[int(classes)]]).expand(n, 1)
    elif isinstance(classes, Sequence) and not isinstance(classes, str):
        if not classes or not all(map(_is_index, classes)):
            raise TargetError(f"classes: a list must hold at least one int class index, got {classes!r}")
        table = torch.tensor([[int(c) for c in classes]]).expand(n, len(classes))
    else:
        raise TargetError(f"classes: expected None, an int, a list of ints or an integer tensor, got {type(classes).__name__}")

    bad = (table < 0) | (table >= num_classes)
    if bool(bad.any()):
        first = int(table[bad][0])
        raise TargetError(
            f"classes: index {first} out of range for a model with {num_classes} outputs (valid 0..{num_classes - 1})")
    return Targets(table.to(device=device, dtype=torch.long).contiguous(), table.shape[1])


def _is_index(value: Any) -> bool:
    # Python's and numpy's integers alike (numpy registers its integer types as numbers.Integral, not its bool).
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _from_numpy(classes: Any) -> Any:
    """A numpy array as the tensor it is (its dtype checked as a tensor's); anything else as it is."""
    if type(classes).__module__ == "numpy" and hasattr(classes, "ndim") and classes.ndim > 0:
        import numpy as np

        try:
            return torch.as_tensor(np.ascontiguousarray(classes))
        except (TypeError, ValueError) as exc:
            raise TargetError(f"classes: a numpy array of dtype {classes.dtype} is not a tensor of class indices "
                              f"({exc}); pass integers") from None
    return classes
