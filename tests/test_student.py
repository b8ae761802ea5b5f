"""The student model and its distillation training, on tiny synthetic pairs (seconds, one core)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from fxassets.core.config import TrainConfig
from fxassets.core.images import write_png
from fxassets.core.metrics import MAX_PSNR, image_scores, l1_ssim_loss
from fxassets.train.student import build_student, count_params, load_student, save_student
from fxassets.train.loop import CURVE_HEADER, lr_factor, train_student

H, W = 72, 80  # not multiples of 32: evaluation pads the full-size held-out crops


def colour_shift(rgb: np.ndarray) -> np.ndarray:
    """An easy teacher: darker, warmer."""
    out = rgb.astype(np.float32) * 0.8 + np.array([30.0, 10.0, -20.0], dtype=np.float32)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def smooth_image(rng: np.random.Generator) -> np.ndarray:
    """Random blobs and a few hard edges, HxWx3 uint8."""
    low = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.float32)
    img = cv2.resize(low, (W, H), interpolation=cv2.INTER_CUBIC)
    x0, y0 = rng.integers(0, W // 2), rng.integers(0, H // 2)
    img[y0 : y0 + H // 3, x0 : x0 + W // 3] = rng.uniform(0, 255, size=3)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pairs(folder: Path, n_train: int = 8, n_held: int = 3, teacher=colour_shift, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_held):
        sid = f"face_{i:03d}"
        src = smooth_image(rng)
        write_png(folder / "source" / f"{sid}.png", src)
        write_png(folder / "target" / f"{sid}.png", teacher(src))
        rows.append({"sample_id": sid, "person_id": f"p{i}", "split": "train" if i < n_train else "heldout",
                     "status": "pass", "reason": "", "source": f"source/{sid}.png", "target": f"target/{sid}.png"})
    # rejected rows have no crops: training must skip them
    rows.append({"sample_id": "face_bad", "person_id": "pbad", "split": "train", "status": "reject",
                 "reason": "no face", "source": "", "target": ""})
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    return folder


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(steps=5, max_seconds=0, batch_size=4, crop=64, lr=3e-3, eval_every=2, seed=0, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def run(pairs: Path, out: Path, cfg: TrainConfig) -> dict:
    return train_student(pairs, cfg, out / "student.safetensors", out / "metrics.json", out / "curve.csv",
                         progress=False)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("student")
    return out, run(pairs, out, tiny_cfg())


def test_model_shape_range_and_identity_start():
    torch.manual_seed(0)
    model = build_student().eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # the last layer starts at zero: a fresh student is the identity
    assert torch.equal(y, x)
    assert 0.2e6 < count_params(model) < 3e6


def test_width_changes_decoder():
    assert count_params(build_student(width=0.5)) < count_params(build_student(width=1.0))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_student(width=0.5, head_blocks=0)  # the architecture beyond encoder/width travels in the meta
    with torch.no_grad():  # perturb so the head is not zero
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    path = tmp_path / "s.safetensors"
    save_student(model, path, {"crop_size": [64, 64], "note": "x", "width": 2.0})  # the model's own width wins
    loaded, meta = load_student(path)
    assert not loaded.training
    assert meta["width"] == 0.5 and meta["encoder"] == "mobilenetv4_conv_small_050" and meta["crop_size"] == [64, 64]
    assert meta["arch"]["head_blocks"] == 0 and meta["note"] == "x"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temp left behind


def test_training_writes_outputs(trained):
    out, metrics = trained
    keys = {"heldout_psnr", "heldout_ssim", "identity_psnr", "identity_ssim", "steps", "params",
            "encoder", "width", "train_pairs", "heldout_pairs"}
    run = {"train_seconds", "resumed_from_step", "cpu"}  # the run's: returned (the run log), not in the output
    on_disk = json.loads((out / "metrics.json").read_text())
    assert keys <= set(on_disk) and on_disk == {k: v for k, v in metrics.items() if k not in run}
    for k in ("heldout_psnr", "heldout_ssim", "identity_psnr", "identity_ssim", "train_seconds"):
        assert math.isfinite(metrics[k])
    assert metrics["steps"] == 5 and metrics["train_pairs"] == 8 and metrics["heldout_pairs"] == 3
    assert metrics["resumed_from_step"] == 0
    assert metrics["planned_steps"] == 5 and metrics["capped"] is False
    assert metrics["cpu"]["model"] and "isa" in metrics["cpu"]  # the machine train_seconds was measured on
    assert TrainConfig().max_seconds == 0  # the default budget is steps only: the machine's speed changes nothing
    lines = (out / "curve.csv").read_text().splitlines()
    assert lines[0] == CURVE_HEADER
    rows = list(csv.DictReader(lines))
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "heldout_psnr", "heldout_ssim"))
    assert float(rows[-1]["heldout_psnr"]) == pytest.approx(metrics["heldout_psnr"], abs=1e-3)
    # the unchanged input's scores beside the student's, the same in every row
    for k in ("identity_psnr", "identity_ssim"):
        assert all(float(r[k]) == pytest.approx(metrics[k], abs=1e-3) for r in rows), k
    with safe_open(str(out / "student.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["crop_size"]) == [H, W]
        assert json.loads(f.metadata()["metrics"]) == on_disk  # no clock in the checkpoint either


def test_checkpoint_bytes_are_the_weights_and_metadata_alone(trained, tmp_path):
    """safetensors writes its metadata map in hash order, new for every map: saved again, the same bytes."""
    out, _ = trained
    model, meta = load_student(out / "student.safetensors")
    for name in ("a", "b", "c"):
        save_student(model, tmp_path / name, meta)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes() == (tmp_path / "c").read_bytes()


def test_checkpoint_loads_and_runs(trained):
    out, _ = trained
    model, meta = load_student(out / "student.safetensors")
    assert meta["metrics"]["steps"] == 5
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


@pytest.mark.parametrize("max_seconds", [0.0, 3600.0])  # a time cap the steps finish within changes nothing
def test_same_seed_same_weights(pairs, tmp_path, max_seconds):
    a = run(pairs, tmp_path / "a", tiny_cfg(steps=3, eval_every=100, max_seconds=max_seconds))
    b = run(pairs, tmp_path / "b", tiny_cfg(steps=3, eval_every=100, max_seconds=max_seconds))
    assert a["heldout_psnr"] == b["heldout_psnr"]
    with safe_open(str(tmp_path / "a" / "student.safetensors"), framework="pt") as fa, \
            safe_open(str(tmp_path / "b" / "student.safetensors"), framework="pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k


def test_time_budget_stops_early(pairs, tmp_path):
    metrics = run(pairs, tmp_path, tiny_cfg(steps=100_000, max_seconds=1.0, eval_every=1000))
    assert 1 <= metrics["steps"] < 100_000
    assert metrics["train_seconds"] < 30
    assert metrics["capped"] is True and metrics["planned_steps"] == 100_000  # recorded, and printed by the report


def test_learns_an_easy_teacher(pairs, tmp_path):
    metrics = run(pairs, tmp_path, tiny_cfg(steps=60, batch_size=8, eval_every=1000))
    assert metrics["heldout_psnr"] > metrics["identity_psnr"] + 3.0, metrics
    assert metrics["heldout_ssim"] > metrics["identity_ssim"], metrics


@pytest.mark.parametrize("missing", ["train", "heldout"])
def test_no_pairs_in_a_split(tmp_path, missing):
    folder = make_pairs(tmp_path / "pairs", n_train=2, n_held=2)
    df = pd.read_parquet(folder / "manifest.parquet")
    df.loc[df["split"] == missing, "status"] = "reject"
    df.to_parquet(folder / "manifest.parquet", index=False)
    with pytest.raises(ValueError, match=r"manifest\.parquet.*" + ("training" if missing == "train" else "held-out")):
        run(folder, tmp_path / "out", tiny_cfg())
    assert not (tmp_path / "out" / "student.safetensors").exists()


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        run(tmp_path, tmp_path / "out", tiny_cfg())


def test_crop_larger_than_pairs(pairs, tmp_path):
    with pytest.raises(ValueError, match="train.crop"):
        run(pairs, tmp_path, tiny_cfg(crop=128))


def test_lr_schedule_warms_up_and_decays():
    assert lr_factor(0.0) < 0.1
    assert lr_factor(0.03) == pytest.approx(1.0)
    assert 0.4 < lr_factor(0.5) < 0.6
    assert lr_factor(1.0) == pytest.approx(0.0, abs=1e-9)


def test_metrics():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32)
    same = image_scores(a, a.clone())
    assert same["psnr"] == MAX_PSNR and same["ssim"] == pytest.approx(1.0, abs=1e-4)
    b = (a + 0.1).clamp(0, 1)
    mse = float(((a - b) ** 2).flatten(1).mean(1)[0])
    assert image_scores(a[:1], b[:1])["psnr"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-3)
    assert float(l1_ssim_loss(a, a, 1.0, 0.5)) == pytest.approx(0.0, abs=1e-4)
    assert float(l1_ssim_loss(a, b, 1.0, 0.0)) == pytest.approx(float((a - b).abs().mean()), abs=1e-6)


def test_count_macs():
    from fxassets.train.student import count_macs

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, size=16) == 3 * 8 * 9 * 16 * 16
    small, big = build_student(width=0.5), build_student(width=1.0)
    assert 0 < count_macs(small, size=64) < count_macs(big, size=64)
    assert big.training  # left in the mode it was in


def test_random_batch_augments_both_sides_alike():
    from fxassets.core.config import AugmentConfig
    from fxassets.train.loop import PairSet, random_batch

    torch.manual_seed(0)
    src = (torch.rand(3, 3, 64, 64) * 255).to(torch.uint8)
    same = PairSet(src, src.clone(), ["a", "b", "c"])
    cfg = AugmentConfig(occluder_probability=1.0)
    a, b = random_batch(same, 4, 32, torch.Generator().manual_seed(1), cfg)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)  # one transform for both sides, then one window
    plain, _ = random_batch(same, 4, 64, torch.Generator().manual_seed(1), None)  # flips only, whole crops
    full, _ = random_batch(same, 4, 64, torch.Generator().manual_seed(1), cfg)
    originals = [src[i].float() / 255 for i in range(3)] + [src[i].flip(-1).float() / 255 for i in range(3)]
    assert all(any(torch.equal(p, o) for o in originals) for p in plain)
    assert not any(torch.equal(p, o) for p in full for o in originals)  # occluders and jitter changed every sample


def test_capture_share_sets_how_many_simulated_captures_a_batch_holds():
    """train.capture_share: each drawn pair is a simulated capture's with that probability; None draws uniformly
    (the generator's stream as before the setting existed)."""
    from fxassets.train.loop import PairSet, draw

    ids = ["p1", "p1-cap1", "p1-cap2", "p2", "p2-cap1", "p2-cap2"]
    pairs = PairSet(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), torch.zeros(6, 3, 4, 4, dtype=torch.uint8), ids)
    caps = lambda idx: [ids[i].count("-cap") for i in idx.tolist()]
    assert caps(draw(pairs, 200, torch.Generator().manual_seed(0), 1.0)) == [1] * 200
    assert caps(draw(pairs, 200, torch.Generator().manual_seed(0), 0.0)) == [0] * 200
    half = sum(caps(draw(pairs, 2000, torch.Generator().manual_seed(0), 0.5))) / 2000
    assert 0.45 < half < 0.55  # uniform would give 2/3
    assert torch.equal(draw(pairs, 50, torch.Generator().manual_seed(3)), torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(3)))


def test_inference_form_gives_the_same_outputs_with_fewer_ops():
    from fxassets.train.student import LowResFuse, UpStage, inference_form

    torch.manual_seed(3)
    model = build_student(blocks=1)
    model.train()
    for _ in range(2):  # BatchNorm statistics away from their init, so the folding has something to fold
        model(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    fast = inference_form(model)
    assert all(isinstance(getattr(fast, n), LowResFuse) for n in ("up16", "up8", "up4", "up2"))
    assert isinstance(model.up2, UpStage) and not fast.training  # the original is untouched
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        ref, out = model(x), fast(x)
    assert torch.allclose(ref, out, atol=1e-5) and not torch.equal(ref, x)


@pytest.mark.parametrize("encoder", ["mobilenetv3_large_100", "mobilenetv2_100", "mobilenetv3_small_100"])
def test_other_timm_encoders(encoder):
    model = build_student(encoder, width=0.5).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == x.shape


def test_encoder_weights_from_a_local_file(tmp_path):
    import timm

    torch.manual_seed(5)
    full = timm.create_model("mobilenetv3_small_100", pretrained=False)
    path = tmp_path / "enc.pth"
    torch.save(full.state_dict(), path)
    model = build_student("mobilenetv3_small_100", encoder_weights=path)
    assert torch.equal(model.encoder.conv_stem.weight, full.conv_stem.weight)
    assert not torch.equal(build_student("mobilenetv3_small_100").encoder.conv_stem.weight, full.conv_stem.weight)
    with pytest.raises(FileNotFoundError, match="train.encoder_weights"):
        build_student(encoder_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="encoder_weights"):  # another model's weights
        build_student("mobilenetv2_100", encoder_weights=path)


def test_output_colour_map_starts_as_identity_folds_exactly_and_makes_grey_from_any_colour(tmp_path):
    """train.colour_transform: a 3x3 map of the output.  It starts as the identity; once it is a grey projection
    the student's output is grey for any input colour (the property the pencil sketch needs on new captures); the
    exported form (the map folded into an input 1x1 conv and the head) gives the same outputs, in ONNX too."""
    from fxassets.export.onnx_export import export_onnx
    from fxassets.train.student import inference_form

    torch.manual_seed(4)
    model = build_student(colour=True, upsample="bilinear").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), x)
        model.head[-1].weight.normal_(0, 0.05)
        model.colour.weight.copy_(torch.tensor([0.299, 0.587, 0.114]).repeat(3, 1)[:, :, None, None])
        model.colour.bias.fill_(0.01)
        y = model(x)
        folded = inference_form(model)
        z = folded(x)
    assert (y - y.mean(1, keepdim=True)).abs().max() < 1e-6 and not torch.equal(y, x)  # grey, and not the input
    assert torch.allclose(y, z, atol=1e-5) and folded.colour_folded and not model.colour_folded
    onnx_path = tmp_path / "s.onnx"
    export_onnx(model, onnx_path, size=64)
    import onnxruntime as ort

    out = ort.InferenceSession(str(onnx_path)).run(None, {"image": x[:1].numpy()})[0]
    assert abs(out - y[:1].numpy()).max() < 1e-4
    # the map of the input is a MatMul (ONNX Runtime's 1x1 Conv of 3 channels at full resolution cost +15 % of the
    # int8 time), and keep_float: [input] keeps it, the residual add and the clamp in float
    import onnx

    from fxassets.export.quantize import float_end_nodes, quantize_int8

    graph = onnx.load(str(onnx_path)).graph
    convs_on_image = [n for n in graph.node if n.op_type == "Conv" and "image" in n.input]
    assert len(convs_on_image) == 1  # the encoder's stem only
    kept = float_end_nodes(onnx.load(str(onnx_path)), ["input"])
    ops = {n.name: n.op_type for n in graph.node}
    assert {"MatMul", "Add", "Clip"} <= {ops[n] for n in kept} and "DepthToSpace" not in {ops[n] for n in kept}
    int8 = tmp_path / "s.int8.onnx"
    quantize_int8(onnx_path, int8, [np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)] * 2,
                  keep_float=["input"], preprocess=False)
    q = onnx.load(str(int8)).graph
    matmul = next(n for n in q.node if n.op_type == "MatMul")
    producers = {o: n.op_type for n in q.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in matmul.input)  # float in, float out


def grey_teacher(rgb: np.ndarray) -> np.ndarray:
    """A teacher that removes colour, as the pencil sketch does."""
    g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return np.repeat((255 - g // 2)[..., None], 3, axis=2)


def test_a_grey_teacher_gets_a_student_whose_output_is_grey_for_any_colour(tmp_path):
    """train.grey_output: auto: every target grey (a pencil sketch) -> the trained output colour map is projected to
    grey, so the student's output is grey for inputs of any colour, not only the studio's; a colour teacher keeps a
    colour student."""
    grey_pairs = make_pairs(tmp_path / "grey", teacher=grey_teacher)
    metrics = run(grey_pairs, tmp_path / "g", tiny_cfg(grey_output="auto"))
    assert metrics["grey_output"] is True
    model, _ = load_student(tmp_path / "g" / "student.safetensors")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert (y - y.mean(1, keepdim=True)).abs().max() < 1e-5 and not torch.equal(y, x)
    assert run(make_pairs(tmp_path / "colour"), tmp_path / "c", tiny_cfg(grey_output="auto"))["grey_output"] is False
    assert run(grey_pairs, tmp_path / "off", tiny_cfg(grey_output=False))["grey_output"] is False


def test_the_grey_projection_after_training_only_brings_a_grey_teachers_student_closer(tmp_path):
    """The same training (seed, colour map) with and without the projection at the end: on grey targets the
    projected student scores at least as well on the held-out pairs, and its output carries no colour."""
    pairs = make_pairs(tmp_path / "grey", teacher=grey_teacher)
    colour = run(pairs, tmp_path / "colour", tiny_cfg(colour_transform=True, grey_output=False))
    grey = run(pairs, tmp_path / "proj", tiny_cfg(colour_transform=True, grey_output=True))
    assert grey["grey_output"] is True and grey["heldout_psnr"] >= colour["heldout_psnr"]
    model, _ = load_student(tmp_path / "proj" / "student.safetensors")
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 64))
    assert (y - y.mean(1, keepdim=True)).abs().max() < 1e-5


@pytest.mark.parametrize("kernel, conv_kernel, reach", [(1, 3, 2), (3, 3, 6), (3, 1, 6)])
def test_head_kernel_sets_how_far_one_half_resolution_feature_reaches_and_folds_exactly(kernel, conv_kernel, reach):
    """train.head_kernel: with 1 the four sub-pixels of each pixel shuffle block come from that block's feature
    alone (so the change can jump between 2x2 blocks); with 3 a feature reaches its neighbours' blocks too
    (train.head_conv_kernel: the dense conv before it).  A fresh student is the identity either way, and the
    inference form (colour map folded in) gives the same outputs."""
    from fxassets.train.student import inference_form, project_grey

    torch.manual_seed(5)
    model = build_student(upsample="bilinear", colour=True, head_kernel=kernel, head_conv_kernel=conv_kernel).eval()
    assert model.head[0].conv.kernel_size == (conv_kernel, conv_kernel)
    x = torch.rand(1, 3, 64, 64)
    last = model.head[-1]
    with torch.no_grad():
        assert torch.equal(model(x), x)
        last.weight.normal_(0, 0.05)
        f = torch.rand(1, last.in_channels, 8, 8)
        g = f.clone()
        g[..., 4, 4] += 1.0  # one half-resolution feature
        moved = torch.nn.functional.pixel_shuffle(last(g) - last(f), 2)[0].abs().sum(0) > 0  # 16 x 16 output px
    rows, cols = moved.any(1).nonzero(), moved.any(0).nonzero()
    assert int(rows.max() - rows.min() + 1) == reach and int(cols.max() - cols.min() + 1) == reach
    project_grey(model)
    with torch.no_grad():
        y, z = model(x), inference_form(model)(x)
    assert torch.allclose(y, z, atol=1e-5) and not torch.equal(y, x)
