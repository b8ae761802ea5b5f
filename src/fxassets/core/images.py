"""Reading and writing images with clear errors: EXIF orientation, grayscale, alpha and CMYK handled."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fxassets.core.atomic import write_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: source folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def read_rgb(path: str | Path) -> np.ndarray:
    """Load an image as HxWx3 uint8 RGB, honouring EXIF orientation; raise ImageError if it cannot be read."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: unreadable image ({exc})") from exc
    if arr.ndim != 3 or arr.shape[0] < 8 or arr.shape[1] < 8:
        raise ImageError(f"{path}: image too small ({arr.shape[1]}x{arr.shape[0]})")
    return np.ascontiguousarray(arr)


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError(f"{path}: could not encode PNG")
    write_bytes(path, buf.tobytes())


def read_png_rgb(path: str | Path) -> np.ndarray:
    """Fast path for the pipeline's own PNG crops."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageError(f"{path}: unreadable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    """`rgb` at w x h: unchanged when it already is, INTER_AREA to shrink, Lanczos to grow."""
    if rgb.shape[1] == w and rgb.shape[0] == h:
        return rgb
    shrink = w * h < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
