"""Image quality metrics (kornia): PSNR and SSIM per image, for N x 3 x H x W float tensors in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.metrics import psnr, ssim

SSIM_WINDOW = 11
MAX_PSNR = 100.0  # identical images: report 100 dB rather than +inf (keeps metrics JSON finite)


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (N,), max value 1.0, capped at MAX_PSNR (identical images)."""
    return torch.stack([psnr(p, t, max_val=1.0) for p, t in zip(pred, target)]).clamp(max=MAX_PSNR)


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
