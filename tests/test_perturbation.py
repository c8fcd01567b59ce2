"""Ablation-CAM, Score-CAM and occlusion: forward-only methods over many perturbed copies, run in chunks.

A tiny hand-weighted net gives each map by hand; a hook-based reference written here (one perturbed copy at a
time, through the whole model) gives them on real architectures in float64; chunks of any size give the maps
of one pass; memory does not grow with the number of copies. The peers' versions are compared in
tests/test_peers.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattr
from fastattr.graph import scores_of_copies
from fastattr.methods import PERTURBED
import peak
from models import images, model

PERTURBATION_METHODS = ("ablationcam", "scorecam", "occlusion")


# --- a net small enough to work by hand --------------------------------------------------------------------

def tiny_net() -> nn.Module:
    """x (1 channel, 2x2) -> A = ReLU(conv1x1(x)) with A_0 = x and A_1 = ReLU(5 - x) -> mean per channel
    m = (m_0, m_1) -> logits (m_0 + 2 m_1, 2 m_0 - m_1)."""
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net[0].bias.copy_(torch.tensor([0.0, 5.0]))
        net[4].weight.copy_(torch.tensor([[1.0, 2.0], [2.0, -1.0]]))
    return net.double().eval()


X = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
RAW = dict(layer="1", normalize=False, upsample=False)
BOTH = torch.tensor([[0, 1]])  # explain both classes of the one image


def test_ablation_cam_weighs_each_channel_by_the_relative_score_drop_its_zeroing_causes():
    # A_0 = x, A_1 = 5 - x, m = (2.5, 2.5): logits (7.5, 2.5).
    # Class 0: zeroing A_0 gives 5.0 -> w_0 = (7.5 - 5) / 7.5 = 1/3; zeroing A_1 gives 2.5 -> w_1 = 2/3;
    #   map = 1/3 x + 2/3 (5 - x) = (10 - x) / 3.
    # Class 1: zeroing A_0 gives -2.5 -> w_0 = (2.5 + 2.5) / 2.5 = 2; zeroing A_1 gives 5 -> w_1 = -1;
    #   map = ReLU(2 x - (5 - x)) = ReLU(3 x - 5).
    out = fastattr.Explainer(tiny_net(), methods="ablationcam", **RAW)(X, classes=BOTH)
    x = X[0, 0]
    torch.testing.assert_close(out.maps["ablationcam"][0, 0], (10 - x) / 3)
    torch.testing.assert_close(out.maps["ablationcam"][0, 1], (3 * x - 5).relu())
    assert out.maps["ablationcam"][0, 1].tolist() == [[0.0, 1.0], [4.0, 7.0]]


def test_score_cam_weighs_each_channel_by_the_softmax_of_the_scores_of_the_image_it_masks():
    # The layer is 2x2 like the image, so each mask is its channel min-max normalised:
    #   M_0 = (x - 1) / 3, M_1 = (A_1 - 1) / 3 = (4 - x) / 3.
    # x * M_0 = [[0, 2/3], [2, 4]]: m = (5/3, 10/3) -> logits (25/3, 0).
    # x * M_1 = [[1, 4/3], [1, 0]]: m = (5/6, 25/6) -> logits (55/6, -5/2).
    # Class 0: w = softmax(25/3, 55/6); class 1: w = softmax(0, -5/2). Map = ReLU(w_0 x + w_1 (5 - x)).
    out = fastattr.Explainer(tiny_net(), methods="scorecam", **RAW)(X, classes=BOTH)
    x = X[0, 0]
    for j, scores in enumerate([(25 / 3, 55 / 6), (0.0, -5 / 2)]):
        w0, w1 = (math.exp(s) / sum(math.exp(t) for t in scores) for s in scores)
        # the masks divide by max - min + 1e-8, as the peers' do
        torch.testing.assert_close(out.maps["scorecam"][0, j], (w0 * x + w1 * (5 - x)).relu(), rtol=0, atol=1e-7)


def test_occlusion_of_single_pixels_gives_each_pixels_own_score_drop():
    # Setting pixel p to 0 lowers m_0 by x_p / 4 and raises m_1 by x_p / 4 (A_1 becomes 5 there):
    # class 0's logit drops by x_p / 4 - 2 x_p / 4 = -x_p / 4, class 1's by 2 x_p / 4 + x_p / 4 = 3 x_p / 4.
    out = fastattr.Explainer(tiny_net(), methods="occlusion", window=1, stride=1, normalize=False)(X, classes=BOTH)
    torch.testing.assert_close(out.maps["occlusion"][0], torch.stack([-X[0, 0] / 4, 3 * X[0, 0] / 4]))


def test_one_window_over_the_whole_image_gives_every_pixel_its_drop():
    # The whole image at 0: m = (0, 5), logits (10, -5); drops 7.5 - 10 = -2.5 and 2.5 + 5 = 7.5.
    out = fastattr.Explainer(tiny_net(), methods="occlusion", window=2, normalize=False)(X, classes=BOTH)
    assert out.maps["occlusion"][0].tolist() == [[[-2.5, -2.5], [-2.5, -2.5]], [[7.5, 7.5], [7.5, 7.5]]]


def test_occlusion_averages_over_the_windows_that_cover_a_pixel_and_cuts_windows_at_the_edge():
    # A 3-pixel side, window 2, stride 2: windows start at 0 and 2 (captum's ceil((3 - 2) / 2) + 1 = 2),
    # the second cut to one pixel. On a linear net y = sum(x), a window's drop is the sum of what it covers.
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 1, bias=False)).double().eval()
    nn.init.ones_(net[1].weight)
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    out = fastattr.Explainer(net, methods="occlusion", window=2, stride=2, normalize=False)(x, k=1)
    # windows: rows {0,1} or {2} x cols {0,1} or {2}; each pixel is covered by exactly one.
    expected = torch.tensor([[12.0, 12.0, 9.0], [12.0, 12.0, 9.0], [15.0, 15.0, 9.0]], dtype=torch.float64)
    torch.testing.assert_close(out.maps["occlusion"][0, 0], expected)


def test_overlapping_windows_average_their_drops():
    # Window 2, stride 1 on a 3-pixel side: rows {0,1} and {1,2}; the centre pixel is covered by all 4 windows.
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 1, bias=False)).double().eval()
    nn.init.ones_(net[1].weight)
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    out = fastattr.Explainer(net, methods="occlusion", window=2, stride=1, normalize=False)(x, k=1)
    window_sums = [[1 + 2 + 4 + 5, 2 + 3 + 5 + 6], [4 + 5 + 7 + 8, 5 + 6 + 8 + 9]]  # 12, 16, 24, 28
    assert out.maps["occlusion"][0, 0, 1, 1].item() == sum(map(sum, window_sums)) / 4
    assert out.maps["occlusion"][0, 0, 0, 0].item() == 12.0


# --- a hook-based reference on real architectures, float64 --------------------------------------------------

def layer_output(net, layer, x):
    seen = []
    handle = net.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            logits = net(x)
    finally:
        handle.remove()
    return logits, seen[0]


def reference_ablation_cam(net, layer, x, classes):
    """Channel by channel, the whole model with a hook zeroing that channel of the layer's output."""
    logits, acts = layer_output(net, layer, x)
    clean = logits.gather(1, classes)
    ablated = []
    for c in range(acts.shape[1]):
        def zero(module, inputs, output, c=c):
            output = output.clone()
            output[:, c] = 0
            return output
        handle = net.get_submodule(layer).register_forward_hook(zero)
        try:
            with torch.no_grad():
                ablated.append(net(x).gather(1, classes))
        finally:
            handle.remove()
    weights = (clean.unsqueeze(-1) - torch.stack(ablated, -1)) / clean.unsqueeze(-1)  # [N, K, C]
    return torch.einsum("nkc,nchw->nkhw", weights, acts).relu()


def reference_score_cam(net, layer, x, classes):
    _, acts = layer_output(net, layer, x)
    scores = []
    for c in range(acts.shape[1]):
        mask = F.interpolate(acts[:, c:c + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
        lo, hi = mask.amin((2, 3), keepdim=True), mask.amax((2, 3), keepdim=True)
        with torch.no_grad():
            scores.append(net(x * (mask - lo) / (hi - lo + 1e-8)).gather(1, classes))
    weights = torch.stack(scores, -1).softmax(-1)
    return torch.einsum("nkc,nchw->nkhw", weights, acts).relu()


def reference_occlusion(net, x, classes, window, stride, baseline=0.0):
    """Window by window, as captum's Occlusion places them: the drop added to the pixels it covers."""
    with torch.no_grad():
        clean = net(x).gather(1, classes)
    h, w = x.shape[-2:]
    total = torch.zeros(x.shape[0], classes.shape[1], h, w, dtype=x.dtype)
    count = torch.zeros(h, w, dtype=x.dtype)
    for top in range(0, math.ceil((h - window) / stride) * stride + 1, stride):
        for left in range(0, math.ceil((w - window) / stride) * stride + 1, stride):
            occluded = x.clone()
            occluded[..., top:top + window, left:left + window] = baseline
            with torch.no_grad():
                drop = clean - net(occluded).gather(1, classes)
            total[..., top:top + window, left:left + window] += drop[..., None, None]
            count[top:top + window, left:left + window] += 1
    return total / count


LAYERS = {"resnet18": "layer3", "mobilenet_v3_small": "features.9"}


@pytest.mark.slow  # a forward per channel, twice
@pytest.mark.parametrize("arch", LAYERS)
def test_ablation_cam_equals_zeroing_each_channel_by_a_hook_through_the_whole_model(arch):
    net, x = model(arch, torch.float64), images(2, torch.float64)
    out = fastattr.Explainer(net, layer=LAYERS[arch], methods="ablationcam", normalize=False, upsample=False)(x, k=2)
    want = reference_ablation_cam(net, LAYERS[arch], x, out.classes)
    assert want.std() > 0
    torch.testing.assert_close(out.maps["ablationcam"], want, rtol=1e-9, atol=1e-12)


def test_ablation_cam_repeats_the_skip_connections_the_head_reads_with_each_ablated_copy():
    # A dense layer's output is concatenated in the head with the features below it, which the split carries
    # across the layer: each ablated copy must carry its own image's.
    net, x = model("mini-densenet121", torch.float64), images(2, torch.float64)
    layer = "features.denseblock3.denselayer2"
    out = fastattr.Explainer(net, layer=layer, methods="ablationcam", normalize=False, upsample=False,
                             sample_batch=5)(x, k=2)
    want = reference_ablation_cam(net, layer, x, out.classes)
    assert want.std() > 0
    torch.testing.assert_close(out.maps["ablationcam"], want, rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # a forward per channel, twice
@pytest.mark.parametrize("arch", LAYERS)
def test_score_cam_equals_masking_the_image_by_each_channel_one_at_a_time(arch):
    net, x = model(arch, torch.float64), images(2, torch.float64)
    out = fastattr.Explainer(net, layer=LAYERS[arch], methods="scorecam", normalize=False, upsample=False)(x, k=2)
    want = reference_score_cam(net, LAYERS[arch], x, out.classes)
    assert want.std() > 0
    torch.testing.assert_close(out.maps["scorecam"], want, rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # a forward per window
@pytest.mark.parametrize("arch", LAYERS)
def test_occlusion_equals_occluding_one_window_at_a_time(arch):
    net, x = model(arch, torch.float64), images(2, torch.float64)
    out = fastattr.Explainer(net, methods="occlusion", window=24, stride=20, normalize=False)(x, k=2)
    want = reference_occlusion(net, x, out.classes, 24, 20)
    assert want.std() > 0
    torch.testing.assert_close(out.maps["occlusion"], want, rtol=1e-9, atol=1e-12)


def test_occlusion_takes_a_baseline_image():
    net, x = model("resnet18", torch.float64), images(1, torch.float64)
    baseline = torch.rand(3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out = fastattr.Explainer(net, methods="occlusion", window=32, stride=32, baseline=baseline, normalize=False)(x, k=1)
    occluded = x.clone()
    occluded[..., :32, :32] = baseline[:, :32, :32]
    with torch.no_grad():
        drop = net(x)[0, out.classes[0, 0]] - net(occluded)[0, out.classes[0, 0]]
    torch.testing.assert_close(out.maps["occlusion"][0, 0, 5, 7], drop)


# --- chunks and memory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample_batch", [1, 5, 16])
def test_chunked_perturbation_maps_equal_one_pass_over_all_copies(sample_batch):
    net, x = model("mini-mobilenet_v3_small", torch.float64), images(2, torch.float64)
    options = dict(layer="features.3", methods=PERTURBATION_METHODS, window=16, stride=12)  # 40 channels
    whole = fastattr.Explainer(net, sample_batch=None, **options)(x, k=2)
    chunked = fastattr.Explainer(net, sample_batch=sample_batch, **options)(x, k=2)
    for method in PERTURBATION_METHODS:
        torch.testing.assert_close(chunked.maps[method], whole.maps[method], rtol=0, atol=1e-12)
        assert whole.maps[method].std() > 0.01


def test_perturbation_methods_share_one_call_with_the_gradient_methods():
    net, x = model("mini-mobilenet_v3_small"), images(2)
    methods = ("gradcam", "ablationcam", "scorecam", "occlusion", "saliency")
    together = fastattr.Explainer(net, layer="features.3", methods=methods)(x, k=2)
    for method in methods:
        alone = fastattr.Explainer(net, layer="features.3", methods=(method,))(x, classes=together.classes)
        torch.testing.assert_close(together.maps[method], alone.maps[method], rtol=0, atol=1e-6)


def added_peak_mib(window: int, stride: int, sample_batch: int | None) -> float:
    return peak.added_peak_mib(f"""
        import torch, torchvision, fastattr
        torch.manual_seed(0)
        net = torchvision.models.resnet18().eval()
        x = torch.randn(1, 3, 96, 96)
        explainer = fastattr.Explainer(net, methods="occlusion", window={window}, stride={stride},
                                       sample_batch={sample_batch!r})
        fastattr.Explainer(net, methods="occlusion", window=96, sample_batch={sample_batch!r})(x)  # warm: one copy
        """, "explainer(x)")


@pytest.mark.slow
@peak.needs_vmhwm
def test_peak_memory_of_529_occluded_copies_stays_that_of_one_chunk():
    # 96x96: window 8, stride 4 places ceil(88 / 4) + 1 = 23 windows a side, 529 copies; window 32, stride 32
    # places ceil(64 / 32) + 1 = 3 a side, 9 copies.
    # The least of three fresh processes for the chunked pass: with the copies channels-last, one run in a few
    # peaks higher than the next (benchmarks/results/perturbation-memory.md), a transient of oneDNN's
    # convolutions, not memory growing with the copies, which every run would show.
    # The same verdict as the least of three, without the further processes when the first is within the bound.
    few, unchunked = added_peak_mib(32, 32, 16), added_peak_mib(8, 4, None)
    many = added_peak_mib(8, 4, 16)
    for _ in range(2):
        if many < 1.25 * few + 40:
            break
        many = min(many, added_peak_mib(8, 4, 16))
    assert unchunked > 3 * max(few, 50), (few, many, unchunked)
    assert many < 1.25 * few + 40, (few, many, unchunked)


# --- the copies' layout ------------------------------------------------------------------------------------

def recorded_scores(forward, x: torch.Tensor, images: bool) -> tuple[torch.Tensor, list[bool]]:
    """The scores of 3 copies of each image (x, 2x, 3x) for classes 0 and 1, two copies a chunk, and whether each
    chunk reached `forward` channels-last."""
    seen = []

    def recording(copies):
        seen.append(copies.is_contiguous(memory_format=torch.channels_last))
        return forward(copies)

    def copies(start, stop):
        return torch.stack([x * (j + 1) for j in range(start, stop)], 1)

    classes = torch.tensor([[0, 1]]).expand(x.shape[0], -1)
    return scores_of_copies(recording, copies, 3, classes, 2, images=images), seen


def test_whole_model_copies_reach_the_model_channels_last_on_cpu_with_the_same_scores():
    net, x = model("mini-resnet18", torch.float64), images(2, torch.float64)
    strides = [p.stride() for p in net.parameters()]
    given, seen = recorded_scores(net, x, images=True)
    contiguous, _ = recorded_scores(net, x, images=False)
    assert seen == [True, True]
    torch.testing.assert_close(given, contiguous, rtol=0, atol=1e-12)
    assert [p.stride() for p in net.parameters()] == strides  # the model's own layout is left alone


def test_a_model_that_views_its_activation_gets_contiguous_copies():
    class Viewing(nn.Module):  # a .view of a convolution's output, which a channels-last output cannot give
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            a = self.conv(x)
            return self.fc(a.view(a.shape[0], -1))

    torch.manual_seed(0)
    net, x = Viewing().double().eval(), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        net(x.contiguous(memory_format=torch.channels_last))
    given, seen = recorded_scores(net, x, images=True)
    contiguous, _ = recorded_scores(net, x, images=False)
    assert seen == [True, False, False]  # tried once, then contiguous for the rest of the call
    assert torch.equal(given, contiguous)


def test_an_error_of_the_model_that_is_not_about_the_layout_is_raised_after_one_forward():
    calls = []

    def broken(copies):
        calls.append(copies.shape[0])
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        recorded_scores(broken, torch.rand(2, 3, 8, 8), images=True)
    assert calls == [4]  # the first chunk, once


# --- options and refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("option,bad", [("window", 0), ("window", 2.5), ("stride", 0), ("stride", -3)])
def test_a_window_or_stride_that_is_not_a_positive_int_is_refused(option, bad):
    with pytest.raises(fastattr.MethodError, match=rf"{option}: expected an int >= 1, got {bad}"):
        fastattr.Explainer(tiny_net(), methods="occlusion", **{option: bad})


def test_a_window_larger_than_the_image_is_refused_before_any_forward():
    with pytest.raises(fastattr.InputError, match=r"window: 3 pixels is larger than the images \(2x2\); pass a "
                                                  r"window of at most 2, or larger images"):
        fastattr.Explainer(tiny_net(), methods="occlusion", window=3)(X)


def test_a_stride_larger_than_the_window_is_refused_when_the_explainer_is_made_since_it_leaves_pixels_uncovered():
    with pytest.raises(fastattr.MethodError, match=r"stride: 3 pixels is larger than the window \(2\), which leaves "
                                                   r"pixels no window covers; pass a stride of at most 2"):
        fastattr.Explainer(tiny_net(), methods="occlusion", window=2, stride=3)


def test_the_stride_defaults_to_half_the_window():
    assert fastattr.Explainer(tiny_net(), methods="occlusion", window=9).stride == 4


@pytest.mark.parametrize("method", PERTURBATION_METHODS)
def test_compile_with_gradient_methods_in_the_same_explainer_is_refused_with_the_way_out(method):
    with pytest.raises(fastattr.CompileError, match=rf"compile: {method} compile the forward of each chunk of "
                                                    r"perturbed copies .* while gradcam compile into one graph; make "
                                                    r"one explainer of each kind"):
        fastattr.Explainer(tiny_net(), layer="1", methods=(method, "gradcam"), compile=True)


def compiled_and_eager(methods, compile, sample_batch, n=2):
    # 5 images' worth of copies a chunk, so every pass ends on a smaller chunk: a second (batch-symbolic) graph.
    net, x = model("mini-resnet18"), images(n)
    options = dict(layer="layer4", methods=methods, window=16, stride=8, sample_batch=sample_batch)
    return fastattr.Explainer(net, compile=compile, **options)(x, k=2), fastattr.Explainer(net, **options)(x, k=2)


@pytest.mark.slow  # compiles
@pytest.mark.parametrize("method", PERTURBATION_METHODS)
def test_a_compiled_perturbation_method_captures_its_chunks_forward_whole_and_equals_eager(method):
    # The "eager" backend runs the captured graph as it is: fullgraph=True still refuses any graph break.
    got, want = compiled_and_eager((method,), {"backend": "eager"}, sample_batch=10)
    assert torch.equal(got.classes, want.classes)
    torch.testing.assert_close(got.maps[method], want.maps[method], rtol=0, atol=1e-5)


@pytest.mark.slow  # inductor compiles two forwards of the model and two of its head
def test_perturbation_methods_compiled_by_inductor_equal_eager():
    got, want = compiled_and_eager(PERTURBATION_METHODS, True, sample_batch=10)
    assert torch.equal(got.classes, want.classes)
    for method in PERTURBATION_METHODS:
        torch.testing.assert_close(got.maps[method], want.maps[method], rtol=0, atol=1e-4)


def test_a_compiled_perturbation_explainer_leaves_the_model_as_it_was():
    net = model("mini-resnet18")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fastattr.Explainer(net, layer="layer4", methods=("scorecam",), compile={"backend": "eager"})(images(1), k=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net._forward_hooks and not net._forward_pre_hooks and not net.training


@pytest.mark.parametrize("method", ["scorecam", "occlusion"])
def test_score_cam_and_occlusion_are_refused_by_export_naming_the_forwards_it_would_hold(method, tmp_path):
    with pytest.raises(fastattr.ExportError, match=rf"methods: {method} forward a copy of each image per channel or "
                                                   r"window through the whole model.*explain them with fastattr.Explainer"):
        fastattr.export_onnx(tiny_net().float(), tmp_path / "t.onnx", layer="1", methods=(method,), k=1,
                             input_shape=(1, 2, 2))


def test_ablation_cam_exports_to_onnx_with_the_maps_derived_by_hand(tmp_path):
    # The first test's maps: class 0 (10 - x) / 3, class 1 ReLU(3 x - 5), now from onnxruntime.
    path = fastattr.export_onnx(tiny_net().float(), tmp_path / "t.onnx", methods=("ablationcam",), k=2,
                                input_shape=(1, 2, 2), with_classes=True, **RAW)
    out = fastattr.OnnxExplainer(path)(X.float(), classes=BOTH)
    x = X[0, 0].float()
    torch.testing.assert_close(out.maps["ablationcam"][0, 0], (10 - x) / 3)
    torch.testing.assert_close(out.maps["ablationcam"][0, 1], (3 * x - 5).relu())


def test_a_loaded_ablation_cam_program_takes_an_image_a_call_and_gives_the_explainers_maps(tmp_path):
    # The copies and the head's work on them take two forwards' worth (the test below counts them, here in
    # float32: 160 bytes against 112), so with sample_batch=3 the program is called on one image at a time; the
    # maps are those of the Explainer.
    net, x = tiny_net().float(), X.float().repeat(3, 1, 1, 1) * torch.tensor([1.0, -2.0, 3.0]).view(3, 1, 1, 1)
    path = fastattr.export_program(net, tmp_path / "t.pt2", methods=("ablationcam",), k=2, input_shape=(1, 2, 2), **RAW)
    program = fastattr.load_program(path, trusted=True, sample_batch=3)
    assert program.meta["ablation_forwards"] == 2
    calls = []
    run = program._run
    program._run = lambda *args: calls.append(args[0].shape[0]) or run(*args)
    got = program(x)
    want = fastattr.Explainer(net, methods="ablationcam", **RAW)(x, k=2)
    assert calls == [1, 1, 1]
    torch.testing.assert_close(got.maps["ablationcam"], want.maps["ablationcam"])


@pytest.mark.parametrize("bad", [0, 2.5, "2", True])
def test_a_file_whose_ablation_forwards_is_not_a_positive_integer_is_refused_naming_it(bad, tmp_path):
    import json

    import onnx

    path = fastattr.export_onnx(tiny_net().float(), tmp_path / "t.onnx", methods=("ablationcam",), k=2,
                                input_shape=(1, 2, 2), **RAW)
    crafted = onnx.load(str(path))
    entry = next(p for p in crafted.metadata_props if p.key == "fastattr")
    entry.value = json.dumps({**json.loads(entry.value), "ablation_forwards": bad})
    onnx.save(crafted, str(path))
    with pytest.raises(fastattr.InputError, match=rf"gives ablation_forwards {bad!r}, not a positive integer; export "
                                                  r"the file again"):
        fastattr.OnnxExplainer(path)


def test_ablation_cam_whose_copies_would_not_fit_is_refused_by_export_naming_their_size(tmp_path):
    # 1024 channels of 32x32 float32: 1024 copies of 4 MiB, 4096 MiB an image before the head runs.
    wide = nn.Sequential(nn.Conv2d(3, 1024, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 3)).eval()
    with pytest.raises(fastattr.ExportError, match=r"ablationcam's export runs the head above '1' on the 1024 ablated "
                                                   r"copies of each image at once: 4096 MiB of copies, and the head "
                                                   r"writes \d+ MiB on them, an image \(at most 2048 MiB in all\); "
                                                   r"export at a layer nearer the output"):
        fastattr.export_onnx(wide, tmp_path / "w.onnx", layer="1", methods=("gradcam", "ablationcam"), k=1,
                             input_shape=(3, 32, 32))
    assert not (tmp_path / "w.onnx").exists()


def test_the_ablation_cost_counts_the_copies_and_what_the_head_writes_on_each():
    # tiny_net at its layer: A is [1, 2, 2, 2] float64 (64 bytes), so two copies take 128 bytes. The head
    # (pooling, flatten, linear) writes per copy: the clone of A (64), the pooled [2, 1, 1] (16) and the
    # logits [2] (16); flatten is a view: 2 copies * 96 bytes. A forward writes the convolution's and the
    # ReLU's outputs (64 each) and the head's 96: 224. (128 + 192) / 224 rounds up to two forwards' worth.
    cost = fastattr.Explainer(tiny_net(), methods="ablationcam", **RAW).ablation_cost(X)
    assert cost == (2, 128, 192, 224, 2)


class InPlaceHead(nn.Module):
    """conv (the layer) -> in-place ReLU -> 2x2 max pool with its indices -> view -> linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 1), nn.Linear(2, 2)

    def forward(self, x):
        values, _ = F.max_pool2d(torch.relu_(self.conv(x)), 2, return_indices=True)
        return self.fc(values.view(-1, 2))


def test_the_ablation_cost_leaves_out_in_place_results_and_views_and_counts_every_output_of_an_op():
    # Per copy, float64: the clone of A (64), nothing for the in-place ReLU, the pooled values and their int64
    # indices (16 + 16), nothing for the view, the linear layer's output (16): 112, times 2 channels. A forward
    # adds the convolution's output (64): 176. (128 + 224) / 176 is two forwards' worth.
    cost = fastattr.Explainer(InPlaceHead().double().eval(), "conv", "ablationcam").ablation_cost(X)
    assert cost == (2, 128, 224, 176, 2)


def test_the_ablation_cost_counts_the_skip_connection_each_copy_repeats():
    # Cut at layer4.0.conv2 of the reduced resnet18 (64x64 images: layer4 is 2x2), the head reads the block's
    # downsampled input [1, 512, 2, 2], made below the layer, and repeats it with each of the 512 ablated copies
    # of the activation [1, 512, 2, 2]: 512 * (2048 + 2048) float32 values.
    cost = fastattr.Explainer(model("mini-resnet18"), "layer4.0.conv2", "ablationcam").ablation_cost(images(1))
    assert (cost.channels, cost.copy_bytes) == (512, 512 * (2048 + 2048) * 4)


def test_the_ablation_cost_is_refused_for_an_explainer_without_ablation_cam():
    with pytest.raises(fastattr.MethodError, match=r"ablation_cost: this explainer's methods \('gradcam',\) do not "
                                                   r"include ablationcam"):
        fastattr.Explainer(tiny_net(), methods="gradcam", **RAW).ablation_cost(X)


def test_ablation_cam_on_a_model_torch_fx_cannot_trace_is_refused_naming_the_way_out():
    from test_no_side_effects import Branchy

    with pytest.warns(UserWarning, match="eager hook path"):
        with pytest.raises(fastattr.MethodError, match=r"ablationcam runs the model's head .* use scorecam"):
            fastattr.Explainer(Branchy().eval(), layer="features", methods="ablationcam")


def test_score_cam_and_occlusion_run_on_the_eager_hook_path():
    from test_no_side_effects import Branchy

    torch.manual_seed(0)
    net, x = Branchy().double().eval(), images(1, torch.float64)
    with pytest.warns(UserWarning, match="eager hook path"):
        explainer = fastattr.Explainer(net, layer="features", methods=("scorecam", "occlusion"), window=32,
                                       normalize=False, upsample=False)
    out = explainer(x, k=1)
    torch.testing.assert_close(out.maps["scorecam"], reference_score_cam(net, "features", x, out.classes))
    torch.testing.assert_close(out.maps["occlusion"], reference_occlusion(net, x, out.classes, 32, 16))


def test_the_registry_marks_exactly_the_perturbation_methods():
    marked = [m for m, method in fastattr.METHODS.items() if set(method.reads) & PERTURBED]
    assert marked == list(PERTURBATION_METHODS)


@pytest.mark.parametrize("backend", ["onnx", "pt2"])
def test_a_spec_with_score_cam_or_occlusion_on_an_export_backend_is_refused_before_loading(backend):
    from fastattr import Spec, pipeline

    with pytest.raises(fastattr.InputError, match=rf"--methods: scorecam, occlusion run eagerly or compiled \(no "
                                                  rf"export holds their copies' forwards\), and the backend is "
                                                  rf"{backend}; use --backend eager or compiled"):
        pipeline.check(Spec("resnet18", methods="gradcam, scorecam, occlusion", backend=backend), "--")
    pipeline.check(Spec("resnet18", methods="gradcam, ablationcam", backend=backend), "--")  # exportable: accepted


def test_a_spec_mixing_perturbation_and_gradient_methods_on_the_compiled_backend_is_refused_before_loading():
    from fastattr import Spec, pipeline

    with pytest.raises(fastattr.InputError, match=r"--methods: scorecam compile the forward of each chunk of perturbed "
                                                  r"copies, the others one graph"):
        pipeline.check(Spec("resnet18", methods="gradcam, scorecam", backend="compiled"), "--")
    pipeline.check(Spec("resnet18", methods="scorecam, occlusion", backend="compiled"), "--")  # alone: accepted


def test_a_spec_passes_window_and_stride_to_the_eager_explainer():
    from fastattr import Spec, build

    pipeline = build(Spec("resnet18", methods="occlusion", input_size=64, window=8, stride=4))
    assert (pipeline._explain.window, pipeline._explain.stride) == (8, 4)


def test_window_and_stride_with_an_export_file_are_refused_since_no_export_holds_occlusion(tmp_path):
    from fastattr import Spec, build

    path = fastattr.export_onnx(tiny_net().float(), tmp_path / "t.onnx", layer="1", methods="gradcam", k=1,
                                input_shape=(1, 2, 2))
    with pytest.raises(fastattr.InputError, match=r"window 8: sets occlusion, which no export holds"):
        build(Spec(str(path), window=8))
