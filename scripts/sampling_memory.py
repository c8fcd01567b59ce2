"""One SmoothGrad or Integrated Gradients call on a random-weight torchvision model at 224x224, for timing and
peak memory measured from outside (farm-bench): the figures of benchmarks/results/sampling-memory.md.

    .venv/bin/python scripts/sampling_memory.py resnet50 ig --points 32 --batch 8                  # chunked (16)
    .venv/bin/python scripts/sampling_memory.py resnet50 ig --points 32 --batch 1 --sample-batch 0  # one pass
    .venv/bin/python scripts/sampling_memory.py resnet50 ig --points 32 --batch 8 --captum 16      # captum's
"""

import argparse
import resource

import torch
import torchvision

import fastattr
from fastattr.explain import SAMPLE_BATCH


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("method", choices=("ig", "smoothgrad"))
    parser.add_argument("--points", type=int, default=32, help="IG's steps or SmoothGrad's samples")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sample-batch", type=int, default=SAMPLE_BATCH, help="0: all points in one pass")
    parser.add_argument("--captum", type=int, metavar="INTERNAL_BATCH_SIZE",
                        help="run captum's IntegratedGradients / NoiseTunnel(Saliency) instead")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = getattr(torchvision.models, args.model)().eval()
    x = torch.randn(args.batch, 3, 224, 224)
    if args.captum is not None:
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

        target = net(x).argmax(1)
        if args.method == "ig":
            IntegratedGradients(net).attribute(x, target=target, n_steps=args.points,
                                               internal_batch_size=args.captum)
        else:  # NoiseTunnel has no internal batch: it folds every sample into one batch
            NoiseTunnel(Saliency(net)).attribute(x, target=target, nt_type="smoothgrad", nt_samples=args.points,
                                                 nt_samples_batch_size=args.captum, stdevs=0.15, abs=True)
    else:
        explainer = fastattr.Explainer(net, methods=(args.method,), samples=args.points, steps=args.points,
                                       sample_batch=args.sample_batch or None)
        explainer(x)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
