"""mobile_model stage: ONNX export, int8 quantization, parity, latency, grid and report (small and fast)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from torch import nn

from fxassets import export as ex
from fxassets.config import ExportConfig
from fxassets.export import ParityError, export_mobile, export_onnx, latency_ms, psnr, quantize_int8
from fxassets.grid import make_grid
from fxassets.images import read_png_rgb, write_png

SIZE = 64


class StandIn(nn.Module):
    """A tiny image-to-image net shaped like the student: strided encoder, SE gate, hard-swish, residual, clamp."""

    def __init__(self, ch: int = 16):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, ch, 3, 2, 1), nn.BatchNorm2d(ch), nn.ReLU(),
                                 nn.Conv2d(ch, ch, 3, 1, 1, groups=ch), nn.Hardswish())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, 8, 1), nn.ReLU(), nn.Conv2d(8, ch, 1),
                                nn.Hardsigmoid())
        self.dec = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.ReLU(), nn.Conv2d(ch, 12, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.enc(x)
        y = y * self.se(y)
        return torch.clamp(x + torch.nn.functional.pixel_shuffle(self.dec(y), 2), 0.0, 1.0)


def standin() -> nn.Module:
    torch.manual_seed(0)
    m = StandIn()
    with torch.no_grad():
        m.dec[-1].weight.mul_(0.5)
    return m.eval()


def _image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A smooth random RGB face stand-in (uint8 HxWx3)."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def make_pairs(root: Path, train_people: int = 5, heldout_people: int = 3, per_person: int = 2,
               heldout_status: str = "pass", size: int = SIZE) -> Path:
    """A face_pairs folder: source/target PNGs and manifest.parquet (one rejected pair thrown in)."""
    rng = np.random.default_rng(1)
    rows = []
    people = [("train", f"t{i}") for i in range(train_people)] + [("heldout", f"h{i}") for i in range(heldout_people)]
    for split, person in people:
        for k in range(per_person):
            sid = f"{person}_{k}"
            src = _image(rng, size)
            tgt = cv2.GaussianBlur(255 - src, (5, 5), 0)  # some "effect"
            write_png(root / "source" / f"{sid}.png", src)
            write_png(root / "target" / f"{sid}.png", tgt)
            rows.append(dict(sample_id=sid, person_id=person, split=split,
                             status=heldout_status if split == "heldout" else "pass", reason="",
                             source=f"source/{sid}.png", target=f"target/{sid}.png"))
    rows.append(dict(sample_id="zz_reject", person_id="t0", split="train", status="reject", reason="no face",
                     source="source/missing.png", target="target/missing.png"))
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet")
    return root


def stage_paths(tmp: Path) -> dict[str, Path]:
    out = tmp / "mobile"
    return dict(out_dir=out, onnx_fp32=out / "student.onnx", onnx_int8=out / "student.int8.onnx",
                grid_png=out / "grid.png", report_json=out / "report.json")


@pytest.fixture
def patched_student(monkeypatch, tmp_path):
    """`load_student` returns the stand-in; the checkpoint is a placeholder file."""
    import fxassets.student as student

    monkeypatch.setattr(student, "load_student", lambda path: (standin(), {"encoder": "standin", "width": 1.0}))
    ckpt = tmp_path / "student.safetensors"
    ckpt.write_bytes(b"placeholder")
    return ckpt


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    info = export_onnx(standin(), path, size=SIZE)
    return path, info


def _sess(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [ex.to_input(_image(rng)) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ unit tests


def test_psnr_conventions():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == 100.0
    b = a.copy()
    b[0, 0, 0] = 255  # one of 48 values off by the full range: mse = 1/48
    assert psnr(a, b) == pytest.approx(10 * np.log10(48))
    assert psnr(a.astype(np.float32), b.astype(np.float32) / 255) == pytest.approx(psnr(a, b))
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:2])


def test_export_onnx_matches_torch(fp32_model):
    path, info = fp32_model
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert info["torch_onnx_max_abs_diff"] < 1e-4
    assert info["opset"] == 18 and info["bytes"] == path.stat().st_size
    x = _inputs(1, 5)[0]
    y = _sess(path).run(None, {"image": x})[0]
    with torch.no_grad():
        ref = standin()(torch.from_numpy(x)).numpy()
    assert y.shape == (1, 3, SIZE, SIZE) and y.dtype == np.float32
    assert np.max(np.abs(y - ref)) < 1e-4


def test_export_onnx_restores_training_mode(tmp_path):
    m = standin().train()
    export_onnx(m, tmp_path / "m.onnx", size=32)
    assert m.training


def test_export_onnx_opset17(tmp_path):
    info = export_onnx(standin(), tmp_path / "m17.onnx", size=32, opset=17)
    assert info["opset"] == 17 and info["torch_onnx_max_abs_diff"] < 1e-4


def test_quantize_int8_parity(fp32_model, tmp_path):
    path, _ = fp32_model
    int8 = tmp_path / "m.int8.onnx"
    info = quantize_int8(path, int8, _inputs(6, 2), method="minmax")
    ops = info["ops"]
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    assert info["calibration_samples"] == 6 and info["bytes"] == int8.stat().st_size
    s32, s8 = _sess(path), _sess(int8)
    scores = []
    for x in _inputs(3, 3):
        y8 = s8.run(None, {"image": x})[0]
        assert y8.shape == (1, 3, SIZE, SIZE)
        scores.append(psnr(y8, s32.run(None, {"image": x})[0]))
    assert np.mean(scores) > 35.0


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_quantize_other_methods(fp32_model, tmp_path, method):
    path, _ = fp32_model
    info = quantize_int8(path, tmp_path / "q.onnx", _inputs(2, 2), method=method)
    assert info["method"] == method and info["ops"]["QuantizeLinear"] > 0


def test_quantize_exclusions_keep_se_and_hard_ops_float(fp32_model, tmp_path):
    path, _ = fp32_model
    counts = {}
    for mode in ("none", "se", "hard"):
        info = quantize_int8(path, tmp_path / f"{mode}.onnx", _inputs(2, 2), exclude=mode)
        counts[mode] = (info["excluded_nodes"], info["ops"]["QuantizeLinear"])
    assert counts["none"][0] == 0 < counts["se"][0] < counts["hard"][0]
    assert counts["none"][1] > counts["se"][1] > counts["hard"][1]
    with pytest.raises(ValueError, match="exclude"):
        quantize_int8(path, tmp_path / "x.onnx", _inputs(1, 2), exclude="all")


def test_bad_calibration_hurts_parity(fp32_model, tmp_path):
    """Calibrating on black frames only clips every real activation: parity collapses."""
    path, _ = fp32_model
    int8 = tmp_path / "bad.onnx"
    quantize_int8(path, int8, [np.zeros((1, 3, SIZE, SIZE), np.float32)] * 2)
    s32, s8 = _sess(path), _sess(int8)
    x = _inputs(1, 4)[0]
    assert psnr(s8.run(None, {"image": x})[0], s32.run(None, {"image": x})[0]) < 30.0


def test_quantize_errors(fp32_model, tmp_path):
    path, _ = fp32_model
    with pytest.raises(ValueError, match="no calibration"):
        quantize_int8(path, tmp_path / "q.onnx", [])
    with pytest.raises(ValueError, match="calibration method"):
        quantize_int8(path, tmp_path / "q.onnx", _inputs(1, 0), method="kl")
    with pytest.raises(FileNotFoundError):
        quantize_int8(tmp_path / "nope.onnx", tmp_path / "q.onnx", _inputs(1, 0))


def test_latency_ms(fp32_model):
    path, _ = fp32_model
    ms = latency_ms(path, threads=1, runs=3, warmup=1)
    assert 0.0 < ms < 1000.0
    both = ex.latency_compare({"a": path, "b": path}, runs=4, warmup=1, rounds=2)
    assert set(both) == {"a", "b"}


def test_make_grid_layout():
    cells = [[np.full((10, 12, 3), v, np.uint8) for v in (0, 100, 200)] for _ in range(2)]
    g = make_grid(cells, ["a", "b", "c"])
    assert g.shape == (22 + 2 * 10 + 4, 3 * 12 + 2 * 4, 3)
    with pytest.raises(ValueError):
        make_grid(cells, ["a", "b"])


# ------------------------------------------------------------------------------------------------ the stage


def test_export_mobile_writes_everything(tmp_path, patched_student):
    pairs = make_pairs(tmp_path / "pairs")
    p = stage_paths(tmp_path)
    cfg = ExportConfig(calibration_samples=4, latency_runs=3, grid_samples=2, min_parity_db=30.0)
    report = export_mobile(patched_student, pairs, cfg, progress=False, **p)
    for f in ("onnx_fp32", "onnx_int8", "grid_png", "report_json"):
        assert p[f].is_file(), f
    assert not [x for x in p["out_dir"].iterdir() if x.name.startswith(".")]  # no scratch left behind
    on_disk = json.loads(p["report_json"].read_text())
    for key in ex.REPORT_KEYS:
        assert key in on_disk, key
    assert on_disk["heldout_pairs"] == 6 and on_disk["calibration_samples"] == 4
    assert on_disk["parity_psnr_db"] >= 30.0 and on_disk["parity_ok"]
    assert on_disk["fp32_bytes"] == p["onnx_fp32"].stat().st_size
    assert on_disk["int8_bytes"] == p["onnx_int8"].stat().st_size
    assert on_disk["fp32_ms_1t"] > 0 and on_disk["int8_ms_1t"] > 0
    assert 0 < on_disk["identity_psnr_db"] < 100
    assert report["parity_psnr_db"] == pytest.approx(on_disk["parity_psnr_db"])
    grid = read_png_rgb(p["grid_png"])
    assert grid.shape == (22 + 2 * SIZE + 4, 3 * SIZE + 2 * 4, 3)  # 2 people x (before, teacher, student)


def test_export_mobile_parity_error_still_writes_report(tmp_path, patched_student):
    pairs = make_pairs(tmp_path / "pairs", train_people=2, heldout_people=1, per_person=1)
    p = stage_paths(tmp_path)
    cfg = ExportConfig(calibration_samples=2, latency_runs=1, min_parity_db=99.0)
    with pytest.raises(ParityError, match=r"parity PSNR .* below export.min_parity_db = 99.00 dB"):
        export_mobile(patched_student, pairs, cfg, progress=False, **p)
    report = json.loads(p["report_json"].read_text())
    assert report["parity_ok"] is False and report["min_parity_db"] == 99.0


def test_export_mobile_missing_checkpoint(tmp_path):
    pairs = make_pairs(tmp_path / "pairs", train_people=1, heldout_people=1, per_person=1)
    with pytest.raises(FileNotFoundError, match="no student checkpoint"):
        export_mobile(tmp_path / "nope.safetensors", pairs, ExportConfig(), progress=False, **stage_paths(tmp_path))


def test_export_mobile_empty_heldout(tmp_path, patched_student):
    pairs = make_pairs(tmp_path / "pairs", train_people=2, heldout_people=1, per_person=1, heldout_status="reject")
    with pytest.raises(ValueError, match="no held-out pairs"):
        export_mobile(patched_student, pairs, ExportConfig(), progress=False, **stage_paths(tmp_path))


def test_export_mobile_missing_manifest(tmp_path, patched_student):
    with pytest.raises(FileNotFoundError, match="manifest"):
        export_mobile(patched_student, tmp_path / "nowhere", ExportConfig(), progress=False, **stage_paths(tmp_path))


def test_export_mobile_real_student(tmp_path):
    """The real student (random init, edit head made non-zero) through the whole stage at 64x64."""
    student = pytest.importorskip("fxassets.student")
    torch.manual_seed(0)
    model = student.build_student()
    with torch.no_grad():
        nn.init.normal_(model.head[-1].weight, std=0.02)
    ckpt = tmp_path / "student.safetensors"
    student.save_student(model, ckpt, {"steps": 0})
    pairs = make_pairs(tmp_path / "pairs", train_people=3, heldout_people=2, per_person=1)
    p = stage_paths(tmp_path)
    cfg = ExportConfig(calibration_samples=3, latency_runs=2, grid_samples=2, min_parity_db=25.0)
    report = export_mobile(ckpt, pairs, cfg, progress=False, **p)
    assert report["torch_onnx_max_abs_diff"] < 1e-3
    assert report["parity_psnr_db"] >= 25.0
    assert report["ops_int8"].get("QuantizeLinear", 0) > 0
    assert report["student"]["encoder"] == student.DEFAULT_ENCODER
