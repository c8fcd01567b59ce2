"""`fastattr export --format triton`: a Triton model repository whose config.pbtxt declares the ONNX file's own
inputs and outputs. Parsed with `google.protobuf.text_format` into the `ModelConfig` message tritonclient ships;
not run inside Triton here."""

import onnx
import pytest

from fastattr import cli

tritonclient = pytest.importorskip("tritonclient")
from google.protobuf import text_format  # noqa: E402


def _model_config_pb2():
    """tritonclient's `model_config_pb2`, loaded from its file: importing it as `tritonclient.grpc.model_config_pb2`
    runs tritonclient.grpc's __init__, whose service protos collide in protobuf's pool with KServe's own (the same
    `inference.*` names) when both load in one process."""
    import importlib.util
    from pathlib import Path

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    if not path.exists():
        pytest.skip("tritonclient ships no grpc/model_config_pb2.py")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model_config_pb2 = _model_config_pb2()

SIZE, K = 64, 3


def exported(tmp_path, *options):
    # Two methods at layer4: two map outputs, and a backward through the head alone (what is declared does not
    # depend on how deep the backward runs, and a saliency backward through the whole model triples the export).
    repository = tmp_path / "models"
    assert cli.main(["export", "--model", "resnet18", "--layer", "layer4",
                     "--methods", "gradcam,layercam", "--k", str(K), "--input-size", str(SIZE), "--format", "triton",
                     "-o", str(repository), *options]) == 0
    folder = repository / "fastattr"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return config, onnx.load(str(folder / "1" / "model.onnx"), load_external_data=False).graph


def declared(values):
    """(name, Triton type, dims after the batch) of ONNX graph inputs or outputs, read from the file."""
    types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}
    return [(v.name, types[v.type.tensor_type.elem_type],
             [d.dim_value for d in v.type.tensor_type.shape.dim][1:]) for v in values]


def in_config(entries):
    return [(e.name, model_config_pb2.DataType.Name(e.data_type), list(e.dims)) for e in entries]


@pytest.mark.slow  # an ONNX export
def test_the_repository_config_declares_the_onnx_files_inputs_and_outputs_with_dynamic_batching(tmp_path):
    config, graph = exported(tmp_path)
    assert (config.name, config.platform, config.max_batch_size) == ("fastattr", "onnxruntime_onnx", 16)
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 10_000
    assert in_config(config.input) == declared(graph.input) == [("images", "TYPE_FP32", [3, SIZE, SIZE])]
    assert in_config(config.output) == declared(graph.output) == [
        ("logits", "TYPE_FP32", [1000]), ("classes", "TYPE_INT64", [K]),
        ("gradcam", "TYPE_FP32", [K, SIZE, SIZE]), ("layercam", "TYPE_FP32", [K, SIZE, SIZE])]


@pytest.mark.slow  # an ONNX export
def test_an_export_with_classes_declares_the_class_indices_input(tmp_path):
    config, graph = exported(tmp_path, "--with-classes")
    assert in_config(config.input) == declared(graph.input) == [
        ("images", "TYPE_FP32", [3, SIZE, SIZE]), ("class_indices", "TYPE_INT64", [K])]
