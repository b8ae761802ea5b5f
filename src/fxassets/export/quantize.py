"""int8 static quantization (ONNX Runtime, QDQ, per-channel int8 weights, uint8 activations): calibration readers,
the nodes kept in float (`exclude`, `keep_float`), shape pre-processing and `quantize_int8`."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from fxassets.core.atomic import atomic_path
from fxassets.export.onnx_export import op_counts
from fxassets.export.session import INPUT_NAME
from fxassets.export.session import to_input

log = logging.getLogger(__name__)

# ops that ORT does not quantize and that sit all over MobileNetV3 (hard-swish, squeeze-excite)
HARD_OPS = frozenset({"HardSwish", "HardSigmoid"})
POOL_OPS = frozenset({"ReduceMean", "GlobalAveragePool"})
Exclude = Literal["none", "se", "hard"]
# percentile calibration, all layers int8: ORT's default 99.999 kept 37.7 dB parity on a trained student here,
# 99.95 kept 38.6 dB, minmax 36.1 dB (the decoder's unbounded residual sums stretch the uint8 ranges).  With the
# first convolution in float (export.keep_float), a sketch student: 99.95 39.3 dB, 99.99 42.1, 99.999 41.7.
DEFAULT_PERCENTILE = 99.99



def _calibration_reader(calibration: Sequence[np.ndarray]):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[np.ndarray] = iter([to_input(c) for c in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {INPUT_NAME: x}

    return _Reader()


def _graph_index(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """The graph's nodes, the node writing each tensor, and the nodes reading each tensor."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return nodes, producer, consumers


def excluded_nodes(model: onnx.ModelProto, exclude: Exclude = "none") -> list[str]:
    """Names of the nodes to keep in float.

    - "none": nothing (ORT's default op set is quantized; HardSwish, HardSigmoid and ReduceMean never are).
    - "se": the squeeze-excite branches (global pooling ... -> Mul), so they need no Q/DQ pairs at all.
    - "hard": "se" plus every node feeding or fed by HardSwish / HardSigmoid (removes all DQ -> HardSwish -> Q).
    """
    if exclude == "none":
        return []
    if exclude not in ("se", "hard"):
        raise ValueError(f"exclude must be 'none', 'se' or 'hard', got {exclude!r}")
    nodes, producer, consumers = _graph_index(model)
    names: set[str] = set()
    for n in nodes:
        if n.op_type not in POOL_OPS:
            continue
        branch, frontier = [n], [n]
        for _ in range(8):  # SE: pool -> conv -> act -> conv -> gate -> Mul; give up if no Mul is near
            frontier = [c for f in frontier for o in f.output for c in consumers.get(o, [])]
            if not frontier:
                break
            branch += frontier
            if any(f.op_type == "Mul" for f in frontier):
                names.update(b.name for b in branch)
                break
    if exclude == "hard":
        for n in nodes:
            if n.op_type in HARD_OPS:
                names.update(producer[i].name for i in n.input if i in producer)
                names.update(c.name for o in n.output for c in consumers.get(o, []))
    return sorted(names)


# ends of the network kept in float by default (`export.keep_float`): the image-to-image student's output is
# clamp(input + delta); int8 rounding of the input, of the first convolution's and of the delta's ranges shows
# directly in the picture (docs/mobile.md)
FLOAT_ENDS = ("input", "output")
# what may sit between the last convolution and the graph output (the residual add, the pixel shuffle, the clamp)
HEAD_TAIL_OPS = frozenset({"Add", "Sub", "Mul", "Clip", "Relu", "DepthToSpace", "Reshape", "Transpose", "Identity",
                           "Sigmoid", "Tanh", "Max", "Min"})


# what carries the image itself on to the output in float: the residual add and the clamp, the learned colour map
# (`train.colour_transform`: reshape, matrix product, offset); a convolution reading the image is kept in float but
# its output is the network's (quantized) business
INPUT_PATH_OPS = frozenset({"Add", "Clip", "MatMul", "Reshape", "Mul", "Sub", "Max", "Min", "Identity"})


def float_end_nodes(model: onnx.ModelProto, ends: Sequence[str] = FLOAT_ENDS) -> list[str]:
    """Names of the nodes at the network's ends to keep in float.

    - "input": every node that reads a graph input (the first convolution; the residual add of the image) and
      what carries the image on from there (`INPUT_PATH_OPS`: the colour map's matrix product, the clamp), so the
      image itself is never quantized.
    - "output": from each graph output back to and including the last convolution(s): the head's last 1x1 conv
      that writes the change, the pixel shuffle, the residual add and the clamp.
    """
    unknown = sorted(set(ends) - set(FLOAT_ENDS))
    if unknown:
        raise ValueError(f"keep_float: unknown network end(s) {unknown}; known: {list(FLOAT_ENDS)}")
    _, producer, consumers = _graph_index(model)
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    names: dict[str, None] = {}
    if "input" in ends:  # the nodes reading the image, and on from them up to a convolution's output
        frontier, seen = sorted(inputs), set()
        while frontier:
            nxt = []
            for t in frontier:
                for c in consumers.get(t, []):
                    if c.name in seen:
                        continue
                    seen.add(c.name)
                    names[c.name] = None
                    if c.op_type in INPUT_PATH_OPS:
                        nxt.extend(c.output)
            frontier = nxt
    if "output" in ends:
        frontier, seen = [o.name for o in model.graph.output], set()
        for _ in range(12):  # bounded: a head's tail is a few ops
            nxt = []
            for t in frontier:
                n = producer.get(t)
                if n is None or n.name in seen:
                    continue
                seen.add(n.name)
                names[n.name] = None
                if n.op_type in HEAD_TAIL_OPS:
                    nxt += [i for i in n.input if i and i not in inputs]
            if not nxt:
                break
            frontier = nxt
    return [n for n in names if n]


def preprocess_for_quant(fp32_path: Path, out_path: Path) -> bool:
    """ORT's `quant_pre_process` (symbolic shape inference + basic graph optimization) of `fp32_path` into
    `out_path`; False (with a warning, nothing written) if it fails.  Node and tensor names of the result are
    the ones `quantize_int8(..., preprocess=True)` quantizes, so exclusion lists are built from this model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path))
        return True
    except Exception as exc:
        log.warning("quant_pre_process failed (%s); quantizing the model as exported", exc)
        Path(out_path).unlink(missing_ok=True)
        return False


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: list[np.ndarray], method: str = "minmax",
                  *, exclude: Exclude = "none", nodes_to_exclude: Sequence[str] = (),
                  keep_float: Sequence[str] = (), percentile: float = DEFAULT_PERCENTILE, preprocess: bool = True,
                  calibration_cache: Path | None = None, quant_format: str = "qdq", activations: str = "u8",
                  weights: str = "s8", per_channel: bool = True) -> dict[str, Any]:
    """Static int8 quantization with ONNX Runtime: QDQ, per-channel QInt8 weights, QUInt8 activations.

    `calibration`: model inputs (1x3xHxW float in [0, 1], or HxWx3 uint8 images).  `method`: "minmax",
    "entropy" or "percentile" (each activation's range clipped at its `percentile`-th absolute value).
    `exclude`: see `excluded_nodes`; `nodes_to_exclude`: more node names to keep in float (names of the model
    that is quantized: after `preprocess_for_quant` when `preprocess`; an unknown name is a ValueError).
    `preprocess` runs ORT's `quant_pre_process` first and falls back to the plain model if it fails.  Writes
    `int8_path` atomically; returns a dict with `bytes`, `ops`, `calibration_samples`, `method`, `exclude`,
    `excluded_nodes` (count), `nodes_to_exclude` (the explicit list), `preprocessed`, `quantize_s`.
    The pipeline's choices are the defaults; `quant_format` "qoperator", `activations` / `weights` "u8" or "s8"
    and `per_channel` False are for comparing them (benchmarks/bench_int8_profile.py, docs/mobile.md).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"quantize_int8: calibration method must be one of {sorted(methods)}, got {method!r}")
    if not calibration:
        raise ValueError("quantize_int8: no calibration images")
    formats, types = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}, {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    if quant_format not in formats or activations not in types or weights not in types:
        raise ValueError(f"quantize_int8: quant_format must be one of {sorted(formats)}, activations and weights "
                         f"one of {sorted(types)}; got {quant_format!r}, {activations!r}, {weights!r}")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"{fp32_path}: no such ONNX model")
    t0 = time.perf_counter()
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quant.", dir=int8_path.parent) as scratch:
        src, preprocessed = fp32_path, False
        if preprocess:
            pre = Path(scratch) / "pre.onnx"
            if preprocess_for_quant(fp32_path, pre):
                src, preprocessed = pre, True
        model = onnx.load(str(src))
        explicit = list(dict.fromkeys(nodes_to_exclude))
        unknown = sorted(set(explicit) - {n.name for n in model.graph.node})
        if unknown:
            raise ValueError(f"quantize_int8: nodes_to_exclude names nodes not in {src.name}: {unknown[:5]}")
        ends = float_end_nodes(model, keep_float) if keep_float else []
        skip = sorted(set(excluded_nodes(model, exclude)) | set(explicit) | set(ends))
        used = method
        # the ranges of every activation, calibrated once per model and method: other exclusions reuse them
        cache = Path(calibration_cache) if calibration_cache is not None else None

        def run(tmp: Path, how: str) -> None:
            extra = {"CalibPercentile": float(percentile)} if how == "percentile" else {}
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
                quantize_static(
                    str(src), str(tmp), _calibration_reader(calibration),
                    quant_format=formats[quant_format], per_channel=per_channel,
                    activation_type=types[activations], weight_type=types[weights],
                    calibrate_method=methods[how], nodes_to_exclude=skip or None, extra_options=extra,
                    calibration_cache_path=cache if how == method else None,
                )

        with atomic_path(int8_path) as tmp:
            try:
                run(tmp, method)
            except ValueError as exc:
                # numpy cannot bin an activation whose whole range is a few float32 steps wide (an untrained
                # squeeze-excite gate sitting at 0.5): calibrate that model with min / max instead
                if method == "minmax" or "bins" not in str(exc):
                    raise
                log.warning("%s calibration failed (%s); falling back to minmax", method, exc)
                used = "minmax"
                run(tmp, used)
            onnx.checker.check_model(str(tmp))
    return {
        "path": str(int8_path),
        "bytes": int8_path.stat().st_size,
        "ops": op_counts(int8_path),
        "calibration_samples": len(calibration),
        "method": used,
        "method_requested": method,
        "percentile": float(percentile) if used == "percentile" else None,
        "exclude": exclude,
        "excluded_nodes": len(skip),
        "nodes_to_exclude": explicit,
        "keep_float": list(keep_float),
        "float_end_nodes": ends,
        "quant_format": quant_format, "activations": activations, "weights": weights, "per_channel": per_channel,
        "preprocessed": preprocessed,
        "quantize_s": round(time.perf_counter() - t0, 3),
    }
