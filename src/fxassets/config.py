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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class _DiffusersTeacher(_Strict):
    """What every diffusers teacher shares: where the weights come from, how they run, what changes the output."""

    model: str = Field(min_length=1, description="a local diffusers folder (relative to the project root) or a hub id")
    revision: str | None = Field(None, description="hub revision (pin a commit sha); ignored for a local folder")
    variant: str | None = Field(None, description="weight file variant, e.g. 'fp16'")
    scheduler: str | None = Field(None, description="a diffusers scheduler class name; default: the model's own")
    steps: int = Field(25, ge=1, le=1000, description="num_inference_steps")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="classifier-free guidance; <= 1 turns it off")
    size: int = Field(512, ge=16, le=4096, multiple_of=8, description="working resolution (long side, px)")
    prompt_template: str = Field("{prompt}", min_length=1, description="'{prompt}' and source attributes ({age}, ...)")
    batch_size: int = Field(1, ge=1, le=256, description="samples per pipeline call (never changes an output)")
    device: Literal["auto", "cuda", "cpu", "mps"] = Field("auto", description="auto: CUDA when present, else CPU")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="auto: fp16 on CUDA, else fp32")

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        import string

        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid template: {exc}") from None
        bad = sorted(n for n in names if not re.fullmatch(r"[a-z_]+", n))
        if bad:
            raise ValueError(f"template fields must be plain names like {{prompt}} or {{age}}, got {bad}")
        return v


class Img2ImgTeacher(_DiffusersTeacher):
    """diffusers `AutoPipelineForImage2Image`: SD 1.5, SD 2.x, SDXL, SD-Turbo, SDXL-Turbo, ..."""

    kind: Literal["img2img"]
    strength: float = Field(0.6, gt=0, le=1, description="how much of the source is noised away (0..1)")

    @model_validator(mode="after")
    def _at_least_one_step(self) -> "Img2ImgTeacher":
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"steps * strength must be >= 1 (got {self.steps} * {self.strength}): no denoising step would run")
        return self


class InstructPix2PixTeacher(_DiffusersTeacher):
    """diffusers `StableDiffusionInstructPix2PixPipeline` (SDXL variant by the model's class): the prompt is an edit
    instruction, e.g. 'turn him into a cartoon'."""

    kind: Literal["instruct-pix2pix"]
    steps: int = Field(20, ge=1, le=1000, description="num_inference_steps")
    image_guidance_scale: float = Field(1.5, ge=0, le=50, description="how closely to keep the source image")


class Text2ImageTeacher(_DiffusersTeacher):
    """diffusers `AutoPipelineForText2Image`: generates source portraits (`fxassets generate-sources`); not an
    editing teacher, so not a valid `teacher:` in params.yaml."""

    kind: Literal["text2image"]


TeacherConfig = Annotated[Union[ClassicalTeacher, Img2ImgTeacher, InstructPix2PixTeacher], Field(discriminator="kind")]
"""The `teacher:` section: one editing teacher for every effect (changing it is a *teacher swap*)."""

DiffusersTeacherConfig = Union[Img2ImgTeacher, InstructPix2PixTeacher, Text2ImageTeacher]


class EffectTeacher(_Strict):
    """Per-effect teacher settings (what the effect asks of whichever teacher runs it)."""

    style: Literal["cartoon", "sketch", "color_sketch", "oil", "watercolor"] = Field("cartoon", description="classical teacher only")
    strength: float | None = Field(None, gt=0, le=1, description="img2img: overrides teacher.strength for this effect")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="diffusers: overrides teacher.guidance_scale")


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
