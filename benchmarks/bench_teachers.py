"""Teacher throughput and the cost of the resumable record keeping.

    python benchmarks/bench_teachers.py [--n 16] [--tiny-n 8] [--out benchmarks/results/bench_teachers.json]

Measures, on the embedded sample faces (512 px):
- classical teacher: samples/s of the bare teacher (read + edit), of the old stage body (read + edit + PNG into the
  out), of the resumable stage from an empty cache, and of a fully cached re-run (assembly only);
- the tiny random-weight diffusers img2img pipeline (64 px working size, 2 steps): load time and samples/s at
  batch 1 and batch 4 (its compute is tiny, so this shows the per-sample plumbing of the diffusers path);
- with --sd-cost, what SD-Turbo's architecture costs on this CPU (random weights: no download).
The record-keeping overhead is the resumable stage's wall time minus the old stage body's, per sample."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "faces"


def _project(tmp: Path, n: int, teacher: dict) -> tuple[Path, object]:
    from fxassets.core.config import Params
    from fxassets.stages import run_stage

    (tmp / "faces").mkdir(parents=True, exist_ok=True)
    for p in sorted(SAMPLES.glob("*.jpg"))[:n]:
        shutil.copy(p, tmp / "faces" / p.name)
    params = Params.model_validate({"faces": {"source": "faces"}, "teacher": teacher, "effects": {"fx": {"prompt": "a cartoon", "seed": 1}}})
    run_stage("prompts", params, "fx", tmp, progress=False)
    return tmp, params


def bench_classical(n: int) -> dict:
    from fxassets.core.atomic import read_jsonl
    from fxassets.core.images import read_rgb, write_png
    from fxassets.core.paths import EffectPaths
    from fxassets.stages import run_stage
    from fxassets.teachers import make_teacher

    with tempfile.TemporaryDirectory() as d:
        root, params = _project(Path(d), n, {"kind": "classical"})
        recs = read_jsonl(EffectPaths(root, "fx").prompts)
        teacher = make_teacher(params.teacher, params.effect("fx").teacher)
        t0 = time.perf_counter()
        for r in recs:
            teacher.edit(read_rgb(root / r["source"]), r)
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        for r in recs:  # what the stage did before the cache: read, edit, write the PNG into the out
            write_png(root / "old" / f"{r['sample_id']}.png", teacher.edit(read_rgb(root / r["source"]), r))
        old = time.perf_counter() - t0
        t0 = time.perf_counter()
        cold = run_stage("teacher_images", params, "fx", root, progress=False)
        cold_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = run_stage("teacher_images", params, "fx", root, progress=False)
        warm_wall = time.perf_counter() - t0
        assert warm["computed"] == 0
    return {
        "samples": n,
        "bare_teacher_per_s": round(n / bare, 2),
        "old_stage_body_per_s": round(n / old, 2),
        "stage_cold_per_s": round(n / cold_wall, 2),
        "stage_all_cached_per_s": round(n / warm_wall, 2),
        "overhead_ms_per_sample_vs_old": round(1000 * (cold_wall - old) / n, 2),
        "overhead_share_vs_old": round((cold_wall - old) / old, 3),
        "cached_rerun_ms_per_sample": round(1000 * warm_wall / n, 2),
        "assemble_seconds_cold": cold["assemble_seconds"],
    }


def bench_tiny(n: int) -> dict:
    from fxassets.core.config import Img2ImgTeacher
    from fxassets.core.images import read_rgb
    from fxassets.teachers import make_teacher
    from fxassets.teachers.tiny import save_tiny_pipeline

    out: dict = {"samples": n, "size": 64, "steps": 2}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_tiny_pipeline(Path(d) / "tiny")
        out["build_seconds"] = round(time.perf_counter() - t0, 2)
        imgs = [cv2.resize(read_rgb(p), (64, 64), interpolation=cv2.INTER_AREA) for p in sorted(SAMPLES.glob("*.jpg"))[:n]]
        recs = [{"prompt": "a cartoon", "negative_prompt": "blurry", "seed": i} for i in range(n)]
        for bs in (1, 4):
            t = make_teacher(Img2ImgTeacher(kind="img2img", model=str(Path(d) / "tiny"), steps=2, strength=0.5, size=64, guidance_scale=2.0, batch_size=bs))
            t0 = time.perf_counter()
            t.edit_batch(imgs[:1], recs[:1])  # loads the pipeline
            out[f"load_and_first_seconds_b{bs}"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            for i in range(0, n, bs):
                t.edit_batch(imgs[i : i + bs], recs[i : i + bs])
            out[f"per_s_batch{bs}"] = round(n / (time.perf_counter() - t0), 2)
            out["runtime"] = t.runtime()
        with tempfile.TemporaryDirectory() as d2:
            root, params = _project(Path(d2), n, {"kind": "img2img", "model": str(Path(d) / "tiny"), "steps": 2, "strength": 0.5, "size": 64, "guidance_scale": 2.0, "batch_size": 4})
            from fxassets.stages import run_stage

            t0 = time.perf_counter()
            s = run_stage("teacher_images", params, "fx", root, progress=False)
            out["stage_cold_per_s_incl_load"] = round(n / (time.perf_counter() - t0), 2)
            out["stage_assemble_seconds"] = s["assemble_seconds"]
    return out


def bench_sd_cost(size: int = 512) -> dict:
    """The CPU cost of an SD-2.1-sized model (SD-Turbo's architecture) with random weights: one UNet step, a VAE
    encode and a VAE decode at `size` px, batch 1, no guidance. Weights do not change the arithmetic, so this is what
    SD-Turbo img2img costs on this CPU without downloading it (the text encoder, one pass, is left out)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_flush_denormal(True)

    def build(cls, **cfg):
        with torch.device("meta"):
            m = cls(**cfg)
        m = m.to_empty(device="cpu").eval()
        with torch.no_grad():
            for prm in m.parameters():
                prm.normal_(0, 0.02)
        return m

    unet = build(UNet2DConditionModel, sample_size=size // 8, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                 attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    vae = build(AutoencoderKL, block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=size)
    out = {"size": size, "threads": torch.get_num_threads(), "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)}
    lat = torch.randn(1, 4, size // 8, size // 8)
    with torch.inference_mode():
        t0 = time.perf_counter()
        unet(lat, 999, encoder_hidden_states=torch.randn(1, 77, 1024))
        out["unet_step_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        vae.encode(torch.randn(1, 3, size, size))
        out["vae_encode_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        vae.decode(lat)
        out["vae_decode_seconds"] = round(time.perf_counter() - t0, 2)
    out["sd_turbo_img2img_2x0.5_seconds"] = round(out["unet_step_seconds"] + out["vae_encode_seconds"] + out["vae_decode_seconds"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="faces for the classical teacher")
    ap.add_argument("--tiny-n", type=int, default=8, help="faces for the tiny diffusers pipeline")
    ap.add_argument("--sd-cost", action="store_true", help="also time an SD-2.1-sized random-weight UNet step and VAE at 512 px (4 GB RAM, minutes)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_teachers.json"))
    args = ap.parse_args(argv)
    os.environ.pop("FXASSETS_CACHE", None)
    res = {"threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count(), "classical": bench_classical(args.n), "tiny_img2img": bench_tiny(args.tiny_n)}
    if args.sd_cost:
        res["sd21_sized_cpu_cost"] = bench_sd_cost()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
