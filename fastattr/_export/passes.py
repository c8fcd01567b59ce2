"""Graph rewrites of a traced attribution graph before ONNX export: the same numbers, faster in onnxruntime."""

from __future__ import annotations

import torch
from torch import Tensor, fx

from ..onehot import one_hot_classes
from .trace import input_batch_sizes

def resize_ops_for_onnx(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with its bilinear resizes of a fixed size as two MatMuls with interpolation matrices, `R_h @ x @ R_w^T`
    (a bilinear resize is separable and linear): onnxruntime's Resize was the largest op the explanation added
    (benchmarks/results/onnx-profile.md, before and after). A resize whose size involves the batch becomes `upsample_bilinear2d.vec`,
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
        classes = one_hot_classes(source)
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


def _batch_symbols(gm: fx.GraphModule) -> set:
    from torch.fx.experimental.symbolic_shapes import free_symbols

    return {symbol for size in input_batch_sizes(gm) for symbol in free_symbols(size)}


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
