"""The project as Dagster sees it, read from the same files DVC reads (no Dagster imports here).

One truth: `dvc.yaml` says what each stage reads (params, deps) and writes (outs); this module turns that into
the asset graph's edges, the assets' code versions and the observable sources' data versions, so that Dagster
and `dvc status` call the same things stale.

Where the params a stage lists go (a source asset exists only when some stage reads it):

* `faces.source` (and the `${faces.source}` folder dep)  -> observable source asset `source_faces`
* `teacher`, `effects.<effect>.teacher`                -> observable source asset `teacher_config` (per effect)
* `quality`, `effects.<effect>.quality`                -> observable source asset `quality_config` (per effect)
* `export`, `effects.<effect>.export`                  -> observable source asset `export_config` (per effect)
* `train`, `effects.<effect>.train`                    -> observable source asset `train_config` (per effect)
* the other `effects.<effect>.*` params                -> observable source asset `effect_config` (per effect)
* every other param (`faces.crop_size`, `faces.margin`, ...) and the stage's code deps (`src/...`)
  -> the asset's `code_version` (fixed when the definitions load: reload them after editing those)

Sections with per-effect overrides are sources, read from params.yaml whenever they are observed; a per-effect
param that none of them claims is an error at load.

The project root is `$FXASSETS_ROOT` when set, else the folder that holds this package (where `dvc.yaml` is).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fxassets.core.config import fingerprint, load_params
from fxassets.core.hashing import file_digest
from fxassets.core.paths import STAGES, stage_code_deps

ROOT_ENV = "FXASSETS_ROOT"
STAGE_ORDER = STAGES  # fxassets.core.paths: one stage list
EFFECT_KEY = "${key}"
SOURCE_FACES, TEACHER_CONFIG, QUALITY_CONFIG, EFFECT_CONFIG = "source_faces", "teacher_config", "quality_config", "effect_config"
EXPORT_CONFIG, TRAIN_CONFIG = "export_config", "train_config"
# per-effect param sources and the param names they claim (this prefix or below); the first match wins
PARAM_SOURCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (TEACHER_CONFIG, ("teacher", f"effects.{EFFECT_KEY}.teacher")),
    (QUALITY_CONFIG, ("quality", f"effects.{EFFECT_KEY}.quality")),
    (EXPORT_CONFIG, ("export", f"effects.{EFFECT_KEY}.export")),
    (TRAIN_CONFIG, ("train", f"effects.{EFFECT_KEY}.train")),
    (EFFECT_CONFIG, (f"effects.{EFFECT_KEY}",)),
)
SOURCES = (SOURCE_FACES, *(name for name, _ in PARAM_SOURCES))
PER_EFFECT_SOURCES = tuple(name for name, _ in PARAM_SOURCES)
SOURCE_DESCRIPTIONS = {
    SOURCE_FACES: "the source face photos (faces.source): a hash of the folder's content",
    TEACHER_CONFIG: "per effect: params `teacher` + `effects.<effect>.teacher` (a teacher swap changes every effect)",
    QUALITY_CONFIG: "per effect: params `quality` + `effects.<effect>.quality` (the pair quality gate's bounds)",
    EXPORT_CONFIG: "per effect: params `export` + `effects.<effect>.export` (quantization and the int8 parity bound)",
    TRAIN_CONFIG: "per effect: params `train` + `effects.<effect>.train` (the student and its training recipe)",
    EFFECT_CONFIG: "per effect: the effect's own params (prompt, negative prompt, samples, seed)",
}
_IGNORED_CODE_FILES = re.compile(r"(^|/)(__pycache__|\.ipynb_checkpoints)(/|$)|\.py[co]$")
_INTERP = re.compile(r"\$\{([^}]+)\}")


def project_root() -> Path:
    env = os.environ.get(ROOT_ENV)
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1]


def lookup(raw: dict[str, Any], dotted: str) -> Any:
    """`a.b.c` in a nested dict (DVC's param names); a missing key reads as None, as it does for DVC."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _as_list(items: Iterable[Any] | None) -> list[str]:
    """dvc.yaml lists hold strings or one-key mappings (`path: {options}`); return the names."""
    out: list[str] = []
    for item in items or []:
        if isinstance(item, dict):
            for k, v in item.items():
                # `params:` may name another file: `- other.yaml: [a, b]`; only params.yaml exists here
                out.extend(v if isinstance(v, list) and k.endswith((".yaml", ".yml", ".json", ".toml")) else [k])
        else:
            out.append(str(item))
    return out


@dataclass(frozen=True)
class StageSpec:
    """One `foreach` stage of dvc.yaml, with `${key}` still in it (format with `.for_effect`)."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]  # outs + metrics + plots: every path dvc.lock records under `outs`
    upstream: tuple[str, ...] = ()  # stages whose outs this stage depends on
    sources: tuple[str, ...] = ()  # observable sources this stage reads
    code_deps: tuple[str, ...] = ()  # deps hashed into the code version
    code_params: tuple[str, ...] = ()  # params hashed into the code version (no per-effect ones)

    def dvc_name(self, effect: str) -> str:
        return f"{self.name}@{effect}"

    def outs_for(self, effect: str) -> list[str]:
        return [o.replace(EFFECT_KEY, effect) for o in self.outs]


@dataclass
class Project:
    root: Path
    raw_params: dict[str, Any]
    effects: tuple[str, ...]
    stages: dict[str, StageSpec]
    source_params: dict[str, tuple[str, ...]] = field(default_factory=dict)  # source -> param names (${key} form)

    # ---- loading ---------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path | None = None) -> Project:
        root = Path(root).resolve() if root else project_root()
        params = load_params(root / "params.yaml")  # validates: a bad params.yaml fails the code location, named
        raw = yaml.safe_load((root / "params.yaml").read_text())
        dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
        proj = cls(root=root, raw_params=raw, effects=tuple(params.effects), stages={})
        proj._read_stages(dvc_yaml.get("stages") or {})
        return proj

    def _interp(self, text: str) -> str:
        """Resolve `${...}` the way dvc.yaml does, leaving `${key}` for the effect."""

        def sub(m: re.Match[str]) -> str:
            name = m.group(1).strip()
            if name == "key":
                return m.group(0)
            value = lookup(self.raw_params, name)
            if value is None:
                raise ValueError(f"dvc.yaml: ${{{name}}} is not in params.yaml")
            return str(value)

        return _INTERP.sub(sub, text)

    def _read_stages(self, stages: dict[str, Any]) -> None:
        faces_source = str(lookup(self.raw_params, "faces.source")).rstrip("/")
        specs: dict[str, StageSpec] = {}
        for name in STAGE_ORDER:
            if name not in stages:
                raise ValueError(f"dvc.yaml has no stage {name!r}; Dagster's graph needs: {', '.join(STAGE_ORDER)}")
            body = stages[name]
            if "foreach" not in body or "do" not in body:
                raise ValueError(f"dvc.yaml: stage {name!r} must be `foreach: ${{effects}}` with a `do:` body")
            do = body["do"]
            outs = [self._interp(o) for o in _as_list(do.get("outs")) + _as_list(do.get("metrics")) + _as_list(do.get("plots"))]
            specs[name] = StageSpec(
                name=name, cmd=self._interp(str(do.get("cmd", ""))),
                deps=tuple(self._interp(d).rstrip("/") for d in _as_list(do.get("deps"))),
                params=tuple(self._interp(p) for p in _as_list(do.get("params"))), outs=tuple(outs),
            )
        # classify each stage's deps and params
        by_out = {o.rstrip("/"): s.name for s in specs.values() for o in s.outs}
        source_params: dict[str, set[str]] = {s: set() for s in SOURCES}
        for name, spec in specs.items():
            upstream, sources, code_deps, code_params = [], set(), [], []
            for dep in spec.deps:
                owner = next((st for out, st in by_out.items() if dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")), None)
                if owner and owner != name:
                    upstream.append(owner)
                elif dep == faces_source:
                    sources.add(SOURCE_FACES)
                else:
                    code_deps.append(dep)
            for p in spec.params:
                src = self.source_of_param(p)
                if src:
                    sources.add(src)
                    source_params[src].add(p)
                elif EFFECT_KEY in p:
                    raise ValueError(f"dvc.yaml: stage {name!r} reads per-effect param {p!r} that no source asset carries")
                else:
                    code_params.append(p)
            specs[name] = StageSpec(
                **{**spec.__dict__, "upstream": tuple(dict.fromkeys(upstream)),
                   "sources": tuple(s for s in SOURCES if s in sources),
                   "code_deps": tuple(code_deps), "code_params": tuple(code_params)},
            )
        self.stages = specs
        self.source_params = {k: tuple(sorted(v)) for k, v in source_params.items()}

    @staticmethod
    def source_of_param(p: str) -> str | None:
        if p == "faces.source":
            return SOURCE_FACES
        for name, prefixes in PARAM_SOURCES:
            if any(p == pre or p.startswith(pre + ".") for pre in prefixes):
                return name
        return None

    @property
    def sources(self) -> tuple[str, ...]:
        """The source assets some stage reads, in SOURCES order."""
        used = {s for spec in self.stages.values() for s in spec.sources}
        return tuple(s for s in SOURCES if s in used)

    # ---- versions --------------------------------------------------------------------------------------------
    def code_version(self, stage: str) -> str:
        """Fingerprint of the non-per-effect params the stage reads and of its code's bytes: the library's declaration
        (`fxassets.core.paths.STAGE_CODE`, which dvc.yaml's `src/` deps repeat) and any other code dep dvc.yaml names."""
        spec = self.stages[stage]
        params = {p: lookup(self.raw_params, p) for p in spec.code_params}
        declared = stage_code_deps(stage)
        deps = declared + [d for d in spec.code_deps if not d.startswith("src/fxassets/") and d not in declared]
        code = {d: hash_path(self.root / d) for d in deps}
        return fingerprint({"params": params, "code": code})

    def source_version(self, source: str, effect: str | None = None) -> str:
        """The data version of an observable source (per effect for the per-effect ones)."""
        if source == SOURCE_FACES:
            src = str(lookup(self.raw_params, "faces.source"))
            return fingerprint({"faces.source": src, "content": hash_path(self.root / src)})
        names = self.source_params.get(source, ())
        if effect is None:
            raise ValueError(f"{source} is per effect: give an effect")
        return fingerprint({n.replace(EFFECT_KEY, "<effect>"): lookup(self.raw_params, n.replace(EFFECT_KEY, effect)) for n in names})

    def source_values(self, source: str, effect: str) -> dict[str, Any]:
        """The params behind a per-effect source (for metadata)."""
        return {n.replace(EFFECT_KEY, effect): lookup(self.raw_params, n.replace(EFFECT_KEY, effect)) for n in self.source_params.get(source, ())}


def hash_path(path: Path) -> str:
    """md5 of a file, or of a folder's (relative path, md5) list; `missing` if it does not exist."""
    if path.is_file():
        return file_digest(path, "md5")
    if not path.is_dir():
        return "missing"
    h = hashlib.md5()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if _IGNORED_CODE_FILES.search(rel):
            continue
        h.update(f"{rel}\0{file_digest(f, 'md5')}\n".encode())
    return h.hexdigest() + ".dir"
