"""The public entry points: `explain` for one call, `Explainer` for many."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from . import graph, methods as _methods, postprocess, targets as _targets
from .errors import CompileError, FastattrError, InputError, MethodError
from .graph import OutputSelector

__all__ = ["Explanation", "Explainer", "explain"]

log = logging.getLogger("fastattr")


@dataclass(frozen=True)
class Explanation:
    """Prediction and explanation from one call, batch first.

    logits:  `[N, num_classes]`, the model's output for the images.
    classes: `[N, K]`, the class indices explained, in the order of `maps`' K axis.
    maps:    method name -> `[N, K, H, W]` (the input's size when upsampled, else the layer's size).
    layer:   the target layer's module path (None when only input methods ran).
    grads:   with `keep_grads=True`: "layer" -> `[N, K, C, h, w]` and/or "input" -> `[N, K, C, H, W]`,
             the raw gradients of each explained logit.
    """

    logits: Tensor
    classes: Tensor
    maps: dict[str, Tensor]
    layer: str | None
    grads: dict[str, Tensor] = field(default_factory=dict)


def _first(model: nn.Module, kind: type) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, kind)), None)


class Explainer:
    """A reusable, thread-safe explainer: the model split at `layer` once, then one pass per call.

    Args:
        model: a classifier returning logits `[N, num_classes]` (or see `output`). It is used as it is:
            put it in eval mode yourself. It is never modified: no hooks, no `requires_grad`, mode or
            `.grad` change, so it can be shared with plain inference and with other threads.
        layer: module path of the target layer for layer methods (Grad-CAM), as `model.get_submodule`
            takes it; default: the last child module holding a convolution (`layer4` for a ResNet).
        methods: names from `fastattr.METHODS`, e.g. ("gradcam", "saliency"); all share one forward and
            one backward.
        output: how to pick the logits from a model that returns a tuple or dict: a key, an index or a
            callable.
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

    >>> explainer = fastattr.Explainer(model.eval(), layer="layer4", methods=("gradcam", "saliency"))
    >>> out = explainer(images, k=3)          # or classes=281, [281, 285], tensor[N] or tensor[N, K]
    >>> out.maps["gradcam"].shape             # [N, 3, H, W]
    """

    def __init__(self, model: nn.Module, layer: str | None = None, methods: str | Sequence[str] = ("gradcam",), *,
                 output: OutputSelector = None, upsample: bool = True, normalize: bool = True,
                 k_form: Literal["auto", "loop", "vmap"] = "auto", keep_grads: bool = False,
                 compile: bool | dict = False, dtype: torch.dtype | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if k_form not in ("auto", "loop", "vmap"):
            raise MethodError(f"k_form: expected 'auto', 'loop' or 'vmap', got {k_form!r}")
        self.model = model
        self.methods = _methods.resolve(methods)
        wants_layer = any(_methods.METHODS[m].at == "layer" for m in self.methods)
        self.wants_input = any(_methods.METHODS[m].at == "input" for m in self.methods)
        if wants_layer:
            self.layer = graph.default_layer(model) if layer is None else layer
            graph.get_layer(model, self.layer)
        else:
            self.layer = None
        self.split = graph.split(model, self.layer, output)
        self._whole = graph.split(model, None, output).head
        self.upsample, self.normalize, self.keep_grads = upsample, normalize, keep_grads
        self._grad_names = [n for n, on in (("layer", self.layer is not None), ("input", self.wants_input)) if on]
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
        if compile:
            options = {} if compile is True else dict(compile)
            if not self.split.traced:
                raise CompileError(
                    f"compile: {type(model).__name__} runs on the eager hook path (torch.fx could not trace it), "
                    "which cannot be compiled; make the forward traceable or use compile=False")
            self._compiled = graph.compile(self._pure, device=self._param.device if self._param is not None else None,
                                           **options)

    def __repr__(self) -> str:
        return (f"Explainer({type(self.model).__name__}, layer={self.layer!r}, methods={self.methods}, "
                f"k_form={self.k_form!r}, traced={self.split.traced})")

    def __call__(self, images: Tensor, classes: _targets.Classes = None, k: int | None = None) -> Explanation:
        """Explain `images [N, C, H, W]` for `classes` (see `fastattr.targets`) or the top-`k` classes."""
        self._check_images(images)
        if self.model.training:
            warnings.warn("fastattr: the model is in training mode, so batch norm uses batch statistics and updates "
                          "its running stats, and dropout is random; call model.eval() first", stacklevel=2)
        num_classes = self._count_classes(images)
        target = _targets.resolve(classes, k, images.shape[0], num_classes, images.device)
        return self.run(images, target.classes, target.k)

    def run(self, images: Tensor, classes: Tensor | None, k: int) -> Explanation:
        """`__call__` without its checks: `classes [N, K]` (int64, on the images' device) or None for the
        top-`k`. Runs the compiled graph when the explainer was built with `compile=`."""
        if self._compiled is None:
            logits, classes, maps, grads = self._pure(images, classes, k)
        else:
            logits, classes, maps, grads = self._run_compiled(images, classes, k)
        return Explanation(logits, classes, dict(zip(self.methods, maps)), self.layer,
                           dict(zip(self._grad_names, grads)))

    def warmup(self, images: Tensor, classes: _targets.Classes = None, k: int | None = None) -> float:
        """Run once on `images` (compiling, when compiled, for that signature) and return the seconds it took.

        >>> seconds = fastattr.Explainer(model, compile=True).warmup(images, k=5)  # doctest: +SKIP
        """
        start = time.perf_counter()
        self(images, classes=classes, k=k)
        return time.perf_counter() - start

    def _run_compiled(self, images: Tensor, classes: Tensor | None, k: int):
        signature = (tuple(images.shape), images.dtype, str(images.device), k, classes is None)
        if signature in self._past_limit:
            return self._pure(images, classes, k)
        images, classes = graph.mark_batch_dynamic(images, classes)
        if signature in self.compile_seconds:
            return self._compiled(images, classes, k)
        with self._lock:  # one compile per signature, even when threads arrive together
            start = time.perf_counter()
            try:
                result = self._compiled(images, classes, k)
            except Exception as exc:
                if not _past_recompile_limit(exc):
                    raise
                self._past_limit.add(signature)
                warnings.warn(f"fastattr: this explainer reached torch.compile's recompile limit "
                              f"({torch._dynamo.config.recompile_limit} graphs), so images {list(images.shape)}, "
                              f"k={k} run eagerly; keep the image sizes and K values per explainer few, or raise "
                              "torch._dynamo.config.recompile_limit", stacklevel=3)
                return self._pure(images, classes, k)
            if signature not in self.compile_seconds:
                self.compile_seconds[signature] = seconds = time.perf_counter() - start
                log.info("fastattr: first compiled call for images %s %s, k=%d took %.1f s (compiling, unless a graph "
                         "for this shape existed)",
                         list(images.shape), images.dtype, k, seconds)
            return result

    def _pure(self, images: Tensor, classes: Tensor | None, k: int):
        """The attribution as one pure function of tensors: what torch.compile and the exporters see."""
        with torch.autocast(images.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            p = graph.forward_backward(self.split, images, classes, k, input_grads=self.wants_input,
                                       k_form=self.k_form)
        acts, acts_grads = p.acts.to(images.dtype), p.acts_grads.to(images.dtype)
        input_grads = p.input_grads.to(images.dtype) if p.input_grads is not None else None
        maps = []
        for name in self.methods:
            method = _methods.METHODS[name]
            raw = method.fn(acts, acts_grads) if method.at == "layer" else method.fn(images, input_grads)
            # Normalised at the method's own resolution, as the article does, then resized: the upsampled map is
            # exactly the article's map resized, and min / max run over h*w values instead of H*W.
            result = method.normalize(raw) if self.normalize else raw
            maps.append(postprocess.upsample(result, images.shape[-2:]) if self.upsample else result)
        raw_grads = {"layer": acts_grads, "input": input_grads}
        grads = tuple(raw_grads[name] for name in self._grad_names) if self.keep_grads else ()
        return p.logits.to(images.dtype), p.classes, tuple(maps), grads

    def _check_images(self, images: Tensor) -> None:
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

    def _count_classes(self, images: Tensor) -> int:
        key = (tuple(images.shape[1:]), images.dtype, images.device)
        with self._lock:
            if key not in self._num_classes:
                self._num_classes[key] = self._output_width(images)
            return self._num_classes[key]

    def _output_width(self, images: Tensor) -> int:
        # A fake-tensor pass gives the logits' shape without computing anything; a model whose forward
        # reads values (data-dependent control flow) gets one real forward instead.
        from torch._subclasses.fake_tensor import FakeTensorMode

        probe = images[:1]
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
                return int(self._whole(mode.from_tensor(probe)).shape[1])
        except FastattrError:
            raise
        except Exception:  # noqa: BLE001 - the real forward below reports what is wrong
            pass
        try:
            with torch.inference_mode():
                return int(self._whole(probe).shape[1])
        except FastattrError:
            raise
        except Exception as exc:
            raise InputError(f"images: {type(self.model).__name__} cannot run on shape {list(images.shape)}: "
                             f"{type(exc).__name__}: {exc}") from exc


def _past_recompile_limit(exc: BaseException) -> bool:
    limit_hit = torch._dynamo.exc.FailOnRecompileLimitHit
    return isinstance(exc, limit_hit) or isinstance(exc.__cause__, limit_hit) or isinstance(exc.__context__, limit_hit)


def explain(model: nn.Module, images: Tensor, layer: str | None = None, methods: str | Sequence[str] = ("gradcam",),
            classes: _targets.Classes = None, k: int | None = None, **options) -> Explanation:
    """Logits, explained classes and maps for `images` in one call; `options` as for `Explainer`.

    Each call builds an `Explainer` (an FX trace and a shape pass); for repeated calls, build one
    `Explainer` and call it.

    >>> out = fastattr.explain(model.eval(), images, layer="layer4", methods=("gradcam", "saliency"), k=5)
    >>> out.logits.shape, out.classes.shape, out.maps["gradcam"].shape   # [N, 1000], [N, 5], [N, 5, H, W]
    """
    return Explainer(model, layer, methods, **options)(images, classes=classes, k=k)
