"""Face detection (MediaPipe BlazeFace), similarity alignment to a canonical crop, and compositing back.

Keypoint names follow the *image* sides of an upright, unmirrored photo: ``left_eye`` is the eye on the image's
left, i.e. the person's right eye (MediaPipe's ``RIGHT_EYE``, point 0 of the sample ``.tem`` files). The same holds
for ``left_ear``. All coordinates are image pixels with pixel centres at integers (OpenCV's convention).

Pipeline: ``FaceDetector.detect`` -> ``select_face`` -> ``align_matrix`` -> ``warp_aligned`` (the crop); at run
time the student's output goes back with ``composite(frame, out, M)``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

MODEL_DIR = Path(__file__).parent / "models" / "mediapipe"
# kind -> (model file, the model's square input size)
MODELS = {"short": ("face_detection_short_range.tflite", 128), "full": ("face_detection_full_range_sparse.tflite", 192)}
KEYPOINTS = ("left_eye", "right_eye", "nose_tip", "mouth", "left_ear", "right_ear")  # MediaPipe's order
ALIGN_KEYPOINTS = ("left_eye", "right_eye", "nose_tip", "mouth")

# BlazeFace's eye points sit below and outside the pupils. This shift (in the eye frame: x along left->right eye,
# y perpendicular, pointing down the face; units of the eye distance) moves them onto the pupils. Measured on the
# 102 sample portraits against their hand-placed pupils, after the refinement pass (see FaceDetector).
EYE_TO_PUPIL = {
    "short": ((0.018, -0.025), (-0.018, -0.030)),
    "full": ((0.017, -0.043), (-0.015, -0.041)),
}
REFINE_CONTEXT = 2.4  # refinement crop side / face box side: the framing of the sample portraits

# Canonical positions of ALIGN_KEYPOINTS in a 256 crop at margin 0.45: the mean of the sample faces (Procrustes),
# made left-right symmetric, eye distance 56 px. A crop spans (1 + 2 * margin) "face sizes" (2.4 eye distances,
# about the detector's box), centred 0.32 eye distances below the eyes, halfway between hairline and chin. At
# margin 0.45, in 256 px: top of the head ~16, hairline ~44, chin ~212, ears ~52 and ~203 (sample means).
TEMPLATE_256 = np.array([[99.5, 110.0], [155.5, 110.0], [127.5, 140.5], [127.5, 171.4]])
DEFAULT_MARGIN = 0.45
# The soft mask ellipse in a 256 crop at margin 0.45: centre x, y and radii x, y (the head, ear to ear, top to chin).
MASK_ELLIPSE_256 = (127.5, 128.0, 100.0, 116.0)


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


def template(size: int = 256, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """ALIGN_KEYPOINTS' canonical positions in a `size` crop with `margin` (4x2, pixel centres at integers)."""
    return _scale_to_crop(TEMPLATE_256, size, margin)


def _scale_to_crop(points_256: np.ndarray, size: int, margin: float) -> np.ndarray:
    zoom = (1 + 2 * DEFAULT_MARGIN) / (1 + 2 * margin)
    unit = (np.asarray(points_256, np.float64) + 0.5) / 256 - 0.5  # crop centre at 0, crop side 1
    return (unit * zoom + 0.5) * size - 0.5


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src points onto dst, as 2x3."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    zs = (src[:, 0] - src[:, 0].mean()) + 1j * (src[:, 1] - src[:, 1].mean())
    zd = (dst[:, 0] - dst[:, 0].mean()) + 1j * (dst[:, 1] - dst[:, 1].mean())
    a = np.vdot(zs, zd) / np.vdot(zs, zs).real  # sum(conj(zs) * zd) / sum(|zs|^2)
    A = np.array([[a.real, -a.imag], [a.imag, a.real]])
    return np.hstack([A, (dst.mean(0) - A @ src.mean(0))[:, None]])


def align_matrix(face: Face, size: int = 256, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """2x3 float64 similarity taking image pixels to the aligned `size` crop (eyes, nose tip, mouth on template)."""
    src = np.array([face.keypoints[k] for k in ALIGN_KEYPOINTS])
    return similarity(src, template(size, margin))


def invert_matrix(M: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(M, np.float64))


def _warp(rgb: np.ndarray, M: np.ndarray, size: int, border: int) -> np.ndarray:
    """cv2.warpAffine to size x size. To shrink by k >= 2, the part of the image the crop sees is first
    block-averaged by k (INTER_AREA by an integer factor, OpenCV's fast path): no aliasing."""
    M = np.asarray(M, np.float64)
    k = int(round(1 / np.sqrt(abs(np.linalg.det(M[:, :2])))))
    if k >= 2:
        H, W = rgb.shape[:2]
        corners = np.array([[[-1, -1], [size, -1], [-1, size], [size, size]]], np.float64)
        seen = cv2.transform(corners, invert_matrix(M))[0]
        x0, y0 = np.clip(np.floor(seen.min(0)).astype(int) - k, 0, [W, H])
        x1, y1 = np.clip(np.ceil(seen.max(0)).astype(int) + k, 0, [W, H])
        w, h = (x1 - x0) // k, (y1 - y0) // k
        if w > 0 and h > 0:
            rgb = cv2.resize(rgb[y0 : y0 + h * k, x0 : x0 + w * k], (w, h), interpolation=cv2.INTER_AREA)
            # a small-image pixel X is the block centred at image pixel k * X + x0 + (k - 1) / 2
            M = M @ np.array([[k, 0, x0 + (k - 1) / 2], [0, k, y0 + (k - 1) / 2], [0, 0, 1]])
    return cv2.warpAffine(rgb, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=border)


def warp_aligned(rgb: np.ndarray, M: np.ndarray, size: int) -> np.ndarray:
    """The aligned `size` x `size` crop (bilinear, anti-aliased when shrinking; the border reflects)."""
    return _warp(rgb, M, size, cv2.BORDER_REFLECT)


def face_mask(size: int, feather: float = 0.15, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Soft face ellipse in the aligned crop (float32, 1 inside, 0 outside); `feather`: width of the soft edge
    as a fraction of the ellipse radius. The ellipse is kept inside the crop so the crop edges never show."""
    cx, cy = _scale_to_crop(np.array(MASK_ELLIPSE_256[:2]), size, margin)
    zoom = (1 + 2 * DEFAULT_MARGIN) / (1 + 2 * margin) * size / 256
    rx = min(MASK_ELLIPSE_256[2] * zoom, cx + 0.5, size - 0.5 - cx)
    ry = min(MASK_ELLIPSE_256[3] * zoom, cy + 0.5, size - 0.5 - cy)
    y, x = np.ogrid[:size, :size]
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    t = np.clip((1 - r) / max(feather, 1e-6), 0, 1)
    return (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep


_default_mask = functools.lru_cache(maxsize=8)(face_mask)


def composite(frame: np.ndarray, aligned_out: np.ndarray, M: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Warp the aligned output back into `frame` (inverse of M) and feather-blend it; returns a new frame.

    Only the face's bounding region of the frame is touched. `mask` defaults to ``face_mask(size)`` (pass your
    own for a non-default margin).
    """
    size = aligned_out.shape[0]
    if mask is None:
        mask = _default_mask(size)
    out = frame.copy()
    on = mask > 0
    xs, ys = np.flatnonzero(on.any(0)), np.flatnonzero(on.any(1))
    if len(xs) == 0:
        return out
    a, b, c, d = xs[0] - 1, xs[-1] + 1, ys[0] - 1, ys[-1] + 1  # the mask's box in the crop, 1 px of slack
    corners = cv2.transform(np.array([[[a, c], [b, c], [a, d], [b, d]]], np.float64), invert_matrix(M))[0]
    H, W = frame.shape[:2]
    x0, y0 = np.clip(np.floor(corners.min(0)).astype(int), 0, [W, H])
    x1, y1 = np.clip(np.ceil(corners.max(0)).astype(int) + 1, 0, [W, H])
    if x1 <= x0 or y1 <= y0:
        return out
    # frame ROI px -> crop px; WARP_INVERSE_MAP samples the crop at M(x + x0, y + y0)
    M_roi = np.asarray(M, np.float64).copy()
    M_roi[:, 2] += M_roi[:, :2] @ np.array([x0, y0], np.float64)
    roi_size = (int(x1 - x0), int(y1 - y0))
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    face = cv2.warpAffine(aligned_out, M_roi, roi_size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask.astype(np.float32), M_roi, roi_size, flags=flags, borderMode=cv2.BORDER_CONSTANT)
    roi = out[y0:y1, x0:x1]
    if roi.ndim == 3:
        alpha = alpha[:, :, None]
    blended = roi + alpha * (face.astype(np.float32) - roi)
    out[y0:y1, x0:x1] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return out
