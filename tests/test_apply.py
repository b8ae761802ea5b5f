"""`fxassets apply` on bad requests: refused in one line before any work, never overwriting an input or one output
with another (no built model needed: the refusals come first, the rest runs the classical teacher)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import png_header
from fxassets.cli import apply as apply_cli
from fxassets.cli.main import main
from fxassets.core.images import distinct_stems

REPO = Path(__file__).resolve().parents[1]
FACE = REPO / "data" / "samples" / "faces" / "faces_000.jpg"


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def apply(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["apply", "--effect", "cartoon", *args])
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def _no_work(monkeypatch):
    monkeypatch.setattr(apply_cli, "make_runner", lambda *a, **k: pytest.fail("work started"))


def test_an_output_that_is_the_input_is_refused(work, capsys, monkeypatch):
    _no_work(monkeypatch)
    shutil.copy(FACE, work / "a.jpg")
    (work / "photos").mkdir()
    shutil.copy(FACE, work / "photos" / "p.png")
    vw = cv2.VideoWriter(str(work / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 64))
    vw.write(np.zeros((64, 64, 3), np.uint8))
    vw.release()
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    for args in (["--input", "a.jpg", "--output", "a.jpg"], ["--input", "photos", "--output", "photos/"],
                 ["--input", "clip.mp4", "--output", "./clip.mp4"], ["--input", "a.jpg", "--output", "o.png", "--json", "a.jpg"]):
        rc, _, err = apply(capsys, *args)
        assert rc == 2 and "is the input" in err and "refusing to overwrite it" in err and "\n" not in err, (args, err)
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before


def test_an_output_that_cannot_be_written_as_asked_is_one_line_before_any_work(work, capsys, monkeypatch):
    _no_work(monkeypatch)
    shutil.copy(FACE, work / "a.jpg")
    (work / "clip.mp4").write_bytes(b"")  # a video by its name: refused before it is opened
    (work / "notes.txt").write_text("a file")
    cases = {
        ("a.jpg", "notes.txt/out.png"): "is under",  # a regular file where a folder should be
        (".", "notes.txt"): "is a file, not a folder",  # a folder of images into a file
        ("a.jpg", "out.xyz"): "not an image file name",
        ("clip.mp4", "out.png"): "not a video file name",  # not an MPEG-4 stream named .png
        ("clip.mp4", "out.webm"): "not a video file name",  # the mp4v writer cannot fill WebM
        ("a.jpg", "."): "is a folder",
    }
    for (src, out), want in cases.items():
        rc, _, err = apply(capsys, "--input", src, "--output", out)
        assert rc == 2 and want in err and "\n" not in err, (src, out, err)
    assert sorted(p.name for p in work.iterdir()) == ["a.jpg", "clip.mp4", "notes.txt", "params.yaml"]


def test_inputs_sharing_a_stem_get_distinct_outputs(work, capsys):
    (work / "in").mkdir()
    shutil.copy(FACE, work / "in" / "x.jpg")
    cv2.imwrite(str(work / "in" / "x.png"), cv2.imread(str(FACE))[:, ::-1])  # mirrored: a different output
    (work / "in" / "y.jpg").write_bytes(png_header(20000, 20000))  # over the pixel limit: skipped, named
    rc, out, err = apply(capsys, "--input", "in", "--output", "out", "--engine", "teacher")
    assert rc == 0 and json.loads(out)["frames"] == 2 and "y.jpg: image too large" in err
    assert sorted(p.name for p in (work / "out").iterdir()) == ["x_jpg.png", "x_png.png"]
    assert not np.array_equal(cv2.imread(str(work / "out" / "x_jpg.png")), cv2.imread(str(work / "out" / "x_png.png")))
    # the one input given and too large: an error, not a skip with exit 0
    rc, _, err = apply(capsys, "--input", "in/y.jpg", "--output", "y.png", "--engine", "teacher")
    assert rc == 2 and "image too large" in err and not (work / "y.png").exists()


def test_a_name_clash_left_is_refused_naming_the_inputs():
    assert distinct_stems([Path("a.jpg"), Path("b.png")]) == {Path("a.jpg"): "a", Path("b.png"): "b"}
    for names in (["x.jpg", "x.JPG"], ["x.jpg", "x.png", "x_jpg.webp"]):
        with pytest.raises(ValueError, match="would write the same output name; rename one") as e:
            distinct_stems([Path(n) for n in names])
        assert names[0] in str(e.value)
