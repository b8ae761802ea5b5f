"""Why int8 is (or is not) faster than fp32 on this CPU: a built effect's fp32 and int8 models, int8 variants
(quantization format, u8 / s8, per-tensor weights, the first conv in int8, session options, the .ort form, a graph
rewrite), their parity and speed side by side in one process, and onnxruntime's per-operator profile.

    python benchmarks/bench_int8_profile.py --effect sketch --json benchmarks/results/int8_profile_sketch.json
    python benchmarks/bench_int8_profile.py --effect cartoon --models /path/to/data/mobile/cartoon \\
        --pairs /path/to/data/face_pairs/cartoon

Each variant is quantized from the effect's own fp32 model with the calibration the pipeline chose (its report) on
the pipeline's calibration crops, and judged on the held-out crops (parity: int8 against fp32, mean PSNR).  1 thread
is timed in CPU time (the calling thread's: robust on a busy machine), 2 threads in wall clock (noisy when the
machine is shared: read the ratios, and only beside each other).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def d2s_before_dq(src: Path, dst: Path) -> None:
    """Move each per-tensor DequantizeLinear that feeds a DepthToSpace below it (the pixel shuffle in uint8: the
    same values, a quarter of the bytes moved)."""
    import onnx

    m = onnx.load(str(src))
    nodes = list(m.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for n in [n for n in nodes if n.op_type == "DepthToSpace"]:
        dq = producer.get(n.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or readers[dq.output[0]] != 1 or len(dq.input) < 2:
            continue
        out = n.output[0]
        n.input[0], n.output[0] = dq.input[0], out + "_q"
        dq.input[0], dq.output[0] = out + "_q", out
        i, j = nodes.index(dq), nodes.index(n)
        nodes[i], nodes[j] = nodes[j], nodes[i]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--effect", default="sketch")
    ap.add_argument("--models", type=Path, help="the effect's mobile_model folder (default data/mobile/EFFECT)")
    ap.add_argument("--pairs", type=Path, help="the effect's face_pairs folder (default data/face_pairs/EFFECT)")
    ap.add_argument("--calibration", type=int, default=64, help="calibration crops (the pipeline's default: 64)")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    models = args.models or Path("data/mobile") / args.effect
    pairs_dir = args.pairs or Path("data/face_pairs") / args.effect

    from fxassets.core.images import read_png_rgb
    from fxassets.core.machine import cpu_info, cpu_label
    from fxassets.core.manifest import read_pairs
    from fxassets.core.metrics import psnr
    from fxassets.export.fallback import _spread
    from fxassets.export.latency import latency_compare, op_profile
    from fxassets.export.ort_format import convert_to_ort
    from fxassets.export.quantize import preprocess_for_quant, quantize_int8
    from fxassets.export.session import onnx_session, run_model, to_input

    report = json.loads((models / "report.json").read_text())
    fp32 = models / "student.onnx"
    pairs = read_pairs(pairs_dir).sort_values("sample_id").reset_index(drop=True)
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    held = [to_input(read_png_rgb(pairs_dir / s)) for s in pairs[pairs["split"] == "heldout"]["source"]]
    calib = [to_input(read_png_rgb(pairs_dir / train.loc[i, "source"])) for i in _spread(len(train), args.calibration)]
    method, pct = report["calibration_method"], report["quant"].get("percentile")
    keep = report["quant"].get("keep_float", ["input"])
    print(f"{cpu_label()}; {args.effect}: {method} {pct or ''}, keep_float {keep}, {len(calib)} calibration crops, "
          f"{len(held)} held-out", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="bench_int8_profile."))
    pre = work / "pre.onnx"
    src = pre if preprocess_for_quant(fp32, pre) else fp32
    s32 = onnx_session(fp32)
    ref = [run_model(s32, x) for x in held]
    base = dict(method=method, percentile=pct or 99.99, keep_float=keep, preprocess=False,
                calibration_cache=work / "ranges.json")

    def q(name: str, **kw) -> Path:
        path = work / f"{name}.onnx"
        quantize_int8(src, path, calib, **{**base, **kw})
        return path

    int8 = q("int8")
    d2s = work / "int8_d2s.onnx"
    d2s_before_dq(int8, d2s)
    variants = {  # name: (model, session options)
        "fp32": (fp32, {}),
        "int8 (pipeline: QDQ, u8 act / s8 weights, per-channel, first conv float)": (int8, {}),
        "QOperator format": (q("qop", quant_format="qoperator"), {}),
        "s8 activations (s8/s8)": (q("s8s8", activations="s8"), {}),
        "u8 weights (u8/u8)": (q("u8u8", weights="u8"), {}),
        "per-tensor weights": (q("pertensor", per_channel=False), {}),
        "first conv int8 too (keep_float [])": (q("allint8", keep_float=()), {}),
        "pixel shuffle in uint8 (DepthToSpace before DequantizeLinear)": (d2s, {}),
        ".ort (target arm: no NCHWc)": (Path(convert_to_ort(int8, work / "int8.ort")["path"]), {}),
        "session ORT_ENABLE_EXTENDED (no layout transforms)": (int8, {"level": "extended"}),
        "session without NchwcTransformer": (int8, {"disabled": ["NchwcTransformer"]}),
    }
    rows = {}
    for name, (path, opts) in variants.items():
        s = _session(path, 1, opts)
        rows[name] = {"parity_db": None if name == "fp32" else round(float(np.mean(
            [psnr(run_model(s, x), r) for x, r in zip(held, ref)])), 2)}
    for threads, clock in ((1, "cpu"), (2, "wall")):
        sessions = {name: _session(path, threads, opts) for name, (path, opts) in variants.items()}
        ms = latency_compare(sessions, threads=threads, runs=args.runs, warmup=10, clock=clock)
        for name in variants:
            rows[name][f"ms_{threads}t"] = round(ms[name], 3)
            rows[name][f"over_fp32_{threads}t"] = round(ms[name] / ms["fp32"], 3)
    profile = {"fp32": op_profile(fp32, runs=40), "int8": op_profile(int8, runs=40)}
    where = {"fp32": op_profile(fp32, runs=40, by="resolution"), "int8": op_profile(int8, runs=40, by="resolution")}
    out = {"cpu": cpu_info(), "effect": args.effect, "variants": rows, "op_ms_1t": profile, "resolution_ms_1t": where}

    print(f"\n| variant | parity dB | 1 thread CPU ms | / fp32 | 2 threads wall ms | / fp32 |\n| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['parity_db'] or '-'} | {r['ms_1t']:.2f} | {r['over_fp32_1t']:.2f} | {r['ms_2t']:.2f} | "
              f"{r['over_fp32_2t']:.2f} |")
    for title, table in (("operator (after ORT's graph optimizations)", profile), ("output resolution", where)):
        keys = sorted((set(table["fp32"]) | set(table["int8"])) - {"total"},
                      key=lambda k: -max(table["fp32"].get(k, 0), table["int8"].get(k, 0)))
        print(f"\n| {title} | fp32 ms | int8 ms |\n| --- | --- | --- |")
        for k in [*keys, "total"]:
            print(f"| {k} | {table['fp32'].get(k, 0):.3f} | {table['int8'].get(k, 0):.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


def _session(path: Path, threads: int, opts: dict):
    """An ORT CPU session as `fxassets.export.session.onnx_session` builds it, with `opts` (level, disabled)."""
    import onnxruntime as ort

    from fxassets.export.session import onnx_session

    if not opts:
        return onnx_session(path, threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if opts.get("level") == "extended"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    so.log_severity_level = 3
    kw = {"disabled_optimizers": opts["disabled"]} if opts.get("disabled") else {}
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)


if __name__ == "__main__":
    main()
