"""Private: what turns the pure attribution function into a graph that leaves torch.

- `trace`: make_fx tracing, with the function mode that keeps strides out of the graph, and the batch checks;
- `decompositions`: the backward ops ONNX lacks, written as ops it has;
- `passes`: graph rewrites that make onnxruntime fast (resizes as MatMuls, one-hot products as gathers).

`fastattr.export` is the only user; nothing here is public API.
"""

from .decompositions import ONNX_DECOMPOSITIONS
from .passes import one_hot_products_as_gathers, resize_ops_for_onnx
from .trace import batch_dims, fixed_batch, to_exported_program, trace

__all__ = ["ONNX_DECOMPOSITIONS", "batch_dims", "fixed_batch", "one_hot_products_as_gathers", "resize_ops_for_onnx",
           "to_exported_program", "trace"]
