"""`fxassets bench`: the mobile model's speed, side by side in one run (shared machines are noisy: compare the
ratios). Student fp32 and int8 at 1 and 2 threads, the whole per-frame runtime at 1280x720, model sizes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="latency of the built mobile models (fp32 / int8, 1 and 2 threads, 720p runtime)")
    p.add_argument("--effect", help="one effect (default: every effect in params.yaml)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per model and thread count (default 100)")
    p.add_argument("--frames", type=int, default=50, help="timed 1280x720 frames for the runtime (default 50)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.set_defaults(func=run)
    return p


def frame_720p(photo: np.ndarray) -> np.ndarray:
    """A 1280x720 frame with `photo` scaled to the frame's height in the middle (the face about 40 % of it)."""
    import cv2

    h = 720
    w = round(photo.shape[1] * h / photo.shape[0])
    img = cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA)
    frame = np.full((720, 1280, 3), 96, np.uint8)
    x0 = (1280 - w) // 2
    frame[:, max(x0, 0) : max(x0, 0) + min(w, 1280)] = img[:, max(-x0, 0) : max(-x0, 0) + min(w, 1280)]
    return frame


def runtime_ms(params, effect: str, photo: np.ndarray, frames: int, threads: int = 1) -> dict[str, float]:
    import cv2

    from fxassets.cli.apply import make_runner, summarize

    cv2.setNumThreads(threads)
    frame = frame_720p(photo)
    with make_runner(params, effect, "int8", threads) as runner:
        for _ in range(5):
            runner.process(frame)
        results = [runner.process(frame) for _ in range(frames)]
    if not all(r.faces for r in results):
        raise RuntimeError("bench: the face was not found in the 720p test frame")
    s = summarize([r.ms for r in results], [r.faces for r in results])
    return {k: v for k, v in s.items() if k.endswith("_median")}


def bench_effect(params, effect: str, runs: int, frames: int, root: Path = Path(".")) -> dict[str, Any]:
    from fxassets.export.latency import latency_compare
    from fxassets.core.images import read_rgb
    from fxassets.core.paths import EffectPaths
    from fxassets.sources import list_sources

    p = EffectPaths(root, effect)
    for f in (p.onnx_fp32, p.onnx_int8):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: model not found; run `make run` (or `dvc repro mobile_model@{effect}`) first")
    models = {"fp32": p.onnx_fp32, "int8": p.onnx_int8}
    out: dict[str, Any] = {"effect": effect}
    for t in (1, 2):
        ms = latency_compare(models, threads=t, runs=runs, warmup=20)
        out[f"student_fp32_ms_{t}t"] = round(ms["fp32"], 3)
        out[f"student_int8_ms_{t}t"] = round(ms["int8"], 3)
        out[f"int8_over_fp32_{t}t"] = round(ms["int8"] / ms["fp32"], 3)
    photo = read_rgb(list_sources(root / params.faces.source, 1)[0].path)
    rt = runtime_ms(params, effect, photo, frames, threads=1)
    out["runtime_720p_ms_1t"] = rt["total_ms_median"]
    out["runtime_720p_breakdown_ms_1t"] = {k.removesuffix("_ms_median"): v for k, v in rt.items()}
    out["fp32_bytes"] = p.onnx_fp32.stat().st_size
    out["int8_bytes"] = p.onnx_int8.stat().st_size
    return out


def run(args: argparse.Namespace) -> int:
    from fxassets.core.config import load_params

    params = load_params(args.params)
    effects = [args.effect] if args.effect else list(params.effects)
    for e in effects:
        params.effect(e)
    from fxassets.core.machine import cpu_info, cpu_label

    print(f"CPU: {cpu_label()}", file=sys.stderr)
    results = [bench_effect(params, e, args.runs, args.frames) for e in effects]
    doc: Any = {"cpu": cpu_info(), **results[0]} if len(results) == 1 else {"cpu": cpu_info(), "effects": results}
    if args.json:
        from fxassets.core.atomic import write_json

        write_json(args.json, doc)
    print(json.dumps(doc, indent=2))
    return 0
