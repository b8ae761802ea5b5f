"""Image quality metrics, one PSNR convention: peak 1.0, identical images count as MAX_PSNR (100 dB), a set scores the
mean of its per-image PSNRs.

- `psnr`: numpy, one image (any layout, uint8 read as 0..255), float64 (the mobile_model report).
- `psnr_per_image`, `ssim_per_image`, `image_scores`, the losses: kornia on N x 3 x H x W float tensors in [0, 1]
  (training and its held-out evaluation)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from kornia.metrics import psnr as _kornia_psnr
from kornia.metrics import ssim

SSIM_WINDOW = 11
MAX_PSNR = 100.0  # identical images: report 100 dB rather than +inf (keeps metrics JSON finite)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two images of the same shape, peak 1.0; identical images give MAX_PSNR (100 dB).

    uint8 arrays are read as 0..255 and scaled to [0, 1]; float arrays must already be in [0, 1].  The layout
    (HxWx3, 1x3xHxW, ...) does not matter as long as both match.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    fa = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    fb = b.astype(np.float64) / 255.0 if b.dtype == np.uint8 else b.astype(np.float64)
    mse = float(np.mean((fa - fb) ** 2))
    if mse <= 10.0 ** (-MAX_PSNR / 10.0):
        return MAX_PSNR
    return float(10.0 * np.log10(1.0 / mse))


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (N,), max value 1.0, capped at MAX_PSNR (identical images)."""
    return torch.stack([_kornia_psnr(p, t, max_val=1.0) for p, t in zip(pred, target)]).clamp(max=MAX_PSNR)


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor, window: int = SSIM_WINDOW) -> torch.Tensor:
    """Mean SSIM of each image (N,) with a Gaussian window of `window` px."""
    return ssim(pred, target, window, max_val=1.0).flatten(1).mean(1)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, window: int = SSIM_WINDOW) -> torch.Tensor:
    """1 - mean SSIM over the batch (0 when equal).  Note: kornia.losses.ssim_loss is (1 - SSIM) / 2."""
    return 1.0 - ssim(pred, target, window, max_val=1.0).mean()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round float [0, 1] images to the 256 levels a PNG stores (what a user would see)."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0) / 255.0


def image_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (of per-image PSNRs) and mean SSIM over a batch."""
    return {
        "psnr": float(psnr_per_image(pred, target).mean()),
        "ssim": float(ssim_per_image(pred, target).mean()),
    }


def l1_ssim_loss(
    pred: torch.Tensor, target: torch.Tensor, l1_weight: float = 1.0, ssim_weight: float = 0.5
) -> torch.Tensor:
    """The distillation loss: l1_weight * mean |pred - target| + ssim_weight * (1 - SSIM)."""
    loss = l1_weight * F.l1_loss(pred, target)
    if ssim_weight > 0:
        loss = loss + ssim_weight * ssim_loss(pred, target)
    return loss
