"""`make run`'s driver (orchestration/build.py): the effects built side by side, one failing without stopping the other."""

import json

import pytest

from conftest import TINY_OVERRIDES, make_project, merge, run
from orchestration.build import default_jobs

pytestmark = pytest.mark.slow


def test_jobs_follow_cores_and_training_threads():
    assert default_jobs(2, threads=1, cores=2) == 2
    assert default_jobs(2, threads=2, cores=2) == 1  # two 2-thread trainings would fight over 2 cores
    assert default_jobs(5, threads=1, cores=16) == 5  # never more jobs than effects
    assert default_jobs(3, threads=4, cores=2) == 1


def test_a_failing_effect_does_not_stop_the_other(tmp_path):
    # sketch's pairs all fail the source-detection bound: its face_pairs gate fails, cartoon builds to the end
    over = merge(TINY_OVERRIDES, {"effects": {"sketch": {"quality": {"min_source_det_score": 0.999}}}})
    root = make_project(tmp_path / "project", over)
    proc = run(root, "python", "-m", "orchestration.build", "--jobs", "2", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "[cartoon] " in out and "[sketch] " in out  # each line says whose it is
    assert "failed: sketch" in proc.stderr and "cartoon (" not in proc.stderr
    assert (root / "data/mobile/cartoon/student.int8.onnx").is_file()
    assert not (root / "data/student/sketch").exists()
    status = json.loads(run(root, "dvc", "status", "--json").stdout or "{}")
    assert not any(k.endswith("@cartoon") for k in status), status  # cartoon fully built and recorded


def test_unknown_effect_is_one_line(tmp_path):
    root = make_project(tmp_path / "project")
    proc = run(root, "python", "-m", "orchestration.build", "nosuch", check=False)
    assert proc.returncode == 2 and "unknown effect 'nosuch'" in proc.stderr and proc.stderr.count("\n") == 1


def test_progress_bars_are_thinned_not_lost():
    from orchestration.build import ProgressThrottle

    now = [0.0]
    bars = ProgressThrottle(every=15, clock=lambda: now[0])
    shown = []
    for i in range(0, 101, 5):
        now[0] = i * 0.5  # 50 s in all
        line = f"train student: {i:3d}%|###| {i}/100"
        shown.append(bars.show(line))
    assert shown[0] and shown[-1]  # the first and the finished bar
    assert 3 <= sum(shown) <= 6  # one every 15 s, not 21 lines
    assert bars.show("[mobile_model] parity 48.3 dB")  # other lines always
