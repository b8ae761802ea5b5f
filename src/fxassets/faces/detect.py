"""Face detection (MediaPipe BlazeFace) on the vendored models, and picking the face(s) to use.

Keypoint names follow the *image* sides of an upright, unmirrored photo: ``left_eye`` is the eye on the image's
left, i.e. the person's right eye (MediaPipe's ``RIGHT_EYE``, point 0 of the sample ``.tem`` files). The same holds
for ``left_ear``. All coordinates are image pixels with pixel centres at integers (OpenCV's convention).

Pipeline: ``FaceDetector.detect`` -> ``select_face`` -> ``align_matrix`` -> ``warp_aligned`` (the crop); at run
time the student's output goes back with ``composite(frame, out, M)``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fxassets.faces.align import _warp, invert_matrix

MODEL_DIR = Path(__file__).parents[1] / "models" / "mediapipe"
# kind -> (model file, the model's square input size)
MODELS = {"short": ("face_detection_short_range.tflite", 128), "full": ("face_detection_full_range_sparse.tflite", 192)}
KEYPOINTS = ("left_eye", "right_eye", "nose_tip", "mouth", "left_ear", "right_ear")  # MediaPipe's order

# BlazeFace's eye points sit below and outside the pupils. This shift (in the eye frame: x along left->right eye,
# y perpendicular, pointing down the face; units of the eye distance) moves them onto the pupils. Measured on the
# 102 sample portraits against their hand-placed pupils, after the refinement pass (see FaceDetector).
EYE_TO_PUPIL = {
    "short": ((0.018, -0.025), (-0.018, -0.030)),
    "full": ((0.017, -0.043), (-0.015, -0.041)),
}
REFINE_CONTEXT = 2.4  # refinement crop side / face box side: the framing of the sample portraits




@dataclass(frozen=True)
class Face:
    score: float
    box: tuple[float, float, float, float]  # x, y, w, h in image pixels
    keypoints: dict[str, tuple[float, float]]  # KEYPOINTS -> (x, y) in image pixels

    @property
    def area(self) -> float:
        return self.box[2] * self.box[3]

    def to_json(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 4),
            "box": [round(v, 2) for v in self.box],
            "keypoints": {k: [round(x, 2), round(y, 2)] for k, (x, y) in self.keypoints.items()},
        }


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (MediaPipe/LiteRT print dozens of INFO/WARNING lines when a model loads)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    return np.ascontiguousarray(image)


class FaceDetector:
    """MediaPipe BlazeFace on the vendored models; a context manager (closes the detector on exit).

    ``kind`` "short" (faces within ~2 m, the default) or "full" (full range, sparse; smaller faces). With
    ``refine`` (default) each face is detected a second time in an anti-aliased crop framed like the sample
    portraits: keypoints as good for small faces as for large ones, and better overall (median pupil error 0.028
    instead of 0.038 eye distances on the samples), for about twice the time. Not thread-safe.
    """

    def __init__(self, kind: str = "short", min_score: float = 0.5, refine: bool = True):
        if kind not in MODELS:
            raise ValueError(f"detector kind must be one of {sorted(MODELS)}, got {kind!r}")
        import mediapipe as mp  # slow import (~1 s): only when detecting
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp_image, self._srgb = mp.Image, mp.ImageFormat.SRGB
        model, self.input_size = MODELS[kind]
        if not (MODEL_DIR / model).is_file():
            raise FileNotFoundError(f"{MODEL_DIR / model}: MediaPipe model missing (package data not installed?)")
        self.kind, self.min_score, self.refine = kind, min_score, refine
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(MODEL_DIR / model)), min_detection_confidence=min_score
        )
        with _quiet_stderr():
            self._detector = vision.FaceDetector.create_from_options(options)
            self._raw(np.zeros((self.input_size, self.input_size, 3), np.uint8))  # its first call logs too

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the MediaPipe detector (unclosed ones print a TypeError at interpreter exit)."""
        if self._detector is not None:
            with _quiet_stderr():
                self._detector.close()
            self._detector = None

    def _raw(self, rgb: np.ndarray) -> list[tuple[float, tuple[float, float, float, float], np.ndarray]]:
        """(score, box, 6x2 keypoints) per detection, in pixels of `rgb`."""
        if self._detector is None:
            raise RuntimeError("FaceDetector is closed")
        h, w = rgb.shape[:2]
        out = []
        for d in self._detector.detect(self._mp_image(image_format=self._srgb, data=rgb)).detections:
            b = d.bounding_box
            box = (float(b.origin_x), float(b.origin_y), float(b.width), float(b.height))
            kps = np.array([[k.x * w - 0.5, k.y * h - 0.5] for k in d.keypoints], np.float64)  # normalized -> px
            out.append((float(d.categories[0].score), box, kps))
        return out

    def _refined(self, rgb: np.ndarray, box: tuple[float, float, float, float], kps: np.ndarray) -> np.ndarray:
        """Detect again in a square crop around `box`, framed like the samples; keypoints in `rgb` px."""
        n = self.input_size
        x, y, w, h = box
        s = n / max(max(w, h) * REFINE_CONTEXT, 1.0)
        M = np.array([[s, 0, (n - 1) / 2 - s * (x + w / 2 - 0.5)], [0, s, (n - 1) / 2 - s * (y + h / 2 - 0.5)]])
        found = self._raw(_warp(rgb, M, n, cv2.BORDER_CONSTANT))
        offsets = [np.hypot(bx + bw / 2 - n / 2, by + bh / 2 - n / 2) for _, (bx, by, bw, bh), _ in found]
        if not found or min(offsets) > n / 4:  # lost it, or only a neighbour: keep the first pass
            return kps
        return cv2.transform(found[int(np.argmin(offsets))][2][None], invert_matrix(M))[0]

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 image (grayscale and RGBA accepted), largest box first."""
        rgb = _as_rgb(rgb)
        faces = []
        for score, box, kps in self._raw(rgb):
            if self.refine:
                kps = self._refined(rgb, box, kps)
            kps = _eyes_to_pupils(kps, EYE_TO_PUPIL[self.kind])
            faces.append(Face(score, box, {name: (float(x), float(y)) for name, (x, y) in zip(KEYPOINTS, kps)}))
        return sorted(faces, key=lambda f: f.area, reverse=True)


def _eyes_to_pupils(kps: np.ndarray, shift: tuple[tuple[float, float], tuple[float, float]]) -> np.ndarray:
    kps = kps.copy()
    axis = kps[1] - kps[0]
    down = np.array([-axis[1], axis[0]])
    for i, (dx, dy) in enumerate(shift):
        kps[i] += dx * axis + dy * down
    return kps


def select_face(faces: list[Face], rule: str) -> tuple[Face | None, str]:
    """Pick the face to use: rule "reject" refuses several faces, "largest" takes the largest box.

    Returns (face, "") or (None, reason).
    """
    if rule not in ("reject", "largest"):
        raise ValueError(f"rule must be 'reject' or 'largest', got {rule!r}")
    if not faces:
        return None, "no face found"
    if len(faces) > 1 and rule == "reject":
        return None, f"{len(faces)} faces found"
    return max(faces, key=lambda f: f.area), ""


def select_faces(faces: list[Face], rule: str) -> tuple[list[Face], str]:
    """The faces to use under `rule`: "reject" and "largest" as `select_face`, "all" every face (largest first).

    Returns (faces, "") or ([], reason).
    """
    if rule == "all":
        return (sorted(faces, key=lambda f: f.area, reverse=True), "") if faces else ([], "no face found")
    face, reason = select_face(faces, rule)
    return ([face] if face is not None else []), reason
