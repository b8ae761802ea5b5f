"""The ONNX Runtime CPU session and the model's tensor convention (one place, for the stage and the runtime).

The exported student reads "image" (1x3xSxS float32 RGB in [0, 1]) and writes "output" (same layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_NAME = "image"
OUTPUT_NAME = "output"


def to_input(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB, 3xHxW or 1x3xHxW float in [0, 1] -> contiguous 1x3xHxW float32 model input."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 3 and a.dtype == np.uint8:
        a = a.transpose(2, 0, 1).astype(np.float32) / 255.0
    elif a.dtype == np.uint8:
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
    return np.ascontiguousarray((np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0))



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
