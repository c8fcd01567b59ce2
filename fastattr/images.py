"""Image files in, model-ready batches out: finding, reading, resizing and normalising.

>>> display = fastattr.images.read("examples/chelsea.png", size=224)   # [3, 224, 224] in [0, 1]
>>> batch = fastattr.images.normalize(display[None])                  # ImageNet mean / std
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import InputError
from .zoo import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["find", "read", "decode", "normalize"]


def _image_suffixes() -> set[str]:
    from PIL import Image

    return set(Image.registered_extensions())


def find(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(files to read, files passed over). A file named is always read, so that a non-image named by the user
    is reported; a folder contributes its files with an image suffix Pillow knows (recursively, sorted,
    hidden ones skipped), and its other files are passed over — a README beside the photos is no error."""
    found: list[Path] = []
    passed_over: list[Path] = []
    suffixes = _image_suffixes()
    for path in map(Path, paths):
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts):
                    (found if p.suffix.lower() in suffixes else passed_over).append(p)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{str(path)!r}: no such file or folder")
    return found, passed_over


def read(path: str | Path, size: int = 224) -> Tensor:
    """An image file as RGB `[3, size, size]` float32 in [0, 1]: the shorter side resized to `size`, then the
    centre cropped, as ImageNet models are evaluated. Raises InputError for a file that is not a readable image."""
    return _resize_crop(_open_rgb(path, repr(str(path))), size)


def decode(data: bytes, size: int = 224) -> Tensor:
    """`read` for an image file's bytes (an upload, say): RGB `[3, size, size]` float32 in [0, 1], resized and
    cropped exactly as `read` does. Raises InputError for data that is not a readable image, truncated ones too.

    >>> image = fastattr.images.decode(Path("examples/chelsea.png").read_bytes(), size=224)  # doctest: +SKIP
    """
    return _resize_crop(_open_rgb(io.BytesIO(data), "image data"), size)


def _open_rgb(source, name: str):
    """Decode `source` (a path or a binary file object) fully into an RGB `PIL.Image`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = re.sub(r"<_io\.BytesIO object at \w+>", "the data", str(exc))  # an upload's address says nothing
        raise InputError(f"{name}: not a readable image ({type(exc).__name__}: {reason})") from None


def _resize_crop(rgb, size: int) -> Tensor:
    """The shorter side of `rgb` resized to `size` (bicubic), then the centre `size` x `size` crop as a tensor."""
    from PIL import Image

    scale = size / min(rgb.size)
    width, height = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
    rgb = rgb.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float().div_(255)


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """`(images - mean) / std` per channel, for `[N, 3, H, W]` images in [0, 1]."""
    mean_ = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_ = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_) / std_
