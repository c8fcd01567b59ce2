"""fastattr in one run: explain a batch, check it against the article's code, time both, save the maps.

    .venv/bin/python scripts/demo.py [--model resnet18] [--layer layer4] [--batch 8] [--size 224] [--k 3] [-o out]

The model has random weights (nothing is downloaded), so the maps show what the network attends to,
not objects; what the run shows is that fastattr's maps equal the article's and how much faster they come.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

import fastattr
from fastattr import reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layer", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("-o", "--out", type=Path, default=Path("out"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    images = torch.randn(args.batch, 3, args.size, args.size)
    explainer = fastattr.Explainer(model, layer=args.layer, methods=("gradcam", "saliency"))
    explainer(images[:1], k=args.k)  # warm-up

    start = time.perf_counter()
    out = explainer(images, k=args.k)
    fast_s = time.perf_counter() - start
    print(f"{explainer}\nlogits {list(out.logits.shape)}, classes {list(out.classes.shape)}, "
          + ", ".join(f"{name} {list(m.shape)}" for name, m in out.maps.items()))

    layer = model.get_submodule(explainer.layer)
    classes = out.classes[0].tolist()
    start = time.perf_counter()
    cams = [reference.GradCAM(model, layer)(images[:1], c)[0] for c in classes]
    sals = [reference.compute_saliency_map(model, images[:1], c) for c in classes]
    ref_s = time.perf_counter() - start

    at_layer = fastattr.explain(model, images[:1], layer=explainer.layer, classes=classes, upsample=False)
    gradcam_diff = max(float(np.abs(at_layer.maps["gradcam"][0, j].numpy() - cam).max()) for j, cam in enumerate(cams))
    saliency_diff = max(float(np.abs(out.maps["saliency"][0, j].numpy() - sal).max()) for j, sal in enumerate(sals))
    n_fast, n_ref = 2 * args.batch * args.k, 2 * args.k
    print(f"fastattr:       {n_fast} maps ({args.batch} images x top-{args.k} x 2 methods) in {fast_s:.2f} s: "
          f"{n_fast / fast_s:.1f} maps/s")
    print(f"article's code: {n_ref} maps (image 0 x top-{args.k} x 2 methods) in {ref_s:.2f} s: {n_ref / ref_s:.1f} maps/s")
    print(f"max |fastattr - article| on image 0's normalised maps: Grad-CAM {gradcam_diff:.1e}, saliency {saliency_diff:.1e}")

    args.out.mkdir(parents=True, exist_ok=True)
    rows = [np.concatenate([out.maps[m][n, j].numpy() for m in ("gradcam", "saliency") for j in range(args.k)], 1)
            for n in range(min(args.batch, 4))]
    grid = (np.concatenate(rows, 0) * 255).astype(np.uint8)
    path = args.out / "demo.png"
    Image.fromarray(grid).save(path)
    print(f"wrote {path}: rows are images, columns Grad-CAM then saliency for each of the top-{args.k} classes")


if __name__ == "__main__":
    main()
