"""A Triton Inference Server model repository around a fastattr ONNX export: the file and a `config.pbtxt`.

    REPOSITORY/NAME/config.pbtxt       platform onnxruntime_onnx, dynamic batching
    REPOSITORY/NAME/1/model.onnx       the export (its external weights file beside it, if it has one)

The config declares the ONNX file's own inputs and outputs (names, datatypes, the dimensions after the batch,
read from the file), so a Triton or MLServer user serves the export with their ONNX runtime backend and calls it
with the Open Inference Protocol: inputs `images` (FP32 `[N, 3, S, S]`, normalised) and, in an export made with
classes, `class_indices` (INT64 `[N, K]`); outputs `logits`, `classes` and one map per method. It has not been
run inside Triton here: tests/test_triton.py parses it into tritonclient's `ModelConfig` message and checks it
against the file.

>>> write_repository("resnet50.onnx", "models")     # models/fastattr/config.pbtxt, models/fastattr/1/model.onnx  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import ExportError

__all__ = ["write_repository", "config_text", "TRITON_TYPES"]

# ONNX's TensorProto element types -> Triton's data types (model_config.proto), for the types an export holds.
TRITON_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


def config_text(onnx_path: str | Path, name: str = "fastattr", max_batch_size: int = 16,
                queue_delay_us: int = 10_000) -> str:
    """`config.pbtxt` for the export at `onnx_path`: its inputs and outputs with their dimensions after the batch,
    and dynamic batching of up to `max_batch_size` images, waiting at most `queue_delay_us` for a batch to fill."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def tensors(values) -> str:
        entries = []
        for value in values:
            kind = value.type.tensor_type
            if kind.elem_type not in TRITON_TYPES:
                raise ExportError(f"triton: {value.name!r} has ONNX element type {kind.elem_type}, which this "
                                  "repository writer does not map to a Triton type")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
            if not dims or dims[0] != -1:
                raise ExportError(f"triton: {value.name!r} has shape {dims}, without a dynamic batch dimension "
                                  "first; Triton's dynamic batching needs one")
            entries.append(f'  {{ name: "{value.name}" data_type: {TRITON_TYPES[kind.elem_type]} '
                           f'dims: [ {", ".join(map(str, dims[1:]))} ] }}')
        return ",\n".join(entries)

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{tensors(graph.input)}\n]\noutput [\n{tensors(graph.output)}\n]\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n")


def write_repository(onnx_path: str | Path, repository: str | Path, name: str = "fastattr",
                     max_batch_size: int = 16) -> Path:
    """Copy the export into `repository/name/1/model.onnx` (with its external data file, if any) and write
    `repository/name/config.pbtxt`; return the model's folder."""
    onnx_path, folder = Path(onnx_path), Path(repository) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "1" / "model.onnx")
    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.exists():  # the export's external weights, named as the file refers to them
        shutil.copyfile(data, folder / "1" / data.name)
    (folder / "config.pbtxt").write_text(config_text(onnx_path, name, max_batch_size))
    return folder
