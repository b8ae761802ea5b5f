"""mobile_model stage: ONNX export, int8 quantization, parity, latency, grid and report (small and fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from torch import nn

import fxassets.export.fallback as ex_fallback
import fxassets.export.latency as ex_latency
import fxassets.export.ort_format as ex_ort
import fxassets.export.quantize as ex_quantize
import fxassets.export.session as ex_session
import fxassets.export.stage as ex_stage
from fxassets.core.config import ExportConfig
from fxassets.export.stage import ParityError, export_mobile
from fxassets.export.onnx_export import export_onnx
from fxassets.export.latency import latency_ms
from fxassets.core.metrics import psnr
from fxassets.export.quantize import quantize_int8
from fxassets.export.grid import make_grid
from fxassets.core.images import read_png_rgb, write_png

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


class WideNarrow(nn.Module):
    """Two branches concatenated: A with a huge range (x1000), B with a small one; a 1x1 conv mixes them, scaling A
    back down.  One uint8 range for the Concat rounds B to nothing (minmax parity < 20 dB); keeping the Concat and
    its reader in float restores it (> 50 dB): the case the float fallback is for."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.b = nn.Conv2d(3, 8, 3, 1, 1)
        self.mix = nn.Conv2d(16, 3, 1)
        with torch.no_grad():
            self.a.weight.mul_(1000.0)
            self.a.bias.mul_(1000.0)
            self.mix.weight[:, :8].mul_(1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), torch.relu(self.b(x))], 1)
        return torch.clamp(x + self.mix(y), 0.0, 1.0)


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
    import fxassets.train.student as student

    monkeypatch.setattr(student, "load_student", lambda path: (standin(), {"encoder": "standin", "width": 1.0}))
    ckpt = tmp_path / "student.safetensors"
    ckpt.write_bytes(b"placeholder")
    return ckpt


@pytest.fixture
def patched_wide_narrow(monkeypatch, tmp_path):
    import fxassets.train.student as student

    monkeypatch.setattr(student, "load_student",
                        lambda path: (WideNarrow().eval(), {"encoder": "wide-narrow", "width": 1.0}))
    ckpt = tmp_path / "student.safetensors"
    ckpt.write_bytes(b"placeholder")
    return ckpt


@pytest.fixture(scope="module")
def wide_narrow(tmp_path_factory):
    path = tmp_path_factory.mktemp("wn") / "wn.onnx"
    export_onnx(WideNarrow().eval(), path, size=SIZE)
    return path


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    info = export_onnx(standin(), path, size=SIZE)
    return path, info


def _sess(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [ex_session.to_input(_image(rng)) for _ in range(n)]


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


def test_quantize_format_and_types_for_comparison(fp32_model, tmp_path):
    """The pipeline's choices are the defaults (QDQ: no QLinearConv in the file); QOperator, s8 activations and
    per-tensor weights are options for comparing them."""
    path, _ = fp32_model
    qdq = quantize_int8(path, tmp_path / "qdq.onnx", _inputs(2, 2))
    qop = quantize_int8(path, tmp_path / "qop.onnx", _inputs(2, 2), quant_format="qoperator", per_channel=False)
    assert "QLinearConv" not in qdq["ops"] and qop["ops"]["QLinearConv"] > 0 and qop["per_channel"] is False
    quantize_int8(path, tmp_path / "s8.onnx", _inputs(2, 2), activations="s8")
    kinds = {i.data_type for i in onnx.load(str(tmp_path / "s8.onnx")).graph.initializer if i.name.endswith("zero_point")}
    assert onnx.TensorProto.INT8 in kinds and onnx.TensorProto.UINT8 not in kinds  # (and int32 for the biases)
    with pytest.raises(ValueError, match="quant_format"):
        quantize_int8(path, tmp_path / "x.onnx", _inputs(1, 2), activations="u16")


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


class Flat(nn.Module):
    """An activation pinned at 0.5 give or take a few float32 steps (like an untrained squeeze-excite gate)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.c.weight.fill_(1e-7)
            self.c.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x + 1e-3 * self.c(x), 0.0, 1.0)


def test_percentile_falls_back_to_minmax_when_a_range_cannot_be_binned(tmp_path):
    path = tmp_path / "flat.onnx"
    export_onnx(Flat().eval(), path, size=32)
    calibration = [ex_session.to_input(_image(np.random.default_rng(i), 32)) for i in range(2)]
    info = quantize_int8(path, tmp_path / "q.onnx", calibration, method="percentile")
    assert info["method_requested"] == "percentile" and info["method"] == "minmax" and info["percentile"] is None


def test_quantize_nodes_to_exclude(fp32_model, tmp_path):
    path, _ = fp32_model
    pre = tmp_path / "pre.onnx"
    assert ex_quantize.preprocess_for_quant(path, pre)
    convs = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv"]
    base = quantize_int8(pre, tmp_path / "a.onnx", _inputs(2, 2), preprocess=False)
    info = quantize_int8(pre, tmp_path / "b.onnx", _inputs(2, 2), nodes_to_exclude=convs[-1:], preprocess=False)
    assert info["nodes_to_exclude"] == convs[-1:] and info["excluded_nodes"] == 1
    assert info["ops"]["QuantizeLinear"] < base["ops"]["QuantizeLinear"]
    with pytest.raises(ValueError, match="not in"):
        quantize_int8(pre, tmp_path / "c.onnx", _inputs(1, 2), nodes_to_exclude=["no_such_node"], preprocess=False)


def _parity_fn(fp32: Path, inputs: list[np.ndarray]):
    s32 = _sess(fp32)
    ref = [s32.run(None, {"image": x})[0] for x in inputs]

    def parity(path: Path) -> float:
        s = _sess(path)
        return float(np.mean([psnr(s.run(None, {"image": x})[0], r) for x, r in zip(inputs, ref)]))

    return parity


def test_activation_sensitivity_finds_the_shared_concat_range(wide_narrow, tmp_path):
    """qdq_loss_debug: the Concat's plain SQNR looks fine (the wide branch carries the norm); weighted by what the
    mixing conv reads, it is ~0 dB and ranks first; a Relu the quantizer folded away is not mistaken for error."""
    pre = tmp_path / "pre.onnx"
    assert ex_quantize.preprocess_for_quant(wide_narrow, pre)
    int8 = tmp_path / "q.onnx"
    quantize_int8(pre, int8, _inputs(4, 2), method="minmax", preprocess=False)
    rows = ex_fallback.activation_sensitivity(pre, int8, _inputs(2, 2))
    worst = rows[0]
    assert worst["tensor"] == "cat" and worst["score_db"] < 10.0 and worst["qdq_err_db"] > 40.0
    assert "node_cat" in worst["nodes"] and any("conv" in n for n in worst["nodes"])
    assert all(r["score_db"] > 20.0 for r in rows if r["tensor"] == "relu")


def test_float_fallback_restores_parity(wide_narrow, tmp_path):
    cal, ev = _inputs(6, 2), _inputs(3, 3)
    parity = _parity_fn(wide_narrow, ev)
    int8 = tmp_path / "q.onnx"
    q, rec = ex_fallback.quantize_with_fallback(wide_narrow, int8, cal, parity, 38.0, method="minmax", max_rounds=3)
    r0, r1 = rec["rounds"][0], rec["rounds"][1]
    assert r0["parity_psnr_db"] < 25.0  # plain int8: the narrow branch is rounded away
    assert r1["tried"][0]["tensor"] == "cat" and "node_cat" in r1["nodes_added"]  # ranked first; its region won
    assert r1["parity_psnr_db"] >= 38.0 and len(rec["rounds"]) == 2  # one round was enough
    assert rec["passed"] and rec["chosen_round"] == 1 and rec["nodes_in_float"] == q["nodes_to_exclude"]
    assert parity(int8) == pytest.approx(r1["parity_psnr_db"])
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]
    # a model that passes at once is quantized once, with nothing in float
    _, rec = ex_fallback.quantize_with_fallback(wide_narrow, tmp_path / "q2.onnx", cal, parity, 10.0, method="minmax")
    assert len(rec["rounds"]) == 1 and rec["nodes_in_float"] == [] and rec["passed"]


def _float_weight_convs(path: Path) -> set[str]:
    """Conv nodes of a QDQ model whose weight is a plain float initializer (no DequantizeLinear): kept in float."""
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    return {n.name for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits}


def test_float_ends_keep_the_image_the_first_conv_and_the_head_in_float(fp32_model, tmp_path):
    path, _ = fp32_model
    pre = tmp_path / "pre.onnx"
    assert ex_quantize.preprocess_for_quant(path, pre)
    model = onnx.load(str(pre))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    ends = ex_quantize.float_end_nodes(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert convs[0] in ends and convs[-1] in ends and not set(convs[1:-1]) & set(ends)
    assert {"Add", "DepthToSpace", "Clip"} <= {ops[n] for n in ends}  # the residual add, pixel shuffle, clamp
    assert ex_quantize.float_end_nodes(model, ["input"]) == [n for n in ends if n in ex_quantize.float_end_nodes(model, ["input"])]
    with pytest.raises(ValueError, match="unknown network end"):
        ex_quantize.float_end_nodes(model, ["middle"])

    plain, ends_q = tmp_path / "plain.onnx", tmp_path / "ends.onnx"
    quantize_int8(pre, plain, _inputs(4, 2), preprocess=False)
    info = quantize_int8(pre, ends_q, _inputs(4, 2), keep_float=["input", "output"], preprocess=False)
    assert info["float_end_nodes"] == ends and info["keep_float"] == ["input", "output"]
    q = onnx.load(str(ends_q))
    image = q.graph.input[0].name
    assert not [n for n in q.graph.node if n.op_type == "QuantizeLinear" and image in n.input]  # the image stays float
    assert {convs[0], convs[-1]} <= _float_weight_convs(ends_q)
    assert not _float_weight_convs(plain) and set(convs[1:-1]).isdisjoint(_float_weight_convs(ends_q))
    # the ends in float are closer to fp32 than all-int8 on images it was not calibrated on
    ev = _inputs(4, 7)
    parity = _parity_fn(pre, ev)
    assert parity(ends_q) > parity(plain)


def test_calibration_cache_is_reused_across_exclusions(fp32_model, tmp_path):
    path, _ = fp32_model
    cache = tmp_path / "ranges.json"
    good = quantize_int8(path, tmp_path / "a.onnx", _inputs(4, 2), calibration_cache=cache)
    assert cache.is_file() and good["method"] == "minmax"
    # a second call with the cache ignores its (useless) calibration images: the ranges come from the cache
    flat = [np.zeros((1, 3, SIZE, SIZE), np.float32)] * 2
    quantize_int8(path, tmp_path / "b.onnx", flat, calibration_cache=cache)
    quantize_int8(path, tmp_path / "c.onnx", flat)
    ev = _inputs(3, 5)
    parity = _parity_fn(path, ev)
    assert parity(tmp_path / "b.onnx") == pytest.approx(parity(tmp_path / "a.onnx"))
    assert parity(tmp_path / "c.onnx") < parity(tmp_path / "a.onnx") - 3.0


def test_float_fallback_tries_every_candidate(wide_narrow, tmp_path):
    cal, ev = _inputs(6, 2), _inputs(3, 3)
    parity = _parity_fn(wide_narrow, ev)
    _, every = ex_fallback.quantize_with_fallback(wide_narrow, tmp_path / "a.onnx", cal, parity, 38.0, method="minmax",
                                         max_rounds=1, candidates=0)
    _, two = ex_fallback.quantize_with_fallback(wide_narrow, tmp_path / "b.onnx", cal, parity, 38.0, method="minmax",
                                       max_rounds=1, candidates=2)
    assert len(two["rounds"][1]["tried"]) == 2 < len(every["rounds"][1]["tried"])
    assert every["candidates"] == 0 and every["judge_images"] == 6


def test_auto_calibration_keeps_the_closest_to_fp32(fp32_model, tmp_path):
    path, _ = fp32_model
    cal, ev = _inputs(6, 2), _inputs(3, 3)
    q, rec = ex_fallback.quantize_with_fallback(path, tmp_path / "q.onnx", cal, _parity_fn(path, ev), 10.0, method="auto")
    tried = rec["calibrations"]
    assert [(c["method"], c["percentile"]) for c in tried] == list(ex_fallback.AUTO_CALIBRATIONS)
    best = max(tried, key=lambda c: c["calibration_parity_db"])
    assert (q["method"], q["percentile"]) == (best["method"], best["percentile"])
    assert rec["rounds"][0]["calibration_parity_db"] == best["calibration_parity_db"]
    assert len({round(c["calibration_parity_db"], 3) for c in tried}) > 1  # the calibrations do differ
    _, one = ex_fallback.quantize_with_fallback(path, tmp_path / "m.onnx", cal, _parity_fn(path, ev), 10.0, method="minmax")
    assert [c["method"] for c in one["calibrations"]] == ["minmax"]


def test_convert_to_ort_matches_int8(fp32_model, tmp_path):
    path, _ = fp32_model
    int8 = tmp_path / "m.int8.onnx"
    quantize_int8(path, int8, _inputs(2, 2))
    info = ex_ort.convert_to_ort(int8, tmp_path / "m.int8.ort")
    ort_path = Path(info["path"])
    assert ort_path.is_file() and info["bytes"] == ort_path.stat().st_size and info["target_platform"] == "arm"
    assert any("QLinearConv" in line for line in info["ops"])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.int8.onnx", "m.int8.ort"]
    s8, so = _sess(int8), _sess(ort_path)
    for x in _inputs(2, 7):
        assert np.max(np.abs(so.run(None, {"image": x})[0] - s8.run(None, {"image": x})[0])) < 1e-5
    with pytest.raises(FileNotFoundError):
        ex_ort.convert_to_ort(tmp_path / "nope.onnx", tmp_path / "nope.ort")


def test_convert_to_ort_writes_the_same_bytes_in_every_process(fp32_model, tmp_path):
    """onnxruntime writes the .ort's kernel type string resolver in its process's hash order (absl seeds it per
    process); convert_to_ort writes it in one order (canonical_ort)."""
    path, _ = fp32_model
    int8 = tmp_path / "m.int8.onnx"
    quantize_int8(path, int8, _inputs(2, 2))
    code = "import sys; from fxassets.export.ort_format import convert_to_ort; convert_to_ort(sys.argv[1], sys.argv[2])"
    files = [tmp_path / f"{i}.ort" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(int8), str(f)], check=True, capture_output=True)
    assert len({f.read_bytes() for f in files}) == 1
    assert ex_ort.canonical_ort(files[0].read_bytes()) == files[0].read_bytes()


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
    both = ex_latency.latency_compare({"a": path, "b": path}, runs=4, warmup=1, rounds=2)
    assert set(both) == {"a", "b"}
    cpu = ex_latency.latency_compare({"a": path}, runs=4, warmup=1, clock="cpu")  # this thread's CPU time
    assert 0.0 < cpu["a"] < 1000.0
    with pytest.raises(ValueError, match="threads must be 1"):
        ex_latency.latency_compare({"a": path}, threads=2, runs=2, clock="cpu")
    ops = ex_latency.op_profile(path, runs=3, warmup=1)  # onnxruntime's profiler, per operator type
    assert "Conv" in ops and all(v >= 0 for v in ops.values())
    assert ops["total"] == pytest.approx(sum(v for k, v in ops.items() if k != "total"), abs=1e-3)


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
    ort_file, card = p["out_dir"] / "student.int8.ort", p["out_dir"] / "MODEL_CARD.md"  # default places
    assert ort_file.is_file() and card.is_file()
    assert "![before / teacher / student int8 on held-out people](grid.png)" in card.read_text()
    assert not [x for x in p["out_dir"].iterdir() if x.name.startswith(".")]  # no scratch left behind
    on_disk = json.loads(p["report_json"].read_text())
    for key in ex_stage.REPORT_KEYS:
        assert key in on_disk, key
    assert on_disk["heldout_pairs"] == 6 and on_disk["calibration_samples"] == 4
    assert on_disk["parity_psnr_db"] >= 30.0 and on_disk["parity_ok"]
    assert on_disk["fp32_bytes"] == p["onnx_fp32"].stat().st_size
    assert on_disk["int8_bytes"] == p["onnx_int8"].stat().st_size
    assert report["fp32_ms_1t"] > 0 and report["int8_ms_1t"] > 0 and report["cpu"]["model"]  # the run's figures:
    assert not {"fp32_ms_1t", "int8_ms_1t", "ort_ms_1t", "cpu"} & set(on_disk)  # returned, not in the output
    assert "quantize_s" not in on_disk["quant"] and "convert_s" not in on_disk["ort"]
    assert 0 < on_disk["identity_psnr_db"] < 100
    assert report["parity_psnr_db"] == pytest.approx(on_disk["parity_psnr_db"])
    assert on_disk["ort_bytes"] == ort_file.stat().st_size and report["ort_ms_1t"] > 0
    assert on_disk["ort_vs_int8_max_abs_diff"] < 1e-5 and on_disk["ort_parity_psnr_db"] >= 30.0
    assert len(on_disk["float_fallback"]["rounds"]) == 1 and on_disk["nodes_in_float"] == []
    grid = read_png_rgb(p["grid_png"])
    assert grid.shape == (22 + 2 * SIZE + 4, 3 * SIZE + 2 * 4, 3)  # 2 people x (before, teacher, student)


def test_export_mobile_parity_error_still_writes_report(tmp_path, patched_student):
    pairs = make_pairs(tmp_path / "pairs", train_people=2, heldout_people=1, per_person=1)
    p = stage_paths(tmp_path)
    cfg = ExportConfig(calibration_samples=2, latency_runs=1, min_parity_db=99.0)
    with pytest.raises(ParityError, match=r"parity PSNR .* below export.min_parity_db = 99.00 dB") as exc:
        export_mobile(patched_student, pairs, cfg, progress=False, **p)
    report = json.loads(p["report_json"].read_text())
    assert report["parity_ok"] is False and report["min_parity_db"] == 99.0
    assert exc.value.report["parity_ok"] is False and exc.value.report["int8_ms_1t"] > 0  # with the run's figures


def test_export_mobile_float_fallback_passes_the_gate(tmp_path, patched_wide_narrow):
    pairs = make_pairs(tmp_path / "pairs", train_people=3, heldout_people=2, per_person=1)
    p = stage_paths(tmp_path)
    cfg = ExportConfig(calibration_method="minmax", calibration_samples=3, latency_runs=2, grid_samples=1,
                       min_parity_db=38.0, keep_float=[])  # the mix conv in float (the default) would pass at once
    report = export_mobile(patched_wide_narrow, pairs, cfg, progress=False, effect="toon",
                           onnx_ort=p["out_dir"] / "m.ort", model_card=p["out_dir"] / "card.md", **p)
    fb = report["float_fallback"]
    assert fb["rounds"][0]["parity_psnr_db"] < 38.0 <= report["parity_psnr_db"] and report["parity_ok"]
    assert "node_cat" in report["nodes_in_float"] and fb["chosen_round"] >= 1
    assert report["ort_parity_psnr_db"] >= 38.0
    on_disk = json.loads(p["report_json"].read_text())
    kept = on_disk["float_fallback"]["rounds"][1]["kept_float"]["tensor"]
    card = (p["out_dir"] / "card.md").read_text()
    assert card.startswith("# `toon` face effect") and f"| 1 | `{kept}` | " in card and "**passed**" in card


def test_export_mobile_fallback_is_bounded(tmp_path, patched_wide_narrow):
    pairs = make_pairs(tmp_path / "pairs", train_people=2, heldout_people=1, per_person=1)
    p = stage_paths(tmp_path)
    cfg = ExportConfig(calibration_method="minmax", calibration_samples=2, latency_runs=1, max_float_fallback=0,
                       keep_float=[])
    with pytest.raises(ParityError, match=r"max_float_fallback = 0"):
        export_mobile(patched_wide_narrow, pairs, cfg, progress=False, **p)
    report = json.loads(p["report_json"].read_text())
    assert report["parity_ok"] is False and len(report["float_fallback"]["rounds"]) == 1
    assert "**FAILED**" in (p["out_dir"] / "MODEL_CARD.md").read_text()


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
    student = pytest.importorskip("fxassets.train.student")
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
