"""Does int8 hold for every retrained student?  Retrain each effect's student N times, export each, print the
int8 parity (int8 against fp32 on the held-out pairs) of every fallback round and the minimum over retrains.

    .venv/bin/python benchmarks/bench_int8_robustness.py                       # both default effects, 5 retrains
    .venv/bin/python benchmarks/bench_int8_robustness.py --effects sketch --steps 900 1075 1250 1425 1600
    .venv/bin/python benchmarks/bench_int8_robustness.py --seeds 0 1 2 3 4 --steps 1600 --json robust.json

Reads the built `data/face_pairs/E` (run `make run` or `dvc repro face_pairs@E` first) and `params.yaml`'s
`train` and `export` settings (the effect's own `effects.E.export` overrides included); each retrain differs by
its seed and step count (the lists are zipped; a single value is repeated).  Training runs without a wall-clock
cap so that the step count, not the machine's speed, decides the student.  The export is the pipeline's own
(`export_mobile`), parity gate included: a failing gate is reported, not raised.  The machine's CPU is printed
beside the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    from fxassets.core.config import load_params
    from fxassets.export.stage import ParityError, export_mobile
    from fxassets.core.paths import EffectPaths
    from fxassets.train.loop import train_student

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--effects", nargs="+", help="default: every effect in params.yaml")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--steps", nargs="+", type=int, default=[900, 1075, 1250, 1425, 1600])
    ap.add_argument("--latency-runs", type=int, default=20, help="export.latency_runs for these exports")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    root = args.params.resolve().parent
    effects = args.effects or list(params.effects)
    n = max(len(args.seeds), len(args.steps))
    seeds = args.seeds * n if len(args.seeds) == 1 else args.seeds
    steps = args.steps * n if len(args.steps) == 1 else args.steps
    if len(seeds) != len(steps):
        ap.error("--seeds and --steps need the same length (or one value)")
    from fxassets.core.machine import cpu_label

    cpu = cpu_label()
    print(f"CPU: {cpu}", flush=True)
    out: dict = {"cpu": cpu, "effects": {}}
    for effect in effects:
        paths = EffectPaths(root, effect)
        if not (paths.pairs_dir / "manifest.parquet").is_file():
            sys.exit(f"{paths.pairs_dir}: no face pairs; run `dvc repro face_pairs@{effect}` first")
        cfg_export = params.export_for(effect).model_copy(update={"latency_runs": args.latency_runs})
        runs = []
        for seed, n_steps in zip(seeds, steps):
            cfg = params.train_for(effect).model_copy(update={"seed": seed, "steps": n_steps, "max_seconds": 0})
            with tempfile.TemporaryDirectory(prefix=f"robust-{effect}-") as tmp:
                tmp = Path(tmp)
                t0 = time.perf_counter()
                metrics = train_student(paths.pairs_dir, cfg, tmp / "student.safetensors", tmp / "metrics.json",
                                        tmp / "curve.csv", progress=False, root=root, margin=params.faces.margin)
                t1 = time.perf_counter()
                try:
                    report = export_mobile(tmp / "student.safetensors", paths.pairs_dir, cfg_export, tmp / "mobile",
                                           tmp / "mobile/student.onnx", tmp / "mobile/student.int8.onnx",
                                           tmp / "mobile/grid.png", tmp / "mobile/report.json", progress=False,
                                           effect=effect)
                except ParityError as exc:
                    report = exc.report  # report.json holds no latency
                t2 = time.perf_counter()
            rounds = [r.get("parity_psnr_db") for r in report["float_fallback"]["rounds"]]
            run = {"seed": seed, "steps": n_steps, "heldout_psnr": metrics.get("heldout_psnr"),
                   "parity_psnr_db": report["parity_psnr_db"], "parity_min_psnr_db": report["parity_min_psnr_db"],
                   "parity_ok": report["parity_ok"], "rounds_parity_db": rounds,
                   "calibration_method": report.get("calibration_method"),
                   "nodes_in_float": len(report.get("nodes_in_float") or []),
                   "int8_ms_1t": report["int8_ms_1t"], "fp32_ms_1t": report["fp32_ms_1t"],
                   "train_s": round(t1 - t0, 1), "export_s": round(t2 - t1, 1)}
            runs.append(run)
            rtxt = " -> ".join("-" if r is None else f"{r:.2f}" for r in rounds)
            print(f"{effect:8s} seed {seed} steps {n_steps:5d}: student {run['heldout_psnr']:.2f} dB, "
                  f"parity {run['parity_psnr_db']:.2f} dB (worst pair {run['parity_min_psnr_db']:.2f}; rounds {rtxt}; "
                  f"{run['nodes_in_float']} fallback nodes), int8 {run['int8_ms_1t']:.2f} ms / fp32 "
                  f"{run['fp32_ms_1t']:.2f} ms, {'pass' if run['parity_ok'] else 'FAIL'}", flush=True)
        worst = min(r["parity_psnr_db"] for r in runs)
        out["effects"][effect] = {"runs": runs, "min_parity_psnr_db": worst,
                                  "all_passed": all(r["parity_ok"] for r in runs)}
        print(f"{effect:8s} minimum parity over {len(runs)} retrains: {worst:.2f} dB "
              f"(gate {cfg_export.min_parity_db:.1f} dB) on {cpu}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
