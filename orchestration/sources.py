"""Observable source assets: what the pipeline reads but does not make (see `project.py` for which params).

* `source_faces`: the photos in `faces.source` (a content hash).
* `teacher_config`: per effect, the `teacher:` section and the effect's `teacher:` entry. A teacher swap gives every
  partition a new data version, and `teacher_images` (only it) goes stale.
* `quality_config`: per effect, the `quality:` section and the effect's `quality:` overrides (face_pairs' gate).
* `effect_config`: per effect, the effect's other params that `dvc.yaml` lists (prompt, negative prompt, samples,
  seed). Editing one effect changes one partition.

Their versions come from `project.py` and are read from params.yaml when observed (no reload needed). Observe
them from the UI (select them, "Observe sources"), by `python -m orchestration.sync`, or let the
`dvc_sync` sensor do it when params.yaml changes; a stage asset also observes its own sources before it runs.
"""

import warnings

from dagster import (
    AssetKey,
    BetaWarning,
    AssetObservation,
    DagsterInstance,
    DataVersion,
    DataVersionsByPartition,
    ObserveResult,
    PartitionsDefinition,
    observable_source_asset,
)

from orchestration.dagster_internals import DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG, extract_data_version_from_entry
from orchestration.project import PER_EFFECT_SOURCES, SOURCE_DESCRIPTIONS, SOURCE_FACES, Project

GROUP = "inputs"


def build_sources(project: Project, partitions_def: PartitionsDefinition) -> list:
    with warnings.catch_warnings():  # observable_source_asset is "beta" in dagster 1.13: accepted, not said at every load
        warnings.filterwarnings("ignore", category=BetaWarning, message=".*observable_source_asset")
        return _build_sources(project, partitions_def)


def _build_sources(project: Project, partitions_def: PartitionsDefinition) -> list:
    root = project.root

    def fresh() -> Project:
        return Project.load(root)  # params.yaml as it is now, not as it was when the definitions loaded

    @observable_source_asset(name=SOURCE_FACES, group_name=GROUP, description=SOURCE_DESCRIPTIONS[SOURCE_FACES])
    def source_faces() -> ObserveResult:
        proj = fresh()
        src = proj.raw_params["faces"]["source"]
        n = sum(1 for p in (proj.root / src).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        return ObserveResult(data_version=DataVersion(proj.source_version(SOURCE_FACES)), metadata={"folder": str(src), "images": n})

    def per_effect(source: str):
        @observable_source_asset(name=source, group_name=GROUP, partitions_def=partitions_def, description=SOURCE_DESCRIPTIONS[source])
        def _observe() -> DataVersionsByPartition:
            proj = fresh()
            known = set(partitions_def.get_partition_keys())
            return DataVersionsByPartition({e: DataVersion(proj.source_version(source, e)) for e in proj.effects if e in known})

        return _observe

    return [source_faces if s == SOURCE_FACES else per_effect(s) for s in project.sources]


def observe_if_changed(instance: DagsterInstance, project: Project, source: str, effect: str | None, by: str) -> bool:
    """Record a runless observation of a source when its version differs from the latest recorded; True if it did.

    The same versions as the observe functions above: observing from the UI, from `orchestration.sync` or from a
    stage asset (which observes its own sources first, so its provenance names the params it really read)."""
    partition = effect if source in PER_EFFECT_SOURCES else None
    version = project.source_version(source, partition)
    rec = instance.get_latest_data_version_record(AssetKey(source), True, partition)
    if rec is not None and extract_data_version_from_entry(rec.event_log_entry) == DataVersion(version):
        return False
    instance.report_runless_asset_event(AssetObservation(
        asset_key=AssetKey(source), partition=partition,
        tags={DATA_VERSION_TAG: version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true", "fxassets/observed_by": by},
    ))
    return True
