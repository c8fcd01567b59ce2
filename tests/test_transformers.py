"""Vision transformers on the same engine: token and channels-last layers become maps by rule.

Parity: fastattr's raw Grad-CAM equals the article's formula (ReLU(sum_c mean_ij(g_c) A_c)) applied to the
layer's activation and gradient as captured by hooks and laid out by hand here, in float64 to 1e-10. The hand
layouts: ViT tokens [N, prefix + h*w, C] lose the prefix (1 class token; 2 for DeiT's class and distillation
tokens; 5 for a class token and 4 registers) and go on the h x w patch grid; Swin's [N, h, w, C] is permuted.
Random weights, 64x64 images (a 4x4 grid of 16x16 patches; Swin-T's last stage is 2x2). torchvision
zero-initialises ViT's head, which would make every logit 0 and every map empty, so each head gets random
weights.

Compiled and onnxruntime against eager: two-block relatives (torchvision's VisionTransformer, timm's DeiT
distilled) at 32x32, float32; the measure of test_compile (logits 1e-4, maps by correlation and max abs).
"""

import functools

import pytest
import timm
import torch
import torchvision
from torch import nn

import fastattr
from test_compile import assert_same_explanation

SIZE = 64


def _random_head(model: nn.Module) -> nn.Module:
    head = model.heads.head if hasattr(model, "heads") else model.head
    heads = [head, getattr(model, "head_dist", None)]
    with torch.no_grad():
        for h in filter(None, heads):
            h.fc.weight.normal_(0, 0.5) if hasattr(h, "fc") else h.weight.normal_(0, 0.5)
    return model


# name -> (builder, default layer, prefix tokens or None for channels-last, grid side)
MODELS = {
    "vit_b_16": (lambda: torchvision.models.vit_b_16(image_size=SIZE), "encoder.layers.encoder_layer_11.ln_1", 1, 4),
    "swin_t": (lambda: torchvision.models.swin_t(), "features.7.1.norm1", None, 2),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=SIZE), "blocks.11.norm1", 1, 4),
    "deit_tiny_distilled_patch16_224": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=SIZE),
                                        "blocks.11.norm1", 2, 4),
    "vit_tiny_patch16_224 with 4 registers": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=SIZE, reg_tokens=4), "blocks.11.norm1", 5, 4),
}


@functools.cache
def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _random_head(MODELS[name][0]()).double().eval()


def images(n: int, size: int = SIZE, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(n))


def by_hand(acts: torch.Tensor, prefix: int | str | None, side: int) -> torch.Tensor:
    if prefix == "map":                                  # a feature map [N, C, h, w]
        return acts
    if prefix is None:                                   # Swin: [N, h, w, C]
        return acts.permute(0, 3, 1, 2)
    n, _, c = acts.shape                                 # ViT: [N, prefix + h*w, C]
    return acts[:, prefix:, :].reshape(n, side, side, c).permute(0, 3, 1, 2)


def hooked_gradcam(net: nn.Module, layer: str, x: torch.Tensor, classes: torch.Tensor, prefix, side) -> torch.Tensor:
    """The article's Grad-CAM per class, with a forward hook for the activation and autograd for its gradient."""
    seen = []
    handle = net.get_submodule(layer).register_forward_hook(lambda m, i, out: seen.append(out))
    maps = []
    try:
        for j in range(classes.shape[1]):
            seen.clear()
            logits = net(x)
            logits = logits["logits"] if isinstance(logits, dict) else logits  # Hugging Face's ModelOutput
            (grad,) = torch.autograd.grad(logits.gather(1, classes[:, j:j + 1]).sum(), seen[0])
            acts, grad = by_hand(seen[0].detach(), prefix, side), by_hand(grad, prefix, side)
            maps.append((grad.mean((2, 3), keepdim=True) * acts).sum(1).relu())
    finally:
        handle.remove()
    return torch.stack(maps, 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_default_layer_is_the_last_blocks_first_norm(name):
    assert fastattr.default_layer(model(name)) == MODELS[name][1]


@pytest.mark.parametrize("n,k", [(1, 1), (2, 3)])
@pytest.mark.parametrize("name", list(MODELS))
def test_gradcam_equals_the_article_formula_on_the_hand_laid_out_activation(name, n, k):
    net, x = model(name), images(n)
    _, layer, prefix, side = MODELS[name]
    out = fastattr.explain(net, x, methods="gradcam", k=k, upsample=False, normalize=False)
    assert out.maps["gradcam"].shape == (n, k, side, side)
    want = hooked_gradcam(net, layer, x, out.classes, prefix, side)
    assert want.amax() > 0  # maps with something in them
    torch.testing.assert_close(out.maps["gradcam"], want, rtol=0, atol=1e-10)


def test_saliency_of_a_vit_is_the_input_gradient():
    net, x = model("deit_tiny_distilled_patch16_224"), images(2)
    out = fastattr.explain(net, x, methods=("gradcam", "saliency"), k=2, normalize=False, keep_grads=True)
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(net(xr).gather(1, out.classes[:, 1:2]).sum(), xr)
    torch.testing.assert_close(out.grads["input"][:, 1], grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.maps["saliency"][:, 1], grad.abs().sum(1), rtol=0, atol=1e-12)


def test_an_image_size_the_vit_was_not_built_for_is_refused_with_the_size_it_takes():
    with pytest.raises(fastattr.InputError, match=r"VisionTransformer was built for 64x64 images \(a 4x4 grid of "
                       r"16x16 patches in its position embedding\), got 32x32"):
        fastattr.explain(model("vit_b_16"), images(1, size=32))


class TokenNet(nn.Module):
    """Patches to tokens with a learned summary token in front, mixed, averaged, classified."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.summary = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.summary.expand(t.shape[0], -1, -1), t], 1)
        return self.fc(self.norm(t).mean(1))


def test_tokens_of_a_model_without_a_known_patch_size_ask_for_reshape():
    with pytest.raises(fastattr.LayerError, match=r"'norm' of TokenNet gives a 3-D activation \[1, 17, 8\]; as tokens "
                       r"\[N, tokens, C\] it needs the model's patch size, .* pass reshape=lambda acts"):
        fastattr.explain(TokenNet().eval(), torch.randn(1, 3, 16, 16), layer="norm")


def test_reshape_lays_out_tokens_the_model_does_not_describe():
    net, x = TokenNet().double().eval(), images(2, size=16)
    grid = lambda t: t[:, 1:].unflatten(1, (4, 4)).permute(0, 3, 1, 2)  # noqa: E731
    out = fastattr.explain(net, x, layer="norm", reshape=grid, classes=[3], upsample=False, normalize=False)
    want = hooked_gradcam(net, "norm", x, torch.tensor([[3], [3]]), 1, 4)
    torch.testing.assert_close(out.maps["gradcam"], want, rtol=0, atol=1e-12)


def test_a_token_count_that_fits_no_grid_is_refused_with_what_was_found():
    from fastattr import tokens

    layout = tokens.Layout(patch=(16, 16), prefix=1, channels_last=False, reshape=None)
    with pytest.raises(fastattr.LayerError, match=r"gives 20 tokens \(shape \[1, 20, 192\]\), but 64x64 images in "
                       r"16x16 patches make a 4x4 grid of 16 patch tokens, plus 1 class/distillation/register "
                       r"tokens = 17"):
        tokens.check(layout, torch.zeros(1, 20, 192), (64, 64), "blocks.11.norm1", "VisionTransformer")


def test_a_reshape_that_does_not_give_a_map_is_refused():
    with pytest.raises(fastattr.LayerError, match=r"reshape: turned 'norm''s activation \[1, 17, 8\] into \[1, 17, 8\]"):
        fastattr.explain(TokenNet().eval(), torch.randn(1, 3, 16, 16), layer="norm", reshape=lambda t: t)


# --- compiled and onnxruntime against eager, on two-block relatives -------------------------------------------

SMALL = {
    "torchvision-vit": lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
    "deit-distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2,
                                                num_classes=10),
}


@functools.cache
def small(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _random_head(SMALL[name]()).eval()


@pytest.mark.slow  # a compile or an ONNX export
def test_a_compiled_vit_equals_eager():
    net, x = small("deit-distilled"), images(2, size=32, dtype=torch.float32)
    options = dict(methods=("gradcam", "saliency"))
    assert_same_explanation(fastattr.Explainer(net, compile=True, **options)(x, k=2),
                            fastattr.Explainer(net, **options)(x, k=2))


# Grad-CAM alone: the export first vmaps the K classes' backward, which fixes the batch size here (through the
# last block), so it traces the K calls instead and the batch stays dynamic.
@pytest.mark.slow  # a compile or an ONNX export
@pytest.mark.parametrize("methods", [("gradcam", "saliency"), ("gradcam",)], ids=["with-saliency", "gradcam-alone"])
@pytest.mark.parametrize("name", list(SMALL))
def test_an_onnx_vit_equals_eager_for_batch_1_and_3(name, methods, tmp_path):
    net = small(name)
    path = fastattr.export_onnx(net, tmp_path / "vit.onnx", methods=methods, k=2, input_shape=(3, 32, 32))
    explainer, eager = fastattr.OnnxExplainer(path), fastattr.Explainer(net, methods=methods)
    for n in (1, 3):
        x = images(n, size=32, dtype=torch.float32)
        assert_same_explanation(explainer(x), eager(x, k=2))


# --- Hugging Face transformers: random weights built from a config (no download) ------------------------------------
# name -> (default layer, prefix tokens ("map": a feature map), grid side). Two blocks or stages each, 64x64.

def _hugging_face(name: str) -> nn.Module:
    tf = pytest.importorskip("transformers")
    small = dict(image_size=SIZE, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, num_labels=10)
    if name == "hf-vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**small))
    if name == "hf-deit":
        return tf.DeiTForImageClassification(tf.DeiTConfig(**small))
    if name == "hf-swin":
        return tf.SwinForImageClassification(tf.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1],
                                                           num_heads=[1, 2], window_size=4, num_labels=10))
    return tf.ConvNextForImageClassification(tf.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                               num_labels=10))


HUGGING_FACE = {"hf-vit": ("vit.layers.1.layernorm_before", 1, 4), "hf-deit": ("deit.layers.1.layernorm_before", 2, 4),
                "hf-swin": ("swin.encoder.layers.1.blocks.0.layernorm_before", 0, 8),
                "hf-convnext": ("convnext.encoder.stages.3", "map", 2)}


@functools.cache
def hugging_face(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _hugging_face(name).double().eval()


@pytest.mark.filterwarnings("ignore:fastattr. torch.fx cannot trace")
@pytest.mark.parametrize("n,k", [(1, 1), (2, 3)])
@pytest.mark.parametrize("name", list(HUGGING_FACE))
def test_a_hugging_face_classifier_explains_its_logits_at_its_default_layer_as_the_article(name, n, k):
    net, x = hugging_face(name), images(n)
    layer, prefix, side = HUGGING_FACE[name]
    assert fastattr.default_layer(net) == layer
    out = fastattr.explain(net, x, methods="gradcam", k=k, upsample=False, normalize=False)
    assert out.maps["gradcam"].shape == (n, k, side, side)
    want = hooked_gradcam(net, layer, x, out.classes, prefix, side)
    assert want.amax() > 0
    torch.testing.assert_close(out.logits, net(x).logits)
    torch.testing.assert_close(out.maps["gradcam"], want, rtol=0, atol=1e-10)