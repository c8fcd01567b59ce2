"""What an exported Ablation-CAM takes per image (its ablated copies and what the head writes on them) on random-weight
torchvision models at 224x224, and whether export takes it: the figures of
benchmarks/results/ablation-export-cost.md.

    .venv/bin/python scripts/ablation_cost.py > benchmarks/results/ablation-export-cost.md
"""


import torch
import torchvision

from machine import machine
import fastattr
from fastattr.export import ABLATION_BYTES

CASES = [("resnet18", "layer4"), ("resnet18", "layer3"), ("resnet50", "layer4"), ("resnet50", "layer3"),
         ("vgg11_bn", "features"), ("mobilenet_v3_small", "features")]


def main() -> None:
    print("# What an exported Ablation-CAM takes per image\n")
    print(f"{machine()}; random weights, one image [1, 3, 224, 224] float32.\n")
    print("Command: `.venv/bin/python scripts/ablation_cost.py` (`Explainer.ablation_cost`). An export runs the "
          "head above the layer on all C ablated copies of each image at once; it takes Ablation-CAM when the "
          f"copies and what the head writes on them (at least what it keeps at once) fit in {ABLATION_BYTES >> 20} "
          "MiB an image (`fastattr.export.ABLATION_BYTES`). A loaded export then takes max(1, sample_batch // "
          "forwards' worth) images a call, where forwards' worth is that total over what one forward of the model "
          "writes for one image.\n")
    print("| model | layer | channels | copies MiB | head writes MiB | total MiB | a forward writes MiB | "
          "forwards' worth | exports |")
    print("|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    image = torch.rand(1, 3, 224, 224)
    for name, layer in CASES:
        net = getattr(torchvision.models, name)().eval()
        cost = fastattr.Explainer(net, layer, methods="ablationcam").ablation_cost(image)
        print(f"| {name} | {layer} | {cost.channels} | {cost.copy_bytes / 2**20:.0f} | {cost.head_bytes / 2**20:.0f} | "
              f"{cost.total_bytes / 2**20:.0f} | {cost.forward_bytes / 2**20:.0f} | {cost.forwards_worth} | "
              f"{'yes' if cost.total_bytes <= ABLATION_BYTES else 'refused'} |")


if __name__ == "__main__":
    main()
