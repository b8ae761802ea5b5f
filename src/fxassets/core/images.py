"""Reading and writing images with clear errors: EXIF orientation, grayscale (8 and 16 bit), alpha and CMYK handled;
an image over `MAX_PIXELS` is refused before it is decoded."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fxassets.core.atomic import write_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# the largest image read (width x height): 50 MP holds a 48 MP phone photo (8064x6048); a larger one would take
# gigabytes to decode and process, so it is an ImageError (a rejected sample, a skipped `apply` input)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601 luma: kornia's and OpenCV's RGB -> grey (the pencil sketch's grey)
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: source folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def distinct_stems(files: list[Path]) -> dict[Path, str]:
    """A distinct name per image file, for what is written from it (a sample id, an `apply` output): its stem, or
    `<stem>_<ext>` where two files share a stem (x.jpg and x.png: x_jpg and x_png), so that no output overwrites
    another. Compared as a case-insensitive file system would; a clash left is a ValueError naming the files."""
    shared = Counter(f.stem.lower() for f in files)
    stems = {f: f.stem if shared[f.stem.lower()] == 1 else f"{f.stem}_{f.suffix[1:].lower()}" for f in files}
    taken = Counter(s.lower() for s in stems.values())
    clash = [f.name for f, s in stems.items() if taken[s.lower()] > 1]
    if clash:
        raise ValueError(f"{', '.join(clash)}: these files would write the same output name; rename one")
    return stems


def read_rgb(path: str | Path) -> np.ndarray:
    """Load an image as HxWx3 uint8 RGB, honouring EXIF orientation; raise ImageError if it cannot be read or has
    more than MAX_PIXELS."""
    path = Path(path)
    too_large = f"{path}: image too large ({{}} pixels; the limit is {MAX_PIXELS / 1e6:g} megapixels)"
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the limit here is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.width * im.height > MAX_PIXELS:  # only the header was read so far
                raise ImageError(too_large.format(f"{im.width}x{im.height}"))
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16-bit (I;16) or 32-bit integer greyscale, 0..65535: scaled to 0..255
                wide = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
                im = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Image.DecompressionBombError:  # over Pillow's own limit: it refused to open the file
        raise ImageError(too_large.format(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,}")) from None
    except ImageError:
        raise
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
