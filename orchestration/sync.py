"""Bring Dagster's view in line with DVC after work done outside Dagster (a plain `dvc repro`, `dvc checkout`, ...).

    python -m orchestration.sync            # observe the sources, record what DVC reports clean, print the status
    python -m orchestration.sync --status   # only print Dagster's and DVC's view, record nothing

1. Observe the sources (`source_faces`, `teacher_config`, `effect_config`) from params.yaml and the faces folder as
   they are now; a source whose version changed gets a runless observation.
2. For each stage and effect that `dvc status` reports clean (and whose upstream stages are clean too): unless
   Dagster's latest materialization carries DVC's md5 as its data version and Dagster calls it FRESH (code
   version and inputs unchanged), record a runless materialization with DVC's md5 as data version and the
   current code and input versions (the provenance tags Dagster itself writes), with the same metadata and check
   results as a materialization run by Dagster.
Stages DVC reports changed are left alone: Dagster already shows them stale (or missing) or will once observed.

The `dvc_sync` sensor (on by default under `dagster dev`) runs the same when dvc.lock, params.yaml or the faces
folder change and no run is in progress (not in workspace mode, where the checkout holds no run's outputs).
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    DefaultSensorStatus,
    Definitions,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from orchestration import dvc_runner, summaries
from orchestration.assets import build_pipeline, evaluate_checks, stage_metadata
from orchestration.dagster_internals import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    DEFAULT_DATA_VERSION,
    IN_PROGRESS_RUN_STATUSES,
    NULL_EVENT_POINTER,
    AssetCheckEvaluationTargetMaterializationData,
    StaleStatus,
    extract_data_version_from_entry,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
    stale_status_resolver,
)
from orchestration.checks import checks_for
from orchestration.project import PER_EFFECT_SOURCES, SOURCE_FACES, SOURCES, Project
from orchestration.resources import MODE, WORKSPACE, QualityGates, make_resources
from orchestration.sources import observe_if_changed

SYNC_TAG = "fxassets/recorded_by"
SETTLE_S = 10  # the sensor waits until dvc.lock has not changed for this long


@dataclass
class SyncReport:
    observed: list[str] = field(default_factory=list)  # source[@effect] with a new observation
    recorded: list[str] = field(default_factory=list)  # stage@effect with a new runless materialization
    in_sync: list[str] = field(default_factory=list)  # stage@effect where Dagster already matched DVC
    dvc_changed: list[str] = field(default_factory=list)  # stage@effect that `dvc status` reports changed
    skipped: list[str] = field(default_factory=list)  # clean in DVC, but an upstream stage is not

    def line(self) -> str:
        return (f"observed {len(self.observed)}, recorded {len(self.recorded)}, in sync {len(self.in_sync)}, "
                f"changed in DVC {len(self.dvc_changed)}, skipped {len(self.skipped)}")


def _latest(instance: DagsterInstance, key: str, is_source: bool, partition: str | None):
    return instance.get_latest_data_version_record(AssetKey(key), is_source, partition)


def asset_defs(root: str | Path | None = None) -> Definitions:
    """The assets and their resources, as `orchestration.definitions` builds them, without the sensor and the job:
    what the stale-status resolver reads (this module never imports `definitions`, which imports it)."""
    project = Project.load(root)
    _, sources, stages = build_pipeline(project)
    return Definitions(assets=[*sources, *stages], resources=make_resources(project.root))


def observe_sources(project: Project, instance: DagsterInstance, report: SyncReport) -> None:
    for source in project.sources:
        for effect in project.effects if source in PER_EFFECT_SOURCES else [None]:
            if observe_if_changed(instance, project, source, effect, by="orchestration.sync"):
                report.observed.append(source if effect is None else f"{source}@{effect}")


def _input_tags(project: Project, instance: DagsterInstance, stage: str, effect: str) -> dict[str, str]:
    """The provenance tags Dagster writes for a materialization's inputs, as it would write them now.

    For a partitioned parent Dagster records a hash of the parent partition's latest *materialization* data
    version (an empty hash for a source, whose events are observations) and a pointer to the parent's latest
    event; staleness then compares events after that pointer. For an unpartitioned parent: its data version."""
    spec = project.stages[stage]
    tags = {}
    for parent in (*spec.upstream, *spec.sources):
        is_source = parent in SOURCES
        partitioned = parent != SOURCE_FACES
        rec = _latest(instance, parent, is_source, effect if partitioned else None)
        if rec is None:
            version = DEFAULT_DATA_VERSION.value
        elif partitioned:
            own = "" if is_source else (extract_data_version_from_entry(rec.event_log_entry) or DEFAULT_DATA_VERSION).value
            version = hashlib.sha256(own.encode()).hexdigest()
        else:
            version = (extract_data_version_from_entry(rec.event_log_entry) or DEFAULT_DATA_VERSION).value
        tags[get_input_data_version_tag(AssetKey(parent))] = version
        tags[get_input_event_pointer_tag(AssetKey(parent))] = str(rec.storage_id) if rec else NULL_EVENT_POINTER
    return tags


def sync(project: Project, instance: DagsterInstance, observe: bool = True, defs=None) -> SyncReport:
    """Observe the sources, then record every stage@effect that DVC reports clean and Dagster does not show as
    materialized at that version and fresh. `defs` defaults to the assets built from the project as it is now."""
    if defs is None:
        defs = asset_defs(project.root)
    report = SyncReport()
    if observe:
        observe_sources(Project.load(project.root), instance, report)  # params.yaml as it is at this moment
    with contextlib.ExitStack() as stack:  # no run rebuilds an effect while DVC's view of it is being recorded
        for effect in sorted(project.effects):
            stack.enter_context(dvc_runner.partition_lock(project.root, effect))
        _record(project, instance, defs, report)
    return report


def _record(project: Project, instance: DagsterInstance, defs, report: SyncReport) -> None:
    changed = set(dvc_runner.status(project.root))
    lock = dvc_runner.read_lock(project.root)
    gates = QualityGates()
    for effect in project.effects:
        blocked = False
        for stage, spec in project.stages.items():
            name = spec.dvc_name(effect)
            entry = lock.get(name)
            if name in changed or not entry:
                report.dvc_changed.append(name)
                blocked = True
                continue
            if blocked:
                report.skipped.append(name)
                continue
            version = dvc_runner.data_version_of(entry)
            rec = _latest(instance, stage, False, effect)
            current = extract_data_version_from_entry(rec.event_log_entry) if rec else None
            if current is not None and current.value == version and \
                    stale_status_resolver(defs, instance).get_status(AssetKey(stage), effect) == StaleStatus.FRESH:
                report.in_sync.append(name)
                continue
            tags = {CODE_VERSION_TAG: project.code_version(stage), DATA_VERSION_TAG: version,
                    DATA_VERSION_IS_USER_PROVIDED_TAG: "true", SYNC_TAG: "orchestration.sync",
                    **_input_tags(project, instance, stage, effect)}
            values = summaries.summary(stage, project.root, effect)
            metadata = stage_metadata(spec, values, effect, entry)
            metadata["dvc_outcome"] = "recorded from dvc.lock by orchestration.sync (DVC reports the stage clean)"
            instance.report_runless_asset_event(AssetMaterialization(asset_key=AssetKey(stage), partition=effect, metadata=metadata, tags=tags))
            report.recorded.append(name)
            check_fns = {s.name: fn for s, fn in checks_for(stage, None)}  # type: ignore[arg-type]
            if check_fns:
                new = _latest(instance, stage, False, effect)
                target = AssetCheckEvaluationTargetMaterializationData(storage_id=new.storage_id, run_id=new.run_id, timestamp=new.timestamp) if new else None
                for res in evaluate_checks(check_fns, project.root, effect, values, gates):
                    instance.report_runless_asset_event(AssetCheckEvaluation(
                        asset_key=AssetKey(stage), check_name=res.check_name, passed=res.passed, metadata=res.metadata,
                        severity=res.severity, partition=effect, target_materialization_data=target,
                    ))


# ---- status: Dagster's view next to DVC's ----------------------------------------------------------------------
def stale_status(defs, instance: DagsterInstance) -> dict[str, str]:
    """{'stage@effect': 'FRESH' | 'STALE' | 'MISSING'} as the UI computes it (Dagster's private resolver).

    Dagster's staleness is not transitive (as `dvc status` is not): after a teacher swap only `teacher_images` is
    STALE; `downstream_of_stale` gives what a rebuild will also redo."""
    graph = defs.resolve_asset_graph()
    resolver = stale_status_resolver(defs, instance)
    out = {}
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        for p in node.partitions_def.get_partition_keys() if node.partitions_def else [None]:
            status = resolver.get_status(key, p)
            out[key.to_user_string() + (f"@{p}" if p else "")] = status.value
    return out


def downstream_of_stale(project: Project, status: dict[str, str]) -> set[str]:
    """The stage@effect names that are STALE or MISSING, or downstream of one (what `dvc repro` would redo)."""
    out: set[str] = set()
    for effect in project.effects:
        for stage, spec in project.stages.items():
            name = spec.dvc_name(effect)
            if status.get(name) in (StaleStatus.STALE.value, StaleStatus.MISSING.value) or any(f"{u}@{effect}" in out for u in spec.upstream):
                out.add(name)
    return out


# ---- the sensor ------------------------------------------------------------------------------------------------
def _signature(project_root: Path) -> str:
    parts = {}
    for rel in ("dvc.lock", "params.yaml"):
        p = project_root / rel
        parts[rel] = [p.stat().st_mtime_ns, p.stat().st_size] if p.exists() else None
    try:
        faces = project_root / Project.load(project_root).raw_params["faces"]["source"]
        parts["faces"] = [faces.stat().st_mtime_ns, sum(1 for _ in faces.iterdir())]
    except Exception:  # noqa: BLE001 - an invalid params.yaml shows as a load error elsewhere
        parts["faces"] = None
    return json.dumps(parts, sort_keys=True)


def build_sync_sensor(root: Path):
    # on by default; FXASSETS_SYNC_SENSOR=stopped starts it stopped (turn it on in the UI: Automation -> dvc_sync)
    status = DefaultSensorStatus.STOPPED if os.environ.get("FXASSETS_SYNC_SENSOR", "").lower() in ("stopped", "off", "0") else DefaultSensorStatus.RUNNING

    @sensor(name="dvc_sync", minimum_interval_seconds=15, default_status=status,
            description="After work outside Dagster (a plain `dvc repro`, an edit of params.yaml), observe the "
                        "sources and record what DVC reports clean (same as `python -m orchestration.sync`).")
    def dvc_sync(context: SensorEvaluationContext):
        if MODE == WORKSPACE:  # the steps build in workspaces of their own: this checkout is nobody's output
            return SkipReason("workspace mode: the DVC remote holds what the runs built; this checkout is not synced")
        sig = _signature(root)
        if context.cursor == sig:
            return SkipReason("dvc.lock, params.yaml and the faces folder are unchanged")
        if context.instance.get_runs_count(RunsFilter(statuses=IN_PROGRESS_RUN_STATUSES)):
            return SkipReason("runs in progress: syncing after they finish")
        lock = root / "dvc.lock"
        if dvc_runner.busy(root) or (lock.exists() and time.time() - lock.stat().st_mtime < SETTLE_S):
            return SkipReason("DVC is at work (a `dvc repro` outside Dagster?): syncing when it is done")
        report = sync(Project.load(root), context.instance)
        context.update_cursor(sig)
        return SkipReason(f"synced with DVC: {report.line()}")

    return dvc_sync


# ---- CLI -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestration.sync", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="the project folder (default: $FXASSETS_ROOT or the folder holding orchestration/)")
    ap.add_argument("--status", action="store_true", help="print Dagster's and DVC's view; record nothing")
    ap.add_argument("--json", action="store_true")
    # the instance: $DAGSTER_HOME, else <root>/.dagster_home (what `make ui` uses)
    args = ap.parse_args(argv)

    defs = asset_defs(args.root)  # once: the assets are all the status needs (no sensor, no job)
    project = Project.load(args.root)
    if not os.environ.get("DAGSTER_HOME"):  # the instance `make ui` uses
        home = project.root / ".dagster_home"
        home.mkdir(exist_ok=True)
        if not (home / "dagster.yaml").exists():
            shutil.copy(Path(__file__).with_name("dagster.yaml"), home / "dagster.yaml")
        os.environ["DAGSTER_HOME"] = str(home)
    instance = DagsterInstance.get()
    report = None if args.status else sync(project, instance, defs=defs)
    status = stale_status(defs, instance)
    dvc_changed = sorted(dvc_runner.status(project.root))
    if args.json:
        print(json.dumps({"sync": report.__dict__ if report else None, "dagster": status, "dvc_changed": dvc_changed}, indent=2))
        return 0
    if report:
        print(f"sync: {report.line()}")
        for name in report.recorded:
            print(f"  recorded {name}")
    width = max(map(len, status), default=10)
    print(f"{'asset@effect'.ljust(width)}  dagster  dvc")
    for name, st in status.items():
        print(f"{name.ljust(width)}  {st:<7}  {'changed' if name in dvc_changed else 'clean'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
