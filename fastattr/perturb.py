"""The perturbation passes: many perturbed copies of each image (or of its activation at the layer) sent
forward, in chunks, and the explained classes' scores read from each copy.

Every pass here is forward-only and runs its copies through `graph.scores_of_copies`, at most `per_chunk`
copies per image at a time, so memory follows a chunk whatever the number of copies, and only the `[N, P, K]`
scores are kept. The clean forward is not repeated: its scores, and the layer's activation, come from the pass
every method shares.

    ablated_scores   [N, K, C]       Ablation-CAM: the head above the layer, channel c of the activation zeroed
    masked_scores    [N, K, C]       Score-CAM: the whole model on the image times channel c's upsampled,
                                     min-max normalised activation
    occlusion_drops  [N, K, H, W]    occlusion: per pixel, the mean score drop of the windows that cover it

>>> drops = occlusion_drops(forward, images, classes, scores, window=16, stride=8, baseline=0.0, per_chunk=16)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InputError, MethodError
from .graph import Split, scores_of_copies

__all__ = ["ablated_scores", "masked_scores", "occlusion_drops", "window_starts", "check_stride", "check_window_fits",
           "AblationCost", "ablation_cost", "channel_axis"]


def ablated_scores(s: Split, acts: Tensor, carried: tuple | None, images: Tensor, classes: Tensor, channel_axis: int,
                   per_chunk: int, head: Callable[..., Tensor] | None = None) -> Tensor:
    """`[N, K, C]`: the classes' scores with channel c of the layer's activation set to 0, by the head alone.

    `acts` is the layer's output as the trunk returned it and `carried` the trunk's values the head reads
    (skip connections), both from the shared pass; where that pass kept no `carried` (it ran the trunk under
    autograd, for input gradients) the trunk runs once more here, without autograd. Each chunk repeats the
    activation P times, zeroes channel `start + p` of copy p, and runs the head on the N * P copies, the
    carried values repeated with them. `head` runs in place of `s.head` (its compiled form, say).
    """
    head_of = s.head if head is None else head
    if carried is None:
        with torch.no_grad():
            acts, *carried = s.trunk(images)
    n, channels = acts.shape[0], acts.shape[channel_axis]
    axis = channel_axis % acts.ndim

    def forward(copies: Tensor) -> Tensor:
        repeat = copies.shape[0] // n
        return head_of(copies, *(c.repeat_interleave(repeat, 0) if _per_image(c, n) else c for c in carried))

    def copies(start: int, stop: int) -> Tensor:
        keep = 1 - F.one_hot(torch.arange(start, stop, device=acts.device), channels).to(acts.dtype)  # [P, C]
        shape = [1] * (acts.ndim + 1)
        shape[1], shape[axis + 1] = stop - start, channels
        return acts.unsqueeze(1) * keep.view(shape)

    return scores_of_copies(forward, copies, channels, classes, per_chunk).transpose(1, 2)


def masked_scores(forward: Callable[[Tensor], Tensor], images: Tensor, acts: Tensor, classes: Tensor,
                  per_chunk: int) -> Tensor:
    """`[N, K, C]`: the classes' scores on the image times each channel of `acts [N, C, h, w]`, resized
    bilinearly to the image (half-pixel centres) and min-max normalised to [0, 1] (Score-CAM's masks). A
    chunk resizes only its own channels, so no `[N, C, H, W]` mask stack is held."""
    size = images.shape[-2:]

    def copies(start: int, stop: int) -> Tensor:
        masks = F.interpolate(acts[:, start:stop], size=size, mode="bilinear", align_corners=False)
        flat = masks.flatten(2)
        lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
        # A constant channel has no mask to give: 0 / eps leaves its copy black, as the peers' + 1e-8 does.
        masks = (masks - lo) / (hi - lo + 1e-8)
        return images.unsqueeze(1) * masks.unsqueeze(2)

    return scores_of_copies(forward, copies, acts.shape[1], classes, per_chunk, images=True).transpose(1, 2)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Where the windows along one side start: every `stride` pixels, ceil((size - window) / stride) + 1 of
    them as captum's `Occlusion` places them; the last one may reach past the edge and is cut there."""
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def check_stride(window: int, stride: int) -> None:
    """Refuse a stride larger than the window: pixels between windows would have no score drop to average."""
    if stride > window:
        raise MethodError(f"stride: {stride} pixels is larger than the window ({window}), which leaves pixels no "
                          f"window covers; pass a stride of at most {window}")


def check_window_fits(window: int, size: tuple[int, int]) -> None:
    """Refuse images smaller than the window, an InputError as every other mismatch of option and images."""
    if window > min(size):
        raise InputError(f"window: {window} pixels is larger than the images ({size[0]}x{size[1]}); pass a window "
                         f"of at most {min(size)}, or larger images")


def _cover(size: int, window: int, stride: int, like: Tensor) -> Tensor:
    """`[W, size]`: 1 where window w covers the pixel."""
    starts = torch.tensor(window_starts(size, window, stride), device=like.device)
    pixels = torch.arange(size, device=like.device)
    return ((pixels >= starts[:, None]) & (pixels < starts[:, None] + window)).to(like.dtype)


def occlusion_drops(forward: Callable[[Tensor], Tensor], images: Tensor, classes: Tensor, scores: Tensor,
                    window: int, stride: int, baseline: float | Tensor, per_chunk: int) -> Tensor:
    """`[N, K, H, W]`: the score drop `scores - score(occluded)` of every square `window` (sliding by `stride`,
    all channels) set to `baseline`, averaged per pixel over the windows that cover it (captum's `Occlusion`
    with window (C, window, window) and strides (C, stride, stride)). `scores [N, K]` are the clean scores."""
    h, w = images.shape[-2:]
    rows, cols = _cover(h, window, stride, images), _cover(w, window, stride, images)  # [R, H], [Q, W]
    base = baseline.to(images).view(1, 1, *images.shape[1:]) if isinstance(baseline, Tensor) else baseline

    def copies(start: int, stop: int) -> Tensor:
        index = torch.arange(start, stop, device=images.device)
        masks = (rows[index // cols.shape[0]][:, :, None] * cols[index % cols.shape[0]][:, None, :])  # [P, H, W]
        masks = masks[None, :, None]
        return images.unsqueeze(1) * (1 - masks) + base * masks

    occluded = scores_of_copies(forward, copies, rows.shape[0] * cols.shape[0], classes, per_chunk,
                                images=True)  # [N, R*Q, K]
    drops = (scores.unsqueeze(1) - occluded).unflatten(1, (rows.shape[0], cols.shape[0]))  # [N, R, Q, K]
    total = torch.einsum("nrqk,rh,qw->nkhw", drops, rows, cols)
    return total / (rows.sum(0)[:, None] * cols.sum(0)[None, :])


class AblationCost(NamedTuple):
    """What Ablation-CAM's copies of one image take when they all run at once (an exported graph has no chunks)."""

    channels: int        # C: one ablated copy of the layer's activation per channel
    copy_bytes: int      # the C copies of the activation, and of the values below the layer the head reads
    head_bytes: int      # what the head's operations write on the C copies: at least what they keep at once
    forward_bytes: int   # what one forward of the whole model writes for one image, the same way
    forwards_worth: int  # (copy_bytes + head_bytes) / forward_bytes, rounded up: images' forwards the copies are worth

    @property
    def total_bytes(self) -> int:
        """The copies and the head's work on them: the bound an export checks."""
        return self.copy_bytes + self.head_bytes


def channel_axis(acts: Tensor, channels_last: bool) -> int:
    """The channel axis of a layer's own output: 1 for `[N, C, h, w]`, the last for tokens or channels-last maps."""
    return 1 if acts.ndim == 4 and not channels_last else -1


def ablation_cost(s: Split, image: Tensor, channels_last: bool) -> AblationCost:
    """Measure, on one image `[1, C, H, W]`, the memory Ablation-CAM's C ablated copies and the head's work on
    them take when all run at once, against one forward of the model. Each is run on one copy (image) and on two:
    what two write beyond one is what each adds (what the weights alone give, a transposed matrix say, is written
    once), and the head's and the copies' counts are taken C times."""

    def per_copy(fn: Callable[..., object], *inputs: Tensor) -> int:
        written = []
        for copies in (1, 2):
            repeated = [t.repeat_interleave(copies, 0) if _per_image(t, 1) else t for t in inputs]
            with _WrittenBytes() as mode:
                fn(*repeated)
            written.append(mode.bytes)
        return max(written[1] - written[0], 0)

    with torch.no_grad():
        acts, *carried = s.trunk(image)
        head = per_copy(s.head, acts, *carried)
        forward = per_copy(lambda x: s.head(*s.trunk(x)), image)
    channels = acts.shape[channel_axis(acts, channels_last)]
    copied = acts.numel() * acts.element_size() + sum(c.numel() * c.element_size() for c in carried if _per_image(c, 1))
    copy_bytes, head_bytes = channels * copied, channels * head
    return AblationCost(channels, copy_bytes, head_bytes, forward,
                        math.ceil((copy_bytes + head_bytes) / max(forward, 1)))


def _per_image(value: object, n: int) -> bool:
    # A value of the trunk's with the batch axis of the n images: what goes with each ablated copy of its image.
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n


class _WrittenBytes(TorchDispatchMode):
    """Counts the bytes of every new tensor an operation returns while active: not views of its inputs, nor
    results written in place."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {a.untyped_storage().data_ptr() for a in (*args, *(kwargs or {}).values()) if isinstance(a, Tensor)}
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, Tensor) and value.untyped_storage().data_ptr() not in given:
                self.bytes += value.numel() * value.element_size()
        return out
