"""The face_pairs manifest (`data/face_pairs/<effect>/manifest.parquet`), read in one place: the rows that passed,
with a clear error for a missing file or missing columns. Training and export both read it through `read_pairs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = ("sample_id", "person_id", "split", "status", "source", "target")


def read_pairs(pairs_dir: str | Path) -> Any:
    """The manifest's passing rows (a pandas DataFrame, index reset), in the manifest's order."""
    import pandas as pd

    path = Path(pairs_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no face_pairs manifest (run the face_pairs stage first)")
    df = pd.read_parquet(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing}")
    return df[df["status"] == "pass"].reset_index(drop=True)
