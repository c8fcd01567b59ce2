"""The graph machinery: split a model at a layer, and one forward with a K-class backward above it.

This module knows torch.fx and torch.func and nothing of attribution methods or targets. `split` rewrites a
model into two pure functions with torch.fx:

    trunk(x) -> (acts, carried)        every node the layer's output does not depend on
    head(acts, *carried) -> logits     the layer's output and everything computed from it

where `carried` are the trunk's values that the head also reads (skip connections across the layer).
`forward_backward` then runs the trunk without autograd, takes one `torch.func.vjp` of the head and
applies it to K one-hot cotangents, either vmapped or called K times. When the input's gradient is
wanted too (saliency), the trunk runs under its own vjp and the head's gradients flow on into it, so
one backward serves the layer and the input. No parameter gradient is ever computed, no hook is
registered, and the model is not modified.

A model that torch.fx cannot trace gets an eager path instead (`Split.traced` is False): a forward
hook on the layer for the duration of one call, removed in ``finally``. It gives the same numbers,
is slower, cannot be compiled or exported, and is not safe while other threads use the same model.

>>> s = split(torchvision.models.resnet18().eval(), "layer4")                 # doctest: +SKIP
>>> p = forward_backward(s, images, classes=None, k=5)                         # doctest: +SKIP
>>> p.logits.shape, p.classes.shape, p.acts_grads.shape   # [N, 1000], [N, 5], [N, 5, 512, 7, 7]  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, fx, nn
from torch.func import vjp, vmap

from .errors import LayerError, ModelOutputError
from .layers import get_layer
from .onehot import one_hot

__all__ = ["KForm", "OutputSelector", "Split", "split", "at_input", "Pass", "forward_backward", "grads_at",
           "folded_grads", "scores_of_copies", "unpassed_defaults"]

KForm = Literal["loop", "vmap"]
OutputSelector = Callable[[Any], Tensor] | str | int | None


# --- the split --------------------------------------------------------------------------------------

class _LeafAt(fx.Tracer):
    """Traces through everything except the target layer, which stays one `call_module` node."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname == self.layer:
            return True
        if self.layer.startswith(qualname + ".") or not qualname:
            return False
        return super().is_leaf_module(m, qualname)


def unpassed_defaults(model: nn.Module) -> dict[str, Any] | None:
    """The defaults of `model.forward`'s arguments after the images, which fastattr never passes.

    torch.fx gives every argument a placeholder, so `if mask is not None` would trace as if a mask were
    given; traced with these values as constants, the graph runs the branch a call with the images alone runs.
    """
    import inspect

    try:
        parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a forward without a readable signature: trace it as it is
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    # Scalars only: torch.fx splits a tuple, list or dict constant into placeholders it then checks against the
    # whole default, which fails on every call; such an argument keeps its placeholder, as before.
    scalar = (type(None), bool, int, float, str)
    defaults = {p.name: p.default for p in parameters if p.kind in kinds and isinstance(p.default, scalar)}
    return defaults or None


def _selector(output: OutputSelector) -> Callable[[Any], Tensor]:
    if output is None:  # Hugging Face's classifiers return a ModelOutput, a dict holding "logits"
        return lambda out: out["logits"] if isinstance(out, Mapping) and "logits" in out else out
    if callable(output):
        return output
    if isinstance(output, (str, int)):
        def pick(out: Any) -> Tensor:
            try:
                return out[output]
            except (KeyError, IndexError, TypeError):
                keys = f" (keys {list(out.keys())})" if isinstance(out, dict) else \
                    f" ({len(out)} entries)" if isinstance(out, (tuple, list)) else ""
                raise ModelOutputError(f"output={output!r}: the model's output, a {type(out).__name__}{keys}, has no "
                                       "such entry; pass a key or index it has, or output=<callable>") from None
        return pick
    raise ModelOutputError(f"output: expected a key, an index or a callable, got {type(output).__name__}")


def _check_logits(out: Any, model: nn.Module, output: OutputSelector, batch: int) -> Tensor:
    if isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == batch:
        return out
    if isinstance(out, Tensor) and callable(output):
        raise ModelOutputError(
            f"output: the target {getattr(output, '__name__', type(output).__name__)} returned a tensor of shape "
            f"{list(out.shape)} for {batch} image(s); a target must return scores [N={batch}, M], one row per image")
    if isinstance(out, Tensor):
        raise ModelOutputError(
            f"output: expected logits [N, num_classes] from {type(model).__name__}, got a tensor of shape "
            f"{list(out.shape)}; pass output=<callable> that returns them")
    what = type(out).__name__
    keys = list(out.keys()) if isinstance(out, dict) else None
    how = f"output={keys[0]!r}" if keys else "output=0"
    got = f" with keys {keys}" if keys else ""
    if output is None:
        raise ModelOutputError(
            f"output: {type(model).__name__} returns a {what}{got}, not a logits tensor; say which part holds "
            f"the logits with {how} or output=lambda out: ...")
    raise ModelOutputError(f"output: {output!r} picked a {what} from the model's output, not a logits tensor")


@dataclass(frozen=True)
class Split:
    """A model cut at `layer` (None: at the input, for input-only methods)."""

    model: nn.Module
    layer: str | None
    trunk: Callable[[Tensor], tuple[Tensor, ...]] | None  # x -> (acts, *carried); None when traced is False
    head: Callable[..., Any]  # traced: (acts, *carried) -> logits; else (x, input_grads) -> (logits, acts)
    traced: bool


def split(model: nn.Module, layer: str | None, output: OutputSelector = None) -> Split:
    """Cut `model` at the module named `layer` into a trunk and a head (see the module docstring).

    Falls back, with a warning, to the eager hook path when torch.fx cannot trace the model.

    >>> s = split(torchvision.models.resnet18().eval(), "layer3")  # doctest: +SKIP
    >>> acts, *carried = s.trunk(x); logits = s.head(acts, *carried)  # doctest: +SKIP
    """
    if layer is None:
        return at_input(model, output)
    select = _selector(output)
    module = get_layer(model, layer)
    try:
        graph = _LeafAt(layer).trace(model, concrete_args=unpassed_defaults(model))
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the eager path
        warnings.warn(
            f"fastattr: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); using the "
            "eager hook path, which gives the same maps but is slower, cannot be compiled or exported, and "
            "must not share the model with other threads during a call", stacklevel=3)
        return Split(model, layer, None, _hooked_head(model, module, layer, select, output), False)
    gm = fx.GraphModule(model, graph)
    trunk, head = _cut(gm, layer, type(model).__name__)

    def head_of_clone(acts: Tensor, *carried: Any) -> Tensor:
        # Some heads start in place (DenseNet: F.relu(features, inplace=True)); the clone keeps the layer's
        # output as the layer returned it, and the vjp primal untouched.
        return _check_logits(select(head(acts.clone(), *carried)), model, output, acts.shape[0])

    return Split(model, layer, trunk, head_of_clone, True)


def at_input(model: nn.Module, output: OutputSelector = None, forward: Callable[[Tensor], Any] | None = None) -> Split:
    """`model` as a Split at its input, for input methods: the trunk is the identity and the head is `forward`
    (default: the model itself; guided backpropagation passes its rewritten graph)."""
    select, forward = _selector(output), forward or model
    return Split(model, None, lambda x: (x,), lambda x: _check_logits(select(forward(x)), model, output, x.shape[0]), True)


def _cut(gm: fx.GraphModule, layer: str, model_name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    nodes = list(gm.graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == layer]
    if not calls:
        raise LayerError(
            f"layer: {layer!r} exists in {model_name} but its forward never calls it; pick a layer the forward "
            f"uses (fastattr.layers(model) lists candidates)")
    if len(calls) > 1:
        raise LayerError(
            f"layer: {layer!r} is called {len(calls)} times in one forward of {model_name}, so it has no single "
            "activation to explain; pick a layer that runs once")
    (at,) = calls
    above: set[fx.Node] = set()
    for node in nodes:
        if any(a is at or a in above for a in node.all_input_nodes):
            above.add(node)
    out_node = nodes[-1]
    if out_node not in above:
        raise LayerError(f"layer: the output of {model_name} does not depend on {layer!r}; pick a layer below the logits")
    carried = [n for n in nodes if n not in above and n is not at and n.op != "get_attr"
               and any(u in above for u in n.users)]

    trunk_graph, env = fx.Graph(), {}
    for node in nodes:
        if node in above:
            continue
        env[node] = trunk_graph.node_copy(node, lambda n: env[n])
    trunk_graph.output((env[at], *(env[c] for c in carried)))

    head_graph, env = fx.Graph(), {}
    env[at] = head_graph.placeholder("acts")
    for i, node in enumerate(carried):
        env[node] = head_graph.placeholder(f"carried_{i}")
    for node in nodes:
        if node.op == "get_attr" and any(u in above for u in node.users):
            env[node] = head_graph.node_copy(node, lambda n: env[n])
        elif node in above:
            env[node] = head_graph.node_copy(node, lambda n: env[n])
    trunk = fx.GraphModule(gm, trunk_graph)
    trunk.graph.eliminate_dead_code()
    trunk.recompile()
    return trunk, fx.GraphModule(gm, head_graph)


# --- one forward, one K-class backward ---------------------------------------------------------------

class Pass(NamedTuple):
    """What one forward and one K-class backward produce, batch first."""

    logits: Tensor                   # [N, num_classes]
    classes: Tensor                  # [N, K]
    acts: Tensor                     # [N, C, h, w], the layer's output (the images when split at the input)
    acts_grads: Tensor               # [N, K, C, h, w], d logit_k / d acts
    input_grads: Tensor | None       # [N, K, C_in, H, W], d logit_k / d images, when asked for
    carried: tuple | None = None     # the trunk's values the head also reads, where the pass kept them


def _per_class(backward: Callable[[Tensor, bool], tuple[Tensor, ...]], cotangents: Tensor,
               k_form: KForm) -> tuple[Tensor, ...]:
    # The last backward frees the graph: a retained graph keeps every saved activation alive through
    # the backward, which measured slower on resnet50 (fresh memory instead of reused buffers).
    if k_form == "vmap":
        grads = vmap(lambda ct: backward(ct, False))(cotangents)
    else:
        # K must be a Python int: under torch.compile a second K makes it symbolic, and retain_graph
        # takes a real bool. int() specialises the graph on K.
        k = int(cotangents.shape[0])
        per_k = [backward(cotangents[i], i < k - 1) for i in range(k)]
        grads = tuple(torch.stack(g) for g in zip(*per_k))
    return tuple(g.movedim(0, 1) for g in grads)


def _targets(logits: Tensor, classes: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """The classes to explain (`[N, K]`, the top-k unless given) and their one-hot cotangents."""
    classes = logits.topk(k, dim=1).indices if classes is None else classes
    return classes, one_hot(classes, logits.shape[1], logits.dtype)


def forward_backward(s: Split, x: Tensor, classes: Tensor | None, k: int, *, layer_grads: bool = True,
                     input_grads: bool = False, k_form: KForm = "loop") -> Pass:
    """One forward through `s`, then d logit_c / d acts (and / d x) for K classes per image.

    `classes` is `[N, K]` or None for the top-`k` classes of each image. With neither `layer_grads` nor
    `input_grads`, the forward alone runs (`acts_grads` is None). A pure function of its tensor arguments:
    it is what `torch.compile` and the exporters see.
    """
    if not s.traced:
        return _hooked_forward_backward(s, x, classes, k, input_grads=input_grads)
    with torch.no_grad():
        if not (layer_grads or input_grads):
            acts, *carried = s.trunk(x)
            logits = s.head(acts, *carried)
            return Pass(logits, _targets(logits, classes, k)[0], acts, None, None, tuple(carried))
        if input_grads and s.layer is not None:
            return _through_trunk(s, x, classes, k, k_form)
        acts, *carried = s.trunk(x)
        logits, head_vjp = vjp(lambda a: s.head(a, *carried), acts)
        classes, cotangents = _targets(logits, classes, k)
        (acts_grads,) = _per_class(lambda ct, retain: head_vjp(ct, retain_graph=retain), cotangents, k_form)
        if input_grads:  # split at the input: the layer is the input
            return Pass(logits, classes, acts, acts_grads, acts_grads, tuple(carried))
        return Pass(logits, classes, acts, acts_grads, None, tuple(carried))


def grads_at(s: Split, points: Tensor, classes: Tensor, k_form: KForm = "loop") -> Tensor:
    """`[N, S, K, C, H, W]`: d logit / d input at S points per image (`points [N, S, C, H, W]`) for the
    image's classes `[N, K]`. The points fold into the batch: one forward of N*S inputs, K backwards."""
    n, count = points.shape[:2]
    repeated = classes.unsqueeze(1).expand(-1, count, -1).flatten(0, 1)
    p = forward_backward(s, points.flatten(0, 1), repeated, classes.shape[1], input_grads=True, k_form=k_form)
    return p.input_grads.unflatten(0, (n, count))


def folded_grads(s: Split, points: Callable[[int, int], Tensor], fold: Callable[[Tensor, int, int], Tensor],
                 count: int, classes: Tensor, per_chunk: int, k_form: KForm = "loop") -> Tensor:
    """The sum over chunks of `fold(grads, start, stop)`, where `grads [N, stop - start, K, C, H, W]` are the input
    gradients at `points(start, stop) [N, stop - start, C, H, W]`, for `count` points per image taken `per_chunk`
    at a time.

    Only one chunk's autograd state is alive at once, so memory follows N * per_chunk, not N * count; the
    result equals one pass over all points up to the order of the sum. `fold` reduces a chunk to its share
    of the result (a weighted sum over the points, a mean of maps), so no `[N, count, ...]` gradient is kept.
    """
    total = None
    for start in range(0, count, per_chunk):
        stop = min(start + per_chunk, count)
        share = fold(grads_at(s, points(start, stop), classes, k_form), start, stop)
        total = share if total is None else total + share
    return total


def scores_of_copies(forward: Callable[[Tensor], Tensor], copies: Callable[[int, int], Tensor], count: int,
                     classes: Tensor, per_chunk: int, *, images: bool = False) -> Tensor:
    """`[N, count, K]`: the scores `forward` gives each image's classes `[N, K]` on `count` copies of it, made
    `per_chunk` at a time by `copies(start, stop) -> [N, stop - start, ...]`, without autograd.

    Only one chunk of copies is alive at once and only the scores are kept, so memory follows N * per_chunk
    whatever `count` is. `images=True` says the copies are images for the whole model: on CPU they go in
    channels-last, whose convolutions oneDNN runs faster than the contiguous layout's, the model left as it is
    (benchmarks/results/channels-last.md). A model whose forward cannot take that layout (a `.view` of an
    activation, say) gets contiguous copies for the rest of the call, after one failed try per call.
    """
    parts = []
    channels_last = images
    with torch.no_grad():
        for start in range(0, count, per_chunk):
            x = copies(start, min(start + per_chunk, count))
            n, p = x.shape[:2]
            x = x.flatten(0, 1)
            channels_last = channels_last and x.ndim == 4 and x.device.type == "cpu"
            try:
                logits = forward(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
            except RuntimeError as exc:
                # Only a layout error is retried: any other would fail the same way, and hooks would run twice.
                if not channels_last or not ("stride" in str(exc) or "contiguous" in str(exc)):
                    raise
                channels_last, logits = False, forward(x.contiguous())
            logits = logits.unflatten(0, (n, p))
            parts.append(logits.gather(2, classes.unsqueeze(1).expand(-1, p, -1)))
    return torch.cat(parts, 1)


def _differentiable(values: tuple[Any, ...]) -> list[int]:
    return [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.is_floating_point()]


def _through_trunk(s: Split, x: Tensor, classes: Tensor | None, k: int, k_form: KForm) -> Pass:
    # Carried values that are not float tensors (sizes, masks) are constants of the backward; the
    # vjp's aux may hold only tensors, so the rest leave it through `plain`.
    plain: dict[int, Any] = {}
    diff: list[int] = []

    def trunk(x: Tensor):
        acts, *values = s.trunk(x)
        diff.extend(_differentiable(tuple(values)))
        plain.update((i, v) for i, v in enumerate(values) if not isinstance(v, Tensor))
        constants = {i: v for i, v in enumerate(values) if i not in plain and i not in diff}
        return (acts, tuple(values[i] for i in diff)), constants

    (acts, diff_carried), trunk_vjp, constants = vjp(trunk, x, has_aux=True)
    carried = [constants.get(i, plain.get(i)) for i in range(len(diff) + len(constants) + len(plain))]

    def head(a: Tensor, *diff_values: Tensor) -> Tensor:
        values = list(carried)
        for i, v in zip(diff, diff_values):
            values[i] = v
        return s.head(a, *values)

    logits, head_vjp = vjp(head, acts, *diff_carried)

    def backward(ct: Tensor, retain: bool) -> tuple[Tensor, Tensor]:
        acts_grad, *carried_grads = head_vjp(ct, retain_graph=retain)
        (input_grad,) = trunk_vjp((acts_grad, tuple(carried_grads)), retain_graph=retain)
        return acts_grad, input_grad

    classes, cotangents = _targets(logits, classes, k)
    acts_grads, input_grads = _per_class(backward, cotangents, k_form)
    return Pass(logits, classes, acts, acts_grads, input_grads)


# --- the eager path for models torch.fx cannot trace ---------------------------------------------------

def _hooked_head(model: nn.Module, module: nn.Module, layer: str, select, output) -> Callable[..., Any]:
    def run(x: Tensor, input_grads: bool):
        seen: list[Tensor] = []

        def keep(mod, inputs, out):
            if not isinstance(out, Tensor):
                raise LayerError(f"layer: {layer!r} returns a {type(out).__name__}, not a tensor; pick a layer with a tensor output")
            if not input_grads:  # cut the graph here: no autograd state below the layer
                out = out.detach().requires_grad_()
            seen.append(out)
            return out

        handle = module.register_forward_hook(keep)
        try:
            logits = _check_logits(select(model(x)), model, output, x.shape[0])
        finally:
            handle.remove()
        if len(seen) != 1:
            raise LayerError(
                f"layer: {layer!r} ran {len(seen)} times in one forward of {type(model).__name__}; "
                "pick a layer that runs exactly once")
        return logits, seen[0]

    return run


def _hooked_forward_backward(s: Split, x: Tensor, classes: Tensor | None, k: int, *, input_grads: bool) -> Pass:
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(input_grads)
        logits, acts = s.head(x_in, input_grads)
    classes, cotangents = _targets(logits.detach(), classes, k)
    wrt = (acts, x_in) if input_grads else (acts,)
    per_k = [torch.autograd.grad(logits, wrt, ct, retain_graph=i < len(cotangents) - 1)
             for i, ct in enumerate(cotangents)]
    grads = [torch.stack(g).movedim(0, 1) for g in zip(*per_k)]
    return Pass(logits.detach(), classes, acts.detach(), grads[0], grads[1] if input_grads else None)
