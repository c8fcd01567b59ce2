"""fastattr.overlay: colormap, colorize, blend, to_pil, the grid picture and the curves chart."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastattr
from fastattr import overlay as ov
from fastattr.overlay import CAPTION_H, COLORMAP, PAD, TITLE_H, blend, colorize, grid, to_pil


def _pixels(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img))  # [H, W, 3] uint8


# --- COLORMAP ---------------------------------------------------------------------------------

def test_colormap_is_256_float32_rgb_entries_in_unit_range():
    assert COLORMAP.shape == (256, 3) and COLORMAP.dtype == torch.float32
    assert COLORMAP.min() >= 0 and COLORMAP.max() <= 1


def test_colormap_is_matplotlibs_inferno_rounded_to_8_bits():
    cm = pytest.importorskip("matplotlib").colormaps["inferno"]
    reference = torch.tensor(cm(range(256)), dtype=torch.float64)[:, :3]
    assert (COLORMAP.double() - reference).abs().max() <= 0.5 / 255 + 1e-9
    assert COLORMAP[0].mul(255).round().tolist() == [0, 0, 4] and COLORMAP[255].mul(255).round().tolist() == [252, 255, 164]


def test_colormap_relative_luminance_strictly_increases():
    # Relative luminance 0.2126R + 0.7152G + 0.0722B on linearised sRGB. (On the gamma-encoded
    # 8-bit values it dips at entries 35, 39, 43: the rounding, not the colormap.)
    c = COLORMAP.double()
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    luminance = linear @ torch.tensor([0.2126, 0.7152, 0.0722], dtype=torch.float64)
    assert (luminance.diff() > 0).all()


# --- colorize ---------------------------------------------------------------------------------

def test_colorize_maps_0_to_the_first_entry_and_1_to_the_last():
    out = colorize(torch.tensor([[0.0, 1.0]]))
    assert torch.equal(out[:, 0, 0], COLORMAP[0]) and torch.equal(out[:, 0, 1], COLORMAP[255])


def test_colorize_rounds_v_times_255_so_one_half_is_entry_128():
    assert torch.equal(colorize(torch.tensor([[0.5]]))[:, 0, 0], COLORMAP[128])


def test_colorize_rounds_to_the_nearest_entry():
    below, above = (127.5 - 0.01) / 255, (127.5 + 0.01) / 255
    out = colorize(torch.tensor([[below, above]]))
    assert torch.equal(out[:, 0, 0], COLORMAP[127]) and torch.equal(out[:, 0, 1], COLORMAP[128])


def test_colorize_maps_each_8_bit_level_to_its_own_entry():
    levels = torch.arange(256, dtype=torch.float32) / 255
    assert torch.equal(colorize(levels[None]), COLORMAP.T[:, None, :])


def test_colorize_clamps_out_of_range_values():
    out = colorize(torch.tensor([[-1.0, 2.0]]))
    assert torch.equal(out[:, 0, 0], COLORMAP[0]) and torch.equal(out[:, 0, 1], COLORMAP[255])


def test_colorize_treats_nan_as_0():
    assert torch.equal(colorize(torch.tensor([[float("nan")]]))[:, 0, 0], COLORMAP[0])


def test_colorize_puts_the_channel_axis_before_h_w():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]]).expand(2, 4, 2, 2)
    out = colorize(maps)
    assert out.shape == (2, 4, 3, 2, 2) and out.dtype == torch.float32
    assert torch.equal(out[1, 3, :, 1, 0], COLORMAP[128]) and torch.equal(out[0, 0, :, 0, 1], COLORMAP[255])


def test_colorize_stays_on_the_maps_device():
    assert colorize(torch.zeros(2, 5, 5, device="meta")).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_colorize_on_cuda_matches_cpu():
    maps = torch.rand(2, 3, 7, 7)
    out = colorize(maps.cuda())
    assert out.is_cuda and torch.equal(out.cpu(), colorize(maps))


# --- blend ------------------------------------------------------------------------------------

def test_blend_with_alpha_0_returns_the_image():
    images, maps = torch.rand(2, 3, 6, 6), torch.rand(2, 6, 6)
    assert torch.equal(blend(images, maps, alpha=0.0), images)


def test_blend_with_alpha_1_returns_the_colorized_map():
    images, maps = torch.rand(2, 3, 6, 6), torch.rand(2, 6, 6)
    assert torch.equal(blend(images, maps, alpha=1.0), colorize(maps))


def test_blend_mixes_image_and_colour_linearly():
    images, maps = torch.full((1, 3, 2, 2), 0.2), torch.zeros(1, 2, 2)
    expected = 0.75 * 0.2 + 0.25 * COLORMAP[0]
    assert torch.allclose(blend(images, maps, alpha=0.25)[0, :, 1, 1], expected)


def test_blend_with_k_maps_per_image_gives_k_overlays_per_image():
    images, maps = torch.rand(2, 3, 5, 5), torch.rand(2, 4, 5, 5)
    out = blend(images, maps)
    assert out.shape == (2, 4, 3, 5, 5)
    assert torch.equal(out[1, 2], blend(images[1:], maps[1:, 2])[0])


def test_blend_resizes_a_smaller_map_bilinearly_to_the_image_size():
    images, maps = torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4)
    resized = F.interpolate(maps[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(blend(images, maps, alpha=1.0), colorize(resized))


def test_blend_with_mismatched_batch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(3, 4, 4\)"):
        blend(torch.rand(2, 3, 4, 4), torch.rand(3, 4, 4))


def test_blend_rejects_images_that_are_not_n_3_h_w():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\].*\(3, 4, 4\)"):
        blend(torch.rand(3, 4, 4), torch.rand(1, 4, 4))


def test_blend_rejects_maps_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"\[N, H, W\] or \[N, K, H, W\].*\(4, 4\)"):
        blend(torch.rand(1, 3, 4, 4), torch.rand(4, 4))


def test_blend_rejects_alpha_outside_0_1():
    with pytest.raises(ValueError, match="alpha"):
        blend(torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4), alpha=1.5)


# --- to_pil -----------------------------------------------------------------------------------

def test_to_pil_round_trips_a_uint8_image_exactly():
    u8 = torch.arange(3 * 5 * 7, dtype=torch.int64).mul(37).remainder(256).to(torch.uint8).view(3, 5, 7)
    img = to_pil(u8.float() / 255)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert torch.equal(_pixels(img), u8.permute(1, 2, 0))


def test_to_pil_clamps_out_of_range_values():
    img = to_pil(torch.tensor([-0.5, 0.5, 1.5]).view(3, 1, 1))
    assert img.getpixel((0, 0)) == (0, 128, 255)


def test_to_pil_rejects_a_batch():
    with pytest.raises(ValueError, match=r"\[3, H, W\].*\(1, 3, 4, 4\)"):
        to_pil(torch.rand(1, 3, 4, 4))


# --- grid -------------------------------------------------------------------------------------

H, W, K = 10, 12, 2
CAPTIONS = ["Egyptian cat  p=0.71", "tabby  p=0.12"]


def _grid_inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, H, W, generator=g)
    maps = {"gradcam": torch.rand(K, 5, 6, generator=g), "saliency": torch.rand(K, H, W, generator=g)}
    return image, maps


def _tile(picture, row: int, col: int, title: bool = False):
    # Tile origin from the documented layout: columns of W + PAD, rows of CAPTION_H + H + PAD.
    x = PAD + col * (W + PAD)
    y = PAD + (TITLE_H if title else 0) + row * (CAPTION_H + H + PAD) + CAPTION_H
    return picture.crop((x, y, x + W, y + H))


def test_grid_size_follows_the_layout():
    picture = grid(*_grid_inputs(), CAPTIONS)
    # width 4 + 3 * (12 + 4) = 52; height 4 + 2 * (16 + 10 + 4) = 64
    assert picture.mode == "RGB" and picture.size == (52, 64)


def test_grid_with_a_title_adds_the_title_band():
    picture = grid(*_grid_inputs(), CAPTIONS, title="cat.jpg")
    assert picture.size == (52, 64 + TITLE_H) and TITLE_H == 22


def test_grid_shows_the_photo_first_in_every_row():
    image, maps = _grid_inputs()
    picture = grid(image, maps, CAPTIONS, title="cat.jpg")
    for row in range(K):
        assert torch.equal(_pixels(_tile(picture, row, 0, title=True)), _pixels(to_pil(image)))


def test_grid_shows_one_overlay_per_method_in_the_maps_order():
    image, maps = _grid_inputs()
    picture = grid(image, maps, CAPTIONS, alpha=0.4)
    for col, m in enumerate(maps.values(), start=1):
        for row in range(K):
            expected = to_pil(blend(image[None], m[None], alpha=0.4)[0, row])
            assert torch.equal(_pixels(_tile(picture, row, col)), _pixels(expected))


def test_grid_draws_a_caption_above_each_tile():
    image, maps = _grid_inputs()
    image, maps = F.interpolate(image[None], size=(H, 200))[0], {"gradcam": torch.rand(K, H, 200)}
    picture = grid(image, maps, CAPTIONS)
    band = picture.crop((PAD, PAD, PAD + 200, PAD + CAPTION_H)).convert("L")
    assert _pixels(band).min() < 128  # dark ink on the white background


def test_grid_with_no_methods_shows_only_the_photos():
    image, _ = _grid_inputs()
    assert grid(image, {}, CAPTIONS).size == (PAD + W + PAD, 64)


def test_grid_rejects_maps_whose_k_differs_from_the_captions():
    image, maps = _grid_inputs()
    with pytest.raises(ValueError, match=r"saliency.*K = len\(captions\) = 3.*\(2, 10, 12\)"):
        grid(image, {"saliency": maps["saliency"]}, CAPTIONS + ["tiger cat"])


# --- curves -------------------------------------------------------------------------------------------------

def pixels_near(picture, x: float, y: float, radius: int = 1) -> set:
    return {picture.getpixel((round(x) + dx, round(y) + dy)) for dx in range(-radius, radius + 1)
            for dy in range(-radius, radius + 1)}


def test_curves_draw_each_methods_scores_in_its_palette_colour_where_the_axes_put_them():
    # gradcam falls from 1 to 0 over two steps, saliency stays at 0.5: the panel's score axis tops at 1.
    scores = {"deletion": {"gradcam": torch.tensor([[1.0, 0.5, 0.0]]), "saliency": torch.tensor([[0.5, 0.5, 0.5]])}}
    chart = ov.curves(scores, ["cat"])
    origin = (ov.PAD + ov.AXIS_W, ov.PAD + ov.CAPTION_H)
    assert ov.PALETTE[0] in pixels_near(chart, *ov.curve_point(0.25, 0.75, 1.0, origin))  # gradcam at a quarter
    assert ov.PALETTE[1] in pixels_near(chart, *ov.curve_point(0.9, 0.5, 1.0, origin))   # saliency, flat
    assert ov.PALETTE[1] not in pixels_near(chart, *ov.curve_point(0.9, 0.9, 1.0, origin), radius=3)


def test_curves_lay_out_a_row_per_class_and_a_panel_per_curve():
    scores = {"deletion": {"gradcam": torch.rand(3, 5)}, "insertion": {"gradcam": torch.rand(3, 5)}}
    chart = ov.curves(scores, ["a", "b", "c"], title="x.jpg")
    row = ov.CAPTION_H + ov.PLOT_H + ov.AXIS_H + ov.LEGEND_H + ov.PAD
    assert chart.size == (ov.PAD + 2 * (ov.AXIS_W + ov.PLOT_W + ov.PAD), ov.PAD + ov.TITLE_H + 3 * row)


def test_curves_refuse_scores_that_are_not_one_row_per_caption():
    with pytest.raises(fastattr.InputError, match=r"curves: scores\['deletion'\]\['gradcam'\] must be \[K, steps \+ 1\] "
                                                  r"with K = len\(captions\) = 2"):
        ov.curves({"deletion": {"gradcam": torch.rand(3, 5)}}, ["a", "b"])
