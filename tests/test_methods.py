"""Every method's formula on hand-computed values, one behaviour each.

Direct calls use one image, one class, two channels at two positions:
    A_0 = [2, -1], A_1 = [1, 3]      (activations)
    g_0 = [1, -2], g_1 = [-0.5, 1]   (d logit / d A)
so g*A is [2, 2] and [-0.5, 3], and the spatial sums of A are 1 and 4. End-to-end tests use the tiny net of
test_golden.py, whose ReLU net is positively homogeneous (no biases), so f(a x) = a f(x) for a > 0.
"""

import math

import pytest
import torch

import fastattr
from fastattr import methods
from models import images, model
from test_golden import X, tiny

ACTS = torch.tensor([[[[2.0, -1.0]], [[1.0, 3.0]]]], dtype=torch.float64)          # [N=1, C=2, 1, 2]
GRADS = torch.tensor([[[[[1.0, -2.0]], [[-0.5, 1.0]]]]], dtype=torch.float64)      # [N=1, K=1, C=2, 1, 2]


def row(*values):
    return torch.tensor([[[values]]], dtype=torch.float64)  # [1, 1, 1, len]


def test_gradcam_weights_channels_by_their_mean_gradient():
    # weights (-0.5, 0.25): -0.5 * [2, -1] + 0.25 * [1, 3] = [-0.75, 1.25] -> ReLU
    torch.testing.assert_close(methods.gradcam(ACTS, GRADS), row(0.0, 1.25), rtol=0, atol=1e-15)


def test_gradcam_plus_plus_weights_positive_gradients_by_the_second_order_alpha():
    # alpha = g^2 / (2 g^2 + S_c g^3): channel 0 at g=1: 1/3; at g=-2 the denominator 8 - 8 is 0 -> alpha 0.
    # channel 1 at g=1: 1 / (2 + 4) = 1/6; at g=-0.5, ReLU(g) = 0. weights (1/3, 1/6):
    # (1/3) [2, -1] + (1/6) [1, 3] = [5/6, 1/6]
    torch.testing.assert_close(methods.gradcam_plus_plus(ACTS, GRADS), row(5 / 6, 1 / 6), rtol=0, atol=1e-15)


def test_gradcam_plus_plus_alpha_takes_effect_unlike_a_plain_mean():
    # One channel, gradient 1 at both positions, A = [1, 1]: alpha = 1 / (2 + 2) = 1/4 at each position, so the
    # weight is 1/2 (a normalisation that never took effect would leave sum ReLU(g) = 2, giving [2, 2]).
    acts, grads = row(1.0, 1.0)[:, 0:1], row(1.0, 1.0)[:, None]
    torch.testing.assert_close(methods.gradcam_plus_plus(acts, grads), row(0.5, 0.5), rtol=0, atol=1e-15)


def test_xgradcam_weights_channels_by_activation_weighted_gradient():
    # weights: (2 + 2) / (2 - 1) = 4 and (-0.5 + 3) / (1 + 3) = 0.625:
    # 4 [2, -1] + 0.625 [1, 3] = [8.625, -2.125] -> ReLU
    torch.testing.assert_close(methods.xgradcam(ACTS, GRADS), row(8.625, 0.0), rtol=0, atol=1e-15)


def test_xgradcam_gives_a_channel_whose_activations_sum_to_zero_no_weight():
    acts = torch.tensor([[[[1.0, -1.0]], [[1.0, 1.0]]]], dtype=torch.float64)
    grads = torch.ones(1, 1, 2, 1, 2, dtype=torch.float64)
    # channel 0 sums to 0 -> weight 0; channel 1: (1 + 1) / 2 = 1 -> [1, 1]
    torch.testing.assert_close(methods.xgradcam(acts, grads), row(1.0, 1.0), rtol=0, atol=1e-15)


def test_hirescam_sums_gradient_times_activation_per_position():
    # [2 - 0.5, 2 + 3] = [1.5, 5]
    torch.testing.assert_close(methods.hirescam(ACTS, GRADS), row(1.5, 5.0), rtol=0, atol=1e-15)


def test_elementwise_gradcam_applies_relu_before_the_channel_sum():
    # ReLU([2, 2]) + ReLU([-0.5, 3]) = [2, 5]
    torch.testing.assert_close(methods.gradcam_elementwise(ACTS, GRADS), row(2.0, 5.0), rtol=0, atol=1e-15)


def test_layercam_weights_activations_by_positive_gradients():
    # ReLU(g): [1, 0] and [0, 1]; times A: [2, 0] + [0, 3] = [2, 3]
    torch.testing.assert_close(methods.layercam(ACTS, GRADS), row(2.0, 3.0), rtol=0, atol=1e-15)


def test_eigencam_projects_on_the_first_principal_component():
    # Positions (1, 2), (2, 4), (3, 6) in channel space; centred: (-1, -2), (0, 0), (1, 2); the component is
    # (1, 2)/sqrt(5), so the projection is [-sqrt 5, 0, sqrt 5], oriented along the channel sum [3, 6, 9].
    acts = torch.tensor([[[[1.0, 2.0, 3.0]], [[2.0, 4.0, 6.0]]]], dtype=torch.float64)
    s5 = math.sqrt(5)
    torch.testing.assert_close(methods.principal_projection(acts), torch.tensor([[[-s5, 0.0, s5]]], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(methods.eigencam(acts), row(0.0, 0.0, s5), rtol=0, atol=1e-12)


def test_eigencam_orients_the_component_towards_the_stronger_activations():
    acts = torch.tensor([[[[3.0, 2.0, 1.0]], [[6.0, 4.0, 2.0]]]], dtype=torch.float64)
    torch.testing.assert_close(methods.eigencam(acts), row(math.sqrt(5), 0.0, 0.0), rtol=0, atol=1e-12)


def test_eigencam_with_fewer_positions_than_channels_uses_the_position_gram_matrix():
    # Positions (1, 0, 2) and (3, 2, 2); centred: -(1, 1, 0) and (1, 1, 0); projection [-sqrt 2, sqrt 2].
    acts = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]], [[2.0, 2.0]]]], dtype=torch.float64)
    torch.testing.assert_close(methods.eigencam(acts), row(0.0, math.sqrt(2)), rtol=0, atol=1e-12)


def test_eigencam_matches_an_svd_on_random_activations():
    acts = torch.randn(3, 16, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = acts.flatten(2).transpose(1, 2)
    rows = rows - rows.mean(1, keepdim=True)
    exact = (rows @ torch.linalg.svd(rows).Vh[:, 0, :, None]).squeeze(-1).view(3, 5, 7)
    torch.testing.assert_close(methods.principal_projection(acts).abs(), exact.abs(), rtol=0, atol=1e-9)


def test_input_x_gradient_sums_absolute_products_over_channels():
    images = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.5]]]], dtype=torch.float64)
    grads = torch.tensor([[[[[2.0, 1.0]], [[-1.0, 4.0]]]]], dtype=torch.float64)
    # x*g: [2, -2] and [-3, 2] -> |.| summed: [5, 4]
    torch.testing.assert_close(methods.input_x_gradient(images, grads), row(5.0, 4.0), rtol=0, atol=1e-15)


def test_smoothgrad_averages_saliency_over_the_noisy_copies():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    net(torch.zeros(1, 3, 8, 8))
    net = net.double().eval()
    x, noise = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 3, 8, 8, dtype=torch.float64)
    got = fastattr.Explainer(net, methods=("smoothgrad",), samples=3, normalize=False)(x, classes=[1], noise=noise)
    spread = 0.15 * (x.amax((1, 2, 3)) - x.amin((1, 2, 3))).view(-1, 1, 1, 1)
    saliency = fastattr.Explainer(net, methods=("saliency",), normalize=False)
    want = sum(saliency(x + spread * noise[:, s], classes=[1]).maps["saliency"] for s in range(3)) / 3
    torch.testing.assert_close(got.maps["smoothgrad"], want, rtol=1e-12, atol=1e-14)


def test_integrated_gradients_multiplies_the_path_integral_by_the_input_difference():
    deltas = torch.tensor([[[[2.0, -1.0]]]], dtype=torch.float64)
    path = torch.tensor([[[[[0.5, 3.0]]]]], dtype=torch.float64)
    torch.testing.assert_close(methods.integrated_gradients(deltas, path), row(1.0, 3.0), rtol=0, atol=1e-15)
    # attributions sum to 1 - 3 = -2; against a gain of 1.5 the error is -3.5
    error = methods.completeness_error(deltas, path, torch.tensor([[1.5]], dtype=torch.float64))
    torch.testing.assert_close(error, torch.tensor([[-3.5]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_gauss_legendre_with_two_points_sits_at_half_minus_and_plus_half_over_root_three():
    alphas, weights = methods.gauss_legendre(2)
    assert alphas == pytest.approx([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)], abs=1e-15)
    assert weights == pytest.approx([0.5, 0.5], abs=1e-15)


def test_guided_gradcam_scales_guided_saliency_by_gradcam():
    acts, acts_grads = row(2.0, 4.0), row(1.0, 3.0)[:, None]        # weight 2: cam [4, 8]
    guided = row(-1.0, 0.5)[:, None]                                # |.| [1, 0.5]
    torch.testing.assert_close(methods.guided_gradcam(acts, acts_grads, guided), row(4.0, 4.0), rtol=0, atol=1e-15)


# --- end to end on the tiny net ----------------------------------------------------------------------------

def explain_tiny(methods_, **options):
    return fastattr.explain(tiny(), X, layer="act", methods=methods_, classes=[0, 1], upsample=False,
                            normalize=False, **options)


def test_guided_backprop_of_the_tiny_net_drops_the_class_whose_layer_gradient_is_negative():
    # class 0: d logit/dA = (0.5, 0.25) > 0 passes every ReLU as plain backprop does;
    # class 1: (0, -0.75) is clamped to 0 at the ReLU, where saliency shows 0.75 at x = -2.
    out = explain_tiny(("guided", "saliency"))
    torch.testing.assert_close(out.maps["guided"][0, 0], torch.tensor([[0.5, 0.25], [0.5, 0.5]]).double())
    torch.testing.assert_close(out.maps["guided"][0, 1], torch.zeros(2, 2).double(), rtol=0, atol=0)
    torch.testing.assert_close(out.maps["saliency"][0, 1], torch.tensor([[0.0, 0.75], [0.0, 0.0]]).double())


def test_integrated_gradients_of_a_homogeneous_net_are_input_times_gradient_with_zero_completeness_error():
    out = explain_tiny(("ig", "inputxgrad"), steps=3)
    # the gradient is constant on the ray from 0 to x, so IG = x * grad: class 0 [[0.5, 0.5], [1.5, 2]]
    torch.testing.assert_close(out.maps["ig"][0, 0], torch.tensor([[0.5, 0.5], [1.5, 2.0]]).double())
    torch.testing.assert_close(out.maps["ig"], out.maps["inputxgrad"], rtol=0, atol=1e-14)
    torch.testing.assert_close(out.completeness, torch.zeros(1, 2).double(), rtol=0, atol=1e-14)


def test_integrated_gradients_report_the_quadrature_error_from_a_nonzero_baseline():
    # From the baseline 1 the path crosses a ReLU kink (x = -2 reaches 0 at a = 1/3), which Gauss-Legendre does
    # not integrate exactly; the error is the attributions' sum minus the logits' gain, logit(x) - logit(ones).
    few, many = explain_tiny("ig", steps=2, baseline=1.0), explain_tiny("ig", steps=64, baseline=1.0)
    gains = few.logits - tiny()(torch.ones_like(X)).detach()
    torch.testing.assert_close(gains, torch.tensor([[2.5, -1.5]]).double())
    assert few.completeness.abs().max() > 0.05
    assert many.completeness.abs().max() < few.completeness.abs().max() / 10


def test_smoothgrad_with_no_noise_is_saliency():
    out = explain_tiny(("smoothgrad", "saliency"), noise=0.0, samples=3)
    torch.testing.assert_close(out.maps["smoothgrad"], out.maps["saliency"], rtol=0, atol=0)


def test_smoothgrad_averages_saliency_at_the_given_noisy_points():
    # X spans -2..4, so noise=1/6 turns a unit draw into a step of 1. The second draw moves x = -2 to 1, where
    # class 0's gradient is 0.5 (channel 0) instead of -0.25: the mean at that pixel is (0.25 + 0.5) / 2.
    draw = torch.zeros(1, 2, 1, 2, 2, dtype=torch.float64)
    draw[0, 1, 0, 0, 1] = 3.0
    explainer = fastattr.Explainer(tiny(), methods="smoothgrad", samples=2, noise=1 / 6, upsample=False,
                                   normalize=False)
    out = explainer(X, classes=[0], noise=draw)
    torch.testing.assert_close(out.maps["smoothgrad"][0, 0], torch.tensor([[0.5, 0.375], [0.5, 0.5]]).double())


def test_smoothgrad_draws_the_same_noise_for_the_same_seed_and_other_noise_for_another():
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = fastattr.Explainer(tiny(), methods="smoothgrad", samples=4, seed=7, normalize=False)(x)
    again = fastattr.Explainer(tiny(), methods="smoothgrad", samples=4, seed=7, normalize=False)(x)
    other = fastattr.Explainer(tiny(), methods="smoothgrad", samples=4, seed=8, normalize=False)(x)
    assert torch.equal(first.maps["smoothgrad"], again.maps["smoothgrad"])
    assert not torch.equal(first.maps["smoothgrad"], other.maps["smoothgrad"])


def test_eigencam_alone_runs_without_a_backward_and_gives_every_class_the_same_map():
    out = explain_tiny("eigencam", keep_grads=True)
    assert out.grads == {}
    assert torch.equal(out.maps["eigencam"][:, 0], out.maps["eigencam"][:, 1])
    torch.testing.assert_close(out.maps["eigencam"][:, :1], methods.eigencam(torch.relu(torch.cat([X, -X], 1))))


def test_a_wrong_noise_shape_names_the_expected_one():
    explainer = fastattr.Explainer(tiny(), methods="smoothgrad", samples=2)
    with pytest.raises(fastattr.InputError, match=r"noise: expected a standard-normal draw \[1, 2, 1, 2, 2\]"):
        explainer(X, noise=torch.zeros(1, 3, 1, 2, 2, dtype=torch.float64))


def test_noise_for_a_method_that_reads_none_is_refused():
    with pytest.raises(fastattr.InputError, match=r"noise: only methods over noisy copies \(smoothgrad\) read noise"):
        fastattr.Explainer(tiny(), layer="act")(X, noise=torch.zeros(1, 16, 1, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("option,value,message", [
    ("samples", 0, r"samples: expected an int >= 1, got 0"),
    ("steps", 2.5, r"steps: expected an int >= 1, got 2.5"),
    ("noise", -0.1, r"noise: expected a number >= 0, got -0.1"),
    ("baseline", torch.zeros(2, 1, 2, 2), r"baseline: expected a number or a tensor \[C, H, W\]"),
])
def test_bad_method_options_are_refused_with_the_expected_form(option, value, message):
    with pytest.raises(fastattr.MethodError, match=message):
        fastattr.Explainer(tiny(), methods=("smoothgrad", "ig"), **{option: value})


def test_a_baseline_of_another_size_than_the_images_is_refused():
    explainer = fastattr.Explainer(tiny(), methods="ig", baseline=torch.zeros(1, 3, 3, dtype=torch.float64))
    with pytest.raises(fastattr.InputError, match=r"baseline: shape \[1, 3, 3\] does not match the images \[1, 2, 2\]"):
        explainer(X)


def test_a_new_sampling_method_is_one_sampled_read_and_one_registry_entry(monkeypatch):
    # SmoothGrad-Squared (Hooker et al., 2019): (1/S) sum_s sum_c (dy/dx_c (x + noise_s))^2, added here without
    # touching the passes: a sampled read (methods.SAMPLED) and a method reading it (methods.METHODS).
    from fastattr import methods, postprocess

    monkeypatch.setitem(methods.SAMPLED, "noisy_squares", methods.Sampled("noise", lambda g: g.square().sum(-3)))
    monkeypatch.setitem(methods.METHODS, "smoothgrad-squared",
                        methods.Method(lambda noisy_squares: noisy_squares, ("noisy_squares",), postprocess.minmax_shifted))
    net, x = model("resnet18", torch.float64), images(2, torch.float64)
    noise = torch.randn(2, 3, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = fastattr.Explainer(net, methods="smoothgrad-squared", samples=3, noise=0.1, normalize=False,
                             sample_batch=4)(x, k=2, noise=noise)
    spread = 0.1 * (x.amax((1, 2, 3)) - x.amin((1, 2, 3)))
    want = torch.zeros(2, 2, 64, 64, dtype=torch.float64)
    for s in range(3):
        copy = (x + spread.view(-1, 1, 1, 1) * noise[:, s]).requires_grad_()
        logits = net(copy)
        for j in range(2):
            (grad,) = torch.autograd.grad(logits.gather(1, out.classes[:, j:j + 1]).sum(), copy, retain_graph=j == 0)
            want[:, j] += grad.square().sum(1) / 3
    torch.testing.assert_close(out.maps["smoothgrad-squared"], want, rtol=1e-9, atol=1e-15)
