"""Guided backpropagation's rule (Springenberg et al. 2015, https://arxiv.org/abs/1412.6806) in a copy of
the model's FX graph: every ReLU passes a gradient back only where the gradient and the ReLU's output are
positive. No hook touches the model; the rule is an `autograd.Function`, which torch.func, torch.compile and
make_fx all see.

>>> s = guided_split(model, None)              # a Split at the input, as graph.split(model, None)  # doctest: +SKIP
>>> graph.forward_backward(s, images, None, k=3, input_grads=True).input_grads  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from .errors import MethodError
from .graph import OutputSelector, Split, at_input, unpassed_defaults

__all__ = ["guided_relu", "guided_split"]

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


def guided_split(model: nn.Module, output: OutputSelector = None) -> Split:
    """The whole model as a Split at the input whose every ReLU (module, function or method) has the guided
    backward rule. The model is traced with torch.fx, not hooked, and left as it is."""
    try:
        gm = fx.symbolic_trace(model, concrete_args=unpassed_defaults(model))
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
    return at_input(model, output, forward=gm)
