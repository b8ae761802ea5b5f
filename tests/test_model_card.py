"""The mobile model card: license found in SOURCE.md, every section rendered, missing inputs said, links relative."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fxassets.export.model_card import render_model_card, source_license, write_model_card

SOURCE_MD = """# Sample faces

`a.jpg`, `b.jpg`: portraits from the **Some Set**: A. Author (2017), figshare,
https://doi.org/10.0/x, licensed **CC BY 4.0** (https://creativecommons.org/licenses/by/4.0/).

**Changes made here:** downscaled to 512x512.

**Consent and limits:** everyone consented to research use.
"""

REPORT = {
    "size": 64, "opset": 18, "fp32_bytes": 4_000_000, "int8_bytes": 1_200_000, "ort_bytes": 1_500_000,
    "fp32_ms_1t": 9.0, "int8_ms_1t": 6.0, "ort_ms_1t": 5.9, "latency_runs": 50, "heldout_pairs": 12,
    "parity_psnr_db": 36.0, "parity_min_psnr_db": 35.0, "ort_parity_psnr_db": 36.0, "min_parity_db": 38.0,
    "parity_ok": False, "int8_psnr_db": 25.9, "fp32_psnr_db": 26.2, "identity_psnr_db": 16.6,
    "calibration_method": "percentile", "calibration_samples": 16,
    "ort": {"target_platform": "arm", "ops": ["ai.onnx;11;Conv", "com.microsoft;1;QLinearConv"]},
    "nodes_in_float": ["node_cat_3", "node_Conv_924"],
    "float_fallback": {"chosen_round": 1, "rounds": [
        {"round": 0, "parity_psnr_db": 35.5},
        {"round": 1, "parity_psnr_db": 36.0, "kept_float": {"tensor": "cat_3"}, "nodes_added": ["node_cat_3", "node_Conv_924"]},
        {"round": 2, "stopped": "no candidate improved parity on the calibration images"},
    ]},
    "student": {"encoder": "mobilenetv3_small_100", "width": 1.0, "params": 1046380},
    "versions": {"torch": "2", "onnx": "1", "onnxruntime": "1.32.0"},
}
FILES = {"fp32": "student.onnx", "int8": "student.int8.onnx", "ort": "student.int8.ort", "grid": "grid.png",
         "report": "report.json"}


def test_source_license(tmp_path: Path):
    (tmp_path / "SOURCE.md").write_text(SOURCE_MD)
    lic = source_license(tmp_path)
    assert lic["license"] == "CC BY 4.0" and lic["file"] == str(tmp_path / "SOURCE.md")
    assert any("A. Author (2017)" in p for p in lic["attribution"])
    assert any("Changes made here" in p for p in lic["attribution"])  # CC BY asks to say what was changed
    assert any("consented" in p for p in lic["limits"])
    assert source_license(tmp_path / "nowhere") == {"file": None, "license": None, "attribution": [], "limits": []}
    assert source_license(None)["license"] is None


def test_render_every_section(tmp_path: Path):
    (tmp_path / "SOURCE.md").write_text(SOURCE_MD)
    md = render_model_card(
        effect="cartoon", report=REPORT, student=REPORT["student"], files=FILES,
        train_metrics={"heldout_psnr": 26.26, "heldout_ssim": 0.896, "identity_psnr": 16.61, "identity_ssim": 0.675,
                       "steps": 1200, "train_seconds": 240.0},
        pairs_summary={"kept": 100, "rejected": 2, "rejected_by_reason": {"no face": 2}, "train_pairs": 88,
                       "heldout_pairs": 12},
        people={"train": 88, "heldout": 12}, teacher={"kind": "classical", "style": "cartoon", "hash": "d1c470a6"},
        source=source_license(tmp_path),
    )
    for heading in ("## Files", "## Latency", "## int8 parity", "## Quality on held-out people", "## Student",
                    "## Training data", "## Teacher fingerprint", "## Limits"):
        assert heading in md, heading
    assert "1,046,380-parameter" in md and "the `classical` teacher (style `cartoon`)" in md
    assert "| `student.int8.ort` |" in md and "1.50 MB" in md and "target arm" in md
    # no clock in the card, an output reproduced byte for byte: the times are the run's (fxassets report, bench)
    assert "| 6.00 |" not in md and "240" not in md and "`fxassets bench --effect cartoon`" in md
    assert "**FAILED**" in md and "| 1 | `cat_3` | `node_cat_3`, `node_Conv_924` | 36.00 |" in md
    assert "| 2 | no candidate improved" in md
    assert "| student, PyTorch fp32 (training evaluation) | 26.26 | 0.896 |" in md
    assert "| pairs kept / rejected | 100 / 2 (no face: 2) |" in md and "| people (train / held-out) | 88 / 12" in md
    assert "| source photos license | CC BY 4.0 |" in md and "> `a.jpg`, `b.jpg`: portraits" in md
    assert "| `hash` | `d1c470a6` |" in md
    assert "](grid.png)" in md


def test_render_says_what_is_missing():
    md = render_model_card(effect="sketch", report=REPORT, student=REPORT["student"], files=FILES)
    assert "unknown (no SOURCE.md beside the photos)" in md and "unknown (no teacher.json given)" in md
    assert "training evaluation" not in md and "a teacher" in md


def test_write_model_card_links_relative(tmp_path: Path):
    out = tmp_path / "mobile"
    out.mkdir()
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    (pairs_dir / "summary.json").write_text(json.dumps({"kept": 3, "rejected": 0, "train_pairs": 2, "heldout_pairs": 1}))
    (tmp_path / "teacher.json").write_text(json.dumps({"kind": "classical", "hash": "abc"}))
    pairs = pd.DataFrame({"split": ["train", "train", "heldout"], "person_id": ["a", "b", "c"]})
    files = {k: out / v for k, v in FILES.items()}
    files["grid"] = tmp_path / "elsewhere" / "grid.png"
    text = write_model_card(out / "MODEL_CARD.md", REPORT, effect="cartoon", meta={"metrics": {"heldout_psnr": 25.0}},
                            files=files, train_metrics=tmp_path / "missing.json", pairs_dir=pairs_dir, pairs=pairs,
                            teacher_json=tmp_path / "teacher.json")
    assert (out / "MODEL_CARD.md").read_text() == text
    assert "](../elsewhere/grid.png)" in text and "| `student.onnx` |" in text
    assert "| people (train / held-out) | 2 / 1" in text and "| `hash` | `abc` |" in text
    assert "| student, PyTorch fp32 (training evaluation) | 25.00 |" in text  # from the checkpoint's metadata
