"""What driving the stages from Dagster costs on top of DVC, on a tiny copy of the project.

    python benchmarks/bench_dagster.py [--repeats 3] [--json]

Measured on the `teacher_images` stage of one effect (5 faces, a fraction of a second of work: the fixed costs show):
* stage:   `fxassets stage teacher_images --effect E` alone (the stage's own time, Python start-up included);
* dvc:     `dvc repro --single-item teacher_images@E` when the stage must run (a new teacher setting each time);
* dagster: one in-process materialization of `teacher_images` (partition E) when the stage must run; its
           overhead is its wall time minus the DVC call inside it;
* no-op:   rematerializing the up-to-date asset (DVC skips the stage), in-process and with the CLI
           (`dagster asset materialize`, Python and Dagster start-up included), and `dvc repro` alone;
* load:    building the definitions in-process; `orchestration.sync` with nothing to record.
"""

import argparse
import importlib.util
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
sys.path.insert(0, str(REPO))


def _conftest():
    spec = importlib.util.spec_from_file_location("fx_conftest", REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _set_sigma(root: Path, value: float) -> None:
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teacher"]["sigma_s"] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def bench(repeats: int, effect: str, workdir: Path) -> dict:
    os.environ["DVC_NO_ANALYTICS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    home = workdir / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy(REPO / "orchestration" / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)

    from dagster import AssetKey, DagsterInstance

    from orchestration import dvc_runner
    from orchestration.definitions import build_defs
    from orchestration.project import Project
    from orchestration.sync import sync

    ct = _conftest()
    root = ct.make_project(workdir / "project", ct.TINY_OVERRIDES)
    env = {**ct.project_env(root), "DAGSTER_HOME": str(home), "TQDM_DISABLE": "1"}
    subprocess.run(["dagster", "instance", "migrate"], cwd=root, env=env, check=True, capture_output=True)
    instance = DagsterInstance.from_config(str(home))
    stage = "teacher_images"
    dvc_runner.repro(root, "prompts", effect)

    def materialize() -> dict:
        defs = build_defs(root)
        job = defs.resolve_job_def("build_effect").get_subset(asset_selection={AssetKey(stage)})
        t0 = time.perf_counter()
        res = job.execute_in_process(partition_key=effect, instance=instance)
        total = time.perf_counter() - t0
        md = res.asset_materializations_for_node(stage)[-1].metadata
        return {"total": total, "dvc": md["dvc_seconds"].value, "outcome": md["dvc_outcome"].value}

    load = [_timed(lambda: build_defs(root)) for _ in range(repeats)]
    stage_own = [_timed(lambda: subprocess.run(["fxassets", "stage", stage, "--effect", effect], cwd=root, env=env,
                                               check=True, capture_output=True)) for _ in range(repeats)]
    dvc_run = []
    for i in range(repeats):
        _set_sigma(root, 70 + i)  # a setting never seen: DVC must run the stage (no run-cache hit)
        r = dvc_runner.repro(root, stage, effect)
        assert r.outcome == dvc_runner.RAN, r.output
        dvc_run.append(r.seconds)
    dag_run = []
    for i in range(repeats):
        _set_sigma(root, 80 + i)
        m = materialize()
        assert m["outcome"] == dvc_runner.RAN, m
        dag_run.append(m)
    noop = [materialize() for _ in range(repeats)]
    assert all(m["outcome"] == dvc_runner.UP_TO_DATE for m in noop), noop
    dvc_noop = [dvc_runner.repro(root, stage, effect).seconds for _ in range(repeats)]
    cli = subprocess.run(["dagster", "asset", "materialize", "-m", "orchestration.definitions", "--select", stage,
                          "--partition", effect], cwd=root, env=env, capture_output=True, text=True)
    t0 = time.perf_counter()
    cli = subprocess.run(["dagster", "asset", "materialize", "-m", "orchestration.definitions", "--select", stage,
                          "--partition", effect], cwd=root, env=env, capture_output=True, text=True)
    cli_noop = time.perf_counter() - t0
    assert cli.returncode == 0, cli.stderr[-3000:]
    sync_noop = _timed(lambda: sync(Project.load(root), instance))
    instance.dispose()

    med = statistics.median
    return {
        "stage": f"{stage}@{effect}",
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "definitions_load_s": round(med(load), 3),
        "stage_own_s": round(med(stage_own), 3),
        "dvc_repro_running_s": round(med(dvc_run), 3),
        "dvc_overhead_s": round(med(dvc_run) - med(stage_own), 3),
        "dagster_materialize_running_s": round(med(m["total"] for m in dag_run), 3),
        "dagster_overhead_s": round(med(m["total"] - m["dvc"] for m in dag_run), 3),
        "dagster_noop_in_process_s": round(med(m["total"] for m in noop), 3),
        "dvc_noop_s": round(med(dvc_noop), 3),
        "dagster_noop_cli_s": round(cli_noop, 3),
        "sync_noop_s": round(sync_noop, 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--effect", default="cartoon")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_dagster_"))
    try:
        res = bench(args.repeats, args.effect, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
