"""The source faces: photos in a folder, with person ids (and age / gender / ethnicity) from a manifest.csv
beside them when it exists; otherwise each file is its own person."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fxassets.core.images import distinct_stems, list_images


# columns of a manifest.csv carried into the prompt records (generated sources add the skin-tone ones)
ATTRIBUTES = ("age", "gender", "ethnicity", "skin_tone", "age_group", "skin_group")


@dataclass(frozen=True)
class SourceFace:
    sample_id: str
    path: Path
    person_id: str
    attributes: dict[str, str] = field(default_factory=dict)


def _read_manifest(folder: Path) -> dict[str, dict[str, str]]:
    path = folder / "manifest.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "file" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a 'file' column (and optionally 'person_id', 'age', 'gender', ...)")
        return {row["file"]: row for row in reader}


def list_sources(folder: str | Path, limit: int = 0) -> list[SourceFace]:
    """Sorted source faces of `folder`; `limit` > 0 keeps the first `limit` files."""
    folder = Path(folder)
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no images (.jpg, .jpeg, .png, .bmp, .webp) in the source folder")
    meta = _read_manifest(folder)
    ids = distinct_stems(files)  # x.jpg and x.png: samples x_jpg and x_png, not two samples x writing one image
    if limit:
        files = files[:limit]
    out = []
    for p in files:
        row = meta.get(p.name, {})
        person = row.get("person_id") or ids[p]
        attrs = {k: v for k, v in row.items() if k in ATTRIBUTES and v}
        out.append(SourceFace(sample_id=ids[p], path=p, person_id=person, attributes=attrs))
    return out


def heldout_people(person_ids: list[str], fraction: float, seed: int = 0) -> set[str]:
    """A deterministic split by person: the people whose salted hash sorts first are held out.

    At least one person is held out (and one kept) whenever there are two or more people."""
    people = sorted(set(person_ids))
    if len(people) < 2:
        return set()
    n = min(max(1, round(len(people) * fraction)), len(people) - 1)
    ranked = sorted(people, key=lambda p: hashlib.sha1(f"{seed}:{p}".encode()).hexdigest())
    return set(ranked[:n])
