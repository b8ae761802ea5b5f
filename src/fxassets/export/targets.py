"""The runtimes phones use beside ONNX Runtime: LiteRT (`.tflite`, litert-torch) and ExecuTorch (`.pte`, the
XNNPACK backend), both int8 from the same student through PyTorch's PT2E quantization, calibrated on the same crops
as the ORT model; Core ML (`.mlpackage`, coremltools) with int8 weights and fp16 activations, the most it can
quantize without running the model, which Linux cannot: it is built but not verified here (status "unverified").

Each builder returns a dict (`file`, `bytes`, `float_ops`: the compute ops the runtime runs in float, per op, and
`quantized_ops`, `export_s`, `versions`) or raises `TargetSkipped` with a one-line reason (a package missing, an
op the converter cannot take).  The same "first convolution in float" rule as the ORT model (`export.keep_float`
"input": every op reading the image, the first conv and the residual add; "output": the head's last conv through
the clamp) is applied by removing PT2E's annotations from those nodes, so the runtime runs them in float and
quantizes their outputs for the next layer.

Parity, the gate and the latencies are the stage's (`fxassets.export.stage`); the sessions that run the files are
`fxassets.export.runners`.  No heavy import at module level: the stage imports this module whether or not the
optional packages (`pip install -e '.[mobile]'`, docs/mobile.md) are installed.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fxassets.core.atomic import atomic_path
from fxassets.core.machine import package_version

# target -> file name in the stage's `targets/` folder
TARGET_FILES = {"litert": "student.int8.tflite", "executorch": "student.int8.pte", "coreml": "student.w8.mlpackage"}
# target -> the packages it needs to build, and the one that runs it (the first importable name of each)
BUILD_NEEDS = {"litert": ("litert_torch", "ai_edge_litert"), "executorch": ("executorch",), "coreml": ("coremltools",)}
INSTALL_HINT = {
    "litert": "litert-torch 0.10.0 (not in any extra: its litert-converter pins xdsl 0.28.0, which wants "
              "typing-extensions < 4.13, and pydantic 2.14 needs >= 4.16; docs/mobile.md has the manual install)",
    "executorch": "executorch (pip install -c constraints.txt -e '.[mobile]')",
    "coreml": "coremltools (pip install -c constraints.txt -e '.[mobile]')",
}


class TargetSkipped(RuntimeError):
    """A target this machine cannot build; the message is the reason, one line."""


def missing_package(target: str) -> str | None:
    """The reason `target` cannot be built here because a package is missing, or None."""
    missing = [m for m in BUILD_NEEDS[target] if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed: {INSTALL_HINT[target]}"
    return None


def _float_nodes(gm, keep_float: Sequence[str]) -> set:
    """The fx nodes kept in float for `keep_float` ("input", "output"), as the ORT model keeps them."""
    nodes: set = set()
    graph = gm.graph
    if "input" in keep_float:  # the ops reading the image, and on from them up to a convolution (its output is
        # quantized for the next layer): the learned colour map's matmul, the residual add, the clamp
        # (fxassets.export.quantize.float_end_nodes, the same walk on the ONNX graph)
        todo = [n for n in graph.nodes if n.op == "placeholder" and not n.name.startswith(("p_", "b_"))]
        while todo:
            for user in todo.pop().users:
                if user.op != "call_function" or user in nodes:
                    continue
                nodes.add(user)
                if "conv" not in str(user.target):
                    todo.append(user)
    if "output" in keep_float:
        out = next(n for n in graph.nodes if n.op == "output")
        todo = list(out.all_input_nodes)
        while todo:  # back from the output through the residual add, clamp and pixel shuffle to the last conv
            n = todo.pop()
            if n.op != "call_function" or n in nodes:
                continue
            nodes.add(n)
            if "conv" not in str(n.target):
                todo += n.all_input_nodes
    return nodes


def _with_float_ends(quantizer_cls, keep_float: Sequence[str], adds=None):
    """A subclass of a PT2E quantizer that leaves the `keep_float` nodes unannotated (float).  `adds`: a function
    of the graph's quantization config giving (input spec, output spec) to annotate every tensor add the quantizer
    left alone (litert-torch's finds adds by their source and misses the encoder's residual sums: 10 of 15 adds
    in float, against none in ExecuTorch's XNNPACK quantizer)."""

    class _Quantizer(quantizer_cls):  # type: ignore[misc, valid-type]
        def annotate(self, gm):
            gm = super().annotate(gm)
            keep = _float_nodes(gm, keep_float)
            for n in keep:
                n.meta.pop("quantization_annotation", None)
            if adds is not None:
                _annotate_adds(gm, keep, *adds(self.global_config))
            return gm

    return _Quantizer


def _annotate_adds(gm, keep: set, in_spec, out_spec) -> None:
    import torch
    from torch.fx import Node
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    for n in gm.graph.nodes:
        if (n.op == "call_function" and n.target == torch.ops.aten.add.Tensor and n not in keep
                and "quantization_annotation" not in n.meta):
            ins = {a: in_spec for a in n.args[:2] if isinstance(a, Node)}
            n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=ins, output_qspec=out_spec,
                                                                       _annotated=True)


def pt2e_quantize(model, quantizer, calibration: Sequence[np.ndarray], fold: bool = True):
    """PT2E static quantization: export for training, insert observers, run the calibration inputs, convert
    (`fold`: the int8 weights folded into constants, as ExecuTorch wants; litert-torch wants them unfolded)."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    x0 = torch.from_numpy(np.ascontiguousarray(calibration[0]))
    gm = prepare_pt2e(torch.export.export(model, (x0,)).module(), quantizer)
    with torch.no_grad():
        for c in calibration:
            gm(torch.from_numpy(np.ascontiguousarray(c)))
    return convert_pt2e(gm, fold_quantize=fold), x0


def pt2e_float_ops(gm) -> tuple[dict[str, int], dict[str, int]]:
    """(float ops, int8 ops) of a converted PT2E graph: a compute op is int8 when every tensor it reads comes from
    a dequantize or from an int8 op (a ReLU after an int8 conv: XNNPACK fuses dequantize -> conv -> relu ->
    quantize into one int8 kernel), else float."""
    skip = ("quantize", "dequantize", "getitem", "sym_size", "_assert", "alloc")
    fl, q, int8 = Counter(), Counter(), set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or any(s in str(n.target) for s in skip):
            continue
        name = str(getattr(n.target, "__name__", n.target)).split(".")[0].rstrip("_")
        ins = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if ins and all("dequantize" in str(a.target) or a in int8 for a in ins):
            int8.add(n)
            q[name] += 1
        else:
            fl[name] += 1
    return dict(sorted(fl.items())), dict(sorted(q.items()))


def tflite_float_ops(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(float ops, int8 ops) of a .tflite model from its interpreter: an op other than QUANTIZE / DEQUANTIZE that
    reads or writes a float32 tensor is float."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in it.get_tensor_details()}
    fl, q = Counter(), Counter()
    for op in it._get_ops_details():  # noqa: SLF001 (the interpreter's only op listing)
        name = op["op_name"]
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        tensors = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        (fl if any(dtypes.get(i) == np.float32 for i in tensors) else q)[name] += 1
    return dict(sorted(fl.items())), dict(sorted(q.items()))


def build_litert(model, calibration: Sequence[np.ndarray], path: Path, keep_float: Sequence[str]) -> dict[str, Any]:
    """int8 LiteRT: litert-torch's PT2E quantizer (per-channel int8 weights, int8 activations), then
    `litert_torch.convert`; float32 NCHW input and output (the model's tensor convention)."""
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    from litert_torch.quantize.pt2e_quantizer_utils import get_input_act_qspec, get_output_act_qspec

    specs = lambda c: (get_input_act_qspec(c), get_output_act_qspec(c))  # noqa: E731
    q = _with_float_ends(PT2EQuantizer, keep_float, specs)().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    gm, x0 = pt2e_quantize(model, q, calibration, fold=False)
    edge = litert_torch.convert(gm, (x0,), quant_config=QuantConfig(pt2e_quantizer=q))
    with atomic_path(path) as tmp:
        edge.export(str(tmp))
    fl, qo = tflite_float_ops(path)
    return {"float_ops": fl, "quantized_ops": qo,
            "versions": {"litert_torch": litert_torch.__version__, "ai_edge_litert": package_version("ai-edge-litert")}}


def build_executorch(model, calibration: Sequence[np.ndarray], path: Path, keep_float: Sequence[str]) -> dict[str, Any]:
    """int8 ExecuTorch: the XNNPACK quantizer (per-channel int8 weights, int8 activations), lowered whole to the
    XNNPACK delegate (`to_edge_transform_and_lower`, `XnnpackPartitioner`)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from executorch.exir import to_edge_transform_and_lower

    q = _with_float_ends(XNNPACKQuantizer, keep_float)().set_global(
        get_symmetric_quantization_config(is_per_channel=True))
    gm, x0 = pt2e_quantize(model, q, calibration)
    fl, qo = pt2e_float_ops(gm)
    edge = to_edge_transform_and_lower(torch.export.export(gm, (x0,)), partitioner=[XnnpackPartitioner()])
    outside = Counter(str(getattr(n.target, "__name__", n.target)) for n in edge.exported_program().graph.nodes
                      if n.op == "call_function" and "delegate" not in str(n.target) and "getitem" not in str(n.target))
    prog = edge.to_executorch()
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(prog.buffer)
    return {"float_ops": fl, "quantized_ops": qo, "outside_xnnpack": dict(sorted(outside.items())),
            "versions": {"executorch": package_version("executorch")}}


def build_coreml(model, calibration: Sequence[np.ndarray], path: Path, keep_float: Sequence[str]) -> dict[str, Any]:
    """Core ML ML program (iOS 17), per-channel int8 weights (`linear_quantize_weights`; weights under 2048
    elements, the first conv's among them, stay fp16), fp16 activations.  Activation quantization needs the model
    run on calibration data, which coremltools can only do on macOS.  The package's manifest ids are made
    deterministic (coremltools draws random UUIDs)."""
    import os

    import coremltools as ct
    import torch
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    x0 = torch.from_numpy(np.ascontiguousarray(calibration[0]))
    ep = torch.export.export(model, (x0,)).run_decompositions({})
    ml = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                    inputs=[ct.TensorType(name="image", shape=tuple(x0.shape))], outputs=[ct.TensorType(name="output")])
    ml = linear_quantize_weights(ml, OptimizationConfig(global_config=OpLinearQuantizerConfig(
        mode="linear_symmetric", granularity="per_channel")))
    ops = Counter(op.op_type for op in ml._mil_program.functions["main"].operations)  # noqa: SLF001
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mlpackage")  # coremltools wants the suffix
    try:
        ml.save(str(tmp))
        _canonical_manifest(tmp / "Manifest.json")
        _remove(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    weights = sum(v for k, v in ops.items() if k.startswith("constexpr_"))
    return {"float_ops": {k: v for k, v in sorted(ops.items()) if not k.startswith(("constexpr_", "const"))},
            "quantized_ops": {"int8 weight tensors": weights}, "activations": "fp16",
            "versions": {"coremltools": ct.__version__}, "runnable": False,
            "reason": "Core ML runs on Apple devices only: parity and latency not measured on this machine"}


def _canonical_manifest(manifest: Path) -> None:
    import json
    import uuid

    doc = json.loads(manifest.read_text())
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "fxassets/" + e["name"])) for old, e in doc["itemInfoEntries"].items()}
    doc["itemInfoEntries"] = {ids[k]: v for k, v in sorted(doc["itemInfoEntries"].items(), key=lambda kv: ids[kv[0]])}
    doc["rootModelIdentifier"] = ids.get(doc["rootModelIdentifier"], doc["rootModelIdentifier"])
    manifest.write_text(json.dumps(doc, indent=4, sort_keys=True))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


BUILDERS = {"litert": build_litert, "executorch": build_executorch, "coreml": build_coreml}


def build_target(target: str, model, calibration: Sequence[np.ndarray], out_dir: Path,
                 keep_float: Sequence[str]) -> dict[str, Any]:
    """Build `target` into `out_dir / TARGET_FILES[target]`; raises TargetSkipped (the reason) when it cannot be
    built here.  The model is the student's export form (`inference_form`), float, eval mode."""
    reason = missing_package(target)
    if reason:
        raise TargetSkipped(reason)
    path = Path(out_dir) / TARGET_FILES[target]
    t0 = time.perf_counter()
    try:
        info = BUILDERS[target](model, calibration, path, keep_float)
    except Exception as exc:  # an op the converter or the partitioner cannot take: the target, not the stage, fails
        _remove(path)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TargetSkipped(f"{target} export failed: {type(exc).__name__}: {first[:300]}") from exc
    return {"file": path.name, "bytes": _size(path), **info, "export_s": round(time.perf_counter() - t0, 3)}


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def export_targets(names: Sequence[str], model, calibration: Sequence[np.ndarray], out_dir: Path,
                   keep_float: Sequence[str], inputs: Sequence[np.ndarray], ref: Sequence[np.ndarray],
                   targets: Sequence[np.ndarray], min_parity_db: float, say=lambda msg: None) -> dict[str, dict]:
    """Every target of `names` but "ort" built into `out_dir` and checked on the held-out `inputs`: parity
    against the fp32 outputs `ref` (mean and worst PSNR), PSNR against the teacher's `targets` (uint8).  Returns
    target -> its entry: `status` "ok", "failed" (below `min_parity_db`: reported and kept, the stage goes on),
    "unverified" (built, cannot run here: Core ML on Linux) or "skipped" (`reason`), and for a built one `file`, `bytes`, `parity_psnr_db`, `parity_min_psnr_db`,
    `int8_psnr_db`, `float_ops`, `quantized_ops`, `versions`.  `out_dir/targets.json` lists them (the folder
    always has a file, for DVC)."""
    from fxassets.core.atomic import write_json
    from fxassets.core.metrics import psnr
    from fxassets.export.session import model_session, run_model, to_uint8

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in TARGET_FILES.values():  # an earlier run's file never passes for this one's (a target now skipped)
        _remove(out_dir / f)
    entries: dict[str, dict] = {}
    for name in names:
        if name == "ort":
            continue
        say(f"target {name}: int8 export")
        try:
            info = build_target(name, model, calibration, out_dir, keep_float)
        except TargetSkipped as exc:
            say(f"target {name}: skipped: {exc}")
            entries[name] = {"status": "skipped", "reason": str(exc)}
            continue
        if not info.pop("runnable", True):  # built, cannot run here (Core ML on Linux)
            entries[name] = {"status": "unverified", **{k: v for k, v in info.items() if k != "export_s"},
                             "_export_s": info["export_s"]}
            say(f"target {name}: built, not verified here ({info['bytes']} bytes)")
            continue
        sess = model_session(out_dir / info["file"], 1)
        outs = [run_model(sess, x) for x in inputs]
        par = [psnr(y, r) for y, r in zip(outs, ref)]
        entry = {"status": "ok", **{k: v for k, v in info.items() if k != "export_s"},
                 "parity_psnr_db": float(np.mean(par)), "parity_min_psnr_db": float(min(par)),
                 "int8_psnr_db": float(np.mean([psnr(to_uint8(y), t) for y, t in zip(outs, targets)])),
                 "_export_s": info["export_s"]}
        if entry["parity_psnr_db"] < min_parity_db:
            entry["status"] = "failed"
            entry["reason"] = (f"parity {entry['parity_psnr_db']:.2f} dB (against fp32 on {len(inputs)} held-out "
                               f"pairs) is below export.min_parity_db = {min_parity_db:.2f} dB; the file is kept")
        say(f"target {name}: {entry['status']}, parity {entry['parity_psnr_db']:.2f} dB, {entry['bytes']} bytes")
        entries[name] = entry
    write_json(out_dir / "targets.json", {k: {f: v[f] for f in ("status", "reason", "file", "bytes") if f in v}
                                          for k, v in entries.items()})
    return entries
