"""Running a stage through DVC, and reading what DVC recorded (no Dagster imports here).

* `repro` runs `dvc --wait-for-lock repro --single-item STAGE@EFFECT`, so DVC's run-cache, `dvc.lock` and cache
  apply exactly as under `dvc repro`. It first takes a per-effect file lock: DVC fails ("... is busy") when two
  processes work on the same effect's outputs at once, and two effects may run in parallel. With `pull=True` (a
  fresh workspace, `workspace.py`) it runs `dvc repro --pull STAGE@EFFECT`: the stages upstream are restored from
  the remote's run-cache, and so is the stage itself when it was built before.
* `lock_entry` reads `dvc.lock` while holding DVC's own repo lock (DVC rewrites the file in place).
* `data_version` is the md5 DVC recorded for the stage's outs (one out: its md5; several: a hash of them).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RAN, RESTORED, UP_TO_DATE = "ran", "restored from DVC's run-cache", "up to date (DVC skipped it)"


class DvcError(RuntimeError):
    pass


def dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # the venv's `dvc` and `fxassets`
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    env.setdefault("TQDM_DISABLE", "1")  # no progress bars in captured logs
    return env


@contextlib.contextmanager
def partition_lock(root: Path, effect: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive lock per effect across processes (released by the OS if the holder dies)."""
    lock_dir = root / ".dvc" / "tmp" / "fxassets"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"effect-{effect}.lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait(f"effect {effect!r} is being built by another run; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class ReproResult:
    stage: str
    outcome: str  # RAN | RESTORED | UP_TO_DATE
    seconds: float
    output: str


def stream(cmd: list[str], cwd: Path, log: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command, passing each line of its output to `log`; (exit code, the output)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env={**dvc_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if log and line.strip():
            log(line.rstrip())
    return proc.wait(), "\n".join(lines)


def repro(root: Path, stage: str, effect: str, log: Callable[[str], None] | None = None, lock: bool = True,
          pull: bool = False, env: dict[str, str] | None = None) -> ReproResult:
    """`dvc --wait-for-lock repro --single-item STAGE@EFFECT` (`pull`: `repro --pull STAGE@EFFECT`); raises DvcError
    with DVC's output on failure.

    `lock=False` when the caller already holds `partition_lock(root, effect)` (a flock is not re-entrant)."""
    name = f"{stage}@{effect}"
    cmd = ["dvc", "--wait-for-lock", "repro", *(["--pull", name] if pull else ["--single-item", name])]
    with partition_lock(root, effect, on_wait=log) if lock else contextlib.nullcontext():
        t0 = time.perf_counter()
        rc, output = stream(cmd, root, log, env)
        seconds = time.perf_counter() - t0
    if rc != 0:
        raise DvcError(f"{' '.join(cmd)} exited {rc}:\n{output[-6000:]}")
    if f"Stage '{name}' is cached - skipping run" in output:
        outcome = RESTORED
    elif f"Running stage '{name}'" in output:
        outcome = RAN
    else:
        outcome = UP_TO_DATE
    return ReproResult(name, outcome, seconds, output)


def read_lock(root: Path) -> dict[str, Any]:
    """dvc.lock's `stages`, read under DVC's repo lock so a concurrent `dvc repro` never shows a half-written file."""
    from dvc.lock import Lock  # the lock DVC itself takes (.dvc/tmp/lock)

    path = root / "dvc.lock"
    lock = Lock(str(root / ".dvc" / "tmp" / "lock"), wait=True)
    with lock:
        if not path.is_file():
            return {}
        text = path.read_text()
    return (yaml.safe_load(text) or {}).get("stages") or {}


def outs_md5(entry: dict[str, Any]) -> dict[str, str]:
    return {o["path"]: o.get("md5") or o.get("etag") or "" for o in entry.get("outs") or []}


def data_version_of(entry: dict[str, Any]) -> str | None:
    """The stage's data version: DVC's md5 of its single out, or a hash of all of them (sorted by path)."""
    md5s = outs_md5(entry)
    if not md5s or not all(md5s.values()):
        return None
    if len(md5s) == 1:
        return next(iter(md5s.values()))
    blob = "\n".join(f"{p} {m}" for p, m in sorted(md5s.items()))
    return hashlib.md5(blob.encode()).hexdigest() + ".outs"


def lock_entry(root: Path, stage: str, effect: str) -> dict[str, Any]:
    entry = read_lock(root).get(f"{stage}@{effect}")
    if not entry:
        raise DvcError(f"dvc.lock has no entry for {stage}@{effect}")
    return entry


def status(root: Path) -> dict[str, Any]:
    """`dvc status --json`: the stages DVC would run, with why (a clean stage is absent)."""
    cmd = ["dvc", "--wait-for-lock", "status", "--json"]
    proc = subprocess.run(cmd, cwd=root, env=dvc_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    out = proc.stdout.strip()
    return json.loads(out[out.index("{"):]) if "{" in out else {}


def busy(root: Path) -> bool:
    """True while a DVC command is building a stage here (DVC's rwlock lists the paths it reads and writes)."""
    try:
        lock = json.loads((root / ".dvc" / "tmp" / "rwlock").read_text() or "{}")
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(lock.get("read") or lock.get("write"))
