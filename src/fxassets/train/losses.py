"""The training objective, built from TrainConfig: ``l1 * L1 + ssim * (1 - SSIM) [+ lpips * LPIPS] [+ gan * adv]``.

`fxassets.core.metrics` measures; this module composes what the student is trained on.

**LPIPS** (``train.lpips_weight > 0``): the learned perceptual distance of Zhang et al. 2018, torchmetrics'
implementation, AlexNet (or VGG / SqueezeNet) backbone.  Nothing is downloaded: the whole network (backbone and
linear heads) is loaded from the local file ``train.lpips_weights``, a ``state_dict`` of torchmetrics'
``_LPIPS`` module saved with ``torch.save`` (or safetensors; the backbone is read from the file's keys).  Make the
file once on a machine with internet access (torchvision fetches the ImageNet AlexNet)::

    import torch
    from torchmetrics.functional.image.lpips import _LPIPS
    torch.save(_LPIPS(pretrained=True, net="alex").state_dict(), "models/lpips_alex.pth")

The network is frozen (eval mode, no gradient to its weights); images in [0, 1] are scaled to [-1, 1] first.

**PatchGAN** (``train.gan_weight > 0``): a pix2pix-style 70x70 PatchGAN discriminator conditioned on the source
(source and image concatenated, 6 channels), spectral norm on every conv, hinge loss, its own Adam.  The student's
loss gains ``gan_weight * -mean(D(source, student))``; `Objective.adversary_step` trains D on the teacher target
(real) against the student output (fake) once per student step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fxassets.core.config import TrainConfig
from fxassets.core.metrics import l1_ssim_loss

LPIPS_KEY = "train.lpips_weights"
ADVERSARY_LR = 2e-4  # the discriminator's peak learning rate (it follows the student's warm-up / cosine schedule)
ADVERSARY_BETAS = (0.5, 0.999)  # pix2pix's Adam betas


# --------------------------------------------------------------------------------------------------------- LPIPS


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: cannot read the LPIPS weights ({LPIPS_KEY}): {exc}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: the LPIPS weights ({LPIPS_KEY}) must be a state_dict (name -> tensor)")
    return sd


def _backbone(sd: dict[str, torch.Tensor]) -> str:
    """alex / vgg / squeeze, from the keys torchmetrics' _LPIPS gives each backbone."""
    if any(k.startswith(("lin6.", "lins.6.")) for k in sd):
        return "squeeze"
    if any(k.startswith("net.slice1.2.") for k in sd):  # VGG's slice1 holds two convs, AlexNet's one
        return "vgg"
    return "alex"


def _with_aliases(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """_LPIPS registers each linear head twice (`linK.` and `lins.K.`); safetensors keeps only one of them."""
    out = {k: v for k, v in sd.items() if not k.startswith("scaling_layer.")}  # constants (the lpips package saves them)
    for k, v in sd.items():
        if k.startswith("lins."):
            i, rest = k[len("lins."):].split(".", 1)
            out.setdefault(f"lin{i}.{rest}", v)
        elif k.startswith("lin") and k[3:4].isdigit():
            i, rest = k[3:].split(".", 1)
            out.setdefault(f"lins.{i}.{rest}", v)
    return out


class LPIPS(nn.Module):
    """Frozen LPIPS distance between images in [0, 1] (scaled to [-1, 1] inside); mean over the batch."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:  # always in eval mode (dropout off)
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.net(pred * 2.0 - 1.0, target * 2.0 - 1.0).mean()


def load_lpips(path: str | Path | None) -> LPIPS:
    """The LPIPS network with its weights from the local file `path` (see the module docstring); never downloads."""
    if path is None:
        raise ValueError(f"params.yaml: train.lpips_weight > 0 needs {LPIPS_KEY}: a local file with the LPIPS "
                         "network's state_dict (see fxassets.train.losses for how to make one)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LPIPS weights file (params.yaml: {LPIPS_KEY})")
    sd = _read_state_dict(path)
    try:
        from torchmetrics.functional.image.lpips import _LPIPS
    except ImportError as exc:
        raise ImportError("train.lpips_weight > 0 needs torchmetrics (pip install torchmetrics)") from exc
    net = _backbone(sd)
    # random init (pretrained=False, pnet_rand=True: nothing is downloaded), then every weight comes from the file;
    # fork_rng: building it leaves the global RNG, and so the run, as it was
    with torch.random.fork_rng(devices=[]):
        module = _LPIPS(pretrained=False, net=net, pnet_rand=True, pnet_tune=False, eval_mode=True)
    try:
        module.load_state_dict(_with_aliases(sd), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not the state_dict of torchmetrics' LPIPS ({net}) network ({LPIPS_KEY}): "
                         f"{exc}") from exc
    return LPIPS(module)


# ------------------------------------------------------------------------------------------------------ PatchGAN


class PatchDiscriminator(nn.Module):
    """pix2pix's 70x70 PatchGAN at half width: 4x4 convs C32-C64-C128-C256 (strides 2, 2, 2, 1) and a 1-channel 4x4
    conv, LeakyReLU(0.2), spectral norm on every conv.  In: source and image (N x 6 x H x W, [0, 1]); out: one
    real/fake logit per ~70 px patch (N x 1 x h x w)."""

    def __init__(self, in_chs: int = 6, width: int = 32):
        super().__init__()
        chs = [in_chs, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [spectral_norm(nn.Conv2d(chs[i], chs[i + 1], 4, stride=2 if i < 3 else 1, padding=1)),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(spectral_norm(nn.Conv2d(chs[-1], 1, 4, stride=1, padding=1)))
        self.body = nn.Sequential(*layers)

    def forward(self, source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([source, image], dim=1) * 2.0 - 1.0)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


# ----------------------------------------------------------------------------------------------------- objective


class Objective:
    """The student's loss for one batch, and the adversary (when gan_weight > 0) with its optimizer.

    ``lpips_root``: where a relative ``train.lpips_weights`` is read from (the project root)."""

    def __init__(self, cfg: TrainConfig, lpips_root: Path | None = None):
        self.cfg = cfg
        self.lpips: LPIPS | None = None
        self.lpips_path: Path | None = None  # the weights file read (part of a resumable run's key)
        if cfg.lpips_weight > 0:
            path = cfg.lpips_weights
            if path is not None and lpips_root is not None and not Path(path).is_absolute():
                path = Path(lpips_root) / path
            self.lpips = load_lpips(path)
            self.lpips_path = Path(path) if path is not None else None
        self.adversary: PatchDiscriminator | None = None
        self.adversary_opt: torch.optim.Optimizer | None = None
        if cfg.gan_weight > 0:
            self.adversary = PatchDiscriminator().train()
            self.adversary_opt = torch.optim.Adam(self.adversary.parameters(), lr=ADVERSARY_LR, betas=ADVERSARY_BETAS)

    def __call__(self, source: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The student's loss: reconstruction (L1, SSIM, LPIPS) plus, with a GAN, the hinge generator term."""
        cfg = self.cfg
        loss = l1_ssim_loss(output, target, cfg.l1_weight, cfg.ssim_weight)
        if self.lpips is not None:
            loss = loss + cfg.lpips_weight * self.lpips(output, target)
        if self.adversary is not None:
            self.adversary.requires_grad_(False)  # this term trains the student only
            loss = loss - cfg.gan_weight * self.adversary(source, output).mean()
            self.adversary.requires_grad_(True)
        return loss

    def adversary_step(self, source: torch.Tensor, output: torch.Tensor, target: torch.Tensor,
                       lr_scale: float = 1.0) -> float | None:
        """One discriminator update (teacher target real, student output fake); its loss, or None without a GAN."""
        if self.adversary is None or self.adversary_opt is None:
            return None
        for group in self.adversary_opt.param_groups:
            group["lr"] = ADVERSARY_LR * lr_scale
        loss = hinge_discriminator_loss(self.adversary(source, target), self.adversary(source, output.detach()))
        self.adversary_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.adversary_opt.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (the adversary and its optimizer; LPIPS is frozen and comes from its file)."""
        if self.adversary is None or self.adversary_opt is None:
            return {}
        return {"adversary": self.adversary.state_dict(), "adversary_opt": self.adversary_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adversary is not None and self.adversary_opt is not None:
            self.adversary.load_state_dict(state["adversary"])
            self.adversary_opt.load_state_dict(state["adversary_opt"])
