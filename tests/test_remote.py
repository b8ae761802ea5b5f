"""Several machines, one DVC remote (docs/scale.md), against a real S3 protocol: moto's server on 127.0.0.1.

One tiny project ("workspace A", built once with `dvc repro`) pushes to a bucket; fresh clones stand for other
machines, each with its own DVC cache. The tests run in file order; the last commits a teacher change to A."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_OVERRIDES, make_project, merge, project_env, run

pytest.importorskip("moto", reason="the scale extra (moto[server], dvc-s3) is not installed: `make setup` installs it")
pytest.importorskip("dvc_s3", reason="the scale extra (moto[server], dvc-s3) is not installed: `make setup` installs it")

import s3_server  # noqa: E402


sys.path.insert(0, str(REPO))  # orchestration/ lives in the project root
from orchestration import dvc_runner, workspace  # noqa: E402

EFFECTS = ("cartoon", "sketch")
STAGES = ("prompts", "teacher_images", "face_pairs", "student_checkpoint", "mobile_model")
OVERRIDES = merge(TINY_OVERRIDES, {
    "effects": {e: {"train": {}} for e in EFFECTS},
    "train": {"steps": 2, "batch_size": 2, "crop": 64, "eval_every": 2},
    "export": {"calibration_samples": 2, "latency_runs": 1, "grid_samples": 1},
})
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]


def _without_latencies(report: str) -> list[list[str]]:
    """The report's lines as cells, without the latency column and the line naming the machine it was timed on."""
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in report.splitlines() if not ln.startswith("latencies measured on")]
    col = rows[0].index("int8 ms (fp32)")
    return [r[:col] + r[col + 1:] if len(r) > col else r for r in rows]


# ---- fast ------------------------------------------------------------------------------------------------------
def test_committed_dvc_config_holds_no_credentials():
    text = (REPO / ".dvc" / "config").read_text().lower()
    for key in ("access_key_id", "secret_access_key", "session_token", "credentialpath", "password"):
        assert key not in text, f".dvc/config names {key}: credentials belong in the environment or .dvc/config.local"
    assert "config.local" in (REPO / ".dvc" / ".gitignore").read_text()


def test_head_commit_refuses_uncommitted_changes(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    subprocess.run([*GIT, "-C", str(tmp_path), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(tmp_path), "commit", "-qm", "x"], check=True)
    (tmp_path / "dvc.lock").write_text("untracked: fine\n")
    sha = workspace.head_commit(tmp_path)
    assert len(sha) == 40
    (tmp_path / "params.yaml").write_text("a: 2\n")
    with pytest.raises(dvc_runner.DvcError, match="uncommitted changes to params.yaml"):
        workspace.head_commit(tmp_path)


def test_mode_and_executor_settings_are_checked(tmp_path):
    from dagster import multi_or_in_process_executor

    from orchestration.resources import make_executor, make_resources

    assert make_executor("multiprocess") is multi_or_in_process_executor
    with pytest.raises(ValueError, match=r"\$FXASSETS_EXECUTOR='ray'"):
        make_executor("ray")
    with pytest.raises(ValueError, match=r"\$FXASSETS_MODE='remote'"):
        make_resources(tmp_path, "remote")
    assert make_resources(tmp_path, "workspace")["dvc"].mode == "workspace"


def test_celery_worker_yaml_is_the_executor_config():
    from orchestration.resources import CELERY_CONFIG

    worker = yaml.safe_load((REPO / "orchestration" / "celery.yaml").read_text())
    assert worker["execution"]["config"] == CELERY_CONFIG


def test_k8s_executor_config_is_valid():
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed (no release for dagster 1.13.28 yet: docs/scale.md)")
    from dagster._config import validate_config
    from dagster_k8s import k8s_job_executor

    from orchestration.resources import K8S_CONFIG

    result = validate_config(k8s_job_executor.config_schema.config_type, K8S_CONFIG)
    assert result.success, result.errors


# ---- one tiny project and a bucket -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    server = s3_server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def built(tmp_path_factory, s3):
    """Workspace A: the tiny project built once, its default remote `storage` = s3://fxassets-test/a (committed)."""
    base = tmp_path_factory.mktemp("remote")
    root = make_project(base / "A", OVERRIDES)
    run(root, "dvc", "repro")
    run(root, "dvc", "remote", "add", "-d", "storage", f"s3://{s3_server.BUCKET}/a")
    run(root, "dvc", "remote", "modify", "storage", "endpointurl", s3.url)
    subprocess.run([*GIT, "commit", "-qam", "the remote"], cwd=root, check=True)
    return {"root": root, "base": base}


def _clone(src: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(src), str(dest)], check=True)
    return dest


def _restore(root: Path, *targets: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc repro --pull` computing nothing (what `make pull` runs)."""
    env = {**project_env(root), "FXASSETS_ONLY_STAGE": "none"}
    proc = subprocess.run(["dvc", "repro", "--pull", *targets], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _cache_files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in (root / ".dvc" / "cache").rglob("*") if p.is_file()}


@pytest.mark.slow
def test_push_then_a_fresh_clone_restores_every_stage_without_running_one(built, s3, tmp_path):
    a = built["root"]
    out = run(a, sys.executable, "-m", "orchestration.remote", "push").stdout
    assert "cache: false" in out, out
    b = _clone(a, tmp_path / "B")  # another machine: the commit, no outputs, an empty cache of its own
    assert not (b / "data" / "student").exists() and not (b / ".dvc" / "cache").exists()
    proc = _restore(b)
    assert "Running stage" not in proc.stdout
    for stage in STAGES:
        for e in EFFECTS:
            assert f"Stage '{stage}@{e}' is cached - skipping run" in proc.stdout, f"{stage}@{e}"
    lock_a, lock_b = dvc_runner.read_lock(a), dvc_runner.read_lock(b)
    assert {k: dvc_runner.outs_md5(v) for k, v in lock_a.items()} == {k: dvc_runner.outs_md5(v) for k, v in lock_b.items()}
    assert dvc_runner.status(b) == {}
    # the same table; latencies are the run's own facts (the run log, never restored): measured in A only
    report_a, report_b = (run(w, "fxassets", "report").stdout for w in (a, b))
    assert _without_latencies(report_b) == _without_latencies(report_a) and "latencies measured on" in report_a


@pytest.mark.slow
def test_restore_only_names_the_stage_missing_from_the_remote(built, tmp_path):
    b = _clone(built["root"], tmp_path / "B")
    run(b, "dvc", "remote", "modify", "--local", "storage", "url", f"s3://{s3_server.BUCKET}/empty")
    proc = _restore(b, "teacher_images@cartoon", check=False)
    assert proc.returncode != 0
    assert "prompts@cartoon is not in the remote, and this checkout restores only" in proc.stdout + proc.stderr
    assert not (b / "data" / "prompts" / "cartoon").exists()


@pytest.mark.slow
def test_remote_down_mid_push_loses_nothing_and_the_next_push_completes(built, s3):
    a = built["root"]
    run(a, "dvc", "remote", "add", "--local", "outage", f"s3://{s3_server.BUCKET}/outage")
    run(a, "dvc", "remote", "modify", "--local", "outage", "endpointurl", s3.url)
    cache_before = _cache_files(a)
    push = [sys.executable, "-m", "orchestration.remote", "push", "-r", "outage"]
    env = {**project_env(a), "AWS_MAX_ATTEMPTS": "2"}  # fewer retries against the dead remote
    s3.outage.begin_after(5)
    try:
        failed = subprocess.run(push, cwd=a, env=env, capture_output=True, text=True, timeout=600)
    finally:
        s3.outage.end()
    assert s3.outage.puts > 5, "the remote never went down: the push had fewer objects than expected"
    assert failed.returncode == 1, failed.stdout + failed.stderr
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("orchestration.remote: error: push to outage (s3://fxassets-test/outage) failed"), error
    assert "nothing is lost here" in error and "push again" in error
    partial = {k for k in s3.objects("outage/") if "/files/" in k}
    assert 5 <= len(partial), partial
    assert _cache_files(a) == cache_before and dvc_runner.status(a) == {}  # nothing lost locally

    done = subprocess.run(push, cwd=a, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    after = {k for k in s3.objects("outage/") if "/files/" in k}
    assert partial < after
    assert after == {f"outage/{k.removeprefix('.dvc/cache/')}" for k in _cache_files(a) if "/files/" in k}  # all of it


# ---- Dagster in workspace mode -------------------------------------------------------------------------------------
def _dagster_env(root: Path, home: Path, ws: Path, **extra: str) -> dict[str, str]:
    return {**project_env(root), "DAGSTER_HOME": str(home), "FXASSETS_MODE": "workspace", "FXASSETS_WORKSPACES": str(ws), **extra}


@pytest.fixture(scope="module")
def home(built) -> Path:
    """A Dagster instance for workspace A (telemetry off), migrated once before processes open it at the same time."""
    path = built["base"] / "dagster_home"
    path.mkdir()
    (path / "dagster.yaml").write_text((REPO / "orchestration" / "dagster.yaml").read_text())
    env = {**project_env(built["root"]), "DAGSTER_HOME": str(path)}
    subprocess.run(["dagster", "instance", "migrate"], cwd=built["root"], env=env, check=True, capture_output=True)
    return path


@pytest.mark.slow
def test_workspace_mode_two_effects_at_once_both_land_in_the_remote(built, home, tmp_path):
    from dagster import AssetKey, DagsterInstance

    from orchestration.dagster_internals import extract_data_version_from_entry

    a, base = built["root"], built["base"]
    run(a, sys.executable, "-m", "orchestration.remote", "push")  # the first build is in the remote (prompts stay)
    params = yaml.safe_load((a / "params.yaml").read_text())
    params["teacher"]["sigma_s"] = 45  # a new teacher: teacher_images and face_pairs must run in the workspaces
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([*GIT, "commit", "-qam", "teacher sigma_s 45"], cwd=a, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=a, capture_output=True, text=True, check=True).stdout.strip()
    teacher_before = {e: (a / f"data/teacher_images/{e}/teacher.json").read_text() for e in EFFECTS}
    ws = base / "workspaces"
    env = _dagster_env(a, home, ws)
    in_process = json.dumps({"execution": {"config": {"in_process": {}}}})
    procs = {e: subprocess.Popen(["dagster", "asset", "materialize", "-m", "orchestration.definitions", "--select",
                                  "teacher_images,face_pairs", "--partition", e, "--config-json", in_process],
                                 cwd=a, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for e in EFFECTS}
    outputs = {e: p.communicate(timeout=900)[0] for e, p in procs.items()}
    for e, p in procs.items():
        assert p.returncode == 0, outputs[e][-6000:]
    assert not list((ws / "runs").iterdir()), "a workspace was left behind after a success"
    for e in EFFECTS:  # the checkout was nobody's workspace
        assert (a / f"data/teacher_images/{e}/teacher.json").read_text() == teacher_before[e]

    instance = DagsterInstance.from_config(str(home))
    try:
        versions = {}
        for e in EFFECTS:
            for stage in ("teacher_images", "face_pairs"):
                rec = instance.get_latest_data_version_record(AssetKey(stage), False, e)
                md = rec.event_log_entry.asset_materialization.metadata
                assert md["dvc_outcome"].value == dvc_runner.RAN and md["git_commit"].value == sha, (stage, e)
                versions[f"{stage}@{e}"] = extract_data_version_from_entry(rec.event_log_entry).value
    finally:
        instance.dispose()
    c = _clone(a, tmp_path / "C")  # a third machine finds both effects' new pairs in the remote
    _restore(c, *(f"face_pairs@{e}" for e in EFFECTS))
    lock = dvc_runner.read_lock(c)
    assert {name: dvc_runner.data_version_of(lock[name]) for name in versions} == versions
    assert json.loads((c / "data/teacher_images/cartoon/teacher.json").read_text())["sigma_s"] == 45


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_celery_executor_runs_a_workspace_step_on_a_worker(built, home, tmp_path):
    dagster_celery = pytest.importorskip("dagster_celery", reason="dagster-celery is not installed (no release for dagster 1.13.28 yet: docs/scale.md)")
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    a = built["root"]
    port = _free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ws = tmp_path / "workspaces"
    extra_path = str(Path(dagster_celery.__file__).parents[1])  # where the test found dagster_celery
    env = _dagster_env(a, home, ws, FXASSETS_EXECUTOR="celery", FXASSETS_CELERY_BROKER=f"redis://127.0.0.1:{port}/0")
    env["PYTHONPATH"] += f":{extra_path}"
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-b", env["FXASSETS_CELERY_BROKER"], "-A", "dagster_celery.app",
                               "worker", "-Q", "dagster", "--concurrency", "1", "--pool", "solo", "--loglevel", "INFO"],
                              cwd=a, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        run(a, sys.executable, "-m", "orchestration.remote", "push")  # prompts@cartoon is in the remote
        deadline = time.time() + 120
        while " ready." not in log.read_text():
            assert worker.poll() is None and time.time() < deadline, f"the celery worker did not start:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        proc = subprocess.run(["dagster", "asset", "materialize", "-m", "orchestration.definitions", "--select",
                               "prompts", "--partition", "cartoon"], cwd=a, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
        assert 'Submitting celery task for step "prompts"' in proc.stderr + proc.stdout
        assert "Task execute_plan" in log.read_text() and "prompts@cartoon: restored from DVC's run-cache" in log.read_text()
    finally:
        for p in (worker, redis):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
