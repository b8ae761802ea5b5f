"""Every runtime of `export.targets` from one trained student, side by side: the pipeline's own stage
(`export_mobile`) builds the ORT models and the LiteRT / ExecuTorch targets into a scratch folder, then each model
is timed beside the others in one process, and the table prints size, parity against fp32 (mean and worst held-out
pair), int8 PSNR against the teacher, ms at 1 thread (CPU time of the calling thread: robust on a shared machine)
and at 1 and 2 threads (wall clock), the ratio to the ORT int8 model, and the ops each runtime left in float.

    python benchmarks/bench_export_targets.py --effect sketch --json benchmarks/results/export_targets_sketch.json
    python benchmarks/bench_export_targets.py --effect cartoon --root /path/to/a/built/project --out /tmp/targets

`--root` is a built project (its `data/student/E/student.safetensors` and `data/face_pairs/E`; it is only read).
A target whose package is missing prints as skipped with the reason (the LiteRT exporter, litert-torch, is not in
any extra: docs/mobile.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TIMED = ("fp32", "int8", "ort", "litert", "executorch")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--effect", default="sketch")
    ap.add_argument("--root", type=Path, default=Path("."), help="a built project (read only)")
    ap.add_argument("--targets", default="ort,litert,executorch")
    ap.add_argument("--out", type=Path, help="where the models go (default: a temporary folder)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from fxassets.core.config import load_params, with_overrides
    from fxassets.core.machine import cpu_info, cpu_label
    from fxassets.core.paths import EffectPaths
    from fxassets.export.latency import latency_compare
    from fxassets.export.session import model_session
    from fxassets.export.stage import export_mobile

    params = load_params(args.root / "params.yaml")
    cfg = with_overrides(params.export_for(args.effect), {"targets": args.targets.split(",")})
    src = EffectPaths(args.root, args.effect)
    with tempfile.TemporaryDirectory(prefix="fxassets-targets-") as tmp:
        out = args.out or Path(tmp)
        run = export_mobile(src.checkpoint, src.pairs_dir, cfg, out, out / "student.onnx", out / "student.int8.onnx",
                            out / "grid.png", out / "report.json", progress=True, train_metrics=src.train_metrics,
                            effect=args.effect)
        report = json.loads((out / "report.json").read_text())
        targets = report["targets"]
        files = {"fp32": out / "student.onnx", "int8": out / "student.int8.onnx", "ort": out / "student.int8.ort",
                 **{t: out / "targets" / e["file"] for t, e in targets.items() if e.get("file")}}
        files = {k: files[k] for k in TIMED if k in files}
        cpu1 = latency_compare({k: model_session(f, 1) for k, f in files.items()}, threads=1, runs=args.runs,
                               clock="cpu")
        wall1 = latency_compare({k: model_session(f, 1) for k, f in files.items()}, threads=1, runs=args.runs)
        wall2 = latency_compare({k: model_session(f, 2) for k, f in files.items()}, threads=2, runs=args.runs)

    import re
    from collections import Counter

    ends = report["quant"].get("float_end_nodes", []) + list(report["nodes_in_float"])
    ort_float = dict(Counter(m.group(1) if (m := re.match(r"node_([A-Za-z]+)", n)) else n for n in ends))
    rows = []
    for k in files:
        t = targets.get(k, {})
        size = {"fp32": report["fp32_bytes"], "int8": report["int8_bytes"], "ort": report["ort_bytes"]}.get(k, t.get("bytes"))
        par = {"fp32": None, "int8": report["parity_psnr_db"], "ort": report["ort_parity_psnr_db"]}.get(k, t.get("parity_psnr_db"))
        worst = {"int8": report["parity_min_psnr_db"]}.get(k, t.get("parity_min_psnr_db"))
        rows.append({"model": k, "status": t.get("status", "ok"), "bytes": size, "parity_db": par, "worst_db": worst,
                     "int8_psnr_db": t.get("int8_psnr_db", report["int8_psnr_db"] if k in ("int8", "ort") else None),
                     "cpu_ms_1t": cpu1[k], "ms_1t": wall1[k], "ms_2t": wall2[k], "over_ort_int8_cpu_1t": cpu1[k] / cpu1["int8"],
                     "float_ops": ort_float if k in ("int8", "ort") else t.get("float_ops")})
    skipped = {k: v["reason"] for k, v in targets.items() if v["status"] == "skipped"}
    doc = {"cpu": cpu_info(), "effect": args.effect, "root": str(args.root), "rows": rows, "skipped": skipped,
           "heldout_pairs": report["heldout_pairs"], "calibration_samples": report["calibration_samples"],
           "ort_nodes_in_float": report["nodes_in_float"], "export_s": {k: v for k, v in run.items() if k.endswith("_export_s")}}

    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    print(f"\n{args.effect}, CPU: {cpu_label()}; {report['heldout_pairs']} held-out pairs, "
          f"{report['calibration_samples']} calibration crops")
    print("| model | status | size MB | parity dB (worst) | int8 vs teacher dB | 1t CPU ms | / ORT int8 | 1t wall ms | "
          "2t wall ms | ops in float |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fl = r["float_ops"]
        print(f"| {r['model']} | {r['status']} | {f(r['bytes'] / 1e6, 3)} | {f(r['parity_db'])} ({f(r['worst_db'])}) | "
              f"{f(r['int8_psnr_db'])} | {f(r['cpu_ms_1t'])} | {f(r['over_ort_int8_cpu_1t'])} | {f(r['ms_1t'])} | "
              f"{f(r['ms_2t'])} | {'all' if fl is None else ', '.join(f'{a} {b}' for a, b in fl.items()) or '-'} |")
    for k, why in skipped.items():
        print(f"{k}: skipped: {why}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
