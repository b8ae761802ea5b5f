"""The Ray executors on a one-node Ray cluster on 127.0.0.1 (2 CPUs, 2 logical GPUs): the teacher stage on an actor
pool gives the bytes a local run gives (classical and the tiny diffusers teacher), a worker killed mid-run loses no
sample and computes none twice, bad input fails in one line before anything is sent, and DDP training on 2 gloo
workers lands near one worker's figures."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from fxassets.core.config import Params  # noqa: E402
from fxassets.core.paths import EffectPaths  # noqa: E402
from fxassets.stages import run_stage  # noqa: E402
from fxassets.core.ray_cluster import ExecutorError  # noqa: E402
from fxassets.teachers.ray_pool import TEST_DIR_ENV, Budget  # noqa: E402

from conftest import kill_at_first_checkpoint  # noqa: E402
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

    from fxassets.train.loop import train_student
    from test_student import make_pairs, tiny_cfg

    pairs = make_pairs(tmp_path / "pairs", n_train=2, n_held=1)
    with pytest.raises(ExecutorError, match=r"^train\.ray_address: cannot reach a Ray cluster at '127.0.0.1:1'"):
        train_student(pairs, tiny_cfg(workers=2, ray_address="127.0.0.1:1"), tmp_path / "s.safetensors",
                      tmp_path / "m.json", tmp_path / "c.csv", progress=False)
    assert not (tmp_path / "s.safetensors").exists()


# -- on a local cluster ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    from test_api_teachers import TOKEN

    # the API teachers' workers read their credentials from their environment (a real cluster: its own secrets)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, address="local", _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"GOOGLE_OAUTH_ACCESS_TOKEN": TOKEN}})
    yield ray.cluster_resources()
    ray.shutdown()


def local_then_ray(root: Path, params: Params, **executor) -> tuple[dict[str, str], dict]:
    """teacher_images run locally (its outputs' md5s), then, its cache cleared, on the Ray pool (its summary)."""
    run_stage("prompts", params, "fx", root, progress=False)
    run_stage("teacher_images", params, "fx", root, progress=False)
    local = out_md5s(root)
    shutil.rmtree(root / ".cache")
    return local, run_stage("teacher_images", with_executor(params, **executor), "fx", root, progress=False)


def test_classical_on_ray_gives_the_local_bytes_and_reuses_the_cache(tmp_path, cluster):
    root, params = project(tmp_path, n=5)
    local, s = local_then_ray(root, params, workers=2, batch_size=1)
    assert out_md5s(root) == local and s["computed"] == 5
    assert s["ray"]["workers"] == 2 and sum(s["ray"]["samples_per_worker"].values()) == 5
    again = run_stage("teacher_images", with_executor(params, workers=2), "fx", root, progress=False)
    assert again["computed"] == 0 and again["cached"] == 5 and "ray" not in again and out_md5s(root) == local


def test_tiny_diffusers_teacher_on_ray_matches_local(tmp_path, cluster):
    from fxassets.teachers.tiny import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "models" / "tiny-sd")
    teacher = {"kind": "img2img", "model": str(model), "strength": 0.5, "batch_size": 2, **TINY}
    root, params = project(tmp_path, n=3, px=40, teacher=teacher)
    local, s = local_then_ray(root, params, workers=2, gpus_per_worker=1)
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


def test_the_stage_command_logs_the_pool_as_dagster_streams_it(tmp_path, cluster):
    """What a Dagster asset runs (through `dvc repro`): `fxassets stage teacher_images`, its output streamed line by
    line into the run's log (`orchestration.dvc_runner.stream`, progress bars off as there); the params name the
    cluster (this one, by its host:port)."""
    import sys

    import yaml

    from orchestration.dvc_runner import stream

    root, params = project(tmp_path, n=3)
    raw = with_executor(params, address=ray.get_runtime_context().gcs_address, workers=2).model_dump(mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    run_stage("prompts", params, "fx", root, progress=False)
    lines: list[str] = []
    cmd = [sys.executable, "-m", "fxassets.cli.main", "stage", "teacher_images", "--effect", "fx"]
    rc, out = stream(cmd, root, lines.append, env={"PYTHONPATH": os.pathsep.join(sys.path)})
    assert rc == 0, out[-3000:]
    said = [line for line in lines if "teacher_images [ray]:" in line]
    assert any("3 samples in" in line and "on 2 workers" in line for line in said), lines
    assert any("3 samples on 2 workers (0 replaced)" in line for line in said), lines


def test_missing_gpus_or_cpus_fail_before_dispatch(tmp_path, cluster):
    root, params = project(tmp_path, n=2)
    run_stage("prompts", params, "fx", root, progress=False)
    with pytest.raises(ExecutorError, match=r"^teacher\.executor\.gpus_per_worker: 2 workers x 2 GPUs = 4 GPUs requested, .* has 2"):
        run_stage("teacher_images", with_executor(params, workers=2, gpus_per_worker=2), "fx", root, progress=False)
    with pytest.raises(ExecutorError, match=r"^teacher\.executor\.cpus_per_worker: 3 workers x 1 CPUs"):
        run_stage("teacher_images", with_executor(params, workers=3), "fx", root, progress=False)
    assert not EffectPaths(root, "fx").teacher_dir.exists()
    assert not list((root / ".cache" / "fxassets" / "teacher").glob("*.json"))


def test_an_api_teacher_on_two_workers_pays_once_per_sample_and_keeps_the_bound(tmp_path, cluster, monkeypatch):
    from test_api_teachers import TOKEN, FakeApis, gemini

    from fxassets.teachers.api.client import BudgetExceeded

    monkeypatch.setenv("GOOGLE_OAUTH_ACCESS_TOKEN", TOKEN)
    api = FakeApis()
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        root, params = project(tmp_path / "a", n=4, teacher=gemini(api.url, price_per_image=0.5, max_cost=5.0))
        run_stage("prompts", params, "fx", root, progress=False)
        s = run_stage("teacher_images", with_executor(params, workers=2, batch_size=1), "fx", root, progress=False)
        assert s["ok"] == 4 and sorted(api.answered.values()) == [1, 1, 1, 1] and s["ray"]["spent_usd"] == 2.0
        # every request times out (and may have been billed: counted as spent) and is retried: the run stops at the
        # bound across both workers, 1.5 USD = 3 requests, where two workers with a bound each would send 6
        api.requests.clear()
        api.delay = 0.6
        slow = gemini(api.url, price_per_image=0.5, max_cost=1.5, timeout=0.3, max_retries=5)
        root, params = project(tmp_path / "b", n=3, teacher=slow)
        run_stage("prompts", params, "fx", root, progress=False)
        with pytest.raises(BudgetExceeded, match=r"teacher.max_cost 1.50 USD: spent 1.50 USD across 2 Ray workers"):
            run_stage("teacher_images", with_executor(params, workers=2, batch_size=1), "fx", root, progress=False)
        assert len(api.requests) == 3 and not EffectPaths(root, "fx").teacher_dir.exists()
    finally:
        api.close()


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


# -- training: DDP on 2 gloo workers ---------------------------------------------------------------------------

DDP_RUN = """
import sys
import torch
from pathlib import Path
from fxassets.core.config import TrainConfig
from fxassets.train.loop import train_student
pairs, out, state, cfg = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), TrainConfig.model_validate_json(sys.argv[4])
torch.set_num_threads(1)
train_student(pairs, cfg, out / "student.safetensors", out / "metrics.json", out / "curve.csv", progress=False, state_dir=state)
"""


def test_ddp_on_two_workers_resumes_after_a_kill_and_lands_near_one_worker(tmp_path, cluster):
    import os
    import subprocess
    import sys

    import torch

    from fxassets.train.loop import train_student
    from test_student import make_pairs, tiny_cfg

    pairs = make_pairs(tmp_path / "pairs", n_train=6, n_held=2)

    def train(name: str, cfg, state: Path | None = None) -> dict:
        out = tmp_path / name
        return train_student(pairs, cfg, out / "student.safetensors", out / "metrics.json", out / "curve.csv",
                             progress=False, state_dir=state)

    cfg1 = tiny_cfg(steps=12, eval_every=6, checkpoint_every=3)
    before = torch.get_num_threads()
    one = train("one", cfg1.model_copy(update={"threads": 1}))
    torch.set_num_threads(before)

    # 2 workers, the global batch of 4 split 2 + 2; the first run (its own driver, joining this cluster at its
    # host:port) is SIGKILLed once rank 0 wrote a checkpoint, the second resumes from it
    address = ray.get_runtime_context().gcs_address
    cfg2 = cfg1.model_copy(update={"workers": 2, "ray_address": address})
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", DDP_RUN, str(pairs), str(tmp_path / "two"), str(state),
                             cfg2.model_dump_json()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    kill_at_first_checkpoint(proc, state, 400, proc.stdout)  # Ray Train starts in ~20 s on an idle machine
    assert not (tmp_path / "two" / "student.safetensors").exists()

    two = train("two", cfg2.model_copy(update={"ray_address": "auto"}), state)  # auto: the runtime this process joined
    assert 3 <= two["resumed_from_step"] < 12 and two["steps"] == one["steps"] == 12
    assert not state.exists()  # checkpoints, Ray Train's folder and the result file: all gone once the run is done
    assert abs(two["heldout_psnr"] - one["heldout_psnr"]) < 2.0, (one, two)
    c1, c2 = ((tmp_path / n / "curve.csv").read_text().splitlines()[1:] for n in ("one", "two"))
    loss1, loss2 = (float(r.split(",")[1]) for r in (c1[-1], c2[-1]))
    assert abs(loss1 - loss2) < 0.15 * loss1  # the same schedule on the same batches: the training losses agree


def test_ddp_refuses_what_it_cannot_split_or_place(tmp_path, cluster):
    from fxassets.train.distributed import check
    from fxassets.train.loop import train_student
    from test_student import make_pairs, tiny_cfg

    for kw, key in (({"batch_size": 1}, "train.batch_size"), ({"max_seconds": 5}, "train.max_seconds"),
                    ({"gan_weight": 0.1}, "train.gan_weight")):
        with pytest.raises(ValueError, match=rf"^{key}"):
            check(tiny_cfg(workers=2, **kw))
    pairs = make_pairs(tmp_path / "pairs", n_train=2, n_held=1)
    for kw, msg in (({"gpus_per_worker": 2}, r"^train\.gpus_per_worker: 2 workers x 2 GPUs = 4 GPUs requested"),
                    ({"workers": 3, "batch_size": 3}, r"^train\.workers: 3 workers x 1 CPUs = 3 CPUs requested")):
        with pytest.raises(ExecutorError, match=msg):
            train_student(pairs, tiny_cfg(**{"workers": 2, **kw}), tmp_path / "s.safetensors", tmp_path / "m.json",
                          tmp_path / "c.csv", progress=False)
