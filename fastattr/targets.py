"""What to explain: the one place where `classes=` and `k=` are read, and the targets beyond a class logit.

A target is a pure function of the model's output giving M scores per image, `[N, M]`; pass it as an
Explainer's `output=`. The engine differentiates the scores `classes=` or `k=` pick from it with the same one
forward and K-cotangent backward as class logits (the logits are the default target). Built in:

- `segmentation(mask=None)`: `[N, C, H, W]` class maps (or torchvision's `{"out": ...}`) -> class c's score
  summed over the pixels whose argmax is c, or over a mask you give;
- `multilabel`: sigmoid probabilities of independent labels; `k=Above(0.5)` explains every label above 0.5;
- `similarity(reference)`: an embedding `[N, D]` -> cosine similarity to each reference embedding `[R, D]`;
- `boxes(named, labels)`: a detector's per-image boxes -> the score of the predicted box matching each named one;
- `detections(k)`: a detector's per-image boxes -> the scores of its k highest-scoring detections;
- any callable `output -> [N, M]` you write.

Accepted `classes=` / `k=` forms, for a batch of N images and a target with `num_classes` (M) outputs:

- ``classes=None, k=None``: the top-1 class of each image;
- ``classes=None, k=K``: the top-K classes of each image, in descending order of logit;
- ``classes=c`` (an int): class c for every image;
- ``classes=[c1, c2, ...]`` (a list or tuple of ints): the same classes for every image;
- ``classes=tensor[N]``: one class per image;  ``classes=tensor[N, K]``: K classes per image;
- ``k=Above(t)``: every output whose score exceeds t, K the most any image of the batch has; an image with
  fewer is padded with its next-highest outputs, and `Explanation.real` says which entries passed.

numpy integers and integer arrays are taken as the ints and tensors they are.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
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


@dataclass(frozen=True)
class Above:
    """`k=Above(threshold)`: explain, for each image, every output whose score exceeds `threshold`.

    The scores are the target's (for `multilabel`, probabilities). K is the most outputs any image of the batch
    has above the threshold (at least 1); an image with fewer is padded with its next-highest outputs, and
    `Explanation.real [N, K]` is False on those. Deciding K takes the scores first: one forward without
    autograd more than a fixed `k`.

    >>> out = fastattr.Explainer(model, output=fastattr.targets.multilabel)(images, k=Above(0.5))  # doctest: +SKIP
    >>> out.classes[out.real]                   # the labels above 0.5, image by image   # doctest: +SKIP
    """

    threshold: float
    at_most: int | None = None  # the most classes per image (the highest), None for all above the threshold

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not torch.isfinite(torch.tensor(float(self.threshold))):
            raise TargetError(f"k=Above(threshold): the threshold must be a finite number, got {self.threshold!r}")
        if self.at_most is not None and (isinstance(self.at_most, bool) or not isinstance(self.at_most, int)
                                         or self.at_most < 1):
            raise TargetError(f"k=Above(threshold, at_most): at_most must be an int >= 1 or None, got {self.at_most!r}")


def passing(scores: Tensor, threshold: float, at_most: int | None = None) -> tuple[Tensor, Tensor]:
    """`(classes [N, K], real [N, K])` for `k=Above(threshold, at_most)`: each image's outputs in descending order
    of score, K the most any image has above `threshold` (at least 1, at most `at_most`), `real` True where the
    score exceeds it."""
    k = max(1, int((scores > threshold).sum(1).max()))
    k = k if at_most is None else min(k, at_most)
    top = scores.topk(k, dim=1)
    return top.indices, top.values > threshold


def multilabel(logits: Tensor) -> Tensor:
    """Multi-label target: each label's probability, sigmoid(z_c), for a model scoring independent labels.

    Explaining sigmoid(z_c) rather than z_c scales each gradient by sigmoid'(z_c) > 0, so min-max normalised maps
    are those of the logit; the difference is `k=Above(t)`, which reads probabilities.

    >>> explainer = fastattr.Explainer(tagger, output=fastattr.targets.multilabel)   # doctest: +SKIP
    >>> out = explainer(images, k=fastattr.targets.Above(0.5))                        # doctest: +SKIP
    """
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise TargetError(f"multilabel: expects the model's label logits [N, labels], got "
                          f"{list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    return torch.sigmoid(logits)


def segmentation(mask: Tensor | None = None, key: str = "out") -> Callable[[Any], Tensor]:
    """Segmentation target: class c's score summed over a region, `s_c = sum_ij y_c(i, j) * M_c(i, j)`, for a
    model returning class maps `y [N, C, H, W]` (or a dict holding them under `key`, as torchvision's FCN,
    DeepLabV3 and LR-ASPP do).

    `M_c` is, by default, the pixels whose argmax is c (pytorch-grad-cam's tutorial target); with `mask [H, W]`
    (bool or weights, at the output's size) it is that mask for every class and image, as pytorch-grad-cam's
    `SemanticSegmentationTarget`. The argmax is a constant of the backward, as there.

    >>> explainer = fastattr.Explainer(deeplab, "backbone.layer4", output=fastattr.targets.segmentation())  # doctest: +SKIP
    >>> out = explainer(images, k=5)            # the five classes with the largest summed score   # doctest: +SKIP
    """
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.dtype.is_complex:
            got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise TargetError(f"segmentation: mask must be a tensor [H, W] (bool or weights) at the output's size, "
                              f"got {got}")
        mask = mask.detach()

    def scores(out: Any) -> Tensor:
        maps = out[key] if isinstance(out, Mapping) else out
        if not isinstance(maps, Tensor) or maps.ndim != 4:
            got = list(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
            raise TargetError(f"segmentation: expects class maps [N, C, H, W] (or a dict with {key!r}), got {got}; "
                              "for another layout write a target output -> [N, M]")
        if mask is None:
            region = maps.argmax(1, keepdim=True) == torch.arange(maps.shape[1], device=maps.device).view(1, -1, 1, 1)
        elif tuple(mask.shape) != tuple(maps.shape[-2:]):
            raise TargetError(f"segmentation: mask is {list(mask.shape)} but the model's class maps are "
                              f"{list(maps.shape[-2:])}; give a mask [H, W] of the output's size")
        else:
            region = mask.to(maps.device)
        return (maps * region.to(maps.dtype)).sum((2, 3))

    return scores


def similarity(reference: Tensor) -> Callable[[Tensor], Tensor]:
    """Embedding target: cosine similarity of the model's embedding `e [N, D]` to each reference `r [R, D]` (or
    one `[D]`): `s_r = e . r / (|e| |r|)`, as pytorch-grad-cam's `SimilarityToConceptTarget`, batched over R
    references (another image's embedding, or a text embedding you computed).

    >>> explainer = fastattr.Explainer(encoder, "layer4", output=fastattr.targets.similarity(concepts))  # doctest: +SKIP
    >>> out = explainer(images, classes=[0, 1])   # maps for the first two concepts   # doctest: +SKIP
    """
    if not isinstance(reference, Tensor) or reference.ndim not in (1, 2) or not reference.is_floating_point():
        got = f"{list(reference.shape)} {reference.dtype}" if isinstance(reference, Tensor) else type(reference).__name__
        raise TargetError(f"similarity: reference must be a floating tensor [D] or [R, D], got {got}")
    references = reference.detach().reshape(-1, reference.shape[-1])

    def scores(embedding: Tensor) -> Tensor:
        if not isinstance(embedding, Tensor) or embedding.ndim != 2 or embedding.shape[1] != references.shape[1]:
            got = list(embedding.shape) if isinstance(embedding, Tensor) else type(embedding).__name__
            raise TargetError(f"similarity: the model's embedding is {got}, the references [R, D] are "
                              f"{list(references.shape)}; give references of the embedding's size D")
        return F.cosine_similarity(embedding.unsqueeze(1), references.to(embedding).unsqueeze(0), dim=-1)

    return scores


def boxes(named: Tensor, labels: Sequence[int] | Tensor, iou: float = 0.5, plus_iou: bool = False) -> Callable[[Any], Tensor]:
    """Detection target: for each named box m (`named [M, 4]`, x1 y1 x2 y2 in the input's pixels, with
    `labels[m]`), the classification score of the detector's predicted box that overlaps it most, for a detector
    returning one dict of `boxes`, `labels`, `scores` per image (torchvision's Faster R-CNN, RetinaNet, FCOS, SSD).

    `s_m = score(b*)`, `b* = argmax_b IoU(b, named_m)`, which must carry `labels[m]` and overlap by more than `iou`;
    `plus_iou=True` adds `IoU(b*, named_m)` (whose gradient runs through the box regression), which is
    pytorch-grad-cam's `FasterRCNNBoxScoreTarget` for one box. Where it gives 0 to a box with no match, fastattr
    raises `TargetError` in the forward, before any backward. The named boxes are shared by the batch (explain
    images with different boxes in separate calls); torchvision's detectors cannot be traced, so they run on the
    eager hook path and are neither compiled nor exported.

    >>> explainer = fastattr.Explainer(detector, "backbone.body", output=fastattr.targets.boxes(b, [1]))  # doctest: +SKIP
    >>> out = explainer(image)                  # Grad-CAM of the score of the box matching b   # doctest: +SKIP
    """
    named = torch.as_tensor(named).detach()
    labels = torch.as_tensor(labels).detach().reshape(-1)
    if named.ndim == 1:
        named = named[None]
    if named.ndim != 2 or named.shape[-1] != 4 or not named.is_floating_point() or len(named) == 0:
        raise TargetError(f"boxes: named boxes must be a floating tensor [M, 4] (x1, y1, x2, y2), got "
                          f"{list(named.shape)} {named.dtype}")
    if labels.shape[0] != named.shape[0] or labels.dtype.is_floating_point:
        raise TargetError(f"boxes: give one integer label per named box, got {labels.tolist()} for {len(named)} boxes")
    if not 0 < iou < 1:
        raise TargetError(f"boxes: iou must be in (0, 1), got {iou}")

    def scores(detections: Any) -> Tensor:
        from torchvision.ops import box_iou

        _check_detections(detections, "boxes")
        rows = []
        for i, d in enumerate(detections):
            overlap = box_iou(named.to(d["boxes"]), d["boxes"])            # [M, D]
            row = []
            for m in range(len(named)):
                best = int(overlap[m].argmax()) if overlap.shape[1] else None
                if best is None or overlap[m, best] <= iou or int(d["labels"][best]) != int(labels[m]):
                    found = "no box" if best is None else \
                        f"box {d['boxes'][best].tolist()} of label {int(d['labels'][best])} at IoU {float(overlap[m, best]):.2f}"
                    raise TargetError(f"boxes: named box {m} {named[m].tolist()} of label {int(labels[m])} has no predicted "
                                      f"box of that label above IoU {iou} in image {i} (the closest: {found}); check "
                                      "the box's coordinates (input pixels, x1 y1 x2 y2) and label, or lower iou")
                row.append(d["scores"][best] + (overlap[m, best] if plus_iou else 0))
            rows.append(torch.stack(row))
        return torch.stack(rows)

    scores.not_exportable = _NOT_EXPORTABLE
    return scores


def detections(k: int) -> Callable[[Any], Tensor]:
    """Detection target: the scores of each image's `k` highest-scoring detections, `[N, k]` in descending order,
    for a detector returning one dict of `boxes`, `labels`, `scores` per image: "explain each of the top-k
    detections" from the one forward that finds them (which boxes they are is a constant of the backward, as the
    argmax region of `segmentation`). Read the boxes and labels from a plain forward (the same detections).

    >>> explainer = fastattr.Explainer(detector, "backbone.body.layer4", output=fastattr.targets.detections(5))  # doctest: +SKIP
    >>> out = explainer(image, k=5)             # a map per detection, the first the highest-scoring  # doctest: +SKIP
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TargetError(f"detections: k must be an int >= 1, got {k!r}")

    def scores(outputs: Any) -> Tensor:
        _check_detections(outputs, "detections")
        for i, d in enumerate(outputs):
            if len(d["scores"]) < k:
                which = f"image {i}" if len(outputs) > 1 else "the image"
                raise TargetError(f"detections: {which} has {len(d['scores'])} detections above the detector's score "
                                  f"threshold, fewer than the {k} this target scores; make it with a smaller k "
                                  "(--k, or a server's --max-k), or lower the detector's threshold (box_score_thresh "
                                  "or score_thresh in torchvision)")
        return torch.stack([d["scores"].topk(k).values for d in outputs])

    scores.not_exportable = _NOT_EXPORTABLE
    return scores


def winning_pixels(out: Any, classes: Tensor, key: str = "out") -> Tensor:
    """`[N, K, H, W]` bool: the pixels whose argmax is each explained class, the region `segmentation()` sums
    over (for outlines)."""
    maps = out[key] if isinstance(out, Mapping) else out
    return maps.argmax(1, keepdim=True) == classes[:, :, None, None].to(maps.device)


def top_detections(outputs: Any, k: int) -> list[dict[str, Tensor]]:
    """Per image, the `k` highest-scoring detections `detections(k)` explains, in its order: boxes `[k, 4]`,
    labels `[k]`, scores `[k]`."""
    _check_detections(outputs, "detections")
    picked = []
    for d in outputs:
        order = d["scores"].topk(min(k, len(d["scores"]))).indices
        picked.append({name: d[name][order] for name in ("boxes", "labels", "scores")})
    return picked


def _check_detections(outputs: Any, name: str) -> None:
    if not isinstance(outputs, (list, tuple)) or not all(
            isinstance(d, Mapping) and {"boxes", "labels", "scores"} <= d.keys() for d in outputs):
        raise TargetError(f"{name}: expects a detector's output, one dict of boxes, labels and scores per image, got "
                          f"{type(outputs).__name__}")


# Read by the exporters: a detector's forward depends on the data (its proposals, NMS, a loop per image and box),
# so a trace would hold one image's detections as constants.
_NOT_EXPORTABLE = ("a detection target cannot be exported: the detector's proposals, non-maximum suppression and box "
                   "matching depend on each image, which a traced graph would fix to the example's; explain detectors "
                   "with fastattr.Explainer")


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
