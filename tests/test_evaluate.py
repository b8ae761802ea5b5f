"""`fxassets evaluate` and the student's generalization options: the metrics, the tile measure, bilinear
upsampling, the colour transform."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from fxassets.cli import main
from fxassets.evaluation import block_ratio, chroma, pair_scores, tile_ratio
from fxassets.export.onnx_export import export_onnx
from fxassets.export.quantize import float_end_nodes, preprocess_for_quant, quantize_int8
from fxassets.export.session import to_input
from fxassets.core.paths import EffectPaths
from fxassets.train.student import build_student, inference_form

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "data" / "samples" / "faces").glob("*.jpg"))


def _smooth(size: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)


def test_tile_ratio_finds_blocks_and_not_smooth_images():
    smooth = _smooth(256)
    rng = np.random.default_rng(1)
    blocks = np.repeat(np.repeat(rng.integers(100, 140, (8, 8, 3)), 32, 0), 32, 1).astype(np.uint8)
    tiled = np.clip(smooth.astype(int) + blocks - 120, 0, 255).astype(np.uint8)
    assert tile_ratio(smooth) < 1.3
    assert tile_ratio(tiled) > 3.0
    assert tile_ratio(np.full((64, 64, 3), 7, np.uint8)) == 1.0


def test_block_ratio_finds_a_pixel_shuffles_2x2_blocks_and_not_smooth_images():
    smooth = _smooth(256)
    rng = np.random.default_rng(2)
    half = rng.normal(0, 6, (128, 128, 3))  # a fine change, one value per 2x2 block as a 1x1-kernel head makes it
    blocky = np.clip(smooth + np.repeat(np.repeat(half, 2, 0), 2, 1), 0, 255).astype(np.uint8)
    assert block_ratio(smooth) < 1.2 and block_ratio(np.full((64, 64, 3), 7, np.uint8)) == 1.0
    assert block_ratio(blocky) > 5.0
    assert pair_scores(blocky, smooth, smooth)["block_excess"] > 5.0  # ... and the student's over the teacher's


def test_pair_scores_recovered_and_chroma():
    src = _smooth(64, 2)
    grey = np.repeat(cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)[..., None], 3, 2)
    perfect = pair_scores(grey, grey, src)
    nothing = pair_scores(src, grey, src)
    half = ((src.astype(np.float64) + grey) / 2 + 0.5).astype(np.uint8)
    assert perfect["recovered"] == pytest.approx(1.0) and perfect["chroma_error"] < 0.01
    assert nothing["recovered"] == pytest.approx(0.0) and nothing["chroma_error"] > 5
    assert 0.6 < pair_scores(half, grey, src)["recovered"] < 0.9  # half-way in pixels: 1 - 1/4 of the MSE
    assert chroma(grey).max() < 0.2 and nothing["teacher_chroma"] < 0.2  # OpenCV Lab rounding on greys


def test_bilinear_decoder_has_no_tiles_and_keeps_the_fast_inference_form():
    from fxassets.train.student import upsample2

    base = torch.from_numpy(_smooth(256, 3).transpose(2, 0, 1)[None].astype(np.float32) / 255)
    deep = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.2  # stride-32 features
    ratios = {}
    for mode in ("nearest", "bilinear"):
        y = deep
        for _ in range(5):  # stride 32 -> full resolution, as the decoder's stages and the head do
            y = upsample2(y, mode)
        img = ((base + y).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        ratios[mode] = tile_ratio(img)
        torch.manual_seed(0)
        m = build_student(upsample=mode).eval()
        with torch.no_grad():
            m.head[-1].weight.normal_(0, 0.2)
            assert torch.allclose(inference_form(m)(base), m(base), atol=1e-5)  # the 1x1 fuse still commutes
    assert ratios["nearest"] > 3.0 > 1.5 > ratios["bilinear"], ratios


def test_colour_transform_starts_as_identity_and_stays_float_in_int8(tmp_path):
    m = build_student(colour=True).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), x)  # identity for free, as without it
        m.colour.weight.copy_(torch.full((3, 3, 1, 1), 1 / 3))  # a grey-making matrix
        assert float(m(x).std(1).max()) < 1e-5
    onnx_path = tmp_path / "s.onnx"
    export_onnx(m, onnx_path, size=64)
    pre = tmp_path / "pre.onnx"
    preprocess_for_quant(onnx_path, pre)
    import onnx

    model = onnx.load(str(pre))
    readers = [n for n in model.graph.node if "image" in n.input]
    # the stem and the colour transform (a MatMul of the reshaped image) read the image, and stay float
    assert sum(n.op_type == "Conv" for n in readers) == 1 and any(n.op_type == "Reshape" for n in readers)
    kept = set(float_end_nodes(model, ["input"]))
    assert {n.name for n in readers} <= kept
    assert {n.name for n in model.graph.node if n.op_type == "MatMul"} <= kept


def _built_identity(root: Path, effect: str) -> None:
    """An untrained student (the identity) exported where the pipeline puts the int8 and fp32 models."""
    p = EffectPaths(root, effect)
    p.mobile_dir.mkdir(parents=True)
    export_onnx(build_student(), p.onnx_fp32, size=256)
    cal = [to_input(cv2.resize(cv2.cvtColor(cv2.imread(str(s)), cv2.COLOR_BGR2RGB), (256, 256))) for s in SAMPLES[:2]]
    quantize_int8(p.onnx_fp32, p.onnx_int8, cal, keep_float=["input"])


def test_evaluate_cli_reports_medians_faces_unusable_and_a_grid(tmp_path, monkeypatch, capsys):
    root = tmp_path
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    photos = root / "photos"
    photos.mkdir()
    for s in SAMPLES[:3]:
        shutil.copy(s, photos / s.name)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(photos / "wall.png"), np.full((300, 300, 3), 200, np.uint8))  # no face
    _built_identity(root, "sketch")
    monkeypatch.chdir(root)
    assert main(["evaluate", "--effect", "sketch", "--input", "photos", "--engine", "int8", "fp32", "--json",
                 "ev.json", "--grid", "grid.png", "--no-progress"]) == 0
    report = json.loads((root / "ev.json").read_text())
    assert report["effect"] == "sketch" and report["n"] == 3 and len(report["faces"]) == 3
    for engine in ("int8", "fp32"):
        m = report[engine]
        assert set(m) >= {"psnr_db", "ssim", "recovered", "chroma_error"}
        assert abs(m["recovered"]) < 0.02  # the identity reproduces none of the teacher's change
        assert m["psnr_db"] == pytest.approx(m["input_psnr_db"], abs=0.1)
        assert m["chroma_error"] > 5  # it keeps the colours the pencil sketch takes away
    reasons = {u["file"]: u["reason"] for u in report["unusable"]}
    assert set(reasons) == {"broken.jpg", "wall.png"} and "no face" in reasons["wall.png"]
    grid = cv2.imread(str(root / "grid.png"))
    assert grid is not None and grid.shape[0] > 3 * 256
    out = capsys.readouterr().out
    assert "sketch on photos: 3 faces, 2 photos unusable" in out and "recovered" in out
    # the teacher's outputs are cached: a second run does not call the teacher
    import fxassets.teachers.classical as classical

    monkeypatch.setattr(classical.ClassicalTeacherImpl, "edit", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert main(["evaluate", "--effect", "sketch", "--input", "photos", "--no-progress"]) == 0


def test_evaluate_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert main(["evaluate", "--effect", "sketch", "--input", "photos"]) == 2
    assert "student.int8.onnx: no built student" in capsys.readouterr().err
    _built_identity(tmp_path, "sketch")
    assert main(["evaluate", "--effect", "sketch", "--input", "nowhere"]) == 2
    assert "nowhere: no such photo or folder" in capsys.readouterr().err
    assert main(["evaluate", "--effect", "sketch", "--input", "photos"]) == 2
    assert "no JPEG / PNG photos" in capsys.readouterr().err
