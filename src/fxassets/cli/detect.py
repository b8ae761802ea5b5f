"""`fxassets detect`: faces (box, score, keypoints) for an image or a folder, as JSON; optional preview PNGs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fxassets.core.atomic import write_json
from fxassets.core.images import distinct_stems, list_images, read_rgb, write_png


def _score(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `detect` on an argparse subparsers object; the parser's default `func` is `run`."""
    p = subparsers.add_parser(
        "detect",
        help="detect faces in an image or a folder (JSON: boxes, scores, keypoints)",
        description="Detect faces with MediaPipe BlazeFace. Coordinates are pixels of the image after EXIF "
        "orientation; left_eye/left_ear are on the image's left. Unreadable images and images without a face "
        "get \"faces\": [] and a \"reason\".",
    )
    p.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    p.add_argument("--json", type=Path, help="write the JSON here (default: print it to stdout)")
    p.add_argument("--preview", type=Path, help="folder for preview PNGs with boxes and keypoints drawn")
    p.add_argument("--detector", choices=["short", "full"], default="short", help="short range (default) or full range")
    p.add_argument("--min-score", type=_score, default=0.5, help="minimum detection score (default 0.5)")
    p.set_defaults(func=run)
    return p


def draw_faces(rgb: np.ndarray, faces: list[Any], note: str = "") -> np.ndarray:
    """A copy of `rgb` with each face's box, score and keypoints drawn (and `note` when there is no face)."""
    out = rgb.copy()
    t = max(1, round(max(rgb.shape[:2]) / 500))
    font, green = cv2.FONT_HERSHEY_SIMPLEX, (0, 255, 0)
    colors = {"left": (255, 0, 0), "right": (0, 0, 255)}  # red on the image's left, blue on its right
    for f in faces:
        x, y, w, h = (int(round(v)) for v in f.box)
        cv2.rectangle(out, (x, y), (x + w, y + h), green, t)
        cv2.putText(out, f"{f.score:.2f}", (x, max(y - 4 * t, 10 * t)), font, 0.4 * t, green, t)
        for name, (kx, ky) in f.keypoints.items():
            color = colors.get(name.split("_")[0], (255, 255, 0))
            cv2.circle(out, (int(round(kx)), int(round(ky))), 2 * t, color, -1)
    if note:
        cv2.putText(out, note, (5 * t, 15 * t), font, 0.4 * t, (255, 0, 0), t)
    return out


def run(args: argparse.Namespace) -> int:
    """Detect faces in args.input; 0 on success (even when some images have no face), 2 if the input is missing."""
    from tqdm import tqdm

    from fxassets.faces.detect import FaceDetector

    src = Path(args.input)
    if src.is_dir():
        files = list_images(src)
    elif src.is_file():
        files = [src]
    else:
        print(f"fxassets detect: {src}: no such file or folder", file=sys.stderr)
        return 2
    preview = Path(args.preview) if getattr(args, "preview", None) else None
    stems = distinct_stems(files)  # x.jpg and x.png: previews x_jpg.png and x_png.png
    entries: list[dict[str, Any]] = []
    with FaceDetector(kind=getattr(args, "detector", "short"), min_score=getattr(args, "min_score", 0.5)) as detector:
        for path in tqdm(files, desc="detect", unit="img", file=sys.stderr, disable=len(files) < 2):
            entry: dict[str, Any] = {"file": path.name, "faces": []}
            try:
                rgb = read_rgb(path)
                faces = detector.detect(rgb)
            except Exception as exc:  # one bad file never stops the run
                entry["reason"] = str(exc) or type(exc).__name__
                entries.append(entry)
                continue
            entry.update(width=int(rgb.shape[1]), height=int(rgb.shape[0]), faces=[f.to_json() for f in faces])
            if not faces:
                entry["reason"] = "no face found"
            if preview is not None:
                write_png(preview / f"{stems[path]}.png", draw_faces(rgb, faces, entry.get("reason", "")))
            entries.append(entry)
    if getattr(args, "json", None):
        write_json(args.json, entries)
    else:
        print(json.dumps(entries, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `detect` alone (the project's `fxassets` CLI registers it with add_parser)."""
    parser = argparse.ArgumentParser(prog="fxassets")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
