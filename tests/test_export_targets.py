"""export.targets: the LiteRT / ExecuTorch models beside the ORT model (tiny stand-in student, seconds each; the
runtime tests skip when the `mobile` extra or litert-torch is not installed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import fxassets.export.targets as ex_targets
from fxassets.core.config import ExportConfig, Params
from fxassets.export.session import model_session, run_model
from fxassets.export.stage import export_mobile
from test_export import SIZE, make_pairs, patched_student, stage_paths, standin  # noqa: F401 (the fixture)


def _cfg(targets, **kw):
    return ExportConfig(calibration_samples=4, latency_runs=2, grid_samples=1, min_parity_db=30.0, targets=targets, **kw)


def _export(tmp_path, ckpt, targets, **kw):
    pairs = make_pairs(tmp_path / "pairs", train_people=3, heldout_people=2, per_person=1)
    p = stage_paths(tmp_path)
    run = export_mobile(ckpt, pairs, _cfg(targets, **kw), progress=False, **p)
    return p, run, json.loads(p["report_json"].read_text())


def test_targets_config():
    assert ExportConfig().targets == ["ort", "litert"]
    assert ExportConfig(targets=["ort", "executorch", "ort"]).targets == ["ort", "executorch"]
    with pytest.raises(ValueError, match="'ort' must stay"):
        ExportConfig(targets=["litert"])
    with pytest.raises(ValueError):
        ExportConfig(targets=["ort", "tensorrt"])
    p = Params.model_validate({"effects": {"fx": {"prompt": "x", "export": {"targets": ["ort", "executorch"]}}}})
    assert p.export_for("fx").targets == ["ort", "executorch"]


def test_a_target_that_cannot_be_built_is_skipped_with_its_reason(tmp_path, patched_student, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("aten.foo is not supported\nmore detail")

    monkeypatch.setitem(ex_targets.BUILDERS, "executorch", broken)
    monkeypatch.setattr(ex_targets, "missing_package", lambda t: None if t == "executorch" else f"{t}: not here")
    p, run, report = _export(tmp_path, patched_student, ["ort", "litert", "executorch", "coreml"])
    t = report["targets"]
    assert t["ort"]["status"] == "ok" and report["parity_ok"]  # the ORT files as before
    assert t["litert"] == {"status": "skipped", "reason": "litert: not here"}
    assert t["executorch"]["status"] == "skipped"
    assert t["executorch"]["reason"] == "executorch export failed: RuntimeError: aten.foo is not supported"
    assert t["coreml"] == {"status": "skipped", "reason": "coreml: not here"}
    targets_dir = p["out_dir"] / "targets"
    assert sorted(f.name for f in targets_dir.iterdir()) == ["targets.json"]  # nothing half-written
    assert json.loads((targets_dir / "targets.json").read_text())["litert"]["status"] == "skipped"
    assert run["int8_ms_2t"] > 0 and run["ort_ms_2t"] > 0 and "litert_ms_1t" not in run
    card = (p["out_dir"] / "MODEL_CARD.md").read_text()
    assert "| litert | - | skipped |" in card


def test_a_target_below_the_gate_is_failed_and_kept(tmp_path, patched_student, monkeypatch):
    """A stand-in target (the int8 ONNX model under another name) judged like a real one: its parity against
    fp32 is below a gate of 99 dB, so it is reported failed, its file kept, and the stage's own gate unchanged."""
    p0, _, _ = _export(tmp_path / "a", patched_student, ["ort"])
    int8 = p0["onnx_int8"]

    def fake_build(target, model, calibration, out_dir, keep_float):
        shutil.copy(int8, Path(out_dir) / "fake.onnx")
        return {"file": "fake.onnx", "bytes": int8.stat().st_size, "float_ops": {}, "quantized_ops": {},
                "export_s": 0.1}

    monkeypatch.setattr(ex_targets, "build_target", fake_build)
    x = [np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)]
    ref = [run_model(model_session(p0["onnx_fp32"]), x[0])]
    tgt = [np.zeros((SIZE, SIZE, 3), np.uint8)]
    out = ex_targets.export_targets(["ort", "litert"], None, [], tmp_path / "t", ["input"], x, ref, tgt, 99.0)
    e = out["litert"]
    assert e["status"] == "failed" and "below export.min_parity_db = 99.00 dB; the file is kept" in e["reason"]
    assert 30 < e["parity_psnr_db"] < 99 and (tmp_path / "t" / "fake.onnx").is_file()


def test_float_ends_pick_the_nodes_reading_the_image_and_the_head():
    torch = pytest.importorskip("torch")
    gm = torch.export.export(standin(), (torch.rand(1, 3, SIZE, SIZE),)).module()
    names = lambda keep: sorted(str(n.target).split(".")[1] for n in ex_targets._float_nodes(gm, keep))  # noqa: E731
    assert names([]) == []
    assert names(["input"]) == ["add", "clamp", "conv2d"]  # the first conv, the residual add and on to the clamp
    assert names(["output"]) == ["add", "clamp", "conv2d", "pixel_shuffle"]  # the head's last conv onwards
    # a student with the learned colour map (train.colour_transform): the map's matmul of the image stays float too
    from fxassets.train.student import build_student, inference_form

    colour = inference_form(build_student(colour=True))
    gm = torch.export.export(colour, (torch.rand(1, 3, 64, 64),)).module()
    kept = names(["input"])
    assert "matmul" in kept and kept.count("conv2d") == 1 and "clamp" in kept


def _check_built(p, run, report, target, suffix):
    e = report["targets"][target]
    assert e["status"] == "ok", e
    f = p["out_dir"] / "targets" / f"student.int8{suffix}"
    assert e["file"] == f.name and e["bytes"] == f.stat().st_size
    assert e["parity_psnr_db"] >= 30.0 and e["parity_min_psnr_db"] <= e["parity_psnr_db"]
    assert run[f"{target}_ms_1t"] > 0 and run[f"{target}_ms_2t"] > 0 and f"{target}_ms_1t" not in report
    assert e["quantized_ops"] and e["float_ops"]  # the first conv (export.keep_float: input) stays float
    sess = model_session(f, 1)  # what `fxassets apply --engine` runs
    assert sess.get_inputs()[0].shape == [1, 3, SIZE, SIZE]
    y = run_model(sess, np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32))
    assert y.shape == (1, 3, SIZE, SIZE) and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
    assert f"`targets/{f.name}`" in (p["out_dir"] / "MODEL_CARD.md").read_text()


def test_litert_target(tmp_path, patched_student):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    p, run, report = _export(tmp_path, patched_student, ["ort", "litert"])
    _check_built(p, run, report, "litert", ".tflite")
    assert report["targets"]["litert"]["float_ops"].get("CONV_2D") == 1
    _runner_on(p["out_dir"] / "targets" / "student.int8.tflite", "litert")


def test_executorch_target(tmp_path, patched_student):
    pytest.importorskip("executorch")
    p, run, report = _export(tmp_path, patched_student, ["ort", "executorch"])
    _check_built(p, run, report, "executorch", ".pte")
    _runner_on(p["out_dir"] / "targets" / "student.int8.pte", "executorch")
    e = report["targets"]["executorch"]
    assert e["float_ops"].get("conv2d") == 1 and e["outside_xnnpack"].keys() <= {"dim_order_ops._to_dim_order_copy.default"}


def test_model_session_errors(tmp_path):
    for suffix in (".tflite", ".pte"):
        with pytest.raises(FileNotFoundError, match="model not found"):
            model_session(tmp_path / f"none{suffix}")


def test_apply_engines_read_the_target_files(tmp_path):
    """`fxassets apply --engine litert|executorch` runs data/mobile/E/targets/student.int8.{tflite,pte}."""
    from fxassets.cli.apply import make_runner

    p = Params.model_validate({"effects": {"fx": {"prompt": "x"}}})
    for engine, name in (("litert", "student.int8.tflite"), ("executorch", "student.int8.pte")):
        with pytest.raises(FileNotFoundError, match=rf"data/mobile/fx/targets/{name}: model not found"):
            make_runner(p, "fx", engine, root=tmp_path)


def _runner_on(path: Path, engine: str):
    from fxassets.core.config import FacesConfig
    from fxassets.runtime import EffectRunner

    runner = EffectRunner(FacesConfig(crop_size=SIZE), engine, model_path=path)
    crop = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    out = runner.run_crop(crop)
    runner.close()
    assert out.shape == crop.shape and out.dtype == np.uint8


def test_coreml_target_is_built_but_unverified(tmp_path, patched_student):
    pytest.importorskip("coremltools")
    p, run, report = _export(tmp_path, patched_student, ["ort", "coreml"])
    e = report["targets"]["coreml"]
    pkg = p["out_dir"] / "targets" / "student.w8.mlpackage"
    assert e["status"] == "unverified" and "Apple devices only" in e["reason"] and e["file"] == pkg.name
    assert (pkg / "Manifest.json").is_file() and e["bytes"] > 0 and e["activations"] == "fp16"
    assert "coreml_ms_1t" not in run and "coreml_export_s" in run
    manifest = json.loads((pkg / "Manifest.json").read_text())
    ids = sorted(manifest["itemInfoEntries"])
    ex_targets._canonical_manifest(pkg / "Manifest.json")  # the ids are the names', not random
    assert sorted(json.loads((pkg / "Manifest.json").read_text())["itemInfoEntries"]) == ids


def test_bench_lists_every_target(tmp_path, patched_student, monkeypatch):
    """`fxassets bench` names each target of export.targets with its build status; one not built says why."""
    from fxassets.cli.bench import bench_targets
    from fxassets.core.paths import EffectPaths

    monkeypatch.setattr(ex_targets, "missing_package", lambda t: f"{t}: not here")
    p = EffectPaths(tmp_path, "fx")
    pairs = make_pairs(tmp_path / "pairs", train_people=2, heldout_people=1, per_person=1)
    export_mobile(patched_student, pairs, _cfg(["ort", "litert"]), p.mobile_dir, p.onnx_fp32, p.onnx_int8, p.grid,
                  p.mobile_report, progress=False, onnx_ort=p.onnx_ort, targets_dir=p.mobile_targets)
    out = bench_targets(["ort", "litert", "executorch"], p, runs=2)
    assert out["ort"]["status"] == "ok" and out["ort"]["bytes"] == p.onnx_ort.stat().st_size
    assert out["litert"] == {"status": "skipped", "reason": "litert: not here"}
    assert out["executorch"]["status"] == "not built"
