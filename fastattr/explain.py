"""The public entry points: `explain` for one call, `Explainer` for many."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from . import compiling, graph, methods as _methods, perturb, postprocess, targets as _targets, tokens
from .errors import CompileError, FastattrError, InputError, MethodError, TargetError, at_least
from .graph import OutputSelector
from .guided import guided_split
from .layers import default_layer, get_layer

__all__ = ["Explanation", "Explainer", "explain", "clear_cache"]

log = logging.getLogger("fastattr")


@dataclass(frozen=True)
class Explanation:
    """Prediction and explanation from one call, batch first.

    logits:  `[N, num_classes]`, the model's output for the images (the target's scores `[N, M]` when the
             explainer's `output=` is a target of `fastattr.targets`).
    classes: `[N, K]`, the class indices explained, in the order of `maps`' K axis.
    maps:    method name -> `[N, K, H, W]` (the input's size when upsampled, else the layer's size).
    layer:   the target layer's module path (None when only input methods ran).
    grads:   with `keep_grads=True`: "layer" -> `[N, K, C, h, w]` and/or "input" -> `[N, K, C, H, W]`,
             the raw gradients of each explained logit.
    completeness: with "ig": `[N, K]`, the sum of Integrated Gradients' attributions minus
             logit(image) - logit(baseline); 0 for the exact integral, so it measures the quadrature's error.
    real:    with `k=fastattr.targets.Above(t)`: `[N, K]` bool, True where the class's score exceeds t (False on
             the entries that pad an image with fewer such classes to K).
    """

    logits: Tensor
    classes: Tensor
    maps: dict[str, Tensor]
    layer: str | None
    grads: dict[str, Tensor] = field(default_factory=dict)
    completeness: Tensor | None = None
    real: Tensor | None = None

    def cpu(self) -> Explanation:
        """This explanation detached and on the CPU, floating tensors as float32: for encoding and drawing."""
        def host(t: Tensor) -> Tensor:
            t = t.detach().cpu()
            return t.float() if t.is_floating_point() else t
        return Explanation(host(self.logits), host(self.classes), {m: host(v) for m, v in self.maps.items()},
                           self.layer, {n: host(g) for n, g in self.grads.items()},
                           None if self.completeness is None else host(self.completeness),
                           None if self.real is None else host(self.real))


# SmoothGrad's noisy copies per image and noise (a fraction of each image's value range), Integrated
# Gradients' quadrature points: the defaults of Explainer and of the command line and serve app's options.
# An export fixes them.
SAMPLING = {"samples": 16, "noise": 0.15, "steps": 32}
# Occlusion's window and stride (None: half the window), in pixels; no export holds occlusion.
OCCLUSION = {"window": 16, "stride": None}
# The most images one chunk of SmoothGrad's or IG's points, or of the perturbation methods' copies, sends
# through the network, a run-time option that no export fixes. A chunk of this size is a batch any front end
# already runs, and chunks this large run as fast as one pass over all points or faster
# (benchmarks/results/cpu-sampling.json).
SAMPLE_BATCH = 16


def _first(model: nn.Module, kind: type) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, kind)), None)


class Explainer:
    """A reusable, thread-safe explainer: the model split at `layer` once, then one pass per call.

    Args:
        model: a classifier returning logits `[N, num_classes]` (or any model, with a target as `output`). It is used as it is:
            put it in eval mode yourself. It is never modified: no hooks, no `requires_grad`, mode or
            `.grad` change, so it can be shared with plain inference and with other threads.
        layer: module path of the target layer for layer methods (Grad-CAM), as `model.get_submodule`
            takes it; default: the last child module holding a convolution (`layer4` for a ResNet).
        methods: names from `fastattr.METHODS`, e.g. ("gradcam", "saliency"); all share one forward and
            one backward.
        output: the scores to explain, `[N, M]`, from the model's output: a key or an index (a model returning a
            tuple or dict), or a target, any function `output -> [N, M]`: `fastattr.targets.segmentation()`,
            `.multilabel`, `.similarity(reference)` or your own. `classes=` and `k=` pick among the M scores.
        upsample: resize layer maps bilinearly to the input's size.
        normalize: min-max normalise each map to [0, 1] as the article does, at the method's own resolution
            (the layer's, for Grad-CAM) and before upsampling, so an upsampled map is the article's map resized
            (its extremes may then fall between output pixels, a little inside [0, 1]).
        k_form: how the K-class backward runs: "loop" (one vjp function called K times) or "vmap";
            "auto" picks "loop", the faster on CPU by measurement (benchmarks/results).
        keep_grads: also return the raw gradients in `Explanation.grads`.
        compile: True, or a dict of `torch.compile` options (`mode`, `dynamic`, `backend`, `options`), to
            run the whole attribution — forward, K-class backward, methods, post-processing — as one
            `torch.compile(fullgraph=True)` graph. The first call per input signature compiles (tens of
            seconds on CPU): call `warmup` first; `compile_seconds` records what each took. The batch
            dimension is symbolic from the first call (after a first call with N = 1, N >= 2 compiles
            once more), so new batch sizes do not recompile; every other shape, the dtype and K are
            static, and each K compiles a graph of its own. torch.compile keeps up to
            `torch._dynamo.config.recompile_limit` (8) graphs per explainer; past that, new signatures
            run eagerly, with a warning. Keep the K values and image sizes per explainer few.
        dtype: torch.bfloat16 or torch.float16 to run the model under autocast (maps and logits come back
            in the images' dtype); None runs in the model's own dtype.
        samples, noise, seed: SmoothGrad's noisy copies per image, the noise's standard deviation as a
            fraction of each image's value range (max - min), and the seed its standard-normal draw starts
            from on every call (so an image explained twice gets the same map; None: torch's global RNG).
            Pass `noise=` to a call to give the draw `[N, samples, C, H, W]` yourself.
        steps, baseline: Integrated Gradients' Gauss-Legendre points on the path from `baseline` (a number,
            or a tensor `[C, H, W]`) to the image, as captum's default method places them; occlusion sets its
            windows to the same baseline.
        window, stride: occlusion's square window and how far it slides (default half the window), in pixels,
            as captum's `Occlusion` places them.
        sample_batch: the most images one chunk of SmoothGrad's or IG's pass, or of the perturbation methods'
            copies (ablationcam, scorecam, occlusion), sends through the network. The
            N * samples (N * steps) points run in chunks of max(1, sample_batch // N) points per image, one
            chunk's autograd state alive at a time, so memory stays that of a batch of max(N, sample_batch)
            whatever `samples` and `steps` are; the maps equal one unchunked pass up to summation order.
            None runs all points at once. A compiled explainer runs all of an image's points in its graph
            (so that batch sizes share one graph) and calls it on max(1, sample_batch // points) images
            at a time.
        reshape: how the layer's activation becomes `[N, C, h, w]`, for a layout fastattr does not read
            itself. It reads feature maps, Swin's channels-last maps and ViT tokens (`[N, prefix + h*w, C]`,
            the grid from the model's patch size and the image's size; see `fastattr.tokens`).

    Methods reading the same tensors share one pass: any mix of the CAMs, "saliency" and "inputxgrad" costs one
    forward and one K-class backward. "smoothgrad" adds a pass over `samples` noisy copies, "ig" one over
    `steps` path points (each folded into the batch), and "guided"/"guided-gradcam" one through the
    guided-ReLU graph.

    >>> explainer = fastattr.Explainer(model.eval(), layer="layer4", methods=("gradcam", "saliency"))
    >>> out = explainer(images, k=3)          # or classes=281, [281, 285], tensor[N] or tensor[N, K]
    >>> out.maps["gradcam"].shape             # [N, 3, H, W]
    """

    def __init__(self, model: nn.Module, layer: str | None = None, methods: str | Sequence[str] = ("gradcam",), *,
                 output: OutputSelector = None, upsample: bool = True, normalize: bool = True,
                 k_form: Literal["auto", "loop", "vmap"] = "auto", keep_grads: bool = False,
                 compile: bool | dict = False, dtype: torch.dtype | None = None,
                 samples: int = SAMPLING["samples"], noise: float = SAMPLING["noise"], seed: int | None = 0,
                 steps: int = SAMPLING["steps"], baseline: float | Tensor = 0.0,
                 sample_batch: int | None = SAMPLE_BATCH, window: int = OCCLUSION["window"],
                 stride: int | None = OCCLUSION["stride"], reshape: tokens.Reshape | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if k_form not in ("auto", "loop", "vmap"):
            raise MethodError(f"k_form: expected 'auto', 'loop' or 'vmap', got {k_form!r}")
        self.model = model
        self.methods = _methods.resolve(methods)
        self.reads = _methods.reads(self.methods)
        if self.reads & {"acts", "acts_grads"}:
            self.layer = default_layer(model) if layer is None else layer
            get_layer(model, self.layer)
        else:
            self.layer = None
        self._layout = tokens.layout_of(model, reshape)
        self.split = graph.split(model, self.layer, output)
        self._whole = graph.split(model, None, output)
        self._guided = guided_split(model, output) if "guided_grads" in self.reads else None
        self.upsample, self.normalize, self.keep_grads = upsample, normalize, keep_grads
        self._grad_names = [n for n, read in (("layer", "acts_grads"), ("input", "input_grads")) if read in self.reads]
        self.samples, self.noise, self.seed = _count("samples", samples), _at_least_zero("noise", noise), seed
        self.steps, self.baseline = _count("steps", steps), _baseline(baseline)
        self._path = _methods.gauss_legendre(self.steps)
        self._sampled = sorted(self.reads & _methods.SAMPLED.keys())
        # Whether calls take a standard-normal draw `[N, samples, C, H, W]` (an input of compiled and exported graphs).
        self.draws_noise = any(_methods.SAMPLED[name].along == "noise" for name in self._sampled)
        self._walks_path = any(_methods.SAMPLED[name].along == "path" for name in self._sampled)
        self.sample_batch = None if sample_batch is None else _count("sample_batch", sample_batch)
        self.window = _count("window", window)
        self.stride = max(1, self.window // 2) if stride is None else _count("stride", stride)
        perturb.check_stride(self.window, self.stride)
        self._check_perturbation(reshape, compile)
        self.k_form: graph.KForm = "loop" if k_form == "auto" else k_form
        self._stem = _first(model, nn.modules.conv._ConvNd)
        self._param = next(model.parameters(), None)
        self._num_classes: dict[tuple, int] = {}
        self._lock = threading.Lock()
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise InputError(f"dtype: expected None, torch.bfloat16 or torch.float16, got {dtype}")
        self.dtype = dtype
        self.compile_seconds: dict[tuple, float] = {}
        self._past_limit: set[tuple] = set()
        self._compiled = None
        self._cudagraphs = False
        # The forwards of perturbed copies: the whole model (Score-CAM, occlusion) and the head above the layer
        # (Ablation-CAM), compiled on their own when the explainer's methods are perturbation methods.
        self._forward, self._head = self._whole.head, self.split.head
        if compile:
            options = {} if compile is True else dict(compile)
            if not self.split.traced:
                raise CompileError(
                    f"compile: {type(model).__name__} runs on the eager hook path (torch.fx could not trace it), "
                    "which cannot be compiled; make the forward traceable or use compile=False")
            device = self._param.device if self._param is not None else None
            if _methods.perturbed(self.methods):
                self._forward = compiling.compile_forward(self._whole.head, device=device, **options)
                self._head = compiling.compile_forward(self.split.head, device=device, **options)
            else:
                self._compiled = compiling.compile_fullgraph(self.attribution, device=device, **options)
                self._cudagraphs = compiling.replays_cuda_graphs(device, **options)

    def _check_perturbation(self, reshape: tokens.Reshape | None, compile: bool | dict) -> None:
        perturbed = _methods.perturbed(self.methods)
        if not perturbed:
            return
        others = [m for m in self.methods if m not in perturbed]
        if compile and others:
            raise CompileError(f"compile: {', '.join(perturbed)} compile the forward of each chunk of perturbed copies "
                               f"and run eagerly between chunks, while {', '.join(others)} compile into one graph; "
                               "make one explainer of each kind")
        if "ablated_scores" in self.reads and not self.split.traced:
            raise MethodError(f"methods: ablationcam runs the model's head above {self.layer!r} on the ablated "
                              f"activations, which needs a model torch.fx can trace, and {type(self.model).__name__} "
                              "runs on the eager hook path; use scorecam or a gradient CAM")
        if "ablated_scores" in self.reads and reshape is not None:
            raise MethodError("methods: ablationcam zeroes channels of the layer's own activation, whose channel axis "
                              "fastattr cannot know with reshape=; use scorecam or a gradient CAM")

    def __repr__(self) -> str:
        return (f"Explainer({type(self.model).__name__}, layer={self.layer!r}, methods={self.methods}, "
                f"k_form={self.k_form!r}, traced={self.split.traced})")

    def __call__(self, images: Tensor, classes: _targets.Classes = None, k: int | _targets.Above | None = None,
                 noise: Tensor | None = None) -> Explanation:
        """Explain `images [N, C, H, W]` for `classes` (see `fastattr.targets`), the top-`k` classes, or with
        `k=fastattr.targets.Above(t)` every class scoring above t."""
        self.check_images(images)
        check_eval_mode(self.model)
        num_classes = self.num_classes(images)
        if isinstance(k, _targets.Above):
            if classes is not None:
                raise TargetError("classes and k: got both (k=Above); pass classes= to name them or k=Above(t) to "
                                  "take those above t, not both")
            classes, real = _targets.passing(self._scores(images), k.threshold, k.at_most)
            k = None
        else:
            real = None
        target = _targets.resolve(classes, k, images.shape[0], num_classes, images.device)
        if noise is not None:
            self._check_noise(images, noise)
        if "occlusion_drops" in self.reads:
            perturb.check_window_fits(self.window, tuple(images.shape[-2:]))
        takes_baseline = "occlusion_drops" in self.reads or self._walks_path
        if takes_baseline and isinstance(self.baseline, Tensor) \
                and tuple(self.baseline.shape[-3:]) != tuple(images.shape[1:]):
            raise InputError(f"baseline: shape {list(self.baseline.shape)} does not match the images "
                             f"{list(images.shape[1:])}; give a baseline [C, H, W] of the images' size")
        out = self._run(images, target.classes, target.k, noise)
        return out if real is None else dataclasses.replace(out, real=real)

    def _scores(self, images: Tensor) -> Tensor:
        """The target's scores `[N, M]`, without autograd (in the explainer's autocast dtype)."""
        with torch.no_grad(), torch.autocast(images.device.type, dtype=self.dtype or torch.bfloat16,
                                             enabled=self.dtype is not None):
            return self._whole.head(images).to(images.dtype)

    def _run(self, images: Tensor, classes: Tensor | None, k: int, noise: Tensor | None = None) -> Explanation:
        # The checked inputs through the compiled graph, when there is one, else eagerly.
        if self.draws_noise and noise is None:
            noise = draw_noise(images, self.samples, self.seed)
        if self._compiled is None:
            logits, classes, maps, grads, completeness = self.attribution(images, classes, k, noise)
        else:
            # The compiled graph runs all of an image's points at once (a chunk count that depends on the batch
            # size would compile a graph per batch size); fewer images per call bound its memory instead.
            points = self._points_per_image()
            step = images_per_call(points, self.sample_batch, images.shape[0])
            parts = [self._run_compiled(images[i:i + step], None if classes is None else classes[i:i + step], k,
                                        None if noise is None else noise[i:i + step])
                     for i in range(0, images.shape[0], step)]
            logits, classes, maps, grads, completeness = _concatenated(parts)
        return Explanation(logits, classes, dict(zip(self.methods, maps)), self.layer,
                           dict(zip(self._grad_names, grads)), completeness)

    def warmup(self, images: Tensor, classes: _targets.Classes = None, k: int | None = None) -> float:
        """Run once on `images` (compiling, when compiled, for that signature) and return the seconds it took.

        >>> seconds = fastattr.Explainer(model, compile=True).warmup(images, k=5)  # doctest: +SKIP
        """
        start = time.perf_counter()
        self(images, classes=classes, k=k)
        return time.perf_counter() - start

    def prepare(self, image_shape: Sequence[int], k: int, named: Sequence[bool] = (False, True)) -> float:
        """Run once for every graph that calls on images `[N, *image_shape]` at this `k` can need — N = 1 and
        N >= 2 (the compiled batch dimension turns symbolic after N = 1), the top-k (`named` False) and named
        classes (True) — so that no request pays for a compile. Returns the seconds it took.

        >>> fastattr.Explainer(model, compile=True).prepare((3, 224, 224), k=5)   # doctest: +SKIP
        """
        start = time.perf_counter()
        device = self._param.device if self._param is not None else None
        dtype = self._param.dtype if self._param is not None else torch.float32
        for n in (1, 2):
            images = torch.zeros(n, *image_shape, dtype=dtype, device=device)
            for given in named:
                if given:
                    self(images, classes=torch.zeros(n, k, dtype=torch.long, device=device))
                else:
                    self(images, k=k)
        return time.perf_counter() - start

    def _run_compiled(self, images: Tensor, classes: Tensor | None, k: int, noise: Tensor | None):
        signature = (tuple(images.shape), images.dtype, str(images.device), k, classes is None)
        if signature in self._past_limit:
            return self.attribution(images, classes, k, noise)
        images, classes, noise = compiling.mark_batch_dynamic(images, classes, noise)
        if signature in self.compile_seconds:
            return self._call_compiled(images, classes, k, noise)
        with self._lock:  # one compile per signature, even when threads arrive together
            start = time.perf_counter()
            try:
                result = self._call_compiled(images, classes, k, noise)
            except Exception as exc:
                if not _past_recompile_limit(exc):
                    raise
                self._past_limit.add(signature)
                warnings.warn(f"fastattr: this explainer reached torch.compile's recompile limit "
                              f"({torch._dynamo.config.recompile_limit} graphs), so images {list(images.shape)}, "
                              f"k={k} run eagerly; keep the image sizes and K values per explainer few, or raise "
                              "torch._dynamo.config.recompile_limit", stacklevel=3)
                return self.attribution(images, classes, k, noise)
            if signature not in self.compile_seconds:
                self.compile_seconds[signature] = seconds = time.perf_counter() - start
                log.info("fastattr: first compiled call for images %s %s, k=%d took %.1f s (compiling, unless a graph "
                         "for this shape existed)",
                         list(images.shape), images.dtype, k, seconds)
            return result

    def _call_compiled(self, *args):
        if not self._cudagraphs:
            return self._compiled(*args)
        # A CUDA graph's replay writes its outputs into the same memory as the last one: without a copy, a
        # caller's earlier Explanation would change under it (torch raises on reading it).
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map_only(Tensor, Tensor.clone, self._compiled(*args))

    def attribution(self, images: Tensor, classes: Tensor | None, k: int, noise: Tensor | None = None):
        """The attribution as one pure function of tensors, unchecked: what torch.compile and the exporters see.

        `classes [N, K]` (int64, on the images' device) or None for the top-`k`; `noise` SmoothGrad's draw when a
        method reads it. Returns (logits, classes, maps in `methods` order, raw gradients when `keep_grads`,
        IG's completeness error or None). Call the explainer itself for checked inputs and an `Explanation`.

        >>> logits, classes, maps, grads, completeness = explainer.attribution(images, None, 3)  # doctest: +SKIP
        """
        with torch.autocast(images.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            logits, classes, values, completeness = self._passes(images, classes, k, noise)
        values = {name: v.to(images.dtype) if v is not None and v.is_floating_point() else v for name, v in values.items()}
        maps = []
        for name in self.methods:
            method = _methods.METHODS[name]
            raw = method.fn(*(values[r] for r in method.reads))
            # Normalised at the method's own resolution, as the article does, then resized: the upsampled map is
            # exactly the article's map resized, and min / max run over h*w values instead of H*W.
            result = method.normalize(raw) if self.normalize else raw
            result = postprocess.upsample(result, images.shape[-2:]) if self.upsample else result
            # A map for every class: [N, 1, ...] -> K. Only then: an exported Expand copies even when sizes match.
            maps.append(result if result.shape[1] == classes.shape[1] else result.expand(-1, classes.shape[1], -1, -1))
        raw_grads = {"layer": values["acts_grads"], "input": values["input_grads"]}
        grads = tuple(raw_grads[name] for name in self._grad_names) if self.keep_grads else ()
        completeness = completeness.to(images.dtype) if completeness is not None else None
        return logits.to(images.dtype), classes, tuple(maps), grads, completeness

    def _passes(self, images: Tensor, classes: Tensor | None, k: int, noise: Tensor | None):
        """The passes the methods' reads call for, sharing what they can: (logits, classes, tensors by name,
        IG's completeness error or None)."""
        reads = self.reads
        p = graph.forward_backward(self.split, images, classes, k, layer_grads="acts_grads" in reads,
                                   input_grads="input_grads" in reads, k_form=self.k_form)
        classes = p.classes
        acts, acts_grads = p.acts, p.acts_grads
        if self.layer is not None:  # tokens or channels-last maps to [N, C, h, w], and their gradients alike
            ndim, size = acts.ndim, tuple(images.shape[-2:])
            acts = tokens.to_grid(self._layout, acts, ndim, size)
            acts_grads = tokens.to_grid(self._layout, acts_grads, ndim, size) if acts_grads is not None else None
        values = {"images": images, "acts": acts, "acts_grads": acts_grads, "input_grads": p.input_grads}
        completeness, baseline = None, None
        if self._walks_path:
            baseline = self._baseline_like(images)
            values["deltas"] = images - baseline
        if self._sampled:
            values.update(self._sampled_reads(images, classes, noise, baseline, values.get("deltas")))
        if "path_grads" in reads:
            with torch.no_grad():
                baseline_logits = self._whole.head(baseline)
            gains = p.logits.gather(1, classes) - baseline_logits.expand(images.shape[0], -1).gather(1, classes)
            completeness = _methods.completeness_error(values["deltas"], values["path_grads"], gains)
        if reads & _methods.PERTURBED:
            values.update(self._perturbed(images, acts, p, classes))
        if "guided_grads" in reads:
            values["guided_grads"] = graph.forward_backward(self._guided, images, classes, k, input_grads=True,
                                                            k_form=self.k_form).input_grads
        return p.logits, classes, values, completeness

    def _sampled_reads(self, images: Tensor, classes: Tensor, noise: Tensor | None, baseline: Tensor | None,
                       deltas: Tensor | None) -> dict[str, Tensor]:
        """Each sampled read the methods need (`methods.SAMPLED`): the weighted sum over the points around each
        image of its fold of the input gradients there, max(1, sample_batch // N) points per image at a time.
        Path points run from `baseline` along `deltas` (images - baseline), both made once by `_passes`."""
        per_chunk, values = self._points_per_chunk(images.shape[0]), {}
        for name in self._sampled:
            sampled = _methods.SAMPLED[name]
            if sampled.along == "noise":
                spread = (self.noise * (images.amax((1, 2, 3)) - images.amin((1, 2, 3)))).view(-1, 1, 1, 1, 1)
                count, weights = self.samples, torch.full((self.samples,), 1 / self.samples, dtype=images.dtype,
                                                          device=images.device)
                points = lambda a, b: images.unsqueeze(1) + spread * noise[:, a:b]  # noqa: E731
            else:
                alphas, weights = (torch.tensor(v, dtype=images.dtype, device=images.device) for v in self._path)
                count = self.steps
                points = lambda a, b: baseline.unsqueeze(1) + alphas[a:b].view(1, -1, 1, 1, 1) * deltas.unsqueeze(1)  # noqa: E731

            def fold(grads: Tensor, a: int, b: int, sampled=sampled, weights=weights) -> Tensor:
                folded = sampled.fold(grads)
                return (folded * weights[a:b].view(1, -1, *(1,) * (folded.ndim - 2))).sum(1)

            try:
                values[name] = graph.folded_grads(self._whole, points, fold, count, classes, per_chunk, self.k_form)
            except RuntimeError as exc:
                if "setup_context" not in str(exc):
                    raise
                # torch.func differentiates the sampled points through the whole model: an autograd.Function
                # without setup_context in it (torchvision's roi_align, in its detectors) cannot be.
                raise MethodError(f"methods: {', '.join(_methods.sampled(self.methods))} differentiate the whole of {type(self.model).__name__} "
                                  "with torch.func, and it holds an autograd.Function torch.func cannot differentiate "
                                  "(torchvision's detectors: roi_align); use the other methods") from None
        return values

    def ablation_cost(self, image: Tensor) -> perturb.AblationCost:
        """What Ablation-CAM's ablated copies of one image `[1, C, H, W]` cost when all run at once (see
        `fastattr.perturb.ablation_cost`): what an export, which holds no chunks, checks before it holds them.

        >>> Explainer(resnet18, "layer4", methods="ablationcam").ablation_cost(images[:1]).total_bytes  # doctest: +SKIP
        """
        if "ablated_scores" not in self.reads:
            raise MethodError(f"ablation_cost: this explainer's methods {self.methods} do not include ablationcam")
        self.check_images(image)
        self.num_classes(image)  # checks the model takes the image, with an error naming the fix
        return perturb.ablation_cost(self.split, image, self._layout.channels_last)

    def _perturbed(self, images: Tensor, acts: Tensor, p: graph.Pass, classes: Tensor) -> dict:
        """The perturbation passes' reads, each forwarding its copies max(1, sample_batch // N) per image at a
        time (all at once when sample_batch is None). `acts` is the layer's output as a grid, `p` the shared pass."""
        reads, per_chunk = self.reads, self._points_per_chunk(images.shape[0])
        values = {"class_scores": p.logits.gather(1, classes)}
        if "ablated_scores" in reads:
            values["ablated_scores"] = perturb.ablated_scores(self.split, p.acts, p.carried, images, classes,
                                                              perturb.channel_axis(p.acts, self._layout.channels_last),
                                                              per_chunk, self._head)
        if "masked_scores" in reads:
            values["masked_scores"] = perturb.masked_scores(self._forward, images, acts, classes, per_chunk)
        if "occlusion_drops" in reads:
            values["occlusion_drops"] = perturb.occlusion_drops(self._forward, images, classes,
                                                                values["class_scores"], self.window, self.stride,
                                                                self.baseline, per_chunk)
        return values

    def _points_per_chunk(self, batch: int) -> int:
        # Whole groups of points for every image: a chunk sends N * per_chunk images through the network, at
        # least one point of each image, so the noise and path slices stay contiguous per image.
        if self.sample_batch is None or self._compiled is not None:
            return sys.maxsize if self.reads & _methods.PERTURBED else max(self.samples, self.steps)
        return max(1, self.sample_batch // batch)

    def _points_per_image(self) -> int:
        counts = {"noise": self.samples, "path": self.steps}
        return max([counts[_methods.SAMPLED[name].along] for name in self._sampled], default=1)

    def _baseline_like(self, images: Tensor) -> Tensor:
        """`[1, C, H, W]`: the baseline, as a constant of the graph."""
        if isinstance(self.baseline, Tensor):
            baseline = self.baseline.to(dtype=images.dtype, device=images.device)
            return baseline.view(1, *baseline.shape[-3:])
        return torch.full_like(images[:1], self.baseline)

    def _check_noise(self, images: Tensor, noise: Tensor) -> None:
        if not self.draws_noise:
            raise InputError(f"noise: only methods over noisy copies (smoothgrad) read noise, and the methods are "
                             f"{self.methods}")
        expected = (images.shape[0], self.samples, *images.shape[1:])
        if not isinstance(noise, Tensor) or tuple(noise.shape) != expected:
            got = list(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise InputError(f"noise: expected a standard-normal draw {list(expected)} [N, samples, C, H, W], got {got}")
        if noise.dtype != images.dtype or noise.device != images.device:
            raise InputError(f"noise: expected {images.dtype} on {images.device} like the images, got {noise.dtype} "
                             f"on {noise.device}")

    def check_images(self, images: Tensor) -> None:
        """Raise `InputError` naming the problem and the fix unless `images` is a batch `[N, C, H, W]` this model
        takes: a floating tensor of the parameters' dtype, on their device, with the stem's channel count."""
        if not isinstance(images, Tensor):
            raise InputError(f"images: expected a torch.Tensor [N, C, H, W], got {type(images).__name__}")
        if images.ndim != 4:
            fix = "; for a single image pass image[None]" if images.ndim == 3 else ""
            raise InputError(f"images: expected a batch [N, C, H, W], got shape {list(images.shape)}{fix}")
        if images.shape[0] == 0:
            raise InputError("images: the batch is empty (N = 0)")
        if not images.dtype.is_floating_point:
            raise InputError(f"images: expected a floating point tensor, got {images.dtype}; convert with "
                             "images.float() / 255 and normalise as the model expects")
        if self._param is not None and images.dtype != self._param.dtype:
            raise InputError(f"images: dtype {images.dtype} differs from the model's parameters ({self._param.dtype}); "
                             f"use images.to({self._param.dtype}) or convert the model")
        if self._param is not None and images.device != self._param.device:
            raise InputError(f"images: on {images.device} but the model is on {self._param.device}; "
                             f"use images.to({str(self._param.device)!r})")
        if self._stem is not None and images.shape[1] != self._stem.in_channels:
            raise InputError(f"images: {type(self.model).__name__} takes {self._stem.in_channels} channels, got "
                             f"{images.shape[1]} (shape {list(images.shape)})")
        check_finite(images)

    def num_classes(self, images: Tensor) -> int:
        """The model's number of outputs for images like these (checked with `check_images` first), having checked
        that the layer's activation lays out as a map; both once per image shape, by a shape-only pass."""
        key = (tuple(images.shape[1:]), images.dtype, images.device)
        if key not in self._num_classes:
            self.check_images(images)
        with self._lock:
            if key not in self._num_classes:
                tokens.check_image_size(self._layout, tuple(images.shape[-2:]), type(self.model).__name__)
                check_eval_mode(self.model)  # the probe runs the model: batch norm in training mode would update
                logits, acts = self._probe(images)
                if acts is not None:
                    tokens.check(self._layout, acts, tuple(images.shape[-2:]), self.layer, type(self.model).__name__)
                    self._warn_if_one_cell(tokens.to_grid(self._layout, acts, acts.ndim, tuple(images.shape[-2:])))
                self._num_classes[key] = int(logits.shape[1])
            return self._num_classes[key]

    def _warn_if_one_cell(self, grid: Tensor) -> None:
        # A 1x1 map (a layer after global pooling) has one cell: every CAM map is a constant, which their
        # min-max normalisation turns into zeros, a map that looks like "nothing here" rather than "wrong layer".
        cams = [m for m in self.methods if {"acts", "acts_grads"} & set(_methods.METHODS[m].reads)]
        if cams and tuple(grid.shape[-2:]) == (1, 1):
            warnings.warn(f"fastattr: layer {self.layer!r} of {type(self.model).__name__} is 1x1, so {', '.join(cams)} "
                          "can only give constant (all-zero) maps; pick a layer before the global pooling "
                          "(fastattr.default_layer(model) gives the last feature map)", stacklevel=4)

    def _probe(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        # One real forward of one image gives the logits' and the layer's shapes: cheaper than a fake-tensor pass,
        # whose dispatch costs several real forwards, and right for forwards that read values.
        def run(x: Tensor) -> tuple[Tensor, Tensor | None]:
            if self.layer is None or not self.split.traced:
                return self._whole.head(x), None
            acts, *carried = self.split.trunk(x)
            return self.split.head(acts, *carried), acts

        try:
            with torch.inference_mode():
                return run(images[:1])
        except FastattrError:
            raise
        except Exception as exc:
            raise InputError(f"images: {type(self.model).__name__} cannot run on shape {list(images.shape)}: "
                             f"{type(exc).__name__}: {exc}") from exc


def check_eval_mode(model: nn.Module) -> None:
    """Raise `InputError` before any work unless every module of `model` is in eval mode.

    In training mode batch norm updates its running statistics in place during the forward, and dropout
    draws random masks: explaining would change the model and give maps no later call reproduces. fastattr
    refuses rather than switching the mode itself, which would change the model too.
    """
    training = [name for name, module in model.named_modules() if module.training and name]
    if model.training or training:
        shown = ", ".join(map(repr, training[:3])) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        which = (f"{type(model).__name__} is" if model.training else f"{type(model).__name__}'s modules are") + \
            " in training mode" + (f" ({shown})" if training else "")
        raise InputError(f"model: {which}, where batch norm would update its running statistics and dropout would be "
                         "random; call model.eval() before explaining")


def images_per_call(points: int, sample_batch: int | None, n: int) -> int:
    """How many of `n` images one call of a graph that runs all `points` of each image at once (a compiled
    graph, an export) may take: max(1, sample_batch // points), or all of them without sampling or a bound."""
    return n if sample_batch is None or points == 1 else max(1, sample_batch // points)


def _concatenated(parts: list[tuple]) -> tuple:
    # (logits, classes, maps, grads, completeness) of consecutive groups of images, as one call's.
    if len(parts) == 1:
        return parts[0]
    logits, classes, maps, grads, completeness = zip(*parts)
    return (torch.cat(logits), torch.cat(classes), [torch.cat(m) for m in zip(*maps)], [torch.cat(g) for g in zip(*grads)],
            None if completeness[0] is None else torch.cat(completeness))


def check_finite(images: Tensor) -> None:
    """Raise `InputError` naming the images that hold NaN or Inf values: the model would give NaN logits and
    maps that look like any other, explaining nothing."""
    finite = torch.isfinite(images).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        which = f"images {shown} of the batch hold" if len(bad) > 1 else f"image {shown} of the batch holds"
        raise InputError(f"images: {which} NaN or Inf values, which give NaN logits and meaningless maps; check "
                         "how the images were decoded and normalised")


def draw_noise(images: Tensor, samples: int, seed: int | None) -> Tensor:
    """SmoothGrad's standard-normal draw `[N, samples, C, H, W]` for `images`, from `seed` (None: the global
    RNG). Each image's draw depends only on the seed and its place in the batch."""
    generator = torch.Generator(device=images.device).manual_seed(seed) if seed is not None else None
    return torch.randn((images.shape[0], samples, *images.shape[1:]), generator=generator, dtype=images.dtype,
                       device=images.device)


def _count(name: str, value: int) -> int:
    return at_least(name, value, 1, int, MethodError)


def _at_least_zero(name: str, value: float) -> float:
    return at_least(name, value, 0, float, MethodError)


def _baseline(value: float | Tensor) -> float | Tensor:
    if isinstance(value, Tensor):
        if value.ndim not in (3, 4) or (value.ndim == 4 and value.shape[0] != 1):
            raise MethodError(f"baseline: expected a number or a tensor [C, H, W] (one baseline for every image), "
                              f"got shape {list(value.shape)}")
        return value.detach()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodError(f"baseline: expected a number or a tensor [C, H, W], got {type(value).__name__}")
    return float(value)


def _past_recompile_limit(exc: BaseException) -> bool:
    limit_hit = torch._dynamo.exc.FailOnRecompileLimitHit
    return isinstance(exc, limit_hit) or isinstance(exc.__cause__, limit_hit) or isinstance(exc.__context__, limit_hit)


# The Explainers of recent one-shot calls, most recent last: (id(model), structure, options) -> Explainer.
# Bounded, because each holds its model.
_RECENT: OrderedDict[tuple, Explainer] = OrderedDict()
_RECENT_SIZE = 4
_RECENT_LOCK = threading.Lock()


def explain(model: nn.Module, images: Tensor, layer: str | None = None, methods: str | Sequence[str] = ("gradcam",),
            classes: _targets.Classes = None, k: int | None = None, **options) -> Explanation:
    """Logits, explained classes and maps for `images` in one call; `options` as for `Explainer`.

    The Explainer built for a call (an FX trace) is kept for the next calls with the same model and options,
    so repeated one-shot calls cost what calls of one Explainer cost. A kept Explainer is used only while the
    model has the same modules, parameters and buffers (the same objects) and the same plain attributes
    (numbers, strings, flags, and tuples, lists and sets of them); tensor values changed in place are read as
    they are. The last four are kept, and they hold their models: `clear_cache()` lets them go.

    >>> out = fastattr.explain(model.eval(), images, layer="layer4", methods=("gradcam", "saliency"), k=5)
    >>> out.logits.shape, out.classes.shape, out.maps["gradcam"].shape   # [N, 1000], [N, 5], [N, 5, H, W]
    """
    key = _cache_key(model, layer, methods, options)
    with _RECENT_LOCK:
        explainer = _RECENT.get(key) if key is not None else None
        if explainer is not None:
            _RECENT.move_to_end(key)
    if explainer is None:
        explainer = Explainer(model, layer, methods, **options)
        if key is not None:
            with _RECENT_LOCK:
                _RECENT[key] = explainer
                while len(_RECENT) > _RECENT_SIZE:
                    _RECENT.popitem(last=False)
    return explainer(images, classes=classes, k=k)


def clear_cache() -> None:
    """Forget the Explainers `explain` keeps, and the models they hold."""
    with _RECENT_LOCK:
        _RECENT.clear()


_SCALARS = (type(None), bool, int, float, str)
_UNKEYED = object()


def _plain(value):
    """A module attribute's value as part of a cache key: a scalar, or a tuple, list or set of such values at any
    depth (with its type, as a tuple); `_UNKEYED` for anything else (a tensor, a dict, a submodule)."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list, set, frozenset)):
        items = tuple(_plain(v) for v in value)
        if any(item is _UNKEYED for item in items):
            return _UNKEYED
        return type(value), frozenset(items) if isinstance(value, (set, frozenset)) else items
    return _UNKEYED


def _plain_attributes(module: nn.Module) -> tuple:
    return tuple((name, key) for name, key in ((name, _plain(v)) for name, v in vars(module).items())
                 if key is not _UNKEYED)


def _cache_key(model: nn.Module, layer, methods, options: dict) -> tuple | None:
    # What an Explainer fixes when it is built: the module tree it traced, the parameter and buffer objects the
    # trace refers to, and its options. Tensors among the options (a baseline) may change in place, and other
    # unhashable options cannot be compared: those calls build their own Explainer.
    if not isinstance(model, nn.Module) or any(isinstance(v, Tensor) for v in options.values()):
        return None
    # A module's plain attributes (a scale, a flag, a tuple of gains) are constants of the trace: their values are
    # part of the key.
    structure = (tuple((name, type(m), id(m), _plain_attributes(m)) for name, m in model.named_modules()),
                 tuple(id(t) for t in model.parameters()), tuple(id(t) for t in model.buffers()))
    key = (id(model), structure, layer, methods if isinstance(methods, str) else tuple(methods),
           tuple(sorted(options.items())))
    try:
        hash(key)
    except TypeError:
        return None
    return key
