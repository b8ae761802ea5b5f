"""Simulated captures (faces.capture_variants): seeded specs, the backdrop mask, and the stages that carry them:
the teacher sees the variant, the pair's source is the same variant, a held-out person's variants stay apart, and
a person's variants are never rejected as near-duplicates of their own photo."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fxassets.captures import apply_capture, background_mask, draw_capture, variant_id
from fxassets.core.atomic import read_jsonl
from fxassets.core.config import Params
from fxassets.core.images import read_png_rgb, read_rgb
from fxassets.core.paths import EffectPaths
from fxassets.pairs.quality import near_duplicates
from fxassets.stages import run_stage

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples" / "faces"


def _portrait() -> np.ndarray:
    """A lit backdrop (a vertical gradient), a dark head, a white body along the bottom edge."""
    h, w = 240, 200
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(200, 170, h, dtype=np.float32)[:, None, None].astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    img[((yy - 100) / 60.0) ** 2 + ((xx - 100) / 45.0) ** 2 < 1] = (150, 100, 80)
    img[190:, 30:170] = 250
    return img


def test_specs_are_seeded_by_sample_and_variant_and_stay_in_range():
    a, b = draw_capture("faces_000", 1), draw_capture("faces_000", 1)
    assert a == b and draw_capture("faces_000", 2) != a and draw_capture("faces_001", 1) != a
    specs = [draw_capture(f"s{i}", 1) for i in range(200)]
    luma = np.array([0.299, 0.587, 0.114])
    assert all(abs(float(luma @ s["gains"]) - 1) < 1e-3 for s in specs)  # white balance keeps brightness
    share = np.mean(["background" in s for s in specs])
    assert 0.35 < share < 0.65 and any(s.get("background") == [255, 255, 255] for s in specs)
    assert variant_id("x", 2) == "x-cap2"


def test_backdrop_mask_follows_the_gradient_and_keeps_the_head_and_body():
    img = _portrait()
    m = background_mask(img)
    assert m[5:30, 5:40].mean() > 0.95 and m[150:180, 5:20].mean() > 0.95  # top and a lower side of the backdrop
    assert m[80:120, 80:120].max() < 0.05 and m[200:, 60:140].max() < 0.05  # the head; the body at the bottom edge
    spec = {"gains": [1.0, 1.0, 1.0], "exposure": 1.0, "gamma": 1.0, "background": [0, 0, 255]}
    out = apply_capture(img, spec)
    assert (out[10, 10] == (0, 0, 255)).all() and (out[100, 100] == img[100, 100]).all()
    assert apply_capture(img, None) is img
    warm = apply_capture(img, {"gains": [1.2, 1.0, 0.8], "exposure": 1.0, "gamma": 1.0})
    assert warm[..., 0].mean() > img[..., 0].mean() and warm[..., 2].mean() < img[..., 2].mean()


def test_near_duplicates_within_one_person_are_allowed():
    hashes = [1, 3, 1, 0xF << 40]
    assert near_duplicates(hashes, 2) == [None, (0, 1), (0, 0), None]
    assert near_duplicates(hashes, 2, ["p", "p", "q", "r"]) == [None, None, (0, 0), None]


def test_stages_carry_the_capture_from_teacher_to_pair(tmp_path):
    faces = tmp_path / "faces"
    faces.mkdir()
    for p in sorted(SAMPLES.glob("*.jpg"))[:4]:
        shutil.copy(p, faces / p.name)
    params = Params.model_validate({
        "faces": {"source": "faces", "holdout_fraction": 0.25, "capture_variants": 1},
        "effects": {"fx": {"prompt": "a cartoon", "seed": 7, "teacher": {"style": "cartoon"}}},
    })
    for stage in ("prompts", "teacher_images", "face_pairs"):
        run_stage(stage, params, "fx", tmp_path, progress=False)
    paths = EffectPaths(tmp_path, "fx")
    recs = read_jsonl(paths.prompts)
    assert len(recs) == 8 and [r["sample_id"] for r in recs[:2]] == ["faces_000", "faces_000-cap1"]
    assert "capture" not in recs[0] and recs[1]["capture"] == draw_capture("faces_000", 1)
    teacher = paths.teacher_dir
    orig, var = (read_png_rgb(teacher / "images" / f"{s}.png") for s in ("faces_000", "faces_000-cap1"))
    assert np.abs(orig.astype(int) - var.astype(int)).mean() > 2  # the teacher saw another photo
    df = pd.read_parquet(paths.manifest).set_index("sample_id")
    assert (df.status == "pass").all(), df[df.status != "pass"].reason.to_dict()  # no variant is a "duplicate"
    held = df[df.split.str.startswith("heldout")]
    assert set(held.split) == {"heldout", "heldout_capture"} and held.person_id.nunique() == 1
    # the pair's source is the variant, aligned with its own face's transform
    from fxassets.faces.align import warp_aligned

    rec = recs[1]
    photo = apply_capture(read_rgb(tmp_path / rec["source"]), rec["capture"])
    row = df.loc["faces_000-cap1"]
    crop = read_png_rgb(paths.pairs_dir / row["source"])
    expected = warp_aligned(photo, np.asarray(row["align_matrix"], np.float64).reshape(2, 3), crop.shape[0])
    assert np.array_equal(crop, expected)
    plain = read_png_rgb(paths.pairs_dir / df.loc["faces_000", "source"])
    assert np.abs(crop.astype(int) - plain.astype(int)).mean() > 2
