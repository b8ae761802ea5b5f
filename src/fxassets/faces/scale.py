"""The face at a fixed scale for the teacher: targets that do not depend on the photo's pixel size.

A teacher's look depends on how many pixels the face spans (the classical filters' radii are in pixels; a
diffusion model or an API sees a 4000 px phone photo and a 512 px crop differently).  Before the teacher runs, each
photo is resized so that its (largest) face's eye distance is `faces.teacher_eye_distance` pixels (the sample
portraits at 512 px have 67-87, median 76.5); the teacher's output is resized back to the photo's size, so that
`face_pairs` aligns both sides with the source's transform as before.  A photo without a detected face goes to
the teacher as it is (`face_pairs` rejects it anyway).  Only teachers that work at the photo's own pixel size are
rescaled (`Teacher.face_scaled`: the classical filters); diffusion and API teachers resize every photo to their
working resolution already, and latent-edit draws both sides itself.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from fxassets.faces.detect import FaceDetector

MAX_SIDE = 4096  # a rescaled photo is never larger than this (a tiny face in a large photo)


def teacher_view(teacher: Any, faces: Any) -> tuple[float, str]:
    """(the eye distance the teacher sees, 0 when not rescaled; the key its outputs depend on beyond the teacher's
    fingerprint): `faces` is the FacesConfig (None: no rescaling)."""
    fp = teacher.fingerprint()["hash"]
    eye_px = float(getattr(faces, "teacher_eye_distance", 0) or 0) if getattr(teacher, "face_scaled", True) else 0.0
    return eye_px, (fp if not eye_px else f"{fp}:eye{eye_px:g}:{faces.detector}:{faces.min_score:g}")


def eye_distance(face: Any) -> float:
    (lx, ly), (rx, ry) = face.keypoints["left_eye"], face.keypoints["right_eye"]
    return float(np.hypot(lx - rx, ly - ry))


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    shrink = width * height < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


class FaceScaler:
    """Resizes photos so their face has `eye_px` between the eyes; `eye_px` 0 turns it off (the photo as is)."""

    def __init__(self, eye_px: float, detector: str = "short", min_score: float = 0.5):
        self.eye_px = float(eye_px)
        self._det = FaceDetector(detector, min_score) if self.eye_px > 0 else None

    def __enter__(self) -> FaceScaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._det is not None:
            self._det.close()

    def scale(self, rgb: np.ndarray) -> float:
        """The factor that brings the photo's largest face to `eye_px` (1.0: off, or no face found)."""
        if self._det is None:
            return 1.0
        faces = self._det.detect(rgb)
        if not faces:
            return 1.0
        d = eye_distance(max(faces, key=lambda f: f.area))
        if d <= 0:
            return 1.0
        s = self.eye_px / d
        h, w = rgb.shape[:2]
        return min(s, MAX_SIDE / max(h, w))

    def edit(self, teacher: Any, images: list[np.ndarray], records: list[dict[str, Any]]) -> tuple[list[Any], list[float]]:
        """`teacher.edit_batch` on the rescaled photos, each output resized back to its photo's size.  Returns
        (outputs, scales); an output that is not an image (a refusal) is passed through."""
        if self._det is None or not getattr(teacher, "face_scaled", True):
            return teacher.edit_batch(images, records), [1.0] * len(images)
        scales = [self.scale(im) for im in images]
        views = []
        for im, s in zip(images, scales):
            h, w = im.shape[:2]
            size = (max(1, round(w * s)), max(1, round(h * s)))
            views.append(im if size == (w, h) else _resize(im, *size))
        outs = teacher.edit_batch(views, records)
        back = []
        for im, view, out in zip(images, views, outs, strict=True):
            if isinstance(out, np.ndarray) and view is not im and out.shape == view.shape:
                out = _resize(out, im.shape[1], im.shape[0])
            back.append(out)
        return back, [round(s, 4) for s in scales]
