"""Batches of checked requests: at most two passes, then one answer per request.

Batching is exact: the requests of a batch run in at most two passes, one for the top-k requests (at the
largest k among them: a top-k list is a prefix of a longer one) and one for those naming classes (each row
padded to the longest by repeating its last class), and each answer is what the pipeline returns for that
image alone. A batch holds at most `batch_size` requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import images as _images, methods as _methods
from ..errors import TargetError
from ..pipeline import Pipeline

__all__ = ["Query", "Answer", "answer_batch", "batch_size"]


@dataclass(frozen=True)
class Query:
    """What one request asks for: the top-`k` (classes None) or the named `classes` (k = their count)."""

    k: int
    classes: tuple[int, ...] | None
    methods: tuple[str, ...]
    maps: str
    normalized: bool = False  # the image is normalised as the model expects (V2's FP32 input), not in [0, 1]


@dataclass(frozen=True)
class Answer:
    """One request's share of a batch: its logits `[C]`, classes `[K]` and maps (method -> `[K, H, W]`)."""

    logits: Tensor | None
    classes: Tensor | None
    maps: dict[str, Tensor]
    batch_size: int
    error: str | None = None  # why the target refused this image (a detector with fewer detections than asked)


def batch_size(pipeline: Pipeline, max_batch_size: int) -> int:
    """The most requests a server explains in one batch: `max_batch_size`, but at most the pipeline's `sample_batch`
    when it serves a method that multiplies each image (SmoothGrad, IG, the perturbation methods). Those run their
    copies in chunks of max(N, sample_batch) images on the eager backend, so a batch of more requests than
    sample_batch would make every chunk larger than the one that bounds the server's memory.

    >>> batch_size(build(Spec("resnet18", methods="gradcam, ig", sample_batch=4)), 16)   # doctest: +SKIP
    4
    """
    multiplies = _methods.sampled(pipeline.methods) + _methods.perturbed(pipeline.methods)
    return min(max_batch_size, pipeline.sample_batch) if multiplies else max_batch_size


def answer_batch(pipeline: Pipeline, items: Sequence[tuple[Tensor, Query]], fixed_k: int | None = None) -> list[Answer]:
    """Explain a batch of checked requests (display image `[3, S, S]` in [0, 1], or a normalised one where the
    query says so; Query) in at most two passes,
    each at `fixed_k` classes when given (an export's k, or a compiled server's max_k), else the largest asked.

    >>> top3, dog = Query(3, None, ("gradcam",), "png"), Query(1, (207,), ("gradcam",), "png")   # doctest: +SKIP
    >>> [a.classes.tolist() for a in answer_batch(pipeline, [(cat, top3), (cat, dog)])]   # doctest: +SKIP
    [[281, 285, 282], [207]]
    """
    images = torch.stack([image if query.normalized else _images.normalize(image[None], pipeline.mean, pipeline.std)[0]
                          for image, query in items])
    answers: list[Answer | None] = [None] * len(items)
    for named in (False, True):
        rows = [i for i, (_, query) in enumerate(items) if (query.classes is not None) == named]
        if not rows:
            continue
        queries = [items[i][1] for i in rows]
        k = fixed_k or pipeline.fixed_k or max(q.k for q in queries)
        table = torch.tensor([[*q.classes, *q.classes[-1:] * (k - q.k)] for q in queries]) if named else None
        try:
            parts = [(rows, pipeline(images[rows], table, None if named else k).cpu())]
        except TargetError:  # one image's target refused it: the others must not fail with it, so each alone
            parts = []
            for j, i in enumerate(rows):
                try:
                    parts.append(([i], pipeline(images[[i]], None if table is None else table[[j]],
                                                None if named else k).cpu()))
                except TargetError as exc:
                    answers[i] = Answer(None, None, {}, len(items), str(exc))
        for part_rows, out in parts:
            for j, i in enumerate(part_rows):
                query = items[i][1]
                answers[i] = Answer(out.logits[j], out.classes[j, :query.k],
                                    {m: out.maps[m][j, :query.k] for m in query.methods}, len(items))
    return answers  # type: ignore[return-value]
