"""Face detection + alignment throughput, compositing cost and keypoint accuracy, on one thread.

    python benchmarks/bench_faces.py [--faces DIR] [--n 40] [--json results.json]

Detect + align = detect, select_face, align_matrix and warp_aligned to a 256 crop (image decoding excluded).
Composite = warping a 256 output back into a 1280x720 frame and blending it. Accuracy needs the hand-placed
landmarks of ../shared/data/faces.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fxassets.core.atomic import write_json  # noqa: E402
from fxassets.faces.detect import FaceDetector, select_face  # noqa: E402
from fxassets.faces.align import align_matrix, warp_aligned  # noqa: E402
from fxassets.faces.composite import composite  # noqa: E402
from fxassets.faces.composite import face_mask  # noqa: E402
from fxassets.core.images import list_images, read_rgb  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "data" / "faces"
SAMPLE_FACES = REPO / "data" / "samples" / "faces"


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(wall seconds, cpu seconds) per call, best of 3 rounds of `repeat` calls."""
    fn()
    best = (float("inf"), 0.0)
    for _ in range(3):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(repeat):
            fn()
        best = min(best, ((time.perf_counter() - w) / repeat, (time.process_time() - c) / repeat))
    return best


def bench_detect(images: list[np.ndarray], kind: str, refine: bool) -> dict[str, float]:
    with FaceDetector(kind, refine=refine) as det:

        def detect_all() -> None:
            for img in images:
                det.detect(img)

        def detect_align_all() -> None:
            for img in images:
                face, _ = select_face(det.detect(img), "largest")
                if face is not None:
                    warp_aligned(img, align_matrix(face, 256), 256)

        d, _ = timed(detect_all, 1)
        a, cpu = timed(detect_align_all, 1)
    n = len(images)
    return {"detect_ms": 1e3 * d / n, "detect_align_ms": 1e3 * a / n, "faces_per_s": n / a, "faces_per_cpu_s": n / cpu}


def bench_composite() -> dict[str, float]:
    face = read_rgb(next(p for p in (SHARED_FACES / "faces_010.jpg", SAMPLE_FACES / "faces_010.jpg") if p.is_file()))
    frame = np.full((720, 1280, 3), 110, np.uint8)
    frame[150:550, 600:1000] = cv2.resize(face, (400, 400), interpolation=cv2.INTER_AREA)
    with FaceDetector() as det:
        M = align_matrix(det.detect(frame)[0], 256)
    out = 255 - warp_aligned(frame, M, 256)  # stand-in for the student's output
    mask = face_mask(256)
    c, _ = timed(lambda: composite(frame, out, M, mask), 200)
    m, _ = timed(lambda: face_mask(256), 50)
    w, _ = timed(lambda: warp_aligned(frame, M, 256), 200)
    return {"composite_ms": 1000 * c, "face_mask_ms": 1000 * m, "warp_aligned_720p_ms": 1000 * w}


def bench_accuracy(kind: str) -> dict[str, float] | None:
    landmarks = SHARED_FACES / "landmarks"
    if not landmarks.is_dir():
        return None
    errors, found, files = [], 0, sorted(SHARED_FACES.glob("faces_*.jpg"))
    with FaceDetector(kind) as det:
        for path in files:
            faces = det.detect(read_rgb(path))
            if len(faces) != 1:
                continue
            found += 1
            pupils = np.loadtxt(landmarks / f"{path.stem}.tem", skiprows=1, max_rows=2)
            eyes = np.array([faces[0].keypoints["left_eye"], faces[0].keypoints["right_eye"]])
            errors.extend(np.linalg.norm(eyes - pupils, axis=1) / np.linalg.norm(pupils[1] - pupils[0]))
    e = np.array(errors)
    return {"faces": len(files), "found": found, "mean": e.mean(), "median": float(np.median(e)), "max": e.max()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=SHARED_FACES if SHARED_FACES.is_dir() else SAMPLE_FACES)
    parser.add_argument("--n", type=int, default=40, help="images to time (default 40)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    originals = [read_rgb(p) for p in list_images(args.faces)[: args.n]]
    results: dict[str, object] = {"images": len(originals), "threads": 1}
    print(f"{len(originals)} images from {args.faces}, 1 thread\n")
    header = ("input", "detector", "refine", "detect ms", "+align ms", "faces/s", "per cpu-s")
    print("{:>8} {:>8} {:>6} {:>10} {:>10} {:>8} {:>10}".format(*header))
    for px in (512, 1350):
        images = [im if im.shape[0] == px else cv2.resize(im, (px, px), interpolation=cv2.INTER_AREA) for im in originals]
        for kind, refine in (("short", True), ("short", False), ("full", True)):
            r = bench_detect(images, kind, refine)
            results[f"{px}px_{kind}{'' if refine else '_norefine'}"] = r
            ms = f"{r['detect_ms']:>10.2f} {r['detect_align_ms']:>10.2f}"
            print(f"{px:>6}px {kind:>8} {str(refine):>6} {ms} {r['faces_per_s']:>8.0f} {r['faces_per_cpu_s']:>10.0f}")

    c = bench_composite()
    results["composite"] = c
    print(f"\ncomposite 256 -> 1280x720: {c['composite_ms']:.2f} ms/frame (face_mask(256) {c['face_mask_ms']:.2f} ms, "
          f"warp_aligned from 720p {c['warp_aligned_720p_ms']:.2f} ms)")

    for kind in ("short", "full"):
        a = bench_accuracy(kind)
        if a is None:
            print("\naccuracy: skipped (no ../shared/data/faces/landmarks)")
            break
        results[f"accuracy_{kind}"] = a
        print(f"accuracy {kind}: {a['found']}/{a['faces']} found; pupil error / inter-pupil distance "
              f"mean {a['mean']:.4f} median {a['median']:.4f} max {a['max']:.4f}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
