"""Ahead-of-time attribution graphs for servers: save once, load and run without the model's class.

`export_program` writes the whole attribution (forward, K-class backward, methods, post-processing) as a
torch.export program (`.pt2`, loaded by `torch.export.load`) or, with `aoti=True`, as an AOTInductor
package (compiled C++, loaded by `torch._inductor.aoti_load_package`). `load_program` loads either and
returns the same `Explanation` as the torch path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import graph
from .errors import InputError
from .explain import Explainer, Explanation

FORMAT = "fastattr-program/1"
_EXTRA = "fastattr.json"


def export_program(model: nn.Module, path: str | Path, *, layer: str | None = None,
                   methods: str | Sequence[str] = ("gradcam",), k: int = 5,
                   input_shape: Sequence[int] = (3, 224, 224), with_classes: bool = False, aoti: bool = False,
                   **options) -> Path:
    """Save the attribution graph of `model` for images `[N, *input_shape]`, any N.

    The program's inputs are the images (and, with `with_classes=True`, class indices `[N, k]`); its
    outputs are logits `[N, num_classes]`, classes `[N, k]` (the top-k unless given) and one map
    `[N, k, H, W]` per method. `options` are `Explainer`'s (`output`, `upsample`, `normalize`, `k_form`).

    >>> fastattr.export_program(model, "resnet50-gradcam.pt2", layer="layer4", k=5)   # doctest: +SKIP
    >>> program = fastattr.load_program("resnet50-gradcam.pt2"); out = program(images)  # doctest: +SKIP
    """
    explainer = Explainer(model, layer, methods, **options)
    param = next(model.parameters())
    shape = tuple(int(s) for s in input_shape[-3:])
    # The tracer gives equal sizes one symbol, so an example batch equal to K, a channel count or the image
    # size would be specialised along with it (and N = 1 always is): take a batch size equal to none.
    n = next(n for n in (5, 7, 11, 13, 17) if n not in (k, *shape))
    example = torch.randn(n, *shape, dtype=param.dtype, device=param.device)
    explainer._check_images(example)
    num_classes = explainer._count_classes(example)
    if not 1 <= k <= num_classes:
        raise InputError(f"k: must be in 1..{num_classes} for a model with {num_classes} outputs, got {k}")

    if with_classes:
        def attribution(images: Tensor, classes: Tensor):
            logits, picked, maps, _ = explainer._pure(images, classes, k)
            return (logits, picked, *maps)
        example_args = (example, torch.zeros(n, k, dtype=torch.long, device=param.device))
    else:
        def attribution(images: Tensor):
            logits, picked, maps, _ = explainer._pure(images, None, k)
            return (logits, picked, *maps)
        example_args = (example,)

    program = graph.export(attribution, example_args)
    meta = json.dumps({"format": FORMAT, "methods": list(explainer.methods), "k": k, "layer": explainer.layer,
                       "input_shape": list(shape), "dtype": str(param.dtype).removeprefix("torch."),
                       "num_classes": num_classes, "with_classes": with_classes})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if aoti:
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(program, package_path=str(path),
                                 inductor_configs={"aot_inductor.metadata": {"fastattr": meta}})
    else:
        torch.export.save(program, path, extra_files={_EXTRA: meta})
    return path


class Program:
    """A saved attribution graph, loaded. Call it like an `Explainer`: `program(images, classes=None)`.

    Thread-safe: the loaded graph keeps no state between calls.
    """

    def __init__(self, run, meta: dict, path: Path):
        self._run, self.meta, self.path = run, meta, path
        self.methods: tuple[str, ...] = tuple(meta["methods"])
        self.k: int = meta["k"]
        self.dtype = getattr(torch, meta["dtype"])

    def __repr__(self) -> str:
        return f"Program({str(self.path)!r}, methods={self.methods}, k={self.k}, layer={self.meta['layer']!r})"

    def __call__(self, images: Tensor, classes: Tensor | None = None) -> Explanation:
        shape = tuple(self.meta["input_shape"])
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != shape:
            got = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"images: this program takes [N, {', '.join(map(str, shape))}], got {got}; "
                             "export again with input_shape= for another size")
        if images.dtype != self.dtype:
            raise InputError(f"images: this program takes {self.dtype}, got {images.dtype}")
        args = (images,)
        if self.meta["with_classes"]:
            if not isinstance(classes, Tensor) or classes.shape != (images.shape[0], self.k):
                raise InputError(f"classes: this program takes class indices [N, {self.k}] (int64), got "
                                 f"{list(classes.shape) if isinstance(classes, Tensor) else classes!r}")
            if classes.min() < 0 or classes.max() >= self.meta["num_classes"]:
                raise InputError(f"classes: indices must be in 0..{self.meta['num_classes'] - 1}")
            args = (images, classes.to(torch.long))
        elif classes is not None:
            raise InputError(f"classes: this program picks the top-{self.k} classes itself; export it with "
                             "with_classes=True to pass classes")
        with torch.inference_mode():
            logits, picked, *maps = self._run(*args)
        return Explanation(logits, picked, dict(zip(self.methods, maps)), self.meta["layer"])


def load_program(path: str | Path) -> Program:
    """Load what `export_program` saved (a torch.export program or an AOTInductor package)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"path: no file {str(path)!r}")
    extra = {_EXTRA: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception:  # noqa: BLE001 - not a torch.export program: try an AOTInductor package
        program = None
    if program is not None and extra[_EXTRA]:
        return Program(program.module(), _checked(json.loads(extra[_EXTRA]), path), path)
    try:
        from torch._inductor import aoti_load_package

        package = aoti_load_package(str(path))
        meta = package.get_metadata().get("fastattr")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"path: {str(path)!r} is not a fastattr program ({type(exc).__name__}); "
                         "write one with fastattr.export_program") from None
    if not meta:
        raise InputError(f"path: {str(path)!r} is an AOTInductor package but not a fastattr program")
    return Program(package, _checked(json.loads(meta), path), path)


def _checked(meta: dict, path: Path) -> dict:
    if meta.get("format") != FORMAT:
        raise InputError(f"path: {str(path)!r} holds format {meta.get('format')!r}, this fastattr reads {FORMAT!r}")
    return meta
