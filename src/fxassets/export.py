"""The mobile_model stage: student -> ONNX fp32 -> int8 (QDQ), parity and latency checks, model-card grid.

- `export_onnx`: torch.onnx (the torch.export-based exporter; for opset 17 the TorchScript one), a fixed
  1x3xSxS input "image" -> "output", float32 RGB in [0, 1], simplified with onnxslim, checked with
  onnx.checker, and compared with torch (max abs difference).
- `quantize_int8`: ONNX Runtime static quantization, QDQ format, per-channel int8 weights and uint8 activations
  (int8 activations ran 2x slower on x86 here).  MinMax calibration lets the student's unbounded decoder
  sums stretch the uint8 ranges (36 dB parity on a trained student); percentile calibration kept 38.6 dB.
- `activation_sensitivity` / `quantize_with_fallback`: when parity misses the gate, onnxruntime's qdq_loss_debug
  ranks the int8 activations by how much their rounding hurts the layers that read them; the worst few are tried
  in float, the one that helps most is kept, for a bounded number of rounds.  On a trained student the culprit
  was a decoder Concat (upsampled residual sum + encoder skip share one uint8 range): minmax 36.1 -> 38.5 dB
  with 4 nodes in float, percentile 36.9 -> 38.1 dB with 2.
- `convert_to_ort`: the int8 model in ONNX Runtime's mobile format (`.ort`, onnxruntime's converter).
- `latency_ms` / `latency_compare`: median wall-clock of ORT CPU sessions, sequential, a fixed thread count.
- `export_mobile`: the stage; writes the three models, the grid, the report and the model card
  (`fxassets.model_card`), and raises `ParityError` (after both are written) when int8 drifts too far from fp32.

PSNR convention (as `fxassets.metrics`): mean of per-image PSNRs, peak 1.0, identical images count as 100 dB.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fxassets.atomic import atomic_path, write_json
from fxassets.config import ExportConfig
from fxassets.images import read_png_rgb
from fxassets.student import inference_form

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "output"
MAX_PSNR = 100.0  # same cap as fxassets.metrics.MAX_PSNR: identical images score 100 dB, never +inf
REPORT_KEYS = (
    "parity_psnr_db", "int8_psnr_db", "fp32_psnr_db", "identity_psnr_db", "fp32_ms_1t", "int8_ms_1t",
    "fp32_bytes", "int8_bytes", "torch_onnx_max_abs_diff", "heldout_pairs", "calibration_samples",
)
GRID_LABELS = ("before", "teacher", "student int8")
# ops that ORT does not quantize and that sit all over MobileNetV3 (hard-swish, squeeze-excite)
HARD_OPS = frozenset({"HardSwish", "HardSigmoid"})
POOL_OPS = frozenset({"ReduceMean", "GlobalAveragePool"})
Exclude = Literal["none", "se", "hard"]
# percentile calibration, all layers int8: ORT's default 99.999 kept 37.7 dB parity on a trained student here,
# 99.95 kept 38.6 dB, minmax 36.1 dB (the decoder's unbounded residual sums stretch the uint8 ranges).  With the
# first convolution in float (export.keep_float), a sketch student: 99.95 39.3 dB, 99.99 42.1, 99.999 41.7.
DEFAULT_PERCENTILE = 99.99


class ParityError(ValueError):
    """The int8 model's output differs too much from the fp32 model's (PSNR below the configured floor)."""


# --------------------------------------------------------------------------------------------------- helpers


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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two images of the same shape, peak 1.0; identical images give MAX_PSNR (100 dB).

    uint8 arrays are read as 0..255 and scaled to [0, 1]; float arrays must already be in [0, 1].  The layout
    (HxWx3, 1x3xHxW, ...) does not matter as long as both match.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    fa = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    fb = b.astype(np.float64) / 255.0 if b.dtype == np.uint8 else b.astype(np.float64)
    mse = float(np.mean((fa - fb) ** 2))
    if mse <= 10.0 ** (-MAX_PSNR / 10.0):
        return MAX_PSNR
    return float(10.0 * np.log10(1.0 / mse))


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Node count per op type of an ONNX model (top-level graph)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # 0 = ORT's default (one per physical core)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


# --------------------------------------------------------------------------------------------------- export


def _torch_export(model: torch.nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    """torch.export-based exporter for opset >= 18; it cannot write older opsets (and onnx's version converter
    breaks ReduceMean going 18 -> 17), so opset 17 goes through the legacy TorchScript exporter."""
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    if opset >= 18:
        program = torch.onnx.export(model, (x,), None, dynamo=True, external_data=False, optimize=True,
                                    verbose=False, **names)
        return program.model_proto
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), buf, dynamo=False, do_constant_folding=True, **names)
    return onnx.load_from_string(buf.getvalue())


def export_onnx(model: torch.nn.Module, path: Path, size: int = 256, opset: int = 18) -> dict[str, Any]:
    """Export `model` (N x 3 x H x W float RGB in [0, 1] -> same) to ONNX at a fixed 1x3x`size`x`size` input.

    Input "image", output "output", float32 NCHW.  The graph is simplified with onnxslim (kept unsimplified,
    with a warning, if onnxslim fails), checked with `onnx.checker` (full check), written atomically, then run
    in ONNX Runtime on a fixed random input and compared with torch.  Returns a dict with
    `torch_onnx_max_abs_diff`, `opset`, `size`, `bytes`, `ops` (node count per op type), `simplified`,
    `export_s`.  The model is put in eval mode for the export and given back in the mode it came in; a student
    is exported in its `inference_form` (decoder fuses at low resolution, BatchNorm folded), and the torch / ONNX
    difference is measured against the model as given.
    """
    import onnxslim

    path = Path(path)
    t0 = time.perf_counter()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(x).detach().cpu().numpy()
            if ref.shape != (1, 3, size, size):
                raise ValueError(f"export_onnx: the model maps 1x3x{size}x{size} to {tuple(ref.shape)}, "
                                 "expected the same shape")
            try:
                proto = _torch_export(inference_form(model), x, opset)  # same outputs, checked below
            except Exception as exc:
                raise RuntimeError(f"export_onnx: torch.onnx.export failed for {type(model).__name__} "
                                   f"at {size}x{size}, opset {opset}: {exc}") from exc
    finally:
        model.train(was_training)
    simplified = True
    try:
        proto = onnxslim.slim(proto)
    except Exception as exc:  # a simplifier bug must not block the export; ORT optimizes at load anyway
        log.warning("onnxslim failed (%s); keeping the unsimplified graph", exc)
        simplified = False
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    out = _run(_session(path), x.numpy())
    diff = float(np.max(np.abs(out - ref)))
    opset_found = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    return {
        "path": str(path),
        "size": size,
        "opset": int(opset_found),
        "bytes": path.stat().st_size,
        "ops": op_counts(proto),
        "simplified": simplified,
        "torch_onnx_max_abs_diff": diff,
        "export_s": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------------------------------- int8


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


def float_end_nodes(model: onnx.ModelProto, ends: Sequence[str] = FLOAT_ENDS) -> list[str]:
    """Names of the nodes at the network's ends to keep in float.

    - "input": every node that reads a graph input (the first convolution; the residual add of the image), so
      the image itself is never quantized.
    - "output": from each graph output back to and including the last convolution(s): the head's last 1x1 conv
      that writes the change, the pixel shuffle, the residual add and the clamp.
    """
    unknown = sorted(set(ends) - set(FLOAT_ENDS))
    if unknown:
        raise ValueError(f"keep_float: unknown network end(s) {unknown}; known: {list(FLOAT_ENDS)}")
    _, producer, consumers = _graph_index(model)
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    names: dict[str, None] = {}
    if "input" in ends:
        for i in sorted(inputs):
            names.update((c.name, None) for c in consumers.get(i, []))
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
                  calibration_cache: Path | None = None) -> dict[str, Any]:
    """Static int8 quantization with ONNX Runtime: QDQ, per-channel QInt8 weights, QUInt8 activations.

    `calibration`: model inputs (1x3xHxW float in [0, 1], or HxWx3 uint8 images).  `method`: "minmax",
    "entropy" or "percentile" (each activation's range clipped at its `percentile`-th absolute value).
    `exclude`: see `excluded_nodes`; `nodes_to_exclude`: more node names to keep in float (names of the model
    that is quantized: after `preprocess_for_quant` when `preprocess`; an unknown name is a ValueError).
    `preprocess` runs ORT's `quant_pre_process` first and falls back to the plain model if it fails.  Writes
    `int8_path` atomically; returns a dict with `bytes`, `ops`, `calibration_samples`, `method`, `exclude`,
    `excluded_nodes` (count), `nodes_to_exclude` (the explicit list), `preprocessed`, `quantize_s`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"quantize_int8: calibration method must be one of {sorted(methods)}, got {method!r}")
    if not calibration:
        raise ValueError("quantize_int8: no calibration images")
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
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
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
        "preprocessed": preprocessed,
        "quantize_s": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------------------------------- float fallback


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> static dims (None where unknown), from value_info (shape-inferred when missing)."""
    if not model.graph.value_info:
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # names without shapes are scored per tensor instead of per channel
            pass
    out: dict[str, list[int | None]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def _consumer_weights(model: onnx.ModelProto, tensor: str, channels: int, depth: int = 4,
                      _ctx: tuple | None = None) -> np.ndarray | None:
    """How much each channel of `tensor` (N=1, NCHW) matters to the layers that read it: for a Conv reader, the
    energy of its weights on that input channel (sum over output channels and kernel taps of w^2); through
    Concat (axis 1), Resize and Identity, the weights of the readers behind them; 1 for any other reader.
    Each reader's weights are scaled to mean 1, then averaged over readers.  None when nothing reads `tensor`."""
    from onnx import numpy_helper

    if _ctx is None:
        readers_of: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in dict.fromkeys(n.input):
                readers_of.setdefault(i, []).append(n)
        _ctx = ({i.name: i for i in model.graph.initializer}, _shapes(model), readers_of)
    inits, shapes, readers_of = _ctx
    readers = readers_of.get(tensor, [])
    per_reader = []
    for n in readers:
        w = np.ones(channels)
        if n.op_type == "Conv" and n.input[0] == tensor and n.input[1] in inits:
            W = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            per_group = W.shape[1]
            if per_group * group == channels:
                e = (W**2).reshape(W.shape[0], per_group, -1).sum(2)  # out x in-per-group
                outs = W.shape[0] // group
                w = np.array([e[(c // per_group) * outs:(c // per_group + 1) * outs, c % per_group].sum()
                              for c in range(channels)])
        elif depth > 0 and n.op_type in ("Resize", "Identity"):
            w = _consumer_weights(model, n.output[0], channels, depth - 1, _ctx)
        elif depth > 0 and n.op_type == "Concat" and next((a.i for a in n.attribute if a.name == "axis"), 0) == 1:
            out_shape = shapes.get(n.output[0])
            offset = 0
            for i in n.input:
                if i == tensor:
                    break
                dims = shapes.get(i)
                offset = None if offset is None or not dims or len(dims) < 2 or not dims[1] else offset + dims[1]
            total = out_shape[1] if out_shape and len(out_shape) > 1 and out_shape[1] else None
            wc = _consumer_weights(model, n.output[0], total, depth - 1, _ctx) if total and offset is not None else None
            w = wc[offset:offset + channels] if wc is not None else None
        if w is None or not np.isfinite(w).all() or w.mean() <= 0:
            w = np.ones(channels)
        per_reader.append(w / w.mean())
    return np.mean(per_reader, axis=0) if per_reader else None


def _weighted_sqnr_db(ref: Sequence[np.ndarray], test: Sequence[np.ndarray], shape: list[int | None] | None,
                      weights: np.ndarray | None) -> float:
    """SQNR in dB of `test` against `ref` (lists of flattened N=1 NCHW tensors), each channel's signal and noise
    energy weighted by `weights` (`_consumer_weights`): about the SQNR the next layer sees.  With uniform
    weights it is the plain SQNR.  Why: a Concat of a wide-range and a narrow-range branch shares one Q/DQ range;
    the narrow channels round to nothing, yet the wide channels carry the norm, so the plain SQNR looks fine
    while the reader, which weighs the narrow channels more, sees mostly noise.  Capped at MAX_PSNR."""
    chans = shape[1] if shape and len(shape) == 4 and shape[0] == 1 and shape[1] else None
    sig = err = 0.0
    for r, t in zip(ref, test):
        r, t = np.asarray(r, np.float64), np.asarray(t, np.float64)
        if chans and weights is not None and len(weights) == chans and r.size % chans == 0:
            r, t = r.reshape(chans, -1), t.reshape(chans, -1)
            sig = sig + ((r**2).sum(1) * weights).sum()
            err = err + (((r - t) ** 2).sum(1) * weights).sum()
        else:
            sig, err = sig + (r**2).sum(), err + ((r - t) ** 2).sum()
    if err <= 0:
        return MAX_PSNR
    return float(min(MAX_PSNR, 10.0 * np.log10(max(sig, np.finfo(np.float64).tiny) / err)))


# ops that only move values: a float Concat (Reshape, ...) whose output is quantized again keeps nothing in float
PASS_THROUGH_OPS = frozenset({"Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split",
                              "Resize", "DepthToSpace", "SpaceToDepth", "Pad", "MaxPool", "Identity"})


def float_region(model: onnx.ModelProto, tensor: str) -> list[str]:
    """Names of the nodes to exclude from quantization so that `tensor` stays float: the node that writes it,
    every node that reads it (a quantized reader would put a Q/DQ pair back on its input) and, through readers
    that only move values (`PASS_THROUGH_OPS`, e.g. Concat), the readers of their outputs too."""
    nodes, producer, consumers = _graph_index(model)
    region: dict[str, None] = {}
    if tensor in producer:
        region[producer[tensor].name] = None
    frontier = [tensor]
    for _ in range(8):  # bounded: a chain of pass-through ops is short
        nxt = []
        for t in frontier:
            for c in consumers.get(t, []):
                if c.name in region:
                    continue
                region[c.name] = None
                if c.op_type in PASS_THROUGH_OPS:
                    nxt += list(c.output)
        if not nxt:
            break
        frontier = nxt
    return [n for n in region if n]


def _const_value(model: onnx.ModelProto, name: str) -> float | None:
    """The scalar value of an initializer or Constant node output `name` (None if not a constant)."""
    from onnx import numpy_helper

    if not name:
        return None
    for init in model.graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return float(numpy_helper.to_array(a.t).reshape(-1)[0])
    return None


def _removed_activations(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto) -> dict[str, Any]:
    """Relu / Clip outputs of the float model that the quantizer removed (their range is folded into the Q/DQ
    pair: the tensor before QuantizeLinear is then the activation's *input*) -> the activation as a numpy fn,
    so that comparing "pre_qdq" with "post_qdq" measures quantization, not the activation."""
    qdq_producer = {o: n.op_type for n in qdq_model.graph.node for o in n.output}
    out: dict[str, Any] = {}
    for n in float_model.graph.node:
        if n.op_type not in ("Relu", "Clip") or qdq_producer.get(n.output[0]) == n.op_type:
            continue
        if n.op_type == "Relu":
            out[n.output[0]] = lambda a: np.maximum(a, 0.0)
            continue
        lo = _const_value(float_model, n.input[1]) if len(n.input) > 1 else None
        hi = _const_value(float_model, n.input[2]) if len(n.input) > 2 else None
        for a in n.attribute:  # opset < 11
            lo = a.f if a.name == "min" else lo
            hi = a.f if a.name == "max" else hi
        if lo is not None or hi is not None:
            out[n.output[0]] = lambda a, lo=lo, hi=hi: np.clip(a, lo, hi)
    return out


def activation_sensitivity(float_path: Path, int8_path: Path, images: Sequence[np.ndarray],
                           float_activations: dict[str, list[np.ndarray]] | None = None) -> list[dict[str, Any]]:
    """Which quantized activations of `int8_path` drift most from float, worst first (onnxruntime's qdq_loss_debug).

    `float_path` must be the model `int8_path` was quantized from (after `preprocess_for_quant`), so that tensor
    names match.  Both models are run on `images` with every intermediate tensor as an output
    (`modify_model_output_intermediate_tensors`, `collect_activations`); `create_activation_matching` pairs each
    activation's value before its QuantizeLinear, after its DequantizeLinear and in the float model.  Per
    activation: `score_db` (SQNR of its own Q/DQ weighted per channel by what its readers make of each channel,
    `_weighted_sqnr_db`: the ranking key),
    `qdq_err_db` and `xmodel_err_db` (ORT's `compute_activation_error`: global SQNR of its own Q/DQ, and of the
    int8 model's value against the float model's, which includes the drift from upstream), and `nodes`: the
    nodes to keep in float so that the tensor stays float (`float_region`).  `float_activations`
    (as returned in the `_float` key of a previous call's first row) skips re-running the float model.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    if not images:
        raise ValueError("activation_sensitivity: no images")
    float_path, int8_path = Path(float_path), Path(int8_path)
    with tempfile.TemporaryDirectory(prefix=".qdqdebug.", dir=int8_path.parent) as scratch:
        if float_activations is None:
            aug32 = Path(scratch) / "float_aug.onnx"
            modify_model_output_intermediate_tensors(str(float_path), str(aug32))
            float_activations = collect_activations(str(aug32), _calibration_reader(images))
        aug8 = Path(scratch) / "int8_aug.onnx"
        modify_model_output_intermediate_tensors(str(int8_path), str(aug8))
        qdq_activations = collect_activations(str(aug8), _calibration_reader(images))
    model = onnx.load(str(float_path), load_external_data=False)
    removed = _removed_activations(model, onnx.load(str(int8_path), load_external_data=False))
    matching = {}
    for name, m in create_activation_matching(qdq_activations, float_activations).items():
        if "float" not in m:
            continue
        if name in removed:  # the quantizer folded this Relu / Clip into the Q/DQ range: apply it to "pre_qdq"
            m = {**m, "pre_qdq": [removed[name](a) for a in m["pre_qdq"]]}
        matching[name] = m
    errors = compute_activation_error(matching)
    shapes = _shapes(model)

    readers_of: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in dict.fromkeys(n.input):
            readers_of.setdefault(i, []).append(n)
    ctx = ({i.name: i for i in model.graph.initializer}, shapes, readers_of)

    def weights(name: str) -> np.ndarray | None:
        dims = shapes.get(name)
        return _consumer_weights(model, name, dims[1], _ctx=ctx) if dims and len(dims) == 4 and dims[1] else None

    rows = []
    for name, m in matching.items():
        rows.append({
            "tensor": name,
            "score_db": _weighted_sqnr_db(m["pre_qdq"], m["post_qdq"], shapes.get(name), weights(name)),
            "qdq_err_db": float(errors[name]["qdq_err"]),
            "xmodel_err_db": float(errors[name].get("xmodel_err", float("nan"))),
            "nodes": float_region(model, name),
        })
    rows.sort(key=lambda r: (r["score_db"], r["qdq_err_db"]))
    if rows:
        rows[0]["_float"] = float_activations
    return rows


# export.calibration_method "auto": each of these calibrations is tried, the one closest to fp32 on calibration
# images is kept.  On a trained sketch student (first conv in float): percentile 99.95 39.3 dB, 99.99 42.1, 99.999
# 41.7, minmax 39.9 (docs/mobile.md); which is best depends on the model.
AUTO_CALIBRATIONS: tuple[tuple[str, float | None], ...] = (("percentile", 99.99), ("percentile", 99.999),
                                                           ("minmax", None))


def _calibration_name(c: Mapping[str, Any]) -> str:
    return c["method"] if c.get("percentile") is None else f"{c['method']} {c['percentile']:g}"


def quantize_with_fallback(
    fp32_path: Path, int8_path: Path, calibration: list[np.ndarray], parity: Any, min_parity_db: float,
    *, method: str = "minmax", percentile: float = DEFAULT_PERCENTILE, max_rounds: int = 3,
    candidates: int = 0, debug_images: int = 4, judge_images: int = 16, keep_float: Sequence[str] = (),
    say: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`quantize_int8`; then, while `parity(path) < min_parity_db`, keep the most harmful activation in float and
    quantize again, at most `max_rounds` times.

    `parity(path) -> float` is the gate's measure (mean PSNR of the int8 model at `path` against fp32 on held-out
    pairs).  `keep_float`: the network ends kept in float from the start (`float_end_nodes`).  The activation ranges
    are calibrated once (ORT's calibration cache) and reused by every candidate, so a round can afford to try
    them all: it ranks the current int8 model's activations with `activation_sensitivity` (qdq_loss_debug on the
    first `debug_images` calibration images), quantizes once per each of the `candidates` worst (0: every one;
    their `float_region` in float on top of the earlier rounds'), keeps the one whose output is closest to fp32 on
    `judge_images` calibration images (train pairs: the held-out pairs only judge), then measures `parity`.  It stops when the gate
    passes, when no candidate improves on the calibration images, or after `max_rounds`.  The model with the best
    parity (the first that passes, if any) is written to `int8_path`.

    Returns (the `quantize_int8` dict of that model, the fallback record: `rounds` (per round: `parity_psnr_db`,
    `calibration_parity_db`, the activation `kept_float` and its scores, the `nodes_added`, what was `tried`),
    `chosen_round`, `nodes_in_float`, `parity_psnr_db`, `passed`).
    """
    import os

    say = say or (lambda msg: None)
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inputs = [to_input(c) for c in calibration]
    with tempfile.TemporaryDirectory(prefix=".fallback.", dir=int8_path.parent) as scratch:
        pre = Path(scratch) / "pre.onnx"
        preprocessed = preprocess_for_quant(fp32_path, pre)
        src = pre if preprocessed else fp32_path
        s32 = _session(src)
        judge = [inputs[i] for i in _spread(len(inputs), judge_images)]
        ref = [_run(s32, x) for x in judge]

        def calib_parity(path: Path) -> float:
            s = _session(path)
            return float(np.mean([psnr(_run(s, x), r) for x, r in zip(judge, ref)]))

        # the calibration: the one asked for, or with "auto" each of AUTO_CALIBRATIONS, the closest to fp32 on the
        # judge images kept; its ranges are cached, so the fallback's candidates below are not calibrated again
        trials = AUTO_CALIBRATIONS if method == "auto" else ((method, percentile),)
        calibrations = []
        for i, (how, pct) in enumerate(trials):
            path = Path(scratch) / f"round0_{i}.onnx"
            kw: dict[str, Any] = dict(method=how, percentile=DEFAULT_PERCENTILE if pct is None else pct, preprocess=False, keep_float=keep_float,
                                      calibration_cache=Path(scratch) / f"ranges_{i}.json")
            qi = quantize_int8(src, path, inputs, **kw)
            kw["method"] = qi["method"]  # minmax when the histogram could not bin a range: the cache holds those
            calibrations.append({"method": qi["method"], "percentile": qi["percentile"],
                                 "calibration_parity_db": calib_parity(path), "_kw": kw, "_path": path, "_q": qi})
        chosen_cal = max(calibrations, key=lambda c: c["calibration_parity_db"])
        kw, cand, q, cal_par = chosen_cal["_kw"], chosen_cal["_path"], chosen_cal["_q"], chosen_cal["calibration_parity_db"]
        if len(calibrations) > 1:
            say("calibration: " + ", ".join(f"{_calibration_name(c)} {c['calibration_parity_db']:.2f} dB"
                                            for c in calibrations) + f"; kept {_calibration_name(chosen_cal)}")
        par = float(parity(cand))
        rounds: list[dict[str, Any]] = [{"round": 0, "parity_psnr_db": par, "nodes_in_float": 0,
                                         "calibration_parity_db": cal_par}]
        best = (par, 0, cand, q)
        if par < min_parity_db and max_rounds > 0:
            excluded: list[str] = []
            float_acts = None
            for r in range(1, max_rounds + 1):
                ranking = activation_sensitivity(src, cand, inputs[:debug_images], float_activations=float_acts)
                if ranking:
                    float_acts = ranking[0].pop("_float")
                tried, seen = [], set()
                for row in ranking:
                    new = [n for n in row["nodes"] if n not in excluded]
                    if not new or tuple(new) in seen:
                        continue
                    seen.add(tuple(new))
                    path = Path(scratch) / f"round{r}_{len(tried)}.onnx"
                    qi = quantize_int8(src, path, inputs, nodes_to_exclude=excluded + new, **kw)
                    tried.append({"tensor": row["tensor"], "score_db": row["score_db"], "qdq_err_db": row["qdq_err_db"],
                                  "xmodel_err_db": row["xmodel_err_db"], "nodes_added": new,
                                  "calibration_parity_db": calib_parity(path), "_path": path, "_q": qi})
                    if candidates and len(tried) >= candidates:
                        break
                top = max(tried, key=lambda t: t["calibration_parity_db"], default=None)
                if top is not None:  # near-ties (within 0.05 dB): the fewest nodes in float, then the worst-ranked
                    close = [t for t in tried if t["calibration_parity_db"] >= top["calibration_parity_db"] - 0.05]
                    top = min(close, key=lambda t: len(t["nodes_added"]))
                if top is None or top["calibration_parity_db"] <= cal_par:
                    rounds.append({"round": r, "stopped": "no activation left to keep in float" if top is None
                                   else "no candidate improved parity on the calibration images",
                                   "tried": [{k: v for k, v in t.items() if not k.startswith("_")} for t in tried]})
                    say(f"float fallback round {r}: {rounds[-1]['stopped']}")
                    break
                excluded += top["nodes_added"]
                cand, q, cal_par = top["_path"], top["_q"], top["calibration_parity_db"]
                par = float(parity(cand))
                rounds.append({
                    "round": r, "parity_psnr_db": par, "calibration_parity_db": cal_par,
                    "kept_float": {k: top[k] for k in ("tensor", "score_db", "qdq_err_db", "xmodel_err_db")},
                    "nodes_added": top["nodes_added"], "nodes_in_float": len(excluded),
                    "tried": [{k: v for k, v in t.items() if not k.startswith("_")} for t in tried],
                })
                say(f"float fallback round {r}: kept {top['tensor']} in float ({len(top['nodes_added'])} nodes, "
                    f"best of {len(tried)} tried); parity {par:.2f} dB")
                if par > best[0]:
                    best = (par, r, cand, q)
                if par >= min_parity_db:
                    break
        par, chosen, cand, q = best
        os.replace(cand, int8_path)
    q = {**q, "path": str(int8_path), "preprocessed": preprocessed, "quantize_s": round(time.perf_counter() - t0, 3)}
    record = {
        "rounds": rounds,
        "chosen_round": chosen,
        "nodes_in_float": q["nodes_to_exclude"],
        "parity_psnr_db": par,
        "passed": par >= min_parity_db,
        "max_rounds": max_rounds,
        "candidates": candidates,
        "debug_images": min(debug_images, len(calibration)),
        "judge_images": len(_spread(len(calibration), judge_images)),
        "calibrations": [{k: v for k, v in c.items() if not k.startswith("_")} for c in calibrations],
        "keep_float": list(keep_float),
    }
    return q, record


# --------------------------------------------------------------------------------------------------- ORT format


def convert_to_ort(onnx_path: Path, ort_path: Path, target_platform: str = "arm") -> dict[str, Any]:
    """Convert an ONNX model to ONNX Runtime's mobile format (`.ort`) with onnxruntime's own converter
    (`onnxruntime.tools.convert_onnx_models_to_ort`), in process.

    Optimization style "Fixed": the graph optimizations (QDQ -> QLinearConv fusion, ...) are applied and saved,
    so a minimal ORT build runs the file as is.  `target_platform` "arm" (phones) leaves out x86-only layouts
    (NCHWc), so the file runs with the CPU execution provider on ARM and x86 alike.  Written atomically;
    returns `path`, `bytes`, `ops` (the operators a minimal build must include, from the converter's config
    file), `target_platform`, `convert_s`.
    """
    import shutil

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    onnx_path, ort_path = Path(onnx_path), Path(ort_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX model")
    ort_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".ort.", dir=ort_path.parent) as scratch:
        src = Path(scratch) / "in" / "model.onnx"
        src.parent.mkdir()
        shutil.copyfile(onnx_path, src)
        out_dir = Path(scratch) / "out"
        chatter = io.StringIO()
        quiet = logging.getLogger("ort_format_model.utils")  # it logs the config file's path at INFO
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(chatter):
                convert_onnx_models_to_ort(src, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform=target_platform)
        except Exception as exc:
            raise RuntimeError(f"convert_to_ort: onnxruntime's converter failed on {onnx_path}: {exc}\n"
                               f"{chatter.getvalue()[-2000:]}") from exc
        finally:
            quiet.setLevel(level)
        converted = sorted(out_dir.glob("*.ort"))
        if len(converted) != 1:
            raise RuntimeError(f"convert_to_ort: the converter wrote {len(converted)} .ort files for {onnx_path}:\n"
                               f"{chatter.getvalue()[-2000:]}")
        config = next(out_dir.glob("*.config"), None)
        ops = [ln.strip() for ln in config.read_text().splitlines()
               if ln.strip() and not ln.startswith("#")] if config else []
        with atomic_path(ort_path) as tmp:
            shutil.copyfile(converted[0], tmp)
    return {"path": str(ort_path), "bytes": ort_path.stat().st_size, "ops": ops,
            "target_platform": target_platform, "convert_s": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------------------- latency


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
        sess = _session(p, threads)
        shape = sess.get_inputs()[0].shape
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{p}: latency needs a static input shape, got {shape}")
        sessions[name], times[name] = sess, []
        inputs[name] = np.random.default_rng(0).random(shape, dtype=np.float32)
        for _ in range(warmup):
            _run(sess, inputs[name])
    rounds = max(1, min(rounds, runs))
    per_round = -(-runs // rounds)
    for _ in range(rounds):
        for name, sess in sessions.items():
            x = inputs[name]
            for _ in range(per_round):
                t = time.perf_counter()
                _run(sess, x)
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(t) * 1e3) for name, t in times.items()}


def latency_ms(onnx_path: Path, threads: int = 1, runs: int = 50, warmup: int = 10) -> float:
    """Median ms of one ORT CPU run (intra_op_num_threads=`threads`, sequential) after `warmup` runs."""
    return latency_compare({"model": onnx_path}, threads=threads, runs=runs, warmup=warmup, rounds=1)["model"]


# --------------------------------------------------------------------------------------------------- stage


def _read_pairs(pairs_dir: Path) -> Any:
    import pandas as pd

    manifest = pairs_dir / "manifest.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no face_pairs manifest (run the face_pairs stage first)")
    df = pd.read_parquet(manifest)
    missing = {"sample_id", "person_id", "split", "status", "source", "target"} - set(df.columns)
    if missing:
        raise ValueError(f"{manifest}: missing columns {sorted(missing)}")
    return df[df["status"] == "pass"].sort_values("sample_id").reset_index(drop=True)


def _spread(n_total: int, n: int) -> list[int]:
    """`n` indices spread evenly over range(n_total) (all of them if n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, n).round()})


def export_mobile(checkpoint: Path, pairs_dir: Path, cfg: ExportConfig, out_dir: Path, onnx_fp32: Path,
                  onnx_int8: Path, grid_png: Path, report_json: Path, progress: bool = True, *,
                  onnx_ort: Path | None = None, model_card: Path | None = None, train_metrics: Path | None = None,
                  teacher_json: Path | None = None, faces_source: Path | None = None,
                  effect: str | None = None) -> dict[str, Any]:
    """The mobile_model stage: student checkpoint + face pairs -> fp32 and int8 ONNX, the int8 model in ORT format,
    grid, report and model card.

    Calibrates on up to `cfg.calibration_samples` train pairs (sources, spread over the sorted split),
    evaluates on every held-out pair that passed: parity (int8 vs fp32 outputs, float), int8 and fp32
    student vs teacher and the identity (source vs teacher, both uint8), latency of the three models at 1 thread
    side by side.  While parity is below `cfg.min_parity_db`, up to `cfg.max_float_fallback` rounds keep the
    activations qdq_loss_debug finds most harmful in float (`quantize_with_fallback`).  The int8 model is then
    converted to `onnx_ort` (default: beside it, `.ort`) and checked against it.  The model card
    (`model_card`, default `out_dir/MODEL_CARD.md`, `fxassets.model_card`) also reads the student's
    `train_metrics` (default: `metrics.json` beside the checkpoint), the face pairs' `summary.json`, the
    teacher fingerprint `teacher_json` and the source photos' `SOURCE.md` in `faces_source` when given.
    Writes the report and the card, then raises `ParityError` if the int8 model (or its .ort) is below
    `cfg.min_parity_db`.
    """
    from tqdm import tqdm

    from fxassets.grid import write_grid
    from fxassets.model_card import write_model_card
    from fxassets.student import count_params, load_student

    checkpoint, pairs_dir, out_dir = Path(checkpoint), Path(pairs_dir), Path(out_dir)
    onnx_fp32, onnx_int8, grid_png, report_json = map(Path, (onnx_fp32, onnx_int8, grid_png, report_json))
    onnx_ort = Path(onnx_ort) if onnx_ort else onnx_int8.with_suffix(".ort")
    model_card = Path(model_card) if model_card else out_dir / "MODEL_CARD.md"
    say = (lambda msg: tqdm.write(f"[mobile_model] {msg}")) if progress else (lambda msg: None)

    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no student checkpoint (run the student_checkpoint stage first)")
    pairs = _read_pairs(pairs_dir)
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    heldout = pairs[pairs["split"] == "heldout"].reset_index(drop=True)
    if heldout.empty:
        raise ValueError(f"{pairs_dir / 'manifest.parquet'}: no held-out pairs with status 'pass'; "
                         "parity and quality cannot be measured")
    if train.empty:
        raise ValueError(f"{pairs_dir / 'manifest.parquet'}: no train pairs with status 'pass' to calibrate on")
    out_dir.mkdir(parents=True, exist_ok=True)

    model, meta = load_student(checkpoint)
    first = read_png_rgb(pairs_dir / heldout.loc[0, "source"])
    size = int(first.shape[0])
    if first.shape[0] != first.shape[1]:
        raise ValueError(f"{pairs_dir}: pairs must be square crops, got {first.shape[1]}x{first.shape[0]}")
    held = []
    for r in heldout.itertuples(index=False):
        src = read_png_rgb(pairs_dir / r.source)
        tgt = read_png_rgb(pairs_dir / r.target)
        if src.shape != (size, size, 3) or tgt.shape != (size, size, 3):
            raise ValueError(f"{pairs_dir}: pair {r.sample_id} is {src.shape}/{tgt.shape}, expected {size}x{size}")
        held.append((r, src, tgt, to_input(src)))

    say(f"exporting fp32 ONNX at {size}x{size}, opset {cfg.opset}")
    exp = export_onnx(model, onnx_fp32, size=size, opset=cfg.opset)
    idx = _spread(len(train), cfg.calibration_samples)
    calibration = [to_input(read_png_rgb(pairs_dir / train.loc[i, "source"])) for i in idx]
    s32 = _session(onnx_fp32)
    ref = [_run(s32, x) for *_, x in held]

    def parity(path: Path) -> float:
        s = _session(path)
        return float(np.mean([psnr(_run(s, x), y) for (*_, x), y in zip(held, ref)]))

    say(f"quantizing int8 ({cfg.calibration_method}, {len(calibration)} calibration images)")
    q, fallback = quantize_with_fallback(
        onnx_fp32, onnx_int8, calibration, parity, cfg.min_parity_db, method=cfg.calibration_method,
        max_rounds=cfg.max_float_fallback, candidates=cfg.float_fallback_candidates, keep_float=cfg.keep_float,
        say=say)
    say(f"converting int8 to ORT format ({onnx_ort.name})")
    conv = convert_to_ort(onnx_int8, onnx_ort)

    s8, sort = _session(onnx_int8), _session(onnx_ort)
    grid_ids = set(heldout.drop_duplicates("person_id").head(cfg.grid_samples)["sample_id"])
    rows, per_pair, ort_diff = [], [], 0.0
    for (r, src, tgt, x), y32 in tqdm(list(zip(held, ref)), desc="held-out pairs", disable=not progress, leave=False):
        y8, yo = _run(s8, x), _run(sort, x)
        ort_diff = max(ort_diff, float(np.max(np.abs(yo - y8))))
        out8 = to_uint8(y8)
        per_pair.append({
            "sample_id": str(r.sample_id), "person_id": str(r.person_id),
            "parity_db": psnr(y8, y32), "ort_parity_db": psnr(yo, y32), "int8_db": psnr(out8, tgt),
            "fp32_db": psnr(to_uint8(y32), tgt), "identity_db": psnr(src, tgt),
        })
        if r.sample_id in grid_ids:
            rows.append([src, tgt, out8])
    say(f"grid of {len(rows)} held-out people")
    write_grid(grid_png, rows, GRID_LABELS)

    say(f"latency, 1 thread, {cfg.latency_runs} runs each")
    lat = latency_compare({"fp32": onnx_fp32, "int8": onnx_int8, "ort": onnx_ort}, threads=1, runs=cfg.latency_runs)

    def mean(key: str) -> float:
        return float(np.mean([p[key] for p in per_pair]))

    parity_ok = mean("parity_db") >= cfg.min_parity_db and mean("ort_parity_db") >= cfg.min_parity_db
    report: dict[str, Any] = {
        "parity_psnr_db": mean("parity_db"),
        "parity_min_psnr_db": float(min(p["parity_db"] for p in per_pair)),
        "ort_parity_psnr_db": mean("ort_parity_db"),
        "ort_vs_int8_max_abs_diff": ort_diff,
        "min_parity_db": cfg.min_parity_db,
        "parity_ok": parity_ok,
        "int8_psnr_db": mean("int8_db"),
        "fp32_psnr_db": mean("fp32_db"),
        "identity_psnr_db": mean("identity_db"),
        "fp32_ms_1t": lat["fp32"],
        "int8_ms_1t": lat["int8"],
        "ort_ms_1t": lat["ort"],
        "int8_speedup_1t": lat["fp32"] / lat["int8"],
        "latency_runs": cfg.latency_runs,
        "fp32_bytes": exp["bytes"],
        "int8_bytes": q["bytes"],
        "ort_bytes": conv["bytes"],
        "torch_onnx_max_abs_diff": exp["torch_onnx_max_abs_diff"],
        "heldout_pairs": len(heldout),
        "calibration_samples": len(calibration),
        "calibration_method": q["method"],  # minmax when the histogram calibrators cannot bin a tensor
        "size": size,
        "opset": exp["opset"],
        "simplified": exp["simplified"],
        "quant": {k: q[k] for k in ("percentile", "exclude", "excluded_nodes", "keep_float", "float_end_nodes",
                                    "preprocessed", "quantize_s")},
        "float_fallback": fallback,
        "nodes_in_float": fallback["nodes_in_float"],
        "ort": {k: conv[k] for k in ("target_platform", "ops", "convert_s")},
        "ops_fp32": exp["ops"],
        "ops_int8": q["ops"],
        "grid_samples": len(rows),
        "student": {**{k: meta[k] for k in ("encoder", "width") if k in meta}, "params": count_params(model)},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "pairs": per_pair,
    }
    write_json(report_json, report)
    write_model_card(
        model_card, report, effect=effect or out_dir.name, meta=meta,
        files={"fp32": onnx_fp32, "int8": onnx_int8, "ort": onnx_ort, "grid": grid_png, "report": report_json},
        train_metrics=Path(train_metrics) if train_metrics else checkpoint.parent / "metrics.json",
        pairs_dir=pairs_dir, pairs=pairs, teacher_json=teacher_json, faces_source=faces_source,
    )
    say(f"parity {report['parity_psnr_db']:.1f} dB, int8 {report['int8_psnr_db']:.2f} dB vs teacher "
        f"(identity {report['identity_psnr_db']:.2f} dB), {lat['fp32']:.2f} ms fp32 / {lat['int8']:.2f} ms int8")
    if not parity_ok:
        rounds = len(fallback["rounds"]) - 1
        kept = f"{len(fallback['nodes_in_float'])} nodes kept in float after {rounds} fallback rounds" if rounds \
            else "no float fallback (export.max_float_fallback = 0)" if cfg.max_float_fallback == 0 \
            else "no float fallback round ran"
        raise ParityError(
            f"int8 parity PSNR {report['parity_psnr_db']:.2f} dB (int8 vs fp32, mean over {len(heldout)} held-out "
            f"pairs; .ort {report['ort_parity_psnr_db']:.2f} dB) is below export.min_parity_db = "
            f"{cfg.min_parity_db:.2f} dB ({kept}); report written to {report_json}"
        )
    return report
