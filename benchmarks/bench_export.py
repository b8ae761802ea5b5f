"""Benchmark the mobile export: fp32 vs int8 ONNX Runtime CPU latency at 1 and 2 threads, sizes, parity.

    python benchmarks/bench_export.py                                  # fresh untrained student, 256x256
    python benchmarks/bench_export.py --checkpoint data/student/cartoon/student.safetensors \
        --pairs data/face_pairs/cartoon --exclude none se hard --json bench.json
    python benchmarks/bench_export.py --checkpoint ... --pairs ... --method minmax --fallback 38 --ort

Every model is timed in the same process, side by side (the models take turns in blocks, so load from other
processes hits them alike), median of --runs runs after --warmup runs.  Without --pairs the int8 models are
calibrated and checked on smooth random images (parity then says little about a trained student's).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _random_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        out.append(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC))
    return out


def _pairs_images(pairs_dir: Path, split: str, n: int) -> list[np.ndarray]:
    from fxassets.core.manifest import read_pairs as _read_pairs
    from fxassets.export.stage import _spread
    from fxassets.core.images import read_png_rgb

    rows = _read_pairs(pairs_dir)
    rows = rows[rows["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise SystemExit(f"{pairs_dir}: no '{split}' pairs with status 'pass'")
    return [read_png_rgb(pairs_dir / rows.loc[i, "source"]) for i in _spread(len(rows), n)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="student checkpoint (default: a fresh untrained build_student)")
    ap.add_argument("--encoder", default=None, help="encoder of the fresh student (default: the student's)")
    ap.add_argument("--width", type=float, default=1.0, help="decoder width of the fresh student")
    ap.add_argument("--size", type=int, default=256, help="input size (default 256; pairs set it when given)")
    ap.add_argument("--pairs", type=Path, help="face_pairs folder: calibrate on train, measure parity on heldout")
    ap.add_argument("--calibration", type=int, default=16, help="calibration images")
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--percentile", type=float, default=None, help="percentile of --method percentile")
    ap.add_argument("--exclude", nargs="+", default=["none"], choices=["none", "se", "hard"],
                    help="int8 variants to build and time (nodes kept in float, see export.excluded_nodes)")
    ap.add_argument("--fallback", type=float, metavar="DB",
                    help="also build int8_fallback: quantize_with_fallback with this parity gate (on the eval crops)")
    ap.add_argument("--ort", action="store_true", help="also time the plain int8 model converted to .ort")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--keep", type=Path, help="folder to keep the ONNX files in (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from fxassets.export.ort_format import convert_to_ort
    from fxassets.export.onnx_export import export_onnx
    from fxassets.export.latency import latency_compare
    from fxassets.core.metrics import psnr
    from fxassets.export.quantize import quantize_int8
    from fxassets.export.fallback import quantize_with_fallback
    from fxassets.export.session import to_input

    if args.checkpoint:
        from fxassets.train.student import load_student

        model, meta = load_student(args.checkpoint)
        desc = f"{args.checkpoint} ({meta.get('encoder')}, width {meta.get('width')})"
    else:
        from fxassets.train.student import DEFAULT_ENCODER, build_student

        torch.manual_seed(0)
        model = build_student(args.encoder or DEFAULT_ENCODER, args.width).eval()
        desc = (f"fresh untrained build_student({args.encoder or DEFAULT_ENCODER!r}, {args.width}) "
                "(identity edit head: its parity says nothing)")

    if args.pairs:
        calib = _pairs_images(args.pairs, "train", args.calibration)
        evals = _pairs_images(args.pairs, "heldout", 16)
        args.size = calib[0].shape[0]
    else:
        calib = _random_images(args.calibration, args.size, 1)
        evals = _random_images(8, args.size, 2)

    tmp = tempfile.TemporaryDirectory(prefix="bench_export.")
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    fp32 = work / "student.onnx"
    exp = export_onnx(model, fp32, size=args.size, opset=args.opset)
    print(f"{desc}: exported {args.size}x{args.size} in {time.perf_counter() - t:.1f} s, "
          f"torch vs onnx max abs diff {exp['torch_onnx_max_abs_diff']:.2e}", file=sys.stderr)

    paths = {"fp32": fp32}
    variants: dict[str, dict] = {"fp32": {"bytes": exp["bytes"], "nodes": sum(exp["ops"].values())}}
    s32 = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    ref = [s32.run(None, {"image": to_input(im)})[0] for im in evals]
    for mode in args.exclude:
        name = "int8" if mode == "none" else f"int8_no_{mode}"
        path = work / f"student.{name}.onnx"
        q = quantize_int8(fp32, path, [to_input(c) for c in calib], method=args.method, exclude=mode,
                          **({"percentile": args.percentile} if args.percentile else {}))
        s8 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        parity = [psnr(s8.run(None, {"image": to_input(im)})[0], r) for im, r in zip(evals, ref)]
        paths[name] = path
        variants[name] = {"bytes": q["bytes"], "nodes": sum(q["ops"].values()), "exclude": mode,
                          "excluded_nodes": q["excluded_nodes"], "quantize_nodes": q["ops"].get("QuantizeLinear", 0),
                          "parity_psnr_db": float(np.mean(parity)), "parity_min_psnr_db": float(np.min(parity))}
        print(f"  {name}: {q['quantize_s']:.1f} s to quantize, parity {np.mean(parity):.1f} dB", file=sys.stderr)

    def parity_of(path: Path) -> list[float]:
        s8 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [psnr(s8.run(None, {"image": to_input(im)})[0], r) for im, r in zip(evals, ref)]

    if args.fallback is not None:
        path = work / "student.int8_fallback.onnx"
        q, fb = quantize_with_fallback(fp32, path, [to_input(c) for c in calib], lambda p: np.mean(parity_of(p)),
                                       args.fallback, method=args.method,
                                       **({"percentile": args.percentile} if args.percentile else {}))
        parity = parity_of(path)
        paths["int8_fallback"] = path
        variants["int8_fallback"] = {
            "bytes": q["bytes"], "nodes": sum(q["ops"].values()), "excluded_nodes": len(fb["nodes_in_float"]),
            "quantize_nodes": q["ops"].get("QuantizeLinear", 0), "parity_psnr_db": float(np.mean(parity)),
            "parity_min_psnr_db": float(np.min(parity)), "fallback": fb}
        print(f"  int8_fallback: {q['quantize_s']:.1f} s, rounds {[r.get('parity_psnr_db') for r in fb['rounds']]}, "
              f"in float: {fb['nodes_in_float']}", file=sys.stderr)
    if args.ort and "int8" in paths:
        conv = convert_to_ort(paths["int8"], work / "student.int8.ort")
        paths["int8_ort"] = Path(conv["path"])
        parity = parity_of(paths["int8_ort"])
        variants["int8_ort"] = {"bytes": conv["bytes"], "nodes": None, "parity_psnr_db": float(np.mean(parity)),
                                "parity_min_psnr_db": float(np.min(parity))}

    for threads in args.threads:
        ms = latency_compare(paths, threads=threads, runs=args.runs, warmup=args.warmup)
        for name, v in ms.items():
            variants[name][f"ms_{threads}t"] = v
    for name, v in variants.items():
        v["size_ratio_vs_fp32"] = v["bytes"] / variants["fp32"]["bytes"]
        for threads in args.threads:
            v[f"speedup_{threads}t"] = variants["fp32"][f"ms_{threads}t"] / v[f"ms_{threads}t"]

    result = {
        "model": desc, "size": args.size, "runs": args.runs, "warmup": args.warmup, "method": args.method,
        "calibration": "pairs" if args.pairs else "random", "calibration_samples": len(calib),
        "onnxruntime": ort.__version__, "torch": torch.__version__, "variants": variants,
    }
    cols = [f"ms_{t}t" for t in args.threads]
    print(f"{'model':16s} " + " ".join(f"{c:>8s}" for c in cols) + "   speedup(1st)  size MB  ratio  parity dB")
    for name, v in variants.items():
        par = f"{v['parity_psnr_db']:9.1f}" if "parity_psnr_db" in v else f"{'-':>9s}"
        speedup = v[f"speedup_{args.threads[0]}t"]
        print(f"{name:16s} " + " ".join(f"{v[c]:8.2f}" for c in cols)
              + f"   {speedup:11.2f}x  {v['bytes'] / 1e6:7.2f}  {v['size_ratio_vs_fp32']:5.2f}  {par}")
    if args.json:
        from fxassets.core.atomic import write_json

        write_json(args.json, result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
