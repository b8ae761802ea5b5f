"""The summary table `make run` prints: one row per effect from the stages' own reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fxassets.config import Params
from fxassets.paths import EffectPaths


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def effect_rows(params: Params, root: Path = Path(".")) -> list[dict[str, Any]]:
    rows = []
    for effect in params.effects:
        p = EffectPaths(root, effect)
        pairs = _load(p.pairs_dir / "summary.json")
        train = _load(p.train_metrics)
        mobile = _load(p.mobile_report)
        rows.append(
            {
                "effect": effect,
                "kept": pairs.get("kept"),
                "rejected": pairs.get("rejected"),
                "psnr_db": train.get("heldout_psnr"),
                "ssim": train.get("heldout_ssim"),
                "identity_psnr_db": train.get("identity_psnr"),
                "int8_psnr_db": mobile.get("int8_psnr_db"),
                "int8_ms": mobile.get("int8_ms_1t"),
                "fp32_ms": mobile.get("fp32_ms_1t"),
                "int8_model": str(p.onnx_int8) if p.onnx_int8.exists() else None,
                "grid": str(p.grid) if p.grid.exists() else None,
            }
        )
    return rows


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["effect", "kept/rejected", "PSNR dB (input)", "SSIM", "int8 ms (fp32)", "int8 model", "grid"]
    body = [
        [
            r["effect"],
            f"{_fmt(r['kept'])}/{_fmt(r['rejected'])}",
            f"{_fmt(r['psnr_db'], '.2f')} ({_fmt(r['identity_psnr_db'], '.1f')})",
            _fmt(r["ssim"], ".3f"),
            f"{_fmt(r['int8_ms'], '.2f')} ({_fmt(r['fp32_ms'], '.2f')})",
            _fmt(r["int8_model"]),
            _fmt(r["grid"]),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
