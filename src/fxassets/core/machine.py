"""The machine a figure was measured on: CPU model, the ISA extensions that decide int8 and bf16 speed, cores, and
the runtime versions.  Every latency or training figure is written beside it (CPUs differ between machines of the
same name: an AMD EPYC without VNNI and an Intel Xeon with AVX-512 VNNI and AMX time the same int8 model apart)."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import metadata
from typing import Any

# the flags (as /proc/cpuinfo names them) that change how fast int8 / bf16 kernels run
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def package_version(pkg: str) -> str | None:
    """The installed version of distribution `pkg`, or None."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """{"model", "isa": [the ISA_FLAGS it has], "cores", "onnxruntime", "torch"} of this machine."""
    found: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):  # the first processor's lines
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags"):
                found.setdefault(key.strip(), value.strip())
            if len(found) == 2:
                break
    except OSError:
        pass
    model = found.get("model name") or platform.processor() or platform.machine()
    flags = set(found.get("flags", "").split())
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "onnxruntime": package_version("onnxruntime"), "torch": package_version("torch")}


def cpu_label(info: dict[str, Any] | None = None) -> str:
    """One line for logs and tables: the model and its int8-relevant extensions (of `info`, a `cpu_info()` dict
    recorded elsewhere, or of this machine)."""
    info = info or cpu_info()
    return f"{info['model']} ({', '.join(info.get('isa') or []) or 'no AVX2'}; {info.get('cores')} cores)"
