"""Capture simulation: the student sees faces as other cameras and rooms make them.

The sample set is one studio: one camera, one light, one background.  With probability
``cfg.capture_probability`` a training pair gets, drawn per pair:

- white balance: per-channel gains in ``1 +- white_balance`` (luma kept), and exposure: a gain in
  ``1 +- exposure``.  Both go on the source; on the target too where the teacher keeps colour, since the teacher of
  a warmer, brighter photo paints it warmer and brighter.  A grey target (a pencil sketch: the teacher removes
  colour) keeps its colour: only the exposure reaches it, as grey.
- sensor noise (Gaussian, sigma up to ``noise``), defocus (Gaussian blur, sigma up to ``blur`` px) and JPEG
  compression (quality from ``jpeg_quality`` to 95): on the source only.  The teacher's target stays clean, so the
  student learns to give the teacher's look from a worse capture.

Off (``capture_probability: 0``) the generator's stream is untouched, so a run without it trains as before.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from fxassets.core.config import AugmentConfig
from fxassets.core.images import GRAY_WEIGHTS as LUMA

GRAY_WEIGHTS = torch.tensor(LUMA)
GREY_CHROMA = 0.02  # a target whose channels differ by less than this (0..1) on average is grey


def is_grey(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool: images (N x 3 x H x W in [0, 1]) whose channels agree, on average within GREY_CHROMA."""
    return (x - x.mean(1, keepdim=True)).abs().mean((1, 2, 3)) < GREY_CHROMA


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    a = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", a[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    b = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(b)).permute(2, 0, 1).to(img.dtype) / 255.0


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    a = img.permute(1, 2, 0).numpy()
    return torch.from_numpy(np.ascontiguousarray(cv2.GaussianBlur(a, (0, 0), sigma))).permute(2, 0, 1)


def simulate_capture(source: torch.Tensor, target: torch.Tensor, cfg: AugmentConfig,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented copies of a float N x 3 x H x W batch of pairs in [0, 1] (see the module docstring)."""
    if cfg.capture_probability <= 0:
        return source, target
    n = source.shape[0]
    u = torch.rand(n, 9, generator=gen, dtype=torch.float64).cpu()
    noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
    src, tgt = source.clone().cpu(), target.clone().cpu()
    grey = is_grey(tgt)
    rng = torch.Generator().manual_seed(noise_seed)
    for i in range(n):
        if u[i, 0] >= cfg.capture_probability:
            continue
        gains = 1 + (u[i, 1:4] * 2 - 1) * cfg.white_balance
        gains = gains / float((gains * GRAY_WEIGHTS.double()).sum())  # luma kept
        exposure = 1 + (float(u[i, 4]) * 2 - 1) * cfg.exposure
        wb = (gains * exposure).to(src.dtype)[:, None, None]
        src[i] = (src[i] * wb).clamp(0, 1)
        tgt[i] = (tgt[i] * (exposure if grey[i] else wb)).clamp(0, 1)
        if cfg.blur > 0 and u[i, 5] < 0.5:
            src[i] = _blur(src[i], 0.3 + float(u[i, 6]) * cfg.blur).clamp(0, 1)
        if cfg.noise > 0:
            sigma = float(u[i, 7]) * cfg.noise
            src[i] = (src[i] + torch.randn(src[i].shape, generator=rng, dtype=src.dtype) * sigma).clamp(0, 1)
        if cfg.jpeg_quality < 95 and u[i, 8] < 0.5:
            src[i] = _jpeg(src[i], round(cfg.jpeg_quality + float(u[i, 8]) * 2 * (95 - cfg.jpeg_quality)))
    return src.to(source.device), tgt.to(target.device)
