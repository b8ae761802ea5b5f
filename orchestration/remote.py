"""Sharing a build through a DVC remote (no Dagster imports here).

    python -m orchestration.remote push [-r NAME] [STAGE@EFFECT ...]   # what `make push` runs after a build

`push` is `dvc push --run-cache` and one thing more: the outputs a stage keeps out of DVC's cache (`cache: false`
metrics and plots). DVC's run-cache records them and restores them, but `dvc push` uploads only cached outputs, so
on another machine the stage would run again for want of its metrics file (dvc issue 5749). Here their objects
(which the run-cache put in the local cache) are pushed too; `dvc repro --pull` on a fresh clone then restores
every stage without running one.

A push that fails (the remote down, no credentials) loses nothing: the outputs stay in the local cache and the next
push sends what is missing. The error is one line naming the remote.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path


class RemoteError(RuntimeError):
    pass


@dataclass
class PushReport:
    remote: str
    pushed: int  # objects and run-cache entries DVC sent
    uncached: int  # of them, objects of `cache: false` outputs

    def line(self) -> str:
        return f"pushed {self.pushed} files to {self.remote} ({self.uncached} of them `cache: false` outputs)"


def remote_url(repo, name: str | None) -> str:
    """'NAME (URL)' of the remote a command would use; RemoteError naming the fix when there is none."""
    name = name or repo.config["core"].get("remote")
    remotes = repo.config.get("remote", {})
    if not name or name not in remotes:
        raise RemoteError(f"{Path(repo.root_dir) / '.dvc' / 'config'}: no DVC remote"
                          f"{f' named {name!r}' if name else ''}: add one with `make remote URL=s3://bucket/prefix`")
    return f"{name} ({remotes[name].get('url', '?')})"


def _uncached_objects(repo, targets: list[str]) -> set:
    """The hashes of the `cache: false` outputs of the targeted stages (all stages when none), as dvc.lock has them."""
    stages = [s for t in targets for s in repo.stage.collect(t)] if targets else list(repo.index.stages)
    return {out.hash_info for s in stages for out in s.outs if not out.use_cache and out.hash_info}


def push(root: Path, targets: list[str] | None = None, remote: str | None = None) -> PushReport:
    from dvc.repo import Repo

    targets = list(targets or [])
    with contextlib.chdir(root), Repo(".") as repo:  # DVC resolves STAGE@EFFECT against the working directory
        where = remote_url(repo, remote)
        try:
            pushed = repo.push(targets=targets or None, remote=remote, run_cache=True)
            with repo.lock:
                extra = repo.cloud.push(_uncached_objects(repo, targets), remote=remote)
        except Exception as exc:  # noqa: BLE001 - DVC, s3fs and botocore each raise their own: one line naming the remote
            why = str(exc) if type(exc).__module__.startswith("dvc") else f"{type(exc).__name__}: {exc}"
            raise RemoteError(f"push to {where} failed ({why}); nothing is lost here (the outputs are in "
                              f"{repo.cache.local.path}): push again when the remote is back") from exc
        if extra.failed:
            raise RemoteError(f"push to {where} failed for {len(extra.failed)} `cache: false` outputs; nothing is "
                              f"lost here: push again when the remote is back")
    return PushReport(where, pushed + len(extra.transferred), len(extra.transferred))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestration.remote", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("push", help="dvc push --run-cache, with the `cache: false` outputs")
    p.add_argument("-r", "--remote", help="the DVC remote (default: the project's default remote)")
    p.add_argument("targets", nargs="*", help="STAGE@EFFECT (default: every stage in dvc.lock)")
    p.add_argument("--root", default=".", help="the project folder (default: here)")
    args = ap.parse_args(argv)
    try:
        print(push(Path(args.root), args.targets, args.remote).line())
    except RemoteError as exc:
        print(f"orchestration.remote: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
