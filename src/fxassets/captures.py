"""Simulated captures: each source photo also goes to the teacher as it might come from another camera and room.

The sample set is one studio: one camera, one light, one grey background.  A user's faces are not: a warmer or
bluer white balance, brighter or darker exposure, a white or coloured background, a softer lens, sensor noise,
JPEG.  The teacher's look depends on all of these (a classical cartoon outlines a face against a white wall; a
diffusion model paints a warm photo warm), so the student can only learn its response from the teacher itself:
with ``faces.capture_variants: N`` the prompts stage adds N variant records per photo, each with an explicit,
seeded `capture` spec (`draw_capture`), and the teacher and face_pairs stages both read the photo through
`apply_capture`, so the teacher sees the variant and the pair's source is the same variant, aligned alike.

A variant is the photo's person: on the photo's side of the split (variants of held-out people are kept apart as
`heldout_capture`, never trained on, and not in the held-out figures), and never a near-duplicate of its own
photo (the gate's near-duplicate rule compares different people only).  The spec depends only on the sample id
and the variant number, so adding faces or effects never changes another variant.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import cv2
import numpy as np

from fxassets.core.images import GRAY_WEIGHTS

LUMA = np.array(GRAY_WEIGHTS)

# ranges (docs/student.md, "Simulated captures"): per-channel gains 1 +- WHITE_BALANCE (luma kept), exposure
# 2**EXPOSURE_STOPS, gamma, and the share of variants that get a new background, a blur, noise, JPEG.  Brighter
# than +0.3 stops or blurrier than 1 px clipped or softened so many faces that the pair gate rejected half of them
# (the first build: 0.45 of the faces at 1.2-1.5x passed); gamma < 1 brightens without clipping.
WHITE_BALANCE = 0.15
EXPOSURE_STOPS = (-0.6, 0.3)
GAMMA = (0.8, 1.2)
P_BACKGROUND, P_WHITE_BACKGROUND = 0.5, 0.4
P_BLUR, BLUR_SIGMA = 0.3, (0.4, 1.0)  # px at a 512 px short side (scaled with the photo)
P_NOISE, NOISE_SIGMA = 0.3, (0.005, 0.03)
P_JPEG, JPEG_QUALITY = 0.3, (35, 90)


def variant_id(sample_id: str, k: int) -> str:
    return f"{sample_id}-cap{k}"


def is_variant(sample_id: str) -> bool:
    """Whether a sample (or pair) id is a simulated capture's (`variant_id`)."""
    return re.search(r"-cap\d+$", str(sample_id)) is not None


def draw_capture(sample_id: str, k: int) -> dict[str, Any]:
    """The seeded spec of variant `k` (1, 2, ...) of a sample: plain numbers, so records and cache keys hold it."""
    rng = np.random.default_rng(zlib.crc32(f"capture:{sample_id}:{k}".encode()))
    gains = 1.0 + rng.uniform(-WHITE_BALANCE, WHITE_BALANCE, 3)
    gains /= float(LUMA @ gains)  # white balance moves colour, not brightness
    spec: dict[str, Any] = {
        "gains": [round(float(g), 4) for g in gains],
        "exposure": round(float(2.0 ** rng.uniform(*EXPOSURE_STOPS)), 4),
        "gamma": round(float(rng.uniform(*GAMMA)), 4),
    }
    draws = rng.uniform(size=5)
    if draws[0] < P_BACKGROUND:
        white = rng.uniform() < P_WHITE_BACKGROUND
        spec["background"] = [255, 255, 255] if white else [int(v) for v in rng.integers(0, 256, 3)]
    if draws[1] < P_BLUR:
        spec["blur"] = round(float(rng.uniform(*BLUR_SIGMA)), 3)
    if draws[2] < P_NOISE:
        spec["noise"] = round(float(rng.uniform(*NOISE_SIGMA)), 4)
        spec["noise_seed"] = int(rng.integers(0, 2**31))
    if draws[3] < P_JPEG:
        spec["jpeg"] = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return spec


def background_mask(img: np.ndarray, diff: int = 2) -> np.ndarray:
    """HxW float in [0, 1]: the plain backdrop of a portrait, flood-filled from the top and side edges of the photo
    (a neighbour within `diff` levels joins, so a lit backdrop's gradient is followed and a face's edge is not);
    the bottom edge, the body, is never a seed.  Found at 256 px, softened at the photo's size."""
    h, w = img.shape[:2]
    s = 256.0 / max(h, w)
    small = cv2.GaussianBlur(cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA), (0, 0), 0.7)
    sh, sw = small.shape[:2]
    mask = np.zeros((sh + 2, sw + 2), np.uint8)
    seeds = [(x, 0) for x in range(0, sw, 8)] + [(e, y) for y in range(0, sh // 2, 8) for e in (0, sw - 1)]
    for x, y in seeds:
        if not mask[y + 1, x + 1]:
            cv2.floodFill(small, mask, (x, y), 0, (diff,) * 3, (diff,) * 3, 4 | cv2.FLOODFILL_MASK_ONLY | (255 << 8))
    m = cv2.morphologyEx((mask[1:-1, 1:-1] > 0).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    m = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.GaussianBlur(m, (0, 0), max(1.0, min(h, w) / 300.0))


def apply_capture(img: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """The photo (HxWx3 uint8 RGB) as the capture `spec` makes it: background, white balance, exposure and gamma,
    blur, noise, JPEG, in that order.  No spec: the photo itself (the same array)."""
    if not spec:
        return img
    x = img.astype(np.float32) / 255.0
    if "background" in spec:
        m = background_mask(img)[..., None]
        x = x * (1.0 - m) + np.asarray(spec["background"], np.float32) / 255.0 * m
    x = np.clip(x * np.asarray(spec["gains"], np.float32) * float(spec["exposure"]), 0.0, 1.0) ** float(spec["gamma"])
    if "blur" in spec:
        x = cv2.GaussianBlur(x, (0, 0), float(spec["blur"]) * min(img.shape[:2]) / 512.0)
    if "noise" in spec:
        x = x + np.random.default_rng(int(spec["noise_seed"])).normal(0.0, float(spec["noise"]), x.shape).astype(np.float32)
    out = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if "jpeg" in spec:
        ok, buf = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(spec["jpeg"])])
        out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    return out
