"""`fastattr explain` on bad options, bad outputs and hostile files: a usage error (exit 2, "fastattr: error:" on
stderr) before any work, or the file skipped and reported (exit 1) while the others are explained."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastattr import cli

EXAMPLES = Path(__file__).parents[1] / "examples"
TINY = ["--model", "resnet18", "--input-size", "64", "--methods", "gradcam", "--k", "1", "--no-progress"]


def photo(path: Path, seed: int = 0, size: tuple[int, int] = (80, 64)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares `width` x `height` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + png_chunk(b"IEND", b""))


def explain(*args: str) -> int:
    return cli.main(["explain", *map(str, args)])


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# ---- usage errors: exit 2 with a message, before the model loads and before anything is written ------------------

@pytest.mark.parametrize("batch_size", ["0", "-1"])
def test_a_batch_size_below_one_is_a_usage_error(tmp_path, capsys, batch_size):
    out = tmp_path / "out"
    assert explain(EXAMPLES / "coffee.png", "--batch-size", batch_size, "-o", out) == 2
    assert capsys.readouterr().err == f"fastattr: error: --batch-size: expected an int >= 1, got {batch_size}\n"
    assert not out.exists()


def test_an_output_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"someone's file")
    assert explain(EXAMPLES / "coffee.png", "-o", taken) == 2
    assert capsys.readouterr().err == (f"fastattr: error: -o {str(taken)!r}: it is a file, not a folder; name a folder "
                                       "for the PNGs and results.jsonl (it is created if missing)\n")
    assert taken.read_bytes() == b"someone's file"


def test_an_output_under_a_file_is_a_usage_error_naming_the_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "out"
    assert explain(EXAMPLES / "coffee.png", "-o", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastattr: error: -o {str(out)!r}: {str(tmp_path / 'notes.txt')!r} is a file, not a folder")


def test_an_output_in_a_folder_without_write_permission_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # The permission bits are read with os.access, which says yes to root whatever the bits: answer as for a user.
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != tmp_path / "locked")
    (tmp_path / "locked").mkdir()
    assert explain(EXAMPLES / "coffee.png", "-o", tmp_path / "locked" / "out") == 2
    assert "cannot write in" in (err := capsys.readouterr().err) and "permission denied" in err
    assert not (tmp_path / "locked" / "out").exists()


def test_an_input_with_no_images_is_a_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert explain(empty, "-o", tmp_path / "out") == 2
    assert capsys.readouterr().err == (f"fastattr: error: no image files in {str(empty)!r}; give image files, or "
                                       "folders that hold them\n")
    (empty / "README.md").write_text("notes")
    assert explain(empty, "-o", tmp_path / "out") == 2
    assert "and 1 files without an image suffix were passed over" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_the_input_folder_is_refused(tmp_path, capsys):
    photos = tmp_path / "photos"
    photo(photos / "cat.png")
    assert explain(photos, "-o", photos) == 2
    assert "is both an input folder and the output folder" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == ["cat.png"]


# ---- runs: the output folder is not input, and a hostile file is skipped while the others are explained ---------

def test_an_output_folder_inside_the_input_folder_is_not_read_on_the_next_run(tmp_path, capsys):
    photos = tmp_path / "photos"
    photo(photos / "cat.png", 1), photo(photos / "dog.png", 2)
    out = photos / "explained"
    for run in range(2):
        assert explain(photos, *TINY, "-o", out) == 0
        assert "wrote 2 images" in capsys.readouterr().out
        assert [Path(line["file"]).name for line in results(out)] == ["cat.png", "dog.png"]
    assert sorted(p.name for p in out.iterdir()) == ["cat.png", "dog.png", "results.jsonl"]


def test_a_png_declaring_30000x30000_is_skipped_and_the_other_photos_explained(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(30000, 30000))
    good = tmp_path / "good.jpg"
    Image.open(photo(tmp_path / "good.png", 3)).save(good)
    out = tmp_path / "out"
    assert explain(bomb, good, *TINY, "-o", out) == 1
    captured = capsys.readouterr()
    assert "wrote 1 images" in captured.out
    assert "skipped 1 files:" in captured.err
    assert f"{str(bomb)!r}: not a readable image (DecompressionBombError: Image size (900000000 pixels)" in captured.err
    assert [line["file"] for line in results(out)] == [str(good)]


def test_a_file_named_with_a_newline_is_explained_with_its_batch(tmp_path, capsys):
    photos = tmp_path / "photos"
    odd, plain = photo(photos / "two\nlines.png", 4), photo(photos / "plain.png", 5)
    out = tmp_path / "out"
    assert explain(photos, *TINY, "--batch-size", "2", "-o", out) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert [line["file"] for line in results(out)] == [str(plain), str(odd)]
    with Image.open(out / "two\nlines.png") as grid:
        assert grid.width > 2 * 64


def test_a_png_that_cannot_be_written_is_reported_and_the_others_written(tmp_path, capsys):
    photos = tmp_path / "photos"
    photo(photos / "cat.png", 6), photo(photos / "dog.png", 7)
    out = tmp_path / "out"
    (out / "cat.png").mkdir(parents=True)  # a folder where the cat's PNG goes
    assert explain(photos, *TINY, "-o", out) == 1
    err = capsys.readouterr().err
    assert "skipped 1 files:" in err and f"cannot write its PNG {str(out / 'cat.png')!r} (Is a directory)" in err
    assert [Path(line["file"]).name for line in results(out)] == ["dog.png"]


def test_a_1x12000_png_is_explained_as_its_centre_with_bounded_work(tmp_path, capsys, monkeypatch):
    areas: list[int] = []  # of the images Pillow's resize is asked to make
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *args, **kwargs: (
        areas.append(size[0] * size[1]), resize(self, size, *args, **kwargs))[1])
    strip = np.zeros((12000, 1, 3), dtype=np.uint8)
    strip[5990:6010] = (10, 200, 30)  # only the centre shows in the centre crop
    Image.fromarray(strip).save(tmp_path / "strip.png")
    out = tmp_path / "out"
    assert explain(tmp_path / "strip.png", *TINY, "-o", out) == 0
    assert max(areas) <= 16 * 64 * 64  # the whole-image resize made a 64 x 768000 image here
    with Image.open(out / "strip.png") as grid:  # the photo tile, under its caption, is the strip's green centre
        tile = np.asarray(grid.convert("RGB"))
    assert (tile == (10, 200, 30)).all(-1).sum() >= 64 * 64
