"""Face tracking for video, the way MediaPipe's face pipeline does it: detect on the first frame and whenever the
track is lost; in between, run the Face Mesh on a region of interest (ROI) from the previous frame's landmarks; smooth
the alignment keypoints over time with a One Euro filter so that the effect does not jitter.

- `FaceMesh`: MediaPipe's `face_landmark.tflite` (468 points on a 192 x 192 crop, and a face-presence score) in
  the LiteRT interpreter (`ai-edge-litert`, XNNPACK, one thread: a call 1.6 ms against 3.0 in OpenCV's TFLite
  importer on one thread, Intel Xeon; the same landmarks to 2e-4 px; benchmarks/bench_tracking.py, docs/mobile.md).
- `mesh_keypoints`: the four alignment keypoints (eyes, nose tip, mouth) from the mesh, shifted onto the
  detector's convention (`MESH_TO_DETECTOR`, measured on the sample portraits: the student was trained on crops
  aligned from the detector's keypoints).
- `OneEuro`: the One Euro filter (Casiez, Roussel, Vogel, CHI 2012), speed measured in eye distances per second.
- `FaceTracker.update(frame, t)`: one video frame -> a `TrackStep` (the face or None, whether the detector ran, ms).

One face is tracked (the largest when it is acquired); `fxassets.runtime.EffectRunner(track=True)` uses it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from fxassets.faces.align import ALIGN_KEYPOINTS, _warp, invert_matrix
from fxassets.faces.detect import MODEL_DIR, Face, FaceDetector, _as_rgb, _quiet_stderr

MESH_MODEL = MODEL_DIR / "face_landmark.tflite"
MESH_SIZE = 192
ROI_SCALE = 1.5  # the mesh's crop side / the face's extent (MediaPipe's)
# Face Mesh points averaged into each alignment keypoint (image sides, as fxassets.faces.detect.KEYPOINTS): the eye
# contours, the nose tip, the inner lips
MESH_POINTS = {
    "left_eye": (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246),
    "right_eye": (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466),
    "nose_tip": (1,),
    "mouth": (13, 14),
}
# the detector's keypoint minus the mesh's, in the eye frame (x along left -> right eye, y down the face), in eye
# distances: mean over the 102 sample portraits (benchmarks/bench_tracking.py --calibrate); spread 0.02-0.03
MESH_TO_DETECTOR = {"left_eye": (0.0070, -0.0230), "right_eye": (-0.0055, -0.0279),
                    "nose_tip": (0.0139, -0.0633), "mouth": (0.0061, 0.0221)}


def eye_frame(kps: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(x axis, y axis, eye distance) of 4x2 alignment keypoints (rows in ALIGN_KEYPOINTS order)."""
    axis = kps[1] - kps[0]
    iod = float(np.hypot(*axis))
    ux = axis / max(iod, 1e-9)
    return ux, np.array([-ux[1], ux[0]]), iod


def mesh_keypoints(landmarks: np.ndarray, offsets: dict[str, tuple[float, float]] = MESH_TO_DETECTOR) -> np.ndarray:
    """The 4x2 alignment keypoints (ALIGN_KEYPOINTS order) from 468x2 mesh landmarks, in the detector's convention."""
    kps = np.array([landmarks[list(MESH_POINTS[k])].mean(0) for k in ALIGN_KEYPOINTS])
    ux, uy, iod = eye_frame(kps)
    return kps + np.array([offsets[k] for k in ALIGN_KEYPOINTS]) @ np.stack([ux, uy]) * iod


class FaceMesh:
    """MediaPipe Face Mesh on an ROI (centre x, y, side, angle in radians) of an RGB uint8 frame."""

    def __init__(self, threads: int = 1):
        if not MESH_MODEL.is_file():
            raise FileNotFoundError(f"{MESH_MODEL}: MediaPipe model missing (package data not installed?)")
        from ai_edge_litert.interpreter import Interpreter

        with _quiet_stderr():
            self.net = Interpreter(model_path=str(MESH_MODEL), num_threads=threads)
            self.net.allocate_tensors()
        self.input = self.net.get_input_details()[0]["index"]
        # 1404 landmark coordinates, then the face-presence logit
        self.outputs = [o["index"] for o in sorted(self.net.get_output_details(), key=lambda o: -np.prod(o["shape"]))]

    def __call__(self, rgb: np.ndarray, roi: tuple[float, float, float, float]) -> tuple[np.ndarray, float]:
        """(468x2 landmarks in frame px, face presence in [0, 1])."""
        cx, cy, side, angle = roi
        s = MESH_SIZE / max(side, 1.0)
        c, si = math.cos(angle) * s, math.sin(angle) * s
        mid = (MESH_SIZE - 1) / 2
        M = np.array([[c, si, mid - c * cx - si * cy], [-si, c, mid + si * cx - c * cy]])
        raw, logit = self.infer(_warp(rgb, M, MESH_SIZE, cv2.BORDER_REPLICATE))
        pts = raw.reshape(-1, 3)[:, :2] - 0.5  # crop px, pixel centres at integers
        presence = 1.0 / (1.0 + math.exp(-float(np.clip(logit, -50, 50))))
        return cv2.transform(pts[None], invert_matrix(M))[0], presence

    def infer(self, crop: np.ndarray) -> tuple[np.ndarray, float]:
        """The model on a 192 x 192 RGB uint8 crop: (1404 landmark coordinates x, y, z in crop px, the face logit)."""
        self.net.set_tensor(self.input, crop[None].astype(np.float32) * np.float32(1 / 255.0))
        self.net.invoke()
        raw, logit = (self.net.get_tensor(i) for i in self.outputs)
        return raw.ravel(), float(logit.ravel()[0])


def roi_from_keypoints(kps: np.ndarray, extent: float, centre: np.ndarray) -> tuple[float, float, float, float]:
    ux, _, _ = eye_frame(kps)
    return float(centre[0]), float(centre[1]), extent * ROI_SCALE, math.atan2(ux[1], ux[0])


def roi_from_landmarks(landmarks: np.ndarray, kps: np.ndarray) -> tuple[float, float, float, float]:
    """The next frame's ROI: the landmarks' box in the eye frame, its longer side times ROI_SCALE."""
    ux, uy, _ = eye_frame(kps)
    R = np.stack([ux, uy])
    p = landmarks @ R.T
    lo, hi = p.min(0), p.max(0)
    return roi_from_keypoints(kps, float(max(hi - lo)), ((lo + hi) / 2) @ R)


def roi_from_face(face: Face) -> tuple[float, float, float, float]:
    x, y, w, h = face.box
    kps = np.array([face.keypoints[k] for k in ALIGN_KEYPOINTS])
    return roi_from_keypoints(kps, max(w, h), np.array([x + w / 2, y + h / 2]))


class OneEuro:
    """The One Euro filter: a low-pass whose cutoff rises with speed (little jitter when still, little lag when
    moving). `min_cutoff` in Hz; `beta` per (scale unit per second); `d_cutoff` in Hz for the speed estimate."""

    def __init__(self, min_cutoff: float = 1.0, beta: float = 0.0, d_cutoff: float = 1.0):
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.reset()

    def reset(self) -> None:
        self.x = self.dx = self.t = None

    @staticmethod
    def _alpha(dt: float, cutoff: np.ndarray | float) -> np.ndarray | float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.x is None or t <= self.t:
            self.x, self.dx, self.t = x, np.zeros_like(x), t
            return x
        dt, self.t = t - self.t, t
        self.dx = self.dx + self._alpha(dt, self.d_cutoff) * ((x - self.x) / dt - self.dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self.dx) / max(scale, 1e-9)
        self.x = self.x + self._alpha(dt, cutoff) * (x - self.x)
        return self.x


@dataclass
class TrackStep:
    face: Face | None  # the tracked face (smoothed alignment keypoints), None: no face in this frame
    detected: bool  # the detector ran on this frame
    raw: np.ndarray | None = None  # the unsmoothed 4x2 alignment keypoints
    ms: dict[str, float] = field(default_factory=dict)  # detect, track


class FaceTracker:
    """Detect, then track one face from frame to frame. `min_presence`: the mesh's face score below which the
    track is lost (the detector then runs on the same frame); `min_cutoff` (Hz) and `beta` (per eye distance per
    second): the One Euro filter on the alignment keypoints (`beta` 0 and a large `min_cutoff`: no smoothing)."""

    REDO = 0.08  # the ROI moved by more than this share of its side: run the mesh again on the new ROI

    def __init__(self, detector: str = "short", min_score: float = 0.5, min_presence: float = 0.5,
                 min_cutoff: float = 0.5, beta: float = 30.0, d_cutoff: float = 20.0):
        self.detector = FaceDetector(detector, min_score, refine=False)  # the mesh refines: one detector pass
        self.mesh = FaceMesh()
        self.min_presence = min_presence
        self.filter = OneEuro(min_cutoff, beta, d_cutoff)
        self.roi: tuple[float, float, float, float] | None = None
        self.last: TrackStep | None = None  # the latest update's step

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.detector.close()

    def reset(self) -> None:
        self.roi = None
        self.filter.reset()

    def _mesh(self, rgb: np.ndarray, roi) -> tuple[np.ndarray, np.ndarray, float]:
        lm, presence = self.mesh(rgb, roi)
        return lm, mesh_keypoints(lm), presence

    def update(self, rgb: np.ndarray, t: float) -> TrackStep:
        """The face in this frame (at `t` seconds). A frame the tracker cannot read (not an RGB uint8 image)
        loses the track and has no face."""
        self.last = self._update(rgb, t)
        return self.last

    def _update(self, rgb: np.ndarray, t: float) -> TrackStep:
        ms = {"detect": 0.0, "track": 0.0}
        try:
            rgb = _as_rgb(rgb)
        except ValueError:
            self.reset()
            return TrackStep(None, False, ms=ms)
        found = None
        if self.roi is not None:
            t0 = time.perf_counter()
            lm, kps, presence = self._mesh(rgb, self.roi)
            ms["track"] = (time.perf_counter() - t0) * 1e3
            if presence >= self.min_presence:
                found = lm, kps, presence
        detected = found is None
        if detected:  # the first frame, or the track was lost: find the face again, in this frame
            self.reset()
            t0 = time.perf_counter()
            faces = self.detector.detect(rgb)
            ms["detect"] = (time.perf_counter() - t0) * 1e3
            if faces:
                t0 = time.perf_counter()
                lm, kps, presence = self._mesh(rgb, roi_from_face(faces[0]))
                ms["track"] += (time.perf_counter() - t0) * 1e3
                if presence >= self.min_presence:
                    found = lm, kps, presence
        if found is None:
            return TrackStep(None, detected, ms=ms)
        lm, kps, presence = found
        t0 = time.perf_counter()
        roi = roi_from_landmarks(lm, kps)
        if not detected and self.REDO * roi[2] < math.dist(roi[:2], self.roi[:2]):  # a fast move: the face was off
            lm2, kps2, presence2 = self._mesh(rgb, roi)  # the ROI's centre; once more where it is now
            if presence2 >= self.min_presence:
                lm, kps, presence, roi = lm2, kps2, presence2, roi_from_landmarks(lm2, kps2)
        self.roi = roi
        smooth = self.filter(kps, t, scale=eye_frame(kps)[2])
        lo, hi = lm.min(0), lm.max(0)
        face = Face(presence, (float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])),
                    {k: (float(x), float(y)) for k, (x, y) in zip(ALIGN_KEYPOINTS, smooth)})
        ms["track"] += (time.perf_counter() - t0) * 1e3
        return TrackStep(face, detected, kps, ms)
