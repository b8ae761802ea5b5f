"""Source faces from a text-to-image model: build an effect with no photos at all.

`fxassets generate-sources --out DIR --n N --model M` writes N portraits `DIR/gen_00000.png`, ... with a
`manifest.csv` (file, person_id, age, gender, skin_tone, ...) that `sources.py` reads, `records.jsonl` (prompt,
seed, status; no clock: the folder is every stage's dependency, the seconds are the printed summary's) and
`generator.json` (the generator's fingerprint). Point `faces.source` at DIR.

The prompts are balanced over age group x gender x skin tone (the 10-point Monk Skin Tone scale in three groups):
sample i takes the least-used combination, so every prefix of the list is as balanced as it can be and every
multiple of (ages x genders x skin groups) samples is exactly balanced. Each sample has its own seed (from the base
seed and its id), and the same resumable per-sample cache as the teacher stage: a killed run resumes where it
stopped.

`--from-params` takes the generator from params.yaml's `teacher:` instead: `gemini-image` (its `model`, text only, at
`aspect_ratio`) or `openai-images` (paid: the cost estimate and `max_cost` bound apply), or `latent-edit`, which
writes G(w) for each seed with its latent w beside it as `gen_00000.npy` (no prompts: the GAN draws its own people)
so that the `latent-edit` teacher can make the targets G(w + s * d) from the same folder."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator
from tqdm import tqdm

from fxassets.core.atomic import atomic_dir, write_json, write_jsonl, write_text
from fxassets.core.config import LatentEditTeacher, Text2ImageTeacher, _Strict, load_params
from fxassets.prompts import sample_seed
from fxassets.pairs.skin_tones import MONK_TONES, SKIN_GROUPS

# Monk Skin Tone scale (Monk 2019; Google's MST), with words a text encoder understands for each tone.
AGE_GROUPS: dict[str, tuple[int, int]] = {"18-29": (18, 29), "30-44": (30, 44), "45-64": (45, 64), "65+": (65, 85)}
GENDERS: tuple[str, ...] = ("woman", "man")

DEFAULT_TEMPLATE = (
    "a professional studio portrait photo of a {age} year old {gender} with {skin} skin, head and shoulders, "
    "looking at the camera, neutral grey background, soft light, sharp focus"
)
DEFAULT_NEGATIVE = "cartoon, painting, drawing, blurry, deformed, several people, hands, hat, sunglasses, text, watermark"


class SourcesConfig(_Strict):
    """What to generate (the generator itself is a `Text2ImageTeacher`)."""

    n: int = Field(96, ge=1, le=1_000_000)
    seed: int = 0
    prompt_template: str = Field(DEFAULT_TEMPLATE, description="{age}, {gender}, {skin} (Monk tone words), {age_group}, {skin_group}")
    negative_prompt: str = DEFAULT_NEGATIVE
    ages: list[str] = Field(default_factory=lambda: list(AGE_GROUPS))
    genders: list[str] = Field(default_factory=lambda: list(GENDERS))
    skin_groups: list[str] = Field(default_factory=lambda: list(SKIN_GROUPS))

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        import string

        known = {"age", "gender", "skin", "skin_tone", "age_group", "skin_group"}
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from None
        if names - known:
            raise ValueError(f"unknown template fields {sorted(names - known)}; known: {sorted(known)}")
        return v

    @field_validator("ages")
    @classmethod
    def _ages(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in AGE_GROUPS]
        if bad or not v:
            raise ValueError(f"age groups must be some of {list(AGE_GROUPS)}, got {v}")
        return v

    @field_validator("skin_groups")
    @classmethod
    def _skins(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in SKIN_GROUPS]
        if bad or not v:
            raise ValueError(f"skin groups must be some of {list(SKIN_GROUPS)}, got {v}")
        return v

    @field_validator("genders")
    @classmethod
    def _genders(cls, v: list[str]) -> list[str]:
        if not v or not all(g.strip() for g in v):
            raise ValueError("at least one non-empty gender word is needed")
        return v


def balanced_prompts(spec: SourcesConfig) -> list[dict[str, Any]]:
    """One record per portrait: sample_id, person_id, attributes, prompt, negative_prompt, seed."""
    cells = [(a, g, s) for a in spec.ages for g in spec.genders for s in spec.skin_groups]
    used = {c: 0 for c in cells}
    marg: list[dict[str, int]] = [{a: 0 for a in spec.ages}, {g: 0 for g in spec.genders}, {s: 0 for s in spec.skin_groups}]
    tone_turn = {s: 0 for s in spec.skin_groups}
    out = []
    for i in range(spec.n):
        # the least-used cell, then the one whose age / gender / skin group are least used; ties in a fixed order
        cell = min(cells, key=lambda c: (used[c], sum(m[v] for m, v in zip(marg, c, strict=True))))
        used[cell] += 1
        for m, v in zip(marg, cell, strict=True):
            m[v] += 1
        age_group, gender, skin_group = cell
        tones = SKIN_GROUPS[skin_group]
        tone = tones[tone_turn[skin_group] % len(tones)]
        tone_turn[skin_group] += 1
        sid = f"gen_{i:05d}"
        seed = sample_seed(spec.seed, sid)
        lo, hi = AGE_GROUPS[age_group]
        age = random.Random(seed).randint(lo, hi)
        attrs = {"age": str(age), "age_group": age_group, "gender": gender, "skin_tone": f"MST-{tone}", "skin_group": skin_group, "skin": MONK_TONES[tone]}
        prompt = spec.prompt_template.format_map(attrs)
        out.append({
            "sample_id": sid, "person_id": sid, "attributes": attrs, "prompt": prompt,
            "negative_prompt": spec.negative_prompt, "seed": seed,
        })
    return out


def latent_records(spec: SourcesConfig) -> list[dict[str, Any]]:
    """A GAN's sources: one record per seed, each its own person, no prompt."""
    out = []
    for i in range(spec.n):
        sid = f"gen_{i:05d}"
        out.append({"sample_id": sid, "person_id": sid, "attributes": {}, "prompt": "", "negative_prompt": "", "seed": sample_seed(spec.seed, sid)})
    return out


def generate_sources(gen, spec: SourcesConfig, out_dir: Path, root: Path = Path("."), progress: bool = True) -> dict[str, Any]:
    """Generate the portraits (resuming from the per-sample cache), then write `out_dir` in one atomic step.

    `gen`: a `Text2ImageTeacher`, or a teacher config whose teacher generates (gemini-image, openai-images, latent-edit)."""
    from fxassets.teachers.stage import SampleCache, compute_samples
    from fxassets.teachers import make_teacher
    from fxassets.core.paths import cache_root

    t_start = time.perf_counter()
    # the spec's template makes the prompt (with the demographic words); the generator takes it as it is
    latent = isinstance(gen, LatentEditTeacher)
    if "prompt_template" in type(gen).model_fields:
        gen = gen.model_copy(update={"prompt_template": "{prompt}"})
    teacher = make_teacher(gen, root=root)
    if not teacher.generates:
        raise ValueError(f"generate-sources: a {gen.kind!r} teacher does not generate images (gemini-image, openai-images, latent-edit and text2image do)")
    fp = teacher.fingerprint("generate")
    records = latent_records(spec) if latent else balanced_prompts(spec)
    cache = SampleCache(cache_root(root) / "sources")
    keys = [hashlib.sha256(json.dumps([r["prompt"], r["negative_prompt"], r["seed"], fp["hash"]]).encode()).hexdigest() for r in records]
    todo = [(k, r) for k, r in zip(keys, records, strict=True) if cache.get(k) is None]
    with teacher.run_session(len(todo)), tqdm(total=len(records), initial=len(records) - len(todo), desc="generate sources", unit="img", disable=not progress) as bar:
        compute_samples(todo, cache, teacher.generate_batch, teacher.batch_size, bar, teacher.runtime)
    rows, manifest, secs = [], io.StringIO(), 0.0
    cols = ["file", "person_id", "age", "gender", "skin_tone", "age_group", "skin_group", "seed", "prompt"]
    w = csv.DictWriter(manifest, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    with atomic_dir(out_dir) as tmp:
        for rec, key in zip(records, keys, strict=True):
            entry = cache.get(key) or {"status": "error", "reason": "not generated", "seconds": 0.0}
            secs += entry["seconds"]
            # no seconds, no `cached` flag: the folder is every stage's DVC dependency, a function of its inputs
            row = {"sample_id": rec["sample_id"], "person_id": rec["person_id"], **rec["attributes"], "seed": rec["seed"], "prompt": rec["prompt"],
                   "teacher": fp["hash"], "status": entry["status"], "reason": entry["reason"], "image": ""}
            if entry["status"] == "ok":
                name = f"{rec['sample_id']}.png"
                shutil.copyfile(cache.png(key), tmp / name)
                row["image"] = name
                a = rec["attributes"]
                w.writerow({"file": name, "person_id": rec["person_id"], **{k: a.get(k, "") for k in cols[2:7]}, "seed": rec["seed"], "prompt": rec["prompt"]})
                if latent:  # w beside G(w), for the latent-edit teacher
                    np.save(tmp / f"{rec['sample_id']}.npy", teacher.latents([rec])[0])
            rows.append(row)
        write_text(tmp / "manifest.csv", manifest.getvalue())
        write_jsonl(tmp / "records.jsonl", rows)
        write_json(tmp / "generator.json", {**fp, "spec": spec.model_dump(mode="json")})
    ok = sum(r["status"] == "ok" for r in rows)
    return {"samples": len(rows), "ok": ok, "errors": len(rows) - ok, "computed": len(todo), "cached": len(rows) - len(todo),
            "generator": fp, "runtime": teacher.runtime() if todo else {},
            "seconds_per_sample": round(secs / max(1, len(rows)), 4), "wall_seconds": round(time.perf_counter() - t_start, 3)}


def _cmd(args: argparse.Namespace) -> int:
    if args.from_params == bool(args.model):
        raise ValueError("generate-sources: give --model (a diffusers text-to-image model) or --from-params (params.yaml's teacher), one of them")
    if args.from_params:
        gen = load_params(args.params).teacher
    else:
        gen = Text2ImageTeacher(
            kind="text2image", model=args.model, revision=args.revision, variant=args.variant, scheduler=args.scheduler,
            steps=args.steps, guidance_scale=args.guidance, size=args.size, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        )
    spec_kw: dict[str, Any] = {"n": args.n, "seed": args.seed}
    for name in ("prompt_template", "negative_prompt"):
        if getattr(args, name) is not None:
            spec_kw[name] = getattr(args, name)
    for name in ("ages", "genders", "skin_groups"):
        if getattr(args, name):
            spec_kw[name] = [x.strip() for x in getattr(args, name).split(",")]
    summary = generate_sources(gen, SourcesConfig(**spec_kw), Path(args.out), Path("."), progress=not args.no_progress)
    print(json.dumps({"command": "generate-sources", "out": args.out, **summary}, default=str))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`fxassets generate-sources`: wired into cli.py next to the other commands."""
    from pydantic import ValidationError

    p = subparsers.add_parser("generate-sources", help="generate demographically balanced source portraits with a text-to-image model")
    p.add_argument("--out", required=True, help="output folder (point faces.source at it)")
    p.add_argument("--n", type=int, default=96, help="number of portraits (default 96)")
    p.add_argument("--model", help="local diffusers folder or hub id (e.g. models/sd-turbo)")
    p.add_argument("--from-params", action="store_true",
                   help="use params.yaml's teacher as the generator: gemini-image, openai-images, or latent-edit (G(w), latents saved beside)")
    p.add_argument("--revision", help="hub revision (a commit sha)")
    p.add_argument("--variant", help="weights variant, e.g. fp16")
    p.add_argument("--scheduler", help="diffusers scheduler class name (default: the model's)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (0 for SD-Turbo)")
    p.add_argument("--size", type=int, default=512, help="square image side in px")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="base seed; each portrait's seed derives from it and its id")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--prompt-template", help="default: a studio portrait with {age}, {gender}, {skin}")
    p.add_argument("--negative-prompt")
    p.add_argument("--ages", help=f"comma-separated age groups, of {','.join(AGE_GROUPS)}")
    p.add_argument("--genders", help=f"comma-separated gender words (default {','.join(GENDERS)})")
    p.add_argument("--skin-groups", help=f"comma-separated Monk scale groups, of {','.join(SKIN_GROUPS)}")
    p.add_argument("--no-progress", action="store_true")

    def run(args: argparse.Namespace) -> int:
        try:
            return _cmd(args)
        except ValidationError as exc:  # flags that fail the schema: name them like params.yaml errors do
            msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"generate-sources: {msgs}") from None

    p.set_defaults(func=run)
    return p
