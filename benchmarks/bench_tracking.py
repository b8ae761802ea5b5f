"""The tracker's Face Mesh: its runtime side by side, and the calibration of its keypoints onto the detector's.

    python benchmarks/bench_tracking.py [--json F]   # the mesh in LiteRT (the tracker's) against OpenCV's importer
    python benchmarks/bench_tracking.py --effect cartoon  # ... and the tracked clip through the built int8 student
    python benchmarks/bench_tracking.py --calibrate  # MESH_TO_DETECTOR from the 102 sample portraits

Side by side: MediaPipe's `face_landmark.tflite` in the LiteRT interpreter (XNNPACK, 1 thread; what
`fxassets.tracking.FaceMesh` runs) and in OpenCV's TFLite importer (`cv2.dnn.readNetFromTFLite`, what it ran
before), alternating in one process on the synthetic clip's crops: CPU ms per call of the calling thread (the
machine may be shared), the largest landmark difference, and the tracker's figures on the whole clip with each;
with `--effect`, `fxassets bench`'s tracked-clip figure (the whole runtime: track, align, model, composite; CPU ms of
the process) with each mesh, alternating.

Calibration: on each sample portrait the detector's keypoints (with the refinement pass: how the training crops are
aligned) minus the mesh's on the ROI the detector gives, in the eye frame, in eye distances; the means are
`fxassets.tracking.MESH_TO_DETECTOR`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fxassets.core.atomic import write_json  # noqa: E402
from fxassets.core.images import list_images, read_rgb  # noqa: E402
from fxassets.core.machine import cpu_info  # noqa: E402
from fxassets.faces.align import ALIGN_KEYPOINTS  # noqa: E402
from fxassets.faces.detect import FaceDetector  # noqa: E402
from fxassets.synthetic_clip import SyntheticClip, track_figures  # noqa: E402
from fxassets.tracking import MESH_MODEL, FaceMesh, FaceTracker, eye_frame, mesh_keypoints, roi_from_face  # noqa: E402

SAMPLE_FACES = Path(__file__).resolve().parents[1] / "data" / "samples" / "faces"


class OpenCVMesh(FaceMesh):
    """The same model through OpenCV's TFLite importer (the tracker's mesh before LiteRT)."""

    def __init__(self):  # noqa: D107 (no LiteRT interpreter)
        self.net = cv2.dnn.readNetFromTFLite(str(MESH_MODEL))
        self.names = self.net.getUnconnectedOutLayersNames()

    def infer(self, crop: np.ndarray) -> tuple[np.ndarray, float]:
        self.net.setInput(cv2.dnn.blobFromImage(crop, 1 / 255.0))
        raw, logit = sorted(self.net.forward(self.names), key=lambda o: -o.size)
        return raw.ravel(), float(logit.ravel()[0])


def _keypoints(face) -> np.ndarray:
    return np.array([face.keypoints[k] for k in ALIGN_KEYPOINTS])


def calibrate() -> dict:
    offsets = []
    mesh = FaceMesh()
    with FaceDetector() as det:
        for path in list_images(SAMPLE_FACES):
            rgb = read_rgb(path)
            faces = det.detect(rgb)
            if not faces:
                continue
            lm, _ = mesh(rgb, roi_from_face(faces[0]))
            kps = mesh_keypoints(lm, dict.fromkeys(ALIGN_KEYPOINTS, (0.0, 0.0)))
            ux, uy, iod = eye_frame(kps)
            offsets.append((_keypoints(faces[0]) - kps) @ np.stack([ux, uy]).T / iod)
    o = np.array(offsets)
    return {"faces": len(o), **{k: {"mean": [round(float(v), 4) for v in o[:, i].mean(0)],
                                    "std": [round(float(v), 4) for v in o[:, i].std(0)]}
                                for i, k in enumerate(ALIGN_KEYPOINTS)}}


def _clip_track(clip: SyntheticClip, truth: np.ndarray, mesh: FaceMesh) -> dict:
    with FaceTracker() as tracker:
        tracker.mesh = mesh
        kps, raw, cpu = [], [], []
        for i in range(len(clip)):
            frame = clip.frame(i)
            t = time.thread_time()
            step = tracker.update(frame, clip.t(i))
            cpu.append((time.thread_time() - t) * 1e3)
            kps.append(None if step.face is None else _keypoints(step.face))
            raw.append(step.raw)
    return {"track_cpu_ms_mean": round(float(np.mean(cpu)), 3), **track_figures(clip, truth, kps, raw)}


def runtime(effect: str, rounds: int) -> dict:
    """`fxassets bench`'s tracked 720p clip through the built int8 student, with each mesh, alternating."""
    import fxassets.tracking
    from fxassets.cli.bench import video_ms
    from fxassets.core.config import load_params

    params = load_params(Path("params.yaml"))
    photo = read_rgb(list_images(SAMPLE_FACES)[0])
    runs: dict[str, list] = {"litert": [], "opencv": []}
    for _ in range(rounds):
        for name, mesh in (("litert", FaceMesh), ("opencv", OpenCVMesh)):
            fxassets.tracking.FaceMesh = mesh  # what FaceTracker builds
            try:
                runs[name].append(video_ms(params, effect, photo))
            finally:
                fxassets.tracking.FaceMesh = FaceMesh
    return {name: {"video_cpu_ms_1t": round(float(np.median([r["cpu"] for r in rs])), 3),
                   "video_ms_1t": {k: round(float(np.median([r["ms"][k] for r in rs])), 3) for k in rs[0]["ms"]}}
            for name, rs in runs.items()}


def compare(rounds: int = 5) -> dict:
    cv2.setNumThreads(1)  # OpenCV's importer on one thread too: the calling thread's CPU time is all of it
    photo = read_rgb(list_images(SAMPLE_FACES)[0])
    with FaceDetector() as det:
        face = det.detect(photo)[0]
    clip = SyntheticClip(photo)
    meshes = {"litert": FaceMesh(), "opencv": OpenCVMesh()}
    # what the tracker's mesh is asked: each frame with a face, and the ROI the tracker found it in
    crops = []
    with FaceTracker() as tracker:
        for i in range(len(clip)):
            frame = clip.frame(i)
            tracker.update(frame, clip.t(i))
            if tracker.roi is not None:
                crops.append((frame, tracker.roi))
    cpu = {k: [] for k in meshes}
    diff = 0.0
    for _ in range(rounds):  # alternating: both see the same machine
        for name, mesh in meshes.items():
            t = time.thread_time()
            for frame, roi in crops:
                mesh(frame, roi)
            cpu[name].append((time.thread_time() - t) * 1e3 / len(crops))
    for frame, roi in crops[::10]:
        diff = max(diff, float(np.abs(meshes["litert"](frame, roi)[0] - meshes["opencv"](frame, roi)[0]).max()))
    out = {"cpu": cpu_info(), "crops": len(crops),
           "mesh_cpu_ms": {k: round(float(np.median(v)), 3) for k, v in cpu.items()},
           "max_landmark_difference_px": round(diff, 5)}
    out["litert_over_opencv"] = round(out["mesh_cpu_ms"]["litert"] / out["mesh_cpu_ms"]["opencv"], 3)
    truth = _keypoints(face)
    out["clip"] = {name: _clip_track(clip, truth, mesh) for name, mesh in meshes.items()}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibrate", action="store_true", help="MESH_TO_DETECTOR from the sample portraits")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds over the clip's crops (default 5)")
    ap.add_argument("--effect", help="also the tracked clip through this built effect's int8 student (make run first)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    out = calibrate() if args.calibrate else compare(args.rounds)
    if args.effect and not args.calibrate:
        out["runtime"] = {"effect": args.effect, **runtime(args.effect, max(1, args.rounds // 2))}
    print(json.dumps(out, indent=1))
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
