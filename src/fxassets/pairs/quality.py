"""Per-pair quality metrics: pure functions over the aligned source / target crops (and their keypoints).

Everything is measured in the aligned crop, whose geometry is canonical (`fxassets.faces.align.template`), so a region
such as "the cheeks" or "the face" is a fixed place. `PairMeter` runs them all for one pair:

* detection score of the teacher output and landmark drift (BlazeFace keypoints of target vs source crop, mean
  over eyes, nose tip and mouth, in units of the source's eye distance);
* identity: dlib's face-recognition ResNet (128-d descriptors; dlib's rule: distance < 0.6 = same person) on
  150 px chips cut with the *source's* 5-point landmarks from both crops, reported as distance;
* sharpness: variance of the Laplacian inside the face ellipse, and target / source ratio;
* exposure: mean luma and the share of clipped pixels (<= 2 or >= 253) inside the face ellipse;
* a 64-bit DCT perceptual hash of the source crop (near-duplicates: `near_duplicates`, a hash match that dlib
  also calls one face, `SAME_FACE`);
* skin tone: the individual typology angle (ITA) of two cheek patches of the source crop, and an *estimated*
  Monk Skin Tone bin and coarse group from it (see `monk_tone`).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np

from fxassets.faces.align import ALIGN_KEYPOINTS, TEMPLATE_256, similarity, template
from fxassets.faces.detect import Face, FaceDetector, select_face
from fxassets.faces.composite import face_mask
from fxassets.pairs.skin_tones import MONK_HEX, skin_group

# dlib's frontal detector finds the face of every aligned 256 px sample crop (margin 0.45) at exactly this box
# (left, top, right, bottom): the 5-point shape predictor starts from it instead of running a detector.
DLIB_BOX_256 = ((65.0, 79.0), (189.0, 203.0))
# Cheek patches (centre x, y; half side) in a 256 crop at margin 0.45: below the pupils, beside the nose, above
# the mouth corners: skin on nearly every face (no beard, glasses or hair there as a rule).
CHEEKS_256 = ((96.0, 142.0), (159.0, 142.0))
CHEEK_HALF_256 = 8.0
# Two source crops of different person ids are near-duplicates only when their hashes match and dlib's descriptors
# also say one person (its rule: < 0.6).  The hash alone paired different people of the one sample studio: 2 of
# 204 photos with the smiling set, 1 of 306 pairs with simulated captures (docs/quality.md).
SAME_FACE = 0.6
# Faces in the aligned crops are detected with a low threshold, so a weak face gets its score (a pencil sketch
# scores 0.3-0.9) rather than none, after padding the crop (edge pixels repeated) to CROP_PAD times its side:
# BlazeFace is less sure of a face that fills the frame (unpadded, 14 of the 102 sample sketches scored < 0.5).
CROP_MIN_SCORE = 0.2
CROP_PAD = 1.3



def to_crop(points_256: np.ndarray, size: int, margin: float) -> tuple[np.ndarray, float]:
    """Points given in a 256 crop at margin 0.45 (the constants here) -> the same places in a `size` / `margin`
    crop, and the scale factor between the two."""
    M = similarity(TEMPLATE_256, template(size, margin))
    return np.asarray(points_256, np.float64) @ M[:, :2].T + M[:, 2], float(np.sqrt(abs(np.linalg.det(M[:, :2]))))


def gray(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


@functools.lru_cache(maxsize=8)
def face_region(size: int, margin: float) -> np.ndarray:
    """Boolean mask of the face ellipse (where the soft mask is above one half) in an aligned crop."""
    return face_mask(size, margin=margin) > 0.5


def sharpness(rgb: np.ndarray, region: np.ndarray | None = None) -> float:
    """Variance of the Laplacian of the gray image (inside `region`): low = blurred."""
    lap = cv2.Laplacian(gray(rgb).astype(np.float32), cv2.CV_32F, ksize=3)
    return float(lap[region].var() if region is not None else lap.var())


def exposure(rgb: np.ndarray, region: np.ndarray | None = None) -> tuple[float, float]:
    """(mean luma in 0..1, share of clipped pixels: luma <= 2 or >= 253) inside `region`."""
    y = gray(rgb)
    y = y[region] if region is not None else y.ravel()
    return float(y.mean() / 255.0), float(((y <= 2) | (y >= 253)).mean())


def phash(rgb: np.ndarray) -> int:
    """64-bit perceptual hash: the signs of the 8x8 lowest DCT frequencies of a 32x32 gray thumbnail vs their
    median (the DC term excluded from the median). Hamming distance <= ~8 means near-duplicate images."""
    small = cv2.resize(gray(rgb), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    return int(bin(a ^ b).count("1"))


def near_duplicates(hashes: list[int | None], max_distance: int, groups: list[str] | None = None,
                    confirm: Callable[[int, int], bool] | None = None) -> list[tuple[int, int] | None]:
    """For each hash: (index of the first earlier hash within `max_distance`, distance), or None.  With `groups`
    (person ids) only hashes of different groups count: a person's several photos and simulated captures are on
    one side of the split and may look alike; the same face under two person ids may not.  With `confirm(i, j)`
    a hash match counts only when it also says yes (the nearest confirmed earlier one is taken): a 64-bit hash of
    aligned crops from one studio matches some different people too (`SAME_FACE`).

    The first of a group of near-duplicates is kept (None), every later one points at it. O(n^2) popcounts in
    numpy: fine up to tens of thousands of pairs."""
    out: list[tuple[int, int] | None] = [None] * len(hashes)
    idx = [i for i, h in enumerate(hashes) if h is not None]
    if len(idx) < 2:
        return out
    h = np.array([hashes[i] for i in idx], dtype=np.uint64)
    table = np.array([bin(v).count("1") for v in range(256)], np.uint8)
    for j in range(1, len(idx)):
        x = (h[:j] ^ h[j]).view(np.uint8).reshape(j, 8)
        d = table[x].sum(1, dtype=np.int32)
        if groups is not None:
            same = np.array([groups[i] == groups[idx[j]] for i in idx[:j]])
            d = np.where(same, max_distance + 1, d)
        near = np.flatnonzero(d <= max_distance)
        for k in near[np.argsort(d[near], kind="stable")]:
            if confirm is None or confirm(idx[k], idx[j]):
                first = idx[k]
                out[idx[j]] = (out[first][0] if out[first] else first, int(d[k]))
                break
    return out


def _ita(L: np.ndarray | float, b: np.ndarray | float) -> np.ndarray | float:
    """Individual typology angle (degrees) from CIELAB L* and b*."""
    return np.degrees(np.arctan2(np.asarray(L) - 50.0, np.asarray(b)))


def _swatch_ita() -> np.ndarray:
    rgb = np.array([[[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in MONK_HEX]], np.float32) / 255.0
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)[0]
    return np.asarray(_ita(lab[:, 0], lab[:, 2]))


MONK_ITA = _swatch_ita()  # 83.0, 80.2, 71.7, 64.7, 50.3, 10.8, -20.3, -55.6, -78.4, -84.3


def skin_ita(rgb: np.ndarray, size: int, margin: float) -> float:
    """ITA (degrees) of the two cheek patches of an aligned RGB crop: median L* and b* over their pixels."""
    centres, scale = to_crop(np.array(CHEEKS_256), size, margin)
    half = max(1, int(round(CHEEK_HALF_256 * scale)))
    pixels = []
    for cx, cy in centres:
        x, y = int(round(cx)), int(round(cy))
        pixels.append(rgb[max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1].reshape(-1, 3))
    px = np.concatenate(pixels).astype(np.float32)[None] / 255.0
    lab = cv2.cvtColor(px, cv2.COLOR_RGB2Lab)[0]
    return float(_ita(np.median(lab[:, 0]), np.median(lab[:, 2])))


def monk_tone(ita: float) -> int:
    """Estimated Monk Skin Tone bin (1-10): the swatch with the nearest ITA. An estimate: lighting, white balance
    and make-up move ITA; use it to see the balance of a set, never to label a person."""
    return int(np.argmin(np.abs(MONK_ITA - ita))) + 1


def landmark_drift(src: Face, tgt: Face) -> float:
    """Mean distance between the eyes, nose tip and mouth of two faces, in units of the source's eye distance."""
    a = np.array([src.keypoints[k] for k in ALIGN_KEYPOINTS])
    b = np.array([tgt.keypoints[k] for k in ALIGN_KEYPOINTS])
    eye = float(np.linalg.norm(a[1] - a[0]))
    return float(np.linalg.norm(a - b, axis=1).mean() / max(eye, 1e-6))


class IdentityModel:
    """dlib's face-recognition ResNet (from `face_recognition_models`) on aligned crops."""

    def __init__(self, size: int, margin: float):
        import dlib

        with warnings.catch_warnings():  # face_recognition_models imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import face_recognition_models as frm

        self._dlib = dlib
        self._shape = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
        self._net = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
        (l, t), (r, b) = to_crop(np.array(DLIB_BOX_256), size, margin)[0]
        self._box = dlib.rectangle(int(round(l)), int(round(t)), int(round(r)), int(round(b)))

    def distance(self, src: np.ndarray, tgt: np.ndarray) -> float:
        """Euclidean distance of the two crops' descriptors; both chips cut with the source's landmarks, so a
        teacher that moved the face scores worse too. dlib: < 0.6 = same person (99.38% on LFW)."""
        shape = self._shape(src, self._box)
        chips = [self._dlib.get_face_chip(np.ascontiguousarray(im), shape, 150, 0.25) for im in (src, tgt)]
        a, b = (np.array(d) for d in self._net.compute_face_descriptor(chips))
        return float(np.linalg.norm(a - b))

    def between(self, a: np.ndarray, b: np.ndarray) -> float:
        """Descriptor distance of the faces of two source crops, each chip cut with its own landmarks."""
        chips = [self._dlib.get_face_chip(np.ascontiguousarray(im), self._shape(im, self._box), 150, 0.25) for im in (a, b)]
        x, y = (np.array(d) for d in self._net.compute_face_descriptor(chips))
        return float(np.linalg.norm(x - y))


# manifest columns PairMeter.measure fills (NaN / "" / -1 when a pair was rejected before it was measured)
METRIC_COLUMNS = {
    "target_det_score": float("nan"), "landmark_drift": float("nan"), "identity_distance": float("nan"),
    "source_sharpness": float("nan"), "target_sharpness": float("nan"), "sharpness_ratio": float("nan"),
    "source_exposure": float("nan"), "target_exposure": float("nan"),
    "source_clipped": float("nan"), "target_clipped": float("nan"),
    "phash": "", "skin_ita": float("nan"), "skin_tone": -1, "skin_group": "",
}


def detect_crop(detector: FaceDetector, rgb: np.ndarray) -> Face | None:
    """The largest face in an aligned crop, detected with a border (keypoints in padded-crop pixels)."""
    p = int(round(rgb.shape[0] * (CROP_PAD - 1) / 2))
    face, _ = select_face(detector.detect(cv2.copyMakeBorder(rgb, p, p, p, p, cv2.BORDER_REPLICATE)), "largest")
    return face


@dataclass
class PairMeter:
    """Measures aligned pairs: `detector` is a `FaceDetector` made with `CROP_MIN_SCORE` (kept open by the caller)."""

    detector: FaceDetector
    size: int
    margin: float

    def __post_init__(self) -> None:
        self.identity = IdentityModel(self.size, self.margin)
        self.region = face_region(self.size, self.margin)

    def measure(self, src: np.ndarray, tgt: np.ndarray) -> dict[str, Any]:
        m: dict[str, Any] = dict(METRIC_COLUMNS)
        s_face, t_face = detect_crop(self.detector, src), detect_crop(self.detector, tgt)
        m["target_det_score"] = float(t_face.score) if t_face else 0.0
        if s_face and t_face:
            m["landmark_drift"] = landmark_drift(s_face, t_face)
        m["identity_distance"] = self.identity.distance(src, tgt)
        m["source_sharpness"], m["target_sharpness"] = sharpness(src, self.region), sharpness(tgt, self.region)
        m["sharpness_ratio"] = m["target_sharpness"] / max(m["source_sharpness"], 1e-6)
        m["source_exposure"], m["source_clipped"] = exposure(src, self.region)
        m["target_exposure"], m["target_clipped"] = exposure(tgt, self.region)
        m["phash"] = f"{phash(src):016x}"
        m["skin_ita"] = skin_ita(src, self.size, self.margin)
        m["skin_tone"] = monk_tone(m["skin_ita"])
        m["skin_group"] = skin_group(m["skin_tone"])
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
