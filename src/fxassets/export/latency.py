"""Latency: median wall-clock (or CPU time) of ORT CPU sessions, sequential, a fixed thread count, measured side by
side; and the per-operator profile of one (onnxruntime's profiler)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fxassets.export.session import onnx_session, run_model


def latency_compare(paths: Mapping[str, Any], threads: int = 1, runs: int = 50, warmup: int = 10,
                    rounds: int = 5, clock: str = "wall") -> dict[str, float]:
    """Median ms per `sess.run` of each ONNX model (a path, or an ORT session), measured side by side in this process.

    ORT CPU, `intra_op_num_threads=threads`, sequential execution, full graph optimization, a fixed random
    input of the model's (static) input shape.  After `warmup` runs each, the models take turns in `rounds`
    blocks, so that load from other processes hits them alike; each model gets at least `runs` timed runs.
    `clock` "wall" (perf_counter) or "cpu": the calling thread's CPU time, which leaves out the time other
    processes hold the core (1 thread only: ORT then computes on the calling thread).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"latency: clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and threads != 1:
        raise ValueError("latency: clock 'cpu' measures the calling thread: threads must be 1")
    now = time.perf_counter if clock == "wall" else time.thread_time
    if runs < 1:
        raise ValueError("latency: runs must be >= 1")
    sessions, inputs, times = {}, {}, {}
    for name, p in paths.items():
        sess = p if hasattr(p, "run") else onnx_session(p, threads)  # a path, or a session built elsewhere
        shape = sess.get_inputs()[0].shape
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{p}: latency needs a static input shape, got {shape}")
        sessions[name], times[name] = sess, []
        inputs[name] = np.random.default_rng(0).random(shape, dtype=np.float32)
        for _ in range(warmup):
            run_model(sess, inputs[name])
    rounds = max(1, min(rounds, runs))
    per_round = -(-runs // rounds)
    for _ in range(rounds):
        for name, sess in sessions.items():
            x = inputs[name]
            for _ in range(per_round):
                t = now()
                run_model(sess, x)
                times[name].append(now() - t)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def latency_ms(onnx_path: Path, threads: int = 1, runs: int = 50, warmup: int = 10) -> float:
    """Median ms of one ORT CPU run (intra_op_num_threads=`threads`, sequential) after `warmup` runs."""
    return latency_compare({"model": onnx_path}, threads=threads, runs=runs, warmup=warmup, rounds=1)["model"]


def op_profile(onnx_path: str | Path, threads: int = 1, runs: int = 30, warmup: int = 10, by: str = "op") -> dict[str, float]:
    """ms per run spent in each operator type (after ORT's graph optimizations: QLinearConv, Resize, ...) or, with
    `by` "resolution", at each output resolution ("128x128": the nodes writing a 128 x 128 map, either layout), from
    onnxruntime's profiler: per node the median over `runs` runs after `warmup` (robust to a busy machine's
    outliers), summed, largest first; "total" is their sum."""
    import onnxruntime as ort

    if by not in ("op", "resolution"):
        raise ValueError(f"op_profile: by must be 'op' or 'resolution', got {by!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="fxassets-profile-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random(sess.get_inputs()[0].shape, dtype=np.float32)
        for _ in range(warmup + runs):
            run_model(sess, x)
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes: dict[str, tuple[str, list[float]]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = e["args"]["op_name"] if by == "op" else _resolution(e["args"].get("output_type_shape") or [{}])
            nodes.setdefault(e["name"], (key, []))[1].append(e["dur"] / 1e3)
    ops: dict[str, float] = {}
    for op, durations in nodes.values():
        ops[op] = ops.get(op, 0.0) + float(np.median(durations[warmup:] or durations))
    out = {op: round(ms, 4) for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])}
    return {**out, "total": round(sum(ops.values()), 4)}


def _resolution(shapes: list[dict[str, list[int]]]) -> str:
    """"HxW" of a node's first output: the two equal adjacent sizes of a 4-d NCHW or NHWC shape (square inputs)."""
    shape = next(iter(shapes[0].values()), []) if shapes else []
    if len(shape) == 4:
        for h, w in ((shape[2], shape[3]), (shape[1], shape[2])):
            if h == w:
                return f"{h}x{w}"
    return "other"
