"""What each stage left behind, as plain values for an asset's metadata (no Dagster imports here).

Read from the stage's output files, not from its stdout: when DVC restores a stage from its run-cache the stage
does not run, but the files are the same. The timings are not in those files (the same inputs give the same bytes):
they come from the stage's run log (fxassets.core.runlog), that of its last run here."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxassets.core.paths import EffectPaths
from fxassets.core.runlog import read_run_log


@dataclass(frozen=True)
class Markdown:
    text: str


@dataclass(frozen=True)
class Table:
    columns: tuple[tuple[str, str], ...]  # (name, type: string|int|float)
    rows: tuple[dict[str, Any], ...]


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _data_uri(png: Path | bytes, max_width: int = 768) -> str:
    """A downscaled JPEG data URI of an image, small enough for the event log."""
    from PIL import Image

    img = Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join("| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The numbers of a stage's report; a PSNR named without its unit (metrics.json's `heldout_psnr`) gets `_db`."""
    return {f"{prefix}{k}{'_db' if k.endswith('psnr') else ''}": v for k, v in d.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _run(p: EffectPaths, stage: str, *keys: str) -> dict[str, Any]:
    """The timings of the stage's last run: from its run log, never from its outputs (fxassets.core.runlog)."""
    log = read_run_log(p.root, stage, p.effect)
    return {k: log[k] for k in keys if k in log}


def prompts(p: EffectPaths) -> dict[str, Any]:
    recs = _jsonl(p.prompts)
    out: dict[str, Any] = {"samples": len(recs), "people": len({r.get("person_id") for r in recs})}
    if recs:
        out["prompt"] = recs[0].get("prompt", "")
        out["negative_prompt"] = recs[0].get("negative_prompt", "")
    return out


def teacher_images(p: EffectPaths) -> dict[str, Any]:
    recs = _jsonl(p.teacher_records)
    fp = _json(p.teacher_dir / "teacher.json")
    ok = sum(r.get("status") == "ok" for r in recs)
    return {
        "samples": len(recs), "ok": ok, "errors": len(recs) - ok,
        **_run(p, "teacher_images", "seconds_per_sample", "computed", "cached", "ray"),  # ray: the actor pool's run
        "teacher_fingerprint": fp.get("hash", ""),
        "teacher": fp,
    }


def _pair_strip(p: EffectPaths, n: int = 4) -> str | None:
    """A few aligned source -> target pairs side by side (top row source, bottom row teacher)."""
    from PIL import Image

    srcs = sorted((p.pairs_dir / "source").glob("*.png"))[:n]
    if not srcs:
        return None
    tiles = [(Image.open(s).convert("RGB"), Image.open(p.pairs_dir / "target" / s.name).convert("RGB")) for s in srcs if (p.pairs_dir / "target" / s.name).is_file()]
    size = 128
    sheet = Image.new("RGB", (size * len(tiles), size * 2), "white")
    for i, (a, b) in enumerate(tiles):
        sheet.paste(a.resize((size, size)), (i * size, 0))
        sheet.paste(b.resize((size, size)), (i * size, size))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return _data_uri(buf.getvalue())


def face_pairs(p: EffectPaths) -> dict[str, Any]:
    s = _json(p.pairs_dir / "summary.json")
    reasons = s.get("rejected_by_reason") or {}
    out: dict[str, Any] = {k: s[k] for k in ("pairs", "kept", "rejected", "train_pairs", "heldout_pairs") if k in s}
    out.update(_run(p, "face_pairs", "seconds_per_pair"))
    out["rejected_by_reason"] = Table(
        (("reason", "string"), ("pairs", "int")),
        tuple({"reason": r, "pairs": int(c)} for r, c in sorted(reasons.items(), key=lambda kv: -kv[1])),
    )
    if "gate_passed" in s:
        out["quality_gate_passed"] = bool(s["gate_passed"])
    strip = _pair_strip(p)
    if strip:
        out["pairs_preview"] = Markdown(f"aligned source (top) and teacher target (bottom)\n\n![pairs]({strip})")
    balance = p.pairs_dir / "balance.png"
    if balance.is_file():
        out["balance"] = Markdown(f"kept pairs by estimated skin-tone group\n\n![balance]({_data_uri(balance, max_width=640)})")
    return out


def _curve(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        return []
    def num(v: str) -> Any:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return v
        return int(f) if f.is_integer() and "." not in v else f
    return [{k: num(v) for k, v in r.items()} for r in rows]


def _curve_png(rows: list[dict[str, Any]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - a chart is a nicety
        return None
    cols = [c for c in ("train_loss", "heldout_psnr", "heldout_ssim") if c in rows[0]]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 2.4), dpi=80)
    axes = axes if len(cols) > 1 else [axes]
    for ax, c in zip(axes, cols):
        pts = [(r["step"], r[c]) for r in rows if isinstance(r.get(c), (int, float))]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return _data_uri(buf.getvalue(), max_width=800)


def student_checkpoint(p: EffectPaths) -> dict[str, Any]:
    metrics = _json(p.train_metrics)
    out: dict[str, Any] = {**_numbers(metrics), **_run(p, "student_checkpoint", "train_seconds", "resumed_from_step", "ray")}
    if p.checkpoint.is_file():
        out["checkpoint_bytes"] = p.checkpoint.stat().st_size
    rows = _curve(p.train_curve)
    if rows:
        cols = [c for c in ("step", "train_loss", "heldout_psnr", "heldout_ssim") if c in rows[0]]
        shown = rows if len(rows) <= 20 else rows[:: max(1, len(rows) // 20)] + [rows[-1]]
        text = _md_table(shown, cols)
        png = _curve_png(rows)
        if png:
            text = f"![training curve]({png})\n\n" + text
        out["training_curve"] = Markdown(text)
    return out


def mobile_model(p: EffectPaths) -> dict[str, Any]:
    report = _json(p.mobile_report)
    out: dict[str, Any] = {**_numbers(report), **_run(p, "mobile_model", "fp32_ms_1t", "int8_ms_1t", "ort_ms_1t",
                                                       "int8_speedup_1t")}
    for f in (p.onnx_fp32, p.onnx_int8):
        if f.is_file() and f"{'int8' if 'int8' in f.name else 'fp32'}_bytes" not in out:
            out[f"{'int8' if 'int8' in f.name else 'fp32'}_bytes"] = f.stat().st_size
    log = read_run_log(p.root, "mobile_model", p.effect)
    out.update({k: v for k, v in log.items() if k.endswith(("_ms_1t", "_ms_2t")) and isinstance(v, (int, float))})
    rows = []
    for name, t in (report.get("targets") or {}).items():  # export.targets: every runtime, built or why not
        out[f"{name}_status"] = t.get("status", "")
        out.update(_numbers({k: t[k] for k in ("bytes", "parity_psnr_db") if k in t}, f"{name}_"))
        rows.append(f"| {name} | {t.get('status')} | {t.get('bytes', '-')} | "
                    f"{_fmt(t.get('parity_psnr_db'))} | {_fmt(log.get(f'{name}_ms_1t'))} | "
                    f"{_fmt(log.get(f'{name}_ms_2t'))} | {t.get('reason', '')} |")
    if rows:
        out["targets"] = Markdown("| target | status | bytes | parity dB | ms 1t | ms 2t | reason |\n"
                                  "| --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))
    if p.grid.is_file():
        out["grid"] = Markdown(f"before / teacher / student\n\n![grid]({_data_uri(p.grid, max_width=900)})")
    return out


def _fmt(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{v:.4g}"


READERS: dict[str, Callable[[EffectPaths], dict[str, Any]]] = {
    "prompts": prompts,
    "teacher_images": teacher_images,
    "face_pairs": face_pairs,
    "student_checkpoint": student_checkpoint,
    "mobile_model": mobile_model,
}


def summary(stage: str, root: Path, effect: str) -> dict[str, Any]:
    """The metadata values for one stage and effect; never raises on a missing or odd file (metadata is a view)."""
    try:
        return READERS[stage](EffectPaths(root, effect))
    except Exception as exc:  # noqa: BLE001
        return {"metadata_error": f"{type(exc).__name__}: {exc}"}
