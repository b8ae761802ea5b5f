"""Each Dagster internal that orchestration/ uses, through its one adapter (orchestration/dagster_internals.py): fails
loudly here when the pinned Dagster moves or changes one."""

import pytest

pytest.importorskip("dagster")

from dagster import AssetKey, AssetMaterialization, DagsterInstance, DataVersion  # noqa: E402

from orchestration import dagster_internals as di  # noqa: E402


def test_the_tags_are_the_strings_dagster_writes():
    assert di.CODE_VERSION_TAG == "dagster/code_version"
    assert di.DATA_VERSION_TAG == "dagster/data_version"
    assert di.DATA_VERSION_IS_USER_PROVIDED_TAG == "dagster/data_version_is_user_provided"
    assert di.get_input_data_version_tag(AssetKey("a")) == "dagster/input_data_version/a"
    assert di.get_input_event_pointer_tag(AssetKey("a")) == "dagster/input_event_pointer/a"
    assert isinstance(di.DEFAULT_DATA_VERSION, DataVersion) and isinstance(di.NULL_EVENT_POINTER, str)
    assert {s.value for s in di.StaleStatus} >= {"FRESH", "STALE", "MISSING"}
    assert di.IN_PROGRESS_RUN_STATUSES


def test_recorded_version_reads_back_and_the_resolver_answers():
    from dagster import Definitions, asset

    @asset
    def thing():
        return 1

    with DagsterInstance.ephemeral() as instance:
        defs = Definitions(assets=[thing])
        assert di.stale_status_resolver(defs, instance).get_status(AssetKey("thing"), None) == di.StaleStatus.MISSING
        instance.report_runless_asset_event(AssetMaterialization(
            asset_key=AssetKey("thing"), tags={di.DATA_VERSION_TAG: "v1", di.DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}))
        rec = instance.get_latest_data_version_record(AssetKey("thing"), False, None)
        assert di.extract_data_version_from_entry(rec.event_log_entry) == DataVersion("v1")
        target = di.AssetCheckEvaluationTargetMaterializationData(storage_id=rec.storage_id, run_id=rec.run_id, timestamp=rec.timestamp)
        assert target.storage_id == rec.storage_id
        assert di.stale_status_resolver(defs, instance).get_status(AssetKey("thing"), None) in set(di.StaleStatus)


def test_orchestration_has_no_import_cycle_and_no_other_internals():
    import ast
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "orchestration"
    graph = {}
    for f in folder.glob("*.py"):
        mods = set()
        for n in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            if isinstance(n, ast.ImportFrom) and n.module == "orchestration":
                names = [f"orchestration.{a.name}" for a in n.names]
            for m in names:
                if m.startswith("dagster._") and f.name != "dagster_internals.py":
                    raise AssertionError(f"{f.name} uses {m}: go through orchestration/dagster_internals.py")
                if m.startswith("orchestration."):
                    mods.add(m.split(".")[1])
        graph[f.stem] = mods

    def reaches(a, b, seen=()):
        return any(m == b or (m not in seen and reaches(m, b, (*seen, m))) for m in graph.get(a, ()))

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f"import cycle through {cycles}"
