"""`params.yaml`: the one config of the pipeline, validated with pydantic on load.

Every stage reads a slice of it (see `dvc.yaml`, which names exactly those slices). A typo, a wrong type or a key
given twice fails with a `ConfigError` naming the file, the key path (or both lines) and the reason."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fxassets.core.api_config import GeminiImageTeacher, OpenAIImagesTeacher, check_template, retired_teacher
from fxassets.core.executor_config import Executor, check_address
from fxassets.core.yamlfile import YAMLError, load_yaml

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
    # px between the eyes in the photo the teacher sees (fxassets.faces.scale; 0: the photo as it is)
    teacher_eye_distance: float = Field(76.0, ge=0, le=2000)
    capture_variants: int = Field(0, ge=0, le=16, description="simulated captures per photo, each a teacher sample (fxassets.captures)")
    multiple_faces: Literal["reject", "largest", "all"] = Field("reject", description="photos with several faces: reject, the largest, or each face its own pair")
    holdout_fraction: float = Field(0.12, gt=0.0, lt=1.0, description="share of people kept for evaluation")
    split_seed: int = 0


class ClassicalTeacher(_Strict):
    """OpenCV stylizations: runs anywhere on a CPU in milliseconds a face."""

    kind: Literal["classical"] = "classical"
    sigma_s: float = Field(60.0, gt=0, le=200, description="spatial extent of the edge-preserving filter")
    sigma_r: float = Field(0.45, gt=0, le=1, description="range extent (cartoon, oil, watercolor)")
    sketch_sigma_r: float = Field(0.07, gt=0, le=1, description="range extent of the pencil sketch")
    shade_factor: float = Field(0.05, gt=0, le=0.1, description="pencil sketch shading")
    executor: Executor = "local"  # where the samples compute (core/executor_config.py); in no fingerprint


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
    executor: Executor = "local"

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        return check_template(v)


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


class LatentEditTeacher(_Strict):
    """The StyleGAN2 + StyleCLIP generation: a user's generator G (latent -> image, TorchScript or ONNX) and an
    edit direction d (.npy); source = G(w) (`fxassets generate-sources --from-params`, which writes w beside each
    image as .npy), target = G(w + strength * d). No photos, no network."""

    kind: Literal["latent-edit"]
    generator: str = Field(min_length=1, description="G: latent -> image; .onnx, or TorchScript (.pt/.ts/.torchscript)")
    mapping: str | None = Field(None, description="optional z -> latent network (e.g. StyleGAN's mapping, truncation baked in)")
    latent_shape: list[int] | None = Field(None, min_length=1, max_length=3, description="e.g. [512] or [14, 512]; read from a static ONNX input")
    direction: str = Field(min_length=1, description="the edit direction (.npy); '{prompt}' in the path picks one per effect prompt")
    strength: float = Field(1.0, ge=-100, le=100, description="target = G(w + strength * direction)")
    output_range: Literal["-1..1", "0..1", "0..255"] = Field("-1..1", description="G's pixel range (StyleGAN: -1..1)")
    size: int | None = Field(None, ge=16, le=4096, description="resize G's (square) images to this side (px); null: as G makes them")
    batch_size: int = Field(8, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    executor: Executor = "local"


TeacherConfig = Annotated[
    Union[ClassicalTeacher, Img2ImgTeacher, InstructPix2PixTeacher, GeminiImageTeacher, OpenAIImagesTeacher, LatentEditTeacher],
    Field(discriminator="kind"),
]
"""The `teacher:` section: one editing teacher for every effect (changing it is a *teacher swap*)."""

DiffusersTeacherConfig = Union[Img2ImgTeacher, InstructPix2PixTeacher, Text2ImageTeacher]


class EffectTeacher(_Strict):
    """Per-effect teacher settings (what the effect asks of whichever teacher runs it)."""

    style: Literal["cartoon", "sketch", "color_sketch", "oil", "watercolor"] = Field("cartoon", description="classical teacher only")
    strength: float | None = Field(None, gt=0, le=1, description="img2img: overrides teacher.strength for this effect")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="diffusers: overrides teacher.guidance_scale")


class QualityConfig(_Strict):
    """The pair quality gate (fxassets.pairs.gate, docs/quality.md). Row-level bounds reject single pairs with a reason;
    set-level bounds fail the gate, which blocks training. Distances and drifts are upper bounds, the rest lower."""

    min_source_det_score: float = Field(0.7, ge=0, le=1, description="BlazeFace score of the source photo's face")
    min_target_det_score: float = Field(0.5, ge=0, le=1, description="BlazeFace score of the face in the teacher's crop")
    max_landmark_drift: float = Field(0.15, gt=0, description="eyes/nose/mouth moved by the teacher, in eye distances")
    max_identity_distance: float = Field(0.7, gt=0, description="dlib face descriptor distance source-target (dlib: < 0.6 = same person)")
    min_source_sharpness: float = Field(250.0, ge=0, description="variance of the Laplacian of the source crop's face")
    min_sharpness_ratio: float = Field(0.25, ge=0, description="target / source variance of the Laplacian (a blurred teacher output)")
    min_exposure: float = Field(0.12, ge=0, le=1, description="mean luma (0..1) of the face, source and target")
    max_exposure: float = Field(0.9, ge=0, le=1)
    max_source_clipped: float = Field(0.1, ge=0, le=1, description="share of face pixels at 0-2 or 253-255 in the source")
    max_target_clipped: float = Field(0.6, ge=0, le=1, description="the same in the teacher output (a sketch is mostly paper white)")
    max_phash_distance: int = Field(4, ge=0, le=64, description="near-duplicate sources: 64-bit perceptual hash distance")
    min_pass_rate: float = Field(0.8, ge=0, le=1, description="set: share of pairs that pass every check")
    max_duplicate_share: float = Field(0.0, ge=0, le=1, description="set: share of pairs that near-duplicate an earlier one")
    min_identity_share: float = Field(0.9, ge=0, le=1, description="set: share of measured pairs within max_identity_distance")
    balance: bool = Field(False, description="set: require every skin-tone group to hold min_group_share of the kept pairs")
    min_group_share: float = Field(0.15, ge=0, le=1, description="with balance: the smallest share a skin-tone group may have")


class EffectConfig(_Strict):
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    samples: int = Field(0, ge=0, description="number of source faces to use; 0 = all")
    seed: int = 0
    teacher: EffectTeacher = EffectTeacher()
    quality: dict[str, float | bool] = Field(default_factory=dict, description="this effect's overrides of the quality: section")
    export: dict[str, float | int | str | list[str]] = Field(default_factory=dict, description="this effect's overrides of the export: section")
    train: dict[str, Any] = Field(default_factory=dict, description="this effect's overrides of the train: section")

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(TrainConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown train setting(s) {unknown}; known: {', '.join(TrainConfig.model_fields)}")
        try:
            with_overrides(TrainConfig(), v)  # nested keys and values checked now, not at training time
        except ValidationError as exc:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        return v

    @field_validator("export")
    @classmethod
    def _export_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(ExportConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown export setting(s) {unknown}; known: {', '.join(ExportConfig.model_fields)}")
        try:
            with_overrides(ExportConfig(), v)  # values checked now (a list such as targets), not at export time
        except ValidationError as exc:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        return v

    @field_validator("quality")
    @classmethod
    def _quality_keys(cls, v: dict[str, float | bool]) -> dict[str, float | bool]:
        unknown = sorted(set(v) - set(QualityConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown quality threshold(s) {unknown}; known: {', '.join(QualityConfig.model_fields)}")
        return v


OCCLUDERS = ("glasses", "sunglasses", "hand")


class AugmentConfig(_Strict):
    """Training augmentation, applied identically to the source and the teacher target of a pair."""

    flip: bool = Field(True, description="mirror left-right half the time")
    rotate_deg: float = Field(5.0, ge=0, le=45, description="affine jitter: rotation up to +- this many degrees")
    scale: float = Field(0.05, ge=0, le=0.5, description="affine jitter: zoom up to +- this share")
    translate: float = Field(0.03, ge=0, le=0.25, description="affine jitter: shift up to +- this share of the size")
    affine_probability: float = Field(0.25, ge=0, le=1, description="share of pairs given the affine jitter (a "
                                      "bilinear warp softens them; the rest stay sharp)")
    brightness: float = Field(0.1, ge=0, le=1, description="colour jitter (kornia ColorJitter ranges)")
    contrast: float = Field(0.1, ge=0, le=1)
    saturation: float = Field(0.1, ge=0, le=1)
    hue: float = Field(0.02, ge=0, le=0.5)
    occluder_probability: float = Field(0.3, ge=0, le=1, description="share of samples given a synthetic occluder")
    occluders: tuple[Literal["glasses", "sunglasses", "hand"], ...] = Field(
        OCCLUDERS, description="synthetic occluders pasted on source and target alike")
    # simulated captures (fxassets.train.capture): share of pairs, gains +-, noise / blur sigma, JPEG quality..95
    capture_probability: float = Field(0.0, ge=0, le=1)
    white_balance: float = Field(0.15, ge=0, le=0.5)
    exposure: float = Field(0.2, ge=0, le=0.8)
    noise: float = Field(0.03, ge=0, le=0.2)
    blur: float = Field(1.2, ge=0, le=5)
    jpeg_quality: int = Field(40, ge=5, le=95)


class TrainConfig(_Strict):
    encoder: str = Field("mobilenetv4_conv_small_050", description="a timm model with features at strides 2..32")
    encoder_weights: Path | None = Field(None, description="a local timm state dict for the encoder; none: random init")
    width: float = Field(1.0, gt=0, le=2, description="decoder width multiplier")
    decoder_blocks: int = Field(0, ge=0, le=4, description="inverted-residual blocks after each decoder fuse")
    head_blocks: int = Field(0, ge=0, le=4, description="inverted-residual blocks in the half-resolution head")
    upsample: Literal["nearest", "bilinear"] = Field("bilinear", description="decoder x2 upsampling (nearest: tiles)")
    head_conv_kernel: Literal[1, 3] = Field(3, description="kernel of the head's first (dense) conv")
    head_kernel: Literal[1, 3] = Field(1, description="the head's last conv's kernel (3: the pixel shuffle's blocks blend)")
    colour_transform: bool = Field(False, description="a learned 3x3 colour map of the output (student.py)")
    grey_output: bool | Literal["auto"] = Field(False, description="output projected to grey; auto: if every target is")
    capture_share: float | None = Field(None, ge=0, le=1, description="share of a batch from faces.capture_variants")
    steps: int = Field(1600, ge=1)
    max_seconds: float = Field(0, ge=0, description="wall-clock cap, recorded when hit; 0 = steps only (the default)")
    batch_size: int = Field(4, ge=1)
    crop: int = Field(256, ge=32, description="training window of the aligned pairs (a crop of the size: whole faces)")
    lr: float = Field(1.2e-2, gt=0)
    l1_weight: float = Field(1.0, ge=0)
    ssim_weight: float = Field(0.5, ge=0)
    lpips_weight: float = Field(0.0, ge=0, description="LPIPS perceptual loss weight; > 0 needs lpips_weights")
    lpips_weights: Path | None = Field(None, description="local file with the LPIPS network's weights (no download)")
    gan_weight: float = Field(0.0, ge=0, description="PatchGAN adversarial loss weight; 0 = off")
    eval_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=0, description="steps between resumable checkpoints; 0 = none")
    seed: int = 0
    threads: int = Field(1, ge=1)
    augment: AugmentConfig = AugmentConfig()
    # DDP through Ray Train (train/distributed.py): the global batch (batch_size) split over the workers, same schedule
    workers: int = Field(1, ge=1, le=1024, description="training processes; 1: this one (no Ray)")
    ray_address: str = Field("auto", description="with workers > 1: auto | local | ray://host:port | host:port")
    gpus_per_worker: float = Field(0.0, ge=0, le=16, description="with workers > 1: GPUs each (nccl), 0: CPU (gloo)")

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: str) -> str:
        return check_address(v)

    def recipe(self) -> dict[str, Any]:
        """The config as the checkpoint records it: the executor keys left out while they are the defaults (one
        worker), so that a one-worker checkpoint keeps the bytes it had before they existed."""
        out = self.model_dump(mode="json")
        if self.workers == 1:
            for k in EXECUTION_KEYS:
                out.pop(k)
        return out


EXECUTION_KEYS = ("workers", "ray_address", "gpus_per_worker")


class ExportConfig(_Strict):
    opset: int = Field(18, ge=17)
    calibration_samples: int = Field(64, ge=1, description="train pairs to calibrate on (spread over the split; "
                                                            "all of them when there are fewer)")
    calibration_method: Literal["auto", "minmax", "entropy", "percentile"] = Field(
        "auto", description="auto: minmax, percentile 99.99 / 99.999 tried, the closest to fp32 on calibration kept")
    keep_float: list[Literal["input", "output"]] = Field(
        ["input"], description="network ends kept in float: input (the convolution reading the image: +7..10 dB "
                               "parity, +0.4 % int8 time), output (the head's last convolution through the residual "
                               "add and clamp: +0.3 dB, ~15 % int8 time)")
    min_parity_db: float = Field(38.0, description="PSNR of int8 against fp32 on held-out pairs")
    max_float_fallback: int = Field(3, ge=0, description="rounds that keep the most sensitive layers in float "
                                                         "(qdq_loss_debug) while parity is below min_parity_db")
    float_fallback_candidates: int = Field(0, ge=0, description="worst-ranked activations tried per fallback "
                                                                  "round (0: every one); the one that helps most "
                                                                  "stays in float")
    latency_runs: int = Field(50, ge=1)
    grid_samples: int = Field(4, ge=1)
    targets: list[Literal["ort", "litert", "executorch", "coreml"]] = Field(
        ["ort", "litert"], description="runtimes to export for (docs/mobile.md): ort (the ONNX and .ort files, "
                                       "always built, the gate of the stage), litert (.tflite), executorch (.pte), "
                                       "coreml (.mlpackage; cannot run on Linux: unverified); one that cannot "
                                       "be built here is reported skipped with the reason")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if "ort" not in v:
            raise ValueError("'ort' must stay in the list: the ONNX models are the stage's reference and gate")
        return list(dict.fromkeys(v))


class Params(_Strict):
    faces: FacesConfig = FacesConfig()
    teacher: TeacherConfig = ClassicalTeacher()
    effects: dict[str, EffectConfig]
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    quality: QualityConfig = QualityConfig()

    @field_validator("effects")
    @classmethod
    def _effect_names(cls, v: dict[str, EffectConfig]) -> dict[str, EffectConfig]:
        if not v:
            raise ValueError("at least one effect is needed")
        for name in v:
            if not _EFFECT_NAME.match(name):
                raise ValueError(f"effect name {name!r} must be lower-case letters, digits, '-' or '_'")
        return v

    def export_for(self, effect: str) -> ExportConfig:
        """The `export:` section with the effect's own overrides (`effects.E.export`) applied."""
        return with_overrides(self.export, self.effect(effect).export)

    def train_for(self, effect: str) -> TrainConfig:
        """The `train:` section with the effect's own overrides (`effects.E.train`) applied."""
        return with_overrides(self.train, self.effect(effect).train)

    def quality_for(self, effect: str) -> QualityConfig:
        """The `quality:` section with the effect's own overrides (`effects.E.quality`) applied."""
        return with_overrides(self.quality, self.effect(effect).quality)

    def effect(self, name: str) -> EffectConfig:
        if name not in self.effects:
            known = ", ".join(sorted(self.effects))
            raise ConfigError(f"unknown effect {name!r}; params.yaml defines: {known}")
        return self.effects[name]


M = TypeVar("M", bound=BaseModel)


def with_overrides(section: M, overrides: dict[str, Any]) -> M:
    """A params section with an effect's overrides applied on top (validated again as the section's model): what
    `effects.E.export`, `.quality` and `.train` do to their sections; a nested section (`train.augment`) is merged
    key by key."""
    base = section.model_dump()
    merged = {k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v for k, v in overrides.items()}
    return type(section).model_validate({**base, **merged})


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
        if "executor" in loc[:-1] and loc[loc.index("executor") + 1] in ("local", "ray"):  # the executor's tag too
            loc.pop(loc.index("executor") + 1)
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
        raw = load_yaml(path)
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    if why := retired_teacher(raw.get("teacher")):  # a model shut down: one line naming what replaces it
        raise ConfigError(f"{path}: {why}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(path, exc, raw)) from exc


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able config parts (pydantic models are dumped first)."""
    norm = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
