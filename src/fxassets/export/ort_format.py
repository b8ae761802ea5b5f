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
    (NCHWc), so the file runs with the CPU execution provider on ARM and x86 alike.  Written atomically, in one
    byte order whatever the process (`canonical_ort`);
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
            tmp.write_bytes(canonical_ort(converted[0].read_bytes()))
    return {"path": str(ort_path), "bytes": ort_path.stat().st_size, "ops": ops,
            "target_platform": target_platform, "convert_s": round(time.perf_counter() - t0, 3)}


def canonical_ort(data: bytes) -> bytes:
    """An `.ort` file (an ONNX Runtime InferenceSession flatbuffer) with its kernel type string resolver written
    again in one fixed order; the same bytes when it cannot be (an unexpected layout).

    onnxruntime writes the resolver (each operator's type constraints, for a minimal build) from a hash map whose
    order changes from process to process (absl's hash is seeded per process): the same model converted twice
    gave other bytes, in the same sorted vectors.  The resolver is the last table written before the root, so it
    sits between the root and the model: the model and what was written before it are copied as they are (at the
    same distance from the buffer's end, which is what flatbuffer offsets and alignment count from), the resolver
    is rebuilt entry by entry in the order the file lists them (sorted by operator), then the root."""
    import flatbuffers
    import onnxruntime.tools.ort_format_model  # noqa: F401  (puts ort_flatbuffers_py on sys.path)
    from ort_flatbuffers_py.fbs import ArgTypeAndIndex as A, InferenceSession as S, KernelTypeStrArgsEntry as K
    from ort_flatbuffers_py.fbs import KernelTypeStrResolver as R, OpIdKernelTypeStrArgsEntry as O

    buf = bytearray(data)
    if not S.InferenceSession.InferenceSessionBufferHasIdentifier(buf, 0):
        return data
    root = S.InferenceSession.GetRootAs(buf, 0)
    tab = root._tab
    field = {slot: tab.Offset(4 + 2 * slot) for slot in range(4)}  # ort_version, model, (deprecated), resolver
    if not (field[0] and field[1] and field[3]) or field[2]:
        return data
    version, model = (tab.Indirect(tab.Pos + field[i]) for i in (0, 1))
    resolver = root.KernelTypeStrResolver()
    start = min(model, model - tab.Get(flatbuffers.number_types.SOffsetTFlags, model))  # its vtable is below it
    if not resolver._tab.Pos < start <= version:
        return data
    b = flatbuffers.Builder(len(buf))
    b.Prep(1, len(buf) - start)  # no padding: it ends the buffer
    b.head -= len(buf) - start
    b.Bytes[b.head:b.head + len(buf) - start] = buf[start:]
    b.minalign = min(32, len(buf) & -len(buf))  # the original buffer's alignment

    def vector(start_vector: Any, items: list[int]) -> int:
        start_vector(b, len(items))
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    def table(module: Any, **fields: Any) -> int:  # fields in the order given; None: left out, as read
        module.Start(b)
        for name, value in fields.items():
            if value is not None:
                getattr(module, f"Add{name}")(b, value)
        return module.End(b)

    ops = []
    for op in (resolver.OpKernelTypeStrArgs(i) for i in range(resolver.OpKernelTypeStrArgsLength())):
        entries = []
        for kts in (op.KernelTypeStrArgs(j) for j in range(op.KernelTypeStrArgsLength())):
            args = [table(A, ArgType=a.ArgType(), Index=a.Index()) for a in map(kts.Args, range(kts.ArgsLength()))]
            av = None if kts.ArgsIsNone() else vector(K.StartArgsVector, args)
            entries.append(table(K, KernelTypeStr=b.CreateString(kts.KernelTypeStr()), Args=av))
        ev = None if op.KernelTypeStrArgsIsNone() else vector(O.StartKernelTypeStrArgsVector, entries)
        ops.append(table(O, OpId=b.CreateString(op.OpId()), KernelTypeStrArgs=ev))
    res = table(R, OpKernelTypeStrArgs=vector(R.StartOpKernelTypeStrArgsVector, ops))
    session = table(S, OrtVersion=len(buf) - version, Model=len(buf) - model, KernelTypeStrResolver=res)
    b.Finish(session, file_identifier=bytes(buf[4:8]))
    return bytes(b.Output())
