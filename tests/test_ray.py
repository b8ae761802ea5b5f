"""The Ray executors on a one-node Ray cluster on 127.0.0.1 (2 CPUs, 2 logical GPUs): the teacher stage on an actor
pool gives the bytes a local run gives (classical and the tiny diffusers teacher), a worker killed mid-run loses no
sample and computes none twice, bad input fails in one line before anything is sent, and DDP training on 2 gloo
workers lands near one worker's figures."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from fxassets.core.config import Params  # noqa: E402
from fxassets.core.paths import EffectPaths  # noqa: E402
from fxassets.stages import run_stage  # noqa: E402
from fxassets.teachers.ray_pool import TEST_DIR_ENV, Budget, ExecutorError  # noqa: E402

from test_teachers import TINY, project  # noqa: E402


def with_executor(params: Params, teacher: dict | None = None, **executor) -> Params:
    raw = params.model_dump(mode="json")
    raw["teacher"] = {**(teacher or raw["teacher"]), "executor": {"kind": "ray", **executor}}
    return Params.model_validate(raw)


def out_md5s(root: Path) -> dict[str, str]:
    d = EffectPaths(root, "fx").teacher_dir
    return {p.relative_to(d).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _own_cache(monkeypatch):
    monkeypatch.delenv("FXASSETS_CACHE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


# -- before any cluster: an address with nothing behind it -----------------------------------------------------


def test_unreachable_address_fails_in_one_line_naming_the_key(tmp_path):
    assert not ray.is_initialized()
    root, params = project(tmp_path, n=1)
    run_stage("prompts", params, "fx", root, progress=False)
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1", "auto"):  # auto: no cluster runs on this machine
        with pytest.raises(ExecutorError, match=r"^teacher\.executor\.address: cannot reach a Ray cluster at") as exc:
            run_stage("teacher_images", with_executor(params, address=address), "fx", root, progress=False)
        assert "\n" not in str(exc.value)
    assert not EffectPaths(root, "fx").teacher_dir.exists() and not ray.is_initialized()


# -- on a local cluster ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, address="local", _node_ip_address="127.0.0.1")
    yield ray.cluster_resources()
    ray.shutdown()


def test_classical_on_ray_gives_the_local_bytes_and_reuses_the_cache(tmp_path, cluster):
    root, params = project(tmp_path, n=5)
    run_stage("prompts", params, "fx", root, progress=False)
    run_stage("teacher_images", params, "fx", root, progress=False)
    local = out_md5s(root)
    shutil.rmtree(root / ".cache")
    s = run_stage("teacher_images", with_executor(params, workers=2, batch_size=1), "fx", root, progress=False)
    assert out_md5s(root) == local and s["computed"] == 5
    assert s["ray"]["workers"] == 2 and sum(s["ray"]["samples_per_worker"].values()) == 5
    again = run_stage("teacher_images", with_executor(params, workers=2), "fx", root, progress=False)
    assert again["computed"] == 0 and again["cached"] == 5 and "ray" not in again and out_md5s(root) == local


def test_tiny_diffusers_teacher_on_ray_matches_local(tmp_path, cluster):
    from fxassets.teachers.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "models" / "tiny-sd")
    teacher = {"kind": "img2img", "model": str(model), "strength": 0.5, "batch_size": 2, **TINY}
    root, params = project(tmp_path, n=3, px=40, teacher=teacher)
    run_stage("prompts", params, "fx", root, progress=False)
    run_stage("teacher_images", params, "fx", root, progress=False)
    local = out_md5s(root)
    shutil.rmtree(root / ".cache")
    s = run_stage("teacher_images", with_executor(params, workers=2, gpus_per_worker=1), "fx", root, progress=False)
    assert out_md5s(root) == local and s["ok"] == 3
    # the GPUs are logical here: each actor was given one (its ids recorded as the run's runtime), torch ran on the CPU
    assert len(s["runtime"]["gpu_ids"]) == 1 and s["runtime"]["device"] == "cpu"


def test_a_killed_worker_loses_no_sample_and_computes_none_twice(tmp_path, cluster, monkeypatch):
    root, params = project(tmp_path, n=6)
    run_stage("prompts", params, "fx", root, progress=False)
    run_stage("teacher_images", params, "fx", root, progress=False)
    local = out_md5s(root)
    shutil.rmtree(root / ".cache")
    calls = tmp_path / "calls"
    calls.mkdir()
    monkeypatch.setenv(TEST_DIR_ENV, str(calls))  # the first actor to take a batch dies (os._exit) before editing it
    s = run_stage("teacher_images", with_executor(params, workers=2, batch_size=1), "fx", root, progress=False)
    assert (calls / "died").is_file()
    edited = sorted(p.name.split(".")[0] for p in calls.iterdir() if p.name != "died")
    assert edited == sorted(f.stem for f in (root / "faces").iterdir())  # every sample edited exactly once
    assert s["ray"]["replaced"] == 1 and s["ray"]["batches_sent_again"] >= 1
    assert out_md5s(root) == local and len(list((root / ".cache" / "fxassets" / "teacher").glob("*.json"))) == 6


def test_missing_gpus_or_cpus_fail_before_dispatch(tmp_path, cluster):
    root, params = project(tmp_path, n=2)
    run_stage("prompts", params, "fx", root, progress=False)
    with pytest.raises(ExecutorError, match=r"^teacher\.executor\.gpus_per_worker: 2 workers x 2 GPUs = 4 GPUs requested, .* has 2"):
        run_stage("teacher_images", with_executor(params, workers=2, gpus_per_worker=2), "fx", root, progress=False)
    with pytest.raises(ExecutorError, match=r"^teacher\.executor\.cpus_per_worker: 3 workers x 1 CPUs"):
        run_stage("teacher_images", with_executor(params, workers=3), "fx", root, progress=False)
    assert not EffectPaths(root, "fx").teacher_dir.exists()
    assert not list((root / ".cache" / "fxassets" / "teacher").glob("*.json"))


def test_the_driver_budget_never_lets_reservations_cross_max_cost():
    b = Budget(price=0.5, max_cost=2.0)
    assert b.affordable(3) == 3
    b.reserve(3)
    assert b.affordable(3) == 1  # 1.5 reserved: one more fits
    b.reserve(1)
    assert b.affordable(1) == 0
    b.settle(1.5, 1.0)  # a batch back: two of its three images billed, one refused
    assert b.spent == 1.0 and b.affordable(5) == 1
    assert Budget().affordable(7) == 7  # a free teacher: no bound
