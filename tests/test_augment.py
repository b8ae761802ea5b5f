"""fxassets.train.augment: one random transform on both sides of a pair, all randomness from the generator passed in,
occluders where a face has eyes and a mouth, and the fast warp / colour map checked against kornia's own ops."""

from __future__ import annotations

import math

import kornia.enhance as KE
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine

from fxassets.faces import align as faces
from fxassets.core.config import OCCLUDERS
from fxassets.train.augment import affine_matrices, apply_colour, augment_pairs, colour_matrices, hue_matrix, sampling_grid
from fxassets.train.occluders import draw_occluder
from fxassets.core.config import AugmentConfig

torch.set_num_threads(1)

OFF = AugmentConfig(flip=False, rotate_deg=0, scale=0, translate=0, brightness=0, contrast=0, saturation=0, hue=0,
                    occluder_probability=0)
STRONG = AugmentConfig(flip=True, rotate_deg=15, scale=0.15, translate=0.08, brightness=0.3, contrast=0.3,
                       saturation=0.3, hue=0.05, occluder_probability=0.5, affine_probability=1.0)
MARGIN = faces.DEFAULT_MARGIN


def faces_like(n: int = 4, size: int = 96, seed: int = 0) -> torch.Tensor:
    """Smooth, asymmetric, coloured images in [0.1, 0.9] (no two alike, none mirror-symmetric)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        f = torch.rand(3, 4, generator=g) * 6 + 1
        ph = torch.rand(3, 2, generator=g) * 6
        img = torch.stack([torch.sin(f[c, 0] * x + ph[c, 0]) * torch.cos(f[c, 1] * y + ph[c, 1]) * 0.25
                           + 0.15 * torch.sin(f[c, 2] * x * y + f[c, 3] * x) for c in range(3)])
        out.append(0.5 + img + 0.1 * x)  # the ramp breaks left-right symmetry
    return torch.stack(out).clamp(0.1, 0.9)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ both sides alike


def test_identical_sides_stay_identical():
    src = faces_like()
    out_s, out_t = augment_pairs(src, src.clone(), STRONG.model_copy(update={"occluder_probability": 1.0}), gen(1))
    assert torch.equal(out_s, out_t)
    assert not torch.allclose(out_s, src, atol=1e-2)  # something did happen


def test_pixelwise_map_commutes_with_the_geometry():
    """target = 1 - source: with the colour jitter and occluders off, the warp and flip must be the same on both
    sides, so out_target = 1 - out_source (up to float rounding; bilinear weights sum to 1)."""
    src = faces_like(8)
    cfg = STRONG.model_copy(update={"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "occluder_probability": 0})
    out_s, out_t = augment_pairs(src, 1 - src, cfg, gen(2))
    assert (out_s - src).abs().amax() > 0.1  # warped
    torch.testing.assert_close(out_t, 1 - out_s, atol=1e-5, rtol=0)


def test_one_occluder_same_pixels_on_both_sides():
    """source all 0, target all 1: out_s = a * c, out_t = a * c + (1 - a), so 1 - (out_t - out_s) recovers the
    occluder's alpha; the same on every channel (one alpha), zero where there is no occluder."""
    n, size = 6, 128
    cfg = OFF.model_copy(update={"occluder_probability": 1.0})
    out_s, out_t = augment_pairs(torch.zeros(n, 3, size, size), torch.ones(n, 3, size, size), cfg, gen(3), margin=MARGIN)
    alpha = 1 - (out_t - out_s)
    torch.testing.assert_close(alpha, alpha[:, :1].expand_as(alpha), atol=1e-5, rtol=0)
    coverage = (alpha[:, 0] > 0.05).float().mean(dim=(1, 2))
    assert ((coverage > 0.01) & (coverage < 0.4)).all(), coverage
    assert (alpha.amin(dim=(1, 2, 3)) >= -1e-6).all() and (alpha.amax(dim=(1, 2, 3)) > 0.9).all()


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_output_whatever_the_global_rng():
    src, tgt = faces_like(4), faces_like(4, seed=9)
    state = torch.get_rng_state()
    torch.manual_seed(123)
    a = augment_pairs(src, tgt, STRONG, gen(5))
    torch.manual_seed(456)
    b = augment_pairs(src, tgt, STRONG, gen(5))
    c = augment_pairs(src, tgt, STRONG, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    augment_pairs(src, tgt, STRONG, gen(5))
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is neither used nor advanced
    torch.set_rng_state(state)


def test_draw_occluder_is_deterministic():
    for kind in OCCLUDERS:
        assert torch.equal(draw_occluder(kind, 64, gen(7)), draw_occluder(kind, 64, gen(7)))
        assert not torch.equal(draw_occluder(kind, 64, gen(7)), draw_occluder(kind, 64, gen(8)))


# ------------------------------------------------------------------------------------------- configs


def test_everything_off_returns_the_inputs_unchanged():
    src, tgt = faces_like(3), faces_like(3, seed=4)
    src0, tgt0 = src.clone(), tgt.clone()
    out_s, out_t = augment_pairs(src, tgt, OFF, gen(0))
    assert torch.equal(out_s, src) and torch.equal(out_t, tgt)
    assert out_s.data_ptr() != src.data_ptr() and out_t.data_ptr() != tgt.data_ptr()  # copies


def test_inputs_are_never_modified():
    src, tgt = faces_like(4), faces_like(4, seed=4)
    src0, tgt0 = src.clone(), tgt.clone()
    for cfg in (STRONG.model_copy(update={"occluder_probability": 1.0}), OFF.model_copy(update={"flip": True})):
        augment_pairs(src, tgt, cfg, gen(0))
        assert torch.equal(src, src0) and torch.equal(tgt, tgt0)


def test_flip_only_gives_the_input_or_its_mirror_and_both_occur():
    src = faces_like(32, size=32)
    tgt = 1 - src
    out_s, out_t = augment_pairs(src, tgt, OFF.model_copy(update={"flip": True}), gen(11))
    flipped = []
    for i in range(len(src)):
        same, mirror = torch.equal(out_s[i], src[i]), torch.equal(out_s[i], src[i].flip(-1))
        assert same != mirror  # the images are not symmetric, so exactly one holds
        assert torch.equal(out_t[i], tgt[i].flip(-1) if mirror else tgt[i])  # the target follows its source
        flipped.append(mirror)
    assert 0 < sum(flipped) < len(flipped)


@pytest.mark.parametrize("p", [0.0, 0.25, 1.0])
def test_affine_probability_leaves_the_other_pairs_sharp(p):
    """Only a share `affine_probability` of the pairs is warped (resampled); the rest come back exactly, or exactly
    mirrored, on both sides."""
    n = 64
    src = faces_like(n, size=32)
    cfg = OFF.model_copy(update={"flip": True, "rotate_deg": 10, "scale": 0.1, "translate": 0.05,
                                 "affine_probability": p})
    out_s, out_t = augment_pairs(src, 1 - src, cfg, gen(12))
    exact = [torch.equal(out_s[i], src[i]) or torch.equal(out_s[i], src[i].flip(-1)) for i in range(n)]
    for i in range(n):
        if exact[i]:
            assert torch.equal(out_t[i], 1 - out_s[i])  # the target follows its source exactly
    torch.testing.assert_close(out_t, 1 - out_s, atol=1e-5, rtol=0)  # warped pairs alike on both sides too
    warped = n - sum(exact)
    if p == 0.0:
        assert warped == 0
    elif p == 1.0:
        assert warped == n
    else:
        assert 0.1 * n <= warped <= 0.45 * n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_range_shape_dtype(dtype):
    src = faces_like(6, size=64).to(dtype)
    tgt = (src ** 2).clamp(0, 1)
    src[0, :, :8] = 1.0  # saturated regions: the colour jitter must clamp
    tgt[1, :, :8] = 0.0
    out_s, out_t = augment_pairs(src, tgt, STRONG.model_copy(update={"brightness": 0.9, "contrast": 0.9}), gen(12))
    for out in (out_s, out_t):
        assert out.shape == src.shape and out.dtype == dtype
        assert out.min() >= 0 and out.max() <= 1


def test_non_square_crops_get_the_centre_of_the_square_occluder():
    cfg = OFF.model_copy(update={"occluder_probability": 1.0, "occluders": ("sunglasses",)})
    _, full = augment_pairs(torch.ones(1, 3, 256, 256), torch.ones(1, 3, 256, 256), cfg, gen(3))
    _, part = augment_pairs(torch.ones(1, 3, 256, 192), torch.ones(1, 3, 256, 192), cfg, gen(3))
    assert part.shape == (1, 3, 256, 192) and not torch.equal(part, torch.ones_like(part))
    assert torch.allclose(part, full[..., 32:224])  # the 256 square's layer, cut to its centre 192 columns


def test_bad_inputs():
    x = faces_like(2, size=32)
    with pytest.raises(ValueError, match="differ"):
        augment_pairs(x, x[:1], STRONG, gen(0))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        augment_pairs(x[:, :1], x[:, :1], STRONG, gen(0))
    with pytest.raises(ValueError, match="unknown occluder"):
        draw_occluder("hat", 32, gen(0))


# ----------------------------------------------------------------------------------------------- occluders


SIZE = 256
POINTS = faces.template(SIZE, MARGIN)
EYE_DIST = float(POINTS[1, 0] - POINTS[0, 0])


def _box_mean(img: torch.Tensor, point: np.ndarray, half: float) -> float:
    x, y, r = int(round(point[0])), int(round(point[1])), max(1, int(round(half)))
    return float(img[..., y - r : y + r + 1, x - r : x + r + 1].mean())


@pytest.mark.parametrize("kind", OCCLUDERS)
def test_occluder_layer_is_sane(kind):
    for seed in range(8):
        layer = draw_occluder(kind, SIZE, gen(seed), MARGIN)
        assert layer.shape == (4, SIZE, SIZE) and layer.dtype == torch.float32
        assert layer.min() >= 0 and layer.max() <= 1
        alpha = layer[3]
        coverage = float((alpha > 0.05).float().mean())
        assert 0.01 < coverage < 0.4, (seed, coverage)
        assert float(alpha.max()) > 0.9  # something opaque: a frame or skin
        assert float(((alpha > 0.2) & (alpha < 0.8)).float().mean()) > 0.001  # soft edges, not a hard cut-out


@pytest.mark.parametrize("kind", ["glasses", "sunglasses"])
def test_glasses_sit_on_the_eyes(kind):
    eye_y = POINTS[0, 1]
    rows = torch.arange(SIZE, dtype=torch.float32)[:, None]
    band = (rows - eye_y).abs() < 0.6 * EYE_DIST
    for seed in range(8):
        alpha = draw_occluder(kind, SIZE, gen(seed), MARGIN)[3]
        assert float((alpha * band).sum() / alpha.sum()) > 0.97  # all of it at the height of the eyes
        centre_x = (POINTS[0, 0] + POINTS[1, 0]) / 2
        outside = torch.ones(SIZE, dtype=torch.bool)
        outside[int(centre_x - 1.5 * EYE_DIST) : int(centre_x + 1.5 * EYE_DIST) + 1] = False
        assert float(alpha[:, outside].sum()) == 0  # nothing beyond the temples' ends
        for eye in POINTS[:2]:
            # a frame ring around each eye: alpha in a box around the eye, but (glasses) not on the pupil itself
            assert _box_mean(alpha, eye, 0.5 * EYE_DIST) > 0.1
            if kind == "glasses":
                assert _box_mean(alpha, eye, 0.1 * EYE_DIST) < 0.3
            else:
                assert _box_mean(alpha, eye, 0.1 * EYE_DIST) > 0.7


def test_sunglasses_darker_than_glasses():
    grey = torch.full((3, SIZE, SIZE), 0.6)
    for seed in range(8):
        looks = {}
        for kind in ("glasses", "sunglasses"):
            layer = draw_occluder(kind, SIZE, gen(seed), MARGIN)
            out = torch.lerp(grey, layer[:3], layer[3:])
            looks[kind] = np.mean([_box_mean(out, eye, 0.12 * EYE_DIST) for eye in POINTS[:2]])
        assert looks["sunglasses"] < 0.3 < 0.5 < looks["glasses"], looks


def test_hand_covers_the_lower_face():
    nose_y, eye_y = POINTS[2, 1], POINTS[0, 1]
    mouth = POINTS[3]
    for seed in range(12):
        layer = draw_occluder("hand", SIZE, gen(seed), MARGIN)
        alpha = layer[3]
        total = float(alpha.sum())
        assert float(alpha[int(nose_y) :].sum()) / total > 0.5  # mostly below the nose tip
        assert float(alpha[: int(eye_y)].sum()) / total < 0.15  # hardly above the eyes
        region = alpha[int(mouth[1] - 0.5 * EYE_DIST) : int(mouth[1] + 0.5 * EYE_DIST),
                       int(mouth[0] - 1.2 * EYE_DIST) : int(mouth[0] + 1.2 * EYE_DIST)]
        assert float(region.mean()) > 0.1  # over the mouth and cheeks
        skin = layer[:3][:, alpha > 0.99]
        assert (skin[0] >= skin[2]).float().mean() > 0.95  # skin-toned: red above blue


def test_hand_skin_tones_range_light_to_dark():
    tones = []
    for seed in range(24):
        layer = draw_occluder("hand", 128, gen(seed), MARGIN)
        tones.append(float(layer[:3][:, layer[3] > 0.99].mean()))
    assert min(tones) < 0.35 and max(tones) > 0.6, tones


# ----------------------------------------------------------------------------- the fast paths against kornia


def test_warp_matches_kornia_warp_affine():
    x = faces_like(6, size=48)
    u = torch.rand(6, 11, generator=gen(13), dtype=torch.float64)
    flip = torch.tensor([True, False, True, False, False, True])
    m = affine_matrices(u, 48, 48, STRONG, flip)
    ours = F.grid_sample(x, sampling_grid(m, 48, 48), mode="bilinear", padding_mode="reflection", align_corners=True)
    theirs = warp_affine(x, m.float(), (48, 48), mode="bilinear", padding_mode="reflection", align_corners=True)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    # the flip rows are the mirror of the same jitter without the flip
    plain = warp_affine(x, affine_matrices(u, 48, 48, STRONG, torch.zeros(6, dtype=torch.bool)).float(), (48, 48),
                        padding_mode="reflection", align_corners=True)
    torch.testing.assert_close(ours[flip], plain[flip].flip(-1), atol=2e-4, rtol=0)


def test_colour_matches_kornia_colour_ops():
    """Brightness, contrast and saturation are kornia's formulas exactly (no clamping on these mid-range images)."""
    x = (faces_like(6, size=32) - 0.5) * 0.5 + 0.5  # within [0.3, 0.7]: no step clips
    u = torch.rand(6, 11, generator=gen(14), dtype=torch.float64)
    cfg = AugmentConfig(brightness=0.2, contrast=0.2, saturation=0.3, hue=0.0)
    gray = (x.double().mean(dim=(2, 3)) @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64))
    m, o = colour_matrices(u, cfg, gray)
    b = 1 + (2 * u[:, 7] - 1) * 0.2
    c = 1 + (2 * u[:, 8] - 1) * 0.2
    s = 1 + (2 * u[:, 9] - 1) * 0.3
    ref = KE.adjust_brightness_accumulative(x, b.float())
    ref = KE.adjust_contrast_with_mean_subtraction(ref, c.float())
    ref = KE.adjust_saturation_with_gray_subtraction(ref, s.float())
    torch.testing.assert_close(apply_colour(x, m, o), ref, atol=1e-5, rtol=0)


def test_hue_turn():
    """The hue is a turn of the YIQ chroma plane (not kornia's HSV shift, which keeps each pixel's max and min):
    greys and luma stay, the chroma angle turns by the asked share of a full turn, red goes towards yellow for a
    positive shift as with kornia.enhance.adjust_hue."""
    turns = torch.tensor([0.05, -0.05, 0.25], dtype=torch.float64)
    m = hue_matrix(turns)
    grey = torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64)
    torch.testing.assert_close(m @ grey, grey.expand(3, 3))
    rgb = torch.tensor([0.8, 0.3, 0.2], dtype=torch.float64)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]], dtype=torch.float64)
    before, after = yiq @ rgb, (yiq @ (m @ rgb).T).T
    torch.testing.assert_close(after[:, 0], before[0].expand(3))  # luma
    torch.testing.assert_close(after[:, 1:].norm(dim=1), before[1:].norm().expand(3))  # chroma
    angle = torch.atan2(after[:, 2], after[:, 1]) - torch.atan2(before[2], before[1])
    torch.testing.assert_close(angle, -2 * math.pi * turns)
    kornia_red = KE.adjust_hue(rgb.float().view(1, 3, 1, 1), 2 * math.pi * 0.05).flatten()
    ours_red = (m[0] @ rgb).float()
    assert kornia_red[1] > rgb[1] and ours_red[1] > rgb[1]  # green up: red towards yellow
    ratio = (ours_red - rgb.float()).norm() / (kornia_red - rgb.float()).norm()
    assert 0.5 < ratio < 2  # about as big a change as kornia's


# -- capture simulation (fxassets.train.capture) ----------------------------------------------------------------


def test_capture_simulation_degrades_the_source_and_keeps_a_grey_target_grey():
    from fxassets.train.capture import is_grey, simulate_capture

    torch.manual_seed(0)
    src = torch.rand(6, 3, 64, 64)
    colour_tgt = torch.rand(6, 3, 64, 64)
    grey_tgt = src.mean(1, keepdim=True).expand(6, 3, 64, 64).clone()
    off = AugmentConfig()
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    a, b = simulate_capture(src, grey_tgt, off, gen)
    assert a is src and b is grey_tgt and torch.equal(gen.get_state(), state)  # off: nothing drawn, nothing changed
    on = AugmentConfig(capture_probability=1.0)
    a, b = simulate_capture(src, grey_tgt, on, torch.Generator().manual_seed(1))
    assert is_grey(b).all() and not is_grey(a).any()  # the pencil sketch stays grey; the photo changed colour
    assert (a - src).abs().mean() > 0.01 and not torch.equal(b, grey_tgt)  # exposure reaches the grey target too
    a2, b2 = simulate_capture(src, colour_tgt, on, torch.Generator().manual_seed(1))
    gains_src = (a2.mean((2, 3)) / src.mean((2, 3)).clamp(min=1e-6))
    gains_tgt = (b2.mean((2, 3)) / colour_tgt.mean((2, 3)).clamp(min=1e-6))
    assert torch.allclose(gains_src, gains_tgt, atol=0.08)  # a colour target gets the same white balance
    again = simulate_capture(src, colour_tgt, on, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], a2) and torch.equal(again[1], b2)  # deterministic given the generator
