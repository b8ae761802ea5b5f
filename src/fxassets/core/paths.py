"""Where each stage writes, per effect (relative to the project root). `dvc.yaml` names the same paths."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STAGES = ("prompts", "teacher_images", "face_pairs", "student_checkpoint", "mobile_model")

# Each stage's code, in one place: package folders and modules under src/fxassets/ that the stage function's import
# closure reaches (tests/test_layout.py checks it). dvc.yaml lists the same entries as `src/fxassets/<entry>` deps
# (checked too), Dagster's code versions hash them (orchestration/project.py) and the training resume key hashes
# student_checkpoint's (train/state.py `run_key`). A package `__init__.py` with no code needs no entry.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "prompts": ("stages.py", "core", "prompts.py", "sources.py", "captures.py"),
    "teacher_images": ("stages.py", "core", "captures.py", "faces", "teachers"),  # faces: the face scale the teacher sees
    "face_pairs": ("stages.py", "core", "captures.py", "sources.py", "faces", "pairs"),
    "student_checkpoint": ("stages.py", "core", "captures.py", "faces", "pairs", "train"),
    "mobile_model": ("stages.py", "core", "export", "train/student.py"),
}
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/fxassets


def stage_code_deps(stage: str) -> list[str]:
    """The stage's code entries as dvc.yaml names them (relative to the project root)."""
    return [f"src/fxassets/{entry}" for entry in STAGE_CODE[stage]]


def stage_code_files(stage: str, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every source file of the stage's code entries, sorted (no caches, no bytecode)."""
    files: set[Path] = set()
    for entry in STAGE_CODE[stage]:
        p = package_dir / entry
        files.update(f for f in p.rglob("*.py") if "__pycache__" not in f.parts) if p.is_dir() else files.add(p)
    return sorted(files)


@dataclass(frozen=True)
class EffectPaths:
    root: Path
    effect: str

    def _d(self, stage: str) -> Path:
        return self.root / "data" / stage / self.effect

    # prompts
    @property
    def prompts_dir(self) -> Path:
        return self._d("prompts")

    @property
    def prompts(self) -> Path:
        return self.prompts_dir / "prompts.jsonl"

    # teacher_images: images/<sample_id>.png + records.jsonl
    @property
    def teacher_dir(self) -> Path:
        return self._d("teacher_images")

    @property
    def teacher_records(self) -> Path:
        return self.teacher_dir / "records.jsonl"

    # face_pairs: source/<id>.png, target/<id>.png, manifest.parquet, summary.json
    @property
    def pairs_dir(self) -> Path:
        return self._d("face_pairs")

    @property
    def manifest(self) -> Path:
        return self.pairs_dir / "manifest.parquet"

    # student_checkpoint
    @property
    def student_dir(self) -> Path:
        return self._d("student")

    @property
    def checkpoint(self) -> Path:
        return self.student_dir / "student.safetensors"

    @property
    def train_metrics(self) -> Path:
        return self.student_dir / "metrics.json"

    @property
    def train_curve(self) -> Path:
        return self.student_dir / "curve.csv"

    # mobile_model
    @property
    def mobile_dir(self) -> Path:
        return self._d("mobile")

    @property
    def onnx_fp32(self) -> Path:
        return self.mobile_dir / "student.onnx"

    @property
    def onnx_int8(self) -> Path:
        return self.mobile_dir / "student.int8.onnx"

    @property
    def onnx_ort(self) -> Path:
        return self.mobile_dir / "student.int8.ort"

    @property
    def grid(self) -> Path:
        return self.mobile_dir / "grid.png"

    @property
    def model_card(self) -> Path:
        return self.mobile_dir / "MODEL_CARD.md"

    @property
    def mobile_report(self) -> Path:
        return self.mobile_dir / "report.json"

    @property
    def mobile_targets(self) -> Path:  # the LiteRT / ExecuTorch / Core ML files and targets.json (export.targets)
        return self.mobile_dir / "targets"

    # the figures `dvc exp show` lists (fxassets.stages.EXP_METRICS), tracked by git, not under data/
    def exp_metrics(self, stage: str) -> Path:
        return self.root / "metrics" / stage / f"{self.effect}.json"


def cache_root(root: Path) -> Path:
    """Where resumable work is kept: `$FXASSETS_CACHE` or `<project root>/.cache/fxassets` (gitignored)."""
    env = os.environ.get("FXASSETS_CACHE")
    return Path(env) if env else Path(root) / ".cache" / "fxassets"
