"""diffusers teachers: img2img (AutoPipelineForImage2Image), InstructPix2Pix, and text-to-image for sources.

- Weights come from a local diffusers folder (relative to the project root) or a hub id (+ `revision`), safetensors
  only. CUDA with fp16 when present, else CPU with fp32 (`device` / `dtype` override).
- One CPU `torch.Generator` per sample, seeded from the sample's record: an output never depends on its batch or
  on the device the noise is drawn for.
- The fingerprint is cheap: nothing is loaded until the first image is asked for. A local folder is identified by
  a hash of its files (cached by size and mtime under `.cache/fxassets/`), a hub model by its id and revision.
- torch and diffusers are imported lazily: the classical pipeline never pays for them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import string
from pathlib import Path
from typing import Any

import numpy as np

from fxassets.core.config import EffectTeacher, Img2ImgTeacher, InstructPix2PixTeacher, Text2ImageTeacher
from fxassets.core.hashing import sha256_file
from fxassets.teachers.base import BatchTeacher, SampleRejected, Teacher
from fxassets.core.images import resize
from fxassets.core.paths import cache_root

log = logging.getLogger(__name__)

# files a diffusers folder may hold that safetensors-only loading never reads
_NOT_LOADED = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".md", ".gitattributes")


def weights_hash(folder: Path, cache_dir: Path | None = None) -> str:
    """sha256 over every file a safetensors-only load may read (configs, tokenizer, *.safetensors).

    Each file's hash is cached by (path, size, mtime) so that a multi-GB checkpoint is read once, not per run."""
    from fxassets.core.atomic import write_json

    folder = Path(folder)
    memo_path = cache_dir / "weights_hashes.json" if cache_dir else None
    memo: dict[str, str] = {}
    if memo_path and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    parts, changed = [], False
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or any(s.startswith(".") for s in p.relative_to(folder).parts) or p.name.endswith(_NOT_LOADED):
            continue
        st = p.stat()
        memo_key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key] = sha256_file(p)
            changed = True
        parts.append(f"{rel}\0{memo[memo_key]}")
    if not parts:
        raise FileNotFoundError(f"{folder}: no model files (model_index.json, *.safetensors) in the teacher folder")
    if changed and memo_path:
        write_json(memo_path, memo)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def render_prompt(template: str, record: dict[str, Any]) -> str:
    """`template` with {prompt} and the source's attributes ({age}, {gender}, ...); a missing attribute is ''."""
    fields = {**{k: str(v) for k, v in (record.get("attributes") or {}).items()}, "prompt": record.get("prompt", "")}
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return template.format_map({n: fields.get(n, "") for n in names}).strip()


def _snap(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


class DiffusersTeacherBase(Teacher):
    face_scaled = False  # every photo is resized to teacher.size (its working resolution) anyway
    """Shared loading, fingerprinting and calling; subclasses pick the pipeline and its arguments."""

    version = "1"
    cfg: Img2ImgTeacher | InstructPix2PixTeacher | Text2ImageTeacher

    def __init__(self, cfg, effect: EffectTeacher | None = None):
        self.cfg = cfg
        self.effect = effect or EffectTeacher()
        self.batch_size = cfg.batch_size
        self.guidance_scale = self.effect.guidance_scale if self.effect.guidance_scale is not None else cfg.guidance_scale
        self._pipe = None
        self._weights: str | None = None

    def bind_root(self, root: Path) -> None:
        super().bind_root(root)
        self._weights = None

    # -- where the weights are -------------------------------------------------------------------------------
    def local_folder(self) -> Path | None:
        """The local diffusers folder, or None for a hub id. A path-like name that does not exist is an error."""
        p = Path(self.cfg.model).expanduser()
        cand = p if p.is_absolute() else self.root / p
        if cand.is_dir():
            return cand
        m = self.cfg.model
        if p.is_absolute() or m.startswith((".", "~")) or m.count("/") > 1 or os.sep != "/" and os.sep in m:
            raise FileNotFoundError(f"teacher.model: {cand}: no such model folder")
        return None

    def _scheduler_name(self, folder: Path | None) -> str:
        if self.cfg.scheduler:
            return self.cfg.scheduler
        if folder is not None:
            try:
                return json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
            except (OSError, KeyError, json.JSONDecodeError):
                pass
        return "default"

    def settings(self) -> dict[str, Any]:
        c = self.cfg
        folder = self.local_folder()
        if folder is not None and self._weights is None:
            self._weights = weights_hash(folder, cache_root(self.root))
        s: dict[str, Any] = {
            "model": c.model,
            "revision": None if folder is not None else c.revision,
            "weights": self._weights if folder is not None else None,
            "variant": c.variant,
            "scheduler": self._scheduler_name(folder),
            "steps": c.steps,
            "guidance_scale": self.guidance_scale,
            "size": c.size,
            "prompt_template": c.prompt_template,
            "dtype": c.dtype,
        }
        if folder is None and not c.revision:
            log.warning("teacher.model %s has no revision: pin a commit sha so that the fingerprint follows the weights", c.model)
        s.update(self._extra_settings())
        return s

    def _extra_settings(self) -> dict[str, Any]:
        return {}

    # -- running ---------------------------------------------------------------------------------------------
    def _device_dtype(self):
        import torch

        dev = self.cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        dt = self.cfg.dtype
        if dt == "auto":
            dt = "float16" if dev == "cuda" else "float32"
        return dev, getattr(torch, dt)

    def runtime(self) -> dict[str, Any]:
        if getattr(self, "_runtime", None) is None:
            import diffusers
            import torch

            dev, dt = self._device_dtype()
            out = {"device": dev, "dtype": str(dt).removeprefix("torch."), "torch": torch.__version__, "diffusers": diffusers.__version__}
            if dev == "cuda" and torch.cuda.is_available():
                out["gpu"] = torch.cuda.get_device_name()
            self._runtime = out
        return dict(self._runtime)

    def _pipeline_class(self, folder: Path | None):
        raise NotImplementedError

    def _check_pipeline(self, pipe) -> None:
        pass

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _load(self):
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        folder = self.local_folder()
        dev, dt = self._device_dtype()
        kw: dict[str, Any] = {"dtype": dt, "use_safetensors": True}
        if self.cfg.variant:
            kw["variant"] = self.cfg.variant
        if folder is not None:
            kw["local_files_only"] = True
        elif self.cfg.revision:
            kw["revision"] = self.cfg.revision
        src = str(folder) if folder is not None else self.cfg.model
        cls = self._pipeline_class(folder)
        try:
            pipe = cls.from_pretrained(src, **kw)
        except OSError as exc:
            raise FileNotFoundError(f"teacher.model: cannot load {src!r} as a diffusers pipeline with safetensors weights: {exc}") from exc
        if self.cfg.scheduler:
            sched_cls = getattr(diffusers, self.cfg.scheduler, None)
            if sched_cls is None or not hasattr(sched_cls, "from_config"):
                raise ValueError(f"teacher.scheduler: {self.cfg.scheduler!r} is not a diffusers scheduler class")
            pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
        self._check_pipeline(pipe)
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        self._accepts = set(inspect.signature(pipe.__call__).parameters)
        return pipe

    def _multiple(self) -> int:
        """Pixel sizes the pipeline accepts: the VAE factor times the UNet's downsampling (64 for SD)."""
        pipe = self.pipe
        m = int(getattr(pipe, "vae_scale_factor", 8))
        unet = getattr(pipe, "unet", None)
        if unet is not None:
            m *= 2 ** (len(unet.config.block_out_channels) - 1)
        else:  # transformer models patchify the latents by 2
            m *= 2
        return m

    def _call(self, records: list[dict[str, Any]], **kw) -> list[np.ndarray | SampleRejected]:
        import torch

        prompts = [render_prompt(self.cfg.prompt_template, r) for r in records]
        negatives = [r.get("negative_prompt") or "" for r in records]
        args: dict[str, Any] = {
            "prompt": prompts,
            "num_inference_steps": self.cfg.steps,
            "guidance_scale": self.guidance_scale,
            "generator": [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in records],
            "output_type": "np",
            **kw,
        }
        if any(negatives) and "negative_prompt" in self._accepts:
            args["negative_prompt"] = negatives
        with torch.inference_mode():
            out = self.pipe(**args)
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(records)
        return [SampleRejected("the pipeline's safety checker flagged the output") if flag else _to_uint8(img) for img, flag in zip(out.images, flags, strict=True)]

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe = None
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover
                pass


class _EditingTeacher(BatchTeacher, DiffusersTeacherBase):
    def _work_size(self, h: int, w: int, m: int) -> tuple[int, int]:
        scale = self.cfg.size / max(h, w)
        return _snap(w * scale, m), _snap(h * scale, m)

    def edit_batch(self, images, records):
        from PIL import Image

        m = self._multiple()
        results: list[Any] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):  # one call per working size: a batch must share it
            groups.setdefault(self._work_size(img.shape[0], img.shape[1], m), []).append(i)
        for (w, h), idx in groups.items():
            pil = [Image.fromarray(resize(images[i], w, h)) for i in idx]
            outs = self._call([records[i] for i in idx], image=pil, **self._image_args())
            for i, o in zip(idx, outs, strict=True):
                src = images[i]
                results[i] = o if isinstance(o, SampleRejected) else resize(o, src.shape[1], src.shape[0])
        return results

    def _image_args(self) -> dict[str, Any]:
        return {}


class Img2ImgTeacherImpl(_EditingTeacher):
    kind = "img2img"

    def __init__(self, cfg: Img2ImgTeacher, effect: EffectTeacher | None = None):
        super().__init__(cfg, effect)
        self.strength = self.effect.strength if self.effect.strength is not None else cfg.strength
        if int(cfg.steps * self.strength) < 1:
            raise ValueError(f"teacher: steps * strength must be >= 1 (got {cfg.steps} * {self.strength})")

    def _extra_settings(self) -> dict[str, Any]:
        return {"strength": self.strength}

    def _image_args(self) -> dict[str, Any]:
        return {"strength": self.strength}

    def _pipeline_class(self, folder):
        from diffusers import AutoPipelineForImage2Image

        return AutoPipelineForImage2Image


class InstructPix2PixTeacherImpl(_EditingTeacher):
    kind = "instruct-pix2pix"

    def _extra_settings(self) -> dict[str, Any]:
        return {"image_guidance_scale": self.cfg.image_guidance_scale}

    def _image_args(self) -> dict[str, Any]:
        return {"image_guidance_scale": self.cfg.image_guidance_scale}

    def _pipeline_class(self, folder):
        import diffusers

        name = "StableDiffusionInstructPix2PixPipeline"
        if folder is not None and (folder / "model_index.json").is_file():
            name = json.loads((folder / "model_index.json").read_text()).get("_class_name", name)
        if "InstructPix2Pix" not in name:  # a plain SD folder: load its parts into the instruct pipeline (fails clearly on a 4-channel UNet)
            name = "StableDiffusionXLInstructPix2PixPipeline" if "XL" in name else "StableDiffusionInstructPix2PixPipeline"
        return getattr(diffusers, name)

    def _check_pipeline(self, pipe) -> None:
        unet = getattr(pipe, "unet", None)
        if unet is not None and unet.config.in_channels != 8:
            raise ValueError(f"teacher.model: {self.cfg.model} is not an InstructPix2Pix model (its UNet takes {unet.config.in_channels} channels, not 8)")


class Text2ImageTeacherImpl(DiffusersTeacherBase):
    """Generates portraits from prompts (source faces); not an editing teacher."""

    kind = "text2image"
    edits = False
    generates = True

    def _pipeline_class(self, folder):
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image

    def generate_batch(self, records):
        side = _snap(self.cfg.size, self._multiple())
        return self._call(records, height=side, width=side)
