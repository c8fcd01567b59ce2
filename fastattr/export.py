"""Ahead-of-time attribution graphs for servers: save once, load and run without the model's class.

`export_program` writes the whole attribution (forward, K-class backward, methods, post-processing) as a
torch.export program (`.pt2`, loaded by `torch.export.load`) or, with `aoti=True`, as an AOTInductor
package (compiled C++, loaded by `torch._inductor.aoti_load_package`). `load_program` loads either and
returns the same `Explanation` as the torch path.

Loading either kind can run code the file holds (docs/export.md, "Trusted files"), so `load_program` first
reads the file's metadata as a zip archive, which runs nothing, and loads it only when told `trusted=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _export, methods as _methods, perturb, targets
from .errors import ExportError, InputError, at_least
from .explain import SAMPLE_BATCH, Explainer, Explanation, check_eval_mode, check_finite, draw_noise, images_per_call

FORMAT = "fastattr-program/1"
_EXTRA = "fastattr.json"
# Where a .pt2 archive keeps what fastattr reads, below the one top folder torch writes every entry under.
_PROGRAM_META = f"extra/{_EXTRA}"
_AOTI_FOLDER = "data/aotinductor/"
_AOTI_MODEL = f"{_AOTI_FOLDER}model/"   # the model `aoti_load_package` loads
# Weights past this many bytes go beside the file: protobuf cannot write a message of 2 GB or more, and the graph
# needs room beside its weights (torch.onnx's own rule, made fastattr's so that it is stated and tested here).
EXTERNAL_DATA_BYTES = 1536 << 20
_META_MAX_BYTES = 1 << 20   # fastattr's metadata is far smaller: a larger entry is not fastattr's
_TRUST_HOW = "pass trusted=True if you made the file or trust whoever did (--trusted on the command line)"
# TMPDIR belongs to the whole process: one AOTInductor load at a time points it at a folder of its own.
_TMPDIR_LOCK = threading.Lock()
# An exported Ablation-CAM runs the head on all of an image's ablated copies at once (a loaded export then
# takes fewer images a call): allowed while the copies and the head's work on them fit in 2 GiB an image, as
# resnet50's at layer4 do at 224x224 and its at layer3 do not (benchmarks/results/ablation-export-cost.md).
ABLATION_BYTES = 2 << 30


def _prepare(model: nn.Module, layer: str | None, methods, k: int, input_shape: Sequence[int],
             with_classes: bool, options: dict):
    """The attribution as a function of tensors returning (logits, classes, *maps), an example input, and
    the metadata a loader needs."""
    # All of an image's points in one graph: the chunk size would be a function of the traced batch size. A
    # loaded export bounds memory by calling the graph on fewer images at once (`_in_chunks`).
    check_eval_mode(model)
    if reason := getattr(options.get("output"), "not_exportable", None):  # a target that says why it cannot be
        raise ExportError(f"output: {reason}")
    options = {name: value for name, value in options.items() if name != "sample_batch"}  # the loader's option
    explainer = Explainer(model, layer, methods, **options, sample_batch=None)
    if forwarded := _methods.unexportable(explainer.methods):
        raise ExportError(f"methods: {', '.join(forwarded)} forward a copy of each image per channel or window "
                          "through the whole model, in chunks; an exported graph has no chunks and would hold all "
                          "of them (Score-CAM: one forward per channel of the layer, occlusion: one per window): "
                          "explain them with fastattr.Explainer, and export the other methods")
    param = next(model.parameters())
    shape = tuple(int(s) for s in input_shape[-3:])
    # The tracer gives equal sizes one symbol, so an example batch equal to K, a channel count or the image
    # size would be specialised along with it (and N = 1 always is): take a batch size equal to none.
    n = next(n for n in (5, 7, 11, 13, 17, 19, 23) if n not in (k, *shape, explainer.samples, explainer.steps))
    example = torch.randn(n, *shape, dtype=param.dtype, device=param.device)
    num_classes = explainer.num_classes(example)
    ablated = _check_small_head(explainer, example[:1]) if "ablated_scores" in explainer.reads else None
    targets.resolve(None, k, n, num_classes, example.device)  # checks k as every entry point does

    smooth, integrated = explainer.draws_noise, "path_grads" in explainer.reads

    def attribution(images: Tensor, *rest: Tensor):
        classes = rest[0] if with_classes else None
        noise = rest[-1] if smooth else None
        logits, picked, maps, _, completeness = explainer.attribution(images, classes, k, noise)
        return (logits, picked, *maps, *((completeness,) if integrated else ()))

    example_args = (example,)
    if with_classes:
        example_args += (torch.zeros(n, k, dtype=torch.long, device=param.device),)
    if smooth:
        example_args += (torch.randn(n, explainer.samples, *shape, dtype=param.dtype, device=param.device),)
    meta = {"format": FORMAT, "methods": list(explainer.methods), "k": k, "layer": explainer.layer,
            "input_shape": list(shape), "dtype": str(param.dtype).removeprefix("torch."),
            "num_classes": num_classes, "with_classes": with_classes,
            "inputs": ["images", *(["class_indices"] if with_classes else []), *(["noise"] if smooth else [])],
            "outputs": ["logits", "classes", *explainer.methods, *(["completeness"] if integrated else [])],
            "samples": explainer.samples, "seed": explainer.seed, "noise": explainer.noise, "steps": explainer.steps,
            **({"ablation_forwards": ablated.forwards_worth} if ablated else {})}
    return attribution, example_args, meta


def _check_small_head(explainer: Explainer, image: Tensor) -> perturb.AblationCost:
    """Refuse Ablation-CAM unless its copies fit: the graph runs the head above the layer on all C ablated copies
    of each image at once, which stays small above the last feature map (pooling and a classifier) and grows
    with every stage between a deeper layer and the output."""
    cost = explainer.ablation_cost(image)
    if cost.total_bytes > ABLATION_BYTES:
        raise ExportError(f"methods: ablationcam's export runs the head above {explainer.layer!r} on the "
                          f"{cost.channels} ablated copies of each image at once: {cost.copy_bytes / 2**20:.0f} MiB of "
                          f"copies, and the head writes {cost.head_bytes / 2**20:.0f} MiB on them, an image (at most "
                          f"{ABLATION_BYTES >> 20} MiB in all); export at a layer nearer the output, or explain "
                          "ablationcam with fastattr.Explainer, which runs the copies in chunks")
    return cost


def _traced(model: nn.Module, layer: str | None, methods, k: int, input_shape: Sequence[int], with_classes: bool,
            options: dict, decompositions: dict | None = None):
    """The attribution traced into one graph (`_export.trace`), its example inputs and its metadata.

    Unless `options` name a `k_form`, a backward that stays above the layer is first vmapped over the K
    classes: in onnxruntime one batched MatMul reads a classifier's weight once instead of K times, which
    matters most at batch 1 (docs/performance.md, the onnxruntime section). Where the vmapped trace fixes the
    batch size (it did at resnet's `layer3` and in the ViTs tested) or fails, the K calls are traced instead.
    """
    head_only = _methods.reads(_methods.resolve(methods)) <= {"acts", "acts_grads"}
    forms = [options["k_form"]] if options.get("k_form", "auto") != "auto" else ["vmap", "loop"] if head_only else ["loop"]
    for form in forms:
        attribution, example_args, meta = _prepare(model, layer, methods, k, input_shape, with_classes,
                                                   {**options, "k_form": form})
        try:
            with torch.no_grad():
                traced = _export.trace(attribution, example_args, decompositions)
        except Exception:
            if form == forms[-1]:
                raise
            continue  # an op without a batching rule: the K calls trace without one
        fixed = _export.fixed_batch(traced)
        if fixed is None:
            return traced, example_args, meta
    fix = ("export with k_form='loop'" if form == "vmap" else
           "an op of the model reads the batch size as a number, so the file would take no other batch")
    raise ExportError(f"export: with k_form={form!r} the traced graph fixes the batch size at {fixed}; {fix}")


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
    traced, example_args, meta = _traced(model, layer, methods, k, input_shape, with_classes, options)
    program = _export.to_exported_program(traced, example_args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if aoti:
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(program, package_path=str(path),
                                 inductor_configs={"aot_inductor.metadata": {"fastattr": json.dumps(meta)}})
    else:
        torch.export.save(program, path, extra_files={_EXTRA: json.dumps(meta)})
    return path


def export_onnx(model: nn.Module, path: str | Path, *, layer: str | None = None,
                methods: str | Sequence[str] = ("gradcam", "saliency"), k: int = 5,
                input_shape: Sequence[int] = (3, 224, 224), with_classes: bool = False, opset: int = 18,
                external_data: bool | None = None, **options) -> Path:
    """Write one ONNX model computing logits, the explained classes and the maps, for any batch size.

    Inputs: `images [N, *input_shape]` (and `class_indices [N, k]` int64 with `with_classes=True`); outputs:
    `logits`, `classes`, then one `[N, k, H, W]` map per method, named after it. The backward pass is
    traced into ordinary forward operators (a convolution's input gradient becomes a ConvTranspose).
    Weights are stored once. With `external_data=True`, and always for weights over `EXTERNAL_DATA_BYTES` (1.5 GiB,
    below protobuf's 2 GB limit), they go beside the file as `<path>.data`: keep both together.

    >>> fastattr.export_onnx(model, "resnet18.onnx", layer="layer4", k=5)        # doctest: +SKIP
    >>> out = fastattr.OnnxExplainer("resnet18.onnx")(images)                   # doctest: +SKIP
    """
    import onnx

    traced, example_args, meta = _traced(model, layer, methods, k, input_shape, with_classes, options,
                                         _export.ONNX_DECOMPOSITIONS)
    traced = _export.one_hot_products_as_gathers(_export.resize_ops_for_onnx(traced)).eval()
    try:
        program = torch.onnx.export(traced, example_args, dynamo=True, opset_version=opset, optimize=False,
                                    dynamic_shapes=_export.batch_dims(example_args), verbose=False)
        _optimize(program.model)
        # Named after optimising, as torch.onnx does: the optimiser renames a graph input that is also an output
        # (the given classes are returned as they came).
        for values, names in ((program.model.graph.inputs, meta["inputs"]), (program.model.graph.outputs, meta["outputs"])):
            for value, name in zip(values, names, strict=True):
                value.name = name
    except Exception as exc:
        missing = re.search(r"No ONNX function found for (?:<OpOverload\(op=')?([\w.:]+)", str(exc))
        what = f"operator {missing.group(1)}" if missing else f"{type(exc).__name__}: {str(exc)[:500]}"
        raise ExportError(f"export: {what} in the attribution graph of {type(model).__name__} (layer "
                          f"{meta['layer']!r}, methods {meta['methods']}) has no ONNX translation") from exc
    program.model.metadata_props["fastattr"] = json.dumps(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _initializer_bytes(program.model) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external_data)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _initializer_bytes(model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def _optimize(model) -> None:
    """onnxscript's optimiser as torch.onnx runs it (constant folding, its rewrite rules, dead code and
    duplicates removed), less its Slice-to-Split rule: on densenet121's backward, whose concatenations'
    gradients are hundreds of Slices, that rule took a large share of the export's time and rewrote nothing. An
    onnxscript without these names gets its whole optimiser."""
    from onnxscript import optimizer

    try:
        import onnx_ir.passes.common as common
        from onnxscript import rewriter
        from onnxscript.optimizer import _constant_folding as folding
        from onnxscript.rewriter.rules.common import _basic_rules

        rules = [rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule is not _basic_rules.slice_split_rule]
        fold = folding.FoldConstantsPass(shape_inference=True, input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                         output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT)
        rounds = optimizer.ir.passes.PassManager([fold, rewriter.RewritePass(rules), common.RemoveUnusedNodesPass(),
                                                  common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
                                                 steps=2, early_stop=True)
        passes = [common.InlinePass(), rounds, common.RemoveUnusedNodesPass(),
                  common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                  common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
                  common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass()]
    except (ImportError, AttributeError):
        optimizer.optimize_ir(model)
        return
    optimizer.ir.passes.Sequential(*passes)(model)


def _check_inputs(meta: dict, images: Tensor, classes: Tensor | None, noise: Tensor | None) -> tuple[Tensor, ...]:
    """The graph's inputs: the images, the classes when it takes them, and SmoothGrad's draw when it reads one
    (drawn from the export's seed unless given)."""
    args = _images_and_classes(meta, images, classes)
    if "noise" not in meta["inputs"]:
        if noise is not None:
            raise InputError(f"noise: only SmoothGrad reads noise, and this export's methods are {meta['methods']}")
        return args
    expected = (images.shape[0], meta["samples"], *images.shape[1:])
    if noise is None:
        return (*args, draw_noise(images, meta["samples"], meta["seed"]))
    if not isinstance(noise, Tensor) or tuple(noise.shape) != expected or noise.dtype != images.dtype:
        got = f"{list(noise.shape)} {noise.dtype}" if isinstance(noise, Tensor) else type(noise).__name__
        raise InputError(f"noise: this export takes a standard-normal draw {list(expected)} {images.dtype}, got {got}")
    return (*args, noise)


def _explanation(meta: dict, outputs: list[Tensor]) -> Explanation:
    logits, picked, *rest = outputs
    completeness = rest.pop() if "completeness" in meta["outputs"] else None
    return Explanation(logits, picked, dict(zip(meta["methods"], rest)), meta["layer"], completeness=completeness)


def _images_and_classes(meta: dict, images: Tensor, classes: Tensor | None) -> tuple[Tensor, ...]:
    shape, k = tuple(meta["input_shape"]), meta["k"]
    if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != shape:
        got = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"images: this export takes [N, {', '.join(map(str, shape))}], got {got}; "
                         "export again with input_shape= for another size")
    if images.dtype != getattr(torch, meta["dtype"]):
        raise InputError(f"images: this export takes torch.{meta['dtype']}, got {images.dtype}")
    check_finite(images)
    if not meta["with_classes"]:
        if classes is not None:
            raise InputError(f"classes: this export picks the top-{k} classes itself; export it with "
                             "with_classes=True to pass classes")
        return (images,)
    if not isinstance(classes, Tensor) or tuple(classes.shape) != (images.shape[0], k) or classes.dtype.is_floating_point:
        got = f"{list(classes.shape)} {classes.dtype}" if isinstance(classes, Tensor) else repr(classes)
        raise InputError(f"classes: this export takes integer class indices [N, {k}], got {got}")
    # The graph gathers rows of the classifier's weight by these indices: they are checked where every caller's are.
    targets.resolve(classes, None, images.shape[0], meta["num_classes"], classes.device)
    return images, classes.to(torch.long)


def _in_chunks(meta: dict, sample_batch: int | None, args: tuple[Tensor, ...], run) -> Explanation:
    """`run(*args)` on at most max(1, sample_batch // points) images at a time, where `points` are the sampled copies
    of each image the export sends through the network (SmoothGrad's samples, IG's steps; Ablation-CAM's
    copies count as the forwards of images whose memory they take): the memory an Explainer's chunks bound,
    bounded for an export by calling it on fewer images. Outputs are batch first."""
    points = max(meta["samples"] if "noise" in meta["inputs"] else 1,
                 meta["steps"] if "completeness" in meta["outputs"] else 1, meta.get("ablation_forwards", 1))
    n = args[0].shape[0]
    step = images_per_call(points, sample_batch, n)
    if step >= n:
        return _explanation(meta, list(run(*args)))
    parts = [list(run(*(a[i:i + step] for a in args))) for i in range(0, n, step)]
    return _explanation(meta, [torch.cat(outputs) for outputs in zip(*parts)])


def _check_sample_batch(sample_batch: int | None) -> int | None:
    return None if sample_batch is None else at_least("sample_batch", sample_batch, 1)


def _checked(meta: dict, path: Path) -> dict:
    if meta.get("format") != FORMAT:
        raise InputError(f"path: {str(path)!r} holds format {meta.get('format')!r}, this fastattr reads {FORMAT!r}")
    forwards = meta.get("ablation_forwards", 1)
    if isinstance(forwards, bool) or not isinstance(forwards, int) or forwards < 1:
        raise InputError(f"path: {str(path)!r} gives ablation_forwards {forwards!r}, not a positive integer; "
                         "export the file again")
    return meta


class Program:
    """A saved attribution graph, loaded. Call it like an `Explainer`: `program(images, classes=None)`.

    Thread-safe: the loaded graph keeps no state between calls.
    """

    def __init__(self, run, meta: dict, path: Path, sample_batch: int | None = SAMPLE_BATCH):
        self._run, self.meta, self.path = run, meta, path
        self.sample_batch = _check_sample_batch(sample_batch)
        self.methods: tuple[str, ...] = tuple(meta["methods"])
        self.k: int = meta["k"]
        self.dtype = getattr(torch, meta["dtype"])

    def __repr__(self) -> str:
        return f"Program({str(self.path)!r}, methods={self.methods}, k={self.k}, layer={self.meta['layer']!r})"

    def __call__(self, images: Tensor, classes: Tensor | None = None, noise: Tensor | None = None) -> Explanation:
        args = _check_inputs(self.meta, images, classes, noise)
        with torch.inference_mode():
            return _in_chunks(self.meta, self.sample_batch, args, self._run)


class _Archive(NamedTuple):
    """What a .pt2 archive says of itself, read as a zip archive: nothing in it is loaded or run."""

    aoti: bool           # it holds an AOTInductor model, a shared library that any torch loader of it loads
    meta: dict           # fastattr's metadata, checked
    device: str | None   # the AOTInductor model's device
    has_library: bool    # the AOTInductor model is compiled (without, torch's loader compiles its C++ source)


def load_program(path: str | Path, *, trusted: bool = False, sample_batch: int | None = SAMPLE_BATCH) -> Program:
    """Load what `export_program` saved (a torch.export program or an AOTInductor package).

    Loading a .pt2 runs code the file holds: an AOTInductor package's shared library runs as it is loaded, and
    `torch.export.load` unpickles parts of a program and evaluates its shape expressions. So a file is loaded
    only with `trusted=True`: pass it for files you made or whose maker you trust. Without it the metadata is
    still read and checked (as a zip archive, which runs nothing), so that a file that is not a fastattr
    program is told so, and an `InputError` says why the file is not loaded.

    `sample_batch`, for an export of SmoothGrad or IG, bounds the images one call of the graph sees: it runs on
    max(1, sample_batch // points) images at a time (points: samples or steps), as the Explainer's chunks do.
    """
    path = Path(path)
    if not isinstance(trusted, bool):
        raise InputError(f"trusted: expected True or False, got {trusted!r}")
    if not path.is_file():
        raise InputError(f"path: no file {str(path)!r}")
    archive = _read_archive(path)
    if not trusted:
        raise InputError(_untrusted(path, archive.aoti))
    if archive.aoti:
        return Program(_load_aoti(path, archive), archive.meta, path, sample_batch)
    return Program(_load_exported(path).module(), archive.meta, path, sample_batch)


def _untrusted(path: Path, aoti: bool) -> str:
    what = ("an AOTInductor package: it holds native code (a shared library) that runs as it is loaded" if aoti else
            "a torch.export program: torch.export.load unpickles parts of it and evaluates its shape expressions, "
            "and either can run any code")
    return f"path: {str(path)!r} is {what}; {_TRUST_HOW}"


def _read_archive(path: Path) -> _Archive:
    """The kind, metadata and library of the .pt2 at `path`, read with zipfile only."""
    try:
        with zipfile.ZipFile(path) as archive:
            # torch writes every entry under one top folder, named after the file, and reads them below it.
            entries = {info.filename.partition("/")[2]: info for info in archive.infolist() if not info.is_dir()}
            aoti = any(name.startswith(_AOTI_FOLDER) for name in entries)
            outer = _aoti_metadata(archive, entries) if aoti else {}
            text = outer.get("fastattr") if aoti else (
                _read_text(archive, entries[_PROGRAM_META]) if _PROGRAM_META in entries else None)
            meta = json.loads(text) if isinstance(text, str) else None
    except Exception as exc:  # noqa: BLE001 - a zip, JSON or UTF-8 error: whatever it is, not fastattr's program
        raise InputError(f"path: {str(path)!r} is not a fastattr program ({type(exc).__name__}: {_first_line(exc)}); "
                         "write one with fastattr.export_program") from None
    if not isinstance(meta, dict):
        kind = ("an AOTInductor package" if aoti else
                "a torch.export program" if "models/model.json" in entries else "a zip archive")
        raise InputError(f"path: {str(path)!r} is {kind} but not a fastattr program; write one with "
                         "fastattr.export_program")
    library = any(name.startswith(_AOTI_MODEL) and name.endswith(".so") for name in entries)
    return _Archive(aoti, _checked(meta, path), outer.get("AOTI_DEVICE_KEY"), library)


def _aoti_metadata(archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo]) -> dict:
    """The metadata torch's loader reads for the package's model (the wrapper's), or {} when it has none."""
    names = sorted((name for name in entries if name.startswith(_AOTI_MODEL) and name.endswith("_metadata.json")),
                   key=lambda name: not name.endswith("wrapper_metadata.json"))
    for name in names:
        outer = json.loads(_read_text(archive, entries[name]))
        if isinstance(outer, dict) and "fastattr" in outer:
            return outer
    return {}


def _read_text(archive: zipfile.ZipFile, entry: zipfile.ZipInfo) -> str:
    # Read up to the limit whatever size the entry claims: a crafted archive can claim any.
    with archive.open(entry) as file:
        data = file.read(_META_MAX_BYTES + 1)
    if len(data) > _META_MAX_BYTES:
        raise ValueError(f"{entry.filename} is larger than fastattr's metadata")
    return data.decode("utf-8")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _load_exported(path: Path) -> Any:
    try:
        return torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch's own error, reported with the file
        raise InputError(f"path: {str(path)!r}: torch.export.load could not load it ({type(exc).__name__}: "
                         f"{_first_line(exc)}); export it again with this torch ({torch.__version__})") from None


def _load_aoti(path: Path, archive: _Archive) -> Any:
    """The package, loaded by torch's AOTInductor loader in a temporary folder of fastattr's own.

    The loader extracts the package into a new folder under TMPDIR, and removes it when the loaded package is
    released but not when loading fails. So it runs with TMPDIR pointing at a folder made here, which is
    removed when the load fails or the package is released.
    """
    if not archive.has_library:
        raise InputError(f"path: {str(path)!r} holds no compiled library, which fastattr's packages do (torch's "
                         "loader would compile the package's C++ with commands the package gives); export it "
                         "again with aoti=True")
    if archive.device not in ("cpu", "cuda") or (archive.device == "cuda" and not torch.cuda.is_available()):
        raise InputError(f"path: {str(path)!r} was compiled for device {archive.device!r}, which this torch cannot "
                         "run; export it again on this machine's device")
    from torch._inductor import aoti_load_package

    # mkdtemp fixes Python's own temporary folder first, so that TMPDIR changed below does not move it.
    folder = tempfile.mkdtemp(prefix="fastattr-aoti-")
    try:
        package = _with_tmpdir(folder, lambda: aoti_load_package(str(path)))
    except Exception as exc:  # noqa: BLE001 - the loader's own error, reported with the file
        raise InputError(f"path: {str(path)!r}: the AOTInductor package did not load ({type(exc).__name__}: "
                         f"{_first_line(exc)}); export it again with this torch ({torch.__version__})") from None
    weakref.finalize(package, shutil.rmtree, folder, True)
    return package


def _with_tmpdir(folder: str, load: Callable[[], Any]) -> Any:
    """`load()` with TMPDIR set to `folder`, which is removed if it fails."""
    try:
        with _tmpdir(folder):
            return load()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@contextlib.contextmanager
def _tmpdir(folder: str) -> Iterator[None]:
    with _TMPDIR_LOCK:
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = folder
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = before


class OnnxExplainer:
    """An ONNX export run in onnxruntime, returning the same `Explanation` as the torch path.

    Thread-safe: onnxruntime sessions take concurrent `run` calls. `sample_batch` bounds the images one run of an
    export of SmoothGrad or IG sees, as in `load_program`.

    >>> explainer = fastattr.OnnxExplainer("resnet18.onnx", providers=["CPUExecutionProvider"])  # doctest: +SKIP
    >>> out = explainer(images)        # out.logits, out.classes, out.maps["gradcam"]              # doctest: +SKIP
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, *, sample_batch: int | None = SAMPLE_BATCH,
                 **session_options):
        import onnxruntime as ort

        self.path, self.sample_batch = Path(path), _check_sample_batch(sample_batch)
        if not self.path.is_file():
            raise InputError(f"path: no file {str(self.path)!r}")
        options = ort.SessionOptions()
        for name, value in session_options.items():
            setattr(options, name, value)
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001
            reason = " ".join(str(exc).split())[:300]  # onnxruntime's own words name the node and type it lacks
            # A file onnxruntime reads but has no kernel for (its CPU provider has no float64 convolution, so a
            # float64 model's export) needs another dtype, not another file.
            fix = ("export the model in float32 (model.float()): these providers have no kernel for one of its "
                   "operators at its dtype" if type(exc).__name__ == "NotImplemented" else
                   "write one with fastattr.export_onnx")
            raise InputError(f"path: {str(self.path)!r} is not an ONNX model onnxruntime can load "
                             f"({type(exc).__name__}: {reason}); {fix}") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get("fastattr")
        if not meta:
            raise InputError(f"path: {str(self.path)!r} is an ONNX model but not a fastattr export; "
                             "write one with fastattr.export_onnx")
        self.meta = _checked(json.loads(meta), self.path)
        self.methods: tuple[str, ...] = tuple(self.meta["methods"])
        self.k: int = self.meta["k"]

    def __repr__(self) -> str:
        return f"OnnxExplainer({str(self.path)!r}, methods={self.methods}, k={self.k}, layer={self.meta['layer']!r})"

    def __call__(self, images: Tensor, classes: Tensor | None = None, noise: Tensor | None = None) -> Explanation:
        args = _check_inputs(self.meta, images, classes, noise)
        return _in_chunks(self.meta, self.sample_batch, args, self._run)

    def _run(self, *args: Tensor) -> list[Tensor]:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.meta["inputs"], args)}
        return [torch.from_numpy(a) for a in self.session.run(self.meta["outputs"], feeds)]
