"""A synthetic video clip with a known face path, and the tracking figures measured on it.

`SyntheticClip(photo)`: a sample portrait moved over a 1280 x 720 frame along a known path at 30 fps: a still
stretch (camera noise only), then translation, zoom and a small rotation, a few frames with the face out of view,
the face back (a jump) and drifting.  Every frame gets fresh camera noise, so a still stretch is still only for the
face.  `track_figures` compares tracked keypoints with the photo's keypoints carried along the path: landmark error
(eye distances), jitter on the still stretch (px), frames lost and how soon a face coming back is found again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

FRAME_SIZE = (1280, 720)
FPS = 30.0
# frames of each stretch: still (camera noise only); moving (translation +-220 px, zoom 0.75-1.25, rotation +-8
# degrees); out of view; back in the middle (a jump), drifting left at 60 px/s
SEGMENTS = {"still": 30, "moving": 60, "out": 8, "back": 52}
BACKGROUND = (100, 104, 108)
NOISE_PAD = 64


class SyntheticClip:
    """`photo` (RGB uint8) along the known path; `len(clip)` frames, `clip.frame(i)`, `clip.path(i)` (2x3 photo px
    -> frame px, None when out of view), `clip.t(i)` in seconds. `noise`: the camera noise's sigma (levels);
    `segments`: the frames of each stretch (SEGMENTS' keys)."""

    def __init__(self, photo: np.ndarray, noise: float = 2.0, seed: int = 0, segments: dict[str, int] | None = None):
        self.photo, self.seed = photo, seed
        # one field of camera noise, a window of it at a random offset per frame (fresh noise in every pixel)
        shape = (FRAME_SIZE[1] + NOISE_PAD, FRAME_SIZE[0] + NOISE_PAD, 3)
        self.noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(noise) \
            if noise > 0 else None
        n = {**SEGMENTS, **(segments or {})}
        ends = np.cumsum([n[k] for k in SEGMENTS])
        self.still, self.moving, self.out, self.back = (range(int(a), int(b)) for a, b in zip([0, *ends[:-1]], ends))

    def __len__(self) -> int:
        return self.back.stop

    def t(self, i: int) -> float:
        return i / FPS

    def pose(self, i: int) -> tuple[float, float, float, float] | None:
        """(centre x, centre y, scale, angle in degrees) of the photo in frame i; None: out of view."""
        cx, cy = FRAME_SIZE[0] / 2, FRAME_SIZE[1] / 2
        if i in self.out:
            return None
        if i in self.moving:
            u = 2 * math.pi * (i - self.moving.start) / len(self.moving)
            return cx + 220 * math.sin(u), cy + 50 * math.sin(2 * u), 1 + 0.25 * math.sin(u), 8 * math.sin(u)
        if i in self.back:
            return cx - 2.0 * (i - self.back.start), cy, 1.0, 0.0
        return cx, cy, 1.0, 0.0

    def path(self, i: int) -> np.ndarray | None:
        pose = self.pose(i)
        if pose is None:
            return None
        cx, cy, s, deg = pose
        h, w = self.photo.shape[:2]
        M = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), deg, s)
        M[:, 2] += np.array([cx - (w - 1) / 2, cy - (h - 1) / 2])
        return M

    def frame(self, i: int) -> np.ndarray:
        M = self.path(i)
        if M is None:
            frame = np.empty((FRAME_SIZE[1], FRAME_SIZE[0], 3), np.uint8)
            frame[:] = BACKGROUND
        else:
            frame = cv2.warpAffine(self.photo, M, FRAME_SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=BACKGROUND)
        if self.noise is not None:
            dy, dx = np.random.default_rng((self.seed, i)).integers(0, NOISE_PAD, 2)
            window = self.noise[dy : dy + frame.shape[0], dx : dx + frame.shape[1]]
            frame = cv2.add(frame, window, dtype=cv2.CV_8U)  # rounded, saturated
        return frame

    def truth(self, keypoints: np.ndarray, i: int) -> np.ndarray | None:
        """The photo's Nx2 `keypoints` where the path puts them in frame i (None: out of view)."""
        M = self.path(i)
        return None if M is None else cv2.transform(np.asarray(keypoints, np.float64)[None], M)[0]


def _rms_step(points: Sequence[np.ndarray]) -> float:
    steps = [np.linalg.norm(b - a, axis=1) for a, b in zip(points, points[1:])]
    return float(np.sqrt(np.mean(np.square(steps)))) if steps else 0.0


def track_figures(clip: SyntheticClip, truth_kps: np.ndarray, tracked: Sequence[np.ndarray | None],
                  raw: Sequence[np.ndarray | None] | None = None) -> dict[str, Any]:
    """The tracking figures of Nx2 keypoints per frame (`tracked`, None: no face) against `truth_kps` (the photo's
    keypoints) carried along the clip's path.

    `landmark_error_iod_*`: mean distance of the keypoints from the truth, in the truth's eye distances (mean,
    95th percentile, max over the frames with a face in view and found); `jitter_px`: RMS frame-to-frame motion of
    the keypoints over the still stretch (the face does not move; `jitter_px_raw` of `raw`, the unsmoothed ones);
    `frames_lost`: frames with the face in view and not found; `false_faces`: frames out of view with a face;
    `refound_after_frames`: for each return of the face into view, the frames until it was found (0: at once)."""
    errors, lost, false_faces = [], 0, 0
    for i, kps in enumerate(tracked):
        truth = clip.truth(truth_kps, i)
        if truth is None or kps is None:
            false_faces += truth is None and kps is not None
            lost += truth is not None and kps is None
            continue
        iod = float(np.hypot(*(truth[1] - truth[0])))
        errors.append(float(np.linalg.norm(kps - truth, axis=1).mean()) / iod)
    back = [i for i in range(1, len(tracked)) if clip.path(i) is not None and clip.path(i - 1) is None]
    refound = [next((j - i for j in range(i, len(tracked)) if tracked[j] is not None), None) for i in back]
    still = [tracked[i] for i in clip.still if i < len(tracked)]
    out: dict[str, Any] = {
        "frames": len(tracked),
        "landmark_error_iod_mean": round(float(np.mean(errors)), 4) if errors else None,
        "landmark_error_iod_p95": round(float(np.percentile(errors, 95)), 4) if errors else None,
        "landmark_error_iod_max": round(float(np.max(errors)), 4) if errors else None,
        "jitter_px": round(_rms_step(still), 3) if all(s is not None for s in still) else None,
        "frames_lost": lost, "false_faces": false_faces, "refound_after_frames": refound,
    }
    if raw is not None:
        still_raw = [raw[i] for i in clip.still if i < len(raw)]
        out["jitter_px_raw"] = round(_rms_step(still_raw), 3) if all(s is not None for s in still_raw) else None
    return out
