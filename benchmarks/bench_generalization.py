"""Does the student hold up on people and cameras it never saw?  Train the default student (and variants), export
it to int8, and print side by side: the sample's held-out people (same studio as training), and each folder of
`../shared/data/eval/` (other captures), as `fxassets evaluate` measures them.

    .venv/bin/python benchmarks/bench_generalization.py                              # the default, both effects
    .venv/bin/python benchmarks/bench_generalization.py --effects sketch \\
        --variant base:upsample=nearest,colour_transform=false --variant new:upsample=bilinear,colour_transform=true
    .venv/bin/python benchmarks/bench_generalization.py --checkpoint-from-pipeline   # the built data/student models
    .venv/bin/python benchmarks/bench_generalization.py --checkpoint kept/{effect}.safetensors  # a given checkpoint

A variant is `name:key=value,...` over `params.yaml`'s `train` section (dots reach into `augment`, e.g.
`augment.flip=false`); `default` is params.yaml as it is.  Training runs by steps only (no wall-clock cap), so the
machine's speed never changes what is measured.  Pairs: the built `data/face_pairs/E` (run `dvc repro face_pairs@E`
first).  The evaluation sets are never trained on; their teacher outputs are cached under
`.cache/fxassets/evaluate/`.  Figures are medians over faces: PSNR and SSIM against the teacher, *recovered* (the
share of the teacher's change the student reproduces), the CIELAB chroma error, the tile ratio (1: no tiles), the 2x2-block ratio (1: no pixel-shuffle blocks).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SHARED_EVAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"


def _value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    over: dict = {}
    for item in filter(None, body.split(",")):
        key, _, val = item.partition("=")
        node = over
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _value(val.strip())
    return name or "default", over


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def heldout_pairs(pairs_dir: Path):
    from fxassets.evaluation import EvalPair
    from fxassets.core.manifest import read_pairs
    from fxassets.core.images import read_png_rgb

    rows = read_pairs(pairs_dir)
    rows = rows[rows["split"] == "heldout"]
    return [EvalPair(r.sample_id, read_png_rgb(pairs_dir / r.source), read_png_rgb(pairs_dir / r.target))
            for r in rows.itertuples()]


def score(model: Path, pairs) -> dict:
    from fxassets.evaluation import medians, pair_scores, run_engine

    outs = run_engine(model, [p.source for p in pairs])
    return medians([pair_scores(o, p.target, p.source) for o, p in zip(outs, pairs)])


def main(argv: list[str] | None = None) -> dict:
    from fxassets.core.config import TrainConfig, load_params
    from fxassets.evaluation import build_pairs
    from fxassets.export.stage import ParityError, export_mobile
    from fxassets.core.paths import EffectPaths
    from fxassets.core.runlog import read_run_log
    from fxassets.train.loop import train_student
    from fxassets.train.student import load_student


    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--effects", nargs="+")
    ap.add_argument("--variant", action="append", default=[], help="name:key=value,... over train (repeatable)")
    ap.add_argument("--steps", type=int, help="training steps (default: train.steps)")
    ap.add_argument("--train-pairs", help="face_pairs folder to train on, '{effect}' filled in (default: the built "
                    "data/face_pairs/E); the held-out figures stay those of data/face_pairs/E, whose held-out people "
                    "the folder must also hold out")
    ap.add_argument("--eval", nargs="+", type=Path, help=f"evaluation folders (default: every folder of {SHARED_EVAL})")
    ap.add_argument("--checkpoint-from-pipeline", action="store_true",
                    help="no training: measure the built data/mobile/E/student.int8.onnx")
    ap.add_argument("--checkpoint", help="no training: export and measure this student checkpoint ('{effect}' "
                    "filled in), e.g. one kept with --keep")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="copy each run's checkpoint and int8 model to KEEP/<variant>-<effect>/")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    root = args.params.resolve().parent
    effects = args.effects or list(params.effects)
    evals = args.eval or sorted(p for p in SHARED_EVAL.iterdir() if p.is_dir())
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    from fxassets.core.machine import cpu_label

    cpu = cpu_label()
    print(f"CPU: {cpu}", flush=True)
    results: dict = {"cpu": cpu, "runs": []}
    print(f"{'variant':12s} {'effect':8s} {'set':10s} {'n':>4s} {'PSNR':>6s} {'input':>6s} {'recov':>6s} {'chroma':>6s} "
          f"{'teach':>6s} {'tiles':>6s} {'blocks':>6s}", flush=True)  # tile_excess, block_excess: over the teacher
    for effect in effects:
        paths = EffectPaths(root, effect)
        sets = {"heldout": heldout_pairs(paths.pairs_dir)}
        for d in evals:
            sets[d.name] = build_pairs(params, effect, d, root, progress=False).pairs
        for name, over in variants:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=f"gen-{effect}-") as tmp:
                tmp = Path(tmp)
                train_dir = Path(args.train_pairs.format(effect=effect)) if args.train_pairs else paths.pairs_dir
                if args.checkpoint_from_pipeline:
                    # the built report, its latencies from the stage's run log (report.json holds no clock)
                    report = {**json.loads(paths.mobile_report.read_text()), **read_run_log(root, "mobile_model", effect)}
                    model = paths.onnx_int8
                    train_metrics = json.loads(paths.train_metrics.read_text())
                else:
                    if args.checkpoint:
                        ckpt = Path(args.checkpoint.format(effect=effect))
                        train_metrics = dict(load_student(ckpt)[1].get("metrics") or {})
                    else:
                        cfg = TrainConfig.model_validate(_merge(params.train_for(effect).model_dump(), over))
                        cfg = cfg.model_copy(update={"max_seconds": 0, **({"steps": args.steps} if args.steps else {})})
                        ckpt = tmp / "student.safetensors"
                        train_metrics = train_student(train_dir, cfg, ckpt, tmp / "metrics.json", tmp / "curve.csv",
                                                      progress=False, root=root, margin=params.faces.margin)
                    mobile = tmp / "mobile"
                    try:
                        report = export_mobile(ckpt, train_dir, params.export_for(effect), mobile,
                                               mobile / "student.onnx", mobile / "student.int8.onnx",
                                               mobile / "grid.png", mobile / "report.json", progress=False,
                                               effect=effect)
                    except ParityError as exc:
                        report = exc.report  # report.json holds no latency
                    model = mobile / "student.int8.onnx"
                if args.keep and not args.checkpoint_from_pipeline:
                    import shutil

                    shutil.copytree(tmp, args.keep / f"{name}-{effect}", dirs_exist_ok=True)
                run = {"variant": name, "effect": effect, "overrides": over, "steps": train_metrics.get("steps"),
                       "parity_psnr_db": report["parity_psnr_db"], "int8_ms_1t": report["int8_ms_1t"],
                       "fp32_ms_1t": report["fp32_ms_1t"], "sets": {}}
                for set_name, pairs in sets.items():
                    m = score(model, pairs) if pairs else {}
                    run["sets"][set_name] = {"n": len(pairs), **m}
                    if m:
                        print(f"{name:12s} {effect:8s} {set_name:10s} {len(pairs):4d} {m['psnr_db']:6.2f} "
                              f"{m['input_psnr_db']:6.2f} {m['recovered']:6.3f} {m['chroma_error']:6.2f} "
                              f"{m['teacher_chroma']:6.2f} {m['tile_excess']:6.2f} {m['block_excess']:6.2f}", flush=True)
            run["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{name:12s} {effect:8s} int8 {run['int8_ms_1t']:.2f} ms / fp32 {run['fp32_ms_1t']:.2f} ms, parity "
                  f"{run['parity_psnr_db']:.1f} dB, {run['steps']} steps, {run['seconds']:.0f} s ({cpu})", flush=True)
            results["runs"].append(run)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
