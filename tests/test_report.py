"""The summary table `make run` prints: effects that built, and one line per effect that did not."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fxassets.cli import main
from fxassets.core.config import load_params
from fxassets.core.paths import EffectPaths
from fxassets.core.runlog import write_run_log
from fxassets.cli.report import effect_rows, format_table

REPO = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def _built(root: Path, effect: str, parity: float, gate_passed: bool = True) -> None:
    p = EffectPaths(root, effect)
    p.mobile_dir.mkdir(parents=True)
    p.pairs_dir.mkdir(parents=True)
    p.student_dir.mkdir(parents=True)
    p.onnx_int8.write_bytes(b"model")
    p.grid.write_bytes(b"png")
    (p.pairs_dir / "summary.json").write_text(json.dumps({"kept": 100, "rejected": 2}))
    (p.pairs_dir / "gate.json").write_text(json.dumps({"passed": gate_passed, "set_checks": [
        {"check": "pass_rate", "observed": 0.5, "passed": gate_passed, "rule": ">= 0.8"}]}))
    p.train_metrics.write_text(json.dumps({"heldout_psnr": 28.1, "heldout_ssim": 0.91, "identity_psnr": 17.4}))
    p.mobile_report.write_text(json.dumps({"parity_psnr_db": parity, "parity_ok": parity >= 38.0,
                                           "min_parity_db": 38.0, "heldout_pairs": 12, "int8_psnr_db": 28.0}))
    write_run_log(root, "mobile_model", effect, {"int8_ms_1t": 3.4, "fp32_ms_1t": 6.0})  # the latencies are the run's


def test_a_failed_parity_gate_is_one_line_with_figure_bound_and_what_to_do(tmp_path, capsys, monkeypatch):
    root = _project(tmp_path)
    _built(root, "cartoon", 45.0)
    _built(root, "sketch", 37.3)
    rows = effect_rows(load_params(root / "params.yaml"), root)
    assert rows[0]["failed"] is None
    line = rows[1]["failed"]
    assert "37.30 dB" in line and "38.00 dB" in line and "effects.sketch.export." in line
    assert "dvc repro mobile_model@sketch" in line
    text = format_table(rows)
    assert text.splitlines()[2].split()[:3] == ["cartoon", "built", "100/2"]
    assert text.splitlines()[3].split() == ["sketch", "not", "built"]  # its figures are not those of a built model
    assert text.splitlines()[-1] == f"FAILED {line}"
    monkeypatch.chdir(root)
    assert main(["report"]) == 1  # make run's exit status
    assert "FAILED sketch" in capsys.readouterr().out


def test_gate_failure_stale_stage_and_missing_model(tmp_path, monkeypatch, capsys):
    root = _project(tmp_path)
    _built(root, "cartoon", 45.0, gate_passed=False)
    rows = effect_rows(load_params(root / "params.yaml"), root)
    assert "pair quality gate failed: pass_rate 0.5 (rule: >= 0.8)" in rows[0]["failed"]
    assert "effects.cartoon.quality" in rows[0]["failed"]
    assert rows[1]["failed"].startswith("sketch: not built")
    # an effect whose files look fine but whose stage `dvc status` lists as changed did not build this time
    _built(root, "sketch", 45.0)
    status = {"student_checkpoint@sketch": [{"changed outs": {}}]}
    rows = effect_rows(load_params(root / "params.yaml"), root, dvc_status=status)
    assert "student_checkpoint@sketch failed or did not run" in rows[1]["failed"]
    (root / "status.json").write_text(json.dumps(status))
    monkeypatch.chdir(root)
    assert main(["report", "--dvc-status", "status.json"]) == 1
    (root / "bad.json").write_text("{not json")
    assert main(["report", "--dvc-status", "bad.json"]) == 2
    assert "bad.json: not the output of `dvc status --json`" in capsys.readouterr().err


def test_all_built_exits_zero(tmp_path, monkeypatch, capsys):
    root = _project(tmp_path)
    _built(root, "cartoon", 45.0)
    _built(root, "sketch", 42.0)
    monkeypatch.chdir(root)
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out and "max_seconds" not in out
    from fxassets.core.machine import cpu_info

    assert f"latencies measured on: {cpu_info()['model']}" in out  # the run log's machine, beside its figures
    assert "3.40 (6.00)" in out.splitlines()[2]  # int8 (fp32) ms, from the mobile_model stage's run log
    # a training cut short by a user's wall-clock cap is said under the table
    m = EffectPaths(root, "sketch").train_metrics
    m.write_text(json.dumps({**json.loads(m.read_text()), "steps": 964, "planned_steps": 1600, "capped": True}))
    assert main(["report"]) == 0
    assert "sketch: training stopped at train.max_seconds after 964 steps of the planned 1600" in capsys.readouterr().out


def test_an_effect_not_built_yet_is_listed_as_not_built(tmp_path, monkeypatch, capsys):
    root = _project(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["effects"]["oil"] = {"prompt": "an oil painting"}  # added to params.yaml, never built
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _built(root, "cartoon", 45.0)
    _built(root, "sketch", 42.0)
    monkeypatch.chdir(root)
    assert main(["report"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines[2:5]] == [["cartoon", "built"], ["sketch", "built"], ["oil", "not"]]
    assert lines[4].split() == ["oil", "not", "built"] and lines[-1].startswith("FAILED oil: not built")
