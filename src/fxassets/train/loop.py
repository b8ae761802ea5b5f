"""Distillation: train the student on the teacher's aligned pairs and measure it on held-out people.

Reads a `face_pairs` folder (``manifest.parquet`` + ``source/`` and ``target/`` PNG crops), keeps the rows with
``status == "pass"`` and preloads every pair as uint8 tensors.  Each step draws ``cfg.batch_size`` pairs, augments
them alike on both sides (`fxassets.train.augment`: occluders, affine and colour jitter, flips) and takes one
``cfg.crop`` window of each (the whole face by default).  Loss ``l1_weight * L1 + ssim_weight * (1 - SSIM)`` plus
optional LPIPS and PatchGAN terms (`fxassets.train.losses`), AdamW, linear warm-up then cosine decay.

Training stops after ``cfg.steps`` steps or ``cfg.max_seconds`` seconds (if > 0), whichever comes first.  The
schedule follows the step count; only when the clock runs ahead of it (a slow or busy machine) does it follow the
clock, in whole 2 % steps, so that a time-limited run still ends at a low learning rate while a run that finishes
its steps in time is deterministic (same seed, same weights).  Every ``cfg.eval_every`` steps and at the end the
student is evaluated on the full-size held-out pairs (PSNR/SSIM against the teacher, beside the unchanged input's
scores).  With a state folder, the run is resumable: every ``cfg.checkpoint_every`` steps it writes a checkpoint
there (`fxassets.train.state`) and a restarted run continues from the latest one of the same run.  With
``cfg.workers`` > 1 the same loop runs on Ray Train workers with DDP, each on its slice of every global batch
(`Shard`, `fxassets.train.distributed`).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fxassets.captures import is_variant
from fxassets.core.atomic import write_json, write_text
from fxassets.train.augment import augment_pairs
from fxassets.train.capture import is_grey, simulate_capture
from fxassets.core.machine import cpu_info
from fxassets.core.config import AugmentConfig, TrainConfig
from fxassets.faces.align import DEFAULT_MARGIN
from fxassets.core.images import read_png_rgb
from fxassets.train.losses import Objective
from fxassets.core.metrics import image_scores, quantize
from fxassets.train.student import arch_options, build_student, count_macs, count_params, project_grey, save_student
from fxassets.train.state import Checkpointer, run_key
from fxassets.core.manifest import MANIFEST, read_pairs
STRIDE = 32  # the student needs H and W multiples of this
CLOCK_STEPS = 50  # a clock-driven schedule moves in 2 % steps (see the module docstring)
WARMUP = 0.03  # share of the run spent warming the learning rate up
WEIGHT_DECAY = 1e-4
EVAL_BATCH = 4
FLIPS_ONLY = AugmentConfig(rotate_deg=0, scale=0, translate=0, brightness=0, contrast=0, saturation=0, hue=0,
                           occluder_probability=0)
CURVE_HEADER = "step,train_loss,heldout_psnr,heldout_ssim,identity_psnr,identity_ssim"


# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class PairSet:
    """Aligned pairs in memory: uint8 N x 3 x H x W source (student input) and target (teacher output)."""

    source: torch.Tensor
    target: torch.Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def load_pairs(pairs_dir: Path, rows: pd.DataFrame) -> PairSet:
    """Read the rows' source/target PNGs into two uint8 tensors (all crops must share one size)."""
    pairs_dir = Path(pairs_dir)
    src, tgt = [], []
    for r in rows.itertuples(index=False):
        a = read_png_rgb(pairs_dir / str(r.source))
        b = read_png_rgb(pairs_dir / str(r.target))
        if a.shape != b.shape:
            raise ValueError(f"{pairs_dir}: pair {r.sample_id}: source {a.shape} and target {b.shape} differ in size")
        if src and a.shape != src[0].shape:
            raise ValueError(f"{pairs_dir}: pair {r.sample_id}: size {a.shape} differs from {src[0].shape}")
        src.append(a)
        tgt.append(b)
    if not src:
        return PairSet(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, 3, 0, 0, dtype=torch.uint8), [])

    def stack(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()

    return PairSet(stack(src), stack(tgt), [str(s) for s in rows["sample_id"]])


def draw(pairs: PairSet, batch: int, gen: torch.Generator, capture_share: float | None = None) -> torch.Tensor:
    """`batch` random pair indices; with `capture_share` each is a simulated capture's pair (`faces.capture_variants`)
    with that probability, else a photo's own (None, or a set without both kinds: uniform over the pairs)."""
    n = len(pairs)
    if capture_share is None:
        return torch.randint(0, n, (batch,), generator=gen)
    variant = torch.tensor([is_variant(i) for i in pairs.ids])
    if variant.all() or not variant.any():
        return torch.randint(0, n, (batch,), generator=gen)
    caps, photos = variant.nonzero().flatten(), (~variant).nonzero().flatten()
    pick = torch.rand(batch, generator=gen) < capture_share
    return torch.where(pick, caps[torch.randint(0, len(caps), (batch,), generator=gen)],
                       photos[torch.randint(0, len(photos), (batch,), generator=gen)])


def random_batch(pairs: PairSet, batch: int, crop: int, gen: torch.Generator, augment: AugmentConfig | None = None,
                 margin: float = DEFAULT_MARGIN, capture_share: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random pairs (`draw`), augmented alike on both sides (`fxassets.train.augment`: occluders, affine and
    colour jitter, flips; `augment` None: flips only), then one random crop x crop window each (the same in source
    and target)."""
    n, _, h, w = pairs.source.shape
    idx = draw(pairs, batch, gen, capture_share)
    src, tgt = pairs.source[idx].float().div_(255.0), pairs.target[idx].float().div_(255.0)
    src, tgt = augment_pairs(src, tgt, augment or FLIPS_ONLY, gen, margin=margin)
    if augment is not None and augment.capture_probability > 0:
        src, tgt = simulate_capture(src, tgt, augment, gen)
    if crop >= h and crop >= w:
        return src, tgt
    ys = torch.randint(0, h - crop + 1, (batch,), generator=gen).tolist()
    xs = torch.randint(0, w - crop + 1, (batch,), generator=gen).tolist()
    windows = [(a[:, y : y + crop, x : x + crop], b[:, y : y + crop, x : x + crop])
               for a, b, y, x in zip(src, tgt, ys, xs)]
    return torch.stack([a for a, _ in windows]), torch.stack([b for _, b in windows])


# ----------------------------------------------------------------------------------------------------- evaluation


def pad_to_stride(x: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


@torch.no_grad()
def predict(model: nn.Module, source: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Run the student over uint8 N x 3 x H x W images (any size: padded to a multiple of 32), float [0, 1] out."""
    was_training = model.training
    model.eval()
    out = []
    h, w = source.shape[-2:]
    device = next(model.parameters()).device  # the CPU, or a DDP worker's GPU
    for i in range(0, len(source), batch):
        x = source[i : i + batch].to(device).float().div_(255.0)
        out.append(model(pad_to_stride(x))[..., :h, :w].cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: nn.Module, pairs: PairSet) -> dict[str, float]:
    """PSNR / SSIM of the student (output rounded to 8 bits, as saved) against the teacher target."""
    pred = quantize(predict(model, pairs.source))
    return image_scores(pred, pairs.target.float() / 255.0)


def identity_scores(pairs: PairSet) -> dict[str, float]:
    """The do-nothing baseline: the unchanged input against the teacher target."""
    return image_scores(pairs.source.float() / 255.0, pairs.target.float() / 255.0)


# ------------------------------------------------------------------------------------------------------- training


def lr_factor(progress: float, warmup: float = WARMUP) -> float:
    """Linear warm-up to 1, then cosine decay to 0, over progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    return 0.5 * (1.0 + math.cos(math.pi * (progress - warmup) / (1.0 - warmup)))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def all_grey(pairs: PairSet) -> bool:
    """Whether every target is grey (its channels agree: `train.capture.is_grey`), i.e. the teacher removes colour."""
    return all(bool(is_grey(pairs.target[i : i + 64].float() / 255.0).all()) for i in range(0, len(pairs), 64))


def load_split(pairs_dir: Path, cfg: TrainConfig) -> tuple[PairSet, PairSet]:
    """The passing train and held-out pairs of `pairs_dir`, checked against cfg.crop; ValueError naming the manifest."""
    manifest = Path(pairs_dir) / MANIFEST
    rows = read_pairs(pairs_dir)
    train_rows, held_rows = rows[rows["split"] == "train"], rows[rows["split"] == "heldout"]
    if train_rows.empty:
        raise ValueError(f"{manifest}: no training pairs (status == 'pass' and split == 'train')")
    if held_rows.empty:
        raise ValueError(f"{manifest}: no held-out pairs (status == 'pass' and split == 'heldout')")
    train, held = load_pairs(pairs_dir, train_rows), load_pairs(pairs_dir, held_rows)
    h, w = train.source.shape[-2:]
    if cfg.crop % STRIDE:
        raise ValueError(f"train.crop = {cfg.crop} must be a multiple of {STRIDE}")
    if cfg.crop > min(h, w):
        raise ValueError(f"train.crop = {cfg.crop} is larger than the {w}x{h} pairs in {manifest}")
    return train, held


@dataclass
class Shard:
    """This process's part of a data-parallel run (`train.distributed`): rank `rank` of `world`. Every rank draws the
    whole global batch from the same generator (the stream one worker draws) and trains on its slice; its loss is
    weighted so that DDP's gradient average is the gradient of the global batch's mean loss. Rank 0 evaluates,
    writes the checkpoints and the curve. The default, rank 0 of 1, is the plain one-process run."""

    rank: int = 0
    world: int = 1
    wrap: Any = None  # the model -> the module the steps run (DistributedDataParallel)
    device: Any = None
    reduce: Any = None  # a float loss -> the mean over the ranks
    say: Any = None  # a progress line (rank 0 of a distributed run: the cluster's log, the Dagster run's)

    def bounds(self, batch: int) -> tuple[int, int]:
        base, extra = divmod(batch, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def weight(self, batch: int) -> float:
        a, b = self.bounds(batch)
        return (b - a) * self.world / batch


@dataclass
class FitResult:
    scores: dict[str, float]  # final held-out psnr / ssim
    curve: list[dict[str, float]]  # one row per evaluation: step, train_loss, heldout_*, identity_*, seconds
    steps: int
    seconds: float  # wall-clock of the training loop, evaluations included (before a resume too)
    identity: dict[str, float]  # the unchanged input's held-out psnr / ssim
    resumed_from: int = 0  # the step a resumed run started from (0: a fresh run)


def fit(model: nn.Module, train: PairSet, held: PairSet, cfg: TrainConfig, gen: torch.Generator,
        progress: bool = False,
        objective: Objective | None = None, checkpointer: Checkpointer | None = None,
        margin: float = DEFAULT_MARGIN, shard: Shard | None = None) -> FitResult:
    """The training loop: steps until cfg.steps or cfg.max_seconds, evaluating every cfg.eval_every and at the end;
    resumes from and writes `checkpointer`'s checkpoints, if given. `shard`: this rank of a data-parallel run."""
    shard = shard or Shard()
    lead = shard.rank == 0
    if shard.device is not None:
        model.to(shard.device)
    model.to(memory_format=torch.channels_last).train()
    objective = objective if objective is not None else Objective(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY, fused=True)
    baseline = identity_scores(held)
    resumed = checkpointer.restore(model, opt, objective, gen) if checkpointer is not None else None
    net = shard.wrap(model) if shard.wrap is not None else model  # after the restore: DDP starts from its weights
    lo, hi = shard.bounds(cfg.batch_size)
    weight = shard.weight(cfg.batch_size)
    step, curve, losses, before = (resumed.step, resumed.curve, resumed.losses, resumed.elapsed) if resumed else (
        0, [], [], 0.0)
    t0 = time.perf_counter() - before  # a resumed run's budget counts the seconds before the interruption
    bar = tqdm(total=cfg.steps, initial=step, desc="train student", unit="step", disable=not progress or not lead, leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 15.0)  # a log file gets a line every 15 s, not 10 a second

    def record() -> None:
        if not lead:
            losses.clear()
            return
        scores = evaluate(model, held)
        mean_loss = float(np.mean(losses)) if losses else float("nan")
        curve.append({"step": step, "train_loss": mean_loss, "heldout_psnr": scores["psnr"],
                      "heldout_ssim": scores["ssim"], "identity_psnr": baseline["psnr"],
                      "identity_ssim": baseline["ssim"], "seconds": time.perf_counter() - t0})
        losses.clear()
        bar.set_postfix(loss=f"{mean_loss:.4f}", psnr=f"{scores['psnr']:.2f}")
        if shard.say is not None:
            shard.say(f"step {step}/{cfg.steps}: loss {mean_loss:.4f}, held-out {scores['psnr']:.2f} dB")

    try:
        while step < cfg.steps:
            elapsed = time.perf_counter() - t0
            if cfg.max_seconds > 0 and elapsed >= cfg.max_seconds and step > 0:  # at least one step
                break
            done = step / cfg.steps
            if cfg.max_seconds > 0:
                done = max(done, math.floor(elapsed / cfg.max_seconds * CLOCK_STEPS) / CLOCK_STEPS)
            scale = lr_factor(done)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * scale
            src, tgt = random_batch(train, cfg.batch_size, cfg.crop, gen, cfg.augment, margin, cfg.capture_share)
            if shard.world > 1:  # this rank's slice of the global batch, on its device
                src, tgt = src[lo:hi].to(shard.device), tgt[lo:hi].to(shard.device)
            # channels-last on both sides: oneDNN runs the convolutions and the SSIM filters without relayouts
            src, tgt = src.contiguous(memory_format=torch.channels_last), tgt.contiguous(memory_format=torch.channels_last)
            out = net(src)
            loss = objective(src, out, tgt)
            opt.zero_grad(set_to_none=True)
            (loss if shard.world == 1 else loss * weight).backward()
            opt.step()
            objective.adversary_step(src, out, tgt, scale)  # no-op without a GAN
            step += 1
            losses.append(float(loss.detach()) if shard.reduce is None else shard.reduce(float(loss.detach()) * weight))
            bar.update(1)
            if step % cfg.eval_every == 0 and step < cfg.steps:
                record()
            if lead and checkpointer is not None and checkpointer.due(step, cfg.steps):
                checkpointer.save(step, model, opt, objective.state_dict(), gen, curve, losses,
                                  time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        if not curve or curve[-1]["step"] != step:
            record()
    finally:
        bar.close()
    model.to(memory_format=torch.contiguous_format).eval()
    last = curve[-1] if curve else {"heldout_psnr": float("nan"), "heldout_ssim": float("nan")}  # ranks > 0: no curve
    return FitResult({"psnr": last["heldout_psnr"], "ssim": last["heldout_ssim"]}, curve, step, seconds, baseline,
                     resumed.step if resumed else 0)


def grey_result(model: nn.Module, held: PairSet, result: FitResult) -> FitResult:
    """The trained student projected to grey (`student.project_grey`), its held-out scores and last curve point."""
    project_grey(model)
    scores = evaluate(model, held)
    curve = [dict(r) for r in result.curve]
    if curve:
        curve[-1].update(heldout_psnr=scores["psnr"], heldout_ssim=scores["ssim"])
    return FitResult(scores, curve, result.steps, result.seconds, result.identity, result.resumed_from)


def curve_csv(curve: list[dict[str, float]]) -> str:
    rows = [CURVE_HEADER] + [
        f"{int(r['step'])},{r['train_loss']:.6f},{r['heldout_psnr']:.4f},{r['heldout_ssim']:.5f},"
        f"{r['identity_psnr']:.4f},{r['identity_ssim']:.5f}" for r in curve
    ]
    return "\n".join(rows) + "\n"


def train_student(
    pairs_dir: Path,
    cfg: TrainConfig,
    checkpoint: Path,
    metrics_path: Path,
    curve_path: Path,
    progress: bool = True,
    state_dir: Path | None = None,
    root: Path | None = None,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """Distil the pairs in `pairs_dir` into a student; write checkpoint, metrics JSON and curve CSV; return the
    metrics with the run's `train_seconds`, `resumed_from_step` and `cpu` (which the files leave out: the same
    inputs give the same bytes).

    `state_dir`: where resume checkpoints go (outside the DVC outputs; None: not resumable); deleted on success.
    `root`: the folder a relative ``cfg.lpips_weights`` is read from (the project root; default the working dir).
    `margin`: the framing of the aligned crops (params faces.margin): where the augmentation's occluders go."""
    pairs_dir = Path(pairs_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        train, held = load_split(pairs_dir, cfg)
        gen = seed_everything(cfg.seed)
        weights = cfg.encoder_weights
        if weights is not None and root is not None and not Path(weights).is_absolute():
            weights = Path(root) / weights
        grey = all_grey(train) if cfg.grey_output == "auto" else bool(cfg.grey_output)
        model = build_student(cfg.encoder, cfg.width, **{**arch_options(cfg), "colour": cfg.colour_transform or grey},
                              encoder_weights=weights)
        if grey and not cfg.colour_transform:  # an identity map while training, the projection after it
            model.colour.requires_grad_(False)
        objective = Objective(cfg, lpips_root=root)
        key = run_key(cfg, pairs_dir / MANIFEST, objective.lpips_path, weights) if state_dir is not None else ""
        checkpointer = Checkpointer(state_dir, key, cfg.checkpoint_every)
        if cfg.workers > 1:  # DDP on a Ray cluster (train/distributed.py): the same loop on each worker
            from fxassets.train.distributed import fit_on_ray

            result = fit_on_ray(model, train, held, cfg, gen, progress, objective, checkpointer, margin, state_dir)
        else:
            result = fit(model, train, held, cfg, gen, progress=progress, objective=objective,
                         checkpointer=checkpointer, margin=margin)
        if grey:  # trained in colour from the identity, then made grey: scored as saved
            result = grey_result(model, held, result)
        baseline = result.identity
        h, w = held.source.shape[-2:]
        metrics: dict[str, Any] = {
            "heldout_psnr": round(result.scores["psnr"], 4),
            "heldout_ssim": round(result.scores["ssim"], 5),
            "identity_psnr": round(baseline["psnr"], 4),
            "identity_ssim": round(baseline["ssim"], 5),
            "steps": result.steps,
            "planned_steps": cfg.steps,
            "grey_output": grey,
            "capped": result.steps < cfg.steps,  # train.max_seconds cut the run short: another machine, another model
            "params": count_params(model),
            "macs_256": count_macs(model),
            "encoder": cfg.encoder,
            "width": cfg.width,
            "train_pairs": len(train),
            "heldout_pairs": len(held),
        }
        meta = {
            "encoder": cfg.encoder,
            "width": cfg.width,
            "crop_size": [int(h), int(w)],
            "train": cfg.recipe(),
            "metrics": metrics,
            "input": "N x 3 x H x W float RGB in [0, 1], H and W multiples of 32",
        }
        save_student(model, checkpoint, meta)
        write_json(metrics_path, metrics)
        write_text(curve_path, curve_csv(result.curve))
        checkpointer.clear()  # the outputs are the product now
        # the run, not the model: in the returned summary (the stage's run log), never in the outputs
        ray = {"ray": {"workers": cfg.workers, "backend": "nccl" if cfg.gpus_per_worker > 0 else "gloo",
                       "address": cfg.ray_address}} if cfg.workers > 1 else {}
        return {**metrics, "resumed_from_step": result.resumed_from, "train_seconds": round(result.seconds, 2),
                "cpu": cpu_info(), **ray}  # the machine train_seconds is of (the weights are not: steps only)
    finally:
        torch.set_num_threads(threads_before)
