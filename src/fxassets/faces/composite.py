"""Compositing back: the soft face mask in the aligned crop and the feathered blend of the
engine's output into the frame (the inverse of the alignment).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from fxassets.faces.align import DEFAULT_MARGIN, _scale_to_crop, invert_matrix

# The soft mask ellipse in a 256 crop at margin 0.45: centre x, y and radii x, y (the head, ear to ear, top to chin).
MASK_ELLIPSE_256 = (127.5, 128.0, 100.0, 116.0)


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


def mask_u8(mask: np.ndarray) -> np.ndarray:
    """A face mask in 8-bit fixed point (255 = 1.0), as `composite` blends with it."""
    return mask if mask.dtype == np.uint8 else np.clip(np.asarray(mask, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)


def composite(frame: np.ndarray, aligned_out: np.ndarray, M: np.ndarray, mask: np.ndarray | None = None, *,
              inplace: bool = False) -> np.ndarray:
    """Warp the aligned output back into `frame` (inverse of M) and feather-blend it; returns the frame (a new one
    unless `inplace`).

    Only the face's bounding region of the frame is touched, in uint8 fixed point: the output and the mask (8-bit,
    `mask_u8`) are warped together as one RGBA image, then `out = (face * a + frame * (255 - a)) / 255`, each term
    rounded (within 1 level of the float blend; exactly the frame where a = 0, exactly the face where a = 255).
    `mask` (float in [0, 1] or uint8) defaults to ``face_mask(size)`` (pass your own for a non-default margin).
    """
    size = aligned_out.shape[0]
    alpha = mask_u8(_default_mask(size) if mask is None else mask)
    out = frame if inplace else frame.copy()
    on = alpha > 0
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
    rgba = cv2.merge([*cv2.split(aligned_out), alpha]) if aligned_out.ndim == 3 else cv2.merge([aligned_out, alpha])
    h, w = int(y1 - y0), int(x1 - x0)
    warped = cv2.warpAffine(rgba, M_roi, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)  # the mask is 0 at the crop's edge
    a8 = cv2.extractChannel(warped, warped.shape[2] - 1)
    if out.ndim == 3:
        face, a8 = cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB), cv2.cvtColor(a8, cv2.COLOR_GRAY2RGB)
    else:
        face = cv2.extractChannel(warped, 0)
    # as H x (W * channels) single-channel images: OpenCV's 8-bit arithmetic is several times faster on those
    roi = out[y0:y1, x0:x1].reshape(h, -1)  # a view into `out`: the blend is written in place
    f, a = face.reshape(h, -1), a8.reshape(h, -1)
    cv2.add(cv2.multiply(f, a, scale=1 / 255), cv2.multiply(roi, cv2.bitwise_not(a), scale=1 / 255), dst=roi)
    return out
