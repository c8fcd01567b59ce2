"""The one construction path: a `Spec` says what explains and how; `build(spec)` returns the `Pipeline` that
every front end calls (the command line, `fastattr bench`, the server and Ray Data).

A spec names a model (the pretrained default, a torchvision name, or a `fastattr export` file: `.onnx` or
`.pt2`), its weights, layer, methods, k, input size, device, backend and sampling options. Everything not
given comes from `DEFAULTS`, or from the export file, which fixes what it was exported with and refuses
other values. The defaults, the method-list parsing, the class-names rule and model loading live here and
nowhere else; they raise `fastattr` errors, and only the command line turns those into exit codes.

>>> pipeline = build(Spec(model="resnet18", methods="gradcam, saliency", k=3, input_size=64))   # doctest: +SKIP
>>> out = pipeline(images)              # images [N, 3, 64, 64], normalised  # doctest: +SKIP
>>> out.classes.shape, out.maps["gradcam"].shape          # [N, 3], [N, 3, 64, 64]  # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import methods as _methods, targets, zoo
from .errors import InputError, at_least
from .explain import OCCLUSION, SAMPLE_BATCH, SAMPLING, Explainer, Explanation
from .export import OnnxExplainer, Program, export_onnx, export_program, load_program

__all__ = ["Spec", "Pipeline", "build", "task_of", "TASKS", "load_model", "check", "check_device", "check_trusted", "export", "parse_methods", "class_names", "DEFAULTS", "BACKENDS",
           "EXPORT_SUFFIXES"]

BACKENDS = ("eager", "compiled", "onnx", "pt2")
TASKS = ("classify", "multilabel", "segment", "detect")
EXPORT_SUFFIXES = {".onnx": "onnx", ".pt2": "pt2"}
# What a spec leaves out, for every entry point. Sampling options not given are the Explainer's (`SAMPLING`).
DEFAULTS: dict[str, Any] = {"model": zoo.PRETRAINED, "methods": ("gradcam", "saliency"), "k": 3, "input_size": 224,
                            "device": "cpu", "backend": "eager"}


def parse_methods(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Method names from "gradcam, saliency" (spaces allowed) or a sequence, checked; None stays None.

    >>> parse_methods("gradcam, saliency")
    ('gradcam', 'saliency')
    """
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    return _methods.resolve(tuple(n.strip() for n in names if n.strip()))


def class_names(num_classes: int, model: str | None = None, task: str = "classify") -> tuple[str, ...] | None:
    """The names of the explained outputs: a named torchvision model's categories (ImageNet's, VOC's, COCO's) when
    it has that many outputs, ImageNet's for any other model with 1000, else None (classes are then shown by
    index). A detection's outputs are its top-k detections, which have no names."""
    if task == "detect":
        return None
    named = zoo.categories(model, num_classes) if model is not None else None
    return named or (zoo.imagenet_classes() if num_classes == 1000 else None)


def task_of(spec: Spec) -> str:
    """The spec's task: given, or by the model's family (`fastattr.zoo.task_of`); an export file's is baked in."""
    if spec.task is not None:
        return spec.task
    return "classify" if spec.export_file is not None else zoo.task_of(spec.model)


def _target(task: str, k: int):
    # The Explainer's `output=` for a task (fastattr.targets): what the front ends' --task means.
    return {"classify": None, "multilabel": targets.multilabel, "segment": targets.segmentation(),
            "detect": targets.detections(k)}[task]


def _option(default: Any, kind: type, help: str, *, least: float | None = None, choices: Sequence[str] | None = None,
            metavar: str | None = None) -> Any:
    """A spec field, declared once with all that reads it needs: `kind` (str, int, float, bool, or tuple for a
    method list) and `least` (the checks here), `help`, `choices` and `metavar` (the command line's flags, made by
    `fastattr.options`; the server converts its string arguments by `kind`)."""
    return field(default=default, metadata={"kind": kind, "least": least, "help": help, "choices": choices,
                                            "metavar": metavar})


@dataclass(frozen=True)
class Spec:
    """What to explain with. None means: the default (`DEFAULTS`, `SAMPLING`), or what the export file fixed.
    Each field's `help` (its metadata, and `fastattr explain --help`) says what it is.

    >>> Spec("resnet18", methods="gradcam, saliency", k=5).methods
    ('gradcam', 'saliency')
    """

    model: str = _option(DEFAULTS["model"], str, metavar="NAME_OR_FILE", help=(
        f"{zoo.PRETRAINED} (pretrained, the default), a torchvision model name, or a fastattr export: an .onnx file "
        "or a .pt2 program"))
    weights: str | None = _option(None, str, metavar="FILE", help=(
        "a state-dict file for a torchvision model, loaded with weights_only=True (default: random weights)"))
    layer: str | None = _option(None, str, help="target layer by module path (default: the model's last feature map)")
    methods: tuple[str, ...] | None = _option(None, tuple, metavar="LIST", help=(
        f"comma-separated method names (default: {','.join(DEFAULTS['methods'])}, or an export's): "
        f"{', '.join(_methods.METHODS)}"))
    k: int | None = _option(None, int, least=1, help=(
        f"classes explained per image, the top-k (default {DEFAULTS['k']}, or an export's)"))
    input_size: int | None = _option(None, int, least=1, metavar="PIXELS", help=(
        f"images are resized and centre-cropped to this (default {DEFAULTS['input_size']}, or an export's)"))
    device: str = _option(DEFAULTS["device"], str, choices=("cpu", "cuda"), help="cpu or cuda (default cpu)")
    backend: str | None = _option(None, str, choices=BACKENDS, help=(
        f"{', '.join(BACKENDS)} (default {DEFAULTS['backend']}): torch.compile for compiled; a named model is "
        "exported to a temporary file for onnx and pt2; an export file sets its own"))
    with_classes: bool = _option(False, bool, help=(
        "an export made from a named model also takes class indices as a second input"))
    samples: int | None = _option(None, int, least=1, help=(
        f"smoothgrad: noisy copies per image (default {SAMPLING['samples']}, or an export's)"))
    noise: float | None = _option(None, float, least=0, help=(
        f"smoothgrad: noise std as a fraction of each image's value range (default {SAMPLING['noise']}, or an "
        "export's)"))
    steps: int | None = _option(None, int, least=1, help=(
        f"ig: Gauss-Legendre points on the path (default {SAMPLING['steps']}, or an export's)"))
    window: int | None = _option(None, int, least=1, metavar="PIXELS", help=(
        f"occlusion: the side of the square window set to the baseline (default {OCCLUSION['window']})"))
    stride: int | None = _option(None, int, least=1, metavar="PIXELS", help=(
        "occlusion: how far the window moves each step (default: half the window)"))
    sample_batch: int | None = _option(None, int, least=1, metavar="IMAGES", help=(
        "smoothgrad, ig, ablationcam, scorecam, occlusion: the most noisy, path or perturbed copies of the images "
        f"one pass sends through the network, which bounds their memory (default {SAMPLE_BATCH}); an export file "
        "is called on fewer images at once"))
    trusted: bool = _option(False, bool, help=(
        "load a .pt2 model file, which runs code as it is loaded (an AOTInductor package's native library, a "
        "torch.export program's pickles): only for files you made or trust"))
    # Last, so that the positional order of the fields before it stays as it was.
    task: str | None = _option(None, str, choices=TASKS, help=(
        "what the model's output is and what is explained: classify (logits), multilabel (each label's sigmoid), "
        "segment (class maps: each class's score summed over the pixels it wins), detect (a torchvision detector: "
        "the scores of its top-k detections; eager backend only) (default: segment for torchvision's segmentation "
        "models, detect for its detectors, else classify)"))
    threshold: float | None = _option(None, float, metavar="SCORE", help=(
        "explain every class whose score (multilabel: probability) exceeds this, at most k per image, instead of "
        "the top-k; rows below it pad a batch and are marked (eager and compiled backends)"))

    def __post_init__(self):
        object.__setattr__(self, "model", str(self.model))
        object.__setattr__(self, "weights", None if self.weights is None else str(self.weights))
        object.__setattr__(self, "methods", parse_methods(self.methods))
        for option in fields(self):
            value, declared = getattr(self, option.name), option.metadata
            if value is None and option.default is not None:
                raise InputError(f"{option.name}: expected a value (default {option.default!r}), got None")
            if value is None:
                continue
            if declared["least"] is not None:
                object.__setattr__(self, option.name, at_least(option.name, value, declared["least"], declared["kind"]))
            elif declared["kind"] is bool and not isinstance(value, bool):  # a string "false" would be true
                raise InputError(f"{option.name}: expected True or False, got {value!r}")
            if declared["choices"] and value not in declared["choices"]:
                raise InputError(f"{option.name}: expected one of {', '.join(declared['choices'])}, got {value!r}")

    @property
    def export_file(self) -> Path | None:
        """The export file the spec names as its model, or None for a model name."""
        suffix = Path(self.model).suffix.lower()
        return Path(self.model) if suffix in EXPORT_SUFFIXES else None

    @property
    def sampling(self) -> dict[str, Any]:
        """The SmoothGrad and IG options given, which an export fixes (those not given are left out)."""
        return {name: getattr(self, name) for name in SAMPLING if getattr(self, name) is not None}

    @property
    def occlusion(self) -> dict[str, Any]:
        """Occlusion's window and stride, where given: options of the eager and compiled Explainer alone."""
        return {name: getattr(self, name) for name in OCCLUSION if getattr(self, name) is not None}

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Spec:
        """A spec from the fields among `options` (other keys are ignored), e.g. parsed command-line arguments."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in options.items() if name in names and value is not None})


@dataclass
class Pipeline:
    """A built explainer: `pipeline(images, classes=None, k=None)` returns an `Explanation`.

    images:  `[N, 3, input_size, input_size]`, normalised as the model expects (moved to the device here)
    classes: None for the top-k, or `[N, K]` class indices (an export takes exactly its own k)
    k:       the top-k (default: the spec's k; an export's own)

    Attributes say what it computes: `backend`, `methods`, `layer`, `k` (the default), `fixed_k` (the k every
    call runs with: an export's, else None), `num_classes`, `input_size`, `takes_classes` (False for an export
    without a class input), `names` (class names or None), `description` (model name or file) and `info`
    (export seconds, onnxruntime version and providers, where they apply).
    """

    spec: Spec
    backend: str
    description: str
    methods: tuple[str, ...]
    layer: str | None
    k: int
    fixed_k: int | None
    num_classes: int
    input_size: int
    takes_classes: bool
    names: tuple[str, ...] | None
    info: dict = field(default_factory=dict)
    _explain: Any = field(default=None, repr=False)   # Explainer, OnnxExplainer or Program
    task: str = "classify"

    def __call__(self, images: Tensor, classes: Tensor | None = None, k: int | None = None) -> Explanation:
        if isinstance(self._explain, Explainer):
            device = self.spec.device
            classes = classes.to(device) if isinstance(classes, Tensor) else classes
            if classes is not None:
                return self._explain(images.to(device), classes=classes)
            if self.spec.threshold is not None:  # the classes above it, at most k per image
                return self._explain(images.to(device), k=targets.Above(self.spec.threshold, self.k if k is None else k))
            return self._explain(images.to(device), k=self.k if k is None else k)
        if k is not None and k != self.fixed_k:
            raise InputError(f"k {k}: {self.description} was exported for k={self.fixed_k}; use k={self.fixed_k}, "
                             "or export again with --k")
        # A .pt2 program runs on the device it was exported for (the spec's); onnxruntime takes host tensors.
        program = isinstance(self._explain, Program)
        device = self.spec.device if program else "cpu"
        images = images.to(device=device, dtype=self._explain.dtype if program else getattr(torch, self._explain.meta["dtype"]))
        classes = classes.to(device) if isinstance(classes, Tensor) else classes
        if classes is None and self.takes_classes:  # the export takes classes only: find the top-k first
            probe = self._explain(images, torch.zeros(len(images), self.fixed_k, dtype=torch.long, device=images.device))
            classes = probe.logits.topk(self.fixed_k, dim=1).indices
        out = self._explain(images, classes)
        if len(self.methods) < len(out.maps):
            out = replace(out, maps={m: out.maps[m] for m in self.methods})
        return out

    @property
    def sample_batch(self) -> int:
        """The most sampled or perturbed copies of the images one pass sends through the network (the spec's, else
        `SAMPLE_BATCH`)."""
        return _sample_batch(self.spec)

    @property
    def mean(self) -> tuple[float, ...]:
        """The per-channel mean the front ends normalise images [0, 1] with for this model: ImageNet's, except for
        torchvision's detectors, which take images in [0, 1] and normalise them inside (0 and 1: unchanged)."""
        return (0.0, 0.0, 0.0) if self.task == "detect" else zoo.IMAGENET_MEAN

    @property
    def std(self) -> tuple[float, ...]:
        """The per-channel standard deviation that goes with `mean`."""
        return (1.0, 1.0, 1.0) if self.task == "detect" else zoo.IMAGENET_STD

    def regions(self, images: Tensor, out: Explanation) -> list[list[dict]] | None:
        """What each explained output refers to, per image and class, for drawing and reporting: for `segment`,
        `{"mask": [H, W] bool}`, the pixels the class wins; for `detect`, `{"box": [x1, y1, x2, y2], "label": int,
        "name": str | None, "score": float}`, the detection. None for the other tasks and for exports (no model to
        run). One forward more, without autograd.
        """
        if self.task not in ("segment", "detect") or self.model is None:
            return None
        with torch.no_grad():
            output = self.model(images.to(self.spec.device))
        if self.task == "segment":
            masks = targets.winning_pixels(output, out.classes).cpu()
            return [[{"mask": mask} for mask in per_image] for per_image in masks]
        labels, k = zoo.categories(self.spec.model), self.num_classes  # the detections the target scored
        found = [[{"box": [round(v, 1) for v in box.tolist()], "label": int(label),
                   "name": labels[int(label)] if labels and int(label) < len(labels) else None, "score": float(score)}
                  for box, label, score in zip(d["boxes"], d["labels"], d["scores"])]
                 for d in targets.top_detections(output, k)]
        return [[per_image[c] for c in classes] for per_image, classes in zip(found, out.classes.tolist())]

    @property
    def model(self) -> nn.Module | None:
        """The torch model the pipeline explains (eager and compiled backends), or None for an export."""
        return self._explain.model if isinstance(self._explain, Explainer) else None

    def warmup(self, k: int | None = None, named: Sequence[bool] = (False, True)) -> float:
        """Run every graph a call at this `k` can need (compiling, for the compiled backend), so that no caller
        pays for it later; `named`: the top-k (False) and named classes (True). Returns the seconds it took."""
        start = time.perf_counter()
        if isinstance(self._explain, Explainer):
            return self._explain.prepare((3, self.input_size, self.input_size), self.k if k is None else k, named)
        images = torch.zeros(2, 3, self.input_size, self.input_size)  # __call__ moves them where the export runs
        for given in (g for g in named if self.takes_classes or not g):
            self(images, torch.zeros(2, self.fixed_k, dtype=torch.long) if given else None)
        return time.perf_counter() - start


def check_device(spec: Spec, option_prefix: str = "") -> None:
    """Raise before any loading when the spec asks for CUDA and torch sees none."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else f"torch {torch.__version__} finds no CUDA device or driver")
        raise InputError(f"{option_prefix}device cuda: no GPU available ({why}); use {option_prefix}device cpu")


def load_model(spec: Spec, option_prefix: str = "") -> nn.Module:
    """The spec's model by name (`fastattr.zoo.load_model`), on its device, in eval mode."""
    if spec.export_file is not None:
        raise InputError(f"{option_prefix}model {spec.model}: an export holds a graph, not a model to load; pass a "
                         "model name (and --weights)")
    check(spec, option_prefix)
    return _load(spec)


def _load(spec: Spec) -> nn.Module:
    # Unchecked: for callers that have run `check` on this spec already.
    return zoo.load_model(spec.model, spec.weights).to(spec.device)


def check(spec: Spec, option_prefix: str = "") -> None:
    """What can be checked of a spec without loading anything: the device, the model's name or file, and
    methods the backend cannot run."""
    check_device(spec, option_prefix)
    backend = spec.backend or (EXPORT_SUFFIXES[spec.export_file.suffix.lower()] if spec.export_file else "eager")
    if backend in ("onnx", "pt2") and (forwarded := _methods.unexportable(spec.methods or ())):
        raise InputError(f"{option_prefix}methods: {', '.join(forwarded)} run eagerly or compiled (no export holds "
                         f"their copies' forwards), and the backend is {backend}; use {option_prefix}backend eager or "
                         "compiled with a model name")
    methods = spec.methods or ()
    if backend == "compiled" and (perturbed := _methods.perturbed(methods)) and len(perturbed) < len(methods):
        raise InputError(f"{option_prefix}methods: {', '.join(perturbed)} compile the forward of each chunk of "
                         f"perturbed copies, the others one graph; with {option_prefix}backend compiled explain them "
                         "in separate runs, or use the eager backend")
    if spec.threshold is not None and backend not in ("eager", "compiled"):
        raise InputError(f"{option_prefix}threshold: an export explains a fixed k per image, and the backend is "
                         f"{backend}; use {option_prefix}backend eager or compiled with a model name, or drop "
                         f"{option_prefix}threshold")
    if spec.export_file is not None and spec.task is not None:
        raise InputError(f"{option_prefix}task: {spec.model!r} is an export, whose graph holds its task; drop "
                         f"{option_prefix}task or pass a model name")
    if backend != "eager" and spec.export_file is None and task_of(spec) == "detect":
        raise InputError(f"{option_prefix}task detect: torchvision's detectors run on the eager hook path only "
                         f"(torch.fx cannot trace them, so no compiled graph or export holds them), and the backend "
                         f"is {backend}; use {option_prefix}backend eager")
    path = Path(spec.model)
    if spec.export_file is not None:
        kind = EXPORT_SUFFIXES[spec.export_file.suffix.lower()]
        if spec.backend is not None and spec.backend != kind:
            raise InputError(f"{option_prefix}backend {spec.backend}: {spec.model!r} is a .{kind} export, which sets "
                             f"the backend ({kind}); drop {option_prefix}backend (and {option_prefix}compile) or pass "
                             "a model name")
        if spec.weights is not None:
            raise InputError(f"{option_prefix}weights: {spec.model!r} is an export that holds its weights; drop "
                             f"{option_prefix}weights")
        if not path.is_file():
            raise InputError(f"{option_prefix}model {spec.model}: no such file")
        check_trusted(spec, option_prefix)
    elif path.is_file():
        raise InputError(f"{option_prefix}model {spec.model!r}: a file must be a fastattr export ending in .onnx or "
                         ".pt2 (or pass a model name)")
    else:
        zoo.check_name(spec.model)
    if spec.backend == "onnx" or (spec.export_file is not None and spec.export_file.suffix.lower() == ".onnx"):
        _onnx_providers(spec.device, option_prefix)


def check_trusted(spec: Spec, option_prefix: str = "") -> None:
    """Raise unless the spec's model is a file that runs no code as it is loaded, or one it says is trusted.

    A .pt2 file runs code as it is loaded: an AOTInductor package's shared library, or the pickles and shape
    expressions `torch.export.load` reads. The suffix decides, so this opens nothing.
    """
    file = spec.export_file
    if file is None or EXPORT_SUFFIXES[file.suffix.lower()] != "pt2" or spec.trusted:
        return
    flag = f"{option_prefix}trusted" if option_prefix else "trusted=True"
    raise InputError(f"{option_prefix}model {spec.model}: a .pt2 file can run code as it is loaded (an AOTInductor "
                     "package's native library, a torch.export program's pickles); pass "
                     f"{flag} if you made the file or trust whoever did")


def export(spec: Spec, path: str | Path, fmt: str = "onnx", option_prefix: str = "") -> Path:
    """Export the named model of `spec` to `path` as `fmt` ("onnx", "pt2", "aoti", or "triton": a Triton model
    repository at `path` holding the ONNX export and its `config.pbtxt`, `fastattr.triton`), with the spec's layer,
    methods, k, input size, class input and sampling options (the defaults where not given). ONNX is traced on
    the CPU (onnxruntime chooses its own device); a program on the spec's device, where it will run.

    >>> export(Spec("resnet18", methods="gradcam", k=5), "resnet18.onnx")   # doctest: +SKIP
    """
    if spec.export_file is not None:
        raise InputError(f"{option_prefix}model {spec.model}: an export holds a graph, not a model to export; pass a "
                         "model name (and --weights)")
    check(spec, option_prefix)
    return _export(spec, path, fmt)


def _export(spec: Spec, path: str | Path, fmt: str) -> Path:
    # Unchecked, as `_load`.
    model = _load(replace(spec, device="cpu") if fmt in ("onnx", "triton") else spec)
    size = spec.input_size or DEFAULTS["input_size"]
    k = DEFAULTS["k"] if spec.k is None else spec.k
    options = dict(layer=spec.layer, methods=spec.methods or DEFAULTS["methods"], k=k, input_shape=(3, size, size),
                   with_classes=spec.with_classes, output=_target(task_of(spec), k), **spec.sampling)
    if fmt == "triton":
        from .triton import write_repository

        with tempfile.TemporaryDirectory(prefix="fastattr-triton-") as folder:
            onnx_file = export_onnx(model, Path(folder) / "model.onnx", **options)
            return write_repository(onnx_file, path)
    if fmt == "onnx":
        return export_onnx(model, path, **options)
    return export_program(model, path, aoti=fmt == "aoti", **options)


def build(spec: Spec, option_prefix: str = "") -> Pipeline:
    """Load or export what `spec` names and return the `Pipeline` that explains with it. Errors are `fastattr`
    errors raised before any image is explained; `option_prefix` ("--" for the command line) is put before
    option names in their messages.

    >>> pipeline = build(Spec("resnet18", backend="onnx", methods=("gradcam",), k=5, input_size=64))  # doctest: +SKIP
    """
    check(spec, option_prefix)
    if spec.export_file is not None:
        return _from_export_file(spec, option_prefix)
    backend = spec.backend or DEFAULTS["backend"]
    if backend in ("eager", "compiled"):
        model = _load(spec)
        size, k, task = spec.input_size or DEFAULTS["input_size"], DEFAULTS["k"] if spec.k is None else spec.k, task_of(spec)
        explainer = Explainer(model, layer=spec.layer, methods=spec.methods or DEFAULTS["methods"],
                              output=_target(task, k), compile=backend == "compiled", sample_batch=_sample_batch(spec),
                              **spec.sampling, **spec.occlusion)
        # A detector's outputs are its top-k detections, and a blank image may have none to probe.
        num_classes = k if task == "detect" else explainer.num_classes(torch.zeros(1, 3, size, size, device=spec.device))
        return Pipeline(spec, backend, spec.model, explainer.methods, explainer.layer, k, None, num_classes, size, True,
                        class_names(num_classes, spec.model, task), {}, explainer, task)
    # An export made now, to a file that lives only until it is loaded: onnxruntime and torch.export hold it all.
    # fastattr wrote it, in a folder of its own, so it is trusted.
    with tempfile.TemporaryDirectory(prefix="fastattr-build-") as folder:
        start = time.perf_counter()
        path = _export(spec, Path(folder) / f"model.{backend}", backend)
        export_s = time.perf_counter() - start
        pipeline = _from_export_file(replace(spec, model=str(path), weights=None, task=None, layer=None, methods=None, k=None,
                                             input_size=None, backend=None, with_classes=False, samples=None,
                                             noise=None, steps=None, window=None, stride=None, trusted=True),
                                     option_prefix)
    pipeline.spec, pipeline.description, pipeline.info["export_s"] = spec, spec.model, export_s
    pipeline.task = task_of(spec)
    return pipeline


def _from_export_file(spec: Spec, prefix: str) -> Pipeline:
    path = spec.export_file
    kind = EXPORT_SUFFIXES[path.suffix.lower()]
    if kind == "onnx":
        explainer = OnnxExplainer(path, providers=_onnx_providers(spec.device, prefix), sample_batch=_sample_batch(spec))
        import onnxruntime as ort

        info = {"onnxruntime": ort.__version__, "providers": explainer.session.get_providers()}
    else:  # build has checked the device
        explainer, info = load_program(path, trusted=spec.trusted, sample_batch=_sample_batch(spec)), {}
    meta = explainer.meta
    _check_agrees(spec, meta, path, prefix)
    methods = spec.methods or tuple(meta["methods"])
    return Pipeline(spec, kind, str(path), methods, meta["layer"], meta["k"], meta["k"], meta["num_classes"],
                    meta["input_shape"][-1], meta["with_classes"], class_names(meta["num_classes"]), info, explainer)


def _sample_batch(spec: Spec) -> int:
    return SAMPLE_BATCH if spec.sample_batch is None else spec.sample_batch


def _check_agrees(spec: Spec, meta: dict, path: Path, prefix: str) -> None:
    """An option given with an export file must agree with the file: the export fixed it, and ignoring it would
    return something other than what the caller asked for."""
    if spec.methods and (missing := [m for m in spec.methods if m not in meta["methods"]]):
        raise InputError(f"{prefix}methods: {path} computes {', '.join(meta['methods'])}, not {', '.join(missing)}; "
                         f"export again with --methods to add them")
    fixed = {"k": (spec.k, meta["k"]), "layer": (spec.layer, meta["layer"]),
             "input_size": (spec.input_size, meta["input_shape"][-1]), "with_classes": (spec.with_classes or None, meta["with_classes"])}
    for name, (value, own) in fixed.items():
        if value is not None and value != own:
            raise InputError(f"{prefix}{name.replace('_', '-')} {value}: {path} was exported for {name}={own}; drop "
                             f"{prefix}{name.replace('_', '-')} or export again")
    for name, value in spec.occlusion.items():
        raise InputError(f"{prefix}{name} {value}: sets occlusion, which no export holds ({path} computes "
                         f"{', '.join(meta['methods'])}); drop {prefix}{name}")
    for name, value in spec.sampling.items():
        if value != meta.get(name):
            raise InputError(f"{prefix}{name} {value}: {path} was exported with {name} {meta.get(name)}; drop "
                             f"{prefix}{name}, or export again with --{name} {value}")


def _onnx_providers(device: str, prefix: str) -> list[str]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InputError(f"{prefix}device cuda: onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                         f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu or use {prefix}device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]
