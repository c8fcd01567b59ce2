"""The backward ops ONNX has no translation for, written as forward ops it has (a make_fx decomposition table).

Only input gradients occur: fastattr never differentiates parameters. Keep the table minimal: torch's own
backward decompositions broke the export (measured-facts, ONNX export).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ExportError

def _convolution_input_grad(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                            output_padding, groups, output_mask):
    # ONNX has no convolution_backward; the input's gradient of a convolution is a transposed convolution
    # of the output's gradient with the same weight. Parameter gradients never occur in fastattr's graphs.
    if output_mask[1] or output_mask[2]:
        raise ExportError("export: the graph asks for a convolution's weight or bias gradient, which fastattr "
                          "never computes; a parameter of the model is a graph input")
    if transposed or weight.ndim != 4:
        raise ExportError(f"export: the gradient of a {'transposed ' if transposed else ''}{weight.ndim - 2}-D "
                          "convolution has no ONNX translation in fastattr; only 2-D convolutions are supported")
    reach = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if all(s == 1 for s in stride) and all(0 <= p <= r for p, r in zip(padding, reach)):
        # Unstrided, the transposed convolution is a convolution with the kernel flipped and its channel axes
        # swapped per group: onnxruntime runs a Conv much faster than the equal ConvTranspose (the saliency
        # profile before and after, benchmarks/results/onnx-profile.md).
        flipped = weight.unflatten(0, (groups, -1)).transpose(1, 2).flatten(0, 1).flip(-2, -1)
        grad_input = torch.nn.functional.conv2d(grad_output, flipped, None, 1, [r - p for r, p in zip(reach, padding)],
                                                dilation, groups)
        return grad_input, None, None
    extra = _output_padding(input, grad_output, weight.shape[2:], stride, padding, dilation)
    grad_input = torch.nn.functional.conv_transpose2d(grad_output, weight, None, stride, padding, extra, groups, dilation)
    return grad_input, None, None


def _output_padding(input: Tensor, grad_output: Tensor, kernel, stride, padding, dilation=(1, 1)) -> list[int]:
    """ConvTranspose's output_padding that restores `input`'s height and width from `grad_output`'s: the
    rows and columns a strided window left over."""
    return [int(input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                      + dilation[i] * (kernel[i] - 1) + 1)) for i in range(2)]


def _pair(value, default=None) -> tuple[int, int]:
    value = tuple(value) if len(value) else default
    return value if len(value) == 2 else (value[0], value[0])


def _pooling_matrix(size_in: int, size_out: int, like: Tensor) -> Tensor:
    """`[size_out, size_in]`: row i averages adaptive pooling's bin i, [floor(i*in/out), ceil((i+1)*in/out))."""
    rows = torch.zeros(size_out, size_in, dtype=like.dtype)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        rows[i, start:end] = 1.0 / (end - start)
    return rows.to(like.device)


def _adaptive_avg_pool2d_input_grad(grad_output: Tensor, input: Tensor) -> Tensor:
    # Adaptive average pooling is Y = P_h X P_w^T for fixed averaging matrices, so dX = P_h^T dY P_w: two
    # MatMuls, which ONNX has, for any ratio of sizes (VGG pools 2x2 up to 7x7 on small images).
    p_h = _pooling_matrix(int(input.shape[-2]), int(grad_output.shape[-2]), grad_output)
    p_w = _pooling_matrix(int(input.shape[-1]), int(grad_output.shape[-1]), grad_output)
    return p_h.T @ grad_output @ p_w


def _threshold_input_grad(grad_output: Tensor, x: Tensor, threshold: float) -> Tensor:
    # ReLU's backward as a product with its mask, not a Where, which onnxruntime runs far slower (the saliency
    # profile, benchmarks/results/onnx-profile.md). Only an infinite or NaN gradient differs (NaN, not 0).
    return grad_output * (x <= threshold).logical_not().to(grad_output.dtype)


def _silu_input_grad(grad_output: Tensor, x: Tensor) -> Tensor:
    sig = torch.sigmoid(x)
    return grad_output * sig * (1 + x * (1 - sig))


def _avg_pool2d_input_grad(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                           divisor_override):
    # Each output averages a kernel_h x kernel_w window, so the input's gradient spreads each output
    # gradient back over its window: a depthwise transposed convolution with a constant 1/area kernel.
    kernel_size = _pair(kernel_size)
    stride, padding = _pair(stride, kernel_size), _pair(padding)
    if ceil_mode or divisor_override is not None or (any(padding) and not count_include_pad):
        raise ExportError("export: avg_pool2d with ceil_mode, divisor_override or padding not counted has no "
                          "ONNX gradient in fastattr")
    channels, (kh, kw) = int(input.shape[1]), kernel_size
    kernel = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=grad_output.dtype, device=grad_output.device)
    extra = _output_padding(input, grad_output, kernel_size, stride, padding)
    return torch.nn.functional.conv_transpose2d(grad_output, kernel, None, stride, padding, extra, channels)


def _max_pool2d_input_grad(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    # Each output took one input, whose index within its [h * w] plane the forward returned: the gradient goes
    # back to those places, summed where windows overlap (a ScatterElements with add). torch 2.11's torch.onnx
    # has no translation of the op (2.14's has).
    plane = input.shape[:-2]
    grad = grad_output.new_zeros(*plane, input.shape[-2] * input.shape[-1])
    return grad.scatter_add(-1, indices.flatten(-2), grad_output.flatten(-2)).reshape(input.shape)


ONNX_DECOMPOSITIONS = {
    torch.ops.aten.max_pool2d_with_indices_backward.default: _max_pool2d_input_grad,
    torch.ops.aten.silu_backward.default: _silu_input_grad,
    torch.ops.aten.threshold_backward.default: _threshold_input_grad,
    torch.ops.aten.avg_pool2d_backward.default: _avg_pool2d_input_grad,
    torch.ops.aten.convolution_backward.default: _convolution_input_grad,
    torch.ops.aten._adaptive_avg_pool2d_backward.default: _adaptive_avg_pool2d_input_grad,
}
