"""Float fallback: when int8 parity misses the gate, onnxruntime's qdq_loss_debug ranks the int8 activations by how
much their rounding hurts the layers that read them; the worst few are tried in float, the one that helps most is
kept, for a bounded number of rounds (`quantize_with_fallback`)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fxassets.core.metrics import MAX_PSNR, psnr
from fxassets.export.quantize import DEFAULT_PERCENTILE, _graph_index, _calibration_reader, preprocess_for_quant, quantize_int8
from fxassets.export.session import onnx_session, run_model, to_input
import time

log = logging.getLogger(__name__)


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


def _spread(n_total: int, n: int) -> list[int]:
    """`n` indices spread evenly over range(n_total) (all of them if n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, n).round()})


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
        s32 = onnx_session(src)
        judge = [inputs[i] for i in _spread(len(inputs), judge_images)]
        ref = [run_model(s32, x) for x in judge]

        def calib_parity(path: Path) -> float:
            s = onnx_session(path)
            return float(np.mean([psnr(run_model(s, x), r) for x, r in zip(judge, ref)]))

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
