"""`fxassets bench`: the mobile model's speed, side by side in one run (shared machines are noisy: compare the
ratios). Student fp32 and int8 at 1 and 2 threads (wall clock, and at 1 thread CPU time too: what the model costs
however busy the machine), the per-operator profile of both, the whole per-frame runtime at 1280x720 on a photo and
on a tracked synthetic clip (with the tracking figures), model sizes; the machine beside them (`"cpu"`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="latency of the built mobile models (fp32 / int8, 1 and 2 threads, 720p runtime)")
    p.add_argument("--effect", help="one effect (default: every effect in params.yaml)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per model and thread count (default 100)")
    p.add_argument("--frames", type=int, default=50, help="timed 1280x720 frames for the runtime (default 50)")
    p.add_argument("--clip-frames", type=int, default=0,
                   help="frames of the synthetic clip for the video figure (default 0: all of it, 150)")
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


def _timed(runner, frame: np.ndarray, **kw: Any) -> tuple[Any, float]:
    """runner.process and the process's CPU ms for it (every thread: MediaPipe's, ORT's, OpenCV's)."""
    t = time.process_time()
    res = runner.process(frame, inplace=True, **kw)
    return res, (time.process_time() - t) * 1e3


def runtime_ms(params, effect: str, photo: np.ndarray, frames: int, threads: int = 1) -> dict[str, float]:
    """Median ms per stage of `frames` 1280x720 frames with `photo` in the middle, each detected afresh; "cpu":
    the median CPU ms of a frame."""
    import cv2

    from fxassets.cli.apply import make_runner, summarize

    cv2.setNumThreads(threads)
    frame = frame_720p(photo)
    with make_runner(params, effect, "int8", threads) as runner:
        for _ in range(5):
            _timed(runner, frame.copy())
        results, cpu = zip(*(_timed(runner, frame.copy()) for _ in range(frames)))
    if not all(r.faces for r in results):
        raise RuntimeError("bench: the face was not found in the 720p test frame")
    s = summarize([r.ms for r in results], [r.faces for r in results])
    return {**{k: v for k, v in s.items() if k.endswith("_median")}, "cpu": round(float(np.median(cpu)), 3)}


def video_ms(params, effect: str, photo: np.ndarray, frames: int = 0, threads: int = 1) -> dict[str, Any]:
    """The tracked synthetic clip (`fxassets.synthetic_clip`) through the int8 runtime: mean ms per stage over
    its frames (detection on the first frame and when the track is lost, tracking in between) and the tracking
    figures against the clip's known path."""
    import cv2

    from fxassets.cli.apply import make_runner, summarize
    from fxassets.faces.align import ALIGN_KEYPOINTS
    from fxassets.faces.detect import FaceDetector
    from fxassets.synthetic_clip import SyntheticClip, track_figures

    cv2.setNumThreads(threads)
    with FaceDetector(params.faces.detector, params.faces.min_score) as det:
        found = det.detect(photo)
    if not found:
        raise RuntimeError("bench: no face in the photo for the synthetic clip")
    truth = np.array([found[0].keypoints[k] for k in ALIGN_KEYPOINTS])
    clip = SyntheticClip(photo)
    n = min(frames or len(clip), len(clip))
    results, cpu, kps, raw = [], [], [], []
    with make_runner(params, effect, "int8", threads, track=True) as runner:
        for _ in range(5):  # warm-up, then a new track
            runner.process(clip.frame(0), t=-1.0)
        runner.tracker.reset()
        for i in range(n):
            res, ms = _timed(runner, clip.frame(i), t=clip.t(i))
            results.append(res)
            cpu.append(ms)
            step = runner.tracker.last
            kps.append(None if step.face is None else np.array([step.face.keypoints[k] for k in ALIGN_KEYPOINTS]))
            raw.append(step.raw)
    s = summarize([r.ms for r in results], [r.faces for r in results])
    return {"ms": {k.removesuffix("_ms_mean"): v for k, v in s.items() if k.endswith("_ms_mean")},
            "cpu": round(float(np.mean(cpu)), 3),
            "frames_detected": int(sum(r.ms["detect"] > 0 for r in results)),
            "tracking": track_figures(clip, truth, kps, raw)}


def bench_effect(params, effect: str, runs: int, frames: int, root: Path = Path("."), clip_frames: int = 0) -> dict[str, Any]:
    from fxassets.export.latency import latency_compare, op_profile
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
    cpu = latency_compare(models, threads=1, runs=runs, warmup=5, clock="cpu")
    out["student_fp32_cpu_ms_1t"], out["student_int8_cpu_ms_1t"] = round(cpu["fp32"], 3), round(cpu["int8"], 3)
    out["int8_over_fp32_cpu_1t"] = round(cpu["int8"] / cpu["fp32"], 3)
    for name, path in models.items():
        out[f"student_{name}_op_ms_1t"] = op_profile(path, threads=1, runs=max(5, min(runs, 30)))
    photo = read_rgb(list_sources(root / params.faces.source, 1)[0].path)
    rt = runtime_ms(params, effect, photo, frames, threads=1)
    out["runtime_720p_ms_1t"] = rt["total_ms_median"]
    out["runtime_720p_cpu_ms_1t"] = rt.pop("cpu")
    out["runtime_720p_breakdown_ms_1t"] = {k.removesuffix("_ms_median"): v for k, v in rt.items()}
    video = video_ms(params, effect, photo, clip_frames, threads=1)
    out["runtime_720p_video_ms_1t"] = video["ms"]["total"]
    out["runtime_720p_video_cpu_ms_1t"] = video["cpu"]
    out["runtime_720p_video_breakdown_ms_1t"] = video["ms"]
    out["video_frames_detected"] = video["frames_detected"]
    out["video_tracking"] = video["tracking"]
    out["fp32_bytes"] = p.onnx_fp32.stat().st_size
    out["int8_bytes"] = p.onnx_int8.stat().st_size
    out["targets"] = bench_targets(params.export_for(effect).targets, p, runs)
    return out


def bench_targets(names: list[str], p, runs: int) -> dict[str, Any]:
    """Every runtime of `export.targets` beside the ORT int8 model: its status in the build's report (with the
    reason when it was not built), size, parity, and when its file is here and its runtime installed, its ms at 1
    and 2 threads (wall clock) and at 1 thread in CPU time, measured side by side with the ORT int8 model."""
    from fxassets.export.latency import latency_compare
    from fxassets.export.session import model_session
    from fxassets.export.targets import TARGET_FILES

    built = (json.loads(p.mobile_report.read_text()).get("targets") or {}) if p.mobile_report.is_file() else {}
    files = {"ort": p.onnx_ort, **{t: p.mobile_targets / TARGET_FILES[t] for t in names if t in TARGET_FILES}}
    out: dict[str, Any] = {}
    for t in names:
        e = built.get(t, {"status": "not built", "reason": "not in this build's report.json"})
        out[t] = {k: e[k] for k in ("status", "reason", "bytes", "parity_psnr_db", "float_ops") if k in e}
    timed = {}
    for t, f in files.items():
        if t != "ort" and out.get(t, {}).get("status") in ("ok", "failed") and f.is_file():
            try:
                model_session(f, 1)
                timed[t] = f
            except (ModuleNotFoundError, ImportError) as exc:
                out[t]["not_timed"] = str(exc)
    if len(timed) and p.onnx_ort.is_file():
        timed = {"ort": p.onnx_ort, **timed}
        for n in (1, 2):
            ms = latency_compare({k: model_session(f, n) for k, f in timed.items()}, threads=n, runs=runs, warmup=20)
            for k, v in ms.items():
                out.setdefault(k, {})[f"ms_{n}t"] = round(v, 3)
        cpu = latency_compare({k: model_session(f, 1) for k, f in timed.items()}, threads=1, runs=runs, warmup=5,
                              clock="cpu")
        for k, v in cpu.items():
            out[k]["cpu_ms_1t"] = round(v, 3)
            out[k]["over_ort_cpu_1t"] = round(v / cpu["ort"], 3)
    return out


def run(args: argparse.Namespace) -> int:
    from fxassets.core.config import load_params

    params = load_params(args.params)
    effects = [args.effect] if args.effect else list(params.effects)
    for e in effects:
        params.effect(e)
    from fxassets.core.machine import cpu_info, cpu_label

    print(f"CPU: {cpu_label()}", file=sys.stderr)
    results = [bench_effect(params, e, args.runs, args.frames, clip_frames=args.clip_frames) for e in effects]
    doc: Any = {"cpu": cpu_info(), **results[0]} if len(results) == 1 else {"cpu": cpu_info(), "effects": results}
    if args.json:
        from fxassets.core.atomic import write_json

        write_json(args.json, doc)
    print(json.dumps(doc, indent=2))
    return 0
