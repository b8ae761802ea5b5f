"""The classical teacher: OpenCV's non-photorealistic filters, chosen per effect by `style`."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from fxassets.core.config import ClassicalTeacher, EffectTeacher
from fxassets.teachers.base import Teacher


class ClassicalTeacherImpl(Teacher):
    kind = "classical"
    version = "1"

    def __init__(self, cfg: ClassicalTeacher, effect: EffectTeacher):
        self.cfg = cfg
        self.style = effect.style

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        s: dict[str, Any] = {"style": self.style, "sigma_s": c.sigma_s}
        if self.style in ("sketch", "color_sketch"):
            s.update(sigma_r=c.sketch_sigma_r, shade_factor=c.shade_factor)
        else:
            s.update(sigma_r=c.sigma_r)
        return s

    def edit(self, rgb: np.ndarray, record: dict[str, Any]) -> np.ndarray:
        c = self.cfg
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if self.style == "cartoon":
            out = cv2.stylization(bgr, sigma_s=c.sigma_s, sigma_r=c.sigma_r)
        elif self.style in ("sketch", "color_sketch"):
            gray, color = cv2.pencilSketch(bgr, sigma_s=c.sigma_s, sigma_r=c.sketch_sigma_r, shade_factor=c.shade_factor)
            out = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) if self.style == "sketch" else color
        elif self.style == "oil":
            out = cv2.xphoto.oilPainting(bgr, 7, 1)
        elif self.style == "watercolor":
            out = cv2.stylization(cv2.edgePreservingFilter(bgr, flags=cv2.RECURS_FILTER, sigma_s=c.sigma_s, sigma_r=c.sigma_r), sigma_s=c.sigma_s / 2, sigma_r=c.sigma_r)
        else:  # pragma: no cover - the config's Literal rejects other styles
            raise ValueError(f"unknown classical style {self.style!r}")
        return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
