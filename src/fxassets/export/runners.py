"""Sessions for the LiteRT (`.tflite`) and ExecuTorch (`.pte`) models with ONNX Runtime's calling convention
(`get_inputs()[0].shape`, `run(None, {"image": x}) -> [y]`), so the stage's parity and latency code, `fxassets apply`
and `fxassets bench` run every target the same way (`fxassets.export.session.model_session` picks one by suffix).

Both run on the CPU through XNNPACK with a fixed thread count; with one thread the work runs on the calling thread
(so `latency_compare(clock="cpu")` times them like ORT).  ExecuTorch's thread pool is one per process
(`ExecuTorchSession`).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np


def _missing(path: Path, module: str, extra: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: model not found; build it with `dvc repro` (or `make run`) with the "
                                "target in export.targets first")
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{path}: running it needs {module} ({extra})")


class LiteRTSession:
    """A .tflite model in the LiteRT interpreter (ai-edge-litert; XNNPACK delegate), `threads` threads (>= 1)."""

    def __init__(self, path: str | Path, threads: int = 1):
        _missing(Path(path), "ai_edge_litert", "pip install -c constraints.txt -e .")
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self.interpreter = Interpreter(model_path=str(path), num_threads=max(1, int(threads or 1)))
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]

    def get_inputs(self):
        return [SimpleNamespace(name="image", shape=[int(d) for d in self._in["shape"]])]

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        (x,) = feeds.values()
        self.interpreter.set_tensor(self._in["index"], np.ascontiguousarray(x, dtype=np.float32))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(self._out["index"]).copy()]


_ET_THREADS: list[int] = [0]  # the process's ExecuTorch thread pool size as last set here (0: never set)


def _et_threads(n: int) -> None:
    """Size ExecuTorch's one thread pool; only before a method is loaded: XNNPACK's runtime keeps the pool it was
    created with, and running it after a reset deadlocks (seen here on executorch 1.5.1)."""
    if _ET_THREADS[0] != n:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(n)
        _ET_THREADS[0] = n


class ExecuTorchSession:
    """A .pte program (ExecuTorch runtime, XNNPACK delegate), method "forward", `threads` threads (>= 1).  The
    thread pool is the process's: loading a session with another thread count resizes it, and a session whose
    count is no longer the pool's reloads its method before it runs (never one method on a resized pool)."""

    def __init__(self, path: str | Path, threads: int = 1):
        _missing(Path(path), "executorch", "pip install -c constraints.txt -e '.[mobile]'")
        self.path = Path(path)
        self.threads = max(1, int(threads or 1))
        self._load()
        meta = self.method.metadata
        self._shape = [int(d) for d in meta.input_tensor_meta(0).sizes()]

    def _load(self) -> None:
        from executorch.runtime import Runtime

        _et_threads(self.threads)
        self.method = Runtime.get().load_program(str(self.path)).load_method("forward")
        self._pool = self.threads

    def get_inputs(self):
        return [SimpleNamespace(name="image", shape=list(self._shape))]

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        if _ET_THREADS[0] != self._pool:  # another session resized the pool since this one loaded
            self._load()
        (x,) = feeds.values()
        (y,) = self.method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return [y.numpy().copy()]


SESSIONS = {".tflite": LiteRTSession, ".pte": ExecuTorchSession}
