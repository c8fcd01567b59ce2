"""torch.compile of the pure attribution function (one `fullgraph=True` graph, a symbolic batch, K static), and of
the forwards the perturbation passes run on each chunk of copies."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import CompileError

__all__ = ["compile_fullgraph", "compile_forward", "replays_cuda_graphs", "mark_batch_dynamic"]

def compile_fullgraph(fn: Callable, *, device: torch.device | None = None, mode: str | None = None,
            dynamic: bool = False, backend: str = "inductor", options: dict | None = None) -> Callable:
    """`torch.compile(fn, fullgraph=True)`: a graph break raises instead of silently splitting the graph.

    Shapes are static (`dynamic=False`) except what the caller marks with `mark_batch_dynamic`: K has to
    stay a constant of the graph (the K-call loop unrolls over it, and automatic dynamic shapes would turn
    a second K symbolic). `mode="reduce-overhead"` (CUDA graphs) is for CUDA models. Nothing global is
    configured.
    """
    chosen = _checked(device, mode, dynamic, options)
    return torch.compile(_with_own_code(fn), fullgraph=True, dynamic=False, backend=backend, **chosen)


def compile_forward(fn: Callable, *, device: torch.device | None = None, mode: str | None = None,
                    dynamic: bool | None = None, backend: str = "inductor", options: dict | None = None) -> Callable:
    """`torch.compile(fn, fullgraph=True)` for a forward of perturbed copies (the model, or its head above the
    layer), which the perturbation passes call once per chunk. Unlike the attribution there is no K to keep
    static: torch.compile's automatic dynamic shapes (`dynamic=None`) let the chunks' size and the smaller last
    chunk (and other batch sizes) share a second, batch-symbolic graph. The other options are those of
    `compile_fullgraph`."""
    chosen = _checked(device, mode, False, options)
    return torch.compile(_with_own_code(fn), fullgraph=True, dynamic=dynamic, backend=backend, **chosen)


def _checked(device: torch.device | None, mode: str | None, dynamic: bool, options: dict | None) -> dict:
    if mode == "reduce-overhead" and (device is None or device.type != "cuda"):
        raise CompileError(f"compile: mode='reduce-overhead' replays CUDA graphs, but the model is on "
                           f"{device or 'no device'}; use the default mode or move the model to CUDA")
    if dynamic:
        raise CompileError("compile: dynamic=True would make K symbolic, which the K-class backward cannot take; "
                           "the batch dimension is already dynamic")
    chosen = {"mode": mode} if mode is not None else {}
    if options is not None:
        chosen["options"] = options  # torch.compile takes mode or options, not both
    return chosen


def replays_cuda_graphs(device: torch.device | None, mode: str | None = None, options: dict | None = None,
                        **_) -> bool:
    """Whether `compile_fullgraph(..., device=device, mode=mode, options=options)` captures CUDA graphs, whose
    replays reuse their output memory."""
    wanted = mode in ("reduce-overhead", "max-autotune") or bool((options or {}).get("triton.cudagraphs"))
    return wanted and device is not None and device.type == "cuda"


def _with_own_code(fn: Callable) -> Callable:
    """`fn` over a copy of its code object. Dynamo keeps compiled graphs, and counts them against its
    recompile limit, per code object, and every Explainer's `attribution` shares one: without a copy, the ninth
    (explainer, shape) of a process would fail with fullgraph=True. A copy gives each its own cache."""
    func = getattr(fn, "__func__", fn)
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = func.__kwdefaults__, func.__qualname__
    return types.MethodType(copy, fn.__self__) if hasattr(fn, "__self__") else copy


def mark_batch_dynamic(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Views of `tensors` whose first dimension torch.compile treats as symbolic (the caller's own
    tensors are not marked)."""
    views = tuple(t.view_as(t) if t is not None else None for t in tensors)
    for view in views:
        if view is not None:
            torch._dynamo.maybe_mark_dynamic(view, 0)
    return views
