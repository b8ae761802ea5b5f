"""`latent-edit`: the first-generation teacher, a GAN and a latent edit direction (StyleGAN2 + StyleCLIP).

A user's generator G maps a latent w to an image (TorchScript or ONNX, batch first; NCHW or NHWC output in
`output_range`). An edit direction d (.npy, e.g. a StyleCLIP global direction or an InterFaceGAN boundary expressed in
G's input space) and a strength s make the pair:

    source = G(w)        target = G(w + s * d)

w comes from a seed: z ~ N(0, I) from `numpy.random.default_rng(seed)`, then the optional `mapping` network (z -> w,
e.g. StyleGAN's mapping with truncation baked in; without one w = z). The same seed gives the same pair.

How it fits the pipeline with no photos (docs/api_teachers.md): `fxassets generate-sources --from-params` with this
teacher writes G(w) for n seeds as `gen_00000.png`, ... with w beside each as `gen_00000.npy` and a manifest
(one person per seed). Point `faces.source` at that folder; the teacher stage then reads each source's `.npy` and
computes G(w + s * d). A source without its `.npy` is a setup error, named. `direction` may hold `{prompt}`, so that
each effect's prompt picks its own direction file (e.g. `directions/{prompt}.npy` with `prompt: smile`).

The fingerprint holds sha256 hashes of G, the mapping and the direction file(s) (every file the `{prompt}` pattern
matches), the strength, the latent scheme, the output range and size; torch / onnxruntime load on first use."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fxassets.core.config import EffectTeacher, LatentEditTeacher
from fxassets.teachers.base import BatchTeacher, SampleRejected
from fxassets.core.hashing import sha256_file

LATENT_SCHEME = "z~N(0,1) float32 from numpy default_rng(seed); w = mapping(z) or z"
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> hash: a large generator is read once a process


def _file_hash(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)[:16]
    return _HASHES[key]


class Net:
    """One network, float32 in, float32 out: an ONNX model (onnxruntime) or a TorchScript module (torch)."""

    def __init__(self, path: Path, device: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such model file")
        self.onnx = self.path.suffix.lower() == ".onnx"
        if not self.onnx and self.path.suffix.lower() not in TORCHSCRIPT_SUFFIXES:
            raise ValueError(f"{self.path}: expected an ONNX (.onnx) or TorchScript ({', '.join(TORCHSCRIPT_SUFFIXES)}) model")
        if self.onnx:
            import onnxruntime as ort

            providers = ["CPUExecutionProvider"]
            if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            elif device == "cuda":
                raise RuntimeError("teacher.device: cuda asked for, but onnxruntime has no CUDA provider here")
            self.sess = ort.InferenceSession(str(self.path), providers=providers)
            self.input = self.sess.get_inputs()[0]
            self.device = "cuda" if self.sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        else:
            import warnings

            import torch

            dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
            with warnings.catch_warnings():  # torch >= 2.10 calls TorchScript deprecated; it loads all the same
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location=dev).eval()
            self.device = dev

    def input_shape(self) -> list[int] | None:
        """The input's shape without the batch axis when the ONNX model fixes it; else None."""
        if not self.onnx:
            return None
        dims = list(self.input.shape)[1:]
        return [int(d) for d in dims] if dims and all(isinstance(d, int) for d in dims) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.onnx:
            return np.asarray(self.sess.run(None, {self.input.name: x})[0], dtype=np.float32)
        import torch

        with torch.inference_mode():
            y = self.module(torch.from_numpy(x).to(self.device))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y.float().cpu().numpy()

    def runtime(self) -> dict[str, Any]:
        if self.onnx:
            import onnxruntime

            return {"format": "onnx", "onnxruntime": onnxruntime.__version__, "device": self.device}
        import torch

        return {"format": "torchscript", "torch": torch.__version__, "device": self.device}


def to_uint8_images(y: np.ndarray, value_range: str) -> list[np.ndarray]:
    """G's batch (B x 3 x H x W or B x H x W x 3, in `value_range`) -> RGB uint8 H x W x 3 images."""
    if y.ndim != 4:
        raise ValueError(f"the generator returned shape {tuple(y.shape)}; expected B x 3 x H x W or B x H x W x 3")
    if y.shape[1] == 3 and y.shape[-1] != 3:
        y = y.transpose(0, 2, 3, 1)
    elif y.shape[-1] != 3:
        raise ValueError(f"the generator returned shape {tuple(y.shape)}: no axis of 3 colour channels")
    lo, hi = {"-1..1": (-1.0, 1.0), "0..1": (0.0, 1.0), "0..255": (0.0, 255.0)}[value_range]
    y = (y - lo) * (255.0 / (hi - lo))
    return [np.ascontiguousarray(im) for im in np.clip(np.rint(y), 0, 255).astype(np.uint8)]


class LatentEditTeacherImpl(BatchTeacher):
    kind = "latent-edit"
    version = "1"
    edits = True
    generates = True  # G(w): the sources (fxassets generate-sources --from-params)
    face_scaled = False  # both sides come from the generator at its own resolution
    cfg: LatentEditTeacher

    def __init__(self, cfg: LatentEditTeacher, effect: EffectTeacher | None = None):
        self.cfg = cfg
        self.effect = effect or EffectTeacher()
        self.batch_size = cfg.batch_size
        self._g: Net | None = None
        self._m: Net | None = None
        self._directions: dict[str, np.ndarray] = {}
        self._hashes: dict[str, str] = {}

    def bind_root(self, root: Path) -> None:
        super().bind_root(root)
        self._g = self._m = None
        self._directions, self._hashes = {}, {}

    # -- files and fingerprint ------------------------------------------------------------------------------------
    def _path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.root / q

    def _hash(self, path: Path) -> str:
        key = str(path)
        if key not in self._hashes:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (teacher.generator / mapping / direction)")
            self._hashes[key] = _file_hash(path)
        return self._hashes[key]

    def _direction_files(self) -> list[Path]:
        pattern = self.cfg.direction
        if "{prompt}" not in pattern:
            return [self._path(pattern)]
        files = sorted(Path(p) for p in glob.glob(str(self._path(pattern.replace("{prompt}", "*")))))
        if not files:
            raise FileNotFoundError(f"teacher.direction: no file matches {self._path(pattern)}")
        return files

    def generate_settings(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "generator": self._hash(self._path(c.generator)),
            "mapping": self._hash(self._path(c.mapping)) if c.mapping else None,
            "latent_shape": c.latent_shape,
            "latent": LATENT_SCHEME,
            "output_range": c.output_range,
            "size": c.size,
        }

    def settings(self) -> dict[str, Any]:
        dirs = {p.name: self._hash(p) for p in self._direction_files()}
        return {**self.generate_settings(), "direction": self.cfg.direction, "directions": dirs, "strength": self.cfg.strength}

    # -- the networks -------------------------------------------------------------------------------------------
    @property
    def g(self) -> Net:
        if self._g is None:
            self._g = Net(self._path(self.cfg.generator), self.cfg.device)
        return self._g

    @property
    def mapping(self) -> Net | None:
        if self.cfg.mapping and self._m is None:
            self._m = Net(self._path(self.cfg.mapping), self.cfg.device)
        return self._m

    def latent_shape(self) -> list[int]:
        shape = self.cfg.latent_shape or self.g.input_shape()
        if not shape:
            raise ValueError(f"teacher.latent_shape: {self.cfg.generator} does not fix its input shape; set it, e.g. [512] or [14, 512]")
        return list(shape)

    def z_shape(self) -> list[int]:
        if self.mapping is None:
            return self.latent_shape()
        return self.mapping.input_shape() or self.latent_shape()[-1:]

    def latents(self, records: list[dict[str, Any]]) -> np.ndarray:
        """w for each record's seed: B x latent_shape, float32."""
        z = np.stack([np.random.default_rng(int(r["seed"])).standard_normal(self.z_shape()).astype(np.float32) for r in records])
        w = z if self.mapping is None else self.mapping(z)
        want = tuple(self.latent_shape())
        if tuple(w.shape[1:]) != want:
            raise ValueError(f"latent-edit: latents have shape {tuple(w.shape[1:])}, the generator takes {want} (teacher.latent_shape)")
        return w.astype(np.float32)

    def direction(self, record: dict[str, Any]) -> np.ndarray:
        path = self._path(self.cfg.direction.replace("{prompt}", str(record.get("prompt", ""))))
        key = str(path)
        if key not in self._directions:
            if not path.is_file():
                raise FileNotFoundError(f"teacher.direction: {path}: no such file (for prompt {record.get('prompt', '')!r})")
            d = np.load(path).astype(np.float32)
            shape = tuple(self.latent_shape())
            try:
                np.broadcast_to(d, shape)
            except ValueError:
                raise ValueError(f"teacher.direction: {path} has shape {d.shape}, which does not fit the latent {shape}") from None
            self._directions[key] = d
        return self._directions[key]

    def render(self, w: np.ndarray) -> list[np.ndarray]:
        imgs = to_uint8_images(self.g(w), self.cfg.output_range)
        if self.cfg.size:
            s = self.cfg.size
            imgs = [cv2.resize(im, (s, s), interpolation=cv2.INTER_AREA if s < im.shape[0] else cv2.INTER_LANCZOS4) for im in imgs]
        return imgs

    # -- the teacher interface --------------------------------------------------------------------------------
    def generate_batch(self, records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        return self.render(self.latents(records))

    def latent_path(self, record: dict[str, Any]) -> Path:
        return (self.root / record["source"]).with_suffix(".npy")

    def edit_batch(self, images: list[np.ndarray], records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        ws = []
        for rec in records:
            p = self.latent_path(rec)
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: no latent beside the source; the latent-edit teacher needs sources made by "
                    "`fxassets generate-sources --from-params` (each image with its latent as .npy)")
            w = np.load(p).astype(np.float32)
            if tuple(w.shape) != tuple(self.latent_shape()):
                raise ValueError(f"{p}: latent of shape {w.shape}, the generator takes {tuple(self.latent_shape())}")
            ws.append(w + self.cfg.strength * self.direction(rec))
        outs = self.render(np.stack(ws))
        return [o if o.shape == img.shape else cv2.resize(o, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
                for o, img in zip(outs, images, strict=True)]

    def runtime(self) -> dict[str, Any]:
        return self.g.runtime()

    def close(self) -> None:
        self._g = self._m = None
