"""What sharing a build through a DVC remote costs: push, a restore on a fresh machine, Dagster's workspace mode.

    python benchmarks/bench_remote.py [--outputs-from CHECKOUT] [--repeats 3] [--json]

The remote is moto's S3 server on 127.0.0.1, in this process (so its CPU counts against the figures; a real S3 is
further away and has more bandwidth). The build is the tiny test project built here (5 faces per effect, a few
training steps), or, with `--outputs-from`, the outputs of a build already made in another checkout (its data/
copied and recorded with `dvc commit -f`: the default build's sizes without training it here).

* push:    `python -m orchestration.remote push` (what `make push` runs) of the whole build, then once more with
           nothing new; bytes and objects in the bucket;
* restore: a fresh clone with an empty cache of its own: `dvc repro --pull` computing nothing (what `make pull`
           runs), every stage restored;
* workspace mode (tiny project): one materialization of `teacher_images` in-process, in local mode and in
           workspace mode, when the stage is up to date / restored and when it must run (a new teacher setting).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]
from bench_dagster import _conftest, _timed  # noqa: E402

EFFECTS = ("cartoon", "sketch")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # no Dagster event lines between the figures
OUTPUT_DIRS = ("prompts", "teacher_images", "face_pairs", "student", "mobile")


def _git_commit(root: Path, message: str) -> str:
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b.invalid", "commit", "-qam", message], cwd=root, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def make_build(ct, dest: Path, outputs_from: Path | None) -> Path:
    if outputs_from is None:
        tiny = ct.merge(ct.TINY_OVERRIDES, {"effects": {e: {"train": {}} for e in EFFECTS}})
        root = ct.make_project(dest, tiny)
        ct.run(root, "dvc", "repro")
        return root
    root = ct.make_project(dest, {"effects": {e: {"train": {}} for e in EFFECTS}})  # the default params
    for d in OUTPUT_DIRS:
        shutil.copytree(outputs_from / "data" / d, root / "data" / d)
    ct.run(root, "dvc", "commit", "-f")  # records them (and their run-cache entries) as these stages' outputs
    return root


def bench_remote(ct, s3, root: Path, workdir: Path, prefix: str) -> dict:
    ct.run(root, "dvc", "remote", "add", "-f", "-d", "storage", f"s3://fxassets-test/{prefix}")
    ct.run(root, "dvc", "remote", "modify", "storage", "endpointurl", s3.url)
    _git_commit(root, "the remote")
    push = [sys.executable, "-m", "orchestration.remote", "push"]
    push_s = _timed(lambda: ct.run(root, *push))
    objects = s3.objects(f"{prefix}/")
    again_s = _timed(lambda: ct.run(root, *push))
    fresh = workdir / f"fresh-{prefix}"
    env = {**ct.project_env(root), "FXASSETS_ONLY_STAGE": "none"}

    def restore():
        subprocess.run(["git", "clone", "-q", str(root), str(fresh)], check=True)
        proc = subprocess.run(["dvc", "repro", "--pull"], cwd=fresh, env={**env, "PYTHONPATH": f"{fresh / 'src'}:{fresh}"},
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "Running stage" not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]

    restore_s = _timed(restore)
    cache = sum(p.stat().st_size for p in (fresh / ".dvc" / "cache").rglob("*") if p.is_file())
    return {
        "push_s": round(push_s, 2), "push_bytes": sum(objects.values()), "push_objects": len(objects),
        "run_cache_entries": sum(1 for k in objects if f"{prefix}/runs/" in k),
        "push_again_nothing_new_s": round(again_s, 2),
        "restore_fresh_clone_s": round(restore_s, 2), "restored_cache_bytes": cache,
    }


def bench_modes(ct, root: Path, workdir: Path, repeats: int, effect: str) -> dict:
    import yaml
    from dagster import DagsterInstance, StaticPartitionsDefinition, materialize

    from orchestration import dvc_runner
    from orchestration.assets import build_stage_assets
    from orchestration.project import Project
    from orchestration.resources import DvcProject, QualityGates

    home = workdir / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    instance = DagsterInstance.from_config(str(home))
    sigma = iter(range(70, 1000))

    def once(mode: str, new_teacher: bool) -> dict:
        if new_teacher:  # a setting never seen: the stage must run, in either mode
            params = yaml.safe_load((root / "params.yaml").read_text())
            params["teacher"]["sigma_s"] = next(sigma)
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            _git_commit(root, "teacher")
        assets = build_stage_assets(Project.load(root), StaticPartitionsDefinition(list(EFFECTS)))
        dvc = DvcProject(root=str(root), mode=mode, workspaces=str(workdir / "ws"))
        t0 = time.perf_counter()
        res = materialize(assets, selection=["teacher_images"], partition_key=effect, instance=instance,
                          resources={"dvc": dvc, "gates": QualityGates()}, run_config=QUIET)
        md = res.asset_materializations_for_node("teacher_images")[-1].metadata
        return {"s": time.perf_counter() - t0, "outcome": md["dvc_outcome"].value}

    out, med = {}, statistics.median
    for mode in ("local", "workspace"):
        ran = [once(mode, True) for _ in range(repeats)]
        assert all(r["outcome"] == dvc_runner.RAN for r in ran), ran
        again = [once(mode, False) for _ in range(repeats)]  # local: up to date; workspace: restored from the remote
        out[f"{mode}_must_run_s"] = round(med(r["s"] for r in ran), 2)
        out[f"{mode}_nothing_to_do_s"] = round(med(r["s"] for r in again), 2)
        out[f"{mode}_nothing_to_do_outcome"] = again[-1]["outcome"]
    instance.dispose()
    out["workspace_overhead_must_run_s"] = round(out["workspace_must_run_s"] - out["local_must_run_s"], 2)
    out["workspace_overhead_nothing_to_do_s"] = round(out["workspace_nothing_to_do_s"] - out["local_nothing_to_do_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outputs-from", type=Path, help="a checkout whose data/ holds a whole build (e.g. the default one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--effect", default="cartoon")
    ap.add_argument("--skip-modes", action="store_true", help="only push and restore")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.update(DVC_NO_ANALYTICS="1", TQDM_DISABLE="1")
    import s3_server

    from fxassets.core.machine import cpu_label

    ct, s3 = _conftest(), s3_server.start()
    workdir = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    res: dict = {"cpu": cpu_label(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        root = make_build(ct, workdir / "build", args.outputs_from)
        res["build"] = f"outputs of {args.outputs_from} (default params)" if args.outputs_from else "tiny test project"
        res.update(bench_remote(ct, s3, root, workdir, "build"))
        if not args.skip_modes:
            tiny = root if args.outputs_from is None else make_build(ct, workdir / "tiny", None)
            if args.outputs_from is not None:
                bench_remote(ct, s3, tiny, workdir, "tiny")
            res.update(bench_modes(ct, tiny, workdir, args.repeats, args.effect))
    finally:
        s3.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(res, indent=2) if args.json else "\n".join(f"{k:36} {v}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
