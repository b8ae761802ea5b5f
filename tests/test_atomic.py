"""Atomic writes under faults: a killed writer's leftovers are cleaned, modes follow the umask, a full disk leaves
nothing half-written and names the path."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fxassets.core import atomic

REPO = Path(__file__).resolve().parents[1]

KILLED_WRITER = r"""
import os, signal, sys
from fxassets.core.atomic import atomic_dir, write_text
with atomic_dir(sys.argv[1]) as tmp:
    write_text(tmp / "manifest.parquet", "half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_killed_writers_temp_folder_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "data" / "face_pairs" / "fx"
    env = {**os.environ, "PYTHONPATH": str(Path(atomic.__file__).parents[2])}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr
    (left,) = out.parent.iterdir()
    assert left.name.startswith(".fx.") and left.name.endswith(".tmp") and (left / "manifest.parquet").is_file()
    legacy = out.parent / ".sketch.k2j_x9q1.tmp"  # tempfile's name, from before the pid was in it
    legacy.mkdir()
    alive = out.parent / f".cartoon.{os.getpid()}-0123abcd.tmp"  # a writer still running: kept
    alive.mkdir()
    with atomic.atomic_dir(out) as tmp:
        (tmp / "manifest.parquet").write_text("whole")
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["fx", alive.name])
    assert (out / "manifest.parquet").read_text() == "whole"


def test_files_and_folders_get_the_umask_modes(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "gate.json", {"passed": True})
        with atomic.atomic_dir(tmp_path / "out") as tmp:
            atomic.write_text(tmp / "summary.json", "{}")
        with atomic.atomic_path(tmp_path / "manifest.parquet") as p:
            p.write_bytes(b"x")
        os.umask(0o007)
        atomic.write_text(tmp_path / "team.txt", "x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "gate.json") == _mode(tmp_path / "manifest.parquet") == 0o644
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "summary.json") == 0o644
    assert _mode(tmp_path / "team.txt") == 0o660


def test_a_full_disk_names_the_path_and_leaves_the_old_output(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic.write_text(target, "old")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_text("old")

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        atomic.write_text(target, "new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    with pytest.raises(OSError) as e:
        with atomic.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.png").write_bytes(b"new")
    assert e.value.filename == str(tmp_path / "out")
    monkeypatch.undo()
    assert target.read_text() == "old" and (tmp_path / "out" / "a.png").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.json"]  # nothing half-written beside them


def test_a_read_only_data_folder_is_one_line_naming_the_output(tmp_path, monkeypatch, capsys):
    from fxassets.cli.main import main

    def read_only(self, *a, **k):
        if not self.is_dir():  # an existing folder is fine (exist_ok)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    (tmp_path / "faces").mkdir()
    shutil.copy(REPO / "data" / "samples" / "faces" / "faces_000.jpg", tmp_path / "faces")
    (tmp_path / "params.yaml").write_text('{faces: {source: faces}, effects: {fx: {prompt: a cartoon}}}')
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["stage", "prompts", "--effect", "fx"]) == 2
    assert capsys.readouterr().err == "fxassets: error: data/prompts/fx: Read-only file system\n"  # not the temp name
