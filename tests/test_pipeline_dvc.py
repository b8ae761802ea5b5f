"""End to end through DVC on a tiny subset: every output, parseable metrics, a no-op second run, a working int8 model."""

import json
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run
from fxassets.core.images import read_png_rgb

pytestmark = pytest.mark.slow
EFFECTS = ("cartoon", "sketch")


def test_every_output_exists(built_project):
    root = built_project
    for e in EFFECTS:
        for rel in (
            f"data/prompts/{e}/prompts.jsonl",
            f"data/teacher_images/{e}/records.jsonl",
            f"data/face_pairs/{e}/manifest.parquet",
            f"data/student/{e}/student.safetensors",
            f"data/student/{e}/metrics.json",
            f"data/student/{e}/curve.csv",
            f"data/mobile/{e}/student.onnx",
            f"data/mobile/{e}/student.int8.onnx",
            f"data/mobile/{e}/grid.png",
            f"data/mobile/{e}/report.json",
        ):
            assert (root / rel).is_file() and (root / rel).stat().st_size > 0, rel
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {f"{s}@{e}" for s in ("prompts", "teacher_images", "face_pairs", "student_checkpoint", "mobile_model") for e in EFFECTS} <= set(lock["stages"])


def test_metrics_and_plots_parse(built_project):
    out = json.loads(run(built_project, "dvc", "metrics", "show", "--json").stdout)
    flat = json.dumps(out)
    for key in ("heldout_psnr", "heldout_ssim", "identity_psnr", "int8_psnr_db", "parity_psnr_db"):
        assert key in flat, key
    assert "_ms_1t" not in flat and "seconds" not in flat  # DVC metrics hold no clock (the run log does)
    for e in EFFECTS:
        m = json.loads((built_project / f"data/student/{e}/metrics.json").read_text())
        assert np.isfinite(m["heldout_psnr"]) and 0 < m["heldout_ssim"] <= 1
        curve = pd.read_csv(built_project / f"data/student/{e}/curve.csv")
        assert list(curve.columns[:2]) == ["step", "train_loss"] and len(curve) >= 2
    run(built_project, "dvc", "plots", "show", "--json")


def test_second_repro_is_a_noop(built_project):
    before = {p: p.stat().st_mtime_ns for p in (built_project / "data").rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    proc = run(built_project, "dvc", "repro")
    elapsed = time.perf_counter() - t0
    assert "Running stage" not in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in (built_project / "data").rglob("*") if p.is_file()}
    assert before == after
    assert run(built_project, "dvc", "status", "--json").stdout.strip() in ("{}", "")
    print(f"no-op dvc repro: {elapsed:.2f} s")


def test_int8_model_beats_the_unchanged_input(built_project):
    import onnxruntime as ort

    root = built_project
    for e in EFFECTS:
        sess = ort.InferenceSession(str(root / f"data/mobile/{e}/student.int8.onnx"), providers=["CPUExecutionProvider"])
        df = pd.read_parquet(root / f"data/face_pairs/{e}/manifest.parquet")
        held = df[(df.status == "pass") & (df.split == "heldout")]
        assert len(held) >= 1
        gains = []
        for _, row in held.iterrows():
            src = read_png_rgb(root / f"data/face_pairs/{e}" / row.source).astype(np.float32) / 255
            tgt = read_png_rgb(root / f"data/face_pairs/{e}" / row.target).astype(np.float32) / 255
            x = src.transpose(2, 0, 1)[None]
            (y,) = sess.run(None, {sess.get_inputs()[0].name: x})
            assert y.shape == x.shape
            out = y[0].transpose(1, 2, 0)
            psnr = lambda a, b: 10 * np.log10(1.0 / np.mean((a - b) ** 2))  # noqa: E731
            gains.append(psnr(out, tgt) - psnr(src, tgt))
        assert np.mean(gains) > 0, f"{e}: int8 student is no closer to the teacher than the input ({gains})"


def test_report_table_lists_each_effect(built_project):
    out = run(built_project, "fxassets", "report").stdout
    for e in EFFECTS:
        assert e in out
    assert "student.int8.onnx" in out and "grid.png" in out
    assert "- (-)" not in out  # the latencies, from the stage's run log
