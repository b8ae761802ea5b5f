"""fp32 ONNX export of the student: torch.onnx (torch.export-based for opset >= 18, TorchScript for 17), a fixed
1x3xSxS input "image" -> "output", simplified with onnxslim, checked with onnx.checker, compared with torch."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from fxassets.core.atomic import atomic_path
from fxassets.export.session import INPUT_NAME, OUTPUT_NAME, onnx_session, run_model
from fxassets.train.student import inference_form
import time

log = logging.getLogger(__name__)


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Node count per op type of an ONNX model (top-level graph)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))



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
    out = run_model(onnx_session(path), x.numpy())
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
