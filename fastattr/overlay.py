"""Pictures for display: colorize maps, blend them over images, lay them out in one picture; and faithfulness
curves (deletion, insertion) as line charts, drawn with PIL so that fastattr does not depend on matplotlib.

>>> import fastattr, fastattr.overlay as ov
>>> out = fastattr.explain(model, x, layer="layer4", methods=("gradcam", "saliency"), k=3)  # doctest: +SKIP
>>> ov.grid(photo, {m: v[0] for m, v in out.maps.items()}, captions).save("cat.png")        # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .errors import InputError
from .postprocess import upsample

__all__ = ["COLORMAP", "PALETTE", "colorize", "blend", "to_pil", "grid", "curves"]

# matplotlib's "inferno" (van der Walt & Smith, released under CC0; generated with matplotlib 3.11
# as `colormaps["inferno"](range(256))`), each channel rounded to 8 bits. Embedded so that fastattr
# does not depend on matplotlib. 16 entries of RRGGBB per line. Inferno rather than viridis because
# its relative luminance (on linearised sRGB) stays strictly increasing after the 8-bit rounding.
_INFERNO = (
    "00000401000501010601010802010a02020c02020e03021004031204031405041706041907051b08051d09061f0a0722"
    "0b07240c08260d08290e092b10092d110a30120a32140b34150b37160b39180c3c190c3e1b0c411c0c431e0c451f0c48"
    "210c4a230c4c240c4f260c51280b53290b552b0b572d0b592f0a5b310a5c320a5e340a5f3609613809623909633b0964"
    "3d09653e0966400a67420a68440a68450a69470b6a490b6a4a0c6b4c0c6b4d0d6c4f0d6c510e6c520e6d540f6d550f6d"
    "57106e59106e5a116e5c126e5d126e5f136e61136e62146e64156e65156e67166e69166e6a176e6c186e6d186e6f196e"
    "71196e721a6e741a6e751b6e771c6d781c6d7a1d6d7c1d6d7d1e6d7f1e6c801f6c82206c84206b85216b87216b88226a"
    "8a226a8c23698d23698f24699025689225689326679526679727669827669a28659b29649d29649f2a63a02a63a22b62"
    "a32c61a52c60a62d60a82e5fa92e5eab2f5ead305dae305cb0315bb1325ab3325ab43359b63458b73557b93556ba3655"
    "bc3754bd3853bf3952c03a51c13a50c33b4fc43c4ec63d4dc73e4cc83f4bca404acb4149cc4248ce4347cf4446d04545"
    "d24644d34743d44842d54a41d74b3fd84c3ed94d3dda4e3cdb503bdd513ade5238df5337e05536e15635e25734e35933"
    "e45a31e55c30e65d2fe75e2ee8602de9612bea632aeb6429eb6628ec6726ed6925ee6a24ef6c23ef6e21f06f20f1711f"
    "f1731df2741cf3761bf37819f47918f57b17f57d15f67e14f68013f78212f78410f8850ff8870ef8890cf98b0bf98c0a"
    "f98e09fa9008fa9207fa9407fb9606fb9706fb9906fb9b06fb9d07fc9f07fca108fca309fca50afca60cfca80dfcaa0f"
    "fcac11fcae12fcb014fcb216fcb418fbb61afbb81dfbba1ffbbc21fbbe23fac026fac228fac42afac62df9c72ff9c932"
    "f9cb35f8cd37f8cf3af7d13df7d340f6d543f6d746f5d949f5db4cf4dd4ff4df53f4e156f3e35af3e55df2e661f2e865"
    "f2ea69f1ec6df1ed71f1ef75f1f179f2f27df2f482f3f586f3f68af4f88ef5f992f6fa96f8fb9af9fc9dfafda1fcffa4"
)
COLORMAP: Tensor = torch.tensor(list(bytes.fromhex(_INFERNO)), dtype=torch.float32).view(256, 3) / 255

# Layout of `grid`, in pixels. Tiles keep the image's own size so the photo is shown pixel for pixel.
PAD = 4                    # gap between tiles and around the edge
FONT_SIZE = 12             # caption text
CAPTION_H = FONT_SIZE + 4  # one caption line above each tile
TITLE_SIZE = 16            # title text
TITLE_H = TITLE_SIZE + 6   # title band on top, only when a title is given
_BACKGROUND, _INK = (255, 255, 255), (0, 0, 0)


def colorize(maps: Tensor) -> Tensor:
    """`[..., H, W]` values in [0, 1] -> `[..., 3, H, W]` float32 RGB from `COLORMAP`, on `maps.device`.

    Entry `round(v * 255)`, rounding half to even (`torch.round`): 0.5 -> 127.5 -> entry 128.
    Values are clamped to [0, 1] and NaN counts as 0.

    >>> colorize(torch.tensor([[0.0, 1.0]])).shape
    torch.Size([3, 1, 2])
    """
    v = torch.nan_to_num(maps.detach().float(), nan=0.0).clamp(0.0, 1.0)
    index = torch.round(v * 255).long()
    return COLORMAP.to(maps.device)[index].movedim(-1, -3)


def blend(images: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """`(1 - alpha) * image + alpha * colorize(map)`, maps resized bilinearly to the images' size if needed.

    images `[N, 3, H, W]` in [0, 1] (display images, not normalised); maps `[N, h, w]` -> `[N, 3, H, W]`,
    or `[N, K, h, w]` -> `[N, K, 3, H, W]`.

    >>> blend(torch.zeros(2, 3, 8, 8), torch.rand(2, 5, 4, 4)).shape
    torch.Size([2, 5, 3, 8, 8])
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"blend: images must be [N, 3, H, W] RGB in [0, 1], got shape {tuple(images.shape)}; "
                         "add a batch axis with images[None] or convert to 3 channels")
    if maps.ndim not in (3, 4):
        raise InputError(f"blend: maps must be [N, H, W] or [N, K, H, W], got shape {tuple(maps.shape)}; "
                         "add the batch axis with maps[None]")
    if maps.shape[0] != images.shape[0]:
        raise InputError(f"blend: images {tuple(images.shape)} and maps {tuple(maps.shape)} differ in batch size "
                         f"N ({images.shape[0]} vs {maps.shape[0]}); pass one map (or K maps) per image")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"blend: alpha must be in [0, 1], got {alpha}")
    per_class = maps.ndim == 4
    m = maps.detach().to(images.device, torch.float32)
    m = upsample(m if per_class else m[:, None], tuple(images.shape[-2:]))
    out = (1 - alpha) * images.detach()[:, None] + alpha * colorize(m)
    return out if per_class else out[:, 0]


def to_pil(image: Tensor) -> Image.Image:
    """`[3, H, W]` float in [0, 1] (any device) -> RGB uint8 `PIL.Image`, values clamped and rounded.

    >>> to_pil(torch.ones(3, 2, 4)).size
    (4, 2)
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"to_pil: image must be [3, H, W] RGB in [0, 1], got shape {tuple(image.shape)}; "
                         "pick one image of a batch with images[i]")
    v = torch.nan_to_num(image.detach().float(), nan=0.0).clamp(0.0, 1.0)
    pixels = torch.round(v * 255).to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
    return Image.fromarray(pixels.numpy())  # uint8 [H, W, 3] is read as RGB


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    # A caption wider than its tile would run into the next one: cut it and mark the cut.
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…" if text else ""


def grid(image: Tensor, maps: dict[str, Tensor], captions: Sequence[str], *,
         alpha: float = 0.5, title: str | None = None, regions: Sequence[Tensor | Sequence[float] | None] | None = None
         ) -> Image.Image:
    """One picture of one image's explanations: a row per class, the photo then one overlay per method.

    image `[3, H, W]` in [0, 1]; maps: method -> `[K, h, w]` in [0, 1]; captions: K strings, one per row.
    Each tile is H x W with a caption line above it ("gradcam · Egyptian cat  p=0.71"); the photo is
    repeated in every row so that each row reads alone. Size: width `PAD + (1 + len(maps)) * (W + PAD)`,
    height `PAD + (TITLE_H if title else 0) + K * (CAPTION_H + H + PAD)`.

    `regions` (one per row, or None) marks what the row explains on each of its tiles: a bool mask `[H, W]`
    (a segmentation class's pixels) by its outline, a box `[x1, y1, x2, y2]` in pixels (a detection) by its edges,
    both in `REGION_COLOUR`.

    >>> grid(photo, {"gradcam": cams}, ["Egyptian cat  p=0.71"], title="cat.jpg").save("cat.png")  # doctest: +SKIP
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"grid: image must be one [3, H, W] RGB image, got shape {tuple(image.shape)}; "
                         "pick one image of a batch with images[i]")
    k = len(captions)
    for name, m in maps.items():
        if m.ndim != 3 or m.shape[0] != k:
            raise InputError(f"grid: maps[{name!r}] must be [K, H, W] with K = len(captions) = {k}, got shape "
                             f"{tuple(m.shape)}; pass one caption per map (maps[{name!r}][i] of a batch)")
    h, w = image.shape[-2:]
    top = PAD + (TITLE_H if title else 0)
    canvas = Image.new("RGB", (PAD + (1 + len(maps)) * (w + PAD), top + k * (CAPTION_H + h + PAD)), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD), _fit(draw, title, _font(TITLE_SIZE), canvas.width - 2 * PAD), fill=_INK,
                  font=_font(TITLE_SIZE))
    photo = to_pil(image)
    overlays = {name: blend(image[None], m[None], alpha)[0] for name, m in maps.items()}  # [K, 3, H, W]
    font = _font(FONT_SIZE)
    if regions is not None and len(regions) != k:
        raise InputError(f"grid: regions must hold one mask, box or None per caption ({k}), got {len(regions)}")
    for row, caption in enumerate(captions):
        y = top + row * (CAPTION_H + h + PAD)
        tiles = [(caption, photo)] + [(f"{name} · {caption}", to_pil(o[row])) for name, o in overlays.items()]
        for col, (text, tile) in enumerate(tiles):
            x = PAD + col * (w + PAD)
            draw.text((x, y), _fit(draw, text, font, w), fill=_INK, font=font)
            canvas.paste(_marked(tile, None if regions is None else regions[row]), (x, y + CAPTION_H))
    return canvas


REGION_COLOUR = (0, 255, 0)  # outlines and boxes: a colour the jet colormap of the overlays does not use


def _marked(tile: Image.Image, region: Tensor | Sequence[float] | None) -> Image.Image:
    """`tile` with `region` drawn on it: a bool mask's outline (its pixels with a neighbour outside it) or a box."""
    if region is None:
        return tile
    tile = tile.copy()
    if isinstance(region, Tensor) and region.ndim == 2:
        mask = region.bool()
        inner = torch.nn.functional.pad(mask, (1, 1, 1, 1), value=False)
        inner = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        pixels = torch.from_numpy(np.array(tile))
        pixels[mask & ~inner] = torch.tensor(REGION_COLOUR, dtype=pixels.dtype)
        return Image.fromarray(pixels.numpy())
    x1, y1, x2, y2 = (float(v) for v in region)
    ImageDraw.Draw(tile).rectangle((x1, y1, x2, y2), outline=REGION_COLOUR, width=2)
    return tile


# One colour per method in `curves`: matplotlib's "tab10" qualitative palette (Vega's category10), in order.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PLOT_W, PLOT_H = 200, 120  # a panel's plotting area
AXIS_W = 34                # room for the score labels left of a panel
AXIS_H = FONT_SIZE + 4     # room for the fraction labels under a panel
LEGEND_H = FONT_SIZE + 2   # one legend line per method under a panel


def curve_point(fraction: float, score: float, top: float, origin: tuple[int, int]) -> tuple[float, float]:
    """The pixel of (`fraction` of pixels removed or revealed, `score`) in a panel whose plotting area starts
    at `origin` (left, top) and whose score axis runs from 0 to `top`."""
    x0, y0 = origin
    return x0 + fraction * (PLOT_W - 1), y0 + (1 - score / top) * (PLOT_H - 1)


def curves(scores: dict[str, dict[str, Tensor]], captions: Sequence[str], *, title: str | None = None) -> Image.Image:
    """One image's deletion and insertion curves: a row per class, a panel per curve, a line per method.

    scores: curve name -> method -> `[K, steps + 1]`, the class's score after each step (a row of
    `fastattr.metrics.Evaluation.curves`); captions: K strings. Each panel's score axis runs from 0 to its
    highest score (labelled), its fraction axis from 0 to 1; the legend under it gives each method's colour
    (`PALETTE`, in the order of the methods) and its area under the curve.

    >>> curves({"deletion": {"gradcam": torch.tensor([[0.9, 0.2, 0.0]])}}, ["cat"]).size
    (242, 174)
    """
    k = len(captions)
    methods = list(dict.fromkeys(m for by_method in scores.values() for m in by_method))
    for name, by_method in scores.items():
        for method, s in by_method.items():
            if s.ndim != 2 or s.shape[0] != k or s.shape[1] < 2:
                raise InputError(f"curves: scores[{name!r}][{method!r}] must be [K, steps + 1] with K = "
                                 f"len(captions) = {k} and at least one step, got shape {tuple(s.shape)}")
    panel_w = AXIS_W + PLOT_W + PAD
    panel_h = CAPTION_H + PLOT_H + AXIS_H + len(methods) * LEGEND_H + PAD
    top = PAD + (TITLE_H if title else 0)
    canvas = Image.new("RGB", (PAD + len(scores) * panel_w, top + k * panel_h), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font(FONT_SIZE)
    if title:
        draw.text((PAD, PAD), _fit(draw, title, _font(TITLE_SIZE), canvas.width - 2 * PAD), fill=_INK,
                  font=_font(TITLE_SIZE))
    for row, caption in enumerate(captions):
        for col, (name, by_method) in enumerate(scores.items()):
            x, y = PAD + col * panel_w, top + row * panel_h
            origin = (x + AXIS_W, y + CAPTION_H)
            draw.text((x, y), _fit(draw, f"{name} · {caption}", font, panel_w - PAD), fill=_INK, font=font)
            rows = {method: s[row].detach().double().cpu() for method, s in by_method.items()}
            highest = max([float(s.max()) for s in rows.values()] + [1e-12])
            draw.rectangle((origin[0] - 1, origin[1] - 1, origin[0] + PLOT_W, origin[1] + PLOT_H), outline=_INK)
            draw.text((x, origin[1]), f"{highest:.2g}", fill=_INK, font=font)
            draw.text((x, origin[1] + PLOT_H - FONT_SIZE), "0", fill=_INK, font=font)
            draw.text((origin[0], origin[1] + PLOT_H + 2), "0", fill=_INK, font=font)
            draw.text((origin[0] + PLOT_W - FONT_SIZE, origin[1] + PLOT_H + 2), "1", fill=_INK, font=font)
            for i, method in enumerate(methods):
                if method not in rows:
                    continue
                colour, s = PALETTE[i % len(PALETTE)], rows[method]
                steps = s.shape[0] - 1
                draw.line([curve_point(j / steps, float(v), highest, origin) for j, v in enumerate(s)], fill=colour,
                          width=2)
                area = float(torch.trapezoid(s, dx=1.0 / steps))
                ly = origin[1] + PLOT_H + AXIS_H + i * LEGEND_H
                draw.line((origin[0], ly + LEGEND_H // 2, origin[0] + 14, ly + LEGEND_H // 2), fill=colour, width=3)
                draw.text((origin[0] + 18, ly), _fit(draw, f"{method}  area {area:.3f}", font, PLOT_W - 18),
                          fill=_INK, font=font)
    return canvas
