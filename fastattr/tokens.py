"""A layer's activation as the `[N, C, h, w]` map every CAM reads.

- `[N, C, h, w]` (a convolution's feature map): as it is.
- `[N, h, w, C]` (Swin, channels last): permuted. Which models are channels last comes from the model
  (torchvision's `SwinTransformer`, a timm model with `output_fmt == "NHWC"`), not from the shape.
- `[N, prefix + h*w, C]` (ViT tokens): the prefix tokens (class, distillation, registers) dropped and the
  rest laid on the patch grid. The grid comes from the model's patch size and the image's size, and the
  prefix count from the model (`num_prefix_tokens` in timm, the class token in torchvision); a token count
  that does not fit raises instead of guessing.
- Hugging Face's ViT and DeiT read alike (the patch size from the config, the prefix from the embeddings'
  class and distillation tokens); its Swin's `[N, h*w, C]` tokens lie on the grid of the image's aspect that
  their count gives, since each stage halves it.
- anything else, or any model, with `reshape=`: the caller's function `acts -> [N, C, h, w]`.

The same rule lays out the gradients, which carry a K axis after the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from .errors import InputError, LayerError

Reshape = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Layout:
    patch: tuple[int, int] | None   # the model's patch size, for token layers
    prefix: int                     # tokens before the patch tokens
    channels_last: bool             # 4-D activations are [N, h, w, C]
    reshape: Reshape | None         # the caller's own
    image_size: tuple[int, int] | None = None  # the only image size the model takes, when it says so
    grid_from_count: bool = False   # tokens [N, h*w, C] whose grid, of the image's aspect, the count gives (a
                                    # hierarchical transformer's stages halve it: Hugging Face's Swin)


def layout_of(model: nn.Module, reshape: Reshape | None = None) -> Layout:
    """What the model says about its activations' layout."""
    if reshape is not None and not callable(reshape):
        raise LayerError(f"reshape: expected a function acts -> [N, C, h, w], got {type(reshape).__name__}")
    import torchvision

    patch, prefix, image_size = None, 0, None
    if isinstance(model, torchvision.models.VisionTransformer):
        patch, prefix, image_size = _pair(model.patch_size), 1, _pair(model.image_size)
    elif hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):  # timm's ViT family
        embed = model.patch_embed
        patch, prefix = _pair(embed.patch_size), int(model.num_prefix_tokens)
        if getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_size", False) \
                and getattr(embed, "img_size", None) is not None:
            image_size = _pair(embed.img_size)
    elif (hugging_face := _hugging_face(model)) is not None:
        patch, prefix, image_size, from_count = hugging_face
        return Layout(patch, prefix, False, reshape, image_size, from_count)
    channels_last = isinstance(model, torchvision.models.SwinTransformer) or getattr(model, "output_fmt", None) == "NHWC"
    return Layout(patch, prefix, channels_last, reshape, image_size)


def _hugging_face(model: nn.Module) -> tuple | None:
    """(patch, prefix, image_size, grid_from_count) of a Hugging Face vision transformer, from its config and
    embeddings: ViT's class token, DeiT's class and distillation tokens, Swin's stages; else None."""
    config = getattr(model, "config", None)
    if not type(model).__module__.startswith("transformers.") or not hasattr(config, "patch_size"):
        return None
    if "swin" in getattr(config, "model_type", ""):
        return None, 0, None, True
    embeddings = getattr(getattr(model, getattr(model, "base_model_prefix", ""), model), "embeddings", None)
    if getattr(embeddings, "position_embeddings", None) is None:  # a convolutional model (ConvNeXt): maps, no tokens
        return None
    prefix = sum(getattr(embeddings, name, None) is not None for name in ("cls_token", "distillation_token"))
    return _pair(config.patch_size), prefix, _pair(config.image_size), False


def _grid_from_count(count: int, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) with h * w = count and h / w = the image's aspect, or None."""
    height, width = image_size
    h = round((count * height / width) ** 0.5)
    return (h, count // h) if h and h * (count // h) == count and h * width == (count // h) * height else None


def _pair(size) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def check_image_size(layout: Layout, image_size: tuple[int, int], model_name: str) -> None:
    """A ViT's position embedding fixes the patch grid, hence the image size: say so before the model's own
    assertion does."""
    if layout.image_size is not None and tuple(image_size) != layout.image_size:
        (h, w), (ph, pw) = layout.image_size, layout.patch
        raise InputError(
            f"images: {model_name} was built for {h}x{w} images (a {h // ph}x{w // pw} grid of {ph}x{pw} patches in "
            f"its position embedding), got {image_size[0]}x{image_size[1]}; resize the images to {h}x{w}, or build the "
            "model for this size (torchvision: image_size=..., timm: img_size=... or dynamic_img_size=True)")


def check(layout: Layout, acts: Tensor, image_size: tuple[int, int], layer: str, model_name: str) -> None:
    """Raise a LayerError saying what was found unless `acts` (one image's worth will do, fake or real)
    becomes a `[N, C, h, w]` map by `layout` for images of `image_size`."""
    shape = list(acts.shape)
    fix = "; pass reshape=lambda acts: ... returning [N, C, h, w]"
    if layout.reshape is not None:
        out = layout.reshape(acts)
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != acts.shape[0]:
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise LayerError(f"reshape: turned {layer!r}'s activation {shape} into {got}, not [N, C, h, w]")
        return
    if acts.ndim == 4:
        return
    if acts.ndim != 3:
        raise LayerError(f"layer: {layer!r} of {model_name} gives an activation of shape {shape}, neither a feature "
                         f"map [N, C, h, w] nor tokens [N, tokens, C]{fix}")
    if layout.grid_from_count:
        if _grid_from_count(shape[1], image_size) is None:
            raise LayerError(f"layer: {layer!r} of {model_name} gives {shape[1]} tokens (shape {shape}), which lay on no "
                             f"grid of the {image_size[0]}x{image_size[1]} image's aspect{fix}")
        return
    if layout.patch is None:
        raise LayerError(f"layer: {layer!r} of {model_name} gives a 3-D activation {shape}; as tokens [N, tokens, C] "
                         f"it needs the model's patch size, which fastattr reads from torchvision's, timm's and Hugging "
                         f"Face's ViTs "
                         f"and {model_name} does not give{fix}")
    (height, width), (ph, pw) = image_size, layout.patch
    if height % ph or width % pw:
        raise LayerError(f"images: {height}x{width} is not a whole number of {ph}x{pw} patches, so {layer!r}'s "
                         f"tokens have no grid; use images whose sides are multiples of the patch size")
    h, w = height // ph, width // pw
    if shape[1] != layout.prefix + h * w:
        raise LayerError(
            f"layer: {layer!r} of {model_name} gives {shape[1]} tokens (shape {shape}), but {height}x{width} images "
            f"in {ph}x{pw} patches make a {h}x{w} grid of {h * w} patch tokens, plus {layout.prefix} class/"
            f"distillation/register tokens = {layout.prefix + h * w}; the model was built for another image size, "
            f"or the layer does not hold one token per patch{fix}")


def to_grid(layout: Layout, t: Tensor, acts_ndim: int, image_size: tuple[int, int]) -> Tensor:
    """`t` (the activation, or its gradients with extra leading axes) as `[..., C, h, w]`."""
    if layout.reshape is not None:
        lead = t.shape[:t.ndim - acts_ndim + 1]
        return layout.reshape(t.flatten(0, t.ndim - acts_ndim)).unflatten(0, lead)
    if acts_ndim == 3 and layout.grid_from_count:
        return t.unflatten(-2, _grid_from_count(t.shape[-2], image_size)).movedim(-1, -3)
    if acts_ndim == 3:
        h, w = image_size[0] // layout.patch[0], image_size[1] // layout.patch[1]
        return t[..., layout.prefix:, :].unflatten(-2, (h, w)).movedim(-1, -3)
    if layout.channels_last:
        return t.movedim(-1, -3)
    return t

