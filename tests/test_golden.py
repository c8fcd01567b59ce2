"""Hand-computed values on tiny nets, one behaviour each.

TinyNet: x [1, 1, 2, 2] -> conv 1x1 with weights (1, -1) -> ReLU ("act") -> global mean -> linear W.
With x = [[1, -2], [3, 4]]: A_0 = relu(x) = [[1, 0], [3, 4]], A_1 = relu(-x) = [[0, 2], [0, 0]],
means (2, 0.5), W = [[2, 1], [0, -3]], so logits = (4.5, -1.5), and d logit_k / d A_c = W_kc / 4.
"""

import torch
from torch import nn

import fastattr
from fastattr import methods, postprocess

X = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]], dtype=torch.float64)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.act = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, -3.0]]))

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def tiny():
    return TinyNet().double().eval()


def test_gradcam_of_the_tiny_net_equals_the_hand_computed_weighted_sum():
    out = fastattr.explain(tiny(), X, layer="act", classes=[0, 1], upsample=False, normalize=False)
    # class 0: alpha = (2/4, 1/4): 0.5 * A_0 + 0.25 * A_1; class 1: alpha = (0, -3/4): -0.75 * A_1 -> ReLU -> 0
    expected = torch.tensor([[[[0.5, 0.5], [1.5, 2.0]], [[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(out.maps["gradcam"], expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.logits, torch.tensor([[4.5, -1.5]], dtype=torch.float64))


def test_normalised_gradcam_of_the_tiny_net_spans_zero_to_one_and_leaves_a_flat_map_at_zero():
    out = fastattr.explain(tiny(), X, layer="act", classes=[0, 1], upsample=False)
    expected = torch.tensor([[[[0.0, 0.0], [2 / 3, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(out.maps["gradcam"], expected, rtol=0, atol=1e-15)


def test_saliency_of_the_tiny_net_is_the_absolute_input_gradient():
    out = fastattr.explain(tiny(), X, methods="saliency", classes=[0, 1], normalize=False, keep_grads=True)
    # x > 0 passes channel 0 (w = 1): d logit_k/dx = W_k0 / 4; x < 0 passes channel 1 (w = -1): -W_k1 / 4.
    grads = torch.tensor([[[[[0.5, -0.25], [0.5, 0.5]]], [[[0.0, 0.75], [0.0, 0.0]]]]], dtype=torch.float64)
    torch.testing.assert_close(out.grads["input"], grads, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.maps["saliency"], grads.abs().sum(2), rtol=0, atol=1e-15)


def test_top1_of_the_tiny_net_is_the_larger_logit():
    out = fastattr.explain(tiny(), X, layer="act")
    assert out.classes.tolist() == [[0]]


def test_layer_and_input_gradients_come_from_one_backward_through_a_skip_connection():
    class Skip(nn.Module):
        # logits = (mean(A) + 3 mean(x), -mean(A)) with A = 2x: the input reaches the head around the layer.
        def __init__(self):
            super().__init__()
            self.layer = nn.Conv2d(1, 1, 1, bias=False)
            with torch.no_grad():
                self.layer.weight.fill_(2.0)

        def forward(self, x):
            a = self.layer(x).mean((1, 2, 3))
            return torch.stack([a + 3 * x.mean((1, 2, 3)), -a], dim=1)

    out = fastattr.explain(Skip().double().eval(), X, layer="layer", methods=("gradcam", "saliency"), classes=[0, 1],
                           keep_grads=True, upsample=False, normalize=False)
    layer_grads = torch.tensor([0.25, -0.25], dtype=torch.float64).view(1, 2, 1, 1, 1).expand(1, 2, 1, 2, 2)
    input_grads = torch.tensor([(2 + 3) / 4, -2 / 4], dtype=torch.float64).view(1, 2, 1, 1, 1).expand(1, 2, 1, 2, 2)
    torch.testing.assert_close(out.grads["layer"], layer_grads, rtol=0, atol=1e-15)
    torch.testing.assert_close(out.grads["input"], input_grads, rtol=0, atol=1e-15)
    # Grad-CAM class 0: 0.25 * 2x, ReLU; class 1: -0.25 * 2x, ReLU.
    torch.testing.assert_close(out.maps["gradcam"][0, 0], (0.5 * X[0, 0]).relu(), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.maps["gradcam"][0, 1], (-0.5 * X[0, 0]).relu(), rtol=0, atol=1e-15)


def test_gradcam_method_alone_is_relu_of_channel_mean_weighted_sum():
    acts = torch.tensor([[[[1.0, 2.0]], [[3.0, -4.0]]]])          # [N=1, C=2, 1, 2]
    grads = torch.tensor([[[[[1.0, 3.0]], [[-1.0, -1.0]]]]])      # [N=1, K=1, C=2, 1, 2]: means 2 and -1
    # 2 * (1, 2) - 1 * (3, -4) = (-1, 8) -> ReLU -> (0, 8)
    assert methods.gradcam(acts, grads).tolist() == [[[[0.0, 8.0]]]]


def test_saliency_method_alone_sums_absolute_gradients_over_channels():
    grads = torch.tensor([[[[[1.0, -2.0]], [[-3.0, 0.5]]]]])      # [N=1, K=1, C=2, 1, 2]
    assert methods.saliency(grads).tolist() == [[[[4.0, 2.5]]]]


def test_the_two_normalisations_follow_the_article_on_where_eps_goes():
    maps = torch.tensor([[[[1.0, 3.0]], [[5.0, 5.0]]]], dtype=torch.float64)
    torch.testing.assert_close(postprocess.minmax_clamped(maps),
                               torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]], dtype=torch.float64))
    torch.testing.assert_close(postprocess.minmax_shifted(maps),
                               torch.tensor([[[[0.0, 2 / (2 + 1e-8)]], [[0.0, 0.0]]]], dtype=torch.float64))


def test_upsampling_is_bilinear_to_the_input_size_before_normalising():
    class Pooled(TinyNet):
        def forward(self, x):  # the layer sees a 2x2 average of a 4x4 input
            return self.fc(self.act(self.conv(torch.nn.functional.avg_pool2d(x, 2))).mean((2, 3)))

    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) - 6
    net = Pooled().double().eval()
    raw = fastattr.explain(net, x, layer="act", classes=[0], upsample=False, normalize=False).maps["gradcam"]
    out = fastattr.explain(net, x, layer="act", classes=[0])
    assert raw.shape == (1, 1, 2, 2) and out.maps["gradcam"].shape == (1, 1, 4, 4)
    expected = postprocess.minmax_clamped(
        torch.nn.functional.interpolate(raw, size=(4, 4), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out.maps["gradcam"], expected, rtol=0, atol=1e-15)
    assert out.maps["gradcam"].max() == 1 and out.maps["gradcam"].min() == 0
