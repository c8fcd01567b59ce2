"""fastattr: saliency maps and Grad-CAM for PyTorch vision models as one forward-backward graph.

>>> import fastattr, torchvision
>>> model = torchvision.models.resnet18().eval()
>>> out = fastattr.explain(model, images, layer="layer4", methods=("gradcam", "saliency"), k=5)  # doctest: +SKIP
>>> out.logits, out.classes, out.maps["gradcam"]      # [N, 1000], [N, 5], [N, 5, H, W]  # doctest: +SKIP
>>> pipeline = fastattr.build(fastattr.Spec("resnet18", backend="onnx"))   # what every front end runs  # doctest: +SKIP
"""

from . import files, images, metrics, overlay, reference, targets, tokens, zoo
from .errors import CompileError, ExportError, FastattrError, InputError, LayerError, MethodError, ModelOutputError, TargetError
from .explain import Explainer, Explanation, clear_cache, explain
from .export import OnnxExplainer, Program, export_onnx, export_program, load_program
from .layers import default_layer, layers
from .methods import METHODS
from .pipeline import Pipeline, Spec, build

__all__ = [
    "Explainer", "Explanation", "explain", "clear_cache", "export_program", "load_program", "Program", "export_onnx", "OnnxExplainer", "layers", "default_layer", "METHODS", "build", "Spec", "Pipeline", "reference", "tokens", "zoo", "images", "overlay", "files", "metrics", "targets",
    "CompileError", "ExportError", "FastattrError", "InputError", "LayerError", "MethodError", "ModelOutputError", "TargetError",
]
__version__ = "0.1.0"
