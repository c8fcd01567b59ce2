"""Ahead-of-time attribution graphs for servers: save once, load and run without the model's class.

`export_program` writes the whole attribution (forward, K-class backward, methods, post-processing) as a
torch.export program (`.pt2`, loaded by `torch.export.load`) or, with `aoti=True`, as an AOTInductor
package (compiled C++, loaded by `torch._inductor.aoti_load_package`). `load_program` loads either and
returns the same `Explanation` as the torch path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import _export, methods as _methods, targets
from .errors import ExportError, InputError
from .explain import Explainer, Explanation, draw_noise

FORMAT = "fastattr-program/1"
_EXTRA = "fastattr.json"


def _prepare(model: nn.Module, layer: str | None, methods, k: int, input_shape: Sequence[int],
             with_classes: bool, options: dict):
    """The attribution as a function of tensors returning (logits, classes, *maps), an example input, and
    the metadata a loader needs."""
    explainer = Explainer(model, layer, methods, **options)
    param = next(model.parameters())
    shape = tuple(int(s) for s in input_shape[-3:])
    # The tracer gives equal sizes one symbol, so an example batch equal to K, a channel count or the image
    # size would be specialised along with it (and N = 1 always is): take a batch size equal to none.
    n = next(n for n in (5, 7, 11, 13, 17, 19, 23) if n not in (k, *shape, explainer.samples, explainer.steps))
    example = torch.randn(n, *shape, dtype=param.dtype, device=param.device)
    num_classes = explainer.num_classes(example)
    targets.resolve(None, k, n, num_classes, example.device)  # checks k as every entry point does

    smooth, integrated = "noisy_grads" in explainer.reads, "path_grads" in explainer.reads

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
            "samples": explainer.samples, "seed": explainer.seed, "noise": explainer.noise, "steps": explainer.steps}
    return attribution, example_args, meta


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
    Weights are stored once. With `external_data=True`, and always for a model over 2 GB (protobuf's limit),
    they go beside the file as `<path>.data`: keep both together.

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
    program.save(str(path), external_data=external_data)
    onnx.checker.check_model(str(path), full_check=True)
    return path


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


def _checked(meta: dict, path: Path) -> dict:
    if meta.get("format") != FORMAT:
        raise InputError(f"path: {str(path)!r} holds format {meta.get('format')!r}, this fastattr reads {FORMAT!r}")
    return meta


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

    def __call__(self, images: Tensor, classes: Tensor | None = None, noise: Tensor | None = None) -> Explanation:
        args = _check_inputs(self.meta, images, classes, noise)
        with torch.inference_mode():
            return _explanation(self.meta, list(self._run(*args)))


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


class OnnxExplainer:
    """An ONNX export run in onnxruntime, returning the same `Explanation` as the torch path.

    Thread-safe: onnxruntime sessions take concurrent `run` calls.

    >>> explainer = fastattr.OnnxExplainer("resnet18.onnx", providers=["CPUExecutionProvider"])  # doctest: +SKIP
    >>> out = explainer(images)        # out.logits, out.classes, out.maps["gradcam"]              # doctest: +SKIP
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, **session_options):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"path: no file {str(self.path)!r}")
        options = ort.SessionOptions()
        for name, value in session_options.items():
            setattr(options, name, value)
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"path: {str(self.path)!r} is not an ONNX model onnxruntime can load "
                             f"({type(exc).__name__}); write one with fastattr.export_onnx") from None
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
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.meta["inputs"], args)}
        return _explanation(self.meta, [torch.from_numpy(a) for a in self.session.run(self.meta["outputs"], feeds)])
