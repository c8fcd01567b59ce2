"""make_fx tracing of the attribution function, and reading the batch size back from the traced graph."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx

from ..errors import ExportError

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
    one op, exported as one Resize; traced through autograd it decomposes into four index gathers, which
    onnxruntime ran markedly slower (docs/performance.md, the onnxruntime section)."""

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


def input_batch_sizes(gm: fx.GraphModule) -> list[int | torch.SymInt]:
    """The first dimension of each tensor input of a traced graph: symbolic while the batch is dynamic."""
    values = (node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder"))
    return [value.shape[0] for value in values if isinstance(value, Tensor) and value.ndim]


def batch_dims(example: tuple[Tensor, ...], max_batch: int = 4096) -> tuple[dict, ...]:
    """`dynamic_shapes` for torch.export and torch.onnx.export: one symbolic batch shared by all inputs."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return tuple({0: batch} for _ in example)


def fixed_batch(graph_module: fx.GraphModule) -> int | None:
    """The batch size a traced graph fixed, or None while its inputs' first dimension is still symbolic."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return next((int(size) for size in input_batch_sizes(graph_module) if is_concrete_int(size)), None)


def to_exported_program(graph_module: fx.GraphModule, example: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """`torch.export` of a `trace`d graph, with a dynamic batch dimension on every input."""
    return torch.export.export(graph_module, example, dynamic_shapes=batch_dims(example))
