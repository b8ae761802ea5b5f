"""The int8 model in ONNX Runtime's mobile format (`.ort`), with onnxruntime's own converter."""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Any

from fxassets.core.atomic import atomic_path
import logging


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
