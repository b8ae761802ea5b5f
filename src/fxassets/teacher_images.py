"""The `teacher_images` stage: run the teacher on every prompt record; one output image and one record each.

A source that cannot be read becomes a record with `status: "error"` and a reason, never a crash."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fxassets.atomic import atomic_dir, read_jsonl, write_json, write_jsonl
from fxassets.images import ImageError, read_rgb, write_png
from fxassets.teachers import Teacher


def run_teacher_images(teacher: Teacher, prompts_path: Path, out_dir: Path, root: Path, progress: bool = True) -> dict[str, Any]:
    if not prompts_path.is_file():
        raise FileNotFoundError(f"{prompts_path}: prompts not found; run the prompts stage first")
    prompts = read_jsonl(prompts_path)
    fp = teacher.fingerprint()
    records = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for rec in tqdm(prompts, desc=f"teacher {fp['kind']}", unit="img", disable=not progress):
            row: dict[str, Any] = {
                "sample_id": rec["sample_id"],
                "source": rec["source"],
                "person_id": rec["person_id"],
                "seed": rec["seed"],
                "prompt": rec["prompt"],
                "teacher": fp["hash"],
            }
            t0 = time.perf_counter()
            try:
                src = read_rgb(root / rec["source"])
                out = teacher.edit(src, rec)
                if out.shape != src.shape:
                    raise ImageError(f"teacher returned {out.shape}, expected {src.shape}")
                write_png(tmp / "images" / f"{rec['sample_id']}.png", out)
                row.update(status="ok", reason="", image=f"images/{rec['sample_id']}.png")
            except ImageError as exc:
                row.update(status="error", reason=str(exc), image="")
            row["seconds"] = round(time.perf_counter() - t0, 4)
            records.append(row)
        write_jsonl(tmp / "records.jsonl", records)
        write_json(tmp / "teacher.json", fp)
    ok = sum(r["status"] == "ok" for r in records)
    secs = sum(r["seconds"] for r in records)
    return {"samples": len(records), "ok": ok, "errors": len(records) - ok, "teacher": fp, "seconds_per_sample": round(secs / max(1, len(records)), 4)}
