"""The `face_pairs` stage: detect the face in each source photo, align source and teacher output with the same
similarity transform, and write the crops with a manifest (one row per sample, `status` pass / reject + reason)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from fxassets.atomic import atomic_dir, atomic_path, read_jsonl, write_json
from fxassets.config import FacesConfig
from fxassets.faces import FaceDetector, align_matrix, select_face, warp_aligned
from fxassets.images import ImageError, read_png_rgb, read_rgb, write_png
from fxassets.sources import heldout_people

MANIFEST_COLUMNS = [
    "sample_id", "person_id", "split", "status", "reason", "source", "target", "source_file",
    "det_score", "num_faces", "face_width", "align_matrix", "image_width", "image_height",
]


def _reject(row: dict[str, Any], reason: str) -> dict[str, Any]:
    row.update(status="reject", reason=reason, source="", target="")
    return row


def run_face_pairs(faces: FacesConfig, teacher_dir: Path, out_dir: Path, root: Path, progress: bool = True) -> dict[str, Any]:
    records_path = teacher_dir / "records.jsonl"
    if not records_path.is_file():
        raise FileNotFoundError(f"{records_path}: teacher records not found; run the teacher_images stage first")
    records = read_jsonl(records_path)
    held = heldout_people([r["person_id"] for r in records], faces.holdout_fraction, faces.split_seed)
    size = faces.crop_size
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp, FaceDetector(faces.detector, faces.min_score) as det:
        (tmp / "source").mkdir()
        (tmp / "target").mkdir()
        for rec in tqdm(records, desc="face pairs", unit="pair", disable=not progress):
            sid = rec["sample_id"]
            row: dict[str, Any] = {
                "sample_id": sid, "person_id": str(rec["person_id"]),
                "split": "heldout" if rec["person_id"] in held else "train",
                "source_file": rec["source"], "det_score": float("nan"), "num_faces": 0, "face_width": float("nan"),
                "align_matrix": [], "image_width": 0, "image_height": 0,
            }
            if rec["status"] != "ok":
                rows.append(_reject(row, f"teacher error: {rec['reason']}"))
                continue
            try:
                src = read_rgb(root / rec["source"])
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
            face, reason = select_face(found, faces.multiple_faces)
            if face is None:
                rows.append(_reject(row, reason))
                continue
            M = align_matrix(face, size, faces.margin)
            write_png(tmp / "source" / f"{sid}.png", warp_aligned(src, M, size))
            write_png(tmp / "target" / f"{sid}.png", warp_aligned(tgt, M, size))
            row.update(
                status="pass", reason="", source=f"source/{sid}.png", target=f"target/{sid}.png",
                det_score=float(face.score), face_width=float(face.box[2]),
                align_matrix=[float(v) for v in np.asarray(M).ravel()],
            )
            rows.append(row)
        df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        with atomic_path(tmp / "manifest.parquet") as p:
            df.to_parquet(p, index=False)
        summary = summarize(df)
        summary["seconds_per_pair"] = round((time.perf_counter() - t0) / max(1, len(rows)), 4)
        write_json(tmp / "summary.json", summary)
    return summary


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    passed = df[df.status == "pass"]
    return {
        "pairs": int(len(df)),
        "kept": int(len(passed)),
        "rejected": int((df.status != "pass").sum()),
        "rejected_by_reason": dict(Counter(df.loc[df.status != "pass", "reason"])),
        "train_pairs": int((passed.split == "train").sum()),
        "heldout_pairs": int((passed.split == "heldout").sum()),
    }
