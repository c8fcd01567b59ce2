"""The graph machinery: split a model at a layer, and one forward with a K-class backward above it.

This module knows torch.fx and torch.func and nothing of attribution methods. `split` rewrites a model
into two pure functions with torch.fx:

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
"""

from __future__ import annotations

import difflib
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, fx, nn
from torch.func import vjp, vmap

from .errors import CompileError, ExportError, LayerError, MethodError, ModelOutputError

KForm = Literal["loop", "vmap"]
OutputSelector = Callable[[Any], Tensor] | str | int | None


# --- layers by name ---------------------------------------------------------------------------------

def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def layers(model: nn.Module) -> list[str]:
    """Module paths that make sense as Grad-CAM target layers: those holding a convolution, the modules
    beside the convolutions inside them (norms, activations, pools), and transformer blocks with their first
    norms, in definition order.

    Any module path that `model.get_submodule` accepts may be used as a target; this is the short list.

    >>> fastattr.layers(torchvision.models.resnet18())[-3:]  # doctest: +SKIP
    ['layer4.1.bn2', 'layer4.1.relu', 'layer4.1']
    """
    names = []
    with_conv = {name for name, m in model.named_modules() if _has_conv(m)}
    norms = set(_block_norms(model))
    blocks = {n.rpartition(".")[0] for n in norms}
    for name, module in model.named_modules():
        if not name:
            continue
        parent = name.rpartition(".")[0]
        if name in with_conv or name in norms or name in blocks or (
                parent and parent in with_conv and not list(module.children())):
            names.append(name)
    return names


def _block_norms(model: nn.Module) -> list[str]:
    """The first norms (`ln_1` in torchvision, `norm1` in timm and Swin) of the transformer blocks, in order."""
    return [f"{name}.{child}" if name else child for name, m in model.named_modules() for child in ("ln_1", "norm1")
            if isinstance(getattr(m, child, None), nn.LayerNorm)]


def default_layer(model: nn.Module) -> str:
    """For a transformer, the last block's first norm, whose tokens the block's attention still mixes
    (`encoder.layers.encoder_layer_11.ln_1` in torchvision's ViT-B/16, `blocks.11.norm1` in timm's ViTs,
    `features.7.1.norm1` in Swin-T). Else the last direct child of the model that holds a convolution:
    `layer4` for a ResNet, `features` for VGG, MobileNet, EfficientNet, DenseNet and ConvNeXt, `trunk_output`
    for RegNet."""
    norms = _block_norms(model)
    if norms:
        return norms[-1]
    for name, child in reversed(list(model.named_children())):
        if _has_conv(child):
            return name
    raise LayerError(
        f"layer: {type(model).__name__} has no convolution to default to; name a layer, e.g. "
        f"layer={next((n for n, _ in model.named_children()), 'NAME')!r}")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule(name)`, with an error that lists the nearest valid names."""
    if not isinstance(name, str):
        raise LayerError(f"layer: expected a module path such as 'layer4' or 'features.28', got {type(name).__name__}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        all_names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, all_names, n=3, cutoff=0.5)
        hint = f"closest: {', '.join(repr(c) for c in close)}. " if close else ""
        raise LayerError(
            f"layer: no module {name!r} in {type(model).__name__}; {hint}"
            f"fastattr.layers(model) lists the {len(layers(model))} candidates") from None


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


def _selector(output: OutputSelector) -> Callable[[Any], Tensor]:
    if output is None:
        return lambda out: out
    if callable(output):
        return output
    if isinstance(output, (str, int)):
        return lambda out: out[output]
    raise ModelOutputError(f"output: expected a key, an index or a callable, got {type(output).__name__}")


def _check_logits(out: Any, model: nn.Module, output: OutputSelector) -> Tensor:
    if isinstance(out, Tensor) and out.ndim == 2:
        return out
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
    select = _selector(output)
    if layer is None:
        return Split(model, None, lambda x: (x,), lambda x: _check_logits(select(model(x)), model, output), True)
    module = get_layer(model, layer)
    try:
        graph = _LeafAt(layer).trace(model)
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
        return _check_logits(select(head(acts.clone(), *carried)), model, output)

    return Split(model, layer, trunk, head_of_clone, True)


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

class Passes(NamedTuple):
    """What one forward and one K-class backward produce, batch first."""

    logits: Tensor                   # [N, num_classes]
    classes: Tensor                  # [N, K]
    acts: Tensor                     # [N, C, h, w], the layer's output (the images when split at the input)
    acts_grads: Tensor               # [N, K, C, h, w], d logit_k / d acts
    input_grads: Tensor | None       # [N, K, C_in, H, W], d logit_k / d images, when asked for


def one_hot(classes: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """`[N, K]` class indices -> `[K, N, num_classes]` one-hot cotangents (traceable, unlike F.one_hot)."""
    return (classes.T[..., None] == torch.arange(num_classes, device=classes.device)).to(dtype)


def _per_class(backward: Callable[[Tensor, bool], tuple[Tensor, ...]], cotangents: Tensor,
               k_form: KForm) -> tuple[Tensor, ...]:
    # The last backward frees the graph: a retained graph keeps every saved activation alive through
    # the backward, which cost 15 % on resnet50 (fresh memory instead of reused buffers).
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
                     input_grads: bool = False, k_form: KForm = "loop") -> Passes:
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
            return Passes(logits, _targets(logits, classes, k)[0], acts, None, None)
        if input_grads and s.layer is not None:
            return _through_trunk(s, x, classes, k, k_form)
        acts, *carried = s.trunk(x)
        logits, head_vjp = vjp(lambda a: s.head(a, *carried), acts)
        classes, cotangents = _targets(logits, classes, k)
        (acts_grads,) = _per_class(lambda ct, retain: head_vjp(ct, retain_graph=retain), cotangents, k_form)
        if input_grads:  # split at the input: the layer is the input
            return Passes(logits, classes, acts, acts_grads, acts_grads)
        return Passes(logits, classes, acts, acts_grads, None)


def grads_at(s: Split, points: Tensor, classes: Tensor, k_form: KForm = "loop") -> Tensor:
    """`[N, S, K, C, H, W]`: d logit / d input at S points per image (`points [N, S, C, H, W]`) for the
    image's classes `[N, K]`. The points fold into the batch: one forward of N*S inputs, K backwards."""
    n, count = points.shape[:2]
    repeated = classes.unsqueeze(1).expand(-1, count, -1).flatten(0, 1)
    p = forward_backward(s, points.flatten(0, 1), repeated, classes.shape[1], input_grads=True, k_form=k_form)
    return p.input_grads.unflatten(0, (n, count))


def _differentiable(values: tuple[Any, ...]) -> list[int]:
    return [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.is_floating_point()]


def _through_trunk(s: Split, x: Tensor, classes: Tensor | None, k: int, k_form: KForm) -> Passes:
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
    return Passes(logits, classes, acts, acts_grads, input_grads)


# --- a modified backward rule, inside the traced graph ------------------------------------------------------

class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes a gradient only where it and the ReLU's output are positive (guided
    backpropagation). An autograd.Function, so torch.func, torch.compile and make_fx all see the rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (output,) = ctx.saved_tensors
        return grad.clamp_min(0) * (output > 0).to(grad.dtype)


def guided_relu(x: Tensor) -> Tensor:
    return _GuidedReLU.apply(x)


_RELU_FUNCTIONS = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.nn.functional.relu_}


def _relu_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Whether `node` is a ReLU, and an in-place one: "inplace", "relu" or None."""
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.ReLU:
        return "inplace" if gm.get_submodule(node.target).inplace else "relu"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        inplace = node.target in (torch.relu_, torch.nn.functional.relu_) or node.kwargs.get("inplace") \
            or (len(node.args) > 1 and node.args[1] is True)
        return "inplace" if inplace else "relu"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "inplace" if node.target == "relu_" else "relu"
    return None


def guided(model: nn.Module, output: OutputSelector = None) -> Split:
    """The whole model as a Split at the input whose every ReLU (module, function or method) has the guided
    backward rule. The model is traced with torch.fx, not hooked, and left as it is."""
    select = _selector(output)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001
        raise MethodError(f"methods: guided backpropagation rewrites the ReLUs of a torch.fx trace, and torch.fx "
                         f"cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); use another method") from exc
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        kind = _relu_kind(gm, node)
        if kind is None:
            continue
        (source,) = node.args[:1]
        with gm.graph.inserting_after(node):
            rule = gm.graph.call_function(guided_relu, (source,))
        node.replace_all_uses_with(rule)
        # An in-place ReLU also changed its input for every later reader; those now read the rule's output.
        for user in list(source.users) if kind == "inplace" else ():
            if user is not node and user is not rule and order.get(user, -1) > order[node]:
                user.replace_input_with(source, rule)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return Split(model, None, lambda x: (x,), lambda x: _check_logits(select(gm(x)), model, output), True)


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
            logits = _check_logits(select(model(x)), model, output)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise LayerError(
                f"layer: {layer!r} ran {len(seen)} times in one forward of {type(model).__name__}; "
                "pick a layer that runs exactly once")
        return logits, seen[0]

    return run


def _hooked_forward_backward(s: Split, x: Tensor, classes: Tensor | None, k: int, *, input_grads: bool) -> Passes:
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(input_grads)
        logits, acts = s.head(x_in, input_grads)
    classes, cotangents = _targets(logits.detach(), classes, k)
    wrt = (acts, x_in) if input_grads else (acts,)
    per_k = [torch.autograd.grad(logits, wrt, ct, retain_graph=i < len(cotangents) - 1)
             for i, ct in enumerate(cotangents)]
    grads = [torch.stack(g).movedim(0, 1) for g in zip(*per_k)]
    return Passes(logits.detach(), classes, acts.detach(), grads[0], grads[1] if input_grads else None)


# --- compile ------------------------------------------------------------------------------------------

def compile(fn: Callable, *, device: torch.device | None = None, mode: str | None = None,
            dynamic: bool = False, backend: str = "inductor", options: dict | None = None) -> Callable:
    """`torch.compile(fn, fullgraph=True)`: a graph break raises instead of silently splitting the graph.

    Shapes are static (`dynamic=False`) except what the caller marks with `mark_batch_dynamic`: K has to
    stay a constant of the graph (the K-call loop unrolls over it, and automatic dynamic shapes would turn
    a second K symbolic). `mode="reduce-overhead"` (CUDA graphs) is for CUDA models. Nothing global is
    configured.
    """
    if mode == "reduce-overhead" and (device is None or device.type != "cuda"):
        raise CompileError(f"compile: mode='reduce-overhead' replays CUDA graphs, but the model is on "
                           f"{device or 'no device'}; use the default mode or move the model to CUDA")
    if dynamic:
        raise CompileError("compile: dynamic=True would make K symbolic, which the K-class backward cannot take; "
                           "the batch dimension is already dynamic")
    chosen = {"mode": mode} if mode is not None else {}
    if options is not None:
        chosen["options"] = options  # torch.compile takes mode or options, not both
    return torch.compile(_with_own_code(fn), fullgraph=True, dynamic=False, backend=backend, **chosen)


def replays_cuda_graphs(device: torch.device | None, mode: str | None = None, options: dict | None = None,
                        **_) -> bool:
    """Whether `compile(..., device=device, mode=mode, options=options)` captures CUDA graphs, whose
    replays reuse their output memory."""
    wanted = mode in ("reduce-overhead", "max-autotune") or bool((options or {}).get("triton.cudagraphs"))
    return wanted and device is not None and device.type == "cuda"


def _with_own_code(fn: Callable) -> Callable:
    """`fn` over a copy of its code object. Dynamo keeps compiled graphs, and counts them against its
    recompile limit, per code object, and every Explainer's `_pure` shares one: without a copy, the ninth
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


# --- ahead-of-time graphs ------------------------------------------------------------------------------

def trace(fn: Callable[..., tuple[Tensor, ...]], example: tuple[Tensor, ...],
          decompositions: dict | None = None) -> fx.GraphModule:
    """Trace `fn` into one aten graph, torch.func's backward written out as ordinary ops (make_fx).

    torch.export cannot trace torch.func.vjp itself (a functorch tensor reaches its fake-tensor
    conversion), but it exports the graph make_fx produces. The batch stays symbolic if the example's
    N >= 2 and equals no other size in the graph (equal sizes share one symbol).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    with _StridelessTrace():
        return make_fx(fn, decomposition_table=decompositions or {}, tracing_mode="symbolic",
                       _allow_non_fake_inputs=True)(*example)


class _StridelessTrace(torch.overrides.TorchFunctionMode):
    """Two layers traced as the same values without restriding, for graphs that must leave torch (ONNX has
    no strides). ConvNeXt permutes its activations to `[N, H, W, C]` and back, so they reach
    - `nn.Linear` as non-contiguous views of more than two dimensions, whose backward traces to `as_strided`
      writes; on a flattened copy it traces to plain MatMuls (and ATen's own flattening of a contiguous
      3-D input, as in every ViT, reads sizes as ints, which pins the symbolic batch);
    - global average pooling channels-last, which ATen computes as a mean and then restrides in place; the
      mean alone is the same value.
    Functionalised, those restrides become `prims.as_strided_scatter`, which has no ONNX translation. Torch's
    decomposition tables cannot reach either op (both are CompositeImplicit), hence a function mode.
    A third: scaled dot-product attention traces to a fused CPU kernel whose backward ONNX lacks; written out
    as softmax(q k^T * scale) v, its backward is MatMuls and a softmax's.
    A fourth, for speed: a bilinear resize outside the differentiated region (the maps' upsampling) stays
    one op, exported as one Resize; traced through autograd it decomposes into four index gathers, with
    which onnxruntime's resnet18 Grad-CAM ran at 0.72x its plain inference instead of 0.94x."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.interpolate:
            resized = _bilinear_resize(*args, **kwargs)
            if resized is not None:
                return resized
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _attention(*args, **kwargs)
        if func is torch.nn.functional.multi_head_attention_forward:
            return _multi_head_attention(func, *args, **kwargs)
        if func is torch.nn.functional.linear and args[0].ndim > 2:
            return _linear(*args, **kwargs)
        if func is torch.nn.functional.adaptive_avg_pool2d:
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            if all(s == 1 for s in ((size,) if isinstance(size, int) else size)):
                return _global_mean(args[0])
        return func(*args, **kwargs)


def _global_mean(x: Tensor) -> Tensor:
    # A MatMul with a constant 1/(h*w) column, not a mean: the mean's gradient spreads each value over h x w
    # by an Expand, the slowest op after the convolutions in onnxruntime's profile of resnet18's top-5
    # Grad-CAM; the MatMul's gradient is an outer product, a MatMul.
    h, w = x.shape[-2:]
    column = torch.full((h * w, 1), 1.0 / (h * w), dtype=x.dtype, device=x.device)
    return (x.flatten(-2) @ column).unsqueeze(-1)


def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    if dropout_p or enable_gqa:
        raise ExportError("export: attention with dropout (a model in training mode) or grouped-query attention has "
                          "no exported form in fastattr; call model.eval()")
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1) @ v


def _bilinear_resize(x: Tensor, size=None, scale_factor=None, mode: str = "nearest", align_corners: bool | None = None,
                     recompute_scale_factor: bool | None = None, antialias: bool = False) -> Tensor | None:
    """`F.interpolate(x, size=..., mode="bilinear")` below autograd, where make_fx records it as one op;
    None for any other call, and for a tensor inside a torch.func transform, whose gradient is needed."""
    plain = (mode == "bilinear" and size is not None and scale_factor is None and not antialias and x.ndim == 4
             and not torch._C._functorch.is_functorch_wrapped_tensor(x) and not x.requires_grad)
    if not plain:
        return None
    size = [size, size] if isinstance(size, int) else list(size)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.aten.upsample_bilinear2d.default(x, size, bool(align_corners))


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.nn.functional.linear(x.flatten(0, -2), weight, bias).unflatten(0, x.shape[:-1])


def _multi_head_attention(func, query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                          add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                          key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                          **rest):
    """nn.MultiheadAttention's plain case (packed projections, no masks or extra keys) written out, since the
    functional's own reshapes of its packed projection trace to `as_strided` writes; any other case runs as is."""
    plain = (bias_k is None and bias_v is None and not add_zero_attn and key_padding_mask is None and attn_mask is None
             and not use_separate_proj_weight and not need_weights and (not training or not dropout_p)
             and rest.get("static_k") is None and rest.get("static_v") is None and not rest.get("is_causal")
             and query.ndim == 3)
    if not plain:
        return func(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                    add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask,
                    need_weights, attn_mask, use_separate_proj_weight, **rest)
    length, batch, _ = query.shape  # [L, N, E]: the module has already moved a batch-first input
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def heads(t: Tensor) -> Tensor:  # [L, N, E] -> [N * heads, L, E / heads]
        return t.reshape(t.shape[0], batch * num_heads, embed_dim // num_heads).transpose(0, 1)

    q, k, v = heads(_linear(query, w_q, b_q)), heads(_linear(key, w_k, b_k)), heads(_linear(value, w_v, b_v))
    out = _attention(q, k, v).transpose(0, 1).reshape(length, batch, embed_dim)
    return _linear(out, out_proj_weight, out_proj_bias), None


def resize_ops_for_onnx(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with its bilinear resizes of a fixed size as two MatMuls with interpolation matrices, `R_h @ x @ R_w^T`
    (a bilinear resize is separable and linear). With them and `one_hot_products_as_gathers`, the ops that
    resnet18's top-5 Grad-CAM adds to its inference took 3.3 ms in onnxruntime at batch 16, 6 ms with one Resize
    (benchmarks/results/onnx-profile.md). A resize whose size involves the batch becomes `upsample_bilinear2d.vec`,
    which torch.onnx translates to one Resize (it decomposes `.default` into index gathers)."""
    batch = _batch_symbols(gm)
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.aten.upsample_bilinear2d.default:
            continue
        x, size, align_corners, *scales = node.args
        if any(s is not None for s in scales):
            continue
        x_value, value = x.meta.get("val"), node.meta.get("val")
        sizes = [_static_size(s, batch) for s in (*x_value.shape[-2:], *value.shape[-2:])] if value is not None else [None]
        if None not in sizes:
            rows, cols = (_interpolation_matrix(n_in, n_out, align_corners, value.dtype)
                          for n_in, n_out in zip(sizes[:2], sizes[2:]))
            with gm.graph.inserting_before(node):
                left = _constant(gm, f"_resize_rows_{node.name}", rows)
                right = _constant(gm, f"_resize_cols_{node.name}", cols.T.contiguous())
                product = gm.graph.call_function(torch.ops.aten.matmul.default, (left, x))
                resized = gm.graph.call_function(torch.ops.aten.matmul.default, (product, right))
            resized.meta.update(node.meta)
            node.replace_all_uses_with(resized)
            gm.graph.erase_node(node)
        else:
            node.target, node.args = torch.ops.aten.upsample_bilinear2d.vec, (x, size, align_corners, None)
    gm.graph.lint()
    gm.recompile()
    return gm


_aten = torch.ops.aten
# Ops that move a one-hot tensor's leading dimensions only (checked: the class dimension stays last, whole).
_LEADING_ONLY = {_aten.clone.default, _aten._to_copy.default, _aten.view.default, _aten._unsafe_view.default,
                 _aten.reshape.default, _aten.select.int}


def one_hot_products_as_gathers(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each product `one_hot(classes) @ W` (a classifier's backward for one-hot cotangents) as the
    row gather `W[classes]`, the same numbers: resnet18's top-5 at batch 16 multiplied an 80 x 1000 matrix
    of zeros and ones by the 1000 x 512 weight."""
    for node in list(gm.graph.find_nodes(op="call_function", target=_aten.mm.default)):
        chain, source = [], node.args[0]
        while isinstance(source, fx.Node) and source.target in _LEADING_ONLY and _keeps_last_dim(source):
            chain.append(source)
            source = source.args[0]
        classes = _one_hot_source(source)
        if classes is None:
            continue
        with gm.graph.inserting_before(node):
            rows = classes  # [..., 1]: the class dimension of the one-hot, as a size-1 dimension
            for op in reversed(chain):
                if op.target is _aten.select.int:
                    rows = gm.graph.call_function(_aten.select.int, (rows, *op.args[1:]))
                elif op.target in (_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default):
                    rows = gm.graph.call_function(_aten.reshape.default, (rows, [*op.args[1][:-1], 1]))
            flat = gm.graph.call_function(_aten.reshape.default, (rows, [-1]))
            gathered = gm.graph.call_function(_aten.index_select.default, (node.args[1], 0, flat))
        gathered.meta.update(node.meta)
        node.replace_all_uses_with(gathered)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def _keeps_last_dim(node: fx.Node) -> bool:
    value, source = node.meta.get("val"), node.args[0].meta.get("val")
    if value is None or source is None or not value.ndim or value.shape[-1] != source.shape[-1]:
        return False
    return node.target is not _aten.select.int or node.args[1] % source.ndim != source.ndim - 1


def _one_hot_source(node: fx.Node) -> fx.Node | None:
    """`classes [..., 1]` if `node` is `classes == arange(n)` (the one-hot of `one_hot`), else None."""
    if not (isinstance(node, fx.Node) and node.target is _aten.eq.Tensor):
        return None
    classes, arange = node.args
    if not (isinstance(arange, fx.Node) and arange.target is _aten.arange.default and len(arange.args) == 1):
        return None
    value = classes.meta.get("val")
    return classes if value is not None and value.ndim and value.shape[-1] == 1 else None


def _input_batch_sizes(gm: fx.GraphModule) -> list[int | torch.SymInt]:
    """The first dimension of each tensor input of a traced graph: symbolic while the batch is dynamic."""
    values = (node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder"))
    return [value.shape[0] for value in values if isinstance(value, Tensor) and value.ndim]


def _batch_symbols(gm: fx.GraphModule) -> set:
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return {symbol for size in _input_batch_sizes(gm) for symbol in free_symbols(size)}


def _static_size(size: int | torch.SymInt, batch: set) -> int | None:
    """A traced size as the number it is in every call: an int, or a symbol of the example's fixed image size
    (the tracer makes every size symbolic; the export fixes all but the batch). None if it involves the batch."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    if isinstance(size, int):
        return size
    return None if free_symbols(size) & batch or size.node.hint is None else int(size.node.hint)


def _interpolation_matrix(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype) -> Tensor:
    """`[n_out, n_in]`: the weights with which torch's bilinear resize mixes `n_in` values into `n_out`."""
    identity = torch.eye(n_in, dtype=torch.float64).reshape(1, n_in, n_in, 1)
    return torch.ops.aten.upsample_bilinear2d.default(identity, [n_out, 1], align_corners)[0, :, :, 0].T.to(dtype)


def _constant(gm: fx.GraphModule, name: str, value: Tensor) -> fx.Node:
    gm.register_buffer(name, value)
    return gm.graph.get_attr(name)


def batch_dims(example: tuple[Tensor, ...], max_batch: int = 4096) -> tuple[dict, ...]:
    """`dynamic_shapes` for torch.export and torch.onnx.export: one symbolic batch shared by all inputs."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return tuple({0: batch} for _ in example)


def fixed_batch(graph_module: fx.GraphModule) -> int | None:
    """The batch size a traced graph fixed, or None while its inputs' first dimension is still symbolic."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return next((int(size) for size in _input_batch_sizes(graph_module) if is_concrete_int(size)), None)


def export(graph_module: fx.GraphModule, example: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """`torch.export` of a `trace`d graph, with a dynamic batch dimension on every input."""
    return torch.export.export(graph_module, example, dynamic_shapes=batch_dims(example))


def _convolution_input_grad(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                            output_padding, groups, output_mask):
    # ONNX has no convolution_backward; the input's gradient of a convolution is a transposed convolution
    # of the output's gradient with the same weight. Parameter gradients never occur in fastattr's graphs.
    if output_mask[1] or output_mask[2]:
        raise ExportError("export: the graph asks for a convolution's weight or bias gradient, which fastattr "
                          "never computes; a parameter of the model is a graph input")
    if transposed or weight.ndim != 4:
        raise ExportError(f"export: the gradient of a {'transposed ' if transposed else ''}{weight.ndim - 2}-D "
                          "convolution has no ONNX translation in fastattr; only 2-D convolutions are supported")
    reach = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if all(s == 1 for s in stride) and all(0 <= p <= r for p, r in zip(padding, reach)):
        # Unstrided, the transposed convolution is a convolution with the kernel flipped and its channel axes
        # swapped per group. In onnxruntime's profile of resnet18's saliency at batch 16, the 13 unstrided
        # ConvTransposes and the 7 strided ones took 256-279 ms a call; as 13 Convs and 7 ConvTransposes, about
        # 105-135 ms and 65 ms (benchmarks/results/onnx-profile.md).
        flipped = weight.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1).flip(-2, -1)
        grad_input = torch.nn.functional.conv2d(grad_output, flipped, None, 1, [r - p for r, p in zip(reach, padding)],
                                                dilation, groups)
        return grad_input, None, None
    extra = _output_padding(input, grad_output, weight.shape[2:], stride, padding, dilation)
    grad_input = torch.nn.functional.conv_transpose2d(grad_output, weight, None, stride, padding, extra, groups, dilation)
    return grad_input, None, None


def _output_padding(input: Tensor, grad_output: Tensor, kernel, stride, padding, dilation=(1, 1)) -> list[int]:
    """ConvTranspose's output_padding that restores `input`'s height and width from `grad_output`'s: the
    rows and columns a strided window left over."""
    return [int(input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                      + dilation[i] * (kernel[i] - 1) + 1)) for i in range(2)]


def _pair(value, default=None) -> tuple[int, int]:
    value = tuple(value) if len(value) else default
    return value if len(value) == 2 else (value[0], value[0])


def _pooling_matrix(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """`[size_out, size_in]`: row i averages adaptive pooling's bin i, [floor(i*in/out), ceil((i+1)*in/out))."""
    rows = torch.zeros(size_out, size_in, dtype=like.dtype)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        rows[i, start:end] = 1.0 / (end - start)
    return rows.to(like.device)


def _adaptive_avg_pool2d_input_grad(grad_output: Tensor, input: Tensor) -> Tensor:
    # Adaptive average pooling is Y = P_h X P_w^T for fixed averaging matrices, so dX = P_h^T dY P_w: two
    # MatMuls, which ONNX has, for any ratio of sizes (VGG pools 2x2 up to 7x7 on small images).
    p_h = _pooling_matrix(int(input.shape[-2]), int(grad_output.shape[-2]), grad_output)
    p_w = _pooling_matrix(int(input.shape[-1]), int(grad_output.shape[-1]), grad_output)
    return p_h.T @ grad_output @ p_w


def _threshold_input_grad(grad_output: Tensor, x: Tensor, threshold: float) -> Tensor:
    # ReLU's backward as a product with its mask, not a Where: in onnxruntime's profile of resnet18's saliency at
    # batch 16, the 17 Wheres took 123-128 ms a call; the products, casts and Nots about 34 ms
    # (benchmarks/results/onnx-profile.md). Only an infinite or NaN gradient differs (NaN, not 0).
    return grad_output * (x <= threshold).logical_not().to(grad_output.dtype)


def _silu_input_grad(grad_output: Tensor, x: Tensor) -> Tensor:
    sig = torch.sigmoid(x)
    return grad_output * sig * (1 + x * (1 - sig))


def _avg_pool2d_input_grad(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           divisor_override):
    # Each output averages a kernel_h x kernel_w window, so the input's gradient spreads each output
    # gradient back over its window: a depthwise transposed convolution with a constant 1/area kernel.
    kernel_size = _pair(kernel_size)
    stride, padding = _pair(stride, kernel_size), _pair(padding)
    if ceil_mode or divisor_override is not None or (any(padding) and not count_include_pad):
        raise ExportError("export: avg_pool2d with ceil_mode, divisor_override or padding not counted has no "
                          "ONNX gradient in fastattr")
    channels, (kh, kw) = int(input.shape[1]), kernel_size
    kernel = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=grad_output.dtype, device=grad_output.device)
    extra = _output_padding(input, grad_output, kernel_size, stride, padding)
    return torch.nn.functional.conv_transpose2d(grad_output, kernel, None, stride, padding, extra, channels)


def _max_pool2d_input_grad(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    # Each output took one input, whose index within its [h * w] plane the forward returned: the gradient goes
    # back to those places, summed where windows overlap (a ScatterElements with add). torch 2.11's torch.onnx
    # has no translation of the op (2.14's has).
    plane = input.shape[:-2]
    grad = grad_output.new_zeros(*plane, input.shape[-2] * input.shape[-1])
    return grad.scatter_add(-1, indices.flatten(-2), grad_output.flatten(-2)).reshape(input.shape)


ONNX_DECOMPOSITIONS = {
    torch.ops.aten.max_pool2d_with_indices_backward.default: _max_pool2d_input_grad,
    torch.ops.aten.silu_backward.default: _silu_input_grad,
    torch.ops.aten.threshold_backward.default: _threshold_input_grad,
    torch.ops.aten.avg_pool2d_backward.default: _avg_pool2d_input_grad,
    torch.ops.aten.convolution_backward.default: _convolution_input_grad,
    torch.ops.aten._adaptive_avg_pool2d_backward.default: _adaptive_avg_pool2d_input_grad,
}
