"""The ONNX Runtime CPU session and the model's tensor convention (one place, for the stage and the runtime).

The exported student reads "image" (1x3xSxS float32 RGB in [0, 1]) and writes "output" (same layout)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "output"


def to_input(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB, 3xHxW or 1x3xHxW float in [0, 1] -> contiguous 1x3xHxW float32 model input."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8:  # plane by plane: 4x faster, the same values
        out = np.empty((1, 3, *a.shape[:2]), np.float32)
        for i in range(3):
            np.divide(np.ascontiguousarray(a[:, :, i]), np.float32(255), out=out[0, i], dtype=np.float32)
        return out
    if a.dtype == np.uint8:
        raise ValueError(f"uint8 images must be HxWx3, got shape {a.shape}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[:2] != (1, 3):
        raise ValueError(f"expected an HxWx3 uint8 image or a 1x3xHxW float array, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def to_uint8(output: np.ndarray) -> np.ndarray:
    """1x3xHxW (or 3xHxW) float in [0, 1] -> HxWx3 uint8 RGB, rounded as a PNG would store it."""
    a = np.asarray(output)
    if a.ndim == 4:
        a = a[0]
    planes = []
    for p in a:  # plane by plane, then one interleave: 4x faster than on the whole array, the same values
        t = np.clip(p, 0.0, 1.0)
        t *= 255.0
        t += 0.5
        planes.append(t.astype(np.uint8))
    return cv2.merge(planes) if len(planes) > 1 else planes[0][:, :, None]



def onnx_session(path: str | Path, threads: int = 0):
    """A sequential ORT CPU session, full graph optimization, `threads` intra-op threads (0 = ORT's default: one
    per physical core).  A missing file raises FileNotFoundError naming how to build it."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: model not found; build it with `dvc repro` (or `make run`) first")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # 0 = ORT's default (one per physical core)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])



def run_model(sess, x: np.ndarray) -> np.ndarray:
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def model_session(path: str | Path, threads: int = 0):
    """A session for any of the stage's models, by suffix: `.onnx` / `.ort` in ONNX Runtime (`onnx_session`),
    `.tflite` in LiteRT, `.pte` in ExecuTorch (`fxassets.export.runners`; `threads` 0 there means 1), all
    called as an ORT session (`run_model`)."""
    suffix = Path(path).suffix
    if suffix in (".tflite", ".pte"):
        from fxassets.export.runners import SESSIONS

        return SESSIONS[suffix](path, threads)
    return onnx_session(path, threads)
