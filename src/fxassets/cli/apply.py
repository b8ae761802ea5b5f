"""`fxassets apply`: run an effect on photos, a folder or a video, the way a phone would (detect, align, run,
composite back), and print a per-frame timing summary. `--aligned` writes the aligned output crops instead.

A video is tracked: the face is detected on the first frame and whenever the track is lost, and followed from frame
to frame in between (`fxassets.tracking`).  A frame that cannot be decoded mid-clip is replaced by the previous
output frame (the clip keeps its length and timing) and counted in `frames_unreadable`."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fxassets.core.images import IMAGE_SUFFIXES, ImageError, distinct_stems, list_images, read_rgb, write_png

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
VIDEO_OUT_SUFFIXES = tuple(s for s in VIDEO_SUFFIXES if s != ".webm")  # what the mp4v writer can fill (WebM cannot)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("apply", help="apply an effect to an image, a folder of images or a video")
    p.add_argument("--effect", required=True)
    p.add_argument("--input", required=True, type=Path, help="image, folder of images, or video (.mp4, .mov, ...)")
    p.add_argument("--output", required=True, type=Path,
                   help="output image / folder / video (with --aligned: a folder of crops)")
    p.add_argument("--engine", choices=["int8", "fp32", "litert", "executorch", "teacher"], default="int8",
                   help="int8 / fp32: the ONNX models (ONNX Runtime); litert / executorch: the .tflite / .pte "
                        "targets (export.targets; their runtimes: the `mobile` extra); teacher: for comparison")
    p.add_argument("--aligned", action="store_true", help="write the aligned output crops, not composited frames")
    p.add_argument("--threads", type=int, default=1, help="model threads (default 1, as on a phone core)")
    p.add_argument("--json", type=Path, help="also write the timing summary here")
    p.set_defaults(func=run)
    return p


def make_runner(params, effect: str, engine: str, threads: int = 1, root: Path = Path("."), track: bool = False):
    from fxassets.core.paths import EffectPaths
    from fxassets.runtime import EffectRunner

    cfg = params.effect(effect)
    paths = EffectPaths(root, effect)
    if engine == "teacher":
        from fxassets.teachers import make_teacher

        return EffectRunner(params.faces, "teacher", teacher=make_teacher(params.teacher, cfg.teacher), track=track)
    if engine in ("litert", "executorch"):
        from fxassets.export.targets import TARGET_FILES

        model = paths.mobile_targets / TARGET_FILES[engine]
    else:
        model = paths.onnx_int8 if engine == "int8" else paths.onnx_fp32
    return EffectRunner(params.faces, engine, model_path=model, threads=threads, track=track)


def summarize(timings: list[dict[str, float]], faces: list[int]) -> dict[str, Any]:
    """Frame counts and, per stage (and the total), the median, 90th percentile and mean ms of the frames."""
    from fxassets.runtime import STAGES

    out: dict[str, Any] = {"frames": len(faces), "frames_with_face": int(sum(f > 0 for f in faces)),
                           "frames_passed_through": int(sum(f == 0 for f in faces))}
    for key in ("total", *STAGES):
        v = np.array([t[key] for t in timings]) if timings else np.zeros(1)
        out[f"{key}_ms_median"] = round(float(np.median(v)), 3)
        out[f"{key}_ms_p90"] = round(float(np.percentile(v, 90)), 3)
        out[f"{key}_ms_mean"] = round(float(np.mean(v)), 3)
    return out


def _write_crops(folder: Path, stem: str, crops: list[np.ndarray]) -> None:
    for i, c in enumerate(crops):
        write_png(folder / f"{stem}_face{i}.png", c)


def _images(runner, stems: dict[Path, str], output: Path, aligned: bool, single: bool) -> tuple[list, list]:
    timings, faces = [], []
    for f in tqdm(stems, desc="apply", unit="img", disable=single or not sys.stderr.isatty()):
        try:
            rgb = read_rgb(f)
        except ImageError as exc:
            if single:  # the one input given: an error, not a skip
                raise
            print(f"fxassets: skipped {exc}", file=sys.stderr)
            continue
        res = runner.process(rgb, blend=not aligned)
        timings.append(res.ms)
        faces.append(res.faces)
        if aligned:
            _write_crops(output, stems[f], res.crops)
        elif single:
            _write_any(output, res.frame)
        else:
            write_png(output / f"{stems[f]}.png", res.frame)
    return timings, faces


def _write_any(path: Path, rgb: np.ndarray) -> None:
    import cv2

    from fxassets.core.atomic import write_bytes

    ok, buf = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{path}: cannot write this image format")
    write_bytes(path, buf.tobytes())


MAX_UNREADABLE = 30  # consecutive frames that fail to decode before the clip is taken as ended


def _video(runner, src: Path, output: Path, aligned: bool) -> tuple[list, list, int]:
    import cv2

    from fxassets.core.atomic import atomic_path

    cap = cv2.VideoCapture(str(src))
    if not cap.isOpened():
        raise ValueError(f"{src}: cannot open video")
    fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    timings, faces, unreadable, pending = [], [], 0, 0
    writer, last = None, None
    with atomic_path(output) if not aligned else _nullpath() as tmp:
        try:
            bar = tqdm(desc="apply", unit="frame", total=n, disable=not sys.stderr.isatty())
            for i in itertools.count():
                ok, bgr = cap.read()
                if not ok:  # the end, or a frame the decoder could not read: go on while frames may be left
                    pending += 1
                    if (n is not None and i >= n) or pending > MAX_UNREADABLE:
                        break
                    continue
                if pending and last is not None:  # frames lost mid-clip: the previous output stands in for them
                    for _ in range(pending):
                        writer.write(last)
                unreadable, pending = unreadable + pending, 0
                bar.update()
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                res = runner.process(rgb, blend=not aligned, t=i / fps, inplace=True)
                timings.append(res.ms)
                faces.append(res.faces)
                if aligned:
                    _write_crops(output, f"{src.stem}_{i:06d}", res.crops)
                    continue
                if writer is None:
                    h, w = rgb.shape[:2]
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                    if not writer.isOpened():
                        raise ValueError(f"{output}: cannot write a video there (try .mp4)")
                last = cv2.cvtColor(res.frame, cv2.COLOR_RGB2BGR)
                writer.write(last)
            bar.close()
        finally:
            cap.release()
            if writer is not None:
                writer.release()
    return timings, faces, unreadable


class _nullpath:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def check_output(src: Path, output: Path, is_video: bool, aligned: bool, json_path: Path | None = None) -> None:
    """Refuse, before any work, an output that would overwrite the input or cannot be written as asked."""
    for p, what in ((output, "--output"), (json_path, "--json")):
        if p is not None and p.resolve() == src.resolve():
            raise ValueError(f"{p}: {what} is the input {src}; refusing to overwrite it, give another path")
    folder = aligned or src.is_dir()
    above = next(p for p in (output.absolute(), *output.absolute().parents) if p.exists())
    if above.is_file() and (folder or above != output.absolute()):
        raise ValueError(f"{output}: --output {'is' if above == output.absolute() else f'is under {above}, which is'} "
                         "a file, not a folder")
    kinds = () if folder else VIDEO_OUT_SUFFIXES if is_video else IMAGE_SUFFIXES
    if kinds and (output.suffix.lower() not in kinds or output.is_dir()):
        what = "a folder" if output.is_dir() else f"not {'a video' if is_video else 'an image'} file name"
        raise ValueError(f"{output}: --output is {what}; for this input give a file ending in {', '.join(kinds)}")


def run(args: argparse.Namespace) -> int:
    from fxassets.core.config import load_params

    params = load_params(args.params)
    params.effect(args.effect)  # an unknown effect fails first, naming the known ones
    src: Path = args.input
    if not src.exists():
        raise FileNotFoundError(f"{src}: input not found")
    is_video = src.is_file() and src.suffix.lower() in VIDEO_SUFFIXES
    if src.is_file() and not is_video and src.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{src}: not an image ({', '.join(IMAGE_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)})")
    check_output(src, args.output, is_video, args.aligned, args.json)
    stems = distinct_stems(list_images(src) if src.is_dir() else [src])  # a name clash is refused before any work too
    if args.aligned or src.is_dir():
        args.output.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {}
    with make_runner(params, args.effect, args.engine, args.threads, track=is_video) as runner:
        if is_video:
            timings, faces, extra["frames_unreadable"] = _video(runner, src, args.output, args.aligned)
            if not timings:
                raise ValueError(f"{src}: no frame of the video could be read")
        else:
            timings, faces = _images(runner, stems, args.output, args.aligned, single=src.is_file())
    summary = {"effect": args.effect, "engine": args.engine, "input": str(src), "output": str(args.output),
               **summarize(timings, faces), **extra}
    if is_video:
        summary["frames_detected"] = int(sum(t["detect"] > 0 for t in timings))
    if args.json:
        from fxassets.core.atomic import write_json

        write_json(args.json, summary)
    print(json.dumps(summary, indent=2))
    return 0
