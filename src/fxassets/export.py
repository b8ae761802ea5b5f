"""The mobile_model stage: student -> ONNX fp32 -> int8 (QDQ), parity and latency checks, model-card grid.

- `export_onnx`: torch.onnx (the torch.export-based exporter; for opset 17 the TorchScript one), a fixed
  1x3xSxS input "image" -> "output", float32 RGB in [0, 1], simplified with onnxslim, checked with
  onnx.checker, and compared with torch (max abs difference).
- `quantize_int8`: ONNX Runtime static quantization, QDQ format, per-channel int8 weights and uint8 activations
  (int8 activations ran 2x slower on x86 here).  MinMax calibration lets the student's unbounded decoder
  sums stretch the uint8 ranges (36 dB parity on a trained student); percentile calibration kept 38.6 dB.
- `latency_ms` / `latency_compare`: median wall-clock of ORT CPU sessions, sequential, a fixed thread count.
- `export_mobile`: the stage; writes both models, the grid and the report, and raises `ParityError` (after the
  report is written) when int8 drifts too far from fp32.

PSNR convention (as `fxassets.metrics`): mean of per-image PSNRs, peak 1.0, identical images count as 100 dB.
"""

from __future__ import annotations

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
# percentile calibration: ORT's default 99.999 kept 37.7 dB parity on a trained student here, 99.95 kept 38.6 dB,
# minmax 36.1 dB (the decoder's unbounded residual sums stretch the uint8 ranges)
DEFAULT_PERCENTILE = 99.95


class ParityError(RuntimeError):
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
    `export_s`.  The model is put in eval mode for the export and given back in the mode it came in.
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
                proto = _torch_export(model, x, opset)
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
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
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


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: list[np.ndarray], method: str = "minmax",
                  *, exclude: Exclude = "none", percentile: float = DEFAULT_PERCENTILE,
                  preprocess: bool = True) -> dict[str, Any]:
    """Static int8 quantization with ONNX Runtime: QDQ, per-channel QInt8 weights, QUInt8 activations.

    `calibration`: model inputs (1x3xHxW float in [0, 1], or HxWx3 uint8 images).  `method`: "minmax",
    "entropy" or "percentile" (each activation's range clipped at its `percentile`-th absolute value).
    `exclude`: see `excluded_nodes`.  `preprocess` runs ORT's
    `quant_pre_process` (shape inference + basic graph optimization) first and falls back to the plain model
    if it fails.  Writes `int8_path` atomically; returns a dict with `bytes`, `ops`, `calibration_samples`,
    `method`, `exclude`, `excluded_nodes`, `preprocessed`, `quantize_s`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
            try:
                quant_pre_process(str(fp32_path), str(pre))
                src, preprocessed = pre, True
            except Exception as exc:
                log.warning("quant_pre_process failed (%s); quantizing the model as exported", exc)
        model = onnx.load(str(src))
        skip = excluded_nodes(model, exclude)
        extra: dict[str, Any] = {}
        if method == "percentile":
            extra["CalibPercentile"] = float(percentile)
        with atomic_path(int8_path) as tmp:
            quantize_static(
                str(src), str(tmp), _calibration_reader(calibration),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=methods[method], nodes_to_exclude=skip or None, extra_options=extra,
            )
            onnx.checker.check_model(str(tmp))
    return {
        "path": str(int8_path),
        "bytes": int8_path.stat().st_size,
        "ops": op_counts(int8_path),
        "calibration_samples": len(calibration),
        "method": method,
        "percentile": float(percentile) if method == "percentile" else None,
        "exclude": exclude,
        "excluded_nodes": len(skip),
        "preprocessed": preprocessed,
        "quantize_s": round(time.perf_counter() - t0, 3),
    }


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
                  onnx_int8: Path, grid_png: Path, report_json: Path, progress: bool = True) -> dict[str, Any]:
    """The mobile_model stage: student checkpoint + face pairs -> fp32 and int8 ONNX, grid, report.

    Calibrates on up to `cfg.calibration_samples` train pairs (sources, spread over the sorted split),
    evaluates on every held-out pair that passed: parity (int8 vs fp32 outputs, float), int8 and fp32
    student vs teacher and the identity (source vs teacher, both uint8), latency of both models at 1 thread
    side by side.  Writes the report, then raises `ParityError` if `parity_psnr_db < cfg.min_parity_db`.
    """
    from tqdm import tqdm

    from fxassets.grid import write_grid
    from fxassets.student import load_student

    checkpoint, pairs_dir, out_dir = Path(checkpoint), Path(pairs_dir), Path(out_dir)
    onnx_fp32, onnx_int8, grid_png, report_json = map(Path, (onnx_fp32, onnx_int8, grid_png, report_json))
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

    say(f"exporting fp32 ONNX at {size}x{size}, opset {cfg.opset}")
    exp = export_onnx(model, onnx_fp32, size=size, opset=cfg.opset)
    idx = _spread(len(train), cfg.calibration_samples)
    calibration = [to_input(read_png_rgb(pairs_dir / train.loc[i, "source"])) for i in idx]
    say(f"quantizing int8 ({cfg.calibration_method}, {len(calibration)} calibration images)")
    q = quantize_int8(onnx_fp32, onnx_int8, calibration, method=cfg.calibration_method)

    s32, s8 = _session(onnx_fp32), _session(onnx_int8)
    grid_ids = set(heldout.drop_duplicates("person_id").head(cfg.grid_samples)["sample_id"])
    rows, per_pair = [], []
    for r in tqdm(heldout.itertuples(index=False), total=len(heldout), desc="held-out pairs",
                  disable=not progress, leave=False):
        src = read_png_rgb(pairs_dir / r.source)
        tgt = read_png_rgb(pairs_dir / r.target)
        if src.shape != (size, size, 3) or tgt.shape != (size, size, 3):
            raise ValueError(f"{pairs_dir}: pair {r.sample_id} is {src.shape}/{tgt.shape}, expected {size}x{size}")
        x = to_input(src)
        y32, y8 = _run(s32, x), _run(s8, x)
        out8 = to_uint8(y8)
        per_pair.append({
            "sample_id": str(r.sample_id), "person_id": str(r.person_id),
            "parity_db": psnr(y8, y32), "int8_db": psnr(out8, tgt),
            "fp32_db": psnr(to_uint8(y32), tgt), "identity_db": psnr(src, tgt),
        })
        if r.sample_id in grid_ids:
            rows.append([src, tgt, out8])
    say(f"grid of {len(rows)} held-out people")
    write_grid(grid_png, rows, GRID_LABELS)

    say(f"latency, 1 thread, {cfg.latency_runs} runs each")
    lat = latency_compare({"fp32": onnx_fp32, "int8": onnx_int8}, threads=1, runs=cfg.latency_runs)

    def mean(key: str) -> float:
        return float(np.mean([p[key] for p in per_pair]))

    report: dict[str, Any] = {
        "parity_psnr_db": mean("parity_db"),
        "parity_min_psnr_db": float(min(p["parity_db"] for p in per_pair)),
        "min_parity_db": cfg.min_parity_db,
        "parity_ok": mean("parity_db") >= cfg.min_parity_db,
        "int8_psnr_db": mean("int8_db"),
        "fp32_psnr_db": mean("fp32_db"),
        "identity_psnr_db": mean("identity_db"),
        "fp32_ms_1t": lat["fp32"],
        "int8_ms_1t": lat["int8"],
        "int8_speedup_1t": lat["fp32"] / lat["int8"],
        "latency_runs": cfg.latency_runs,
        "fp32_bytes": exp["bytes"],
        "int8_bytes": q["bytes"],
        "torch_onnx_max_abs_diff": exp["torch_onnx_max_abs_diff"],
        "heldout_pairs": len(heldout),
        "calibration_samples": len(calibration),
        "calibration_method": cfg.calibration_method,
        "size": size,
        "opset": exp["opset"],
        "simplified": exp["simplified"],
        "quant": {k: q[k] for k in ("percentile", "exclude", "excluded_nodes", "preprocessed", "quantize_s")},
        "ops_fp32": exp["ops"],
        "ops_int8": q["ops"],
        "grid_samples": len(rows),
        "student": {k: meta[k] for k in ("encoder", "width") if k in meta},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        "pairs": per_pair,
    }
    write_json(report_json, report)
    say(f"parity {report['parity_psnr_db']:.1f} dB, int8 {report['int8_psnr_db']:.2f} dB vs teacher "
        f"(identity {report['identity_psnr_db']:.2f} dB), {lat['fp32']:.2f} ms fp32 / {lat['int8']:.2f} ms int8")
    if not report["parity_ok"]:
        raise ParityError(
            f"int8 parity PSNR {report['parity_psnr_db']:.2f} dB (int8 vs fp32, mean over {len(heldout)} held-out "
            f"pairs) is below export.min_parity_db = {cfg.min_parity_db:.2f} dB; report written to {report_json}"
        )
    return report
