"""Workspace mode: each materialization in its own clean checkout, with only the DVC remote shared (no Dagster imports).

A step that runs on another machine (a celery worker, a Kubernetes pod) has neither the project's checkout nor its
DVC cache, and two steps in one checkout would fight over DVC's repo lock. So each step:

1. clones the repository at the run's pinned commit into a fresh folder under `Settings.parent`;
2. points DVC at the remote (the project's default remote, or `Settings.remote`) and at the machine's cache
   (`Settings.cache_dir`, shared by this machine's workspaces; None: the workspace's own);
3. runs `dvc repro --pull STAGE@EFFECT` with `$FXASSETS_ONLY_STAGE=STAGE@EFFECT`: the stages upstream are restored
   from the remote's run-cache and are never computed here (one missing from the remote fails the step, naming
   it); the stage itself is restored too when it was built before, else it runs;
4. pushes its outputs and run-cache (`remote.push`), then the caller reads dvc.lock and the outputs there;
5. removes the folder (kept when something failed: the error names it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestration import dvc_runner
from orchestration.dvc_runner import DvcError, ReproResult

ONLY_STAGE_ENV = "FXASSETS_ONLY_STAGE"  # fxassets.cli.main refuses to compute any other stage
CODE_ROOT = Path(__file__).resolve().parents[1]  # the orchestration/ running now (the push runs from here)
_REFUSED = re.compile(r"fxassets: error: (\S+@\S+) is not in the remote")


@dataclass(frozen=True)
class Settings:
    repo: str  # the git repository to clone: a URL, or a local path
    parent: Path  # workspaces are created here
    remote: str | None = None  # the DVC remote (None: the default remote in the commit's .dvc/config)
    cache_dir: Path | None = None  # a DVC cache shared by this machine's workspaces (None: each its own)
    local_config: Path | None = None  # a .dvc/config.local to copy in (credentials set with `--local`)
    keep: bool = False  # keep each workspace after a success too


def _git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"git {' '.join(args)} failed in {cwd or '.'}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def head_commit(root: Path) -> str:
    """HEAD of the checkout at `root`, refusing uncommitted changes to tracked files (a workspace would not see them)."""
    changed = [f for f in _git("diff", "--name-only", "HEAD", cwd=root).splitlines() if f != "dvc.lock"]
    if changed:
        raise DvcError(f"{root}: uncommitted changes to {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}: "
                       "workspace mode builds commits; commit them, or pin one with the run tag fxassets/commit")
    return _git("rev-parse", "HEAD", cwd=root)


def _configure(ws: Path, settings: Settings, commit: str) -> None:
    """The workspace's .dvc/config.local: the remote to use, the machine's cache, DVC's site cache inside the workspace."""
    from configobj import ConfigObj  # DVC's own config format

    local = ws / ".dvc" / "config.local"
    if settings.local_config and settings.local_config.is_file():
        shutil.copyfile(settings.local_config, local)
    conf, committed = ConfigObj(str(local)), ConfigObj(str(ws / ".dvc" / "config"))
    name = settings.remote or committed.get("core", {}).get("remote") or conf.get("core", {}).get("remote")
    if not name or f'remote "{name}"' not in {**committed, **conf}:
        raise DvcError(f".dvc/config at commit {commit[:12]}: no DVC remote{f' named {name!r}' if name else ''}: "
                       "workspace mode needs one (`make remote URL=s3://bucket/prefix`, then commit .dvc/config)")
    conf.setdefault("core", {}).update({"remote": name, "site_cache_dir": str(ws / ".dvc" / "tmp" / "site")})
    if settings.cache_dir:
        conf.setdefault("cache", {})["dir"] = str(settings.cache_dir)
    conf.write()


@contextlib.contextmanager
def workspace(settings: Settings, commit: str, label: str, log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """A fresh clone of `settings.repo` at `commit`, set up for the remote; removed afterwards unless something failed."""
    settings.parent.mkdir(parents=True, exist_ok=True)
    ws = Path(tempfile.mkdtemp(prefix=f"{label}-{commit[:8]}-", dir=settings.parent))
    ok = False
    try:
        _git("clone", "-q", "--no-checkout", settings.repo, str(ws))
        _git("-c", "advice.detachedHead=false", "checkout", "-q", "--detach", commit, cwd=ws)
        _configure(ws, settings, commit)
        if settings.cache_dir:
            settings.cache_dir.mkdir(parents=True, exist_ok=True)
        yield ws
        ok = True
    finally:
        if ok and not settings.keep:
            shutil.rmtree(ws, ignore_errors=True)
        elif log:
            log(f"workspace kept: {ws}")


def build(ws: Path, stage: str, effect: str, log: Callable[[str], None] | None = None) -> ReproResult:
    """Restore the inputs, run (or restore) STAGE@EFFECT, push it: in the workspace `ws`."""
    name = f"{stage}@{effect}"
    env = {ONLY_STAGE_ENV: name, "PYTHONPATH": os.pathsep.join([str(ws / "src"), str(ws)])}  # the commit's library
    try:
        result = dvc_runner.repro(ws, stage, effect, log, lock=False, pull=True, env=env)
    except DvcError as exc:
        missing = _REFUSED.search(str(exc))
        if missing:
            raise DvcError(f"{name}: its input {missing.group(1)} is not in the remote at this commit: materialize "
                           f"{missing.group(1)} first (workspace {ws})") from exc
        raise
    push = [sys.executable, "-m", "orchestration.remote", "push", "--root", str(ws), name]
    rc, output = dvc_runner.stream(push, CODE_ROOT, log, {"PYTHONPATH": str(CODE_ROOT)})
    if rc != 0:
        raise DvcError(f"{name} was built in {ws} but not pushed: {output.strip().splitlines()[-1]}")
    return result
