"""The before / teacher / student grid of the model card: one row per held-out person, one labelled column per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from fxassets.core.images import write_png

HEADER_PX = 22  # height of the label strip above the columns
GAP_PX = 4  # white gap between cells
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _label(width: int, text: str) -> np.ndarray:
    """A white strip `width` px wide with `text` centred in black (shrunk to fit)."""
    strip = np.full((HEADER_PX, width, 3), 255, np.uint8)
    scale = 0.5
    (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
    if tw > width - 4:
        scale *= (width - 4) / tw
        (tw, th), _ = cv2.getTextSize(text, _FONT, scale, 1)
    org = (max(2, (width - tw) // 2), (HEADER_PX + th) // 2)
    cv2.putText(strip, text, org, _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def make_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str]) -> np.ndarray:
    """Tile HxWx3 uint8 RGB images into one image: `rows` of equal length, a label strip over each column.

    Every cell must have the same size.  Returns an RGB uint8 array.
    """
    if not rows:
        raise ValueError("make_grid: no rows to draw")
    ncol = len(labels)
    if any(len(r) != ncol for r in rows):
        raise ValueError(f"make_grid: every row needs {ncol} images (one per label)")
    h, w = rows[0][0].shape[:2]
    for r in rows:
        for im in r:
            if im.shape != (h, w, 3) or im.dtype != np.uint8:
                raise ValueError(f"make_grid: cells must all be {h}x{w}x3 uint8, got {im.shape} {im.dtype}")
    height = HEADER_PX + len(rows) * h + (len(rows) - 1) * GAP_PX
    width = ncol * w + (ncol - 1) * GAP_PX
    grid = np.full((height, width, 3), 255, np.uint8)
    for j, text in enumerate(labels):
        x = j * (w + GAP_PX)
        grid[:HEADER_PX, x:x + w] = _label(w, text)
    for i, r in enumerate(rows):
        y = HEADER_PX + i * (h + GAP_PX)
        for j, im in enumerate(r):
            x = j * (w + GAP_PX)
            grid[y:y + h, x:x + w] = im
    return grid


def write_grid(path: str | Path, rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str]) -> np.ndarray:
    """`make_grid`, written atomically as a PNG; returns the grid."""
    grid = make_grid(rows, labels)
    write_png(path, grid)
    return grid
