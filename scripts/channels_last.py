"""Plain inference of random-weight torchvision models on a batch of 16 images at 224x224, the images contiguous
or channels-last (the model left as it is), rounds interleaved: why the perturbation passes send their copies
channels-last on CPU (`fastattr.graph.scores_of_copies`). The figures of benchmarks/results/channels-last.md.

    .venv/bin/python scripts/channels_last.py > benchmarks/results/channels-last.md
"""

import statistics
import time

import torch
import torchvision

from machine import machine

MODELS = ("resnet18", "resnet50", "mobilenet_v3_small", "vgg11_bn")
ROUNDS = 5
BATCH = 16


def main() -> None:
    print("# Channels-last images on CPU\n")
    print(f"{machine()}, {torch.get_num_threads()} threads.\n")
    print(f"Command: `.venv/bin/python scripts/channels_last.py`. Plain inference (`torch.no_grad`) of a batch of "
          f"{BATCH} random images [16, 3, 224, 224] float32, random weights; the same model object takes the images "
          f"contiguous and channels-last in turn, {ROUNDS} rounds interleaved after a warm-up; median images/s.\n")
    print("| model | contiguous images/s | channels-last images/s | ratio | largest logit difference |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for name in MODELS:
        model = getattr(torchvision.models, name)().eval()
        x = torch.rand(BATCH, 3, 224, 224)
        layouts = {"contiguous": x, "channels-last": x.contiguous(memory_format=torch.channels_last)}
        times = {k: [] for k in layouts}
        with torch.no_grad():
            for images in layouts.values():
                model(images)
            for _ in range(ROUNDS):
                for key, images in layouts.items():
                    start = time.perf_counter()
                    model(images)
                    times[key].append(time.perf_counter() - start)
            difference = (model(layouts["contiguous"]) - model(layouts["channels-last"])).abs().max().item()
        rate = {k: BATCH / statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {rate['contiguous']:.1f} | {rate['channels-last']:.1f} | "
              f"{rate['channels-last'] / rate['contiguous']:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
