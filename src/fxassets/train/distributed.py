"""`train.workers: N` (N > 1): the training loop (`loop.fit`) on N Ray Train workers with torch DDP (gloo on CPUs,
nccl with `train.gpus_per_worker` > 0).

The same run, split: every worker starts from the model, objective and RNG states the driver built (one copy, through
Ray's object store), draws the whole global batch (`train.batch_size`) from the same generator a single worker draws
from, and trains on its slice of it; its loss is weighted by its slice's share, so DDP's gradient average is the
gradient of the global batch's mean loss: the schedule, the data stream and the learning rate stay what params.yaml
says. What differs from one worker: BatchNorm sees each worker's slice (its running statistics are rank 0's, DDP
broadcasts them), and sums run in another order, so the figures land near one worker's, not on its bytes.

Rank 0 evaluates, writes the resume checkpoints into the stage's own state folder (`.cache/fxassets/train/<effect>`,
`train/state.py`: a killed stage, run again, resumes there; each worker restores from it) and, at the end, the
trained weights and curve for the driver (`ddp-result.pt`, beside them). So the state folder must be one that every
worker sees: one machine, or `$FXASSETS_CACHE` on shared storage (docs/scale.md). A worker that dies: Ray Train
restarts the group once (`FailureConfig(max_failures=1)`), which resumes from the last checkpoint."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxassets.core.atomic import atomic_path
from fxassets.core.config import TrainConfig
from fxassets.core.ray_cluster import check_resources, connect
from fxassets.train.loop import FitResult, PairSet, Shard, fit
from fxassets.train.state import Checkpointer, rng_state, set_rng_state

RESULT = "ddp-result.pt"


def say(msg: str) -> None:
    # not print(): Ray Train patches it on its workers into its logger, which shows every line twice
    sys.stderr.write(f"student_checkpoint [ray]: {msg}\n")
    sys.stderr.flush()


def check(cfg: TrainConfig) -> None:
    """What a data-parallel run refuses, before it starts (ValueError naming the key)."""
    if cfg.batch_size < cfg.workers:
        raise ValueError(f"train.batch_size = {cfg.batch_size} is smaller than train.workers = {cfg.workers}: "
                         "each worker needs one pair of the global batch at least")
    if cfg.max_seconds > 0:
        raise ValueError("train.max_seconds: a wall-clock cap is not supported with train.workers > 1 (each worker "
                         "has its own clock); use the steps budget")
    if cfg.gan_weight > 0:
        raise ValueError("train.gan_weight: the PatchGAN term is not supported with train.workers > 1 (its "
                         "discriminator is not synchronised across workers)")


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: `loop.fit` on its shard of each global batch."""
    import ray
    import ray.train
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.model_validate(config["cfg"])
    torch.set_num_threads(cfg.threads)
    p = ray.get(config["payload"])
    model, objective = p["model"], p["objective"]
    gen = torch.Generator()
    set_rng_state(p["rng"], gen)  # the driver's states right after it built the model: the stream one worker has
    cuda = cfg.gpus_per_worker > 0
    device = ray.train.torch.get_device() if cuda else torch.device("cpu")
    if cuda and objective.lpips is not None:  # the loss's own network beside the student (kornia's SSIM follows its input)
        objective.lpips.to(device)

    def reduce(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / world

    def wrap(m: nn.Module) -> nn.Module:
        return DistributedDataParallel(m, device_ids=[device] if cuda else None)

    ckpt = Checkpointer(Path(config["state"]), config["key"], config["every"]) if config["state"] else None
    shard = Shard(rank, world, wrap=wrap, device=device, reduce=reduce, say=say if rank == 0 else None)
    result = fit(model, p["train"], p["held"], cfg, gen, progress=config["progress"], objective=objective,
                 checkpointer=ckpt, margin=config["margin"], shard=shard)
    if rank == 0:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        with atomic_path(config["result"]) as tmp:
            torch.save({"model": weights, "scores": result.scores, "curve": result.curve, "steps": result.steps,
                        "seconds": result.seconds, "identity": result.identity, "resumed_from": result.resumed_from},
                       tmp)


def fit_on_ray(model: nn.Module, train: PairSet, held: PairSet, cfg: TrainConfig, gen: torch.Generator,
               progress: bool, objective: Any, checkpointer: Checkpointer, margin: float,
               state_dir: Path | None) -> FitResult:
    """`loop.fit` on `cfg.workers` Ray Train workers; the trained weights are loaded into `model`."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check(cfg)
    started, where = connect(cfg.ray_address, key="train.ray_address")
    tmp = None
    try:
        cuda = cfg.gpus_per_worker > 0
        have = check_resources(cfg.workers, cfg.gpus_per_worker, 1.0, where, prefix="train", cpu_key="workers")
        if state_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="fxassets-ddp-")
        folder = Path(state_dir) if state_dir is not None else Path(tmp.name)  # type: ignore[union-attr]
        folder.mkdir(parents=True, exist_ok=True)
        result_path = folder / RESULT
        result_path.unlink(missing_ok=True)
        payload = ray.put({"model": model, "objective": objective, "train": train, "held": held, "rng": rng_state(gen)})
        config = {"payload": payload, "cfg": cfg.model_dump(mode="json"), "state": str(state_dir) if state_dir else None,
                  "key": checkpointer.key, "every": checkpointer.every, "margin": margin, "progress": progress,
                  "result": str(result_path)}
        say(f"{cfg.steps} steps on {cfg.workers} workers ({'nccl' if cuda else 'gloo'}; {where}; {have}), global "
            f"batch {cfg.batch_size}")
        trainer = TorchTrainer(
            _worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cuda,
                                         resources_per_worker={"CPU": 1.0, **({"GPU": cfg.gpus_per_worker} if cuda else {})}),
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            run_config=RunConfig(name=f"fxassets-train-{checkpointer.key[:12] or 'run'}", storage_path=str(folder / "ray"),
                                 failure_config=FailureConfig(max_failures=1)))
        trainer.fit()
        shutil.rmtree(folder / "ray", ignore_errors=True)  # Ray Train's own run record: nothing in it we use
        out = torch.load(result_path, map_location="cpu", weights_only=True)
        result_path.unlink()
        model.load_state_dict(out["model"])
        model.eval()
        return FitResult(out["scores"], out["curve"], out["steps"], out["seconds"], out["identity"], out["resumed_from"])
    finally:
        if tmp is not None:
            tmp.cleanup()
        if started:
            ray.shutdown()
