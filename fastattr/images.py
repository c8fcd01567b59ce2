"""Image files in, model-ready batches out: finding, reading, resizing and normalising.

>>> display = fastattr.images.read("examples/chelsea.png", size=224)   # [3, 224, 224] in [0, 1]
>>> batch = fastattr.images.normalize(display[None])                  # ImageNet mean / std
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .zoo import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["find", "read", "decode", "normalize"]


def _image_suffixes() -> set[str]:
    from PIL import Image

    return set(Image.registered_extensions())


def find(paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> tuple[list[Path], list[Path]]:
    """(files to read, files passed over). A file named is always read, so that a non-image named by the user
    is reported; a folder contributes its files with an image suffix Pillow knows (recursively, sorted,
    hidden ones skipped), and its other files are passed over — a README beside the photos is no error.
    Folders in `exclude` are not searched: an output folder inside an input folder holds PNGs that are not
    photos."""
    found: list[Path] = []
    passed_over: list[Path] = []
    suffixes = _image_suffixes()
    excluded = [Path(p).resolve() for p in exclude]
    for path in map(Path, paths):
        if path.is_dir():
            skipped = _parts_inside(path, excluded)
            for p in sorted(path.rglob("*")):
                parts = p.relative_to(path).parts
                if p.is_file() and not any(part.startswith(".") for part in parts) \
                        and not any(parts[:len(s)] == s for s in skipped):
                    (found if p.suffix.lower() in suffixes else passed_over).append(p)
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{str(path)!r}: no such file or folder")
    return found, passed_over


def _parts_inside(folder: Path, excluded: Sequence[Path]) -> list[tuple[str, ...]]:
    """The path parts, relative to `folder`, of the excluded folders inside it."""
    resolved = folder.resolve()
    return [e.relative_to(resolved).parts for e in excluded if e != resolved and e.is_relative_to(resolved)]


def read(path: str | Path, size: int = 224) -> Tensor:
    """An image file as RGB `[3, size, size]` float32 in [0, 1]: the shorter side resized to `size`, then the
    centre cropped, as ImageNet models are evaluated. The image is turned as its EXIF orientation says, 16-bit
    values are scaled to [0, 1], and the work is bounded by `size` whatever the aspect ratio. Raises InputError
    for a file that is not a readable image, whatever its decoder raised."""
    return _resize_crop(_open_rgb(path, repr(str(path))), size)


def decode(data: bytes, size: int = 224) -> Tensor:
    """`read` for an image file's bytes (an upload, say): RGB `[3, size, size]` float32 in [0, 1], resized and
    cropped exactly as `read` does. Raises InputError for data that is not a readable image, truncated or
    malformed ones too.

    >>> image = fastattr.images.decode(Path("examples/chelsea.png").read_bytes(), size=224)  # doctest: +SKIP
    """
    return _resize_crop(_open_rgb(io.BytesIO(data), "image data"), size)


def _open_rgb(source, name: str):
    """Decode `source` (a path or a binary file object) fully into an RGB `PIL.Image`, upright and 8-bit."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            ImageOps.exif_transpose(image, in_place=True)  # a camera's orientation tag: the photo as it is shown
            rgb = _eight_bit(image).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on malformed data (SyntaxError,
        # NotImplementedError, struct.error, DecompressionBombError, ...); each means the data is not a readable image
        reason = re.sub(r"<_io\.BytesIO object at \w+>", "the data", str(exc))  # an upload's address says nothing
        raise InputError(f"{name}: not a readable image ({type(exc).__name__}: {reason})") from None
    if not rgb.width or not rgb.height:
        raise InputError(f"{name}: not a readable image (it has {rgb.width}x{rgb.height} pixels)")
    return rgb


# Pillow's modes for 16-bit grey (a 16-bit PNG opens as "I;16"), and its 32-bit integer mode, which some decoders
# give 16-bit data in. Its RGB conversion clips their values at 255, so that all but the darkest pixels are white.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _eight_bit(image):
    """`image`, with 16-bit values 0..65535 scaled to 0..255 (rounded to the nearest step) in an "L" image."""
    from PIL import Image

    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    values = np.asarray(image).clip(0, 65535).astype(np.uint32)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))  # round(v * 255 / 65535)


# Pillow's resize first shrinks by a whole factor while the image is this many times the output or more.
_REDUCING_GAP = 3.0
# Resizing the whole image, then cropping, makes an image of the output's area times the aspect ratio: kept while
# that is at most this many outputs, so that ordinary photos give the very pixels they always gave; beyond it only
# the crop is resampled, so that a long strip costs what a square does.
_WHOLE_RESIZE_MAX_OUTPUTS = 16


def _resize_crop(rgb, size: int) -> Tensor:
    """The shorter side of `rgb` resized to `size` (bicubic), then the centre `size` x `size` crop as a tensor."""
    from PIL import Image

    scale = size / min(rgb.size)
    width, height = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    if width * height <= _WHOLE_RESIZE_MAX_OUTPUTS * size * size:
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=_REDUCING_GAP)
        rgb = rgb.crop((left, top, left + size, top + size))
    else:  # the crop, in the source's pixels, resampled alone: the same scale and centre, bounded work
        x_scale, y_scale = rgb.width / width, rgb.height / height
        box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float().div_(255)


def normalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """`(images - mean) / std` per channel, for `[N, 3, H, W]` images in [0, 1]."""
    mean_ = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_ = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_) / std_
