"""The student: a small UNet that learns one face effect from the teacher's before/after pairs.

Encoder: any timm model with ``features_only=True`` (default MobileNetV4-conv-small at half width, random init),
giving features at strides 2, 4, 8, 16 and 32.  Decoder: from the deepest feature up to stride 2, each stage
upsamples x2, concatenates the encoder skip of that scale and fuses them with a 1x1 conv (+ ``blocks`` timm
inverted-residual blocks; default none).  Head: a dense conv at half resolution (``head_conv_kernel``, 3 or 1; +
``head_blocks`` inverted-residual blocks, default none), then a conv to 12 channels (``head_kernel``, 1 or 3: with 3
each output sub-pixel also sees the neighbouring features, so the change does not jump between the 2x2 blocks) that
``pixel_shuffle(2)`` unfolds into a full-resolution RGB change (the last conv starts at zero, so a fresh student is
the identity).  The class's defaults are the older 3x3 / 1x1 head (checkpoints without the keys); params.yaml's are
1 / 3.  Output ``clamp(x + delta, 0, 1)``: the network learns the edit, the identity is free.

Why this shape (benchmarks/bench_frontier.py, docs/student.md): int8 convolutions pay off for dense convs and barely
for depthwise ones, so a decoder of plain 1x1 / 3x3 convs is ~2.5x faster in int8 than one of inverted-residual
blocks at the same quality, and ReLU everywhere (MobileNetV4-conv has no hard-swish / squeeze-excite) keeps the int8
graph fused.  Everything is static-shape convs, nearest upsampling, concatenation and pixel shuffle: ONNX-exportable
with no data-dependent control flow (DepthToSpace).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from timm.layers import ConvNormAct
from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from fxassets.core.atomic import write_bytes

DEFAULT_ENCODER = "mobilenetv4_conv_small_050"
# decoder channels at strides 16, 8, 4, 2 for width 1.0
DECODER_CHANNELS = (64, 48, 32, 24)
FORMAT = "fxassets-student/1"


def _ch(c: float) -> int:
    """Round a channel count to a multiple of 8 (int8/SIMD-friendly), at least 8."""
    return max(8, int(c + 4) // 8 * 8)


def _encoder(name: str, weights: str | Path | None) -> nn.Module:
    """timm `name` as a feature extractor: random init, or the weights of the local file `weights` (a state dict
    of the full timm model, .pth / .safetensors; nothing is downloaded)."""
    if weights is None:
        return timm.create_model(name, features_only=True, pretrained=False)
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such encoder weights file (params.yaml: train.encoder_weights)")
    try:
        return timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not usable as weights of timm's {name!r} (train.encoder_weights): "
                         f"{str(exc)[:300]}") from exc


UPSAMPLE_MODES = ("nearest", "bilinear")


def upsample2(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x2 upsampling: "nearest" repeats each value over a 2x2 block (the deep features' blocks then show as 16-32 px
    tiles in the output); "bilinear" (half-pixel centres) interpolates between them."""
    if mode == "nearest":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class UpStage(nn.Module):
    """Upsample x2, concatenate the encoder skip, mix with a 1x1 ConvNormAct and inverted-residual blocks."""

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int, blocks: int = 1, exp_ratio: float = 3.0,
                 act_layer: type[nn.Module] = nn.ReLU, norm_layer: type[nn.Module] = nn.BatchNorm2d,
                 upsample: str = "nearest"):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.in_chs = in_chs
        self.upsample = upsample
        self.fuse = ConvNormAct(in_chs + skip_chs, out_chs, 1, act_layer=act_layer, norm_layer=norm_layer)
        self.blocks = nn.Sequential(*[
            InvertedResidual(out_chs, out_chs, dw_kernel_size=3, exp_ratio=exp_ratio,
                             act_layer=act_layer, norm_layer=norm_layer)
            for _ in range(blocks)
        ])

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = upsample2(x, self.upsample)
        return self.blocks(self.fuse(torch.cat([x, skip], dim=1)))


class LowResFuse(nn.Module):
    """The inference form of an `UpStage` (eval mode, same outputs up to float rounding).

    A 1x1 conv commutes with nearest and with bilinear upsampling (both are per-channel linear maps whose weights sum
    to 1), so ``conv([up(x), skip]) == up(conv_x(x)) + conv_s(skip)``: the deep
    input is mixed at its own (4x smaller) resolution and the upsampled tensor has the output's channels, not the
    input's.  The BatchNorm is folded into the two convs.  ~12 % less int8 latency for the default student, and int8
    gains more than fp32 (no Concat, a smaller Resize).
    """

    def __init__(self, stage: UpStage):
        super().__init__()
        conv, bn = stage.fuse.conv, stage.fuse.bn
        in_chs = stage.in_chs
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale[:, None, None, None]
        out_chs = weight.shape[0]
        self.deep = nn.Conv2d(in_chs, out_chs, 1, bias=True)
        self.skip = nn.Conv2d(weight.shape[1] - in_chs, out_chs, 1, bias=False)
        with torch.no_grad():
            self.deep.weight.copy_(weight[:, :in_chs])
            self.deep.bias.copy_(bn.bias - bn.running_mean * scale)
            self.skip.weight.copy_(weight[:, in_chs:])
        self.act = nn.Sequential(bn.drop, bn.act)
        self.blocks = stage.blocks
        self.upsample = stage.upsample

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = upsample2(self.deep(x), self.upsample)
        return self.blocks(self.act(x + self.skip(skip)))


def inference_form(model: nn.Module) -> nn.Module:
    """A copy of a student for export: eval mode, each decoder stage as a `LowResFuse` (same outputs, faster)."""
    out = copy.deepcopy(model).eval()
    for name in ("up16", "up8", "up4", "up2"):
        stage = getattr(out, name, None)
        if isinstance(stage, UpStage):
            setattr(out, name, LowResFuse(stage))
    if getattr(out, "colour", None) is not None and not out.colour_folded:
        fold_colour(out)
    return out


GREY_PROJECTION = torch.full((3, 3), 1.0 / 3.0)  # every channel = the mean of the three: the orthogonal projection


def project_grey(model: "Student") -> None:
    """Compose the output colour map with the orthogonal projection onto the grey axis (r = g = b): the student's
    output is grey for any input colour, exactly.  Applied after training, to a student trained in colour (from
    the identity).  Where every target is grey, the projection only removes error: per pixel
    ``|P s - t| = |P (s - t)| <= |s - t|`` for a grey target ``t = P t`` (before the clamp)."""
    if model.colour is None or model.colour_folded:
        raise ValueError("project_grey needs the student's unfolded output colour map (build it with colour=True)")
    with torch.no_grad():
        model.colour.weight.copy_((GREY_PROJECTION @ model.colour.weight[:, :, 0, 0])[:, :, None, None])
        model.colour.bias.copy_(GREY_PROJECTION @ model.colour.bias)


def colour_map(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a 1x1 conv of 3 channels, as a matrix product over (N, 3, H*W): ONNX gets a MatMul, which ONNX
    Runtime runs in float at full resolution for +1-4 % of the sketch int8 time, where the 1x1 Conv cost +15 %
    (side by side: docs/mobile.md, "The margin, second round")."""
    n, c, h, w = x.shape
    out = torch.matmul(conv.weight[:, :, 0, 0], x.reshape(n, c, h * w)).reshape(n, -1, h, w)
    return out + conv.bias.reshape(1, -1, 1, 1)


def fold_colour(model: "Student") -> None:
    """M (x + delta) + b == (M x + b) + M delta: the output colour map moved into the head's last conv (whose 12
    channels are pixel_shuffle's colour c, sub-pixel i at c * 4 + i), leaving a 1x1 conv of the input."""
    m = model.colour.weight[:, :, 0, 0]
    last = model.head[-1]
    with torch.no_grad():
        w = last.weight.reshape(3, 4, -1)  # colour, sub-pixel, in
        last.weight.copy_(torch.einsum("ck,kij->cij", m, w).reshape(last.weight.shape))
        last.bias.copy_((m @ last.bias.reshape(3, 4)).reshape(-1))
    model.colour_folded = True


class Student(nn.Module):
    """UNet: timm encoder, decoder of 1x1 fuses with skips (+ optional inverted-residual blocks), half-resolution
    head ending in pixel_shuffle(2)."""

    def __init__(self, encoder: str = DEFAULT_ENCODER, width: float = 1.0,
                 decoder_channels: tuple[int, ...] = DECODER_CHANNELS, blocks: int = 0,
                 head_blocks: int = 0, exp_ratio: float = 3.0,
                 act_layer: type[nn.Module] = nn.ReLU, norm_layer: type[nn.Module] = nn.BatchNorm2d,
                 encoder_weights: str | Path | None = None, upsample: str = "nearest", colour: bool = False,
                 head_kernel: int = 1, head_conv_kernel: int = 3):
        super().__init__()
        if len(decoder_channels) != 4:
            raise ValueError("decoder_channels needs 4 values (strides 16, 8, 4, 2)")
        self.encoder_name = encoder
        self.width = float(width)
        # the shape-defining settings beyond encoder and width: saved in checkpoints, passed back on load
        self.arch = {"decoder_channels": list(decoder_channels), "blocks": blocks, "head_blocks": head_blocks,
                     "exp_ratio": exp_ratio, "upsample": upsample, "colour": colour, "head_kernel": head_kernel,
                     "head_conv_kernel": head_conv_kernel}
        self.encoder = _encoder(encoder, encoder_weights)
        info = self.encoder.feature_info
        reductions = info.reduction()
        if list(reductions[-4:]) != [4, 8, 16, 32] or reductions[0] != 2 or len(reductions) != 5:
            raise ValueError(f"encoder {encoder!r}: expected features at strides 2,4,8,16,32, got {reductions}")
        enc = info.channels()  # strides 2, 4, 8, 16, 32
        dec = [_ch(c * width) for c in decoder_channels]
        kw = dict(act_layer=act_layer, norm_layer=norm_layer)
        up = dict(blocks=blocks, exp_ratio=exp_ratio, upsample=upsample, **kw)
        self.bottleneck = ConvNormAct(enc[4], dec[0], 1, **kw)  # stride 32 -> decoder width
        self.up16 = UpStage(dec[0], enc[3], dec[0], **up)
        self.up8 = UpStage(dec[0], enc[2], dec[1], **up)
        self.up4 = UpStage(dec[1], enc[1], dec[2], **up)
        self.up2 = UpStage(dec[2], enc[0], dec[3], **up)
        self.head = nn.Sequential(  # at half resolution
            ConvNormAct(dec[3], dec[3], head_conv_kernel, **kw),
            *[InvertedResidual(dec[3], dec[3], exp_ratio=exp_ratio, **kw) for _ in range(head_blocks)],
            # the 12 channels are pixel_shuffle's 2x2 sub-pixels of each half-resolution position: with a 1x1 kernel
            # all four come from that one position and the change jumps between the 2x2 blocks (a period-2 pattern
            # that evaluation's tile ratio sees on every even grid line); a 3x3 kernel lets them blend into their
            # neighbours (docs/student.md)
            nn.Conv2d(dec[3], 12, head_kernel, padding=head_kernel // 2, bias=True),
        )
        nn.init.zeros_(self.head[-1].weight)  # start as the identity: out == x
        nn.init.zeros_(self.head[-1].bias)
        # a learned colour map of the output (a 3x3 matrix + offset, starting as the identity): where the teacher
        # removes colour (a pencil sketch is grey) it learns the projection once for every input, instead of a
        # per-pixel change that cancels the colours of the training studio only.  Export folds it into a matrix
        # product of the input (kept in float: `colour_map`) and the head's last conv: out = M x + b + M delta.
        self.colour = nn.Conv2d(3, 3, 1, bias=True) if colour else None
        self.colour_folded = False
        if self.colour is not None:
            with torch.no_grad():
                self.colour.weight.copy_(torch.eye(3)[:, :, None, None])
                self.colour.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f2, f4, f8, f16, f32 = self.encoder(x)
        y = self.bottleneck(f32)
        y = self.up16(y, f16)
        y = self.up8(y, f8)
        y = self.up4(y, f4)
        y = self.head(self.up2(y, f2))
        delta = F.pixel_shuffle(y, 2)
        if self.colour is None:
            return torch.clamp(x + delta, 0.0, 1.0)
        if self.colour_folded:  # the inference form: M applied to the head already
            return torch.clamp(colour_map(self.colour, x) + delta, 0.0, 1.0)
        return torch.clamp(self.colour(x + delta), 0.0, 1.0)


def build_student(encoder: str = DEFAULT_ENCODER, width: float = 1.0, **kwargs: Any) -> nn.Module:
    """A fresh (random init) student.  Input and output: N x 3 x H x W RGB in [0, 1], H and W multiples of 32."""
    return Student(encoder=encoder, width=width, **kwargs)


def arch_options(cfg: Any) -> dict[str, Any]:
    """The decoder settings of a `TrainConfig` as `build_student` keyword arguments."""
    return {"blocks": cfg.decoder_blocks, "head_blocks": cfg.head_blocks, "upsample": cfg.upsample,
            "colour": cfg.colour_transform, "head_kernel": cfg.head_kernel,
            "head_conv_kernel": cfg.head_conv_kernel}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, size: int = 256) -> int:
    """Multiply-accumulates of one size x size forward pass (convolutions and matmuls, torch's FLOP counter / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, size, size))
    model.train(was_training)
    return int(counter.get_total_flops() // 2)


def save_student(model: nn.Module, path: str | Path, meta: dict[str, Any]) -> None:
    """Write the weights (and BN statistics) as safetensors, atomically; `meta` goes into the header."""
    info = dict(meta)
    # what load_student needs to rebuild the model comes from the model itself, never from the caller's meta
    info.update({"format": FORMAT, "encoder": getattr(model, "encoder_name", DEFAULT_ENCODER),
                 "width": getattr(model, "width", 1.0), "arch": getattr(model, "arch", {})})
    header = {str(k): json.dumps(v, default=str) for k, v in info.items()}  # every value JSON: lossless round trip
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_bytes(path, _sorted_metadata(save(tensors, metadata=header)))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the header's metadata in sorted order: the library writes that map in its process's
    hash order (the same weights gave other bytes run to run); the tensors' entries keep their (sorted) order."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as the library pads it
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _decode(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:  # written by another tool: keep the raw string
        return v


def load_student(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the student described by the checkpoint's metadata, load its weights, return (model in eval, meta)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such student checkpoint")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {k: _decode(v) for k, v in raw.items()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an fxassets student checkpoint (format={meta.get('format')!r})")
    model = build_student(str(meta["encoder"]), float(meta["width"]), **dict(meta.get("arch") or {}))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    return model, meta
