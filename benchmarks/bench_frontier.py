"""The student's quality / latency frontier across timm encoders and decoder widths (issue 8: if the default student
cannot reach 5 ms, choose the default from this frontier).

    python benchmarks/bench_frontier.py --json benchmarks/results/frontier.json          # latency only, minutes
    python benchmarks/bench_frontier.py --encoders mobilenetv3_small_100 lcnet_050 --widths 0.5 1.0
    python benchmarks/bench_frontier.py --train-steps 500 --pairs data/face_pairs/cartoon    # + held-out PSNR
    python benchmarks/bench_frontier.py --decoders 0:0 1:1 --encoders mobilenetv4_conv_small_050 --widths 1.0
    python benchmarks/bench_frontier.py --encoders mobilenetv4_conv_small_050 --widths 1.0 \
        --decoders 0:0:nearest 0:0:bilinear 0:0:bilinear:colour 0:0:bilinear:head3  # the student's options

For each encoder x width x decoder (``B:H[:UPSAMPLE[:FLAG...]]``: inverted-residual blocks per decoder stage : in
the head, the decoder's upsampling, and flags: ``colour`` for the output colour map that the sketch student's grey
output folds into a matrix product, ``head3`` for a 3x3 last head conv (`train.head_kernel`); B:H alone takes the
rest from params.yaml's `train`): build the student (`fxassets.train.student.build_student`), export it to ONNX (fp32) and to int8
(QDQ, the export stage's settings: per-channel int8 weights, uint8 activations).  Then every model is timed with ONNX
Runtime CPU at 1 thread in one `fxassets.export.latency.latency_compare` call: all side by side, taking turns in --rounds
blocks, median of --runs each, so that the load of a shared machine hits every row alike.  Latency does not depend on
the weights, so untrained students do.  `vs_ref` divides by the default student's int8 time (mobilenetv3_small_100,
width 1.0): on a busy machine the milliseconds drift, the ratios much less.

`--train-steps N --pairs DIR` (or `--train-seconds N`, wall clock: noisy on a shared machine) first trains each
student (`fxassets.train.loop.train_student`, the params.yaml `train` settings otherwise), adds its held-out PSNR / SSIM against the teacher, calibrates the int8
model on train crops of DIR and measures parity on its held-out crops; the frontier is then the rows no other row
beats on both held-out PSNR and int8 latency.  Without training, the frontier is over parameters and latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ENCODERS = [
    "mobilenetv3_small_100", "mobilenetv3_small_075", "mobilenetv3_small_050", "tf_mobilenetv3_small_minimal_100",
    "mobilenetv2_050", "mobilenetv2_100", "lcnet_050", "lcnet_075", "mobilenetv4_conv_small_050",
    "mobilenetv4_conv_small", "mnasnet_small",
]
WIDTHS = [0.5, 0.75, 1.0]
TARGET_MS = 5.0


def _random_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    import cv2

    rng = np.random.default_rng(seed)
    return [cv2.resize(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
            for _ in range(n)]


def _pairs_images(pairs_dir: Path, split: str, n: int) -> list[np.ndarray]:
    from fxassets.core.manifest import read_pairs as _read_pairs
    from fxassets.export.stage import _spread
    from fxassets.core.images import read_png_rgb

    rows = _read_pairs(pairs_dir)
    rows = rows[rows["split"] == split].reset_index(drop=True)
    if rows.empty:
        raise SystemExit(f"{pairs_dir}: no '{split}' pairs with status 'pass'")
    return [read_png_rgb(pairs_dir / rows.loc[i, "source"]) for i in _spread(len(rows), n)]


FLAGS = ("colour", "head3")  # the student's options a decoder spec can switch on: colour map, head_kernel 3


def _decoder(text: str, default: tuple) -> tuple[int, int, str, bool, bool]:
    """``B:H[:UPSAMPLE[:FLAG...]]`` -> (blocks, head blocks, upsampling, colour map, 3x3 head); with no UPSAMPLE
    the rest from `default` (params.yaml), with one only the FLAGS named."""
    parts = text.split(":")
    if len(parts) < 2 or any(f not in FLAGS for f in parts[3:]):
        raise SystemExit(f"--decoders {text!r}: expected B:H[:UPSAMPLE[:FLAG...]] with FLAGS from {FLAGS}, "
                         "e.g. 0:0 or 0:0:bilinear:colour:head3")
    if len(parts) == 2:
        return (int(parts[0]), int(parts[1]), *default[2:])
    return int(parts[0]), int(parts[1]), parts[2], *(f in parts[3:] for f in FLAGS)


def _label(decoder: tuple) -> str:
    return ":".join([str(decoder[0]), str(decoder[1]), decoder[2], *(f for f, on in zip(FLAGS, decoder[3:]) if on)])


def pareto(rows: list[dict[str, Any]], quality: str | None) -> None:
    """Mark `frontier` on the rows no other row beats: lower int8 ms and higher `quality` (or fewer params)."""
    def better(a: dict, b: dict) -> bool:  # a dominates b
        qa, qb = (a[quality], b[quality]) if quality else (-a["params"], -b["params"])
        return a["int8_ms"] <= b["int8_ms"] and qa >= qb and (a["int8_ms"] < b["int8_ms"] or qa > qb)

    ok = [r for r in rows if "error" not in r]
    for r in ok:
        r["frontier"] = not any(better(o, r) for o in ok if o is not r)


def build(encoder: str, width: float, decoder: tuple[int, int], args: argparse.Namespace, work: Path, calib: list[np.ndarray],
          evals: list[np.ndarray], train_cfg: Any) -> dict[str, Any]:
    """Train (optional), export fp32 and int8 to `work`; the row without latency (`_fp32`, `_int8`: the files)."""
    import torch

    from fxassets.export.onnx_export import export_onnx
    from fxassets.core.metrics import psnr
    from fxassets.export.quantize import quantize_int8
    from fxassets.export.session import to_input
    from fxassets.train.student import build_student, count_params, load_student

    tag = f"{encoder}_w{width:g}_d" + _label(decoder).replace(":", "_")
    row: dict[str, Any] = {"encoder": encoder, "width": width, "decoder": _label(decoder)}
    t0 = time.perf_counter()
    if train_cfg is not None:
        from fxassets.train.loop import train_student

        cfg = train_cfg.model_copy(update={"encoder": encoder, "width": width, "decoder_blocks": decoder[0],
                                           "head_blocks": decoder[1], "upsample": decoder[2],
                                           "colour_transform": decoder[3], "head_kernel": 3 if decoder[4] else 1})
        ckpt = work / f"{tag}.safetensors"
        m = train_student(args.pairs, cfg, ckpt, work / f"{tag}.metrics.json", work / f"{tag}.curve.csv", progress=False)
        row.update(heldout_psnr=m["heldout_psnr"], heldout_ssim=m["heldout_ssim"], identity_psnr=m["identity_psnr"],
                   train_steps=m["steps"], train_seconds=m["train_seconds"])
        model, _ = load_student(ckpt)
    else:
        torch.manual_seed(0)
        model = build_student(encoder, width, blocks=decoder[0], head_blocks=decoder[1], upsample=decoder[2],
                              colour=decoder[3], head_kernel=3 if decoder[4] else 1).eval()
    row["params"] = count_params(model)
    fp32, int8 = work / f"{tag}.onnx", work / f"{tag}.int8.onnx"
    exp = export_onnx(model, fp32, size=args.size, opset=args.opset)
    q = quantize_int8(fp32, int8, [to_input(c) for c in calib], method=args.method)
    row.update(fp32_bytes=exp["bytes"], int8_bytes=q["bytes"], nodes_fp32=sum(exp["ops"].values()),
               quantize_nodes=q["ops"].get("QuantizeLinear", 0), build_seconds=round(time.perf_counter() - t0, 1),
               _fp32=fp32, _int8=int8)
    if train_cfg is not None:
        import onnxruntime as ort

        s32 = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        s8 = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
        row["parity_psnr_db"] = float(np.mean([
            psnr(s8.run(None, {"image": to_input(im)})[0], s32.run(None, {"image": to_input(im)})[0]) for im in evals]))
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=ENCODERS, help="timm encoders (features at strides 2..32)")
    ap.add_argument("--widths", nargs="+", type=float, default=WIDTHS, help="decoder width multipliers")
    ap.add_argument("--size", type=int, default=256, help="input size (default 256; --pairs sets it)")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10, help="turns the models take (see latency_compare)")
    ap.add_argument("--calibration", type=int, default=8, help="int8 calibration crops")
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for export / training (ORT runs 1 thread)")
    ap.add_argument("--decoders", nargs="+", default=None, help="B:H decoder variants (default: params.yaml's)")
    ap.add_argument("--train-steps", type=int, default=0, help="train each student this many steps first (needs --pairs)")
    ap.add_argument("--train-seconds", type=float, default=0, help="... or this long (wall clock)")
    ap.add_argument("--pairs", type=Path, help="face_pairs folder: training data, calibration and held-out crops")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="train settings for --train-seconds")
    ap.add_argument("--keep", type=Path, help="keep the models (and checkpoints) in this folder")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    if (args.train_seconds or args.train_steps) and not args.pairs:
        ap.error("--train-steps / --train-seconds need --pairs")

    import logging

    import onnxruntime as ort
    import torch

    logging.disable(logging.WARNING)  # per-model export chatter
    torch.set_num_threads(args.threads)
    from fxassets.export.latency import latency_compare
    from fxassets.train.student import DEFAULT_ENCODER

    from fxassets.core.config import TrainConfig, load_params

    base = load_params(args.params).train if args.params.is_file() else TrainConfig()
    default = (DEFAULT_ENCODER, 1.0, (base.decoder_blocks, base.head_blocks, base.upsample, base.colour_transform,
                                      base.head_kernel == 3))
    decoders = [_decoder(d, default[2]) for d in args.decoders] if args.decoders else [default[2]]
    train_cfg = None
    if args.train_seconds or args.train_steps:
        train_cfg = base.model_copy(update={"steps": args.train_steps or 10**7, "max_seconds": float(args.train_seconds),
                                            "eval_every": 10**7, "threads": args.threads})
    if args.pairs:
        calib = _pairs_images(args.pairs, "train", args.calibration)
        evals = _pairs_images(args.pairs, "heldout", 8)
        args.size = calib[0].shape[0]
    else:
        calib, evals = _random_images(args.calibration, args.size, 1), _random_images(4, args.size, 2)

    tmp = tempfile.TemporaryDirectory(prefix="bench_frontier.")
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    combos = [(e, w, d) for e in args.encoders for w in args.widths for d in decoders]
    if default not in combos:
        combos.insert(0, default)  # the reference
    rows: list[dict[str, Any]] = []
    for encoder, width, decoder in combos:
        try:
            row = build(encoder, width, decoder, args, work, calib, evals, train_cfg)
            done = f"{row['params']:,} params, built in {row['build_seconds']:.0f} s"
        except Exception as exc:  # an encoder timm lacks, or one the student cannot use: say so, go on
            row = {"encoder": encoder, "width": width, "decoder": _label(decoder), "error": f"{type(exc).__name__}: {exc}"[:300]}
            done = row["error"]
        rows.append(row)
        print(f"[{len(rows)}/{len(combos)}] {encoder} w{width:g} d{_label(decoder)}: {done}", file=sys.stderr, flush=True)

    ok = [r for r in rows if "error" not in r]
    models = {f"{i}:{kind}": r[f"_{kind}"] for i, r in enumerate(ok) for kind in ("fp32", "int8")}
    print(f"timing {len(models)} models side by side, {args.runs} runs each ...", file=sys.stderr, flush=True)
    ms = latency_compare(models, threads=1, runs=args.runs, warmup=args.warmup, rounds=args.rounds)
    ref_decoder = _label(default[2])
    ref = next(r for r in ok if (r["encoder"], r["width"], r["decoder"]) == (DEFAULT_ENCODER, 1.0, ref_decoder))
    for i, r in enumerate(ok):
        r.update(fp32_ms=ms[f"{i}:fp32"], int8_ms=ms[f"{i}:int8"])
        r["int8_over_fp32"] = r["int8_ms"] / r["fp32_ms"]
    for r in ok:
        r["int8_vs_ref"] = r["int8_ms"] / ref["int8_ms"]
        r["meets_target"] = r["int8_ms"] <= TARGET_MS
        if "heldout_psnr" in r:  # quality per millisecond: dB gained over the unchanged input, per int8 ms
            r["db_gain_per_int8_ms"] = (r["heldout_psnr"] - r["identity_psnr"]) / r["int8_ms"]
        for k in ("_fp32", "_int8"):
            r.pop(k)

    quality = "heldout_psnr" if train_cfg is not None else None
    pareto(rows, quality)
    ok.sort(key=lambda r: r["int8_ms"])
    head = (f"{'encoder':34s} {'width':>5s} {'dec':>3s} {'params':>9s} {'fp32 ms':>8s} {'int8 ms':>8s} {'int8/fp32':>9s} "
            f"{'vs ref':>7s}" + (f" {'PSNR':>6s} {'dB/ms':>6s} {'parity':>6s}" if quality else "")
            + ("  frontier (PSNR)" if quality else "  frontier (params)"))
    print(head)
    for r in ok:
        extra = (f" {r['heldout_psnr']:6.2f} {r['db_gain_per_int8_ms']:6.2f} {r['parity_psnr_db']:6.1f}" if quality else "")
        print(f"{r['encoder']:34s} {r['width']:5.2f} {r['decoder']:>3s} {r['params']:9,d} {r['fp32_ms']:8.2f} {r['int8_ms']:8.2f} "
              f"{r['int8_over_fp32']:9.2f} {r['int8_vs_ref']:7.2f}{extra}  {'*' if r.get('frontier') else ''}")
    for r in rows:
        if "error" in r:
            print(f"{r['encoder']} w{r['width']:g} d{r['decoder']}: {r['error']}")
    result = {
        "size": args.size, "runs": args.runs, "method": args.method, "threads_ort": 1,
        "calibration": "pairs" if args.pairs else "random", "train_seconds": args.train_seconds,
        "train_steps": args.train_steps,
        "reference": f"{DEFAULT_ENCODER} w1.0 d{ref_decoder} int8", "target_ms": TARGET_MS,
        "onnxruntime": ort.__version__, "torch": torch.__version__, "rows": rows,
    }
    if args.json:
        from fxassets.core.atomic import write_json

        write_json(args.json, result)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
