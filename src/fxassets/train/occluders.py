"""Synthetic occluders for the augmentation: glasses, sunglasses and a hand, drawn with OpenCV as an RGBA layer
placed from the alignment template's eye / nose / mouth positions (`fxassets.faces.align`). All randomness comes
from the `torch.Generator` passed in."""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from fxassets.faces import align as faces
from collections.abc import Sequence
from fxassets.core.config import OCCLUDERS

_N_DRAWS = 64  # uniforms one occluder drawing may use


def draw_occluder(kind: str, size: int, gen: torch.Generator, margin: float = faces.DEFAULT_MARGIN) -> torch.Tensor:
    """One random occluder as a float32 4 x size x size RGBA layer (straight alpha, values in [0, 1]) for a
    `size` aligned crop with `margin`: "glasses" (thin frame, clear lenses), "sunglasses" (dark, mostly opaque
    lenses) around the template's eyes, or "hand" (a skin-toned palm with fingers over the lower face, coming in
    from below or from one side). Position, size, shape and colours jitter; all randomness comes from `gen`."""
    patch, (y0, x0) = _occluder_patch(kind, size, gen, margin)
    layer = torch.zeros(4, size, size)
    layer[:, y0 : y0 + patch.shape[1], x0 : x0 + patch.shape[2]] = patch
    return layer


def _occluder_patch(kind: str, size: int, gen: torch.Generator, margin: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """The occluder's bounding box only (4 x h x w RGBA) and its top-left corner (y, x) in the crop: what
    augment_pairs pastes (shading and compositing a box, not the whole crop, keeps a pair under a millisecond)."""
    if kind not in OCCLUDERS:
        raise ValueError(f"unknown occluder {kind!r}; expected one of {', '.join(OCCLUDERS)}")
    draws = _Draws(gen)
    points = faces.template(size, margin)
    rgb, alpha, box = _hand(points, size, draws) if kind == "hand" else _glasses(points, size, draws, kind == "sunglasses")
    patch = np.concatenate([rgb, alpha[..., None]], axis=2).transpose(2, 0, 1)
    return torch.from_numpy(np.clip(patch, 0, 1).astype(np.float32)), (box.y0, box.x0)


class _Draws:
    """Uniforms from `gen`, drawn as one block (a fixed number per occluder), handed out one by one."""

    def __init__(self, gen: torch.Generator, count: int = _N_DRAWS):
        self._u = torch.rand(count, generator=gen, dtype=torch.float64, device=gen.device).tolist()
        self._i = 0

    def __call__(self, lo: float = 0.0, hi: float = 1.0) -> float:
        value = self._u[self._i]
        self._i += 1
        return lo + (hi - lo) * value

    def pick(self, options: Sequence):
        return options[min(int(self() * len(options)), len(options) - 1)]


_SHIFT = 4  # cv2 drawing with 4 fractional bits
_AA = cv2.LINE_AA


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, np.float64) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _point(p: np.ndarray) -> tuple[int, int]:
    q = _fixed(p)[0, 0]
    return int(q[0]), int(q[1])


def _edge_sigma(size: int) -> float:
    return 0.6 * size / 256  # the soft edge (~0.6 px at 256)


class _Box:
    """The bounding box of masks drawn on the full crop, padded for the soft edge: crops arrays to it and gives
    its pixels' coordinates."""

    def __init__(self, masks: Sequence[np.ndarray], size: int):
        x, y, w, h = cv2.boundingRect(np.maximum.reduce(list(masks)))
        pad = math.ceil(3 * _edge_sigma(size)) + 2
        self.x0, self.y0 = max(0, x - pad), max(0, y - pad)
        self.x1, self.y1 = min(size, x + w + pad), min(size, y + h + pad)
        if self.x1 <= self.x0 or self.y1 <= self.y0:  # nothing drawn
            self.x0, self.y0, self.x1, self.y1 = 0, 0, 1, 1
        self.size = size

    def __call__(self, a: np.ndarray) -> np.ndarray:
        return a[self.y0 : self.y1, self.x0 : self.x1]

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) float32 pixel coordinates of the box (crop pixels, centres at integers)."""
        yy, xx = np.mgrid[self.y0 : self.y1, self.x0 : self.x1]
        return yy.astype(np.float32), xx.astype(np.float32)

    def soft(self, mask: np.ndarray) -> np.ndarray:
        """uint8 full-crop mask -> float32 alpha of the box in [0, 1], edges slightly softened."""
        return cv2.GaussianBlur(self(mask).astype(np.float32) / 255, (0, 0), _edge_sigma(self.size))

    def flat(self, colour: Sequence[float]) -> np.ndarray:
        return np.broadcast_to(np.asarray(colour, np.float32), (self.y1 - self.y0, self.x1 - self.x0, 3))


def _over(front: tuple[np.ndarray, np.ndarray], back: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Porter-Duff 'over' of straight-alpha layers (rgb H x W x 3, alpha H x W)."""
    (cf, af), (cb, ab) = front, back
    alpha = af + ab * (1 - af)
    rgb = (cf * af[..., None] + cb * (ab * (1 - af))[..., None]) / np.maximum(alpha, 1e-6)[..., None]
    return rgb.astype(np.float32), alpha.astype(np.float32)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


_FRAME_COLOURS = (
    (0.04, 0.04, 0.05), (0.05, 0.05, 0.05), (0.22, 0.13, 0.07), (0.42, 0.25, 0.11),  # black, black, brown, tortoise
    (0.78, 0.64, 0.35), (0.72, 0.73, 0.75), (0.60, 0.08, 0.10), (0.08, 0.13, 0.40),  # gold, silver, red, navy
    (0.30, 0.30, 0.33), (0.55, 0.35, 0.55),  # grey, purple
)
_SUN_LENSES = ((0.05, 0.05, 0.06), (0.16, 0.10, 0.05), (0.06, 0.11, 0.07), (0.07, 0.09, 0.16), (0.12, 0.12, 0.12))


def _glasses(points: np.ndarray, size: int, r: _Draws, dark: bool) -> tuple[np.ndarray, np.ndarray, _Box]:
    """A frame around both eyes with a bridge and temples back to the ears; clear lenses (a faint tint and a
    reflection) or, `dark`, sunglasses' tinted, mostly opaque lenses."""
    left_eye, right_eye = points[0], points[1]
    d = float(np.linalg.norm(right_eye - left_eye))
    tilt = math.radians(r(-3, 3))
    ex = np.array([math.cos(tilt), math.sin(tilt)])  # along the eyes, towards the image's right
    ey = np.array([-math.sin(tilt), math.cos(tilt)])  # down the face
    k = r(0.92, 1.1)
    centre = (left_eye + right_eye) / 2 + d * (r(-0.03, 0.03) * ex + r(0.0, 0.08) * ey)
    sep = d * k * r(0.98, 1.05)  # lens centre to lens centre
    half_w = min(d * k * r(0.36, 0.45), sep / 2 - 0.07 * d)
    top = half_w * r(0.58, 0.8)
    bottom = top * (r(1.0, 1.3) if dark else r(0.95, 1.12))
    exponent = r(2.0, 5.0)  # superellipse: 2 = ellipse, larger = rounder rectangle
    t = max(1, round(d * r(0.025, 0.055) * (1.3 if dark else 1.0)))  # frame thickness (px)

    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    cx, sy = np.cos(theta), np.sin(theta)
    lx = half_w * np.sign(cx) * np.abs(cx) ** (2 / exponent)
    ly = np.where(sy < 0, top, bottom) * np.sign(sy) * np.abs(sy) ** (2 / exponent)
    frame = np.zeros((size, size), np.uint8)
    lens = np.zeros((size, size), np.uint8)
    inner = []
    for side in (-1, 1):  # the image's left lens, then the right one
        c = centre + side * sep / 2 * ex
        outline = _fixed(c + np.outer(side * lx, ex) + np.outer(ly, ey))
        cv2.fillPoly(lens, [outline], 255, _AA, _SHIFT)
        cv2.polylines(frame, [outline], True, 255, t, _AA, _SHIFT)
        # temple: from the lens' outer edge, a little above its middle, back to the ear
        start = c + side * half_w * 0.97 * ex - 0.45 * top * ey
        end = centre + side * d * r(1.25, 1.38) * ex + (r(-0.05, 0.1) * d - 0.45 * top) * ey
        cv2.line(frame, _point(start), _point(end), 255, max(1, round(t * r(0.9, 1.3))), _AA, _SHIFT)
        inner.append(c - side * half_w * 0.92 * ex - 0.4 * top * ey)
    # bridge: a shallow arch between the lenses' inner edges
    arch = centre - (0.45 * top + r(0.0, 0.08) * d) * ey
    cv2.polylines(frame, [_fixed(np.stack([inner[0], arch, inner[1]]))], False, 255, t, _AA, _SHIFT)

    box = _Box([frame, lens], size)
    frame_a, lens_a = box.soft(frame), box.soft(lens)
    frame_rgb = box.flat(np.clip(np.asarray(r.pick(_FRAME_COLOURS)) * r(0.8, 1.2), 0, 1))
    yy, xx = box.coords()
    if dark:
        lens_rgb = box.flat(np.asarray(r.pick(_SUN_LENSES)) * r(0.8, 1.4))
        rel_y = ((xx - centre[0]) * ey[0] + (yy - centre[1]) * ey[1]) / (top + bottom)  # ~ -0.5 top .. 0.5 bottom
        opacity = r(0.88, 0.97) * (1 - r(0.0, 0.25) * np.clip(rel_y + 0.5, 0, 1))  # gradient lens: lighter below
    else:
        tint = r(0.75, 0.95)
        lens_rgb = box.flat((tint * r(0.95, 1.0), tint * r(0.97, 1.0), tint))
        opacity = np.float32(r(0.04, 0.12))
    # a soft diagonal reflection across both lenses
    along = ((xx - centre[0]) * 0.5 + (yy - centre[1]) * 0.87) / half_w
    glare = r(0.06, 0.22) * np.exp(-(((along - r(-0.6, 0.2)) / r(0.12, 0.3)) ** 2))
    lens_layer = _over((box.flat((1.0, 1.0, 1.0)), lens_a * glare), (lens_rgb, lens_a * opacity))
    return (*_over((frame_rgb, frame_a), lens_layer), box)


_SKIN = ((0.97, 0.84, 0.74), (0.80, 0.60, 0.46), (0.36, 0.23, 0.16))  # light, medium, dark


def _hand(points: np.ndarray, size: int, r: _Draws) -> tuple[np.ndarray, np.ndarray, _Box]:
    """A palm with 3-4 fingers (and most often a thumb) over the mouth and chin, the forearm running off the
    crop: from below, or from the image's left or right; skin tone from light to dark, shaded towards the edges."""
    left_eye, right_eye, _nose, mouth = points
    d = float(np.linalg.norm(right_eye - left_eye))
    k = d * r(0.85, 1.1)  # hand scale (an adult hand: palm ~1.35, middle finger ~1.2 eye distances)
    where = r()
    if where < 0.5:  # from below, fingers up over mouth and chin
        angle = r(-25, 25)
        anchor = mouth + d * np.array([r(-0.5, 0.5), r(0.3, 0.8)])  # middle of the knuckle line
    else:  # from the image's left or right, fingers across the mouth / cheek
        side = -1 if where < 0.75 else 1
        angle = -side * (90 + r(-30, 25))
        anchor = mouth + d * np.array([side * r(0.55, 1.0), r(-0.45, 0.25)])
    a = math.radians(angle)
    up = np.array([math.sin(a), -math.cos(a)])  # the fingers' direction
    across = np.array([math.cos(a), math.sin(a)])

    n_fingers = 4 if r() < 0.7 else 3
    width = k * r(0.26, 0.31)
    length = k * r(1.0, 1.2)
    rel = (0.9, 1.0, 0.94, 0.74) if n_fingers == 4 else (0.93, 1.0, 0.9)
    order = 1 if r() < 0.5 else -1  # index finger on the left or the right
    spread = r(0.0, 5.0)
    gap = width * r(0.98, 1.1)
    palm_w = n_fingers * gap + 0.2 * width
    palm_len = k * r(1.2, 1.45)
    pieces: list[np.ndarray] = []

    def piece() -> np.ndarray:
        pieces.append(np.zeros((size, size), np.uint8))
        return pieces[-1]

    # palm (a rounded square) with the wrist and forearm running off towards the crop edge
    palm_c = anchor - up * palm_len / 2
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    ct, st = np.cos(theta), np.sin(theta)
    px = palm_w / 2 * np.sign(ct) * np.abs(ct) ** (2 / 3)
    py = palm_len / 2 * np.sign(st) * np.abs(st) ** (2 / 3)
    palm = piece()
    cv2.fillPoly(palm, [_fixed(palm_c + np.outer(px, across) + np.outer(py, up))], 255, _AA, _SHIFT)
    arm_w = palm_w * r(0.75, 0.9) / 2
    wrist = palm_c - up * palm_len * 0.3
    far = wrist - up * 3 * size
    arm = np.stack([wrist - across * arm_w, wrist + across * arm_w, far + across * arm_w * 1.2, far - across * arm_w * 1.2])
    cv2.fillPoly(palm, [_fixed(arm)], 255, _AA, _SHIFT)

    for i in range(n_fingers):
        slot = (i - (n_fingers - 1) / 2) * order
        turn = math.radians(slot * spread)
        direction = up * math.cos(turn) + across * math.sin(turn)
        base = anchor + across * slot * gap - up * 0.3 * width
        tip = base + direction * (rel[i] * length - width / 2)
        cv2.line(piece(), _point(base), _point(tip), 255, max(1, round(width)), _AA, _SHIFT)
    if r() < 0.7:  # thumb, on the index finger's side, angled outwards
        side = -order
        turn = math.radians(r(30, 60))
        direction = up * math.cos(turn) + across * side * math.sin(turn)
        base = palm_c + across * side * palm_w * 0.3 - up * palm_len * 0.15
        tip = base + direction * length * r(0.7, 0.85)
        cv2.line(piece(), _point(base), _point(tip), 255, max(1, round(width * 1.15)), _AA, _SHIFT)

    # shading: each piece darkens towards its own edge, so touching fingers leave a crease between them
    box = _Box(pieces, size)
    depth = np.zeros((box.y1 - box.y0, box.x1 - box.x0), np.float32)
    for mask in pieces:
        dist = cv2.distanceTransform((box(mask) > 127).astype(np.uint8), cv2.DIST_L2, 3)
        np.maximum(depth, dist, out=depth)
    shade = 0.6 + 0.4 * _smoothstep(depth / (0.5 * width))
    lit = r(0, 2 * math.pi)  # light from one side: +-12% per hand size
    yy, xx = box.coords()
    shade *= np.clip(1 + 0.12 * ((xx - anchor[0]) * math.cos(lit) + (yy - anchor[1]) * math.sin(lit)) / k, 0.75, 1.15)
    tone = r()  # light .. medium .. dark
    lo, hi, f = (_SKIN[0], _SKIN[1], 2 * tone) if tone < 0.5 else (_SKIN[1], _SKIN[2], 2 * tone - 1)
    skin = np.asarray(lo) + (np.asarray(hi) - np.asarray(lo)) * f
    skin = np.clip(skin * np.array([r(0.95, 1.05), r(0.95, 1.05), r(0.95, 1.05)]), 0, 1)
    # shadows redden a little: red darkens least, blue most
    rgb = skin * shade[..., None] ** np.array([0.8, 1.0, 1.2])
    return rgb.astype(np.float32), box.soft(np.maximum.reduce(pieces)), box


# ------------------------------------------------------------------------------------------------------ preview
