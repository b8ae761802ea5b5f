"""Teachers: the slow, strong models whose edits the student learns. One interface, a registry by `kind`.

- `classical`: OpenCV stylizations (CPU, milliseconds a face).
- `img2img`, `instruct-pix2pix`: diffusers editing teachers (any local diffusers folder or hub id).
- `text2image`: a diffusers portrait generator for source faces (`fxassets generate-sources`), not an editor.
- `gemini-image`, `openai-images`: Gemini image models (Vertex AI or the Gemini API) and OpenAI's images API
  (paid, over HTTP; api/).
- `latent-edit`: a GAN generator and a latent edit direction (StyleGAN2 + StyleCLIP), pairs with no photos.

Importing this package never imports torch, diffusers or an HTTP client; a teacher loads what it needs on first use."""

from __future__ import annotations

from pathlib import Path

from fxassets.core.config import EffectTeacher
from fxassets.teachers.base import Teacher
from fxassets.teachers.classical import ClassicalTeacherImpl
from fxassets.teachers.api.gemini import GeminiImageTeacherImpl
from fxassets.teachers.api.openai import OpenAIImagesTeacherImpl
from fxassets.teachers.diffusers import Img2ImgTeacherImpl, InstructPix2PixTeacherImpl, Text2ImageTeacherImpl
from fxassets.teachers.latent_edit import LatentEditTeacherImpl

REGISTRY: dict[str, type[Teacher]] = {
    "classical": ClassicalTeacherImpl,
    "img2img": Img2ImgTeacherImpl,
    "instruct-pix2pix": InstructPix2PixTeacherImpl,
    "text2image": Text2ImageTeacherImpl,
    "gemini-image": GeminiImageTeacherImpl,
    "openai-images": OpenAIImagesTeacherImpl,
    "latent-edit": LatentEditTeacherImpl,
}


def make_teacher(cfg, effect: EffectTeacher | None = None, root: Path | None = None) -> Teacher:
    """The teacher for a `teacher:` config (`kind` picks the class) and an effect's per-effect settings."""
    try:
        cls = REGISTRY[cfg.kind]
    except KeyError:
        raise ValueError(f"teacher.kind: unknown teacher {cfg.kind!r}; known: {', '.join(sorted(REGISTRY))}") from None
    teacher = cls(cfg, effect or EffectTeacher())
    if root is not None:
        teacher.bind_root(root)
    return teacher



