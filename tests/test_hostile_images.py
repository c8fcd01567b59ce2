"""Image files as they come: 16-bit, rotated by an EXIF tag, long strips, malformed or fuzzed. Each is read
(`fastattr.images`, what the command line uses) and loaded (`fastattr.serve.http.load_image`, what the server
uses) to its real pixels, or refused with an error that names the reason: never a crash, never unbounded work."""

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastattr import images
from fastattr.errors import InputError
from fastattr.serve.http import RequestError, load_image

SIZE = 64
MAX_BYTES = 1_000_000
MAX_PIXELS = 100_000  # a 64 x 64 image passes; the headers the fuzzing makes up mostly do not


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: the hardest case for resampling to reproduce exactly."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, rows: bytes, color_type: int = 0) -> bytes:
    """A PNG whose header declares `width` x `height` (8-bit grey by default), with `rows` as its pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows, 9))
            + png_chunk(b"IEND", b""))


def icns_holding(png: bytes) -> bytes:
    """A macOS icon file with one 32 x 32 entry ("icp5"), a PNG."""
    entry = b"icp5" + struct.pack(">I", 8 + len(png)) + png
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def preprocessed_before(image: Image.Image, size: int) -> torch.Tensor:
    """`fastattr.images.read` before crop-first resizing: the whole image resized (shorter side to `size`,
    bicubic, Pillow's reducing gap 3), then the centre crop."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    return as_tensor(resized.crop((left, top, left + size, top + size)))


@pytest.fixture
def resized_areas(monkeypatch):
    """The area of every image Pillow's resize is asked to make, while the test runs."""
    areas: list[int] = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        areas.append(size[0] * size[1])
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return areas


# ---- long strips: the work is bounded by the output, not by the aspect ratio ----------------------------------

@pytest.mark.parametrize("width,height", [(300, 200), (200, 300), (64, 64), (65, 64), (97, 331), (1000, 750),
                                          (640, 160), (160, 1000)])
def test_a_normal_aspect_image_preprocesses_exactly_as_before(tmp_path, width, height):
    photo = noise(width, height, seed=width + height)
    path = tmp_path / "photo.png"
    photo.save(path)
    assert torch.equal(images.read(path, SIZE), preprocessed_before(photo, SIZE))
    assert torch.equal(images.decode(path.read_bytes(), SIZE), preprocessed_before(photo, SIZE))


def strip_with_a_green_middle(height: int) -> Image.Image:
    """A 1-pixel-wide strip of noise whose middle rows are one green: the only rows a centre crop shows."""
    pixels = np.random.default_rng(3).integers(0, 256, (height, 1, 3), dtype=np.uint8)
    pixels[height // 2 - 10:height // 2 + 10] = (10, 200, 30)
    return Image.fromarray(pixels)


def test_a_1x12000_png_is_read_with_bounded_work_as_its_centre(tmp_path, resized_areas):
    path = tmp_path / "strip.png"
    strip_with_a_green_middle(12000).save(path)
    image = images.read(path, SIZE)
    # The whole-image resize made a 64 x 768000 image here; only the crop is resampled now.
    assert resized_areas and max(resized_areas) <= 16 * SIZE * SIZE
    green = torch.tensor([10, 200, 30]).float().div(255).view(3, 1, 1).expand(3, SIZE, SIZE)
    assert torch.equal(image, green)


def test_a_1x12000_png_upload_is_loaded_with_bounded_work(resized_areas):
    data = png_declaring(1, 12000, b"\x00\x80" * 12000)  # a 134-byte file: grey 128 from end to end
    assert len(data) < 200
    image = load_image(data, SIZE, MAX_BYTES, MAX_PIXELS)
    assert max(resized_areas) <= 16 * SIZE * SIZE
    assert torch.equal(image, torch.full((3, SIZE, SIZE), 128 / 255))


def test_a_strip_is_cropped_to_what_the_whole_image_resize_gave(tmp_path):
    # A 1-pixel-wide strip: short enough for the old whole-image resize, long enough for the crop-first one.
    strip = noise(1, 2000, seed=4)
    path = tmp_path / "strip.png"
    strip.save(path)
    assert torch.equal(images.read(path, SIZE), preprocessed_before(strip, SIZE))


# ---- 16-bit and EXIF-rotated images: their real pixels -------------------------------------------------------

def test_a_16_bit_png_decodes_to_its_real_values(tmp_path):
    gradient = np.add.outer(np.arange(SIZE), np.arange(SIZE)).astype(np.uint8) * 2  # 0..252, 8-bit grey
    eight, sixteen = tmp_path / "eight.png", tmp_path / "sixteen.png"
    Image.fromarray(gradient).save(eight)
    Image.fromarray(gradient.astype(np.uint16) * 257).save(sixteen)  # 0..255 scaled to 0..65535
    with Image.open(sixteen) as opened:
        assert opened.mode == "I;16"
    decoded = images.read(sixteen, SIZE)
    assert torch.equal(decoded, torch.from_numpy(gradient).float().div(255).expand(3, SIZE, SIZE))
    assert torch.equal(images.read(sixteen, 32), images.read(eight, 32))  # and resized as the 8-bit image is
    assert torch.equal(images.decode(sixteen.read_bytes(), 32), images.read(eight, 32))


def test_16_bit_values_between_8_bit_steps_round_to_the_nearest(tmp_path):
    levels = np.array([[0, 128, 129, 257, 65535 - 129, 65535]], dtype=np.uint16).repeat(6, 0)
    path = tmp_path / "levels.png"
    Image.fromarray(levels).save(path)
    assert images.read(path, 6)[0, 0].mul(255).round().tolist() == [0, 0, 1, 1, 254, 255]


# The two ways in: a file the command line reads, and the bytes a request to the server carries.
READERS = {"read": lambda path, size: images.read(path, size),
           "server": lambda path, size: load_image(path.read_bytes(), size, MAX_BYTES, MAX_PIXELS)}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("orientation,red_half", [(6, "top"), (8, "bottom")])
def test_an_exif_rotated_jpeg_is_read_as_it_is_shown(tmp_path, orientation, red_half, reader):
    # Stored 64 wide and 32 high, left half red: a camera held upright writes this with orientation 6 or 8.
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "upright.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as jpeg:  # the decoded pixels, turned as a viewer turns them
        turn = Image.Transpose.ROTATE_270 if orientation == 6 else Image.Transpose.ROTATE_90
        shown = jpeg.convert("RGB").transpose(turn)
    assert shown.size == (32, 64)
    image = READERS[reader](path, 32)  # the centre 32 x 32 of the 32 x 64 photo as shown
    assert torch.equal(image, as_tensor(shown.crop((0, 16, 32, 48))))
    top, bottom = image[:, :16].mean((1, 2)), image[:, 16:].mean((1, 2))
    red, blue = (top, bottom) if red_half == "top" else (bottom, top)
    assert red[0] > 0.9 and red[2] < 0.1 and blue[2] > 0.9 and blue[0] < 0.1


# ---- malformed files: refused with the decoder's reason ------------------------------------------------------

def icns_with_a_broken_png() -> bytes:
    data = bytearray(icns_holding(encoded(noise(32, 32))))
    data[data.find(b"IHDR") + 4] ^= 0xFF  # the embedded PNG's header no longer matches its checksum
    return bytes(data)


def dds_with_unknown_pixel_flags() -> bytes:
    data = bytearray(encoded(noise(16, 16), "DDS"))
    data[80:84] = struct.pack("<I", 1)  # the pixel format's flags: alpha only, a format no decoder knows
    return bytes(data)


MALFORMED = {  # name: (the file's bytes, the decoder's exception)
    "icns-with-a-broken-png": (icns_with_a_broken_png, "SyntaxError"),
    "dds-with-unknown-pixel-flags": (dds_with_unknown_pixel_flags, "NotImplementedError"),
    "dds-without-its-pixels": (lambda: encoded(noise(16, 16), "DDS")[:150], "ValueError"),
    "truncated-dds-header": (lambda: encoded(noise(16, 16), "DDS")[:100], "OSError"),
    "png-declaring-30000x30000": (lambda: png_declaring(30000, 30000, b"\x00" * 100, 2), "DecompressionBombError"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_file_is_an_input_error_naming_the_decoders_reason(tmp_path, name):
    make, reason = MALFORMED[name]
    path = tmp_path / "photo.png"
    path.write_bytes(make())
    with pytest.raises(InputError, match=rf"^'{path}': not a readable image \({reason}: .+\)$"):
        images.read(path, SIZE)
    with pytest.raises(InputError, match=rf"^image data: not a readable image \({reason}: .+\)$"):
        images.decode(path.read_bytes(), SIZE)


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_upload_is_a_4xx_naming_the_reason(name):
    make, reason = MALFORMED[name]
    with pytest.raises(RequestError) as refused:
        load_image(make(), SIZE, MAX_BYTES, MAX_PIXELS)
    if reason == "DecompressionBombError":  # the header alone declares too many pixels
        assert refused.value.status == 413 and "900000000 pixels" in refused.value.message
        assert "max_pixels" in refused.value.message
    else:
        assert refused.value.status == 400
        assert refused.value.message.startswith(f"image data: not a readable image ({reason}: ")


@pytest.mark.parametrize("error", [SyntaxError("broken"), NotImplementedError("unknown mode"), struct.error("short"),
                                   ValueError("bad"), OSError("truncated"), IndexError("index"), KeyError("tag"),
                                   TypeError("not an int"),
                                   Image.DecompressionBombError("too many pixels")])
def test_any_exception_a_decoder_raises_is_the_files_fault(monkeypatch, error):
    data = encoded(noise(SIZE, SIZE))

    def failing(self):
        raise error

    monkeypatch.setattr("PIL.PngImagePlugin.PngImageFile.load", failing)
    with pytest.raises(InputError, match=rf"^image data: not a readable image \({type(error).__name__}: "):
        images.decode(data, SIZE)
    with pytest.raises(RequestError) as refused:
        load_image(data, SIZE, MAX_BYTES, MAX_PIXELS)
    assert refused.value.status == 400 and type(error).__name__ in refused.value.message


def fuzzed(data: bytes, seed: int, cases: int) -> list[bytes]:
    """`data` cut short at every few bytes of its start, and with a few of its first bytes (the header) changed."""
    rng = random.Random(seed)
    out = [data[:n] for n in range(0, min(len(data), 300), 5)]
    for _ in range(cases):
        changed = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            changed[rng.randrange(min(len(changed), 160))] = rng.randrange(256)
        out.append(bytes(changed))
    return out


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # a made-up header, answered 413
@pytest.mark.parametrize("fmt", ["ICNS", "DDS", "PNG"])
def test_a_fuzzed_upload_is_explained_or_refused_with_a_4xx_never_a_crash(fmt):
    good = icns_holding(encoded(noise(32, 32))) if fmt == "ICNS" else encoded(noise(32, 32), fmt)
    statuses = []
    for data in fuzzed(good, seed=len(fmt), cases=150):
        try:
            image = load_image(data, SIZE, MAX_BYTES, MAX_PIXELS)
        except RequestError as exc:
            statuses.append(exc.status)
            assert exc.message.startswith("image")
            assert exc.status == 413 or "not a readable image (" in exc.message or "no image" in exc.message
        else:
            statuses.append(200)
            assert image.shape == (3, SIZE, SIZE) and 0 <= image.min() <= image.max() <= 1
    assert set(statuses) <= {200, 400, 413} and statuses.count(400) > 10
