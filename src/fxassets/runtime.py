"""The on-device loop, in Python: find the face, align it, run the student (or the teacher), blend it back.

`EffectRunner.process(frame)` is what a phone does per camera frame; `fxassets apply` and `fxassets bench` use it.
A frame where no face is found passes through unchanged.  With `track=True` (video) the face is detected on the
first frame and whenever the track is lost, and tracked in between (`fxassets.tracking`): one face, the largest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fxassets.core.config import FacesConfig
from fxassets.faces.detect import FaceDetector
from fxassets.faces.align import align_matrix, warp_aligned
from fxassets.faces.composite import composite, face_mask, mask_u8
from fxassets.export.session import model_session, onnx_session, to_input, to_uint8  # noqa: F401 (one session)

Engine = Literal["int8", "fp32", "litert", "executorch", "teacher"]


@dataclass
class FrameResult:
    frame: np.ndarray  # the composited frame (or the input when no face was found)
    crops: list[np.ndarray] = field(default_factory=list)  # the engine's aligned outputs, one per face
    faces: int = 0
    ms: dict[str, float] = field(default_factory=dict)  # STAGES and total


STAGES = ("detect", "track", "align", "model", "composite")


class EffectRunner:
    """Per-frame runtime. `engine` "int8" / "fp32" run the ONNX student at `model_path` ("litert" / "executorch":
    the .tflite / .pte model there, `fxassets.export.runners`); "teacher" runs `teacher`
    on the aligned crop (slow: for comparison). Every face found in a frame is processed; with `track` (frames of
    one video, in order) the one tracked face."""

    def __init__(self, faces: FacesConfig, engine: Engine, model_path: Path | None = None, teacher=None, threads: int = 1,
                 track: bool = False):
        self.size, self.margin = faces.crop_size, faces.margin
        self.mask = mask_u8(face_mask(self.size, margin=self.margin))
        self.engine = engine
        if engine == "teacher":
            if teacher is None:
                raise ValueError("engine 'teacher' needs a teacher")
            self.teacher = teacher
        else:
            self.session = model_session(model_path, threads)
            inp = self.session.get_inputs()[0]
            self.input_name = inp.name
            if inp.shape[-1] != self.size:
                raise ValueError(f"{model_path}: model input is {inp.shape[-1]} px, faces.crop_size is {self.size}")
        if track:
            from fxassets.tracking import FaceTracker

            self.tracker, self.frames = FaceTracker(faces.detector, faces.min_score), 0
        else:
            self.detector, self.tracker = FaceDetector(faces.detector, faces.min_score), None

    def __enter__(self) -> EffectRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        (self.tracker or self.detector).close()

    def run_crop(self, crop: np.ndarray) -> np.ndarray:
        """The engine on one aligned RGB uint8 crop -> RGB uint8 crop."""
        if self.engine == "teacher":
            return self.teacher.edit(crop, {})
        (y,) = self.session.run(None, {self.input_name: to_input(crop)})
        return to_uint8(y)

    def process(self, frame: np.ndarray, blend: bool = True, *, t: float | None = None, inplace: bool = False) -> FrameResult:
        """The effect on one RGB uint8 frame. `t`: its time in seconds (tracking; default: frames at 30 fps);
        `inplace`: composite into `frame` itself (no copy)."""
        ms = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        if self.tracker is not None:
            step = self.tracker.update(frame, self.frames / 30.0 if t is None else t)
            self.frames += 1
            faces = [step.face] if step.face is not None else []
            ms.update(step.ms)
        else:
            faces = self.detector.detect(frame)
            ms["detect"] = (time.perf_counter() - t0) * 1e3
        out, crops = frame, []
        for face in faces:
            ta = time.perf_counter()
            M = align_matrix(face, self.size, self.margin)
            crop = warp_aligned(frame, M, self.size)
            tb = time.perf_counter()
            y = self.run_crop(crop)
            tc = time.perf_counter()
            if blend:
                out = composite(out, y, M, self.mask, inplace=inplace or out is not frame)
            td = time.perf_counter()
            ms["align"] += (tb - ta) * 1e3
            ms["model"] += (tc - tb) * 1e3
            ms["composite"] += (td - tc) * 1e3
            crops.append(y)
        ms["total"] = (time.perf_counter() - t0) * 1e3
        return FrameResult(out, crops, len(faces), ms)
