"""The Dagster driver keeps DVC's contract (DESIGN.md, "The contract both drivers keep").

One tiny project is built once per module: two effects materialized at the same time by two
`dagster asset materialize` processes (contract 6). The tests after it run in file order on that project and
each leaves params.yaml as it found it; the Dagster materializations in them run in-process."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_OVERRIDES, make_project, merge, project_env, run

sys.path.insert(0, str(REPO))  # orchestration/ lives in the project root

from dagster import AssetKey, DagsterInstance  # noqa: E402

from orchestration import dvc_runner  # noqa: E402
from orchestration.definitions import build_defs  # noqa: E402
from orchestration.project import STAGE_ORDER, Project  # noqa: E402
from orchestration.sync import downstream_of_stale, observe_sources, stale_status, sync, SyncReport  # noqa: E402

EFFECTS = ("cartoon", "sketch")
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})  # one process per run, not per step
RESTORED = dvc_runner.RESTORED
# even smaller than the shared tiny project: the training and export stages run three times per effect here
OVERRIDES = merge(TINY_OVERRIDES, {
    "train": {"steps": 2, "batch_size": 2, "crop": 64, "eval_every": 2},
    "export": {"calibration_samples": 2, "latency_runs": 1, "grid_samples": 1},
})


# ---- fast: the graph is dvc.yaml's ----------------------------------------------------------------------------
def test_graph_mirrors_dvc_yaml():
    project = Project.load(REPO)
    defs = build_defs(REPO)
    graph = defs.resolve_asset_graph()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    effects = list(yaml.safe_load((REPO / "params.yaml").read_text())["effects"])
    outs = {n: {o if isinstance(o, str) else next(iter(o)) for o in b["do"].get("outs", [])} for n, b in stages.items()}
    assert {"source_faces", "teacher_config", "effect_config"} <= set(project.sources)
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == set(STAGE_ORDER) | set(project.sources)
    for i, name in enumerate(STAGE_ORDER):
        do, node = stages[name]["do"], graph.get(AssetKey(name))
        parents = {p.to_user_string() for p in node.parent_keys}
        # a stage depends on the stages whose outs it reads (at least the one before it) ...
        assert parents & set(STAGE_ORDER) == {o for o, paths in outs.items() if paths & set(do["deps"])}, name
        assert i == 0 or STAGE_ORDER[i - 1] in parents
        # ... and on the sources that carry the params it lists; the rest is in its code version
        listed = set(do.get("params", []))
        carried = set(project.stages[name].code_params) | {p for src in parents - set(STAGE_ORDER) for p in project.source_params[src]}
        # (a stage that reads the faces folder depends on source_faces, whose version includes the folder's name)
        assert listed <= carried and carried - listed <= {"faces.source"}, name
        assert node.partitions_def.get_partition_keys() == effects
        assert node.code_version == project.code_version(name)
    assert "teacher_config" in {p.to_user_string() for p in graph.get(AssetKey("teacher_images")).parent_keys}
    assert "teacher_config" not in {p.to_user_string() for p in graph.get(AssetKey("prompts")).parent_keys}
    assert defs.resolve_assets_def(AssetKey("teacher_images")).op.retry_policy is not None
    assert defs.resolve_job_def("build_effect").executor_def.name == "multi_or_in_process_executor"
    checks = {k.name: graph.get_check_spec(k) for k in graph.asset_check_keys}
    assert {n for n, s in checks.items() if s.asset_key == AssetKey("face_pairs") and s.blocking} >= {"enough_kept_pairs", "train_and_heldout_pairs", "rejected_share"}
    assert checks["int8_parity"].asset_key == AssetKey("mobile_model") and checks["int8_parity"].blocking


def test_teacher_swap_changes_only_teacher_config_and_effect_edit_one_partition(tmp_path):
    root = tmp_path / "p"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".venv", ".git", ".dvc", "data", ".dagster_home", "__pycache__", "tests", "benchmarks"))
    shutil.copytree(REPO / "data" / "samples", root / "data" / "samples")
    before = Project.load(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teacher"]["sigma_s"] = params["teacher"]["sigma_s"] + 1
    first, other = list(params["effects"])[:2]
    params["effects"][first]["prompt"] += " (edited)"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    after = Project.load(root)
    for stage in STAGE_ORDER:
        assert before.code_version(stage) == after.code_version(stage), stage
    for e in (first, other):
        assert before.source_version("teacher_config", e) != after.source_version("teacher_config", e)
    assert before.source_version("effect_config", first) != after.source_version("effect_config", first)
    assert before.source_version("effect_config", other) == after.source_version("effect_config", other)
    assert before.source_version("source_faces") == after.source_version("source_faces")


def test_data_version_is_dvc_md5():
    one = {"outs": [{"path": "data/prompts/a", "md5": "abc.dir"}]}
    assert dvc_runner.data_version_of(one) == "abc.dir"
    two = {"outs": [{"path": "b", "md5": "2"}, {"path": "a", "md5": "1"}]}
    assert dvc_runner.data_version_of(two) == dvc_runner.data_version_of({"outs": list(reversed(two["outs"]))})
    assert dvc_runner.data_version_of({"outs": []}) is None


def test_metadata_floats_are_rounded_and_carry_their_unit(tmp_path):
    from dagster import MetadataValue

    from fxassets.core.paths import EffectPaths
    from orchestration import summaries
    from orchestration.assets import to_metadata

    md = to_metadata({"int8_ms_1t": 8.368427999982941, "int8_speedup_1t": 1.2670003727035373, "bytes": 581606,
                      "float_fallback": {"calibrations": [{"calibration_parity_db": 49.09728367387321}]}})
    assert md["int8_ms_1t"] == MetadataValue.float(8.368) and md["int8_speedup_1t"] == MetadataValue.float(1.267)
    assert md["bytes"] == MetadataValue.int(581606)
    assert md["float_fallback"] == MetadataValue.json({"calibrations": [{"calibration_parity_db": 49.1}]})
    p = EffectPaths(tmp_path, "fx")
    p.student_dir.mkdir(parents=True)
    p.train_metrics.write_text(json.dumps({"heldout_psnr": 27.9798, "identity_psnr": 17.4192, "heldout_ssim": 0.91383}))
    values = summaries.summary("student_checkpoint", tmp_path, "fx")
    assert values == {"heldout_psnr_db": 27.9798, "identity_psnr_db": 17.4192, "heldout_ssim": 0.91383}


def test_partition_lock_serializes_one_effect_not_two(tmp_path):
    import threading

    waited = []
    with dvc_runner.partition_lock(tmp_path, "cartoon"):
        with dvc_runner.partition_lock(tmp_path, "sketch", on_wait=waited.append):  # another effect: no wait
            pass
        t = threading.Thread(target=lambda: dvc_runner.partition_lock(tmp_path, "cartoon", on_wait=waited.append).__enter__())
        t.start()
        time.sleep(0.3)
        assert len(waited) == 1 and t.is_alive()  # the same effect waits
    t.join(5)
    assert not t.is_alive()


# ---- the shared project ----------------------------------------------------------------------------------------
def _home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "orchestration" / "dagster.yaml", path / "dagster.yaml")  # telemetry off
    return path


def _env(root: Path, home: Path) -> dict[str, str]:
    return {**project_env(root), "DAGSTER_HOME": str(home)}


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.relative_to(folder).as_posix(): (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _set_param(root: Path, dotted: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    node = params
    *head, last = dotted.split(".")
    for k in head:
        node = node[k]
    node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _materialize(root: Path, instance: DagsterInstance, effect: str, stages) -> dict[str, str]:
    """Materialize stages of one effect in-process; return {stage: what DVC did}."""
    defs = build_defs(root)  # fresh: params.yaml as it is now
    job = defs.resolve_job_def("build_effect").get_subset(asset_selection={AssetKey(s) for s in stages})
    result = job.execute_in_process(partition_key=effect, instance=instance)
    assert result.success
    return {s: result.asset_materializations_for_node(s)[-1].metadata["dvc_outcome"].value for s in stages}


def _dagster_status(root: Path, instance: DagsterInstance) -> dict[str, str]:
    return stale_status(build_defs(root), instance)


def _dvc_changed(root: Path) -> set[str]:
    return set(dvc_runner.status(root))


def _materialize_at_once(root: Path, home: Path, stages) -> tuple[dict[str, int], dict[str, str]]:
    """Every effect at the same time, one `dagster asset materialize` process each; (exit codes, outputs)."""
    procs = {}
    for effect in EFFECTS:
        cmd = ["dagster", "asset", "materialize", "-m", "orchestration.definitions",
               "--select", ",".join(stages), "--partition", effect, "--config-json", IN_PROCESS]
        procs[effect] = subprocess.Popen(cmd, cwd=root, env=_env(root, home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {e: p.communicate(timeout=900)[0] for e, p in procs.items()}
    return {e: p.returncode for e, p in procs.items()}, outputs


def _outcome(instance: DagsterInstance, stage: str, effect: str) -> str:
    rec = instance.get_latest_data_version_record(AssetKey(stage), False, effect)
    return rec.event_log_entry.asset_materialization.metadata["dvc_outcome"].value


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both effects materialized by two concurrent `dagster asset materialize` processes."""
    base = tmp_path_factory.mktemp("dagster")
    root = make_project(base / "project", OVERRIDES)
    home = _home(base / "dagster_home")
    subprocess.run(["dagster", "instance", "migrate"], cwd=root, env=_env(root, home), check=True, capture_output=True)
    codes, outputs = _materialize_at_once(root, home, STAGE_ORDER)
    instance = DagsterInstance.from_config(str(home))
    yield {"root": root, "home": home, "instance": instance, "codes": codes, "outputs": outputs,
           "lock": dvc_runner.read_lock(root)}
    instance.dispose()


@pytest.mark.slow
def test_f_two_effects_at_once_both_succeed(built):
    for effect in EFFECTS:
        assert built["codes"][effect] == 0, built["outputs"][effect][-5000:]
        assert "Unable to acquire lock" not in built["outputs"][effect]
        assert "is busy" not in built["outputs"][effect]
    records = [r for r in built["instance"].get_run_records() if r.dagster_run.tags.get("dagster/partition") in EFFECTS]
    assert len(records) == 2
    a, b = records
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the two runs did not overlap"


@pytest.mark.slow
def test_a_after_dagster_dvc_is_clean_and_outputs_cached(built):
    root, instance = built["root"], built["instance"]
    assert _dvc_changed(root) == set()
    lock = dvc_runner.read_lock(root)
    uncached = {list(m)[0].replace("${key}", e) for s in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values()
                for kind in ("metrics", "plots") for m in s["do"].get(kind, []) for e in EFFECTS}
    cache = root / ".dvc" / "cache" / "files" / "md5"
    for effect in EFFECTS:
        for stage in STAGE_ORDER:
            entry = lock[f"{stage}@{effect}"]
            for out in entry["outs"]:
                if out["path"] in uncached:
                    continue
                md5 = out["md5"]
                assert (cache / md5[:2] / md5[2:]).is_file(), f"{out['path']} not in DVC's cache"
                if md5.endswith(".dir"):
                    for item in json.loads((cache / md5[:2] / md5[2:]).read_text()):
                        assert (cache / item["md5"][:2] / item["md5"][2:]).is_file()
            rec = instance.get_latest_data_version_record(AssetKey(stage), False, effect)
            assert rec.event_log_entry.asset_materialization.tags["dagster/data_version"] == dvc_runner.data_version_of(entry)
    assert set(_dagster_status(root, instance).values()) == {"FRESH"}


@pytest.mark.slow
def test_b_after_plain_dvc_repro_sync_shows_assets_materialized(built, tmp_path):
    root = built["root"]
    home = _home(tmp_path / "fresh_home")  # a Dagster that has seen none of it
    run(root, "dvc", "repro")  # nothing to do: DVC built it all (under Dagster)
    env = _env(root, home)
    proc = subprocess.run([sys.executable, "-m", "orchestration.sync", "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert len(out["sync"]["recorded"]) == len(STAGE_ORDER) * len(EFFECTS)
    assert set(out["dagster"].values()) == {"FRESH"} and out["dvc_changed"] == []
    instance = DagsterInstance.from_config(str(home))
    try:
        again = sync(Project.load(root), instance)
        assert again.recorded == [] and again.observed == []  # idempotent
        rec = instance.get_latest_data_version_record(AssetKey("face_pairs"), False, "cartoon")
        assert rec.event_log_entry.asset_materialization.metadata["kept"].value >= 4  # same metadata as a run
        # the dvc_sync sensor (what `dagster dev` runs) does the same, once per change of dvc.lock / params.yaml
        from dagster import build_sensor_context

        sensor = build_defs(root).resolve_sensor_def("dvc_sync")
        old = time.time() - 60
        os.utime(root / "dvc.lock", (old, old))  # settled: no `dvc repro` at work
        ctx = build_sensor_context(instance=instance)
        assert "synced with DVC: observed 0, recorded 0" in sensor(ctx).skip_message
        assert "unchanged" in sensor(build_sensor_context(instance=instance, cursor=ctx.cursor)).skip_message
    finally:
        instance.dispose()


@pytest.mark.slow
def test_g_ui_lists_graph_and_shows_stale_after_swap(built):
    root, home, instance = built["root"], built["home"], built["instance"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["dagster", "dev", "-m", "orchestration.definitions", "-h", "127.0.0.1", "-p", str(port)]  # what `make ui` runs
    env = {**_env(root, home), "FXASSETS_SYNC_SENSOR": "stopped"}  # the test observes; no sensor racing it
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def gql(query: str) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert "errors" not in body, body
        return body["data"]

    def stale(asset: str) -> list[str]:
        q = '{ assetNodes(assetKeys: [{path: ["%s"]}]) { staleStatusByPartition(partitions: ["cartoon", "sketch"]) } }' % asset
        return gql(q)["assetNodes"][0]["staleStatusByPartition"]

    try:
        deadline = time.time() + 180
        while True:
            try:
                entries = gql("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }")["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    break
            except OSError:
                pass
            assert proc.poll() is None, "dagster dev exited"
            assert time.time() < deadline, "dagster dev did not come up"
            time.sleep(1)
        nodes = gql("{ assetNodes { assetKey { path } dependencyKeys { path } isObservable } }")["assetNodes"]
        graph = {n["assetKey"]["path"][0]: sorted(d["path"][0] for d in n["dependencyKeys"]) for n in nodes}
        assert graph["mobile_model"] == ["export_config", "face_pairs", "source_faces", "student_checkpoint", "teacher_images"]
        assert graph["teacher_images"] == ["prompts", "source_faces", "teacher_config"]
        assert {n["assetKey"]["path"][0] for n in nodes if n["isObservable"]} == set(Project.load(root).sources)
        assert stale("teacher_images") == ["FRESH", "FRESH"]

        _set_param(root, "teacher.sigma_s", 40)
        try:
            observe_sources(Project.load(root), instance, SyncReport())  # what the dvc_sync sensor does on its own
            assert stale("teacher_images") == ["STALE", "STALE"]  # no reload needed: the teacher is a source
            assert stale("prompts") == ["FRESH", "FRESH"]
        finally:
            _set_param(root, "teacher.sigma_s", 60)
        observe_sources(Project.load(root), instance, SyncReport())
        assert stale("teacher_images") == ["FRESH", "FRESH"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
def test_c_teacher_swap_same_stale_set_as_dvc_and_prompts_untouched(built):
    root, instance = built["root"], built["instance"]
    prompts_before = _files(root / "data" / "prompts")
    _set_param(root, "teacher.sigma_s", 40)
    observe_sources(Project.load(root), instance, SyncReport())

    status = _dagster_status(root, instance)
    stale = {k for k, v in status.items() if v == "STALE"}
    assert stale == {f"teacher_images@{e}" for e in EFFECTS}
    assert _dvc_changed(root) == stale  # `dvc status` lists the same stages (neither is transitive)
    assert {k for k, v in status.items() if k.startswith("prompts@")} and all(status[f"prompts@{e}"] == "FRESH" for e in EFFECTS)
    redo = downstream_of_stale(Project.load(root), status)
    assert redo == {f"{s}@{e}" for s in STAGE_ORDER[1:] for e in EFFECTS}

    codes, outputs = _materialize_at_once(root, built["home"], STAGE_ORDER[1:])  # the stale ones and downstream
    for effect in EFFECTS:
        assert codes[effect] == 0, outputs[effect][-5000:]
        assert _outcome(instance, "teacher_images", effect) == dvc_runner.RAN
    assert _files(root / "data" / "prompts") == prompts_before  # bytes and mtime
    assert set(_dagster_status(root, instance).values()) == {"FRESH"}
    assert _dvc_changed(root) == set()
    for effect in EFFECTS:
        assert json.loads((root / "data" / "teacher_images" / effect / "teacher.json").read_text())["sigma_s"] == 40


@pytest.mark.slow
def test_d_swap_back_restores_from_dvc_cache_without_running(built):
    root, instance = built["root"], built["instance"]
    _set_param(root, "teacher.sigma_s", 60)
    observe_sources(Project.load(root), instance, SyncReport())
    assert {k for k, v in _dagster_status(root, instance).items() if v == "STALE"} == {f"teacher_images@{e}" for e in EFFECTS}
    for effect in EFFECTS:
        outcomes = _materialize(root, instance, effect, STAGE_ORDER[1:])
        assert outcomes == {s: RESTORED for s in STAGE_ORDER[1:]}  # neither the teacher nor training ran
    lock = dvc_runner.read_lock(root)
    for name, entry in built["lock"].items():  # the first build's outputs are back
        assert dvc_runner.outs_md5(lock[name]) == dvc_runner.outs_md5(entry), name
    assert set(_dagster_status(root, instance).values()) == {"FRESH"}
    assert _dvc_changed(root) == set()


@pytest.mark.slow
def test_e_one_effect_edit_touches_one_partition_and_dvc_repro_syncs(built):
    root, instance = built["root"], built["instance"]
    sketch_before = {stage: _files(root / "data" / d / "sketch") for stage, d in
                     [("prompts", "prompts"), ("teacher_images", "teacher_images"), ("face_pairs", "face_pairs"),
                      ("student_checkpoint", "student"), ("mobile_model", "mobile")]}
    old_prompt = yaml.safe_load((root / "params.yaml").read_text())["effects"]["cartoon"]["prompt"]
    _set_param(root, "effects.cartoon.prompt", old_prompt + ", edited")
    try:
        observe_sources(Project.load(root), instance, SyncReport())
        status = _dagster_status(root, instance)
        assert {k for k, v in status.items() if v == "STALE"} == {"prompts@cartoon"} == _dvc_changed(root)
        assert _materialize(root, instance, "cartoon", ["prompts"]) == {"prompts": dvc_runner.RAN}
        status = _dagster_status(root, instance)
        assert {k for k, v in status.items() if v == "STALE"} == {"teacher_images@cartoon"} == _dvc_changed(root)
    finally:
        _set_param(root, "effects.cartoon.prompt", old_prompt)
    # back to the old prompt with a plain `dvc repro`, outside Dagster; then sync
    out = run(root, "dvc", "repro").stdout
    assert "Stage 'prompts@cartoon' is cached - skipping run" in out
    report = sync(Project.load(root), instance)
    assert report.recorded == ["prompts@cartoon"], report
    assert set(_dagster_status(root, instance).values()) == {"FRESH"}
    assert _dvc_changed(root) == set()
    for stage, d in [("prompts", "prompts"), ("teacher_images", "teacher_images"), ("face_pairs", "face_pairs"),
                     ("student_checkpoint", "student"), ("mobile_model", "mobile")]:
        assert _files(root / "data" / d / "sketch") == sketch_before[stage], stage


@pytest.mark.slow
def test_h_failed_blocking_pair_check_stops_before_training(built):
    from dagster import StaticPartitionsDefinition, materialize

    from orchestration.assets import build_stage_assets
    from orchestration.resources import DvcProject, QualityGates

    root, instance = built["root"], built["instance"]
    assets = build_stage_assets(Project.load(root), StaticPartitionsDefinition(list(EFFECTS)))
    result = materialize(
        assets, selection=["face_pairs", "student_checkpoint"], partition_key="cartoon", instance=instance,
        resources={"dvc": DvcProject(root=str(root)), "gates": QualityGates(min_kept_pairs=1000)}, raise_on_error=False,
    )
    assert not result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks.pop("enough_kept_pairs") is False
    assert checks and all(checks.values())  # train_and_heldout_pairs, rejected_share, quality_gate (the GX suite)
    assert result.asset_materializations_for_node("face_pairs")  # recorded, so the UI shows what was wrong
    assert not result.asset_materializations_for_node("student_checkpoint")  # training never started
