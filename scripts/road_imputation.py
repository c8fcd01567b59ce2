"""ROAD's noisy linear imputation (`fastattr.imputation`) on the 18 removals ROADCombined makes of one 224x224
image (most and least relevant first at 10, 20, ..., 90 %): for each float32 tolerance, the V-cycles run, the
largest difference from the float64 solution and the seconds a call takes; the fine grid's operations in two
layouts and forms; pytorch-grad-cam's scipy solve of the same 18 removals beside it. The figures of
benchmarks/results/road-imputation.md.

    .venv/bin/python scripts/road_imputation.py > benchmarks/results/road-imputation.md
"""

import statistics
import time

import torch
import torch.nn.functional as F

from machine import machine
from fastattr import imputation
from fastattr.imputation import noisy_linear_imputation
from fastattr.metrics import ROAD_PERCENTILES

TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def removals() -> tuple[torch.Tensor, torch.Tensor]:
    """A random image repeated 18 times and ROAD's 18 masks from a smooth map (a 7x7 grid resized, as a layer4
    Grad-CAM is), thresholded as `fastattr.metrics.road` does."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 224, 224, generator=g)
    flat = F.interpolate(torch.rand(1, 1, 7, 7, generator=g), size=(224, 224), mode="bilinear").flatten()
    q = torch.tensor([p / 100 for p in ROAD_PERCENTILES])
    masks = [flat >= t for t in flat.quantile(q)] + [1 - flat >= t for t in (1 - flat).quantile(q)]
    return image.expand(len(masks), -1, -1, -1).contiguous(), torch.stack(masks).view(-1, 1, 224, 224)


def cycles(images: torch.Tensor, removed: torch.Tensor, tolerance: float) -> int:
    count, v_cycle = [0], imputation._v_cycle

    def counted(levels, r, depth=0):
        count[0] += depth == 0
        return v_cycle(levels, r, depth)

    imputation._v_cycle = counted
    try:
        noisy_linear_imputation(images, removed, noise=0.0, tolerance=tolerance)
    finally:
        imputation._v_cycle = v_cycle
    return count[0]


def seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def operations() -> None:
    """The fine grid's operations of the solve, each in two ways and two layouts of the same 54 systems (18 images
    of 3 channels): `[18, 3, H, W]` and `[1, 54, H, W]` (fastattr.imputation's), both channels-last. Milliseconds,
    the median of 20 calls, interleaved."""
    def ms(fn) -> float:
        fn()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    stencil = torch.tensor(imputation.NEIGHBOUR_WEIGHTS)
    rows = []
    for shape in ((18, 3), (1, 54)):
        g = torch.Generator().manual_seed(1)
        fine = torch.rand(*shape, 224, 224, generator=g).contiguous(memory_format=torch.channels_last)
        coarse = torch.rand(*shape, 112, 112, generator=g).contiguous(memory_format=torch.channels_last)
        c = shape[1]
        block = torch.ones(c, 1, 2, 2)
        ones = torch.ones(shape[0], 1, 224 * 224)
        rows.append((shape, {
            "3x3 stencil (depthwise convolution)": ms(lambda: F.conv2d(fine, stencil.expand(c, 1, 3, 3), padding=1,
                                                                       groups=c)),
            "restriction by 2x2 sum pooling": ms(lambda: F.avg_pool2d(fine, 2, ceil_mode=True, divisor_override=1)),
            "restriction by a strided 2x2 convolution of ones": ms(lambda: F.conv2d(fine, block, stride=2, groups=c)),
            "prolongation by nearest upsampling": ms(lambda: F.interpolate(coarse, size=(224, 224), mode="nearest")),
            "prolongation by a transposed 2x2 convolution": ms(lambda: F.conv_transpose2d(coarse, block, stride=2,
                                                                                         groups=c)),
            "dot product per system by `sum` over the pixels": ms(lambda: (fine * fine).sum((2, 3))),
            "dot product per system by a product with ones": ms(
                lambda: ones @ (fine * fine).permute(0, 2, 3, 1).reshape(shape[0], 224 * 224, c)),
        }))
    print("\nThe fine grid's operations of one step, on these 18 removals' 54 (image, channel) systems laid out as "
          "18 images of 3 channels or as one image of 54 channels, both channels-last; milliseconds a call (median of "
          "20). fastattr uses the second layout, pooling, upsampling and the product with ones.\n")
    print(f"| operation | {' | '.join(f'[{a}, {b}, 224, 224]' for (a, b), _ in rows)} |")
    print("|---|---|---|")
    for name in rows[0][1]:
        print(f"| {name} | {' | '.join(f'{times[name]:.2f}' for _, times in rows)} |")


def main() -> None:
    images, removed = removals()
    exact = noisy_linear_imputation(images.double(), removed, noise=0.0)
    print("# ROAD's noisy linear imputation: tolerance, accuracy and time\n")
    print(f"{machine()}, {torch.get_num_threads()} threads.\n")
    print("Command: `.venv/bin/python scripts/road_imputation.py`. One random 224x224 image and the 18 removals of "
          "pytorch-grad-cam's `ROADCombined` (most and least relevant first at 10, 20, ..., 90 %) of a smooth "
          "map, solved as one batch `[18, 3, 224, 224]` without noise. 'Largest difference' is from the float64 "
          "solution at its default tolerance (1e-10); the time is the median of 5 calls.\n")
    print("| float32 tolerance | V-cycles | largest difference from float64 | seconds a call |")
    print("|---|---|---|---|")
    for tolerance in TOLERANCES:
        got = noisy_linear_imputation(images, removed, noise=0.0, tolerance=tolerance)
        took = seconds(lambda: noisy_linear_imputation(images, removed, noise=0.0, tolerance=tolerance))
        print(f"| {tolerance:g}{' (default)' if tolerance == 1e-4 else ''} | {cycles(images, removed, tolerance)} | "
              f"{(got.double() - exact).abs().max().item():.1e} | {took:.2f} |")
    operations()
    try:
        from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    except ImportError:
        return
    imputer = NoisyLinearImputer(noise=0.0)

    def theirs():
        return torch.stack([imputer(images[i], (~removed[i, 0]).float()) for i in range(len(images))])

    took = seconds(theirs, repeats=1)
    print(f"\npytorch-grad-cam's `NoisyLinearImputer` (a scipy sparse solve per removal, on the host) on the same 18 "
          f"removals: {took:.2f} s, largest difference from the float64 solution "
          f"{(theirs().double() - exact).abs().max().item():.1e}.")


if __name__ == "__main__":
    main()
