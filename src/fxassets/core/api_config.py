"""The `teacher:` settings of the teachers behind a paid HTTP API (`gemini-image`, `openai-images`; config.py
re-exports them), and the providers' model lifecycle: which ids are shut down (a config naming one fails before any
request, in one line naming the replacement), which are legacy (a warning), and the listed price of an image.
Dates, prices and their sources: docs/api_teachers.md. Nothing here imports the rest of fxassets."""

from __future__ import annotations

import math
import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fxassets.core.executor_config import Executor

# model id (a dated snapshot counts as its family) -> (the day it was shut down, its replacement)
RETIRED: dict[str, tuple[str, str]] = {
    "dall-e-2": ("2026-05-12", "gpt-image-2"),
    "dall-e-3": ("2026-05-12", "gpt-image-2"),
    "gpt-image-1.5": ("2026-12-01", "gpt-image-2"),
    "gpt-image-1-mini": ("2026-12-01", "gpt-image-2"),
    "chatgpt-image-latest": ("2026-12-01", "gpt-image-2"),
    "gemini-3.1-flash-image-preview": ("2026-06-25", "gemini-3.1-flash-image"),
    "gemini-3-pro-image-preview": ("2026-06-25", "gemini-3-pro-image"),
}
RETIRED_KINDS = {"imagen": "teacher.kind: 'imagen' was shut down on Vertex AI on 2026-08-17 (every Imagen endpoint); "
                           "use teacher.kind: gemini-image (model gemini-3.1-flash-image, docs/api_teachers.md)"}
_IMAGEN = re.compile(r"^(imagen-|imagegeneration@|imagetext@)")  # every Imagen endpoint: shut down on Vertex AI 2026-08-17
LEGACY = {"gpt-image-1": "gpt-image-2", "gemini-2.5-flash-image": "gemini-3.1-flash-image"}  # served, not for new runs

# USD an image at list price (standard, not batch) per model family; tiers: Gemini imageSize, OpenAI quality at 1024x1024
PRICES: dict[str, dict[str, float]] = {
    "gemini-3.1-flash-image": {"1K": 0.067, "2K": 0.101, "4K": 0.151},
    "gemini-3-pro-image": {"1K": 0.134, "2K": 0.134, "4K": 0.24},
    "gemini-2.5-flash-image": {"1K": 0.039},
    "gpt-image-2": {"low": 0.01, "medium": 0.04, "high": 0.15, "auto": 0.15},
}
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")  # Gemini imageConfig.aspectRatio


def family(model: str) -> str:
    """`gpt-image-2-2026-04-21` -> `gpt-image-2`: a dated snapshot lives and dies with its family."""
    return re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model)


def retired(model: str) -> str | None:
    """Why `model` cannot be used any more and what replaces it, in one line; None while it is served."""
    m = family(model)
    if _IMAGEN.match(m):
        new = "gemini-3-pro-image" if "ultra" in m else "gemini-3.1-flash-image"
        return f"{model!r} was shut down on Vertex AI on 2026-08-17 (every Imagen endpoint); use teacher.kind: gemini-image, model: {new}"
    if m in RETIRED:
        day, new = RETIRED[m]
        return f"{model!r} was shut down on {day}; use model: {new}"
    return None


def retired_teacher(teacher: Any) -> str | None:
    """The one-line reason a raw `teacher:` mapping names a kind or model that was shut down (None if it does not)."""
    if not isinstance(teacher, dict):
        return None
    if teacher.get("kind") in RETIRED_KINDS:
        return RETIRED_KINDS[teacher["kind"]]
    why = retired(teacher["model"]) if isinstance(teacher.get("model"), str) else None
    return f"teacher.model: {why}" if why else None


def check_template(v: str) -> str:
    """A prompt template's fields must be plain names: '{prompt}' and source attributes ({age}, ...)."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    bad = sorted(n for n in names if not re.fullmatch(r"[a-z_]+", n))
    if bad:
        raise ValueError(f"template fields must be plain names like {{prompt}} or {{age}}, got {bad}")
    return v


class _ApiTeacher(BaseModel):
    """What the teachers behind a paid HTTP API share: where to send, how hard to try, what a run may cost.
    None of these change an output, so none is in the fingerprint (docs/api_teachers.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str | None = Field(None, description="API base URL; null: the provider's own (tests point it at 127.0.0.1)")
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds to wait for an answer (read timeout)")
    connect_timeout: float = Field(10.0, gt=0, le=600, description="seconds to wait for a connection")
    max_retries: int = Field(6, ge=0, le=50, description="retries of a 429 / 5xx / timeout before the run fails")
    backoff: float = Field(1.0, ge=0, le=600, description="first retry delay (s); doubles each retry, with jitter")
    max_backoff: float = Field(60.0, ge=0, le=3600, description="cap of one retry delay (a Retry-After is honoured up to 10 min)")
    price_per_image: float | None = Field(None, ge=0, description="USD a finished image costs; null: the model's listed price")
    max_cost: float = Field(20.0, ge=0, description="USD a run may spend; a run whose estimate is higher does not start")
    max_side: int = Field(1024, ge=16, le=4096, description="a source is sent at most this long side (px); output resized back")
    prompt_template: str = Field("{prompt}", min_length=1, description="'{prompt}' and source attributes ({age}, ...)")
    model: str = Field(min_length=1)
    executor: Executor = "local"  # a Ray actor pool shares this run's max_cost (the driver reserves before dispatch)

    @field_validator("prompt_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        return check_template(v)

    def price_tier(self) -> tuple[str, float]:
        """The column of PRICES this config is billed at, and a factor on it (output size)."""
        raise NotImplementedError

    @property
    def price(self) -> float:
        """USD an image: `price_per_image`, else the model's listed price; a model with none must be given one."""
        if self.price_per_image is not None:
            return self.price_per_image
        tier, factor = self.price_tier()
        listed = PRICES.get(family(self.model), {}).get(tier)
        if listed is None:
            raise ValueError(f"teacher.price_per_image: no listed price for model {self.model!r} at {tier}; "
                             "set teacher.price_per_image (USD an image, from the provider's price list)")
        return round(listed * factor, 6)


class GeminiImageTeacher(_ApiTeacher):
    """Gemini image models through `generateContent`, on Vertex AI (`project`, an OAuth token or Application Default
    Credentials) or the Gemini Developer API (an API key), one setting apart: the source goes in as inline image data
    beside the prompt; the same model makes the portraits of `fxassets generate-sources`."""

    kind: Literal["gemini-image"]
    service: Literal["vertex-ai", "gemini-api"] = Field("vertex-ai", description="vertex-ai: project + OAuth / ADC; gemini-api: API key")
    project: str | None = Field(None, min_length=1, validate_default=True, description="Google Cloud project id (vertex-ai)")
    location: str = Field("global", min_length=1, description="Vertex AI region, or 'global'")
    model: str = Field("gemini-3.1-flash-image", min_length=1, description="model id: in the fingerprint and the model card")
    prompt_template: str = Field("Edit this photo: {prompt}. Keep the person's identity, face shape, pose, expression and "
                                 "framing.", min_length=1, description="'{prompt}' and source attributes ({age}, ...)")
    # generated portraits; an edit asks for the supported ratio nearest its source's
    aspect_ratio: Literal[ASPECT_RATIOS] = "1:1"  # type: ignore[valid-type]
    image_size: Literal["1K", "2K", "4K"] | None = Field("1K", description="imageConfig.imageSize; null: not sent (the model's own)")
    safety_threshold: Literal["BLOCK_LOW_AND_ABOVE", "BLOCK_MEDIUM_AND_ABOVE", "BLOCK_ONLY_HIGH", "BLOCK_NONE", "OFF"] | None = Field(
        None, description="safetySettings threshold for every harm category; null: the API's defaults")
    token_env: str = Field("GOOGLE_OAUTH_ACCESS_TOKEN", min_length=1, description="vertex-ai: variable holding an access token; unset: ADC")
    api_key_env: str = Field("GEMINI_API_KEY", min_length=1, description="gemini-api: variable holding the API key")

    @field_validator("project")
    @classmethod
    def _project_for_vertex(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("service", "vertex-ai") == "vertex-ai":
            raise ValueError("needed with service: vertex-ai (the Google Cloud project id)")
        return v

    def price_tier(self) -> tuple[str, float]:
        return self.image_size or "1K", 1.0


class OpenAIImagesTeacher(_ApiTeacher):
    """OpenAI's images API: `POST /images/edits` (multipart, the source as `image[]`) and `/images/generations`.
    The API takes no seed: a sample asked for twice differs (the per-sample cache makes sure it is asked once)."""

    kind: Literal["openai-images"]
    model: str = Field("gpt-image-2-2026-04-21", min_length=1, description="a dated snapshot: in the fingerprint and the model card")
    size: str = Field("1024x1024", pattern=r"^(auto|\d+x\d+)$", description="output size asked for; resized back to the source")
    quality: Literal["low", "medium", "high", "auto"] | None = Field("medium", description="null: not sent (the API's default, auto)")
    input_fidelity: Literal["low", "high"] | None = Field(None, description="edits: how closely to keep the face; null: not sent")
    output_format: Literal["png", "jpeg", "webp"] = Field("png", description="the answer's image format")
    moderation: Literal["auto", "low"] | None = Field(None, description="null: not sent (auto)")
    api_key_env: str = Field("OPENAI_API_KEY", min_length=1, description="variable holding the API key")

    def price_tier(self) -> tuple[str, float]:
        w, h = (1536, 1024) if self.size == "auto" else (int(x) for x in self.size.split("x"))
        return self.quality or "auto", math.prod((w, h)) / 1024**2  # image output tokens grow with the pixels
