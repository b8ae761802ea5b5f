"""Profile one training step: where the time goes, and what each speed-up gives, side by side in one run.

    .venv/bin/python benchmarks/bench_train_step.py --pairs data/face_pairs/cartoon --steps 30 --rounds 3

Phases of the default step (`fxassets.train.loop.fit`): the batch (pick + augment), forward, loss, backward, optimizer;
plus one held-out evaluation and one resume checkpoint, which the loop runs every `eval_every` / `checkpoint_every`
steps. Variants (each a whole step, timed in interleaved rounds so a busy machine slows them alike): channels-last
(the default) against contiguous, bf16 autocast (where the CPU has avx512_bf16 / AMX), `torch.compile`, and the batch
made in a worker thread overlapping the step. Prints ms per step, the ratio to the default and the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Queue

import torch

from fxassets.core.config import TrainConfig
from fxassets.core.machine import cpu_info, cpu_label
from fxassets.train.loop import WEIGHT_DECAY, evaluate, load_split, random_batch, seed_everything
from fxassets.train.losses import Objective
from fxassets.train.state import Checkpointer
from fxassets.train.student import arch_options, build_student

CL = torch.channels_last


def make(cfg: TrainConfig, layout=CL):
    model = build_student(cfg.encoder, cfg.width, **arch_options(cfg)).to(memory_format=layout).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY, fused=True)  # as loop.fit
    return model, opt, Objective(cfg)


def phases(cfg: TrainConfig, train, held, steps: int) -> dict[str, float]:
    """ms per phase of the default step (median over `steps`), one evaluation and one checkpoint."""
    model, opt, objective = make(cfg)
    gen = seed_everything(0)
    times: dict[str, list[float]] = {k: [] for k in ("batch", "forward", "loss", "backward", "optimizer")}
    for i in range(steps + 3):
        t = [time.perf_counter()]
        src, tgt = random_batch(train, cfg.batch_size, cfg.crop, gen, cfg.augment)
        src, tgt = src.contiguous(memory_format=CL), tgt.contiguous(memory_format=CL)
        t.append(time.perf_counter())
        out = model(src)
        t.append(time.perf_counter())
        loss = objective(src, out, tgt)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if i >= 3:  # warm-up
            for k, a, b in zip(times, t, t[1:]):
                times[k].append((b - a) * 1000)
    result = {k: statistics.median(v) for k, v in times.items()}
    t0 = time.perf_counter()
    evaluate(model, held)
    result["evaluation (one)"] = (time.perf_counter() - t0) * 1000
    with tempfile.TemporaryDirectory() as tmp:
        ck = Checkpointer(Path(tmp), "bench", 100)
        t0 = time.perf_counter()
        ck.save(100, model, opt, objective.state_dict(), gen, [], [], 0.0)
        result["checkpoint (one)"] = (time.perf_counter() - t0) * 1000
    return result


class Variant:
    def __init__(self, name: str, cfg: TrainConfig, train, layout=CL, bf16: bool = False, compile: bool = False,
                 worker: bool = False):
        self.name, self.cfg, self.train, self.layout, self.bf16, self.worker = name, cfg, train, layout, bf16, worker
        self.model, self.opt, self.objective = make(cfg, layout)
        self.step_fn = torch.compile(self.model) if compile else self.model
        self.gen = seed_everything(0)
        self.times: list[float] = []
        self.queue: Queue | None = None

    def batch(self):
        src, tgt = random_batch(self.train, self.cfg.batch_size, self.cfg.crop, self.gen, self.cfg.augment)
        return src.contiguous(memory_format=self.layout), tgt.contiguous(memory_format=self.layout)

    def run(self, steps: int, record: bool = True) -> None:
        if self.worker:
            self.queue = Queue(maxsize=2)
            thread = threading.Thread(target=lambda: [self.queue.put(self.batch()) for _ in range(steps)], daemon=True)
            thread.start()
        t0 = time.perf_counter()
        for _ in range(steps):
            src, tgt = self.queue.get() if self.worker else self.batch()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
            with ctx:
                out = self.step_fn(src)
            loss = self.objective(src, out.float(), tgt)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        if record:
            self.times.append((time.perf_counter() - t0) * 1000 / steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=Path, default=Path("data/face_pairs/cartoon"))
    p.add_argument("--steps", type=int, default=30, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="default,contiguous,bf16,compile,worker")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    train, held = load_split(args.pairs, cfg)
    info = cpu_info()
    print(f"CPU: {cpu_label()}; torch {torch.__version__}, {args.threads} threads; {len(train)} train pairs, "
          f"{len(held)} held-out; batch {cfg.batch_size} x {cfg.crop} px", flush=True)
    prof = phases(cfg, train, held, args.steps)
    step = sum(v for k, v in prof.items() if "(one)" not in k)
    print("\nphase             ms     share of a step")
    for k, v in prof.items():
        share = f"{v / step:6.1%}" if "(one)" not in k else f"(every {cfg.eval_every} steps: "\
            f"{v / cfg.eval_every / step:.1%} of a step)"
        print(f"{k:<17}{v:7.1f}  {share}")
    print(f"{'step':<17}{step:7.1f}", flush=True)

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(info.get("isa", [])))
    specs = {"default": {}, "contiguous": {"layout": torch.contiguous_format}, "bf16": {"bf16": True},
             "compile": {"compile": True}, "worker": {"worker": True}}
    variants = []
    for n in names:
        if n == "bf16" and not has_bf16:
            print("bf16: skipped (no avx512_bf16 / amx_bf16 on this CPU)")
            continue
        variants.append(Variant(n, cfg, train, **specs[n]))
    for v in variants:  # warm-up (compile happens here)
        v.run(3, record=False)
    for _ in range(args.rounds):
        for v in variants:
            v.run(args.steps)
    base = statistics.median(variants[0].times)
    print(f"\nvariant        ms/step  ratio to {variants[0].name}  (median of {args.rounds} rounds x {args.steps} steps)")
    rows = {}
    for v in variants:
        ms = statistics.median(v.times)
        rows[v.name] = {"ms_per_step": round(ms, 2), "ratio": round(ms / base, 3)}
        print(f"{v.name:<14}{ms:8.1f}  {ms / base:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": info, "phases_ms": prof, "variants": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
