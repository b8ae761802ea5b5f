"""Training augmentation of aligned face pairs: one random transform, applied alike to the student's input and the
teacher's output.

``augment_pairs(source, target, cfg, gen)`` takes a batch of full aligned crops (float ``N x 3 x H x W`` in
``[0, 1]``, the canonical template of :mod:`fxassets.faces`, before any random cropping) and, per pair, in this
order:

1. **occluder** (with probability ``cfg.occluder_probability``, the kind drawn from ``cfg.occluders``): synthetic
   glasses, sunglasses or a hand, drawn with OpenCV as an RGBA layer placed from the template's eye / nose / mouth
   positions and alpha-composited (``a * colour + (1 - a) * image``) onto *both* sides, the same pixels on each.
   The teacher's stylization of a real pair turns a pair of glasses or a hand into skin or paint; pasting the
   same occluder on the target teaches the student to leave such things alone instead of stylizing them as skin.
2. **affine jitter** (with probability ``cfg.affine_probability``): rotation, zoom and shift about the crop centre
   (``cfg.rotate_deg``, ``cfg.scale``, ``cfg.translate``), bilinear, reflection padding (no black wedges at the
   borders).  Not every pair: a bilinear resampling softens both sides alike, and a student trained only on
   resampled pairs never sees the sharp crops it is evaluated and used on (warping every pair cost 0.6 dB
   of held-out PSNR; docs/student.md).
3. **horizontal flip** half the time (``cfg.flip``); folded into the affine warp when there is one (one resampling);
   exact (mirrored rows) for the pairs not warped.
4. **colour jitter**: brightness, contrast, saturation with kornia's ``ColorJitter`` ranges and formulas
   (``adjust_brightness_accumulative``, ``adjust_contrast_with_mean_subtraction``,
   ``adjust_saturation_with_gray_subtraction``, in that order), then a hue turn of up to ``cfg.hue`` of a full
   turn, all composed into one 3 x 3 colour matrix plus offset per pair, applied with one batched matmul per side.
   The contrast pivot is the grey mean of the *source*, used on both sides, so each pair gets literally the same
   pixel-wise colour map. Two deliberate differences from running kornia's ops one after another: the hue turns
   the YIQ chroma plane (a linear map that keeps luma and greys; kornia's ``adjust_hue`` shifts the HSV hue, which
   keeps each pixel's max and min instead: same direction, similar size, not the same numbers), and the result is
   clamped to ``[0, 1]`` once, at the end, not after every step.

Why not kornia's modules and ops throughout: at one thread on a CPU, a batch of 16 pairs at 256 px through
``warp_affine`` (``affine_grid`` + ``grid_sample``) and the four ``kornia.enhance`` colour ops took about 230 ms,
``adjust_hue`` (an HSV round trip) alone 160 ms. Here kornia builds the rotation matrices
(``get_rotation_matrix2d``); the warp is one ``grid_sample`` over source and target stacked as 6 channels, on a
grid built by broadcasting (``affine_grid``'s batched matmul is several times slower), and the colour one matmul
per side. ``tests/test_augment.py`` checks the warp against kornia's ``warp_affine`` and the brightness /
contrast / saturation map against kornia's functions.

All randomness comes from the ``torch.Generator`` passed in, in a fixed layout (one ``N x 12`` block of uniforms
and one occluder seed per pair), so the same seed gives the same output whatever the global torch RNG state, and
switching one option on or off does not reshuffle the others' draws. With everything off (no flip, all jitter 0,
occluder probability 0) the inputs come back unchanged (as copies).

``draw_occluder(kind, size, gen)`` returns one occluder layer (``4 x size x size`` RGBA) for tests and previews;
``python -m fxassets.train.augment OUT.png [FACE.png ...]`` writes a preview grid of every kind on some faces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from kornia.geometry.transform import get_rotation_matrix2d

from fxassets.faces import align as faces
from fxassets.train.occluders import _occluder_patch, draw_occluder
from fxassets.core.config import OCCLUDERS, AugmentConfig
from fxassets.core.images import GRAY_WEIGHTS
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)

# Columns of the per-pair block of uniforms drawn from the generator (the layout never changes with the config).
_U_OCCLUDE, _U_KIND, _U_ANGLE, _U_SCALE, _U_TX, _U_TY, _U_FLIP, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_WARP = range(12)
_N_UNIFORMS = 12


# ------------------------------------------------------------------------------------------------- the pipeline


def augment_pairs(
    source: torch.Tensor,
    target: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
    margin: float = faces.DEFAULT_MARGIN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float N x 3 x H x W in [0,1] source (student input) and target (teacher output) of aligned face crops (the
    canonical template of fxassets.faces: eyes / nose / mouth at faces.template(H, margin) positions; crops are
    the full aligned crops, e.g. 256 px, BEFORE random cropping). Returns augmented copies, same shapes, with the SAME
    random transform applied to both sides of each pair: occluder paste (with probability cfg.occluder_probability,
    kind drawn from cfg.occluders), small affine jitter (rotation/scale/translation), horizontal flip, colour jitter.

    `margin`: the framing margin the crops were made with (params `faces.margin`), which places the occluders.
    All randomness comes from `gen`; the inputs are never modified."""
    _check_pair(source, target)
    n, _, h, w = source.shape
    u = torch.rand(n, _N_UNIFORMS, generator=gen, dtype=torch.float64, device=gen.device).cpu()
    seeds = torch.randint(0, 2**62, (n,), generator=gen, device=gen.device).cpu().tolist()
    occluded = occluder_choices(u, cfg)
    flip = (u[:, _U_FLIP] < 0.5) if cfg.flip else torch.zeros(n, dtype=torch.bool)
    flipped = flip.nonzero().flatten().to(source.device)
    affine = cfg.rotate_deg > 0 or cfg.scale > 0 or cfg.translate > 0
    colour = cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0 or cfg.hue > 0

    if not (occluded or affine or colour):  # at most a flip: exact copies, mirrored rows
        src, tgt = source.clone(), target.clone()
        if len(flipped):
            src[flipped] = src[flipped].flip(-1)
            tgt[flipped] = tgt[flipped].flip(-1)
        return src, tgt

    # source and target side by side as 6 channels: one resampling pass serves both
    pair = torch.cat([source, target], dim=1)

    # 1. occluders, in template coordinates (before the warp moves the face)
    side = max(h, w)  # a non-square crop is taken as the centre of the square crop of its longer side
    for i, kind in occluded:
        patch, (y0, x0) = _occluder_patch(kind, side, torch.Generator().manual_seed(seeds[i]), margin)
        y0, x0 = y0 - (side - h) // 2, x0 - (side - w) // 2
        top, left = max(0, -y0), max(0, -x0)
        patch = patch[:, top : h - y0, left : w - x0].to(device=pair.device, dtype=pair.dtype)
        if patch.numel() == 0:
            continue
        y0, x0 = y0 + top, x0 + left
        rgb, alpha = patch[:3], patch[3:]
        window = pair[i, :, y0 : y0 + patch.shape[1], x0 : x0 + patch.shape[2]]
        window[:3].lerp_(rgb, alpha)  # alpha * rgb + (1 - alpha) * image
        window[3:].lerp_(rgb, alpha)

    # 2. + 3. affine jitter and flip (folded into the warp when there is one)
    warped = (u[:, _U_WARP] < cfg.affine_probability) if affine else torch.zeros(n, dtype=torch.bool)
    if warped.any():
        rows = warped.nonzero().flatten().to(pair.device)
        grid = sampling_grid(affine_matrices(u[warped], h, w, cfg, flip[warped]), h, w, dtype=pair.dtype,
                             device=pair.device)
        pair[rows] = F.grid_sample(pair[rows], grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    mirrored = (flip & ~warped).nonzero().flatten().to(pair.device)
    if len(mirrored):
        pair[mirrored] = pair[mirrored].flip(-1)

    # 4. colour jitter: the same colour map on both sides (writes new tensors, clamped to [0, 1])
    if colour:
        matrix, offset = colour_matrices(u, cfg, _gray_mean(pair[:, :3]))
        return apply_colour(pair[:, :3], matrix, offset), apply_colour(pair[:, 3:], matrix, offset)
    # bilinear weights sum to 1 only up to rounding
    return pair[:, :3].clamp(0, 1), pair[:, 3:].clamp(0, 1)


def _check_pair(source: torch.Tensor, target: torch.Tensor) -> None:
    for name, x in (("source", source), ("target", target)):
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float N x 3 x H x W tensor, got {tuple(x.shape)} {x.dtype}")
    if source.shape != target.shape or source.dtype != target.dtype or source.device != target.device:
        raise ValueError(f"source and target differ: {tuple(source.shape)} {source.dtype} {source.device} vs "
                         f"{tuple(target.shape)} {target.dtype} {target.device}")
    if min(source.shape[2:]) < 2:
        raise ValueError(f"crops must be at least 2 x 2 pixels, got {tuple(source.shape[2:])}")


def _uniform(u: torch.Tensor, col: int, half_range: float) -> torch.Tensor:
    """Column `col` of the uniforms mapped to [-half_range, half_range]."""
    return (2 * u[:, col] - 1) * half_range


def occluder_choices(u: torch.Tensor, cfg: AugmentConfig) -> list[tuple[int, str]]:
    """(pair index, occluder kind) for the pairs that get an occluder."""
    if cfg.occluder_probability <= 0 or not cfg.occluders:
        return []
    kinds = cfg.occluders
    return [
        (i, kinds[min(int(u[i, _U_KIND] * len(kinds)), len(kinds) - 1)])
        for i in range(u.shape[0])
        if u[i, _U_OCCLUDE] < cfg.occluder_probability
    ]


def affine_matrices(u: torch.Tensor, h: int, w: int, cfg: AugmentConfig, flip: torch.Tensor) -> torch.Tensor:
    """N x 2 x 3 float64 forward maps (input pixel -> output pixel, pixel centres at integers): rotation by up to
    +-cfg.rotate_deg and zoom by up to +-cfg.scale about the crop centre, shift by up to +-cfg.translate of the
    size, then a mirror for the rows of `flip`."""
    n = u.shape[0]
    centre = torch.tensor([[(w - 1) / 2, (h - 1) / 2]], dtype=torch.float64).expand(n, 2)
    angle = _uniform(u, _U_ANGLE, cfg.rotate_deg)
    zoom = (1 + _uniform(u, _U_SCALE, cfg.scale)).clamp(min=1e-3)
    m = get_rotation_matrix2d(centre.contiguous(), angle, zoom[:, None].expand(n, 2).contiguous()).clone()
    m[:, 0, 2] += _uniform(u, _U_TX, cfg.translate) * w
    m[:, 1, 2] += _uniform(u, _U_TY, cfg.translate) * h
    mirrored = m.clone()
    mirrored[:, 0] = -m[:, 0]
    mirrored[:, 0, 2] += w - 1  # x -> (w - 1) - x after the jitter
    return torch.where(flip[:, None, None], mirrored, m)


def sampling_grid(matrices: torch.Tensor, h: int, w: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """N x H x W x 2 grid for F.grid_sample(align_corners=True) of the forward maps `matrices` (N x 2 x 3): each
    output pixel's position in the input, normalized to [-1, 1]. Built by broadcasting the inverse map (what
    F.affine_grid does with a batched matmul, several times slower on a CPU)."""
    a = matrices[:, :, :2].to(torch.float64)
    inv = torch.linalg.inv(a)
    shift = -(inv @ matrices[:, :, 2:].to(torch.float64))[..., 0]
    norm = torch.tensor([2 / (w - 1), 2 / (h - 1)], dtype=torch.float64)
    coef = torch.cat([inv * norm[None, :, None], (shift * norm - 1)[..., None]], dim=2).to(dtype)  # N x 2 x 3
    xs = torch.arange(w, dtype=dtype)
    ys = torch.arange(h, dtype=dtype)
    grid = torch.empty(matrices.shape[0], h, w, 2, dtype=dtype)
    for k in range(2):
        along_x = coef[:, k, 0, None, None] * xs[None, None, :]  # N x 1 x W
        along_y = coef[:, k, 1, None, None] * ys[None, :, None] + coef[:, k, 2, None, None]  # N x H x 1
        torch.add(along_x, along_y, out=grid[..., k])
    return grid.to(device)


def _gray_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean of kornia's grey (N,), as float64."""
    return x.mean(dim=(2, 3)).to(device="cpu", dtype=torch.float64) @ torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)


def hue_matrix(turns: torch.Tensor) -> torch.Tensor:
    """N x 3 x 3 RGB maps turning the hue by `turns` (N,) of a full turn: a rotation of the YIQ chroma plane, in
    the direction of kornia.enhance.adjust_hue (red towards yellow for a positive shift); greys stay put."""
    theta = -2 * math.pi * turns.to(torch.float64)
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(turns.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return torch.from_numpy(_YIQ_TO_RGB) @ rot @ torch.from_numpy(_RGB_TO_YIQ)


def colour_matrices(u: torch.Tensor, cfg: AugmentConfig, gray_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x 3 x 3, N) float64: colour jitter as out = matrix @ rgb + offset, composing kornia's brightness
    (multiply by [1-b, 1+b]), contrast (about the grey mean, factor [1-c, 1+c]), saturation (towards the grey,
    factor [1-s, 1+s]) and hue ([-h, h] turns), in that order. `gray_mean`: the images' grey means (N,)."""
    n = u.shape[0]
    bright = (1 + _uniform(u, _U_BRIGHT, cfg.brightness)).clamp(min=0)
    contrast = (1 + _uniform(u, _U_CONTRAST, cfg.contrast)).clamp(min=0)
    sat = (1 + _uniform(u, _U_SAT, cfg.saturation)).clamp(min=0)
    gray = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    saturation = sat[:, None, None] * eye + (1 - sat)[:, None, None] * gray.expand(3, 3)  # rows: s * e_i + (1-s) * w
    matrix = hue_matrix(_uniform(u, _U_HUE, cfg.hue)) @ saturation * (bright * contrast)[:, None, None]
    # contrast pivots on the grey mean after brightness; a grey offset passes saturation and hue unchanged
    offset = (1 - contrast) * bright * gray_mean.to(torch.float64)
    return matrix, offset


def apply_colour(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """clamp(matrix @ rgb + offset, 0, 1) per image, as a new contiguous tensor: x N x 3 x H x W (a channel slice
    of a wider tensor is fine: no copy), matrix N x 3 x 3, offset (N,)."""
    n, _, h, w = x.shape
    m = matrix.to(device=x.device, dtype=x.dtype)
    b = offset.to(device=x.device, dtype=x.dtype)[:, None, None].expand(n, 3, 1)
    return torch.baddbmm(b, m, x.reshape(n, 3, h * w)).clamp_(0, 1).view(n, 3, h, w)


# ---------------------------------------------------------------------------------------------------- occluders
def preview_grid(images: torch.Tensor, gen: torch.Generator, margin: float = faces.DEFAULT_MARGIN,
                 cfg: AugmentConfig | None = None) -> np.ndarray:
    """uint8 H x W x 3 grid to eyeball the augmentation: per face (N x 3 x S x S float), a row of the face, each
    occluder kind pasted on it, and two full augmentations with `cfg` (default: AugmentConfig())."""
    cfg = cfg or AugmentConfig()
    rows = []
    for face in images:
        tiles = [face]
        for kind in OCCLUDERS:
            layer = draw_occluder(kind, face.shape[-1], gen, margin)
            tiles.append(torch.lerp(face, layer[:3], layer[3:]))
        for _ in range(2):
            tiles.append(augment_pairs(face[None], face[None], cfg, gen, margin)[0][0])
        rows.append(torch.cat(tiles, dim=2))
    grid = torch.cat(rows, dim=1)
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fxassets.train.augment", description="Preview the occluders and the augmentation.")
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("faces", nargs="+", help="aligned face crops (square PNGs)")
    parser.add_argument("--margin", type=float, default=faces.DEFAULT_MARGIN, help="the crops' framing margin")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fxassets.core.images import read_png_rgb

    images = torch.stack([torch.from_numpy(read_png_rgb(p)).permute(2, 0, 1).float() / 255 for p in args.faces])
    grid = preview_grid(images, torch.Generator().manual_seed(args.seed), args.margin)
    cv2.imwrite(args.output, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    _main()
