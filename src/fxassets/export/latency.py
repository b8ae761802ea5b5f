"""Latency: median wall-clock of ORT CPU sessions, sequential, a fixed thread count, measured side by side."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fxassets.export.session import onnx_session, run_model


def latency_compare(paths: Mapping[str, str | Path], threads: int = 1, runs: int = 50, warmup: int = 10,
                    rounds: int = 5) -> dict[str, float]:
    """Median ms per `sess.run` of each ONNX model, measured side by side in this process.

    ORT CPU, `intra_op_num_threads=threads`, sequential execution, full graph optimization, a fixed random
    input of the model's (static) input shape.  After `warmup` runs each, the models take turns in `rounds`
    blocks, so that load from other processes hits them alike; each model gets at least `runs` timed runs.
    """
    if runs < 1:
        raise ValueError("latency: runs must be >= 1")
    sessions, inputs, times = {}, {}, {}
    for name, p in paths.items():
        sess = onnx_session(p, threads)
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
                t = time.perf_counter()
                run_model(sess, x)
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def latency_ms(onnx_path: Path, threads: int = 1, runs: int = 50, warmup: int = 10) -> float:
    """Median ms of one ORT CPU run (intra_op_num_threads=`threads`, sequential) after `warmup` runs."""
    return latency_compare({"model": onnx_path}, threads=threads, runs=runs, warmup=warmup, rounds=1)["model"]
