"""Reproducible by default, through DVC on one effect of the tiny project: the outputs hold no clock (a stage forced
to run again from nothing leaves every later stage up to date), each stage run twice writes the same bytes, and
`dvc exp run -S` shows in `dvc exp show` as the changed param beside the held-out figures."""

import csv
import hashlib
import io
import json
import shutil

import pytest
import yaml

from conftest import make_project, run
from fxassets.core.paths import STAGES

pytestmark = pytest.mark.slow
E = "cartoon"
GIT = ("git", "-c", "user.name=t", "-c", "user.email=t@t.invalid")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("reproducible") / "project")
    run(root, "dvc", "repro", f"mobile_model@{E}")
    return root


def _lock(root) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def _files(root, stage: str) -> dict[str, str]:
    """sha256 of every file of the stage's outs (a folder's md5 in dvc.lock is that of its listing)."""
    out = {}
    for o in _lock(root)[f"{stage}@{E}"]["outs"]:
        p = root / o["path"]
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _changed(root) -> dict:
    return json.loads(run(root, "dvc", "status", "--json", "--with-deps", f"mobile_model@{E}").stdout or "{}")


def test_a_upstream_stages_run_again_from_nothing_leave_everything_downstream_up_to_date(project):
    """teacher_images and face_pairs forced to run again, the teacher's sample cache gone (a fresh clone): the same
    md5s in dvc.lock, nothing for DVC to run (records held each sample's seconds, summary.json the timings, the Data
    Docs the clock)."""
    before = _lock(project)
    shutil.rmtree(project / ".cache" / "fxassets" / "teacher")
    for stage in ("teacher_images", "face_pairs"):
        run(project, "dvc", "repro", "-f", "-s", f"{stage}@{E}")
    assert _lock(project) == before
    assert _changed(project) == {}


def test_b_each_stage_run_twice_writes_the_same_bytes(project):
    for stage in STAGES:
        before = _files(project, stage)
        run(project, "dvc", "repro", "-f", "-s", f"{stage}@{E}")
        assert _files(project, stage) == before, stage
    assert _changed(project) == {}


def test_c_exp_run_set_param_shows_beside_the_heldout_figures(project):
    run(project, *GIT, "add", "-A")  # the built project: its compact metrics/ are tracked by git, not ignored
    run(project, *GIT, "commit", "-qm", "built")
    run(project, "dvc", "exp", "run", "-S", "train.lr=0.008", f"mobile_model@{E}")
    table = run(project, "dvc", "exp", "show", "--only-changed", "--drop", ".*/", "--csv").stdout
    rows = list(csv.DictReader(io.StringIO(table)))
    columns = set(rows[0]) - {"Experiment", "rev", "typ", "Created"}
    assert "train.lr" in columns and {f"{E}.heldout_psnr", f"{E}.int8_psnr_db"} <= columns
    assert all(c == "train.lr" or c.startswith(f"{E}.") for c in columns), columns  # no timing, no md5 columns
    base = next(r for r in rows if r["rev"] == "main")
    exp = next(r for r in rows if r["Experiment"])
    assert (base["train.lr"], exp["train.lr"]) == ("0.012", "0.008")
    assert float(exp[f"{E}.heldout_psnr"]) != float(base[f"{E}.heldout_psnr"])  # the experiment's own figures
