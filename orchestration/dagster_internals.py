"""Every use of Dagster's private API (`dagster._core`, `dagster._time`), in one place, pinned to dagster 1.13
(constraints.txt). `tests/test_dagster_internals.py` imports and exercises each one, so an upgrade that moves one
fails there, loudly, rather than deep in a sync.

Why no public API does it:
* the data-version tags (`CODE_VERSION_TAG`, `DATA_VERSION_TAG`, `DATA_VERSION_IS_USER_PROVIDED_TAG`, the input
  tags): `orchestration.sync` records a materialization that ran outside Dagster (a plain `dvc repro`) with the
  provenance Dagster itself writes for a run, so that Dagster's staleness treats it like one of its own; the public
  `AssetMaterialization` has no parameters for code version or input versions, only these tags.
* `extract_data_version_from_entry`, `DEFAULT_DATA_VERSION`, `NULL_EVENT_POINTER`: reading back the data version of
  the latest recorded event (`DagsterInstance.get_latest_data_version_record` returns an event log entry) and the
  values Dagster writes when an input has never been materialized.
* `CachingStaleStatusResolver` with an `AssetGraphView`: the FRESH / STALE / MISSING status the UI shows; there is no
  public call that answers "is this asset partition stale" (`stale_status_resolver` below).
* `AssetCheckEvaluationTargetMaterializationData`: a runless `AssetCheckEvaluation` names the materialization it
  checked with it (the public constructor takes it, but the class is not exported).
* `IN_PROGRESS_RUN_STATUSES`: the set of run statuses the `dvc_sync` sensor waits on (not exported).
"""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (  # noqa: F401
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import (  # noqa: F401
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    DEFAULT_DATA_VERSION,
    NULL_EVENT_POINTER,
    CachingStaleStatusResolver,
    StaleStatus,
    extract_data_version_from_entry,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster._core.storage.dagster_run import IN_PROGRESS_RUN_STATUSES  # noqa: F401


def stale_status_resolver(defs, instance) -> CachingStaleStatusResolver:
    """Dagster's own stale-status logic (the class the UI uses), over `defs`' asset graph as of now. Cached: make one
    per question."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
