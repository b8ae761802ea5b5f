"""Benchmark the student: train with a time budget, report the held-out curve, size, MACs and CPU latency.

    .venv/bin/python benchmarks/bench_student.py --pairs data/face_pairs/cartoon --seconds 180 --json out.json

Quality is reported per step and per second from the same run (a shared CPU makes seconds noisy; steps are not).
Latency: fp32 PyTorch, 1 thread, one 1 x 3 x 256 x 256 frame, median of --runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fxassets.core.atomic import write_json
from fxassets.core.config import TrainConfig
from fxassets.train.student import arch_options, build_student, count_macs, count_params, load_student
from fxassets.train.loop import train_student


def latency_ms(model: torch.nn.Module, size: int = 256, runs: int = 30, threads: int = 1) -> dict[str, float]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = model.eval()
        times = []
        for layout in (torch.contiguous_format, torch.channels_last):
            m = model.to(memory_format=layout)
            x = torch.rand(1, 3, size, size).contiguous(memory_format=layout)
            ts = []
            with torch.inference_mode():
                for _ in range(5):
                    m(x)
                for _ in range(runs):
                    t = time.perf_counter()
                    m(x)
                    ts.append((time.perf_counter() - t) * 1000)
            times.append(ts)
        model.to(memory_format=torch.contiguous_format)
        return {
            "nchw_median_ms": round(statistics.median(times[0]), 2),
            "nchw_min_ms": round(min(times[0]), 2),
            "nhwc_median_ms": round(statistics.median(times[1]), 2),
            "nhwc_min_ms": round(min(times[1]), 2),
        }
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, default=Path("data/face_pairs/cartoon"), help="face_pairs folder")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="train settings to start from")
    ap.add_argument("--seconds", type=float, help="training budget (0 = steps only; default: params.yaml's)")
    ap.add_argument("--steps", type=int, help="step budget (the lr schedule follows the nearer limit)")
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--encoder")
    ap.add_argument("--width", type=float)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--crop", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--runs", type=int, default=30, help="latency repetitions")
    ap.add_argument("--out", type=Path, default=None, help="keep checkpoint/metrics/curve here (default: temp)")
    ap.add_argument("--json", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)

    from fxassets.core.config import load_params

    base = load_params(args.params).train if args.params.is_file() else TrainConfig()
    given = {"max_seconds": args.seconds, "steps": args.steps, "eval_every": args.eval_every, "encoder": args.encoder,
             "width": args.width, "batch_size": args.batch, "crop": args.crop, "lr": args.lr, "threads": args.threads,
             "seed": args.seed}
    cfg = base.model_copy(update={k: v for k, v in given.items() if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        metrics = train_student(args.pairs, cfg, out / "student.safetensors", out / "metrics.json",
                                out / "curve.csv", progress=sys.stderr.isatty())
        wall = time.perf_counter() - t0
        curve_text = (out / "curve.csv").read_text()
        model, _ = load_student(out / "student.safetensors")

    rows = [dict(zip(("step", "train_loss", "heldout_psnr", "heldout_ssim"), map(float, line.split(","))))
            for line in curve_text.splitlines()[1:]]
    macs = count_macs(build_student(cfg.encoder, cfg.width, **arch_options(cfg)))
    report = {
        "config": cfg.model_dump(mode="json"),
        "metrics": metrics,
        "wall_seconds": round(wall, 1),
        "seconds_per_step": round(metrics["train_seconds"] / max(metrics["steps"], 1), 3),
        "curve": rows,
        "params": count_params(model),
        "macs_256": macs,
        "latency_fp32_1thread_256": latency_ms(model, runs=args.runs),
    }
    print(f"pairs: {metrics['train_pairs']} train / {metrics['heldout_pairs']} held-out from {args.pairs}")
    print(f"{'step':>6} {'loss':>8} {'PSNR':>7} {'SSIM':>6}")
    for r in rows:
        print(f"{int(r['step']):6d} {r['train_loss']:8.4f} {r['heldout_psnr']:7.2f} {r['heldout_ssim']:6.3f}")
    print(f"held-out: {metrics['heldout_psnr']:.2f} dB / {metrics['heldout_ssim']:.3f} SSIM "
          f"(identity {metrics['identity_psnr']:.2f} dB / {metrics['identity_ssim']:.3f}) after {metrics['steps']} "
          f"steps, {metrics['train_seconds']:.0f} s ({report['seconds_per_step']:.2f} s/step)")
    mac_text = f"{macs / 1e6:.0f} M MACs" if macs else "MACs n/a"
    lat = report["latency_fp32_1thread_256"]
    print(f"model: {report['params'] / 1e6:.2f} M params, {mac_text} at 256x256; fp32 1 thread "
          f"{lat['nchw_median_ms']:.1f} ms (NCHW) / {lat['nhwc_median_ms']:.1f} ms (channels_last) per frame")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
