"""The `face_pairs` stage: detect the face in each source photo, align source and teacher output with the same
similarity transform, measure every aligned pair (`fxassets.pairs.quality`) and run the quality gate over the set
(`fxassets.pairs.gate`); write the crops with a manifest (one row per sample, `status` pass / reject + reason, the
metrics), `summary.json`, `gate.json`, the great-expectations Data Docs (`gx_docs/`) and the balance report.

The stage always completes, whatever the gate says: a failed gate blocks training, not this stage."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from fxassets.captures import apply_capture
from fxassets.core.atomic import atomic_dir, atomic_path, read_jsonl, write_json
from fxassets.core.config import FacesConfig, QualityConfig
from fxassets.faces.detect import Face, FaceDetector, select_faces
from fxassets.faces.align import align_matrix, warp_aligned
from fxassets.pairs.gate import ROW_CHECKS, run_gate
from fxassets.core.images import ImageError, read_png_rgb, read_rgb, write_png
from fxassets.pairs.quality import CROP_MIN_SCORE, METRIC_COLUMNS, PairMeter
from fxassets.sources import heldout_people, list_sources

MANIFEST_COLUMNS = [
    "sample_id", "person_id", "split", "status", "reason", "source", "target", "source_file",
    "det_score", "num_faces", "face_width", "align_matrix", "image_width", "image_height",
    "age", "gender", *METRIC_COLUMNS, "duplicate_of", "duplicate_distance", "failed_checks",
]


def _attributes(folder: Path) -> dict[str, dict[str, str]]:
    """sample_id -> the source's attributes (age, gender, ...) from the manifest.csv of the source folder."""
    try:
        return {s.sample_id: s.attributes for s in list_sources(folder)}
    except (FileNotFoundError, ValueError):
        return {}


def _age(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _reject(row: dict[str, Any], reason: str, check: str = "input") -> dict[str, Any]:
    row.update(status="reject", reason=reason, source="", target="", failed_checks=check)
    return row


def run_face_pairs(
    faces: FacesConfig, teacher_dir: Path, out_dir: Path, root: Path, progress: bool = True,
    quality: QualityConfig | None = None,
) -> dict[str, Any]:
    """`quality`: the gate's thresholds (default: QualityConfig()); age and gender come from the source folder's
    manifest.csv when it has them."""
    quality = quality or QualityConfig()
    attributes = _attributes(root / faces.source)
    records_path = teacher_dir / "records.jsonl"
    if not records_path.is_file():
        raise FileNotFoundError(f"{records_path}: teacher records not found; run the teacher_images stage first")
    records = read_jsonl(records_path)
    held = heldout_people([r["person_id"] for r in records], faces.holdout_fraction, faces.split_seed)
    size = faces.crop_size
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    metric_seconds = 0.0
    with atomic_dir(out_dir) as tmp, FaceDetector(faces.detector, faces.min_score) as det, FaceDetector("short", CROP_MIN_SCORE) as crop_det:
        meter = PairMeter(crop_det, size, faces.margin)
        (tmp / "source").mkdir()
        (tmp / "target").mkdir()

        def _pair(row: dict[str, Any], face: Face, src: np.ndarray, tgt: np.ndarray, sid: str) -> dict[str, Any]:
            """Align, write and measure one face's pair; the row, passed or rejected with its reason."""
            nonlocal metric_seconds
            M = align_matrix(face, size, faces.margin)
            src_crop, tgt_crop = warp_aligned(src, M, size), warp_aligned(tgt, M, size)
            write_png(tmp / "source" / f"{sid}.png", src_crop)
            write_png(tmp / "target" / f"{sid}.png", tgt_crop)
            tm = time.perf_counter()
            try:
                row.update(meter.measure(src_crop, tgt_crop))
            except (RuntimeError, ValueError, cv2.error) as exc:  # dlib raises RuntimeError
                return _reject(row, f"quality metrics failed: {exc}", "metrics")
            finally:
                metric_seconds += time.perf_counter() - tm
            row.update(
                status="pass", reason="", source=f"source/{sid}.png", target=f"target/{sid}.png",
                det_score=float(face.score), face_width=float(face.box[2]),
                align_matrix=[float(v) for v in np.asarray(M).ravel()],
            )
            return row

        for rec in tqdm(records, desc="face pairs", unit="pair", disable=not progress):
            sid = rec["sample_id"]
            row: dict[str, Any] = {
                "sample_id": sid, "person_id": str(rec["person_id"]),
                # a held-out person's simulated captures: kept apart, neither trained on nor in the held-out figures
                "split": ("heldout_capture" if rec.get("capture") else "heldout") if rec["person_id"] in held else "train",
                "source_file": rec["source"], "det_score": float("nan"), "num_faces": 0, "face_width": float("nan"),
                "align_matrix": [], "image_width": 0, "image_height": 0,
                "age": _age(attributes.get(sid, {}).get("age")), "gender": attributes.get(sid, {}).get("gender"),
                **METRIC_COLUMNS, "failed_checks": "",
            }
            if rec["status"] != "ok":
                rows.append(_reject(row, f"teacher error: {rec['reason']}"))
                continue
            try:
                src = apply_capture(read_rgb(root / rec["source"]), rec.get("capture"))
                tgt = read_png_rgb(teacher_dir / rec["image"])
            except ImageError as exc:
                rows.append(_reject(row, str(exc)))
                continue
            row.update(image_width=src.shape[1], image_height=src.shape[0])
            if tgt.shape != src.shape:
                rows.append(_reject(row, f"teacher output is {tgt.shape[1]}x{tgt.shape[0]}, source {src.shape[1]}x{src.shape[0]}"))
                continue
            found = det.detect(src)
            row["num_faces"] = len(found)
            chosen, reason = select_faces(found, faces.multiple_faces)
            if not chosen:
                rows.append(_reject(row, reason, "face_detection"))
                continue
            for k, face in enumerate(chosen):  # several only with multiple_faces: all
                # each further face of a photo is its own person, on the photo's side of the split
                fid = sid if k == 0 else f"{sid}_face{k}"
                frow = {**row, "sample_id": fid, "person_id": row["person_id"] if k == 0 else f"{row['person_id']}_face{k}"}
                rows.append(_pair(frow, face, src, tgt, fid))
        measured = int(sum(1 for r in rows if r["status"] == "pass"))
        df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        tg = time.perf_counter()
        crops = dict(zip(df["sample_id"], df["source"]))

        def face_distance(a: str, b: str) -> float:  # only for the rare hash matches of two person ids
            return meter.identity.between(read_png_rgb(tmp / crops[a]), read_png_rgb(tmp / crops[b]))

        df, gate = run_gate(df, quality, tmp, title=f"face pairs of {out_dir.name}", face_distance=face_distance)
        gate_seconds = time.perf_counter() - tg
        with atomic_path(tmp / "manifest.parquet") as p:
            df.to_parquet(p, index=False)
        summary = {**summarize(df, quality), "gate_passed": gate["passed"]}
        write_json(tmp / "summary.json", summary)  # no timings: an output holds what its inputs decide
    return {**summary, "seconds_per_pair": round((time.perf_counter() - t0) / max(1, len(rows)), 4),
            "metrics_seconds_per_pair": round(metric_seconds / max(1, measured), 4),
            "gate_seconds": round(gate_seconds, 2)}


def summarize(df: pd.DataFrame, quality: QualityConfig | None = None) -> dict[str, Any]:
    """Counts; a quality rejection is counted under the rule of its first failed check (all of them: gate.json)."""
    rules = {c.name: c.rule(quality or QualityConfig()) for c in ROW_CHECKS}
    rules["duplicate"] = "near-duplicate of an earlier pair"
    passed = df[df.status == "pass"]
    rejected = df[df.status != "pass"]
    first = [fc.split(",")[0] if isinstance(fc, str) else "" for fc in rejected.get("failed_checks", pd.Series([""] * len(rejected)))]
    keys = [rules.get(c, reason) for c, reason in zip(first, rejected["reason"])]
    return {
        "pairs": int(len(df)),
        "kept": int(len(passed)),
        "rejected": int(len(rejected)),
        "rejected_by_reason": dict(Counter(keys)),
        "train_pairs": int((passed.split == "train").sum()),
        "heldout_pairs": int((passed.split == "heldout").sum()),
    }
