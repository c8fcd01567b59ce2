"""fastattr's maps equal captum's and pytorch-grad-cam's on the same model, images and classes.

Two models with random weights, float32, 2 images of 64x64, the top-2 classes of each image: resnet18 at
"layer4" and mobilenet_v3_small at "features" (both 2x2 maps), and resnet18 at "layer3" (4x4) for the resize.
fastattr explains both classes in one call; the peers explain one target per call, so each runs once per class
with one target per image.

captum 0.9 (raw maps: normalize=False, upsample=False, compared with captum's attribution `.abs().sum(1)`),
measured max |diff| / max |map| over both models:
- saliency, inputxgrad, ig (steps=8 vs n_steps=8, method="gausslegendre", baseline 0), guided, and raw
  gradcam vs LayerGradCam(relu_attributions=True) at the layer's resolution: 0 (bit-identical).
- guided-gradcam vs GuidedGradCam(interpolate_mode="bilinear"): 9.4e-8.
- smoothgrad vs NoiseTunnel(Saliency) with captum's own noise passed to fastattr: 1.2e-6. captum's
  stdevs=0.2 is absolute, fastattr's noise level relative to each image's max - min, so the draw is divided
  by 0.2 * (max - min) per image to give fastattr's unit noise.
Tolerance: 1e-5 of the map's max. ig's completeness equals captum's convergence delta: measured max |diff|
9.5e-7 on deltas up to 0.40; tolerance 1e-5.

pytorch-grad-cam 1.5.7 normalises each map at the layer's resolution ((m - min) / (max - min + 1e-7)),
resizes it with cv2 (bilinear, half-pixel centres as align_corners=False) and min-max normalises the resized
map again (`aggregate_multi_layers` -> `scale_cam_image`). fastattr (normalize=True, upsample=True) stops
after the resize: its map is the normalised layer map resized, so where an extreme lies at an inner cell of
the layer map it falls between output pixels and the map stays a little inside [0, 1] (resnet18 "layer3":
maxima 0.970 to 0.997, |diff| to pytorch-grad-cam up to 0.034). The comparisons re-min-max fastattr's map.
(On a 2x2 map every cell is a corner, which the resize copies to the output, so there it changes nothing.)
Measured max |diff| of these [0, 1] maps: gradcam, xgradcam, hirescam, layercam, gradcam-elementwise
<= 2.7e-6, gradcam at resnet18's "layer3" 3.9e-7, eigencam 4.2e-7, gradcam++ (logits x1e4, below) 7.6e-6.
Tolerance: 2e-5, and 5e-5 for gradcam++.

Definition differences:
- gradcam++: pytorch-grad-cam adds eps = 1e-6 to alpha's denominator 2 g^2 + sum(A) g^3. With these random
  weights the layer gradients are small (median |g| 5.5e-3 on resnet18, 2.7e-4 on mobilenet_v3_small, where
  99% of g^2 are below 1e-6), so the eps dominates alpha and the maps differ by up to 0.021 (resnet18) and
  0.24 (mobilenet_v3_small). fastattr follows the paper (no eps; alpha = 0 where the denominator is 0).
  Scaling the logits by 1e4 (so the gradients by 1e4 and g^2 by 1e8) makes the eps negligible, and the maps
  then agree (2.5e-6 and 7.6e-6).
- eigencam: pytorch-grad-cam leaves the principal component's sign to LAPACK's SVD; fastattr orients it so
  the projection correlates positively with the channel-summed activation. Each of fastattr's maps equals
  either pytorch-grad-cam's map or the map its pipeline gives with the projection negated (measured:
  resnet18's two images and mobilenet_v3_small's first take pytorch-grad-cam's sign, mobilenet_v3_small's
  second the opposite one).
"""

import functools

import numpy as np
import pytest
import torch

import fastattr
from models import images, model

captum_attr = pytest.importorskip("captum.attr")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402

# captum sets (and afterwards resets) requires_grad on the images, and hooks ReLUs for guided backprop.
pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients",
                                        "ignore:Setting backward hooks on ReLU activations")

MODELS = {"resnet18": "layer4", "mobilenet_v3_small": "features"}
K = 2
INPUT_METHODS = ("saliency", "inputxgrad", "ig", "smoothgrad", "guided", "guided-gradcam")
CAMS = {
    "gradcam": "GradCAM",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "gradcam-elementwise": "GradCAMElementWise",
}
SAMPLES, NOISE, STEPS, SEED = 4, 0.2, 8, 7

RAW_TOL = 1e-5        # of the map's max, raw maps vs captum
COMPLETENESS_TOL = 1e-5
NORMALISED_TOL = 2e-5  # [0, 1] maps vs pytorch-grad-cam
GRADCAM_PLUS_PLUS_TOL = 5e-5
LOGIT_SCALE = 1e4      # makes pytorch-grad-cam's Grad-CAM++ eps negligible


def captum_noise(x):
    """NoiseTunnel's draw for `x` after `torch.manual_seed(SEED)`: `[N * S, C, H, W]`, samples interleaved per
    image (noise_tunnel.py: `torch.normal(0, stdev repeated)` added to `input.repeat_interleave(S, 0)`)."""
    torch.manual_seed(SEED)
    return torch.normal(0, torch.tensor(NOISE).repeat((len(x) * SAMPLES, *x.shape[1:])))


def unit_noise(x, drawn):
    """captum's absolute draw as fastattr's unit noise `[N, S, C, H, W]`: fastattr scales it by
    noise * (max - min) per image."""
    spread = NOISE * (x.amax((1, 2, 3)) - x.amin((1, 2, 3)))
    return drawn.view(len(x), SAMPLES, *x.shape[1:]) / spread.view(-1, 1, 1, 1, 1)


@functools.cache
def explained(name):
    """(images, raw explanation with every method, normalised upsampled explanation of the CAMs); the
    second call explains the classes the first chose."""
    net, x = model(name), images(2)
    with torch.random.fork_rng():
        noise = unit_noise(x, captum_noise(x))
    explainer = fastattr.Explainer(net, layer=MODELS[name], methods=(*INPUT_METHODS, *CAMS, "eigencam"),
                                   upsample=False, normalize=False, samples=SAMPLES, noise=NOISE, steps=STEPS,
                                   baseline=0.0)
    raw = explainer(x, k=K, noise=noise)
    cams = fastattr.Explainer(net, layer=MODELS[name], methods=(*CAMS, "eigencam"), upsample=True,
                              normalize=True)(x, classes=raw.classes)
    assert torch.equal(raw.classes, raw.logits.topk(K, dim=1).indices)
    assert torch.equal(cams.classes, raw.classes)
    return x, raw, cams


def per_class(name, attribute):
    """`[N, K, ...]`: `attribute(target [N])` called for each of the K explained classes."""
    _, raw, _ = explained(name)
    return torch.stack([attribute(raw.classes[:, j]).detach() for j in range(K)], 1)


def assert_close_to_peer(ours, theirs, tol=RAW_TOL):
    scale = theirs.abs().max()
    assert scale > 0, "a zero map compares nothing"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol * scale.item())


def renormalised(maps):
    """Min-max per map, as pytorch-grad-cam does after resizing."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    return (maps - lo) / (hi - lo)


# --- captum -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,peer", [("saliency", "Saliency"), ("inputxgrad", "InputXGradient"),
                                         ("guided", "GuidedBackprop")])
@pytest.mark.parametrize("name", MODELS)
def test_input_gradient_methods_equal_captums(name, method, peer):
    net, (x, raw, _) = model(name), explained(name)
    explainer = getattr(captum_attr, peer)(net)
    theirs = per_class(name, lambda t: explainer.attribute(x, target=t).abs().sum(1))
    assert_close_to_peer(raw.maps[method], theirs)


@functools.cache
def captum_ig(name):
    """captum's Gauss-Legendre Integrated Gradients from a zero baseline: (attributions `[N, K, C, H, W]`,
    convergence deltas `[N, K]`)."""
    net, (x, raw, _) = model(name), explained(name)
    ig = captum_attr.IntegratedGradients(net)
    results = [ig.attribute(x, baselines=0, target=raw.classes[:, j], n_steps=STEPS, method="gausslegendre",
                            return_convergence_delta=True) for j in range(K)]
    return torch.stack([a.detach() for a, _ in results], 1), torch.stack([d.detach() for _, d in results], 1)


@pytest.mark.parametrize("name", MODELS)
def test_ig_equals_captum_gauss_legendre_integrated_gradients(name):
    _, raw, _ = explained(name)
    attributions, _ = captum_ig(name)
    assert_close_to_peer(raw.maps["ig"], attributions.abs().sum(2))


@pytest.mark.parametrize("name", MODELS)
def test_ig_completeness_equals_captum_convergence_delta(name):
    _, raw, _ = explained(name)
    _, deltas = captum_ig(name)
    torch.testing.assert_close(raw.completeness, deltas, rtol=0, atol=COMPLETENESS_TOL)


@pytest.mark.parametrize("name", MODELS)
def test_smoothgrad_equals_captum_noise_tunnel_given_the_same_noise(name):
    net, (x, raw, _) = model(name), explained(name)
    tunnel = captum_attr.NoiseTunnel(captum_attr.Saliency(net))

    def attribute(t):
        torch.manual_seed(SEED)  # the draw captum_noise reproduced and explained() passed to fastattr
        return tunnel.attribute(x, nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=NOISE, target=t).abs().sum(1)

    with torch.random.fork_rng():
        theirs = per_class(name, attribute)
    assert_close_to_peer(raw.maps["smoothgrad"], theirs)


@pytest.mark.parametrize("name", MODELS)
def test_guided_gradcam_equals_captum_guided_gradcam_interpolated_bilinearly(name):
    net, (x, raw, _) = model(name), explained(name)
    peer = captum_attr.GuidedGradCam(net, net.get_submodule(MODELS[name]))
    theirs = per_class(name, lambda t: peer.attribute(x, target=t, interpolate_mode="bilinear").abs().sum(1))
    assert_close_to_peer(raw.maps["guided-gradcam"], theirs)


@pytest.mark.parametrize("name", MODELS)
def test_raw_gradcam_equals_captum_layer_gradcam_at_the_layer_resolution(name):
    net, (x, raw, _) = model(name), explained(name)
    peer = captum_attr.LayerGradCam(net, net.get_submodule(MODELS[name]))
    theirs = per_class(name, lambda t: peer.attribute(x, target=t, relu_attributions=True)[:, 0])
    assert raw.maps["gradcam"].shape == theirs.shape == (2, K, 2, 2)
    assert_close_to_peer(raw.maps["gradcam"], theirs)


# --- pytorch-grad-cam -------------------------------------------------------------------------------------

def grad_cam_maps(cam_class, net, layer, x, classes):
    """pytorch-grad-cam's maps `[N, K, H, W]` for `classes [N, K]`, one call per class."""
    maps = []
    for j in range(classes.shape[1]):
        with cam_class(model=net, target_layers=[layer]) as cam:
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes[:, j]]))
    return torch.from_numpy(np.stack(maps, 1))


@pytest.mark.parametrize("method", CAMS)
@pytest.mark.parametrize("name", MODELS)
def test_cam_equals_pytorch_grad_cam_renormalised_after_resizing(name, method):
    net, (x, raw, cams) = model(name), explained(name)
    theirs = grad_cam_maps(getattr(pytorch_grad_cam, CAMS[method]), net, net.get_submodule(MODELS[name]), x,
                           raw.classes)
    assert theirs.shape == cams.maps[method].shape == (2, K, *x.shape[-2:])
    assert_close_to_peer(renormalised(cams.maps[method]), theirs, NORMALISED_TOL)


def test_gradcam_at_an_inner_layer_is_pytorch_grad_cams_map_before_its_renormalisation():
    # resnet18's "layer3" gives 4x4 maps, resized x16: an extreme at an inner cell falls between output pixels.
    net, x = model("resnet18"), images(2)
    out = fastattr.Explainer(net, layer="layer3", methods=("gradcam",), upsample=True, normalize=True)(x, k=K)
    theirs = grad_cam_maps(pytorch_grad_cam.GradCAM, net, net.get_submodule("layer3"), x, out.classes)
    ours = out.maps["gradcam"]
    assert (ours.flatten(2).amax(-1) < 0.999).any()  # the renormalisation has something to do
    assert_close_to_peer(renormalised(ours), theirs, NORMALISED_TOL)


class ScaledLogits(torch.nn.Module):
    def __init__(self, net, scale):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.mark.parametrize("name", MODELS)
def test_gradcam_plus_plus_equals_pytorch_grad_cam_where_its_eps_is_negligible(name):
    # Logits x1e4 put g^2 far above pytorch-grad-cam's eps = 1e-6 (see the module docstring); at scale 1
    # the maps differ by up to 0.24.
    x, raw, _ = explained(name)
    net = ScaledLogits(model(name), LOGIT_SCALE).eval()
    ours = fastattr.Explainer(net, layer="net." + MODELS[name], methods=("gradcam++",), upsample=True,
                              normalize=True)(x, classes=raw.classes).maps["gradcam++"]
    theirs = grad_cam_maps(pytorch_grad_cam.GradCAMPlusPlus, net, net.get_submodule("net." + MODELS[name]), x,
                           raw.classes)
    assert_close_to_peer(renormalised(ours), theirs, GRADCAM_PLUS_PLUS_TOL)


@pytest.mark.parametrize("name", MODELS)
def test_eigencam_equals_pytorch_grad_cam_up_to_the_svd_sign(name):
    net, (x, _, cams) = model(name), explained(name)
    with pytorch_grad_cam.EigenCAM(model=net, target_layers=[net.get_submodule(MODELS[name])]) as cam:
        theirs = cam(input_tensor=x, targets=None)  # class-independent
        acts = cam.activations_and_grads.activations[0].numpy()
    # The map pytorch-grad-cam's pipeline gives with the projection negated.
    flipped = scale_cam_image(scale_cam_image(np.maximum(-get_2d_projection(acts), 0), x.shape[-2:][::-1]))
    ours = renormalised(cams.maps["eigencam"])
    for n in range(len(x)):
        for j in range(K):  # the same map for every class
            matches = [(ours[n, j] - torch.from_numpy(m[n])).abs().max() <= NORMALISED_TOL for m in (theirs, flipped)]
            assert sum(matches) == 1, f"image {n}, class {j}: matches (pytorch-grad-cam, flipped) = {matches}"


# --- perturbation methods -----------------------------------------------------------------------------------
# pytorch-grad-cam 1.5.7 and captum 0.9 on the same models, images and classes; one image per call of the
# peers, which loop over images inside. Definitions where they coincide and where they differ:
# - AblationCAM zeroes a channel when the layer's minimum is exactly 0 (else sets it to min - 1e7): at layers
#   that end in a ReLU (resnet18 "layer4", vgg11_bn "features", which ends in ReLU + max-pool) the minimum is 0
#   and the definitions coincide. fastattr always zeroes, as the paper does.
# - ScoreCAM resizes the activations with UpsamplingBilinear2d (align_corners=True); fastattr, the Score-CAM
#   authors' code and torchcam resize with half-pixel centres (align_corners=False). The comparison gives
#   pytorch-grad-cam fastattr's resize, so the rest (min-max masks with + 1e-8, softmax of the logits) is
#   what is compared.
# - captum's Occlusion with sliding_window_shapes (3, w, w), strides (3, s, s) and baselines 0 is fastattr's
#   occlusion with window w, stride s, baseline 0: captum's attribution is the same in every channel.
PERTURBATION_MODELS = {"resnet18": "layer4", "vgg11_bn": "features"}
# Score-CAM runs a whole forward per channel in both implementations: its second architecture is the reduced
# mobilenet_v3_small of tests/models.py (40 channels at "features.3"), so the comparison stays within the
# suite's time.
SCORE_CAM_MODELS = {"resnet18": "layer4", "mini-mobilenet_v3_small": "features.3"}


def one_class_at_a_time(cam_class, net, layer, x, classes, **options):
    maps = []
    for j in range(classes.shape[1]):
        with cam_class(model=net, target_layers=[layer], **options) as cam:
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes[:, j]]))
    return torch.from_numpy(np.stack(maps, 1))


@pytest.mark.slow  # the peer runs the whole network per ablated channel
@pytest.mark.parametrize("name", PERTURBATION_MODELS)
def test_ablation_cam_equals_pytorch_grad_cams_where_the_layer_ends_in_a_relu(name):
    net, x = model(name), images(2)
    layer = net.get_submodule(PERTURBATION_MODELS[name])
    out = fastattr.Explainer(net, layer=PERTURBATION_MODELS[name], methods="ablationcam")(x, k=K)
    theirs = one_class_at_a_time(pytorch_grad_cam.AblationCAM, net, layer, x, out.classes)
    assert_close_to_peer(renormalised(out.maps["ablationcam"]), theirs, NORMALISED_TOL)


@pytest.mark.slow  # a forward per channel
@pytest.mark.parametrize("name", SCORE_CAM_MODELS)
def test_score_cam_equals_pytorch_grad_cams_given_the_same_resize(name, monkeypatch):
    net, x = model(name), images(2)
    layer = net.get_submodule(SCORE_CAM_MODELS[name])
    out = fastattr.Explainer(net, layer=SCORE_CAM_MODELS[name], methods="scorecam")(x, k=K)
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d", lambda size: functools.partial(
        torch.nn.functional.interpolate, size=size, mode="bilinear", align_corners=False))
    theirs = one_class_at_a_time(pytorch_grad_cam.ScoreCAM, net, layer, x, out.classes)
    assert_close_to_peer(renormalised(out.maps["scorecam"]), theirs, NORMALISED_TOL)


@pytest.mark.parametrize("name", MODELS)
def test_occlusion_equals_captums_occlusion(name):
    net, x = model(name), images(2)
    out = fastattr.Explainer(net, methods="occlusion", window=16, stride=12, normalize=False)(x, k=K)
    peer = captum_attr.Occlusion(net)
    theirs = torch.stack([peer.attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 12, 12), baselines=0,
                                         target=out.classes[:, j])[:, 0] for j in range(K)], 1)
    assert_close_to_peer(out.maps["occlusion"], theirs)


@pytest.mark.slow  # a forward per channel
@pytest.mark.parametrize("name", SCORE_CAM_MODELS)
def test_score_cam_equals_torchcams_given_the_same_order_of_resize_and_normalisation(name):
    # torchcam min-max normalises each channel at the layer's resolution and then resizes it; fastattr (like
    # pytorch-grad-cam and the authors' code) resizes and then normalises, and bilinear resizing does not keep a
    # map's extremes. The comparison gives torchcam fastattr's order (its `_normalize` hook resizes first, so
    # its own resize sees masks of the input's size and leaves them); the rest (softmax of the masked images'
    # logits, ReLU of the weighted sum, min-max at the layer's resolution) is torchcam's own.
    torchcam_methods = pytest.importorskip("torchcam.methods")
    net, x = model(name), images(2)
    out = fastattr.Explainer(net, layer=SCORE_CAM_MODELS[name], methods="scorecam", upsample=False)(x, k=K)
    theirs = []
    for j in range(K):
        with torchcam_methods.ScoreCAM(net, SCORE_CAM_MODELS[name], batch_size=32,
                                       input_shape=tuple(x.shape[1:])) as extractor:
            own_normalize = extractor._normalize

            def resize_then_normalize(cams, spatial_dims=None, eps=1e-8, own_normalize=own_normalize):
                if cams.ndim != 4:  # the final maps [N, h, w], normalised where they are
                    return own_normalize(cams, spatial_dims, eps)
                resized = torch.nn.functional.interpolate(cams, x.shape[-2:], mode="bilinear", align_corners=False)
                return own_normalize(resized, spatial_dims, eps)

            extractor._normalize = resize_then_normalize
            with torch.no_grad():
                logits = net(x)
            theirs.append(extractor(class_idx=[int(c) for c in out.classes[:, j]], scores=logits)[0])
    assert_close_to_peer(out.maps["scorecam"], torch.stack(theirs, 1), NORMALISED_TOL)
