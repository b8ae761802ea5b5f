"""The first three stages as library functions: records, determinism, and bad input that never crashes a stage."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import png_header
from fxassets.core.atomic import read_jsonl
from fxassets.core.config import EffectConfig, FacesConfig, Params
from fxassets.core.images import read_png_rgb
from fxassets.core.paths import EffectPaths
from fxassets.prompts import build_prompts
from fxassets.stages import run_stage
from fxassets.teachers import make_teacher

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "faces"


def project(tmp_path: Path, n: int = 4, extra: dict[str, bytes] | None = None, style: str = "cartoon") -> tuple[Path, Params]:
    faces = tmp_path / "faces"
    faces.mkdir()
    for p in sorted(SAMPLES.glob("*.jpg"))[:n]:
        shutil.copy(p, faces / p.name)
    for name, data in (extra or {}).items():
        (faces / name).write_bytes(data)
    params = Params.model_validate(
        {
            "faces": {"source": "faces", "holdout_fraction": 0.25},
            "effects": {"fx": {"prompt": "a cartoon", "seed": 7, "teacher": {"style": style}}},
        }
    )
    return tmp_path, params


def test_prompts_are_deterministic_and_seeds_do_not_depend_on_the_set(tmp_path):
    root, params = project(tmp_path, n=4)
    a = build_prompts(params.faces, params.effect("fx"), root)
    b = build_prompts(params.faces, params.effect("fx"), root)
    assert a == b and len(a) == 4
    fewer = build_prompts(params.faces, EffectConfig(prompt="a cartoon", seed=7, samples=2), root)
    assert [r["seed"] for r in fewer] == [r["seed"] for r in a[:2]]
    assert len({r["seed"] for r in a}) == 4
    assert a[0]["person_id"] != a[1]["person_id"]


def test_a_source_folder_outside_the_project_builds(tmp_path):
    """faces.source may be an absolute folder elsewhere (a user's own photos): the records keep its absolute paths
    and every stage reads them; one inside the project stays relative."""
    (tmp_path / "photos").mkdir()
    faces, _ = project(tmp_path / "photos", n=2)
    root = tmp_path / "project"
    root.mkdir()
    params = Params.model_validate({"faces": {"source": str(faces / "faces"), "holdout_fraction": 0.5},
                                    "effects": {"fx": {"prompt": "a cartoon", "seed": 7, "teacher": {"style": "cartoon"}}}})
    for stage in ("prompts", "teacher_images", "face_pairs"):
        run_stage(stage, params, "fx", root, progress=False)
    records = read_jsonl(EffectPaths(root, "fx").prompts)
    assert all(Path(r["source"]).is_absolute() and Path(r["source"]).is_file() for r in records)
    assert (pd.read_parquet(EffectPaths(root, "fx").pairs_dir / "manifest.parquet").status == "pass").all()
    (tmp_path / "inside").mkdir()
    inside, p = project(tmp_path / "inside", n=1)
    assert build_prompts(p.faces, p.effect("fx"), inside)[0]["source"] == f"faces/{sorted(SAMPLES.glob('*.jpg'))[0].name}"


def test_missing_source_folder_is_named(tmp_path):
    params = Params.model_validate({"faces": {"source": "nowhere"}, "effects": {"fx": {"prompt": "p"}}})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_stage("prompts", params, "fx", tmp_path, progress=False)


def test_stage_order_errors_are_clear(tmp_path):
    root, params = project(tmp_path, n=1)
    with pytest.raises(FileNotFoundError, match="run the prompts stage first"):
        run_stage("teacher_images", params, "fx", root, progress=False)


@pytest.mark.parametrize("style", ["cartoon", "sketch", "color_sketch", "oil", "watercolor"])
def test_classical_styles_change_the_image(style):
    from fxassets.core.images import read_rgb

    params = Params.model_validate({"effects": {"fx": {"prompt": "p", "teacher": {"style": style}}}})
    t = make_teacher(params.teacher, params.effect("fx").teacher)
    img = read_rgb(sorted(SAMPLES.glob("*.jpg"))[0])
    out = t.edit(img, {})
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() > 3
    assert t.fingerprint()["style"] == style


def test_three_stages_with_bad_inputs_never_crash(tmp_path):
    corrupt = b"\xff\xd8\xff\xe0 this is not really a jpeg"
    blank = (np.full((256, 256, 3), 128, np.uint8))
    import cv2

    ok, png = cv2.imencode(".png", blank)
    huge = png_header(20000, 20000)  # Pillow's DecompressionBombError: a rejected sample too
    root, params = project(tmp_path, n=4, extra={"zz_corrupt.jpg": corrupt, "zz_blank.png": png.tobytes(), "zz_huge.png": huge})
    (root / "data" / "face_pairs" / ".fx.k2j_x9q1.tmp" / "source").mkdir(parents=True)  # a killed run's (kill -9)
    for stage in ("prompts", "teacher_images", "face_pairs"):
        run_stage(stage, params, "fx", root, progress=False)
    paths = EffectPaths(root, "fx")
    recs = {r["sample_id"]: r for r in read_jsonl(paths.teacher_records)}
    assert recs["zz_corrupt"]["status"] == "error" and "zz_corrupt.jpg" in recs["zz_corrupt"]["reason"]
    assert recs["faces_000"]["status"] == "ok"
    assert recs["zz_huge"]["status"] == "error" and "image too large" in recs["zz_huge"]["reason"]

    df = pd.read_parquet(paths.manifest).set_index("sample_id")
    assert df.loc["zz_corrupt", "status"] == "reject" and "unreadable" in df.loc["zz_corrupt", "reason"]
    assert df.loc["zz_blank", "status"] == "reject" and "no face" in df.loc["zz_blank", "reason"]
    assert df.loc["zz_huge", "status"] == "reject" and "50 megapixels" in df.loc["zz_huge", "reason"]
    passed = df[df.status == "pass"]
    assert len(passed) == 4
    assert set(passed.split) == {"train", "heldout"}
    # every kept pair: both crops exist, are the configured size, and differ (the teacher did something)
    for sid, row in passed.iterrows():
        s, t = read_png_rgb(paths.pairs_dir / row.source), read_png_rgb(paths.pairs_dir / row.target)
        assert s.shape == t.shape == (256, 256, 3)
        assert np.abs(s.astype(int) - t).mean() > 3
        assert len(row.align_matrix) == 6
    summary = json.loads((paths.pairs_dir / "summary.json").read_text())
    assert summary["kept"] == 4 and summary["rejected"] == 3
    # nothing half-written left beside the outputs, a killed earlier run's temp folder included
    assert not [p for p in (root / "data").rglob(".*tmp*")]


def test_two_faces_are_rejected_or_the_largest_taken(tmp_path):
    import cv2

    imgs = [cv2.imread(str(p)) for p in sorted(SAMPLES.glob("*.jpg"))[:2]]
    ok, both = cv2.imencode(".jpg", np.hstack(imgs))
    root, params = project(tmp_path, n=0, extra={"two.jpg": both.tobytes(), "one.jpg": cv2.imencode(".jpg", imgs[0])[1].tobytes()})
    for stage in ("prompts", "teacher_images", "face_pairs"):
        run_stage(stage, params, "fx", root, progress=False)
    df = pd.read_parquet(EffectPaths(root, "fx").manifest).set_index("sample_id")
    assert df.loc["two", "status"] == "reject" and "2 faces" in df.loc["two", "reason"]
    params = params.model_copy(update={"faces": params.faces.model_copy(update={"multiple_faces": "largest"})})
    run_stage("face_pairs", params, "fx", root, progress=False)
    df = pd.read_parquet(EffectPaths(root, "fx").manifest).set_index("sample_id")
    assert df.loc["two", "status"] == "pass" and "two_face1" not in df.index
    # "all": each face of the photo becomes its own pair and person, on the photo's side of the split
    params = params.model_copy(update={"faces": params.faces.model_copy(update={"multiple_faces": "all"})})
    run_stage("face_pairs", params, "fx", root, progress=False)
    df = pd.read_parquet(EffectPaths(root, "fx").manifest).set_index("sample_id")
    both = df.loc[["two", "two_face1"]]
    # one of the two faces is the person of one.jpg: the gate rejects that pair as a near-duplicate, not the other
    assert (both.status == "pass").sum() == 1 and "duplicate" in both.loc[both.status != "pass", "reason"].iloc[0]
    assert df.loc["two_face1", "person_id"] != df.loc["two", "person_id"]
    assert df.loc["two_face1", "split"] == df.loc["two", "split"]
    assert (EffectPaths(root, "fx").pairs_dir / df.loc["two_face1", "source"]).is_file()
    assert df.loc["two", "align_matrix"].tolist() != df.loc["two_face1", "align_matrix"].tolist()


def test_sources_sharing_a_stem_are_two_samples_with_two_images(tmp_path):
    import cv2

    face = cv2.imread(str(sorted(SAMPLES.glob("*.jpg"))[0]))
    root, params = project(tmp_path, n=0, extra={"x.jpg": cv2.imencode(".jpg", face)[1].tobytes(),
                                                 "x.png": cv2.imencode(".png", face[:, ::-1])[1].tobytes()})
    for stage in ("prompts", "teacher_images"):
        run_stage(stage, params, "fx", root, progress=False)
    recs = read_jsonl(EffectPaths(root, "fx").teacher_records)
    assert [(r["sample_id"], r["source"], r["image"]) for r in recs] == [
        ("x_jpg", "faces/x.jpg", "images/x_jpg.png"), ("x_png", "faces/x.png", "images/x_png.png")]
    assert recs[0]["person_id"] != recs[1]["person_id"]
    (root / "faces" / "x_jpg.bmp").write_bytes(b"")  # a name left clashing: refused, naming the files
    with pytest.raises(ValueError, match="x.jpg, x_jpg.bmp: these files would write the same output name"):
        run_stage("prompts", params, "fx", root, progress=False)
