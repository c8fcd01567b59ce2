"""A `.pt2` file can run code as it is loaded, so fastattr loads one only when told the file is trusted.

An AOTInductor package holds a shared library, and loading the package loads the library: its constructors
run. `torch.export.load` unpickles parts of a program archive (falling back to an unrestricted unpickler
when the restricted one refuses) and evaluates its shape expressions. The crafted files here do what an
attacker's would, write a marker file, and the tests check that no marker appears unless `trusted=True`;
with it, the marker does appear, which shows each crafted file really would have run code.
"""

import argparse
import gc
import glob
import importlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import fastattr
from fastattr import cli
from fastattr.export import FORMAT
from fastattr.options import add_spec_arguments, spec_from_args
from fastattr.pipeline import Spec, build
from models import images, two_conv_net

EXAMPLES = Path(__file__).parents[1] / "examples"
# A valid fastattr metadata, so that a refusal can only come from the trust rule.
META = {"format": FORMAT, "methods": ["gradcam"], "k": 1, "layer": "layer4", "input_shape": [3, 8, 8],
        "dtype": "float32", "num_classes": 2, "with_classes": False, "inputs": ["images"],
        "outputs": ["logits", "classes", "gradcam"], "samples": 1, "seed": 0, "noise": 0.0, "steps": 1}
CONSTRUCTOR = """#include <stdio.h>
__attribute__((constructor)) static void mark(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the package's library was loaded", f); fclose(f); }
}
"""


def temporary_folders() -> set[str]:
    """The folders torch's AOTInductor loader and fastattr's loading make in the temporary folders."""
    folders = {tempfile.gettempdir(), "/tmp"}
    return {p for folder in folders for pattern in ("aotinductor_*", "fastattr-aoti-*")
            for p in glob.glob(os.path.join(folder, pattern))}


@pytest.fixture
def no_folder_left():
    """Fails the test if it leaves a new loader folder behind."""
    before = temporary_folders()
    yield
    gc.collect()  # a released package removes its folder when it is collected
    assert temporary_folders() - before == set()


def aoti_archive(path: Path, library: bytes, metadata: dict | None = None, extra: dict[str, str] | None = None) -> Path:
    """A zip archive laid out as torch writes an AOTInductor package, holding `library` as its compiled model."""
    metadata = {"fastattr": json.dumps(META), "AOTI_DEVICE_KEY": "cpu"} if metadata is None else metadata
    folder = "crafted/data/aotinductor/model/"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in (("archive_format", "pt2"), ("archive_version", "0"), (".data/version", "6\n"),
                           ("byteorder", "little"), *(extra or {}).items()):
            archive.writestr(f"crafted/{name}", text)
        archive.writestr(folder + "crafted.wrapper.cpp", "// the library below is this file compiled\n")
        archive.writestr(folder + "crafted.wrapper_metadata.json", json.dumps(metadata))
        archive.writestr(folder + "crafted.wrapper.so", library)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "marker.txt"


@pytest.fixture
def crafted_package(tmp_path, marker) -> Path:
    """An AOTInductor-like package whose library writes `marker` when it is loaded."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler to build the crafted package's library")
    source = tmp_path / "constructor.c"
    source.write_text(CONSTRUCTOR)
    library = tmp_path / "constructor.so"
    subprocess.run([compiler, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(library), str(source)],
                   check=True, capture_output=True)
    return aoti_archive(tmp_path / "crafted.pt2", library.read_bytes())


class WritesMarker:
    """Unpickled, opens (so creates) the file at `path`: what a crafted pickle could do with any callable."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def crafted_program(tmp_path, marker) -> Path:
    """A torch.export program with fastattr's metadata whose sample inputs, unpickled, write `marker`."""
    exported = torch.export.export(nn.Linear(2, 2), (torch.zeros(1, 2),))
    genuine = tmp_path / "genuine.pt2"
    torch.export.save(exported, genuine, extra_files={"fastattr.json": json.dumps(META)})
    pickled = io.BytesIO()
    torch.save(WritesMarker(marker), pickled)
    path = tmp_path / "crafted-program.pt2"
    with zipfile.ZipFile(genuine) as source, zipfile.ZipFile(path, "w") as archive:
        for entry in source.infolist():
            data = source.read(entry)
            archive.writestr(entry, pickled.getvalue() if entry.filename.endswith("sample_inputs/model.pt") else data)
    return path


def test_an_untrusted_aoti_package_is_refused_before_its_library_is_loaded(crafted_package, marker, no_folder_left):
    with pytest.raises(fastattr.InputError, match=r"is an AOTInductor package: it holds native code .* runs as it is "
                                                  r"loaded.*pass trusted=True if you made the file or trust"):
        fastattr.load_program(crafted_package)
    assert not marker.exists()


def test_a_trusted_package_is_loaded_and_a_failed_load_leaves_no_folder(crafted_package, marker, no_folder_left):
    # The positive control: the crafted library does run once the user says the file is trusted. It is no
    # model, so the load then fails, and the loader's folder must go with it.
    with pytest.raises(fastattr.InputError, match=r"the AOTInductor package did not load"):
        fastattr.load_program(crafted_package, trusted=True)
    assert marker.read_text() == "the package's library was loaded"


def test_an_untrusted_torch_export_program_is_refused_before_it_is_unpickled(crafted_program, marker):
    with pytest.raises(fastattr.InputError, match=r"is a torch.export program: torch.export.load unpickles .* pass "
                                                  r"trusted=True if you made the file or trust"):
        fastattr.load_program(crafted_program)
    assert not marker.exists()
    # The positive control: torch.export.load itself runs the crafted pickle.
    with pytest.raises(fastattr.InputError, match=r"torch.export.load could not load it"):
        fastattr.load_program(crafted_program, trusted=True)
    assert marker.exists()


def test_an_archive_with_a_library_beside_a_program_is_treated_as_an_aoti_package(tmp_path, marker, crafted_package):
    # torch.export.load also loads every AOTInductor model an archive holds: the library decides the kind.
    with zipfile.ZipFile(crafted_package, "a") as archive:
        archive.writestr("crafted/extra/fastattr.json", json.dumps(META))
    with pytest.raises(fastattr.InputError, match=r"is an AOTInductor package"):
        fastattr.load_program(crafted_package)
    assert not marker.exists()


def test_every_front_end_refuses_an_untrusted_pt2_before_loading_it(crafted_package, marker, tmp_path, capsys):
    with pytest.raises(fastattr.InputError, match=r"a \.pt2 file can run code as it is loaded.*pass trusted=True"):
        build(Spec(str(crafted_package)))
    assert cli.main(["explain", str(EXAMPLES / "chelsea.png"), "--model", str(crafted_package), "--no-progress",
                     "-o", str(tmp_path / "out")]) == 2
    assert "pass --trusted if you made the file" in capsys.readouterr().err
    assert cli.main(["bench", "--model", str(crafted_package), "--batch-sizes", "1", "--iters", "1"]) == 2
    assert "--trusted" in capsys.readouterr().err
    assert not marker.exists()


def test_the_server_refuses_an_untrusted_pt2_before_any_replica_starts(crafted_package):
    serve = pytest.importorskip("fastattr.serve")
    with pytest.raises(ValueError, match=r"a \.pt2 file can run code as it is loaded.*pass trusted=True"):
        serve.app_options({"model": str(crafted_package)})
    assert serve.app_options({"model": str(crafted_package), "trusted": "true"})["trusted"] is True


def test_the_trusted_option_is_one_flag_for_every_command_and_a_spec_field():
    parser = argparse.ArgumentParser()
    add_spec_arguments(parser)
    assert parser.parse_args([]).trusted is False
    assert spec_from_args(parser.parse_args(["--model", "m.pt2", "--trusted"])).trusted is True
    assert Spec().trusted is False
    with pytest.raises(fastattr.InputError, match=r"trusted: expected True or False, got 'no'"):
        Spec(trusted="no")


@pytest.mark.parametrize("corrupt", ["not a zip archive", "a truncated archive", "a library that is not one"])
def test_a_corrupt_file_is_refused_and_leaves_no_folder_trusted_or_not(corrupt, crafted_package, tmp_path,
                                                                       no_folder_left):
    path = tmp_path / "corrupt.pt2"
    if corrupt == "not a zip archive":
        path.write_bytes(b"\x7fELF not a zip archive")
    elif corrupt == "a truncated archive":
        path.write_bytes(crafted_package.read_bytes()[:-200])
    else:
        aoti_archive(path, b"\x7fELF but no library")
    for trusted in (False, True):
        with pytest.raises(fastattr.InputError, match=str(path.name)):
            fastattr.load_program(path, trusted=trusted)


def test_a_package_without_a_compiled_library_is_refused_even_when_trusted(tmp_path, no_folder_left):
    # Without a library, torch's loader would compile the package's C++ with the commands the package gives.
    path = aoti_archive(tmp_path / "source-only.pt2", b"")
    with zipfile.ZipFile(path) as archive, zipfile.ZipFile(tmp_path / "no-library.pt2", "w") as stripped:
        for entry in archive.infolist():
            if not entry.filename.endswith(".so"):
                stripped.writestr(entry, archive.read(entry))
    with pytest.raises(fastattr.InputError, match=r"holds no compiled library"):
        fastattr.load_program(tmp_path / "no-library.pt2", trusted=True)


@pytest.mark.slow  # torch.export and an AOTInductor compile
@pytest.mark.parametrize("aoti", [False, True])
def test_a_genuine_export_loads_and_explains_when_trusted(tmp_path, aoti, no_folder_left):
    net = two_conv_net()  # the subject is the trust gate, whatever the model
    path = fastattr.export_program(net, tmp_path / "net.pt2", layer="2", k=2, input_shape=(3, 64, 64), aoti=aoti)
    with pytest.raises(fastattr.InputError, match="AOTInductor package" if aoti else "torch.export program"):
        fastattr.load_program(path)
    x = images(2, seed=3)
    got, want = fastattr.load_program(path, trusted=True)(x), fastattr.Explainer(net, layer="2")(x, k=2)
    assert torch.equal(got.classes, want.classes)
    torch.testing.assert_close(got.maps["gradcam"], want.maps["gradcam"], rtol=0, atol=0.1)
    pipeline = build(Spec(str(path), trusted=True))
    assert pipeline.backend == "pt2" and pipeline(x).maps["gradcam"].shape == (2, 2, 64, 64)


def test_the_server_settings_name_a_file_by_its_base_name_only(tmp_path, monkeypatch):
    pytest.importorskip("ray.serve")
    from fastattr.pipeline import Pipeline

    app = importlib.import_module("fastattr.serve.app")  # the package's `app` is the application function
    path = tmp_path / "private" / "r18.onnx"
    built = Pipeline(Spec(str(path)), "onnx", str(path), ("gradcam",), "layer4", 3, 3, 1000, 64, False, None)
    monkeypatch.setattr(app, "build", lambda spec: built)
    settings = app.ExplainService(model=str(path), max_k=3).settings
    assert settings["model"] == "r18.onnx"
    assert str(tmp_path) not in json.dumps(settings)
