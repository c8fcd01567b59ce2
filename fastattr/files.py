"""Explain image files in batches: one overlay grid PNG per image and one JSON line per image.

>>> explainer = fastattr.Explainer(fastattr.zoo.efficientnet_lite0(), layer="bn2", methods=("gradcam", "saliency"))
>>> report = fastattr.files.explain_files(["examples"], fastattr.build(fastattr.Spec(k=3)), "out")  # doctest: +SKIP
>>> report.written, report.failed        # PNG paths; (file, reason) for files that are not images
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import images as _images, overlay
from .errors import InputError, TargetError
from .explain import Explanation
from .metrics import Evaluation

__all__ = ["Report", "explain_files", "find_images", "check_output", "map_statistics"]


@dataclass
class Report:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    passed_over: list[Path] = field(default_factory=list)
    results: Path | None = None


def map_statistics(maps: Tensor) -> list[dict]:
    """Per map `[K, H, W]` in [0, 1]: the peak's pixel `[y, x]`, the mean, and the share of pixels above 0.5."""
    flat = maps.flatten(1).float()
    peaks = flat.argmax(1)
    width = maps.shape[-1]
    return [{"peak": [int(p) // width, int(p) % width], "mean": round(float(m), 4), "above_half": round(float(a), 4)}
            for p, m, a in zip(peaks, flat.mean(1), (flat > 0.5).float().mean(1))]


def _unique_png(out_dir: Path, path: Path, taken: set[str]) -> Path:
    # Two folders may both hold "cat.jpg": keep every output, numbering the later ones.
    name, n = path.stem, 1
    while name in taken:
        n += 1
        name = f"{path.stem}-{n}"
    taken.add(name)
    return out_dir / f"{name}.png"


def _printable(name: str) -> str:
    # A file name may hold a newline or another control character, which a caption cannot draw: show it escaped.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def find_images(paths: Iterable[str | Path], out_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(image files, files passed over) under `paths` (`fastattr.images.find`), the output folder `out_dir` left
    out, so that a run's PNGs are not read as photos by the next. Raises InputError when there is no image file,
    or when `out_dir` is one of the folders given."""
    paths = [Path(p) for p in paths]
    out = Path(out_dir).resolve()
    for path in paths:
        if path.is_dir() and path.resolve() == out:
            raise InputError(f"{str(path)!r} is both an input folder and the output folder: the PNGs written would "
                             "mix with the photos (and replace those of the same name); write them to another folder")
    found, passed_over = _images.find(paths, exclude=[out])
    if not found:
        passed = f", and {len(passed_over)} files without an image suffix were passed over" if passed_over else ""
        raise InputError(f"no image files in {', '.join(repr(str(p)) for p in paths)}{passed}; give image files, or "
                         "folders that hold them")
    return found, passed_over


def check_output(out_dir: str | Path, option: str = "out_dir") -> Path:
    """`out_dir` as a Path, once it is known to be a folder this process can write in, or one it can create;
    InputError naming `option` otherwise. Creates nothing."""
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    where = "it" if existing == out_dir else repr(str(existing))
    if not existing.is_dir():
        raise InputError(f"{option} {str(out_dir)!r}: {where} is a file, not a folder; name a folder for the PNGs "
                         "and results.jsonl (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option} {str(out_dir)!r}: cannot write in {where} (permission denied); name a folder "
                         "you can write in")
    return out_dir


def _make_output(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # what check_output cannot foresee: a full disk, a folder locked since
        raise InputError(f"out_dir {str(out_dir)!r}: cannot create it ({exc.strerror or exc}); name a folder you "
                         "can write in") from None


def explain_files(paths: Iterable[str | Path], explain: Callable[[Tensor], Explanation], out_dir: str | Path, *,
                  size: int = 224, batch_size: int = 8, class_names: Sequence[str] | None = None,
                  device: str | torch.device = "cpu", mean: Sequence[float] = _images.IMAGENET_MEAN,
                  std: Sequence[float] = _images.IMAGENET_STD, progress: bool = True,
                  score: Callable[[Tensor, Explanation], Evaluation] | None = None, task: str = "classify",
                  regions: Callable[[Tensor, Explanation], list[list[dict]] | None] | None = None) -> Report:
    """Read the images under `paths`, explain them `batch_size` at a time with `explain` (a `Pipeline`, or any
    callable from normalised images `[B, 3, size, size]` on `device` to an Explanation with normalised maps),
    and write `out_dir/NAME.png`
    (the photo, then each explained class's overlays) and `out_dir/results.jsonl`. Files that are not
    readable images, and those whose PNG cannot be written, are skipped and listed in `Report.failed`; the others
    are still explained. `score(images, explanation)`, when given, returns a `fastattr.metrics.Evaluation`: its
    values are written to each line as "metrics", and its curves (deletion, insertion) drawn into
    `out_dir/NAME-curves.png`, named in the line as "curves". With `task` "classify" each line holds the explained
    classes' softmax "probabilities", with any other task the target's "scores" (sigmoid probabilities, summed
    class scores, detection scores). `regions(images, explanation)` (a `Pipeline`'s `regions`) gives what each
    explained output refers to: a segmentation class's pixels, outlined on its row, or a detection's box, drawn on
    its row and written to the line as "detections".
    Files in folders without an image suffix are not read (`Report.passed_over`), nor is
    `out_dir` when it is inside a folder given. Raises InputError, before any work, for a `batch_size` below 1,
    an `out_dir` that cannot be written, or `paths` that hold no image file."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size: expected an int >= 1, got {batch_size}")
    out_dir = check_output(out_dir)
    files, passed_over = find_images(paths, out_dir)
    _make_output(out_dir)
    report = Report(passed_over=passed_over, results=out_dir / "results.jsonl")
    taken: set[str] = set()
    with report.results.open("w") as results, tqdm(total=len(files), unit="image", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            batch: list[tuple[Path, Tensor]] = []
            for path in files[start:start + batch_size]:
                try:
                    batch.append((path, _images.read(path, size)))
                except InputError as exc:
                    report.failed.append((path, str(exc)))
                    bar.write(f"skipped {exc}")
            for group, display, normalized, out in _explained(batch, explain, device, mean, std, report, bar):
                scores = score(normalized, out) if score is not None else None
                drawn = regions(normalized, out) if regions is not None else None
                out, display = out.cpu(), display.cpu()
                for i, (path, _) in enumerate(group):
                    png = _unique_png(out_dir, path, taken)
                    line = _describe(path, png, out, i, class_names, task)
                    if drawn is not None and task == "detect":
                        line["detections"] = drawn[i]
                        line["names"] = [d["name"] or f"label {d['label']}" for d in drawn[i]]
                    values = line.get("probabilities", line.get("scores"))
                    sign = "p" if "probabilities" in line else "s"
                    captions = [f"{name}  {sign}={v:.2f}" for name, v in zip(line["names"], values)]
                    if out.real is not None:  # a threshold: the rows that pad this image to the batch's K
                        line["real"] = out.real[i].tolist()
                        captions = [c if real else f"{c} (below)" for c, real in zip(captions, line["real"])]
                    maps = {method: m[i].clamp(0, 1) for method, m in out.maps.items()}
                    shapes = None if drawn is None else [r.get("mask", r.get("box")) for r in drawn[i]]
                    pictures = [(png, overlay.grid(display[i], maps, captions, title=_printable(path.name),
                                                   regions=shapes))]
                    if scores is not None:
                        line["metrics"] = {method: {name: [round(v, 4) for v in values[i].tolist()]
                                                    for name, values in by_metric.items()}
                                           for method, by_metric in scores.values.items()}
                    if scores is not None and scores.curves:
                        chart = _unique_png(out_dir, Path(f"{png.stem}-curves"), taken)
                        line["curves"] = chart.name
                        rows = {name: {method: c[i] for method, c in by_method.items()}
                                for name, by_method in scores.curves.items()}
                        pictures.append((chart, overlay.curves(rows, captions, title=_printable(path.name))))
                    try:
                        for where, picture in pictures:
                            picture.save(where)
                    except OSError as exc:  # this PNG only: a folder in its place, say; the others are written
                        reason = f"{str(path)!r}: cannot write its PNG {str(png)!r} ({exc.strerror or exc})"
                        report.failed.append((path, reason))
                        bar.write(f"skipped {reason}")
                        continue
                    results.write(json.dumps(line) + "\n")
                    report.written.append(png)
            bar.update(len(files[start:start + batch_size]))
    return report


def _explained(batch: list[tuple[Path, Tensor]], explain: Callable[[Tensor], Explanation], device, mean, std,
               report: Report, bar) -> list[tuple[list[tuple[Path, Tensor]], Tensor, Tensor, Explanation]]:
    """(images, display, normalised, explanation) for `batch`, in one call; where a target refuses an image (a
    detector finding fewer detections than asked, say), each image alone, the refused ones listed as failed."""
    if not batch:
        return []
    display = torch.stack([image for _, image in batch]).to(device)
    normalized = _images.normalize(display, mean, std)
    try:
        return [(batch, display, normalized, explain(normalized))]
    except TargetError as exc:
        if len(batch) == 1:
            report.failed.append((batch[0][0], f"{str(batch[0][0])!r}: {exc}"))
            bar.write(f"skipped {batch[0][0]}: {exc}")
            return []
    return [one for image in batch for one in _explained([image], explain, device, mean, std, report, bar)]


def _describe(path: Path, png: Path, out: Explanation, i: int, class_names: Sequence[str] | None,
              task: str = "classify") -> dict:
    classes = out.classes[i].tolist()
    names = [class_names[c] if class_names and c < len(class_names) else f"class {c}" for c in classes]
    line = {"file": str(path), "image": png.name, "layer": out.layer, "classes": classes, "names": names}
    if task == "classify":  # logits: the softmax says how sure; any other target's scores are read as they are
        line["probabilities"] = [round(p, 4) for p in out.logits[i].float().softmax(-1)[out.classes[i]].tolist()]
    else:
        line["scores"] = [round(v, 4) for v in out.logits[i].float()[out.classes[i]].tolist()]
    line["maps"] = {method: map_statistics(m[i]) for method, m in out.maps.items()}
    return line
