"""What the Ray executors cost and give on this machine, side by side in one run.

    python benchmarks/bench_ray.py [--n 24] [--overhead-n 100] [--steps 30] [--out benchmarks/results/bench_ray.json]

- teacher samples/s: the teacher_images stage (classical teacher, the embedded 512 px faces, face scaling on: what
  `make run` does) from an empty cache, locally and on 1 and 2 Ray actors (`teacher.executor`), on one local Ray
  cluster started once; the ratio to local. The actors' start-up (building the teacher) is inside the figure, the
  cluster's is not (below);
- Ray's fixed overhead for a 100-sample stage: the same stage on 64 px faces without face scaling (the teacher takes
  about a millisecond a sample, so the wall time is the plumbing), local against 1 Ray actor (medians of 3), split into starting
  the cluster (`ray.init`, a local one), starting the actor, and the rest (dispatch, transfers, per batch);
- DDP step time: the default student (crop 128, global batch 8) on 2 gloo workers (1 thread each) against one
  process at 1 and at 2 threads, seconds per step over the training loop (`train_seconds / steps`, one evaluation
  at the end), the Ray Train start-up beside it.
The CPU (`fxassets.core.machine.cpu_label`) is printed beside the figures; on a shared machine they move with load."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "faces"


def _project(tmp: Path, n: int, px: int | None = None, eye: float | None = None):
    from fxassets.core.config import Params
    from fxassets.stages import run_stage

    (tmp / "faces").mkdir(parents=True, exist_ok=True)
    files = sorted(SAMPLES.glob("*.jpg"))
    for i in range(n):  # more samples than faces: the faces again, under other names
        src = files[i % len(files)]
        img = cv2.imread(str(src))
        if px:
            img = cv2.resize(img, (px, px), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(tmp / "faces" / f"f{i:04d}.png"), img)
    faces = {"source": "faces", **({"teacher_eye_distance": eye} if eye is not None else {})}
    params = Params.model_validate({"faces": faces, "teacher": {"kind": "classical"}, "effects": {"fx": {"prompt": "a cartoon", "seed": 1}}})
    run_stage("prompts", params, "fx", tmp, progress=False)
    return tmp, params


def _with(params, **executor):
    from fxassets.core.config import Params

    raw = params.model_dump(mode="json")
    raw["teacher"]["executor"] = {"kind": "ray", **executor} if executor else "local"
    return Params.model_validate(raw)


def _stage(root: Path, params) -> tuple[float, dict]:
    from fxassets.stages import run_stage

    shutil.rmtree(root / ".cache", ignore_errors=True)
    t0 = time.perf_counter()
    s = run_stage("teacher_images", params, "fx", root, progress=False)
    return time.perf_counter() - t0, s


def bench_teacher(n: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        root, params = _project(Path(d), n)
        out: dict = {"samples": n}
        local, _ = _stage(root, params)
        out["local"] = {"seconds": round(local, 2), "samples_per_s": round(n / local, 2)}
        for w in (1, 2):
            secs, s = _stage(root, _with(params, workers=w, batch_size=1))
            out[f"ray_{w}"] = {"seconds": round(secs, 2), "samples_per_s": round(n / secs, 2),
                               "vs_local": round(local / secs, 2), "actor_startup_s": s["ray"]["startup_seconds"]}
        return out


def bench_overhead(n: int) -> dict:
    import ray

    with tempfile.TemporaryDirectory() as d:
        root, params = _project(Path(d), n, px=64, eye=0)
        batch = 8
        local = statistics.median(_stage(root, params)[0] for _ in range(3))  # medians of 3: a busy machine
        runs = [_stage(root, _with(params, workers=1, batch_size=batch)) for _ in range(3)]
        secs = statistics.median(r[0] for r in runs)
        s = {"ray": {"startup_seconds": statistics.median(r[1]["ray"]["startup_seconds"] for r in runs)}}
        ray.shutdown()
        secs_own, _ = _stage(root, _with(params, workers=1, batch_size=batch, address="local"))  # starts its own
        cluster = secs_own - secs
        ray.init(num_cpus=2, include_dashboard=False)
        return {"samples": n, "batch_size": batch, "local_s": round(local, 3), "ray_1_s": round(secs, 3),
                "overhead_s": round(secs - local, 3), "actor_startup_s": s["ray"]["startup_seconds"],
                "dispatch_s": round(secs - local - s["ray"]["startup_seconds"], 3),
                "with_cluster_start_s": round(secs_own, 3), "cluster_start_s": round(cluster, 3)}


def _pairs(folder: Path, n_train: int = 16, n_held: int = 4) -> Path:
    import pandas as pd

    from fxassets.core.config import ClassicalTeacher, EffectTeacher
    from fxassets.teachers.classical import ClassicalTeacherImpl

    teacher = ClassicalTeacherImpl(ClassicalTeacher(), EffectTeacher())
    rows = []
    for i, p in enumerate(sorted(SAMPLES.glob("*.jpg"))[: n_train + n_held]):
        src = cv2.resize(cv2.imread(str(p)), (256, 256), interpolation=cv2.INTER_AREA)
        tgt = cv2.cvtColor(teacher.edit(cv2.cvtColor(src, cv2.COLOR_BGR2RGB), {}), cv2.COLOR_RGB2BGR)
        for kind, img in (("source", src), ("target", tgt)):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / kind / f"{p.stem}.png"), img)
        rows.append({"sample_id": p.stem, "person_id": p.stem, "split": "train" if i < n_train else "heldout",
                     "status": "pass", "reason": "", "source": f"source/{p.stem}.png", "target": f"target/{p.stem}.png"})
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    return folder


def bench_ddp(steps: int) -> dict:
    import torch

    from fxassets.core.config import TrainConfig
    from fxassets.train.loop import train_student

    with tempfile.TemporaryDirectory() as d:
        pairs = _pairs(Path(d) / "pairs")
        out: dict = {"steps": steps, "batch_size": 8, "crop": 128}
        for name, kw in (("one_1_thread", {"threads": 1}), ("one_2_threads", {"threads": 2}),
                         ("ddp_2_workers", {"threads": 1, "workers": 2})):
            cfg = TrainConfig(steps=steps, batch_size=8, crop=128, eval_every=10_000, checkpoint_every=0, **kw)
            before = torch.get_num_threads()
            t0 = time.perf_counter()
            m = train_student(pairs, cfg, Path(d) / name / "s.safetensors", Path(d) / name / "m.json",
                              Path(d) / name / "c.csv", progress=False)
            wall = time.perf_counter() - t0
            torch.set_num_threads(before)
            out[name] = {"s_per_step": round(m["train_seconds"] / steps, 4), "wall_s": round(wall, 2),
                         "heldout_psnr": m["heldout_psnr"]}
        best = min(out["one_1_thread"]["s_per_step"], out["one_2_threads"]["s_per_step"])
        out["ddp_speedup_vs_best_one"] = round(best / out["ddp_2_workers"]["s_per_step"], 2)
        out["ddp_startup_s"] = round(out["ddp_2_workers"]["wall_s"] - out["ddp_2_workers"]["s_per_step"] * steps, 2)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24, help="teacher samples (512 px faces)")
    ap.add_argument("--overhead-n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import ray

    from fxassets.core.machine import cpu_info, cpu_label

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False)
    cluster_start = time.perf_counter() - t0
    res = {"cpu": cpu_label(), "cpu_info": cpu_info(), "ray": ray.__version__, "cluster_start_s": round(cluster_start, 2)}
    res["teacher"] = bench_teacher(args.n)
    res["overhead"] = bench_overhead(args.overhead_n)
    res["ddp"] = bench_ddp(args.steps)
    ray.shutdown()
    res["load"] = [round(x, 2) for x in os.getloadavg()]
    t, o, p = res["teacher"], res["overhead"], res["ddp"]
    print(f"\nCPU: {res['cpu']}  (ray {res['ray']}, 2-CPU local cluster started in {cluster_start:.1f} s)")
    print(f"teacher (classical, {t['samples']} x 512 px): local {t['local']['samples_per_s']} samples/s | "
          f"1 Ray worker {t['ray_1']['samples_per_s']} ({t['ray_1']['vs_local']}x) | "
          f"2 Ray workers {t['ray_2']['samples_per_s']} ({t['ray_2']['vs_local']}x)")
    print(f"Ray's fixed overhead, {o['samples']}-sample stage (batches of {o['batch_size']}): {o['overhead_s']} s "
          f"(actor start {o['actor_startup_s']} s, dispatch {o['dispatch_s']} s; starting a local cluster adds "
          f"{o['cluster_start_s']} s); local {o['local_s']} s")
    print(f"DDP ({p['steps']} steps, batch {p['batch_size']}, crop {p['crop']}): 1 process 1 thread "
          f"{p['one_1_thread']['s_per_step']} s/step, 2 threads {p['one_2_threads']['s_per_step']} s/step, 2 gloo workers "
          f"{p['ddp_2_workers']['s_per_step']} s/step ({p['ddp_speedup_vs_best_one']}x the faster single process; Ray Train "
          f"start {p['ddp_startup_s']} s)")
    print(f"load average during the run: {res['load']} (other work on the same cores moves these figures)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
