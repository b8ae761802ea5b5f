"""Similarity alignment to the canonical crop: the template (eyes, nose tip, mouth), the least-squares
similarity transform taking a face onto it, and the anti-aliased warp to the crop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from fxassets.faces.detect import Face

ALIGN_KEYPOINTS = ("left_eye", "right_eye", "nose_tip", "mouth")

# Canonical positions of ALIGN_KEYPOINTS in a 256 crop at margin 0.45: the mean of the sample faces (Procrustes),
# made left-right symmetric, eye distance 56 px. A crop spans (1 + 2 * margin) "face sizes" (2.4 eye distances,
# about the detector's box), centred 0.32 eye distances below the eyes, halfway between hairline and chin. At
# margin 0.45, in 256 px: top of the head ~16, hairline ~44, chin ~212, ears ~52 and ~203 (sample means).
TEMPLATE_256 = np.array([[99.5, 110.0], [155.5, 110.0], [127.5, 140.5], [127.5, 171.4]])
DEFAULT_MARGIN = 0.45


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
