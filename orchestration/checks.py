"""Asset checks, beside the assets they guard. They run inside the asset's step, right after DVC has written the
outputs, and read the files the stage wrote.

* face_pairs: blocking pair checks. When one fails, the run stops before `student_checkpoint` (the materialization
  itself is recorded, so the UI shows what was wrong). `quality_gate` reports the great-expectations suite the
  stage itself runs (`fxassets.pairs.gate` writes gate.json; training refuses a failed gate under DVC too). More checks:
  add a row to the registry in `checks_for`.
* mobile_model: the int8 model must stay close to fp32 (`parity_psnr_db >= export.min_parity_db`).

Note: the pair-count checks and int8_parity gate in Dagster only; a plain `dvc repro` does not stop on them.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    MetadataValue,
    PartitionsDefinition,
    TableColumn,
    TableRecord,
    TableSchema,
)

from orchestration.project import lookup


@dataclass
class CheckInput:
    root: Path
    effect: str
    summary: dict[str, Any]  # what summaries.py read from the stage's outputs
    params: dict[str, Any]  # params.yaml as read now
    gates: Any  # resources.QualityGates
    extra: dict[str, Any] = field(default_factory=dict)


CheckFn = Callable[[CheckInput], "AssetCheckResult | None"]  # None: no result this time


def _result(name: str, passed: bool, severity: AssetCheckSeverity = AssetCheckSeverity.ERROR, **metadata: Any) -> AssetCheckResult:
    return AssetCheckResult(check_name=name, passed=bool(passed), severity=severity, metadata={k: v for k, v in metadata.items() if v is not None})


# ---- face_pairs ------------------------------------------------------------------------------------------------
def enough_kept_pairs(c: CheckInput) -> AssetCheckResult:
    kept = int(c.summary.get("kept", 0))
    return _result("enough_kept_pairs", kept >= c.gates.min_kept_pairs, kept=kept, min_kept_pairs=c.gates.min_kept_pairs)


def train_and_heldout_pairs(c: CheckInput) -> AssetCheckResult:
    tr, ho = int(c.summary.get("train_pairs", 0)), int(c.summary.get("heldout_pairs", 0))
    return _result("train_and_heldout_pairs", tr >= 1 and ho >= 1, train_pairs=tr, heldout_pairs=ho)


def rejected_share(c: CheckInput) -> AssetCheckResult:
    pairs, rejected = int(c.summary.get("pairs", 0)), int(c.summary.get("rejected", 0))
    share = rejected / pairs if pairs else 1.0
    return _result("rejected_share", share <= c.gates.max_rejected_share, rejected=rejected, pairs=pairs,
                   rejected_share=round(share, 4), max_rejected_share=c.gates.max_rejected_share)


def quality_gate(c: CheckInput) -> AssetCheckResult | None:
    """The great-expectations pair quality gate the face_pairs stage runs (`fxassets.pairs.gate`, gate.json); no result
    when the stage wrote none (a missing result does not block)."""
    path = c.root / "data" / "face_pairs" / c.effect / "gate.json"
    if not path.is_file():
        return None
    gate = json.loads(path.read_text())
    rows = [TableRecord({"check": str(r.get("check", "")), "passed": bool(r.get("passed")), "observed": _num(r.get("observed")),
                         "threshold": _num(r.get("threshold")), "rule": str(r.get("rule", ""))})
            for r in gate.get("set_checks") or []]
    schema = TableSchema(columns=[TableColumn("check", "string"), TableColumn("passed", "bool"), TableColumn("observed", "float"),
                                  TableColumn("threshold", "float"), TableColumn("rule", "string")])
    docs = path.parent / gate.get("docs", "gx_docs/index.html")
    return _result("quality_gate", bool(gate.get("passed")),
                   set_checks=MetadataValue.table(records=rows, schema=schema),
                   rejected_by_check=MetadataValue.json(gate.get("rejected_by_check") or {}),
                   summary=MetadataValue.md(f"```\n{gate.get('summary', '')}\n```") if gate.get("summary") else None,
                   data_docs=MetadataValue.path(str(docs.resolve())) if docs.exists() else None)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ---- mobile_model ----------------------------------------------------------------------------------------------
def int8_parity(c: CheckInput) -> AssetCheckResult:
    parity = c.summary.get("parity_psnr_db")
    # the bound the stage applied (export.min_parity_db with the effect's own override), else the global one
    bound = float(c.summary.get("min_parity_db") or lookup(c.params, "export.min_parity_db") or 0.0)
    return _result("int8_parity", parity is not None and float(parity) >= bound,
                   parity_psnr_db=None if parity is None else float(parity), min_parity_db=bound)


def int8_smaller(c: CheckInput) -> AssetCheckResult:
    fp32, int8 = c.summary.get("fp32_bytes"), c.summary.get("int8_bytes")
    ok = fp32 is not None and int8 is not None and int8 < fp32
    return _result("int8_smaller", ok, AssetCheckSeverity.WARN, fp32_bytes=fp32, int8_bytes=int8)


def _spec(name: str, asset: str, description: str, blocking: bool, partitions_def: PartitionsDefinition) -> AssetCheckSpec:
    return AssetCheckSpec(name=name, asset=asset, description=description, blocking=blocking, partitions_def=partitions_def)


def checks_for(stage: str, partitions_def: PartitionsDefinition) -> list[tuple[AssetCheckSpec, CheckFn]]:
    """(spec, function) pairs for one stage's asset; an asset yields every result in its own step."""
    registry: dict[str, list[tuple[str, str, bool, CheckFn]]] = {
        "face_pairs": [
            ("enough_kept_pairs", "at least QualityGates.min_kept_pairs pairs passed detection and alignment", True, enough_kept_pairs),
            ("train_and_heldout_pairs", "at least one training pair and one held-out pair (split by person)", True, train_and_heldout_pairs),
            ("rejected_share", "the share of rejected samples is at most QualityGates.max_rejected_share", True, rejected_share),
            ("quality_gate", "the great-expectations pair quality gate of the stage (gate.json; bounds: params `quality`)", True, quality_gate),
        ],
        "mobile_model": [
            ("int8_parity", "int8 output PSNR against fp32 on held-out faces >= export.min_parity_db", True, int8_parity),
            ("int8_smaller", "the int8 model is smaller than the fp32 one", False, int8_smaller),
        ],
    }
    return [(_spec(n, stage, d, b, partitions_def), fn) for n, d, b, fn in registry.get(stage, [])]
