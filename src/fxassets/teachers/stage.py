"""The `teacher_images` stage: run the teacher on every prompt record; one output image and one record each.

Resumable and idempotent: each finished sample is written atomically to a per-sample cache outside the DVC out
(`.cache/fxassets/teacher/<key>.png` + `<key>.json`, `$FXASSETS_CACHE` moves it), keyed by
sha256(source bytes, prompt, negative prompt, attributes, seed, teacher fingerprint). A killed run, run again,
computes only the samples it had not finished; then the out folder is assembled from the cache in one atomic
step (DVC deletes a stage's outs before running it, so the cache cannot live inside them).

A source that cannot be read becomes a record with `status: "error"` and a reason, never a crash; so does a
sample the teacher refuses (e.g. a safety checker)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fxassets.captures import apply_capture
from fxassets.core.atomic import atomic_dir, clear_stale, read_jsonl, write_json, write_jsonl
from fxassets.core.hashing import sha256_file
from fxassets.core.images import ImageError, read_rgb, write_png
from fxassets.faces.scale import FaceScaler, teacher_view
from fxassets.teachers import SampleRejected, Teacher, TeacherError
from fxassets.core.paths import cache_root

# no `seconds`: the records are an output, a function of the inputs (the run's timings: the stage's summary)
RECORD_FIELDS = ("sample_id", "source", "person_id", "seed", "prompt", "teacher", "status", "reason", "image")


def sample_key(source_sha256: str, record: dict[str, Any], teacher_hash: str) -> str:
    """The cache key of one sample: everything its output depends on."""
    parts = [source_sha256, record.get("prompt", ""), record.get("negative_prompt", ""), record.get("attributes") or {}, int(record["seed"]), teacher_hash]
    if record.get("capture"):  # a simulated capture (fxassets.captures); plain photos keep the keys they had
        parts.append(record["capture"])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class SampleCache:
    """One finished sample = `<key>.json` (written last) + `<key>.png` (when it has an image), each atomic."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def png(self, key: str) -> Path:
        return self.folder / f"{key}.png"

    def get(self, key: str) -> dict[str, Any] | None:
        meta = self.folder / f"{key}.json"
        if not meta.is_file():
            return None
        try:
            entry = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if entry.get("status") == "ok" and not self.png(key).is_file():
            return None
        return entry

    def put(self, key: str, image: np.ndarray | None, entry: dict[str, Any]) -> None:
        if image is not None:
            write_png(self.png(key), image)
        write_json(self.folder / f"{key}.json", {**entry, "key": key})


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i : i + size]


def compute_samples(
    todo: list[tuple[str, dict[str, Any]]],
    cache: SampleCache,
    run_batch: Callable[[list[dict[str, Any]]], list[Any]],
    batch_size: int,
    bar: tqdm,
    runtime: Callable[[], dict[str, Any]] = dict,
) -> None:
    """Run `run_batch` over the records not yet cached, `batch_size` at a time, and cache each result as it comes.

    `run_batch(records)` returns one RGB uint8 image, `SampleRejected` or `ImageError` per record. A `TeacherError`
    stops the run, its message naming the sample (the batch's, when the teacher does not say which)."""
    for chunk in batches(todo, batch_size):
        t0 = time.perf_counter()
        try:
            outs = run_batch([rec for _, rec in chunk])
        except TeacherError as exc:
            which = exc.sample or ", ".join(str(rec["sample_id"]) for _, rec in chunk)
            exc.args = (f"sample {which}: {exc}; the samples finished before it are cached: run again to continue",)
            raise
        each = round((time.perf_counter() - t0) / len(chunk), 4)
        where = runtime()
        for (key, rec), out in zip(chunk, outs, strict=True):
            base = {"sample_id": rec["sample_id"], "seed": rec["seed"], "prompt": rec.get("prompt", ""), "seconds": each, "runtime": where}
            if isinstance(out, SampleRejected):
                cache.put(key, None, {**base, "status": "error", "reason": str(out)})
            elif isinstance(out, np.ndarray):
                cache.put(key, out, {**base, "status": "ok", "reason": ""})
            # a plain ImageError (a bad source) is not cached: reading it again is cheap
        bar.update(len(chunk))


def run_teacher_images(teacher: Teacher, prompts_path: Path, out_dir: Path, root: Path, progress: bool = True,
                       faces: Any = None, executor: Any = "local", build: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """`faces`: the FacesConfig; with `faces.teacher_eye_distance` > 0 the teacher sees each photo resized so that
    its face has that eye distance (`fxassets.faces.scale`), and the sample keys include it.

    `executor`: `teacher.executor`; with a `RayExecutor` the uncached samples run on a Ray actor pool
    (`teachers/ray_pool.py`), each actor building the teacher from `build` (the `teacher:` config and the effect's
    teacher settings); the cache and the outputs are the same as local."""
    if not prompts_path.is_file():
        raise FileNotFoundError(f"{prompts_path}: prompts not found; run the prompts stage first")
    t_start = time.perf_counter()
    prompts = read_jsonl(prompts_path)
    teacher.bind_root(root)
    fp = teacher.fingerprint()
    eye_px, key_hash = teacher_view(teacher, faces)  # the outputs depend on the face scale the teacher saw too
    cache = SampleCache(cache_root(root) / "teacher")
    clear_stale(cache.folder)  # the temp files of a run killed while writing a sample

    rows: list[dict[str, Any]] = []
    keys: list[str | None] = []
    todo: list[tuple[str, dict[str, Any]]] = []
    for rec in prompts:
        row = {k: rec[k] for k in ("sample_id", "source", "person_id", "seed", "prompt")}
        if rec.get("capture"):
            row["capture"] = rec["capture"]
        row.update(teacher=fp["hash"], status="error", reason="", image="")
        rows.append(row)
        try:
            key = sample_key(sha256_file(root / rec["source"]), rec, key_hash)
        except OSError as exc:
            row["reason"] = f"{root / rec['source']}: file not found" if isinstance(exc, FileNotFoundError) else f"{root / rec['source']}: {exc}"
            keys.append(None)
            continue
        keys.append(key)
        if cache.get(key) is None:
            todo.append((key, rec))

    errors: dict[str, str] = {}  # sample_id -> reason, for sources that cannot be read

    def run_batch(recs: list[dict[str, Any]]) -> list[Any]:
        out: list[Any] = [None] * len(recs)
        imgs, idx = [], []
        for i, rec in enumerate(recs):
            try:
                imgs.append(apply_capture(read_rgb(root / rec["source"]), rec.get("capture")))
                idx.append(i)
            except ImageError as exc:
                errors[rec["sample_id"]] = str(exc)
                out[i] = exc
        if imgs:
            edited, _ = scaler.edit(teacher, imgs, [recs[i] for i in idx])
            for i, src, o in zip(idx, imgs, edited, strict=True):
                if isinstance(o, np.ndarray) and o.shape != src.shape:
                    raise ImageError(f"the {teacher.kind} teacher returned {o.shape}, expected {src.shape}")
                out[i] = o
        return out

    computed = len(todo)
    on_ray = executor != "local" and computed > 0
    pool: Any = None
    # run_session: a teacher behind a paid API checks its cost estimate for the uncached samples before any request
    with FaceScaler(0 if on_ray else eye_px, *((faces.detector, faces.min_score) if eye_px and not on_ray else ())) as scaler, \
            teacher.run_session(computed), tqdm(total=len(prompts), initial=len(prompts) - computed, desc=f"teacher {fp['kind']}", unit="img", disable=not progress) as bar:
        if on_ray:
            pool = _run_on_ray(teacher, todo, cache, root, executor, build, (eye_px, faces), errors, bar, progress)
        else:
            compute_samples(todo, cache, run_batch, teacher.batch_size, bar, teacher.runtime)
    t_teacher = time.perf_counter()

    fresh = {key for key, _ in todo}
    reused, secs = 0, 0.0
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        for row, key in zip(rows, keys, strict=True):
            if key is None:
                continue
            entry = cache.get(key)
            if entry is None:  # only a source that could not be read
                row.update(reason=errors.get(row["sample_id"], "source could not be read"))
                continue
            row.update(status=entry["status"], reason=entry["reason"])
            secs += entry["seconds"]  # those of the run that computed the sample
            reused += key not in fresh
            if entry["status"] == "ok":
                shutil.copyfile(cache.png(key), tmp / "images" / f"{row['sample_id']}.png")
                row["image"] = f"images/{row['sample_id']}.png"
        write_jsonl(tmp / "records.jsonl", rows)
        write_json(tmp / "teacher.json", fp)
    ok = sum(r["status"] == "ok" for r in rows)
    return {
        "samples": len(rows),
        "ok": ok,
        "errors": len(rows) - ok,
        "computed": computed,
        "cached": reused,
        "teacher": fp,
        "runtime": (pool.runtime if pool is not None else teacher.runtime()) if computed else {},
        **({"ray": pool.summary()} if pool is not None else {}),
        "seconds_per_sample": round(secs / max(1, len(rows)), 4),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "assemble_seconds": round(time.perf_counter() - t_teacher, 3),
    }


def _run_on_ray(teacher: Teacher, todo: list[tuple[str, dict[str, Any]]], cache: SampleCache, root: Path, ex: Any,
                build: tuple[Any, Any] | None, view: tuple[float, Any], errors: dict[str, str], bar: tqdm,
                progress: bool) -> Any:
    """The uncached samples on a Ray actor pool (`teachers/ray_pool.py`); each result cached as it arrives."""
    from fxassets.teachers.ray_pool import Budget, run_on_ray

    if build is None:
        raise ValueError("teacher.executor: the Ray executor needs the teacher's config to build it on the workers")
    eye_px, faces = view
    shape: dict[str, tuple[int, ...]] = {}

    def read(rec: dict[str, Any]) -> np.ndarray | None:
        try:
            img = apply_capture(read_rgb(root / rec["source"]), rec.get("capture"))
        except ImageError as exc:
            errors[rec["sample_id"]] = str(exc)
            return None
        shape[rec["sample_id"]] = img.shape
        return img

    runtimes: list[dict[str, Any]] = []

    def store(key: str, rec: dict[str, Any], out: Any, seconds: float, where: dict[str, Any]) -> None:
        if isinstance(out, np.ndarray) and out.shape != shape.get(rec["sample_id"]):
            raise ImageError(f"the {teacher.kind} teacher returned {out.shape}, expected {shape.get(rec['sample_id'])}")
        base = {"sample_id": rec["sample_id"], "seed": rec["seed"], "prompt": rec.get("prompt", ""), "seconds": seconds, "runtime": where}
        if isinstance(out, SampleRejected):
            cache.put(key, None, {**base, "status": "error", "reason": str(out)})
        elif isinstance(out, np.ndarray):
            cache.put(key, out, {**base, "status": "ok", "reason": ""})
        if not runtimes:
            runtimes.append(where)

    cfg = getattr(teacher, "cfg", None)
    price = float(getattr(cfg, "price", 0.0) or 0.0) if hasattr(teacher, "client") else 0.0
    budget = Budget(price, float(cfg.max_cost)) if price > 0 else None
    det = (faces.detector, faces.min_score) if eye_px else ("short", 0.5)
    stats = run_on_ray(todo, read, store, ex, (build[0], build[1], str(root), eye_px, *det), teacher.batch_size, bar,
                       budget, progress)

    class Pool:
        runtime = runtimes[0] if runtimes else {}

        @staticmethod
        def summary() -> dict[str, Any]:
            return {"address": ex.address, "workers": stats.workers, "replaced": stats.restarts,
                    "batches_sent_again": stats.resent_batches, "samples_per_worker": stats.per_worker,
                    "startup_seconds": stats.startup_seconds, "cluster": stats.resources,
                    **({"spent_usd": round(budget.spent, 4)} if budget is not None else {})}

    return Pool()
