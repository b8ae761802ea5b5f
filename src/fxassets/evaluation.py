"""`fxassets evaluate`: how close a built student is to its teacher on *your* photos.

Pairs are built from a folder of photos exactly as the pipeline builds them (`teacher_images` then `face_pairs`:
the same teacher call on the whole photo, the face detected in the source, both sides aligned with the source's
similarity transform), the teacher's outputs kept in a per-photo cache outside DVC
(`.cache/fxassets/evaluate/`, keyed like the teacher stage's), then the built student runs on each aligned source.

Per face and as medians over faces:
- `psnr_db`, `ssim` of the student's 8-bit output against the teacher's;
- `recovered` = 1 - MSE(student, teacher) / MSE(input, teacher): the share of the teacher's change the student
  reproduces (1: all of it, 0: no better than doing nothing, < 0: worse);
- `chroma_error`: mean absolute difference of CIELAB chroma (sqrt(a*^2 + b*^2)) between student and teacher:
  does the student leave the colour the teacher leaves (a pencil sketch is grey);
- `tile_ratio`: the student output's gradient energy on 8 / 16 / 32 px grid lines over elsewhere (`tile_ratio`),
  beside the teacher's, and `tile_excess`, their quotient (~1: no tile artifacts; the aligned face's fixed layout
  puts some edges on grid lines, so the teacher's own ratio is above 1 too);
- beside them, the unchanged input's `input_psnr_db` and `input_chroma_error`, and the teacher's mean chroma.

A photo that cannot be used (unreadable, no face, several faces under `faces.multiple_faces: reject`, a teacher
refusal) is listed with its reason, never a crash.
"""

from __future__ import annotations

import zlib
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = ("int8", "fp32", "ort")
METRICS = ("psnr_db", "ssim", "recovered", "chroma_error")
GRID_FACES = 8


@dataclass
class EvalPair:
    """One aligned face: the photo it came from, the student's input and the teacher's output (uint8 crops)."""

    file: str
    source: np.ndarray
    target: np.ndarray
    face_width: float = float("nan")


@dataclass
class EvalSet:
    pairs: list[EvalPair] = field(default_factory=list)
    unusable: list[dict[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- metrics


def chroma(rgb: np.ndarray) -> np.ndarray:
    """CIELAB chroma (D65, 0..~130) of HxWx3 uint8 RGB images (or N x H x W x 3), per pixel."""
    import cv2

    a = np.asarray(rgb)
    flat = a.reshape(-1, a.shape[-2], 3) if a.ndim == 4 else a
    lab = cv2.cvtColor(np.ascontiguousarray(flat.astype(np.float32) / 255.0), cv2.COLOR_RGB2Lab)
    c = np.sqrt(lab[..., 1] ** 2 + lab[..., 2] ** 2)
    return c.reshape(a.shape[:-1])


TILE_PERIODS = (8, 16, 32)


def _gradients(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared differences of neighbouring pixels of the grey image: dx[:, i] between columns i and i + 1, dy[i]
    between rows i and i + 1."""
    g = np.asarray(rgb, np.float32)
    g = g.mean(axis=2) if g.ndim == 3 else g
    return np.diff(g, axis=1) ** 2, np.diff(g, axis=0) ** 2


def _across(dx: np.ndarray, dy: np.ndarray, period: int, on: bool) -> float:
    """Mean energy across the boundaries on (`on`) or off a `period`-px grid: those before columns and rows that
    are multiples of `period`."""
    sel_x, sel_y = ((np.arange(1, n + 1) % period == 0) == on for n in (dx.shape[1], dy.shape[0]))
    count = sel_x.sum() * dx.shape[0] + sel_y.sum() * dy.shape[1]
    return float(dx[:, sel_x].sum() + dy[sel_y].sum()) / max(1, count)


def tile_ratio(rgb: np.ndarray, periods: tuple[int, ...] = TILE_PERIODS) -> float:
    """How much an image's gradient energy sits on the boundaries of a `period`-px grid: mean squared difference
    between neighbouring pixels across those boundaries (rows and columns) over the same off the finest grid,
    the largest over `periods`.  ~1 for a photo or a teacher's output; a decoder that adds nearest-upsampled deep
    features shows its 16-32 px tiles as a ratio well above 1."""
    dx, dy = _gradients(rgb)
    elsewhere = _across(dx, dy, min(periods), on=False)
    if elsewhere <= 0:
        return 1.0
    return max(_across(dx, dy, t, on=True) for t in periods) / elsewhere


def block_ratio(rgb: np.ndarray) -> float:
    """Gradient energy across the boundaries of a 2-px grid (between columns 2k - 1 and 2k, and rows) over that
    across the others: ~1 for a photo; a head whose pixel shuffle fills each 2x2 block from one half-resolution
    feature shows the blocks as a ratio above 1.  Every 8 / 16 / 32 px grid line is such a boundary, so
    `tile_ratio` sees the blocks too (docs/student.md, fourth round)."""
    dx, dy = _gradients(rgb)
    odd = _across(dx, dy, 2, on=False)
    return _across(dx, dy, 2, on=True) / odd if odd > 0 else 1.0


def pair_scores(student: np.ndarray, teacher: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """The metrics of one face (HxWx3 uint8 crops): student against teacher, with the unchanged input beside."""
    import torch

    from fxassets.core.metrics import psnr
    from fxassets.core.metrics import ssim_per_image

    s, t, x = (np.asarray(a, np.float64) / 255.0 for a in (student, teacher, source))
    mse_student = float(np.mean((s - t) ** 2))
    mse_input = float(np.mean((x - t) ** 2))
    recovered = 1.0 - mse_student / mse_input if mse_input > 0 else float("nan")
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)[None])).float() / 255.0  # noqa: E731
    c_s, c_t, c_x = chroma(student), chroma(teacher), chroma(source)
    tiles, teacher_tiles = tile_ratio(student), tile_ratio(teacher)
    return {
        "psnr_db": psnr(student, teacher),
        "ssim": float(ssim_per_image(to_t(student), to_t(teacher))[0]),
        "recovered": recovered,
        "chroma_error": float(np.mean(np.abs(c_s - c_t))),
        "input_psnr_db": psnr(source, teacher),
        "input_chroma_error": float(np.mean(np.abs(c_x - c_t))),
        "teacher_chroma": float(np.mean(c_t)),
        "tile_ratio": tiles,
        "teacher_tile_ratio": teacher_tiles,
        # aligned crops put the eyes, nose and mouth at fixed places, some on grid lines, so a photo scores above 1
        # too: what the student adds on top of the teacher's own figure is the artifact
        "tile_excess": tiles / max(teacher_tiles, 1e-6),
        "block_excess": block_ratio(student) / max(block_ratio(teacher), 1e-6),
    }


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else ()
    return {k: float(np.nanmedian([r[k] for r in rows])) for k in keys}


# ------------------------------------------------------------------------------------------------- pairs


def build_pairs(params: Any, effect: str, photos: Path, root: Path = Path("."), progress: bool = True,
                cache_dir: Path | None = None) -> EvalSet:
    """Aligned (source, teacher) crops of every face in the photos under `photos` (a folder or one image), made as
    `teacher_images` + `face_pairs` make them.  The teacher's outputs are cached in `cache_dir` (default
    `.cache/fxassets/evaluate/` under `root`), keyed by the photo's bytes, the prompt and seed, and the teacher's
    fingerprint, so a second evaluation (another engine, another student) does not call the teacher again."""
    from tqdm import tqdm

    from fxassets.faces.scale import FaceScaler, teacher_view
    from fxassets.faces.align import align_matrix, warp_aligned
    from fxassets.faces.detect import FaceDetector, select_faces
    from fxassets.core.images import ImageError, list_images, read_png_rgb, read_rgb
    from fxassets.core.hashing import sha256_file
    from fxassets.teachers.stage import SampleCache, sample_key
    from fxassets.teachers import SampleRejected, make_teacher
    from fxassets.core.paths import cache_root

    photos = Path(photos)
    if photos.is_file():
        files = [photos]
    elif photos.is_dir():
        files = list_images(photos)
    else:
        raise FileNotFoundError(f"{photos}: no such photo or folder (fxassets evaluate --input)")
    if not files:
        raise ValueError(f"{photos}: no JPEG / PNG photos to evaluate on")
    cfg = params.effect(effect)
    faces = params.faces
    teacher = make_teacher(params.teacher, cfg.teacher, root=root)
    cache = SampleCache(Path(cache_dir) if cache_dir else cache_root(root) / "evaluate")
    eye_px, key_hash = teacher_view(teacher, faces)
    out = EvalSet()
    with closing(teacher), FaceDetector(faces.detector, faces.min_score) as det, teacher.run_session(len(files)), \
            FaceScaler(eye_px, faces.detector, faces.min_score) as scaler:
        for path in tqdm(files, desc=f"evaluate {effect}: teacher + faces", unit="photo", disable=not progress):
            name = path.name
            try:
                src = read_rgb(path)
            except ImageError as exc:
                out.unusable.append({"file": name, "reason": str(exc)})
                continue
            record = {"sample_id": path.stem, "prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt,
                      "seed": (cfg.seed + zlib.crc32(path.stem.encode())) % (2**31)}
            key = sample_key(sha256_file(path), record, key_hash)
            entry = cache.get(key)
            if entry is None:
                result = scaler.edit(teacher, [src], [record])[0][0]  # as teacher_images calls it
                if isinstance(result, SampleRejected):
                    cache.put(key, None, {"status": "error", "reason": str(result)})
                else:
                    if result.shape != src.shape:
                        raise ImageError(f"the {teacher.kind} teacher returned {result.shape} for {path}, "
                                         f"expected {src.shape}")
                    cache.put(key, result, {"status": "ok", "reason": ""})
                entry = cache.get(key)
            if entry is None or entry.get("status") != "ok":
                out.unusable.append({"file": name, "reason": f"teacher: {(entry or {}).get('reason', 'no output')}"})
                continue
            tgt = read_png_rgb(cache.png(key))
            chosen, reason = select_faces(det.detect(src), faces.multiple_faces)
            if not chosen:
                out.unusable.append({"file": name, "reason": reason})
                continue
            for k, face in enumerate(chosen):
                M = align_matrix(face, faces.crop_size, faces.margin)
                label = name if k == 0 else f"{name}#face{k}"
                out.pairs.append(EvalPair(label, warp_aligned(src, M, faces.crop_size),
                                          warp_aligned(tgt, M, faces.crop_size), float(face.box[2])))
    return out


# ------------------------------------------------------------------------------------------------- student


def model_path(paths: Any, engine: str) -> Path:
    return {"int8": paths.onnx_int8, "fp32": paths.onnx_fp32, "ort": paths.onnx_ort}[engine]


def run_engine(model: Path, crops: list[np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """The ONNX (or .ort) student on each aligned uint8 crop -> uint8 crops."""
    from fxassets.export.session import onnx_session, run_model, to_input, to_uint8

    if not Path(model).is_file():
        raise FileNotFoundError(f"{model}: no built student (run `dvc repro mobile_model@<effect>` first)")
    sess = onnx_session(model, threads)
    return [to_uint8(run_model(sess, to_input(c))) for c in crops]


def evaluate(params: Any, effect: str, photos: Path, engines: tuple[str, ...] = ("int8",), root: Path = Path("."),
             progress: bool = True, grid: Path | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """The report: `{"effect", "input", "n", "<engine>": {medians}, "faces": [...], "unusable": [...]}`; with
    `grid`, a before / teacher / student grid of up to `GRID_FACES` faces (the first engine's output)."""
    from fxassets.core.paths import EffectPaths

    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise ValueError(f"--engine: unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    paths = EffectPaths(Path(root), effect)
    for e in engines:  # fail before the teacher runs
        if not model_path(paths, e).is_file():
            raise FileNotFoundError(f"{model_path(paths, e)}: no built student for --engine {e} "
                                    f"(run `dvc repro mobile_model@{effect}` first)")
    data = build_pairs(params, effect, photos, root, progress, cache_dir)
    report: dict[str, Any] = {"effect": effect, "input": str(photos), "n": len(data.pairs),
                              "unusable": data.unusable}
    faces = [{"file": p.file, "face_width": p.face_width} for p in data.pairs]
    outputs: dict[str, list[np.ndarray]] = {}
    for e in engines:
        outputs[e] = run_engine(model_path(paths, e), [p.source for p in data.pairs])
        rows = [pair_scores(o, p.target, p.source) for o, p in zip(outputs[e], data.pairs)]
        for f, r in zip(faces, rows):
            f[e] = r
        report[e] = medians(rows)
    report["faces"] = faces
    if grid is not None and data.pairs:
        from fxassets.export.grid import write_grid

        e = engines[0]
        rows = [[p.source, p.target, o] for p, o in list(zip(data.pairs, outputs[e]))[:GRID_FACES]]
        write_grid(grid, rows, ("before", "teacher", f"student {e}"))
        report["grid"] = str(grid)
    return report


def format_report(report: dict[str, Any], engines: tuple[str, ...]) -> str:
    lines = [f"{report['effect']} on {report['input']}: {report['n']} faces"
             + (f", {len(report['unusable'])} photos unusable" if report["unusable"] else "")]
    for e in engines:
        m = report.get(e) or {}
        if m:
            lines.append(f"  {e:5s} PSNR {m['psnr_db']:.2f} dB (input {m['input_psnr_db']:.2f}), SSIM {m['ssim']:.3f}, "
                         f"recovered {m['recovered']:.2f}, chroma error {m['chroma_error']:.2f} "
                         f"(input {m['input_chroma_error']:.2f}; teacher chroma {m['teacher_chroma']:.2f}), "
                         f"tiles {m['tile_excess']:.2f}  [medians]")
    for u in report["unusable"]:
        lines.append(f"  unusable: {u['file']}: {u['reason']}")
    return "\n".join(lines)
