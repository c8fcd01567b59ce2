"""Faithfulness metrics: does a map point at what the model's score depends on? Each is a pure function of
(model, images, maps, classes), batched over images and classes, forward-only, its perturbed copies run in
chunks of `sample_batch` images (`graph.scores_of_copies`), so memory does not grow with the steps.

- `deletion` and `insertion` (Petsiuk et al., RISE, BMVC 2018): rank the pixels by the map, remove (or reveal)
  them in `steps` equal steps, and score the class after each; the curve and the area under it. A faithful map
  makes deletion's area small and insertion's large.
- `confidence_change`, `average_drop` and `increase_in_confidence` (Chattopadhay et al., Grad-CAM++, WACV 2018;
  pytorch-grad-cam's `CamMultImageConfidenceChange`, `DropInConfidence`, `IncreaseInConfidence`): the class
  score of the image multiplied by its [0, 1] map, against the image's own.
- `road` (Rong et al., ROAD, ICML 2022; pytorch-grad-cam's `ROADCombined`): remove the most (least) relevant
  pixels at several percentiles by noisy linear imputation (`fastattr.imputation`), which leaves no hole whose
  shape tells the model what was removed, and compare the score changes. Higher: more faithful.

`model` is any function images -> logits `[N, num_classes]` (a classifier in eval mode). Scores are softmax
probabilities unless `probability=False` (then logits). `maps [N, K, H, W]` and `classes [N, K]` are an
`Explanation`'s maps of one method and its classes.

>>> out = fastattr.Explainer(model, methods="gradcam")(images, k=3)            # doctest: +SKIP
>>> curve = fastattr.metrics.deletion(model, images, out.maps["gradcam"], out.classes, steps=16)  # doctest: +SKIP
>>> curve.scores.shape, curve.area.shape                # [N, 3, 17], [N, 3]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import InputError, TargetError, at_least
from .explain import SAMPLE_BATCH, check_eval_mode, check_finite
from .graph import scores_of_copies
from .imputation import noisy_linear_imputation

__all__ = ["Curve", "Road", "Evaluation", "METRICS", "CURVES", "deletion", "insertion", "confidence_change",
           "average_drop", "increase_in_confidence", "road", "evaluate", "evaluation", "parse_metrics"]

Baseline = float | Tensor | str


@dataclass(frozen=True)
class Curve:
    """A deletion or insertion curve: `scores [N, K, steps + 1]`, the class's score with 0, 1/steps, ..., all of
    the pixels removed (revealed), and `area [N, K]`, the trapezoid area under it over the fraction in [0, 1]."""

    scores: Tensor
    area: Tensor


def deletion(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, classes: Tensor, *, steps: int = 32,
             baseline: Baseline = 0.0, probability: bool = True, sample_batch: int = SAMPLE_BATCH) -> Curve:
    """Deletion (Petsiuk et al., 2018): after step s of `steps`, the round(s * H * W / steps) pixels the map
    ranks highest (ties: the first in raster order) take the baseline's value in every channel: `baseline` is
    a number, an image `[C, H, W]`, or "blur" (each image blurred, `blurred`). Lower area: more faithful.

    >>> deletion(model, images, out.maps["gradcam"], out.classes, steps=16).area   # [N, K]  # doctest: +SKIP
    """
    return _curve(model, images, maps, classes, steps, baseline, probability, sample_batch, reveal=False)


def insertion(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, classes: Tensor, *, steps: int = 32,
              baseline: Baseline = "blur", probability: bool = True, sample_batch: int = SAMPLE_BATCH) -> Curve:
    """Insertion (Petsiuk et al., 2018): start from the baseline (by default the image blurred, as the paper)
    and reveal the image's pixels in the map's order, round(s * H * W / steps) of them after step s. Higher
    area: more faithful."""
    return _curve(model, images, maps, classes, steps, baseline, probability, sample_batch, reveal=True)


def confidence_change(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, classes: Tensor, *,
                      probability: bool = True) -> Tensor:
    """`[N, K]`: score(image * map) - score(image) for each explained class, the map in [0, 1] multiplying
    every channel (pytorch-grad-cam's `CamMultImageConfidenceChange`)."""
    original, masked = _masked_scores(model, images, maps, classes, probability)
    return masked - original


def average_drop(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, classes: Tensor, *,
                 probability: bool = True) -> Tensor:
    """`[N, K]`: max(0, Y - O) / Y, Y the class's score on the image and O on the image times its map
    (Chattopadhay et al., 2018; the paper reports the mean over images, in percent). Lower: more faithful."""
    original, masked = _masked_scores(model, images, maps, classes, probability)
    return (original - masked).clamp_min(0) / original


def increase_in_confidence(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, classes: Tensor, *,
                           probability: bool = True) -> Tensor:
    """`[N, K]` bool: whether the image times its map scores higher than the image (Chattopadhay et al., 2018;
    the paper reports the fraction of images, in percent)."""
    original, masked = _masked_scores(model, images, maps, classes, probability)
    return masked > original


@dataclass(frozen=True)
class Road:
    """ROAD's score changes at each of `percentiles`: `most_relevant_first [N, K, P]`, score(copy) - score(image)
    with the pixels at or above the map's p-th percentile imputed (the top 100 - p %), `least_relevant_first
    [N, K, P]` with the pixels at or below its (100 - p)-th percentile imputed (the bottom 100 - p %), and
    `combined [N, K]` = (mean LeRF - mean MoRF) / 2 over the percentiles (pytorch-grad-cam's `ROADCombined`)."""

    percentiles: tuple[float, ...]
    most_relevant_first: Tensor
    least_relevant_first: Tensor
    combined: Tensor


ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def road(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor, classes: Tensor, *,
         percentiles: Sequence[float] = ROAD_PERCENTILES, noise: float = 0.01, seed: int = 0,
         probability: bool = True, sample_batch: int = SAMPLE_BATCH) -> Road:
    """ROAD, Remove And Debias (Rong et al., 2022): for each percentile p, the score change when the 100 - p %
    most relevant pixels of the map are removed (MoRF: a faithful map makes the score fall) and when the
    100 - p % least relevant are (LeRF: the score should hold), each removal filled by noisy linear imputation
    (`noise` times a standard normal draw, seeded by `seed`, the same whatever `sample_batch` is).

    The thresholds are those of pytorch-grad-cam's `RemoveMostRelevantFirst` / `RemoveLeastRelevantFirst`
    (MoRF removes map >= quantile(map, p), LeRF removes 1 - map >= quantile(1 - map, p)); every copy of every
    image, class and percentile is imputed and scored in chunks of `sample_batch` images, on the images' device.

    >>> r = road(model, images, out.maps["gradcam"], out.classes)              # doctest: +SKIP
    >>> r.combined.shape, r.most_relevant_first.shape     # [N, K], [N, K, 9]  # doctest: +SKIP
    """
    at_least("sample_batch", sample_batch, 1)
    at_least("noise", noise, 0, float)
    at_least("seed", seed, 0)
    percentiles = tuple(percentiles)
    if not percentiles or any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 100
                              for p in percentiles):
        raise InputError(f"percentiles: expected numbers strictly between 0 and 100, got {percentiles!r}")
    classes = _check(model, images, maps, classes)
    n, k = classes.shape
    h, w = images.shape[-2:]
    score = _scorer(model, probability)
    with torch.no_grad():
        original = score(images).gather(1, classes)  # [N, K]
    rows = images.repeat_interleave(k, 0)  # one row per (image, class), with its own map
    flat = maps.reshape(n * k, h * w).to(images.dtype)
    q = [p / 100 for p in percentiles]
    # Copy j < P removes the most relevant pixels at percentile j, copy P + j the least relevant.
    thresholds = torch.cat([_quantiles(flat, q), _quantiles(1 - flat, q)], 1)  # [NK, 2P]
    relevance = torch.stack([flat, 1 - flat], 1).view(n * k, 2, 1, h, w)
    count = 2 * len(percentiles)

    def copies(start: int, stop: int) -> Tensor:
        # Every copy of the chunk in one solve; copy j's noise from its own seed, so that the draws do not depend
        # on how the copies are chunked.
        removed = torch.stack([relevance[:, j // len(percentiles)] >= thresholds[:, j].view(-1, 1, 1, 1)
                               for j in range(start, stop)], 1)  # [NK, P, 1, H, W]
        filled = noisy_linear_imputation(rows.repeat_interleave(stop - start, 0), removed.flatten(0, 1), noise=0.0)
        filled = filled.unflatten(0, (n * k, stop - start))
        if noise:
            draws = torch.stack([torch.randn(rows.shape, dtype=rows.dtype, device=rows.device,
                                             generator=torch.Generator(rows.device).manual_seed(seed * 1_000_003 + j))
                                 for j in range(start, stop)], 1)
            filled = filled + noise * removed.to(rows.dtype) * draws
        return filled

    per_chunk = max(1, sample_batch // (n * k))
    changes = scores_of_copies(score, copies, count, classes.reshape(n * k, 1), per_chunk,
                               images=True).view(n, k, count)
    changes = changes - original.unsqueeze(-1)
    morf, lerf = changes[..., :len(percentiles)], changes[..., len(percentiles):]
    return Road(percentiles, morf, lerf, (lerf.mean(-1) - morf.mean(-1)) / 2)


# Each metric as one number per image and class, by name: what `evaluate` (and `fastattr explain --metrics`)
# reports. The curves give their areas.
METRICS: dict[str, Callable[..., Tensor]] = {
    "deletion": lambda model, x, maps, classes, steps: deletion(model, x, maps, classes, steps=steps).area,
    "insertion": lambda model, x, maps, classes, steps: insertion(model, x, maps, classes, steps=steps).area,
    "average-drop": lambda model, x, maps, classes, steps: average_drop(model, x, maps.clamp(0, 1), classes),
    "increase-in-confidence": lambda model, x, maps, classes, steps: increase_in_confidence(
        model, x, maps.clamp(0, 1), classes).to(x.dtype),
    "road": lambda model, x, maps, classes, steps: road(model, x, maps, classes).combined,
}


def parse_metrics(value: str | Sequence[str]) -> tuple[str, ...]:
    """Metric names from "deletion, insertion" or a sequence, checked.

    >>> parse_metrics("deletion, average-drop")
    ('deletion', 'average-drop')
    """
    names = tuple(dict.fromkeys(n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise InputError(f"metrics: {'unknown ' + repr(unknown[0]) if unknown else 'none given'}; valid: "
                         f"{', '.join(METRICS)}")
    return names


# The metrics that are curves: `evaluation` keeps their scores after each step besides their areas.
CURVES: dict[str, Callable[..., Curve]] = {"deletion": deletion, "insertion": insertion}


@dataclass(frozen=True)
class Evaluation:
    """`values {method: {metric: [N, K]}}` (curves by their area) and `curves {metric: {method: [N, K, steps +
    1]}}`, the deletion and insertion curves among the metrics asked for."""

    values: dict[str, dict[str, Tensor]]
    curves: dict[str, dict[str, Tensor]]


def evaluation(model: Callable[[Tensor], Tensor], images: Tensor, maps: Mapping[str, Tensor], classes: Tensor,
               names: Sequence[str] = tuple(METRICS), *, steps: int = 32) -> Evaluation:
    """Each named metric (`METRICS`) of each method's maps (an Explanation's `maps`, upsampled and normalised)
    for its classes, with the deletion and insertion curves themselves (what `fastattr explain --metrics` draws).

    >>> e = evaluation(model, images, out.maps, out.classes, ("deletion", "road"))  # doctest: +SKIP
    >>> e.values["gradcam"]["road"].shape, e.curves["deletion"]["gradcam"].shape    # [N, K], [N, K, 33]  # doctest: +SKIP
    """
    names = parse_metrics(names)
    values: dict[str, dict[str, Tensor]] = {}
    curves: dict[str, dict[str, Tensor]] = {}
    for method, m in maps.items():
        m = m.to(images.dtype)
        values[method] = {}
        for name in names:
            if name in CURVES:
                curve = CURVES[name](model, images, m, classes, steps=steps)
                values[method][name] = curve.area
                curves.setdefault(name, {})[method] = curve.scores
            else:
                values[method][name] = METRICS[name](model, images, m, classes, steps)
    return Evaluation(values, curves)


def evaluate(model: Callable[[Tensor], Tensor], images: Tensor, maps: Mapping[str, Tensor], classes: Tensor,
             names: Sequence[str] = tuple(METRICS), *, steps: int = 32) -> dict[str, dict[str, Tensor]]:
    """`{method: {metric: [N, K]}}`: each named metric (`METRICS`) of each method's maps (an Explanation's
    `maps`, upsampled and normalised) for its classes; curves are summarised by their area.

    >>> scores = evaluate(model, images, out.maps, out.classes, ("deletion", "insertion"))  # doctest: +SKIP
    >>> scores["gradcam"]["deletion"].shape                 # [N, K]  # doctest: +SKIP
    """
    return evaluation(model, images, maps, classes, names, steps=steps).values


def blurred(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """The images under a Gaussian blur (RISE's insertion baseline: an 11-pixel kernel, sigma 5)."""
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(images, [kernel_size, kernel_size], [sigma, sigma])


# --- the passes ---------------------------------------------------------------------------------------------

def _curve(model, images, maps, classes, steps, baseline, probability, sample_batch, reveal: bool) -> Curve:
    at_least("steps", steps, 1)
    at_least("sample_batch", sample_batch, 1)
    classes = _check(model, images, maps, classes)
    base = _baseline(baseline, images)
    n, k = classes.shape
    h, w = images.shape[-2:]
    # One row per (image, class): its own ranking, and its class's score on its own copies.
    rows = images.repeat_interleave(k, 0)
    base = base.repeat_interleave(k, 0) if base.ndim == 4 and base.shape[0] == n else base
    order = maps.reshape(n * k, h * w).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(n * k, -1))
    counts = torch.tensor([round(s * h * w / steps) for s in range(steps + 1)], device=images.device)

    def copies(start: int, stop: int) -> Tensor:
        taken = (rank.unsqueeze(1) < counts[start:stop].view(1, -1, 1)).to(images.dtype)  # [NK, P, HW]
        taken = taken.view(n * k, stop - start, 1, h, w)
        shown, hidden = (taken, 1 - taken) if reveal else (1 - taken, taken)
        return rows.unsqueeze(1) * shown + (base.unsqueeze(1) if base.ndim == 4 else base) * hidden

    per_chunk = max(1, sample_batch // (n * k))
    scores = scores_of_copies(_scorer(model, probability), copies, steps + 1, classes.reshape(n * k, 1), per_chunk,
                              images=True)
    scores = scores.view(n, k, steps + 1)
    return Curve(scores, torch.trapezoid(scores, dx=1.0 / steps, dim=-1))


def _quantiles(values: Tensor, q: Sequence[float]) -> Tensor:
    """`[R, len(q)]`: each row's q-quantiles, interpolated linearly between order statistics as numpy's
    `percentile` does. By sorting, since `torch.quantile` refuses more than 2**24 values."""
    ordered = values.sort(dim=1).values
    position = torch.tensor(q, dtype=values.dtype, device=values.device) * (values.shape[1] - 1)
    below = position.floor().long()
    above = (below + 1).clamp_max(values.shape[1] - 1)
    low, high = ordered[:, below], ordered[:, above]
    return low + (high - low) * (position - below)


def _masked_scores(model, images, maps, classes, probability) -> tuple[Tensor, Tensor]:
    classes = _check(model, images, maps, classes)
    if maps.min() < 0 or maps.max() > 1:
        raise InputError(f"maps: expected values in [0, 1] (normalised maps, as an Explainer returns them), got "
                         f"{maps.min().item():.3g} to {maps.max().item():.3g}")
    score = _scorer(model, probability)
    n, k = classes.shape
    with torch.no_grad():
        original = score(images).gather(1, classes)
    copies = lambda start, stop: images.unsqueeze(1) * maps[:, start:stop].unsqueeze(2)  # noqa: E731
    # [N, K copies, K classes]: copy j for class j
    masked = scores_of_copies(score, copies, k, classes, k, images=True)
    return original, masked.diagonal(dim1=1, dim2=2)


def _scorer(model: Callable[[Tensor], Tensor], probability: bool) -> Callable[[Tensor], Tensor]:
    return (lambda x: model(x).softmax(-1)) if probability else model


def _baseline(baseline: Baseline, images: Tensor) -> Tensor:
    if isinstance(baseline, str):
        if baseline != "blur":
            raise InputError(f"baseline: expected a number, an image [C, H, W] or 'blur', got {baseline!r}")
        return blurred(images)
    if isinstance(baseline, Tensor):
        if tuple(baseline.shape[-3:]) != tuple(images.shape[1:]) or baseline.ndim not in (3, 4):
            raise InputError(f"baseline: expected an image {list(images.shape[1:])} like the images, got shape "
                             f"{list(baseline.shape)}")
        return baseline.to(images).view(1, *images.shape[1:]) if baseline.ndim == 3 else baseline.to(images)
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise InputError(f"baseline: expected a number, an image [C, H, W] or 'blur', got {type(baseline).__name__}")
    return torch.full((1, 1, 1, 1), float(baseline), dtype=images.dtype, device=images.device)


def _check(model, images: Tensor, maps: Tensor, classes: Tensor) -> Tensor:
    """Everything checkable before a forward: shapes that agree, integer classes, finite images, eval mode.
    Returns the classes as int64, as `gather` takes them."""
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise InputError(f"images: expected a float tensor [N, C, H, W], got "
                         f"{list(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not isinstance(classes, Tensor) or classes.ndim != 2 or classes.shape[0] != images.shape[0] \
            or classes.dtype not in (torch.int64, torch.int32):
        got = f"{list(classes.shape)} {classes.dtype}" if isinstance(classes, Tensor) else type(classes).__name__
        raise TargetError(f"classes: expected integer class indices [N={images.shape[0]}, K] (an Explanation's "
                          f"classes), got {got}")
    expected = (images.shape[0], classes.shape[1], *images.shape[-2:])
    if not isinstance(maps, Tensor) or tuple(maps.shape) != expected:
        got = list(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise InputError(f"maps: expected one map per image and class at the images' size {list(expected)} "
                         f"[N, K, H, W] (an Explanation's maps of one method, upsampled), got {got}")
    check_finite(images)
    if isinstance(model, nn.Module):
        check_eval_mode(model)
    return classes.long()
