"""ROAD's noisy linear imputation (`fastattr.imputation`) on the 18 removals ROADCombined makes of one 224x224
image (most and least relevant first at 10, 20, ..., 90 %): for each float32 tolerance, the V-cycles run, the
largest difference from the float64 solution and the seconds a call takes; pytorch-grad-cam's scipy solve of the
same 18 removals beside it. The figures of benchmarks/results/road-imputation.md.

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
