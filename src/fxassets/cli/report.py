"""The summary table `make run` prints: one row per effect of params.yaml from the stages' own reports (an effect not
built yet too, marked so), and one line per effect that did not build (a failed quality or parity gate, a stage that
failed, no model yet), with the figure, the bound and what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fxassets.core.config import Params
from fxassets.core.paths import EffectPaths
from fxassets.core.machine import cpu_label
from fxassets.core.runlog import read_run_log


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _stale_effects(dvc_status: dict[str, Any] | None) -> dict[str, list[str]]:
    """effect -> its stages that `dvc status --json` lists as changed (not built as the lock file says)."""
    out: dict[str, list[str]] = {}
    for name in dvc_status or {}:
        stage, _, effect = str(name).partition("@")
        if effect:
            out.setdefault(effect, []).append(stage)
    return out


def effect_failure(params: Params, effect: str, root: Path = Path("."), stale: list[str] | None = None) -> str | None:
    """One line saying why `effect` did not build and what to do, or None when it built.

    Read from what the stages wrote: the face_pairs gate (`gate.json`), the int8 parity gate (`report.json`), a
    missing model; `stale`: the effect's stages `dvc status` lists as changed (a stage that failed, or did not run)."""
    p = EffectPaths(root, effect)
    rebuild = f"then `dvc repro mobile_model@{effect}`"
    gate = _load(p.pairs_dir / "gate.json")
    if gate and not gate.get("passed", True):
        failed = [c for c in gate.get("set_checks", []) if not c.get("passed")]
        what = "; ".join(f"{c['check']} {_fmt(c.get('observed'), '.3g' if isinstance(c.get('observed'), float) else '')}"
                         f" (rule: {c['rule']})" for c in failed) or "see gate.json"
        return (f"{effect}: the pair quality gate failed: {what}; loosen `effects.{effect}.quality` in params.yaml "
                f"(docs/quality.md) or fix the source photos, {rebuild}")
    mobile = _load(p.mobile_report)
    if mobile and mobile.get("parity_ok") is False:
        return (f"{effect}: int8 parity {mobile['parity_psnr_db']:.2f} dB (int8 against fp32 on "
                f"{mobile.get('heldout_pairs')} held-out faces) is below export.min_parity_db = "
                f"{mobile.get('min_parity_db', 0):.2f} dB; keep more in float (`effects.{effect}.export.max_float_fallback`"
                f", `effects.{effect}.export.keep_float`) or lower `effects.{effect}.export.min_parity_db` in params.yaml, "
                f"{rebuild}")
    if stale:
        return (f"{effect}: not built: {', '.join(f'{s}@{effect}' for s in stale)} failed or did not run (the error "
                f"is in the `dvc repro` output above); fix it, {rebuild}")
    if not p.onnx_int8.exists():
        return f"{effect}: not built (no {p.onnx_int8}); run `dvc repro mobile_model@{effect}`"
    return None


def effect_rows(params: Params, root: Path = Path("."), dvc_status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One dict per effect: the figures the stages reported, and `failed` (None, or the line `effect_failure`
    says).  `dvc_status`: the output of `dvc status --json`, when the driver has it."""
    rows = []
    stale = _stale_effects(dvc_status)
    for effect in params.effects:
        p = EffectPaths(root, effect)
        pairs = _load(p.pairs_dir / "summary.json")
        train = _load(p.train_metrics)
        mobile = _load(p.mobile_report)
        timed = read_run_log(root, "mobile_model", effect)  # latencies: the run's, not the output's (core.runlog)
        rows.append(
            {
                "effect": effect,
                "kept": pairs.get("kept"),
                "rejected": pairs.get("rejected"),
                "psnr_db": train.get("heldout_psnr"),
                "steps": train.get("steps"),
                "planned_steps": train.get("planned_steps"),
                "capped": bool(train.get("capped")),
                "ssim": train.get("heldout_ssim"),
                "identity_psnr_db": train.get("identity_psnr"),
                "int8_psnr_db": mobile.get("int8_psnr_db"),
                "int8_ms": timed.get("int8_ms_1t"),
                "fp32_ms": timed.get("fp32_ms_1t"),
                "cpu": timed.get("cpu"),
                "int8_model": str(p.onnx_int8) if p.onnx_int8.exists() else None,
                "grid": str(p.grid) if p.grid.exists() else None,
                "failed": effect_failure(params, effect, root, stale.get(effect)),
            }
        )
    return rows


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per effect of params.yaml (one that did not build says so, its figures left out), then one line per
    effect that did not build, saying why."""
    failed = [r["failed"] for r in rows if r.get("failed")]
    head = ["effect", "status", "kept/rejected", "PSNR dB (input)", "SSIM", "int8 ms (fp32)", "int8 model", "grid"]
    body = [
        [r["effect"], "not built"] if r.get("failed") else [
            r["effect"],
            "built",
            f"{_fmt(r['kept'])}/{_fmt(r['rejected'])}",
            f"{_fmt(r['psnr_db'], '.2f')} ({_fmt(r['identity_psnr_db'], '.1f')})",
            _fmt(r["ssim"], ".3f"),
            f"{_fmt(r['int8_ms'], '.2f')} ({_fmt(r['fp32_ms'], '.2f')})",
            _fmt(r["int8_model"]),
            _fmt(r["grid"]),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *(b + [""] * (len(head) - len(b)) for b in body))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    table = [line(head), line(["-" * w for w in widths]), *map(line, body)]
    capped = [f"note: {r['effect']}: training stopped at train.max_seconds after {r['steps']} steps of the planned "
              f"{r.get('planned_steps') or 'train.steps'}: the model depends on this machine's speed"
              for r in rows if r.get("capped") and not r.get("failed")]
    cpus = {cpu_label(c) for r in rows if (c := r.get("cpu"))}
    timed = [f"latencies measured on: {' / '.join(sorted(cpus))}"] if cpus else []
    return "\n".join(table + timed + capped + ([""] + [f"FAILED {f}" for f in failed] if failed else []))
