"""The `prompts` stage: one record per source face with the effect's prompt, negative prompt and seed.

A sample's seed depends only on the effect seed and the sample id, so adding faces never changes the others."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from fxassets.captures import draw_capture, variant_id
from fxassets.core.atomic import atomic_dir, write_jsonl
from fxassets.core.config import EffectConfig, FacesConfig
from fxassets.sources import list_sources
from fxassets.core.hashing import sha256_file


def sample_seed(effect_seed: int, sample_id: str) -> int:
    return (effect_seed + zlib.crc32(sample_id.encode())) % (2**31)


def _relative(path: Path, root: Path) -> str:
    """The photo's path as the records keep it: relative to the project (where DVC tracks the folder), or absolute
    for a `faces.source` outside it (read as ``root / path`` alike)."""
    for p, r in ((Path(path), Path(root)), (Path(path).absolute(), Path(root).absolute())):
        try:
            return p.relative_to(r).as_posix()
        except ValueError:
            pass
    return Path(path).absolute().as_posix()


def build_prompts(faces: FacesConfig, effect: EffectConfig, root: Path) -> list[dict[str, Any]]:
    """One record per source photo, then `faces.capture_variants` records per photo for its simulated captures
    (`fxassets.captures`: the same photo and person, a `capture` spec, their own sample id and seed)."""
    records = []
    for src in list_sources(root / faces.source, effect.samples):
        base = {
            "sample_id": src.sample_id,
            "source": _relative(src.path, root),
            "source_sha256": sha256_file(src.path),
            "person_id": src.person_id,
            "attributes": src.attributes,
            "prompt": effect.prompt,
            "negative_prompt": effect.negative_prompt,
            "seed": sample_seed(effect.seed, src.sample_id),
        }
        records.append(base)
        for k in range(1, faces.capture_variants + 1):
            vid = variant_id(src.sample_id, k)
            records.append({**base, "sample_id": vid, "seed": sample_seed(effect.seed, vid), "capture": draw_capture(src.sample_id, k)})
    return records


def run_prompts(faces: FacesConfig, effect: EffectConfig, out_dir: Path, root: Path) -> dict[str, Any]:
    records = build_prompts(faces, effect, root)
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "prompts.jsonl", records)
    return {"samples": len(records), "people": len({r["person_id"] for r in records})}
