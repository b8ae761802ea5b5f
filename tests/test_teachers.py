"""Teachers: the registry, the fingerprint, the diffusers paths on a tiny random-weight pipeline built here (no
download), the resumable per-sample cache (kill and resume), source generation, and a teacher swap under DVC."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from fxassets.core.atomic import read_jsonl
from fxassets.core.config import ConfigError, EffectTeacher, Img2ImgTeacher, Params, Text2ImageTeacher, load_params
from fxassets.core.images import read_png_rgb, read_rgb
from fxassets.core.paths import EffectPaths
from fxassets.sources import list_sources
from fxassets.stages import run_stage
from fxassets.teachers import REGISTRY, SampleRejected, make_teacher
from fxassets.teachers.classical import ClassicalTeacherImpl

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "faces"
TINY = {"steps": 2, "size": 32, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight SD and InstructPix2Pix pipelines saved as safetensors folders (seconds; no hub)."""
    from fxassets.teachers.tiny import save_tiny_pipeline

    d = tmp_path_factory.mktemp("models")
    save_tiny_pipeline(d / "tiny-sd")
    save_tiny_pipeline(d / "tiny-ip2p", kind="instruct-pix2pix")
    return d


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("FXASSETS_CACHE", raising=False)


def project(tmp_path: Path, n: int = 3, teacher: dict | None = None, px: int = 64, effect: dict | None = None) -> tuple[Path, Params]:
    """`n` sample faces downscaled to `px` under tmp_path/faces, and params for one effect `fx`."""
    faces = tmp_path / "faces"
    faces.mkdir(exist_ok=True)
    for p in sorted(SAMPLES.glob("*.jpg"))[:n]:
        cv2.imwrite(str(faces / f"{p.stem}.png"), cv2.resize(cv2.imread(str(p)), (px, px), interpolation=cv2.INTER_AREA))
    params = Params.model_validate({
        "faces": {"source": "faces"},
        "teacher": teacher or {"kind": "classical"},
        "effects": {"fx": {"prompt": "a cartoon", "negative_prompt": "blurry", "seed": 7, **(effect or {})}},
    })
    return tmp_path, params


def outputs(root: Path) -> dict[str, np.ndarray]:
    d = EffectPaths(root, "fx").teacher_dir
    return {r["sample_id"]: read_png_rgb(d / r["image"]) for r in read_jsonl(d / "records.jsonl") if r["status"] == "ok"}


# -- config and fingerprint (no torch) ---------------------------------------------------------------------------


def test_teacher_config_kinds_and_errors(tmp_path):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["teacher"] = {"kind": "img2img", "model": "models/sd-turbo", "steps": 2, "strength": 0.5, "guidance_scale": 0.0}
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(base))
    assert isinstance(load_params(p).teacher, Img2ImgTeacher)
    base["teacher"]["strenght"] = 0.4
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=r"teacher\.strenght: unknown key"):
        load_params(p)
    del base["teacher"]["strenght"]
    base["teacher"].update(steps=1, strength=0.5)
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="steps \\* strength"):
        load_params(p)
    base["teacher"] = {"kind": "text2image", "model": "m"}  # a source generator, not an editing teacher
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="teacher"):
        load_params(p)
    assert set(REGISTRY) == {"classical", "img2img", "instruct-pix2pix", "text2image", "gemini-image", "openai-images", "latent-edit"}
    assert make_teacher(Text2ImageTeacher(kind="text2image", model="org/m")).generates


def fake_model(folder: Path, scheduler: str = "EulerDiscreteScheduler") -> Path:
    (folder / "scheduler").mkdir(parents=True)
    (folder / "unet").mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": scheduler}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-v1")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never loaded")
    return folder


def test_fingerprint_names_everything_that_changes_the_output(tmp_path):
    fake_model(tmp_path / "m")
    base = {"kind": "img2img", "model": "m", "steps": 4, "strength": 0.5}

    def fp(eff: EffectTeacher | None = None, **kw) -> dict:
        return make_teacher(Img2ImgTeacher(**{**base, **kw}), eff, root=tmp_path).fingerprint()

    ref = fp()
    assert ref["weights"] and ref["scheduler"] == "EulerDiscreteScheduler" and ref["revision"] is None
    changed = [fp(steps=5), fp(strength=0.7), fp(guidance_scale=3.0), fp(size=256), fp(prompt_template="{prompt}, photo"),
               fp(scheduler="DDIMScheduler"), fp(variant="fp16"), fp(dtype="float16"), fp(EffectTeacher(strength=0.9))]
    assert len({f["hash"] for f in changed} | {ref["hash"]}) == len(changed) + 1
    # batching, device and the per-effect classical style never change an output
    assert fp(batch_size=8, device="cpu")["hash"] == fp(EffectTeacher(style="oil"))["hash"] == ref["hash"]
    # the weights: a changed file changes the hash; a format that is never loaded does not
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"other")
    assert fp()["hash"] == ref["hash"]
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-v2")
    assert fp()["hash"] != ref["hash"]
    # a hub model: its id and revision
    hub = make_teacher(Img2ImgTeacher(kind="img2img", model="stabilityai/sd-turbo", revision="abc"), root=tmp_path).fingerprint()
    hub2 = make_teacher(Img2ImgTeacher(kind="img2img", model="stabilityai/sd-turbo", revision="def"), root=tmp_path).fingerprint()
    assert hub["weights"] is None and hub["hash"] != hub2["hash"]
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        make_teacher(Img2ImgTeacher(kind="img2img", model="./missing"), root=tmp_path).fingerprint()


# -- the diffusers paths on a tiny pipeline ----------------------------------------------------------------------


def test_img2img_stage_is_deterministic_and_batch_independent(tmp_path, tiny_models, monkeypatch):
    root, params = project(tmp_path, n=3, px=40, teacher={"kind": "img2img", "model": str(tiny_models / "tiny-sd"), "strength": 0.5, "batch_size": 2, **TINY})
    run_stage("prompts", params, "fx", root, progress=False)
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert s["ok"] == 3 and s["computed"] == 3 and s["runtime"]["device"] in ("cpu", "cuda")
    first = outputs(root)
    recs = read_jsonl(EffectPaths(root, "fx").teacher_records)
    assert all(r["teacher"] == s["teacher"]["hash"] for r in recs) and s["seconds_per_sample"] > 0
    for sid, img in first.items():  # the source size comes back, and the teacher changed the image
        src = read_rgb(root / "faces" / f"{sid}.png")
        assert img.shape == src.shape == (40, 40, 3) and np.abs(img.astype(int) - src).mean() > 3
    teacher_json = json.loads((EffectPaths(root, "fx").teacher_dir / "teacher.json").read_text())
    assert teacher_json["kind"] == "img2img" and teacher_json["hash"] == recs[0]["teacher"]

    # the same samples one at a time, with nothing cached: the same images (a sample's noise is its own)
    monkeypatch.setenv("FXASSETS_CACHE", str(tmp_path / "other-cache"))
    one = params.model_copy(update={"teacher": params.teacher.model_copy(update={"batch_size": 1})})
    s1 = run_stage("teacher_images", one, "fx", root, progress=False)
    assert s1["computed"] == 3 and s1["teacher"]["hash"] == s["teacher"]["hash"]
    again = outputs(root)
    for sid in first:
        assert np.abs(first[sid].astype(int) - again[sid]).max() <= 1
    assert len({a.tobytes() for a in first.values()}) == 3  # different seeds, different images

    # a second run computes nothing
    s2 = run_stage("teacher_images", one, "fx", root, progress=False)
    assert s2["computed"] == 0 and s2["cached"] == 3


def test_instruct_pix2pix_runs(tmp_path, tiny_models):
    root, params = project(tmp_path, n=1, px=48, teacher={"kind": "instruct-pix2pix", "model": str(tiny_models / "tiny-ip2p"), **TINY})
    run_stage("prompts", params, "fx", root, progress=False)
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert s["ok"] == 1 and next(iter(outputs(root).values())).shape == (48, 48, 3)
    # an SD folder is not an InstructPix2Pix model: a clear error, not garbage
    bad = Params.model_validate({"teacher": {"kind": "instruct-pix2pix", "model": str(tiny_models / "tiny-sd"), **TINY}, "effects": {"fx": {"prompt": "p"}}})
    with pytest.raises(ValueError, match="not an InstructPix2Pix model"):
        make_teacher(bad.teacher, root=root).edit(np.zeros((32, 32, 3), np.uint8), {"prompt": "p", "seed": 0})
    # safetensors only: a folder whose UNet is a pickle is refused, never unpickled
    shutil.copytree(tiny_models / "tiny-sd", tmp_path / "pickled")
    unet = tmp_path / "pickled" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    pickled = Img2ImgTeacher(kind="img2img", model=str(tmp_path / "pickled"), **TINY)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        make_teacher(pickled).edit(np.zeros((32, 32, 3), np.uint8), {"prompt": "p", "seed": 0})


def test_generate_sources_balanced_deterministic_and_resumable(tmp_path, tiny_models):
    import argparse

    from fxassets.cli.generate_sources import SourcesConfig, add_parser, balanced_prompts, generate_sources

    recs = balanced_prompts(SourcesConfig(n=24))
    cells = Counter((r["attributes"]["age_group"], r["attributes"]["gender"], r["attributes"]["skin_group"]) for r in recs)
    assert len(cells) == 24 and set(cells.values()) == {1}  # 4 age groups x 2 genders x 3 skin groups, once each
    first6 = [r["attributes"] for r in recs[:6]]
    assert Counter(a["gender"] for a in first6) == {"woman": 3, "man": 3} and set(Counter(a["skin_group"] for a in first6).values()) == {2}
    assert len({r["seed"] for r in recs}) == 24 and recs == balanced_prompts(SourcesConfig(n=24))
    assert recs[:5] == balanced_prompts(SourcesConfig(n=5))  # growing the set never changes the first ones

    # the CLI (wired into `fxassets` by cli.py): argparse -> the same function
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["generate-sources", "--out", str(tmp_path / "gen"), "--n", "6", "--model", str(tiny_models / "tiny-sd"),
                          "--steps", "2", "--size", "32", "--guidance", "2", "--batch-size", "4", "--no-progress"])
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert args.func(args) == 0
    finally:
        os.chdir(cwd)
    gen = Text2ImageTeacher(kind="text2image", model=str(tiny_models / "tiny-sd"), steps=2, size=32, guidance_scale=2.0, batch_size=4)
    s = generate_sources(gen, SourcesConfig(n=6), tmp_path / "gen2", tmp_path, progress=False)
    assert s["computed"] == 0 and s["ok"] == 6  # the CLI run's samples came from the cache
    for name in ("manifest.csv", "records.jsonl"):  # the same bytes from the cache: no clock, no `cached` flag
        assert (tmp_path / "gen" / name).read_bytes() == (tmp_path / "gen2" / name).read_bytes(), name
    srcs = list_sources(tmp_path / "gen2")
    assert len(srcs) == 6 and len({s.person_id for s in srcs}) == 6 and {"age", "gender"} <= set(srcs[0].attributes)
    assert read_rgb(srcs[0].path).shape == (32, 32, 3)
    assert (tmp_path / "gen" / srcs[0].path.name).read_bytes() == srcs[0].path.read_bytes()


# -- resumable and idempotent ------------------------------------------------------------------------------------

SLOW_RUN = """
import sys, time
from pathlib import Path
from fxassets.core.config import Params
from fxassets.teachers.stage import run_teacher_images
from fxassets.teachers.classical import ClassicalTeacherImpl

class Slow(ClassicalTeacherImpl):
    def edit(self, rgb, record):
        time.sleep(0.4)
        return super().edit(rgb, record)

root = Path(sys.argv[1])
p = Params.model_validate({"faces": {"source": "faces"}, "effects": {"fx": {"prompt": "a cartoon"}}})
run_teacher_images(Slow(p.teacher, p.effect("fx").teacher), root / "data/prompts/fx/prompts.jsonl", root / "data/teacher_images/fx", root, progress=False, faces=p.faces)
"""


def test_killed_run_resumes_without_recomputing(tmp_path):
    root, params = project(tmp_path, n=6)
    run_stage("prompts", params, "fx", root, progress=False)
    cache = root / ".cache" / "fxassets" / "teacher"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, str(root)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(cache.glob("*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.glob("*.json")))
    assert 2 <= done < 6, proc.stderr.read().decode()[-2000:]
    assert not EffectPaths(root, "fx").teacher_dir.exists()  # the out appears whole or not at all

    calls = []

    class Counting(ClassicalTeacherImpl):
        def edit(self, rgb, record):
            calls.append(record["sample_id"])
            return super().edit(rgb, record)

    from fxassets.teachers.stage import run_teacher_images

    paths = EffectPaths(root, "fx")
    s = run_teacher_images(Counting(params.teacher, params.effect("fx").teacher), paths.prompts, paths.teacher_dir, root, progress=False, faces=params.faces)
    assert len(calls) == 6 - done and s["cached"] == done and s["ok"] == 6
    resumed = outputs(root)
    recs = read_jsonl(paths.teacher_records)
    assert {"sample_id", "source", "person_id", "seed", "prompt", "teacher", "status", "reason", "image"} <= set(recs[0])
    records = paths.teacher_records.read_bytes()
    # an uninterrupted run from nothing makes the same bytes, records too: no clock in them (the seconds are the
    # summary's, the run log's)
    shutil.rmtree(root / ".cache")
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    assert all(np.array_equal(resumed[k], v) for k, v in outputs(root).items())
    assert paths.teacher_records.read_bytes() == records and s["seconds_per_sample"] > 0


def test_a_refused_sample_is_recorded_and_not_recomputed(tmp_path):
    root, params = project(tmp_path, n=2)
    run_stage("prompts", params, "fx", root, progress=False)
    calls = []

    class Picky(ClassicalTeacherImpl):
        def edit_batch(self, images, records):
            calls.extend(r["sample_id"] for r in records)
            return [SampleRejected("the pipeline's safety checker flagged the output") if r["sample_id"].endswith("0") else self.edit(i, r) for i, r in zip(images, records)]

    from fxassets.teachers.stage import run_teacher_images

    paths = EffectPaths(root, "fx")
    for _ in range(2):
        s = run_teacher_images(Picky(params.teacher, params.effect("fx").teacher), paths.prompts, paths.teacher_dir, root, progress=False, faces=params.faces)
    assert s["ok"] == 1 and len(calls) == 2
    bad = [r for r in read_jsonl(paths.teacher_records) if r["status"] == "error"]
    assert len(bad) == 1 and "safety checker" in bad[0]["reason"] and bad[0]["image"] == ""


# -- a teacher swap under DVC ------------------------------------------------------------------------------------


def _changed(root: Path) -> dict:
    from conftest import run

    return json.loads(run(root, "dvc", "status", "--json").stdout or "{}")


@pytest.mark.slow
def test_swap_classical_to_diffusers_marks_exactly_the_downstream_stale(tmp_path, tiny_models):
    from conftest import make_project, run

    root = make_project(tmp_path / "project", {"effects": {"cartoon": {"samples": 2}, "sketch": {"samples": 2}}})
    run(root, "dvc", "repro", "face_pairs@cartoon")
    before = _changed(root)  # the stages never run (sketch, training) are listed; nothing of cartoon's first three
    assert not {"prompts@cartoon", "teacher_images@cartoon", "face_pairs@cartoon"} & set(before)

    shutil.copytree(tiny_models / "tiny-sd", root / "models" / "tiny-sd")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teacher"] = {"kind": "img2img", "model": "models/tiny-sd", "strength": 0.5, **TINY}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    after = _changed(root)
    assert set(after) - set(before) == {"teacher_images@cartoon"}
    assert "teacher" in json.dumps(after["teacher_images@cartoon"])
    assert "prompts@cartoon" not in after

    out = run(root, "dvc", "repro", "face_pairs@cartoon").stdout
    assert "'prompts@cartoon' didn't change" in out and "Running stage 'teacher_images@cartoon'" in out and "Running stage 'face_pairs@cartoon'" in out
    assert _changed(root).keys() == before.keys()
    tj = json.loads((root / "data" / "teacher_images" / "cartoon" / "teacher.json").read_text())
    assert tj["kind"] == "img2img" and tj["weights"]
