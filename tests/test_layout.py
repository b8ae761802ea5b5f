"""The layout's promises: each stage's code is declared once (fxassets.core.paths.STAGE_CODE), dvc.yaml repeats the
declaration, the declaration covers what each stage function really imports, and what was written twice is once."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import yaml

from fxassets.core.paths import STAGE_CODE, STAGES, stage_code_deps, stage_code_files

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "fxassets"


# ---- the import closure of a stage function ----------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    p = PKG.joinpath(*name.split(".")[1:])
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _imports(node: ast.AST) -> list[str]:
    """fxassets modules an AST imports anywhere (module level and inside functions: lazy imports count)."""
    out: list[str] = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out += [n.module, *(f"{n.module}.{a.name}" for a in n.names)]  # `from pkg import module` too
    return [m for m in out if m == "fxassets" or m.startswith("fxassets.")]


def import_closure(stage: str) -> set[Path]:
    """Every fxassets file the stage function can run: stages.py's module-level imports and the function's own
    (lazy) imports, then recursively every import of every module reached, with the packages that hold them."""
    tree = ast.parse((PKG / "stages.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"stage_{stage}")
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    todo = [m for n in top for m in _imports(n)] + _imports(fn)
    seen = {PKG / "stages.py"}
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            f = _module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo += _imports(ast.parse(f.read_text()))
    return seen


def _no_code(path: Path) -> bool:
    """A file with nothing a stage could depend on: no imports, functions or classes (a docstring, a version)."""
    return not any(isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
                   for n in ast.parse(path.read_text()).body)


def uncovered(stage: str, declaration: dict[str, tuple[str, ...]] = STAGE_CODE) -> list[str]:
    entries = [PKG / e for e in declaration[stage]]
    return sorted(
        f.relative_to(PKG).as_posix() for f in import_closure(stage)
        if not any(f == e or e in f.parents for e in entries) and not _no_code(f)
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stage_import_closure_is_declared(stage):
    missing = uncovered(stage)
    assert not missing, f"{stage}: its import closure reaches {missing}, which STAGE_CODE[{stage!r}] does not cover"


@pytest.mark.parametrize("stage", STAGES)
def test_closure_check_fails_without_an_entry(stage):
    """The check is not vacuous: dropping any folder/module a stage's closure reaches makes it fail."""
    for entry in STAGE_CODE[stage]:
        fewer = {**STAGE_CODE, stage: tuple(e for e in STAGE_CODE[stage] if e != entry)}
        assert uncovered(stage, fewer), f"{stage}: declaring {entry!r} is not needed by its closure"


def test_stage_code_entries_exist():
    assert tuple(STAGE_CODE) == STAGES
    for stage, entries in STAGE_CODE.items():
        for e in entries:
            assert (PKG / e).exists(), f"STAGE_CODE[{stage!r}]: src/fxassets/{e} does not exist"
        assert stage_code_files(stage) and all(f.suffix == ".py" for f in stage_code_files(stage))


def test_dvc_yaml_code_deps_are_the_declaration():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == STAGES
    for stage in STAGES:
        deps = [d for d in stages[stage]["do"]["deps"] if isinstance(d, str) and d.startswith("src/")]
        assert deps == stage_code_deps(stage), f"dvc.yaml {stage}: src deps {deps} != STAGE_CODE {stage_code_deps(stage)}"


def test_dagster_code_version_and_resume_key_use_the_declaration(tmp_path):
    from orchestration.project import STAGE_ORDER, Project
    from fxassets.train import state

    assert STAGE_ORDER == STAGES
    project = Project.load(ROOT)
    for stage in STAGES:
        assert [d for d in project.stages[stage].code_deps if d.startswith("src/")] == stage_code_deps(stage)
    assert state.CODE_STAGE == "student_checkpoint"


def test_library_imports_neither_dagster_nor_dvc():
    for f in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            assert not any(m.split(".")[0] in ("dagster", "dvc") for m in names), f"{f}: imports {names}"


def test_no_module_over_about_400_lines():
    long = {f.relative_to(PKG).as_posix(): n for f in PKG.rglob("*.py") if (n := len(f.read_text().splitlines())) > 420}  # "about 400"
    assert not long, long


# ---- written once ------------------------------------------------------------------------------------------------
def test_generated_sources_and_gate_share_the_skin_tone_groups():
    from fxassets.cli import generate_sources
    from fxassets.pairs import gate, quality, skin_tones

    assert generate_sources.SKIN_GROUPS is skin_tones.SKIN_GROUPS is gate.SKIN_GROUPS
    assert skin_tones.SKIN_GROUPS == {"light": (1, 2, 3, 4), "medium": (5, 6), "dark": (7, 8, 9, 10)}
    assert [quality.skin_group(t) for t in range(1, 11)] == ["light"] * 4 + ["medium"] * 2 + ["dark"] * 4
    records = generate_sources.balanced_prompts(generate_sources.SourcesConfig(n=24))
    assert records
    for rec in records:  # each generated portrait is prompted in the group the gate will measure it in
        attrs = rec["attributes"]
        assert quality.skin_group(int(attrs["skin_tone"].removeprefix("MST-"))) == attrs["skin_group"]


def test_numpy_and_torch_psnr_agree():
    """One convention for both PSNRs (core.metrics): per image, peak 1.0, identical images 100 dB."""
    import torch

    from fxassets.core.metrics import MAX_PSNR, psnr, psnr_per_image

    rng = np.random.default_rng(0)
    a = rng.random((3, 3, 16, 16)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    torch_db = psnr_per_image(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose([psnr(x, y) for x, y in zip(a, b)], torch_db, atol=1e-3)
    assert psnr(a[0], a[0]) == MAX_PSNR == float(psnr_per_image(torch.from_numpy(a[:1]), torch.from_numpy(a[:1]))[0])


def test_one_manifest_reader_and_one_session(tmp_path):
    from fxassets.core import manifest
    from fxassets.export import session
    from fxassets import runtime

    assert runtime.onnx_session is session.onnx_session
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        manifest.read_pairs(tmp_path)
    with pytest.raises(FileNotFoundError, match="model not found"):
        session.onnx_session(tmp_path / "none.onnx")
