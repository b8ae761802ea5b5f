"""The mobile_model stage: student -> ONNX fp32 -> int8 (QDQ), parity and latency checks, model-card grid.

- `export_onnx`: torch.onnx (the torch.export-based exporter; for opset 17 the TorchScript one), a fixed
  1x3xSxS input "image" -> "output", float32 RGB in [0, 1], simplified with onnxslim, checked with
  onnx.checker, and compared with torch (max abs difference).
- `quantize_int8`: ONNX Runtime static quantization, QDQ format, per-channel int8 weights and uint8 activations
  (int8 activations ran 2x slower on x86 here).  MinMax calibration lets the student's unbounded decoder
  sums stretch the uint8 ranges (36 dB parity on a trained student); percentile calibration kept 38.6 dB.
- `activation_sensitivity` / `quantize_with_fallback`: when parity misses the gate, onnxruntime's qdq_loss_debug
  ranks the int8 activations by how much their rounding hurts the layers that read them; the worst few are tried
  in float, the one that helps most is kept, for a bounded number of rounds.  On a trained student the culprit
  was a decoder Concat (upsampled residual sum + encoder skip share one uint8 range): minmax 36.1 -> 38.5 dB
  with 4 nodes in float, percentile 36.9 -> 38.1 dB with 2.
- `convert_to_ort`: the int8 model in ONNX Runtime's mobile format (`.ort`, onnxruntime's converter).
- `latency_ms` / `latency_compare`: median wall-clock of ORT CPU sessions, sequential, a fixed thread count.
- `export_mobile`: the stage; writes the three models, the grid, the report and the model card
  (`fxassets.export.model_card`), and raises `ParityError` (after both are written) when int8 drifts too far from fp32.

PSNR convention (as `fxassets.core.metrics`): mean of per-image PSNRs, peak 1.0, identical images count as 100 dB.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fxassets.core.atomic import write_json
from fxassets.core.config import ExportConfig
from fxassets.core.images import read_png_rgb
from fxassets.core.manifest import read_pairs
from fxassets.core.metrics import psnr
from fxassets.export.fallback import _spread, quantize_with_fallback
from fxassets.export.latency import latency_compare
from fxassets.core.machine import cpu_info
from fxassets.export.onnx_export import export_onnx
from fxassets.export.ort_format import convert_to_ort
from fxassets.export.session import model_session, onnx_session, run_model, to_input, to_uint8
from fxassets.export.targets import export_targets


REPORT_KEYS = (
    "parity_psnr_db", "int8_psnr_db", "fp32_psnr_db", "identity_psnr_db",
    "fp32_bytes", "int8_bytes", "torch_onnx_max_abs_diff", "heldout_pairs", "calibration_samples",
)
GRID_LABELS = ("before", "teacher", "student int8")


class ParityError(ValueError):
    """The int8 model's output differs too much from the fp32 model's (PSNR below the configured floor); `report`:
    what export_mobile would have returned (report.json holds no latency)."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


def export_mobile(checkpoint: Path, pairs_dir: Path, cfg: ExportConfig, out_dir: Path, onnx_fp32: Path,
                  onnx_int8: Path, grid_png: Path, report_json: Path, progress: bool = True, *,
                  onnx_ort: Path | None = None, targets_dir: Path | None = None, model_card: Path | None = None,
                  train_metrics: Path | None = None, teacher_json: Path | None = None, faces_source: Path | None = None,
                  effect: str | None = None) -> dict[str, Any]:
    """The mobile_model stage: student checkpoint + face pairs -> fp32 and int8 ONNX, the int8 model in ORT format,
    grid, report and model card.

    Calibrates on up to `cfg.calibration_samples` train pairs (sources, spread over the sorted split),
    evaluates on every held-out pair that passed: parity (int8 vs fp32 outputs, float), int8 and fp32
    student vs teacher and the identity (source vs teacher, both uint8), latency of the three models at 1 thread
    side by side.  While parity is below `cfg.min_parity_db`, up to `cfg.max_float_fallback` rounds keep the
    activations qdq_loss_debug finds most harmful in float (`quantize_with_fallback`).  The int8 model is then
    converted to `onnx_ort` (default: beside it, `.ort`) and checked against it.  The model card
    (`model_card`, default `out_dir/MODEL_CARD.md`, `fxassets.export.model_card`) also reads the student's
    `train_metrics` (default: `metrics.json` beside the checkpoint), the face pairs' `summary.json`, the
    teacher fingerprint `teacher_json` and the source photos' `SOURCE.md` in `faces_source` when given.
    The other runtimes of `cfg.targets` (LiteRT, ExecuTorch: `fxassets.export.targets`) are built into
    `targets_dir` (default `out_dir/targets`) from the same student and calibration crops, checked against the
    same fp32 outputs and timed beside the ORT models at 1 and 2 threads; one that cannot be built is reported
    skipped, one below the gate failed (kept, the stage goes on: only the ORT model gates it).
    Writes the report and the card, then raises `ParityError` if the int8 model (or its .ort) is below
    `cfg.min_parity_db`.  Returns the report with the run's latencies, CPU and timings (`fp32_ms_1t`, ...,
    `quantize_s`), which the files leave out.
    """
    from tqdm import tqdm

    from fxassets.export.grid import write_grid
    from fxassets.export.model_card import write_model_card
    from fxassets.train.student import count_params, inference_form, load_student

    checkpoint, pairs_dir, out_dir = Path(checkpoint), Path(pairs_dir), Path(out_dir)
    onnx_fp32, onnx_int8, grid_png, report_json = map(Path, (onnx_fp32, onnx_int8, grid_png, report_json))
    onnx_ort = Path(onnx_ort) if onnx_ort else onnx_int8.with_suffix(".ort")
    targets_dir = Path(targets_dir) if targets_dir else out_dir / "targets"
    model_card = Path(model_card) if model_card else out_dir / "MODEL_CARD.md"
    say = (lambda msg: tqdm.write(f"[mobile_model] {msg}")) if progress else (lambda msg: None)

    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no student checkpoint (run the student_checkpoint stage first)")
    pairs = read_pairs(pairs_dir).sort_values("sample_id").reset_index(drop=True)
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    heldout = pairs[pairs["split"] == "heldout"].reset_index(drop=True)
    if heldout.empty:
        raise ValueError(f"{pairs_dir / 'manifest.parquet'}: no held-out pairs with status 'pass'; "
                         "parity and quality cannot be measured")
    if train.empty:
        raise ValueError(f"{pairs_dir / 'manifest.parquet'}: no train pairs with status 'pass' to calibrate on")
    out_dir.mkdir(parents=True, exist_ok=True)

    model, meta = load_student(checkpoint)
    first = read_png_rgb(pairs_dir / heldout.loc[0, "source"])
    size = int(first.shape[0])
    if first.shape[0] != first.shape[1]:
        raise ValueError(f"{pairs_dir}: pairs must be square crops, got {first.shape[1]}x{first.shape[0]}")
    held = []
    for r in heldout.itertuples(index=False):
        src = read_png_rgb(pairs_dir / r.source)
        tgt = read_png_rgb(pairs_dir / r.target)
        if src.shape != (size, size, 3) or tgt.shape != (size, size, 3):
            raise ValueError(f"{pairs_dir}: pair {r.sample_id} is {src.shape}/{tgt.shape}, expected {size}x{size}")
        held.append((r, src, tgt, to_input(src)))

    say(f"exporting fp32 ONNX at {size}x{size}, opset {cfg.opset}")
    exp = export_onnx(model, onnx_fp32, size=size, opset=cfg.opset)
    idx = _spread(len(train), cfg.calibration_samples)
    calibration = [to_input(read_png_rgb(pairs_dir / train.loc[i, "source"])) for i in idx]
    s32 = onnx_session(onnx_fp32)
    ref = [run_model(s32, x) for *_, x in held]

    def parity(path: Path) -> float:
        s = onnx_session(path)
        return float(np.mean([psnr(run_model(s, x), y) for (*_, x), y in zip(held, ref)]))

    say(f"quantizing int8 ({cfg.calibration_method}, {len(calibration)} calibration images)")
    q, fallback = quantize_with_fallback(
        onnx_fp32, onnx_int8, calibration, parity, cfg.min_parity_db, method=cfg.calibration_method,
        max_rounds=cfg.max_float_fallback, candidates=cfg.float_fallback_candidates, keep_float=cfg.keep_float,
        say=say)
    say(f"converting int8 to ORT format ({onnx_ort.name})")
    conv = convert_to_ort(onnx_int8, onnx_ort)

    s8, sort = onnx_session(onnx_int8), onnx_session(onnx_ort)
    grid_ids = set(heldout.drop_duplicates("person_id").head(cfg.grid_samples)["sample_id"])
    rows, per_pair, ort_diff = [], [], 0.0
    for (r, src, tgt, x), y32 in tqdm(list(zip(held, ref)), desc="held-out pairs", disable=not progress, leave=False):
        y8, yo = run_model(s8, x), run_model(sort, x)
        ort_diff = max(ort_diff, float(np.max(np.abs(yo - y8))))
        out8 = to_uint8(y8)
        per_pair.append({
            "sample_id": str(r.sample_id), "person_id": str(r.person_id),
            "parity_db": psnr(y8, y32), "ort_parity_db": psnr(yo, y32), "int8_db": psnr(out8, tgt),
            "fp32_db": psnr(to_uint8(y32), tgt), "identity_db": psnr(src, tgt),
        })
        if r.sample_id in grid_ids:
            rows.append([src, tgt, out8])
    targets = export_targets(cfg.targets, inference_form(model), calibration, targets_dir, cfg.keep_float,
                             [x for *_, x in held], ref, [tgt for _, _, tgt, _ in held], cfg.min_parity_db, say)
    say(f"grid of {len(rows)} held-out people")
    write_grid(grid_png, rows, GRID_LABELS)

    timed = {"fp32": onnx_fp32, "int8": onnx_int8, "ort": onnx_ort,
             **{t: targets_dir / e["file"] for t, e in targets.items() if e["status"] in ("ok", "failed")}}
    say(f"latency of {', '.join(timed)}, 1 and 2 threads, {cfg.latency_runs} runs each, side by side")
    lat, lat2 = (latency_compare({k: model_session(p, n) for k, p in timed.items()}, threads=n, runs=cfg.latency_runs)
                 for n in (1, 2))

    def mean(key: str) -> float:
        return float(np.mean([p[key] for p in per_pair]))

    parity_ok = mean("parity_db") >= cfg.min_parity_db and mean("ort_parity_db") >= cfg.min_parity_db
    report: dict[str, Any] = {
        "parity_psnr_db": mean("parity_db"),
        "parity_min_psnr_db": float(min(p["parity_db"] for p in per_pair)),
        "ort_parity_psnr_db": mean("ort_parity_db"),
        "ort_vs_int8_max_abs_diff": ort_diff,
        "min_parity_db": cfg.min_parity_db,
        "parity_ok": parity_ok,
        "int8_psnr_db": mean("int8_db"),
        "fp32_psnr_db": mean("fp32_db"),
        "identity_psnr_db": mean("identity_db"),
        "fp32_bytes": exp["bytes"],
        "int8_bytes": q["bytes"],
        "ort_bytes": conv["bytes"],
        "torch_onnx_max_abs_diff": exp["torch_onnx_max_abs_diff"],
        "heldout_pairs": len(heldout),
        "calibration_samples": len(calibration),
        "calibration_method": q["method"],  # minmax when the histogram calibrators cannot bin a tensor
        "size": size,
        "opset": exp["opset"],
        "simplified": exp["simplified"],
        "quant": {k: q[k] for k in ("percentile", "exclude", "excluded_nodes", "keep_float", "float_end_nodes",
                                    "preprocessed")},
        "float_fallback": fallback,
        "nodes_in_float": fallback["nodes_in_float"],
        "ort": {k: conv[k] for k in ("target_platform", "ops")},
        "ops_fp32": exp["ops"],
        "ops_int8": q["ops"],
        "grid_samples": len(rows),
        "student": {**{k: meta[k] for k in ("encoder", "width") if k in meta}, "params": count_params(model)},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "targets": {"ort": {"status": "ok" if parity_ok else "failed", "files": [onnx_int8.name, onnx_ort.name],
                            "bytes": conv["bytes"], "parity_psnr_db": mean("ort_parity_db"),
                            "int8_psnr_db": mean("int8_db"), "nodes_in_float": len(fallback["nodes_in_float"])},
                    **{t: {k: v for k, v in e.items() if not k.startswith("_")} for t, e in targets.items()}},
        "pairs": per_pair,
    }
    # what the run measured: returned (the stage's run log, fxassets.core.runlog), never in report.json or the card,
    # which are outputs (the same inputs, the same bytes)
    run = {"fp32_ms_1t": lat["fp32"], "int8_ms_1t": lat["int8"], "ort_ms_1t": lat["ort"],
           "int8_speedup_1t": lat["fp32"] / lat["int8"], "latency_runs": cfg.latency_runs,
           "cpu": cpu_info(),  # the machine the times are of
           "quantize_s": q["quantize_s"], "convert_s": conv["convert_s"],
           **{f"{k}_ms_2t": v for k, v in lat2.items()},
           **{f"{t}_ms_1t": lat[t] for t in timed if t not in ("fp32", "int8", "ort")},
           **{f"{t}_export_s": e["_export_s"] for t, e in targets.items() if "_export_s" in e}}
    write_json(report_json, report)
    write_model_card(
        model_card, report, effect=effect or out_dir.name, meta=meta,
        files={"fp32": onnx_fp32, "int8": onnx_int8, "ort": onnx_ort, "grid": grid_png, "report": report_json,
               **{t: targets_dir / e["file"] for t, e in targets.items() if "file" in e}},
        train_metrics=Path(train_metrics) if train_metrics else checkpoint.parent / "metrics.json",
        pairs_dir=pairs_dir, pairs=pairs, teacher_json=teacher_json, faces_source=faces_source,
    )
    say(f"parity {report['parity_psnr_db']:.1f} dB, int8 {report['int8_psnr_db']:.2f} dB vs teacher "
        f"(identity {report['identity_psnr_db']:.2f} dB), {lat['fp32']:.2f} ms fp32 / {lat['int8']:.2f} ms int8")
    if not parity_ok:
        rounds = len(fallback["rounds"]) - 1
        kept = f"{len(fallback['nodes_in_float'])} nodes kept in float after {rounds} fallback rounds" if rounds \
            else "no float fallback (export.max_float_fallback = 0)" if cfg.max_float_fallback == 0 \
            else "no float fallback round ran"
        raise ParityError(
            f"int8 parity PSNR {report['parity_psnr_db']:.2f} dB (int8 vs fp32, mean over {len(heldout)} held-out "
            f"pairs; .ort {report['ort_parity_psnr_db']:.2f} dB) is below export.min_parity_db = "
            f"{cfg.min_parity_db:.2f} dB ({kept}); report written to {report_json}", {**report, **run})
    return {**report, **run}
