"""The five pipeline assets, one per `dvc.yaml` stage, partitioned by effect.

Each materialization runs `dvc --wait-for-lock repro --single-item STAGE@EFFECT` (so DVC's run-cache, dvc.lock and
cache apply: after one materializes, `dvc status` is clean and `dvc push` shares the outputs), in the project or, in
workspace mode (`resources.MODE`), in a fresh clone at the run's commit that pulls and pushes through the remote,
and returns
* data_version = DVC's md5 of the stage's outs in dvc.lock,
* code_version = a fingerprint of the params the stage reads (those no source asset carries) and its code deps,
* metadata read from the stage's output files (`summaries.py`), and its checks' results (`checks.py`).
"""

import math
import warnings
from typing import Any

import yaml
from dagster import (
    AssetExecutionContext,
    AssetKey,
    Backoff,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    PartitionsDefinition,
    StaticPartitionsDefinition,
    PreviewWarning,
    RetryPolicy,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from orchestration import dvc_runner, summaries
from orchestration.checks import CheckInput, checks_for
from orchestration.project import Project, StageSpec
from orchestration.resources import WORKSPACE, DvcProject, QualityGates
from orchestration.sources import build_sources, observe_if_changed

GROUP = "pipeline"

# The teacher may be a remote or GPU model: retry it (DVC's run-cache makes a retry after a recorded success cheap).
RETRY_POLICIES = {"teacher_images": RetryPolicy(max_retries=2, delay=5, backoff=Backoff.EXPONENTIAL)}

DESCRIPTIONS = {
    "prompts": "per effect: the edit prompt, negative prompt and a seed per source face",
    "teacher_images": "per sample: the teacher's edit of the source face, with a record (prompt, seed, teacher fingerprint)",
    "face_pairs": "aligned source/target crops and a manifest with a pass/reject reason per sample",
    "student_checkpoint": "the distilled student's weights, training curve and held-out metrics",
    "mobile_model": "fp32 + int8 ONNX models, parity and latency report, before/teacher/student grid",
}


def shown(v: Any, digits: int = 4) -> Any:
    """A float as the metadata shows it: `digits` significant digits (8.368 ms, 49.28 dB: no measurement here holds
    15), inside JSON values too. The checks read the unrounded values."""
    if isinstance(v, float):
        return float(f"{v:.{digits}g}") if math.isfinite(v) else v
    if isinstance(v, dict):
        return {k: shown(x, digits) for k, x in v.items()}
    return [shown(x, digits) for x in v] if isinstance(v, (list, tuple)) else v


def to_metadata(values: dict[str, Any]) -> dict[str, Any]:
    """Dagster metadata values; floats rounded (`shown`), the unit in the key (`_ms`, `_db`, `_seconds`, `_bytes`)."""
    out: dict[str, Any] = {}
    for k, v in shown(values).items():
        if isinstance(v, summaries.Markdown):
            out[k] = MetadataValue.md(v.text)
        elif isinstance(v, summaries.Table):
            schema = TableSchema(columns=[TableColumn(n, t) for n, t in v.columns])
            out[k] = MetadataValue.table(records=[TableRecord(r) for r in v.rows], schema=schema)
        elif isinstance(v, bool) or v is None:
            out[k] = MetadataValue.text(str(v))
        elif isinstance(v, int):
            out[k] = MetadataValue.int(v)
        elif isinstance(v, float):
            out[k] = MetadataValue.float(v)
        elif isinstance(v, (dict, list)):
            out[k] = MetadataValue.json(v)
        else:
            out[k] = MetadataValue.text(str(v))
    return out


def stage_metadata(spec: StageSpec, values: dict[str, Any], effect: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Everything an asset records besides its versions (shared with the DVC sync)."""
    return to_metadata({**values, "dvc_stage": spec.dvc_name(effect), "dvc_outs": dvc_runner.outs_md5(entry)})


def evaluate_checks(check_fns: dict[str, Any], root, effect: str, values: dict[str, Any], gates: Any) -> list:
    if not check_fns:
        return []
    params = yaml.safe_load((root / "params.yaml").read_text())
    c_in = CheckInput(root=root, effect=effect, summary=values, params=params, gates=gates)
    return [r for r in (fn(c_in) for fn in check_fns.values()) if r is not None]


def _observe_own_sources(context: AssetExecutionContext, root, spec: StageSpec, effect: str) -> None:
    """Observe the sources this stage reads (params.yaml, faces) as they are now, so the materialization's
    provenance names them; without it a first observation later would turn the asset stale."""
    if not spec.sources:
        return
    project = Project.load(root)
    changed = [s for s in spec.sources if observe_if_changed(context.instance, project, s, effect, by=context.run_id)]
    if changed:
        context.log.info(f"observed {', '.join(changed)} (new versions)")
    # Dagster read its inputs' versions at step start, maybe before this (or a concurrent run's) observation
    step = context.get_step_execution_context()
    for s in spec.sources:
        step.wipe_input_asset_version_info(AssetKey(s))


def build_stage_asset(project: Project, spec: StageSpec, partitions_def: PartitionsDefinition):
    check_pairs = checks_for(spec.name, partitions_def)
    check_fns = {s.name: fn for s, fn in check_pairs}
    deps = [AssetKey(u) for u in spec.upstream] + [AssetKey(s) for s in spec.sources]

    @asset(
        name=spec.name,
        group_name=GROUP,
        partitions_def=partitions_def,
        deps=deps,
        code_version=project.code_version(spec.name),
        check_specs=[s for s, _ in check_pairs],
        retry_policy=RETRY_POLICIES.get(spec.name),
        kinds={"dvc", "python"},
        description=f"{DESCRIPTIONS.get(spec.name, '')}\n\nDVC: `{spec.cmd}` (stage `{spec.name}@<effect>`)",
    )
    def _stage(context: AssetExecutionContext, dvc: DvcProject, gates: QualityGates) -> MaterializeResult:
        effect = context.partition_key
        _observe_own_sources(context, dvc.path, spec, effect)
        commit = dvc.pinned_commit(context.instance, context.run_id, context.run.tags) if dvc.mode == WORKSPACE else None
        with dvc.build(spec.name, effect, log=context.log.info, commit=commit) as built:  # outputs read inside
            values = summaries.summary(spec.name, built.root, effect)
            checks = evaluate_checks(check_fns, built.root, effect, values, gates)
        result, entry = built.result, built.entry
        version = dvc_runner.data_version_of(entry)
        if version is None:
            raise dvc_runner.DvcError(f"dvc.lock records no md5 for the outs of {spec.dvc_name(effect)}")
        context.log.info(f"{spec.dvc_name(effect)}: {result.outcome} in {result.seconds:.1f}s; data version {version}")
        metadata = stage_metadata(spec, values, effect, entry)
        metadata["dvc_outcome"] = MetadataValue.text(result.outcome)
        metadata["dvc_seconds"] = MetadataValue.float(shown(result.seconds))
        if built.commit:
            metadata["git_commit"] = MetadataValue.text(built.commit)
        return MaterializeResult(data_version=DataVersion(version), metadata=metadata, check_results=checks)

    return _stage


def build_stage_assets(project: Project, partitions_def: PartitionsDefinition) -> list:
    with warnings.catch_warnings():  # partitioned checks are "preview" in dagster 1.13: accepted, not said at every load
        warnings.filterwarnings("ignore", category=PreviewWarning, message=".*partitions_def on an AssetCheckSpec")
        return [build_stage_asset(project, spec, partitions_def) for spec in project.stages.values()]


def build_pipeline(project: Project) -> tuple[StaticPartitionsDefinition, list, list]:
    """(the effect partitions, the source assets, the stage assets) of a project: what `definitions.build_defs` and
    `sync.asset_defs` both build on."""
    effects = StaticPartitionsDefinition(list(project.effects))
    return effects, build_sources(project, effects), build_stage_assets(project, effects)
