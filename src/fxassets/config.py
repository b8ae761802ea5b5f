"""`params.yaml`: the one config of the pipeline, validated with pydantic on load.

Every stage reads a slice of it (see `dvc.yaml`, which names exactly those slices).  A typo or a wrong type fails
with a `ConfigError` naming the file, the key path and the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_PARAMS = Path("params.yaml")

_EFFECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class ConfigError(ValueError):
    """A problem with params.yaml; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FacesConfig(_Strict):
    source: Path = Field(Path("data/samples/faces"), description="folder of source photos (jpg/png)")
    crop_size: int = Field(256, ge=64, le=1024, description="aligned crop size in pixels")
    margin: float = Field(0.45, ge=0.0, le=2.0, description="extra framing around the face template")
    detector: Literal["short", "full"] = "short"
    min_score: float = Field(0.5, ge=0.0, le=1.0)
    multiple_faces: Literal["reject", "largest"] = "reject"
    holdout_fraction: float = Field(0.12, gt=0.0, lt=1.0, description="share of people kept for evaluation")
    split_seed: int = 0


class ClassicalTeacher(_Strict):
    """OpenCV stylizations: runs anywhere on a CPU in milliseconds a face."""

    kind: Literal["classical"] = "classical"
    sigma_s: float = Field(60.0, gt=0, le=200, description="spatial extent of the edge-preserving filter")
    sigma_r: float = Field(0.45, gt=0, le=1, description="range extent (cartoon, oil, watercolor)")
    sketch_sigma_r: float = Field(0.07, gt=0, le=1, description="range extent of the pencil sketch")
    shade_factor: float = Field(0.05, gt=0, le=0.1, description="pencil sketch shading")


TeacherConfig = Annotated[Union[ClassicalTeacher], Field(discriminator="kind")]


class EffectTeacher(_Strict):
    """Per-effect teacher settings (what the effect asks of whichever teacher runs it)."""

    style: Literal["cartoon", "sketch", "color_sketch", "oil", "watercolor"] = "cartoon"


class EffectConfig(_Strict):
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    samples: int = Field(0, ge=0, description="number of source faces to use; 0 = all")
    seed: int = 0
    teacher: EffectTeacher = EffectTeacher()


class TrainConfig(_Strict):
    encoder: str = "mobilenetv3_small_100"
    width: float = Field(1.0, gt=0, le=2, description="decoder width multiplier")
    steps: int = Field(1200, ge=1)
    max_seconds: float = Field(0, ge=0, description="wall-clock budget; 0 = steps only")
    batch_size: int = Field(16, ge=1)
    crop: int = Field(128, ge=32, description="random training crop of the aligned pairs")
    lr: float = Field(2e-3, gt=0)
    l1_weight: float = Field(1.0, ge=0)
    ssim_weight: float = Field(0.5, ge=0)
    eval_every: int = Field(200, ge=1)
    seed: int = 0
    threads: int = Field(2, ge=1)


class ExportConfig(_Strict):
    opset: int = Field(18, ge=17)
    calibration_samples: int = Field(16, ge=1)
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    min_parity_db: float = Field(38.0, description="PSNR of int8 against fp32 on held-out pairs")
    latency_runs: int = Field(50, ge=1)
    grid_samples: int = Field(4, ge=1)


class Params(_Strict):
    faces: FacesConfig = FacesConfig()
    teacher: TeacherConfig = ClassicalTeacher()
    effects: dict[str, EffectConfig]
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("effects")
    @classmethod
    def _effect_names(cls, v: dict[str, EffectConfig]) -> dict[str, EffectConfig]:
        if not v:
            raise ValueError("at least one effect is needed")
        for name in v:
            if not _EFFECT_NAME.match(name):
                raise ValueError(f"effect name {name!r} must be lower-case letters, digits, '-' or '_'")
        return v

    def effect(self, name: str) -> EffectConfig:
        if name not in self.effects:
            known = ", ".join(sorted(self.effects))
            raise ConfigError(f"unknown effect {name!r}; params.yaml defines: {known}")
        return self.effects[name]


def _loc(loc: tuple[Any, ...]) -> str:
    parts = []
    for p in loc:
        # pydantic puts the union tag (e.g. 'classical') into the location of discriminated unions
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def _explain(path: Path, err: ValidationError, raw: dict[str, Any]) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        loc = list(e["loc"])
        # drop the discriminator tag pydantic inserts after 'teacher'
        if len(loc) >= 2 and loc[0] == "teacher" and isinstance(raw.get("teacher"), dict):
            if loc[1] == raw["teacher"].get("kind", "classical"):
                loc.pop(1)
        key = _loc(tuple(loc))
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; raise ConfigError naming the file, key path and reason."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(path, exc, raw)) from exc


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able config parts (pydantic models are dumped first)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
