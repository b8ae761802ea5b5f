"""The pair quality gate: per-pair metrics, the great-expectations suite, and training blocked on failure.

Made-up bad sets are built from five sample faces (teacher run once): blurred teacher outputs, duplicated photos,
identity swapped, geometry changed by the teacher, all one skin-tone group. Each must fail with the right reason;
the unchanged set must pass."""

import json
import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fxassets.pairs import quality as qm
from fxassets.core.config import ConfigError, Params, QualityConfig, load_params
from fxassets.pairs.gate import GateError, load_gate, quality_for, require_passed, run_gate
from fxassets.core.images import read_png_rgb, write_png
from fxassets.core.paths import EffectPaths
from fxassets.core.runlog import read_run_log
from fxassets.stages import run_stage

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "faces"
N = 5


# ---- metrics: pure functions ---------------------------------------------------------------------------------
def _face(i: int = 0) -> np.ndarray:
    return cv2.cvtColor(cv2.resize(cv2.imread(str(sorted(SAMPLES.glob("*.jpg"))[i])), (256, 256)), cv2.COLOR_BGR2RGB)


def test_sharpness_exposure_and_phash():
    a, b = _face(0), _face(1)
    region = qm.face_region(256, 0.45)
    assert qm.sharpness(cv2.GaussianBlur(a, (0, 0), 2), region) < 0.25 * qm.sharpness(a, region)
    assert qm.exposure(np.full_like(a, 255), region) == (1.0, 1.0)
    assert qm.exposure(a, region)[1] < 0.05
    recoded = cv2.imdecode(cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 40])[1], cv2.IMREAD_UNCHANGED)
    assert qm.hamming(qm.phash(a), qm.phash(recoded)) <= 4 < qm.hamming(qm.phash(a), qm.phash(b))
    assert qm.near_duplicates([1, 7 << 40, 3, None, 1], 2) == [None, None, (0, 1), None, (0, 0)]


def test_skin_tone_of_the_monk_swatches():
    for tone, hex_ in enumerate(qm.MONK_HEX, 1):
        swatch = np.full((256, 256, 3), [int(hex_[i : i + 2], 16) for i in (0, 2, 4)], np.uint8)
        assert qm.monk_tone(qm.skin_ita(swatch, 256, 0.45)) == tone
    assert [qm.skin_group(t) for t in (1, 4, 5, 6, 7, 10)] == ["light", "light", "medium", "medium", "dark", "dark"]


def test_quality_overrides_per_effect():
    params = Params.model_validate({"effects": {"a": {"prompt": "p"}, "b": {"prompt": "p", "quality": {"max_identity_distance": 0.9}}}})
    assert quality_for(params, "a") == QualityConfig()
    assert quality_for(params, "b").max_identity_distance == 0.9 and quality_for(params, "b").min_pass_rate == QualityConfig().min_pass_rate
    with pytest.raises(ValueError, match="unknown quality threshold"):
        Params.model_validate({"effects": {"a": {"prompt": "p", "quality": {"max_identty": 1}}}})
    shipped = load_params(REPO / "params.yaml")
    assert shipped.quality == QualityConfig()  # params.yaml spells out the defaults


def test_unknown_quality_key_names_the_path(tmp_path):
    (tmp_path / "p.yaml").write_text("effects: {a: {prompt: p}}\nquality: {min_pass_rte: 0.5}\n")
    with pytest.raises(ConfigError, match="quality.min_pass_rte: unknown key"):
        load_params(tmp_path / "p.yaml")


# ---- the gate on made-up sets --------------------------------------------------------------------------------
def _params(balance: bool = False) -> Params:
    return Params.model_validate({
        "faces": {"source": "faces", "holdout_fraction": 0.25},
        "effects": {"fx": {"prompt": "a cartoon", "seed": 7, "teacher": {"style": "cartoon"}, "quality": {"balance": balance}}},
    })


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Five sample faces with their cartoon teacher outputs (prompts and teacher_images run once)."""
    root = tmp_path_factory.mktemp("quality") / "base"
    (root / "faces").mkdir(parents=True)
    for p in sorted(SAMPLES.glob("*.jpg"))[:N]:
        shutil.copy(p, root / "faces" / p.name)
    shutil.copy(SAMPLES / "manifest.csv", root / "faces" / "manifest.csv")
    for stage in ("prompts", "teacher_images"):
        run_stage(stage, _params(), "fx", root, progress=False)
    return root


def _variant(base: Path, tmp_path: Path, edit=None) -> tuple[Path, pd.DataFrame, dict]:
    """A copy of the base project whose teacher outputs went through `edit(sample_index, image)`; face_pairs run."""
    root = tmp_path / "project"
    shutil.copytree(base, root)
    images = sorted((EffectPaths(root, "fx").teacher_dir / "images").glob("*.png"))
    for i, png in enumerate(images):
        if edit is not None:
            write_png(png, edit(i, read_png_rgb(png), images))
    run_stage("face_pairs", _params(), "fx", root, progress=False)
    pairs = EffectPaths(root, "fx").pairs_dir
    return root, pd.read_parquet(pairs / "manifest.parquet").set_index("sample_id"), load_gate(pairs)


def _failed(gate: dict) -> set[str]:
    return {c["check"] for c in gate["set_checks"] if not c["passed"]}


def test_the_sample_faces_pass(base, tmp_path):
    root, df, gate = _variant(base, tmp_path)
    assert gate["passed"] and _failed(gate) == set() and (df.status == "pass").all()
    assert require_passed(EffectPaths(root, "fx").pairs_dir)["kept"] == N
    assert Path(gate["docs_path"]).is_file() and "pair_set" in Path(gate["docs_path"]).read_text()
    pairs = EffectPaths(root, "fx").pairs_dir
    assert (pairs / "balance.png").stat().st_size > 0
    assert set(pd.read_csv(pairs / "balance.csv").query("attribute == 'skin_group'").group) == {"light", "medium", "dark"}
    # every metric measured, and the source's attributes carried through
    assert df[["target_det_score", "landmark_drift", "identity_distance", "sharpness_ratio", "skin_ita"]].notna().all().all()
    assert set(df.gender) <= {"female", "male"} and df.age.between(15, 90).all()
    summary = json.loads((pairs / "summary.json").read_text())
    assert summary["gate_passed"] and "metrics_seconds_per_pair" not in summary  # an output holds no clock
    assert read_run_log(root, "face_pairs", "fx")["metrics_seconds_per_pair"] > 0  # the stage's run log does


def test_blurred_teacher_outputs_fail_and_block_training(base, tmp_path, monkeypatch, capsys):
    root, df, gate = _variant(base, tmp_path, lambda i, im, _: cv2.GaussianBlur(im, (0, 0), 4))
    assert (df.status == "reject").all()
    assert df.reason.str.contains(r"sharpness ratio target/source 0\.\d+ < 0.25").all()
    assert not gate["passed"] and "pass_rate" in _failed(gate) and gate["rejected_by_check"]["sharpness"] == N
    with pytest.raises(GateError, match="training blocked by the pair quality gate"):
        require_passed(EffectPaths(root, "fx").pairs_dir)
    # the CLI: a readable error and exit code 2, before any training
    from fxassets.cli import main

    (root / "params.yaml").write_text(json.dumps(_params().model_dump(mode="json")))
    monkeypatch.chdir(root)
    assert main(["stage", "student_checkpoint", "--effect", "fx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxassets: error:") and "FAIL pass_rate: 0" in err and "sharpness 5" in err
    assert not (root / "data" / "student").exists()


def test_identity_swapped_targets_fail(base, tmp_path):
    # each sample's teacher output is the next person's
    _, df, gate = _variant(base, tmp_path, lambda i, im, imgs: read_png_rgb(imgs[(i + 1) % len(imgs)]))
    assert df.reason.str.contains(r"identity distance 0\.\d+ > 0.7").sum() >= N - 1
    assert {"identity_share", "pass_rate"} <= _failed(gate)


def test_geometry_changed_by_the_teacher_fails(base, tmp_path):
    def move(i, im, _):
        h, w = im.shape[:2]
        M = cv2.getRotationMatrix2D((w / 2, h / 2), 8, 1.0)
        M[:, 2] += (0.05 * w, 0.03 * h)
        return cv2.warpAffine(im, M, (w, h), borderMode=cv2.BORDER_REFLECT)

    _, df, gate = _variant(base, tmp_path, move)
    assert df.reason.str.contains(r"landmark drift 0\.\d+ > 0.15").all()
    assert "pass_rate" in _failed(gate) and gate["rejected_by_check"]["landmark_drift"] == N


def test_duplicated_photos_fail(base, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(base, root, ignore=shutil.ignore_patterns("data"))
    first = sorted((root / "faces").glob("*.jpg"))[0]
    img = cv2.imread(str(first))
    shutil.copy(first, root / "faces" / "zz_copy.jpg")  # the same file again
    small = cv2.resize(img, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "faces" / "zz_resized.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 60])  # re-encoded, smaller
    for stage in ("prompts", "teacher_images", "face_pairs"):
        run_stage(stage, _params(), "fx", root, progress=False)
    pairs = EffectPaths(root, "fx").pairs_dir
    df, gate = pd.read_parquet(pairs / "manifest.parquet").set_index("sample_id"), load_gate(pairs)
    for dup in ("zz_copy", "zz_resized"):
        assert df.loc[dup, "status"] == "reject" and df.loc[dup, "reason"].startswith(f"near-duplicate of {first.stem}")
    assert df.loc[first.stem, "status"] == "pass"
    assert _failed(gate) == {"duplicates", "pass_rate"}  # 5 of 7 pass
    dups = next(c for c in gate["set_checks"] if c["check"] == "duplicates")
    assert dups["observed"] == pytest.approx(2 / (N + 2), abs=1e-3) and dups["threshold"] == 0


def test_look_alike_crops_of_different_people_are_not_duplicates(base, tmp_path):
    """A hash match between two person ids is a near-duplicate only when dlib also sees one face: five different
    people given one hash are kept apart; the same crop under another id is still caught."""
    from fxassets.pairs.gate import mark_duplicates

    root, df, _ = _variant(base, tmp_path)
    pairs = EffectPaths(root, "fx").pairs_dir
    df = df.reset_index()
    df["phash"] = df["phash"].iloc[0]  # every crop hashes alike
    identity = qm.IdentityModel(256, 0.45)
    crops = {r.sample_id: read_png_rgb(pairs / r.source) for r in df.itertuples()}
    distance = lambda a, b: identity.between(crops[a], crops[b])
    assert mark_duplicates(df, 4)["duplicate_of"].notna().sum() == N - 1  # the hash alone
    assert mark_duplicates(df, 4, distance)["duplicate_of"].isna().all()
    first = df["sample_id"].iloc[0]
    copy = pd.concat([df, df.iloc[[0]].assign(sample_id="zz_copy", person_id="someone_else")], ignore_index=True)
    crops["zz_copy"] = crops[first]
    marked = mark_duplicates(copy, 4, distance).set_index("sample_id")["duplicate_of"]
    assert marked["zz_copy"] == first and marked.drop("zz_copy").isna().all()


def test_all_one_skin_tone_group_fails_when_balance_is_asked_for(base, tmp_path):
    _, df, gate = _variant(base, tmp_path)
    assert gate["passed"]  # balance is off by default
    df = df.reset_index()
    df["skin_group"] = "light"  # the same set, all estimated in one group
    out = tmp_path / "balanced"
    out.mkdir()
    _, gate = run_gate(df, QualityConfig(balance=True, min_group_share=0.2), out)
    assert _failed(gate) == {"balance"}
    bal = next(c for c in gate["set_checks"] if c["check"] == "balance")
    assert bal["observed"] == 0.0 and bal["groups"] == {"light": 1.0, "medium": 0.0, "dark": 0.0}
    assert "FAIL balance" in gate["summary"]
    # and a set with every group present passes it
    df["skin_group"] = ["light", "light", "medium", "dark", "dark"]
    _, gate = run_gate(df, QualityConfig(balance=True, min_group_share=0.2), out)
    assert gate["passed"]


@pytest.mark.parametrize("failing", ["pair_rows", "static"])  # GX logs a page it could not write, raises for the rest
def test_a_full_disk_while_gx_writes_the_data_docs_is_an_error_not_a_logged_traceback(base, tmp_path, monkeypatch, caplog, failing):
    import errno

    from great_expectations.data_context.store.tuple_store_backend import TupleFilesystemStoreBackend

    _, df, _ = _variant(base, tmp_path)
    real = TupleFilesystemStoreBackend._set

    def full(self, key, value, **kw):  # the Data Docs site is GX's only file store here
        if (key if isinstance(key, tuple) else key.to_tuple())[:1] == (failing,):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, key, value, **kw)

    monkeypatch.setattr(TupleFilesystemStoreBackend, "_set", full)
    out = tmp_path / "full"
    out.mkdir()
    with pytest.raises(OSError) as e:
        run_gate(df.reset_index(), QualityConfig(), out)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out / "gx_docs")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_no_gate_result_blocks_training(tmp_path):
    with pytest.raises(GateError, match="no quality gate result"):
        require_passed(tmp_path)
