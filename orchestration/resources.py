"""Resources and the executor, in one place: a deployment changes these settings (or their environment variables).

* `MODE` ($FXASSETS_MODE): where a materialization runs its stage.
  - `local` (the default, one machine): in the project checkout, `dvc repro --single-item STAGE@EFFECT` under a
    per-effect lock; the checkout and its DVC cache are the truth.
  - `workspace` (several machines): in a fresh clone at the run's pinned commit (`workspace.py`): inputs pulled
    from the DVC remote, the stage run or restored, outputs and run-cache pushed. Only the remote and the Dagster
    instance are shared, so two steps (two effects, or two machines) never share a workspace. The run's commit
    is its tag `fxassets/commit`, else $FXASSETS_COMMIT, else the checkout's HEAD when its first step starts
    (uncommitted changes refused): on several machines, tag the run (or bake $FXASSETS_COMMIT into the image).
    $FXASSETS_REPO: the git repository to clone (default: the project folder); $FXASSETS_REMOTE: the DVC remote
    (default: the default remote in .dvc/config); $FXASSETS_WORKSPACES: where workspaces go (default: a folder in
    the temp dir, beside the DVC cache they share).
* `EXECUTOR_KIND` ($FXASSETS_EXECUTOR): how steps are spread.
  - `multiprocess` (default): one process per step on this machine; a run may ask for in-process instead with
    run config `execution: {config: {in_process: {}}}`.
  - `celery`: dagster-celery; each step is a task on the broker $FXASSETS_CELERY_BROKER (e.g.
    `redis://127.0.0.1:6379/0`), run by a worker started with
    `dagster-celery worker start -A dagster_celery.app -y orchestration/celery.yaml` on each machine.
  - `k8s`: dagster-k8s; each step is a Kubernetes Job from the image $FXASSETS_IMAGE (see `K8S_CONFIG`).
  Both need workspace mode (their steps do not see this checkout); docs/scale.md has the recipe for each.
* `DvcProject`: runs a stage through DVC and reads what DVC recorded (see `dvc_runner.py`, `workspace.py`).
* `QualityGates`: the thresholds of the face-pair checks (configurable per deployment or in the launchpad).
"""

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, multi_or_in_process_executor

from orchestration import dvc_runner, workspace

LOCAL, WORKSPACE = "local", "workspace"
MODE = os.environ.get("FXASSETS_MODE", LOCAL)
EXECUTOR_KIND = os.environ.get("FXASSETS_EXECUTOR", "multiprocess")
COMMIT_TAG = "fxassets/commit"

# dagster-k8s: one Job per step. Each pod gets the image (the project installed, as in `make setup`), workspace
# mode, the repository to clone and the S3 credentials from a Secret; the two heavy stages ask for a GPU.
K8S_CONFIG: dict[str, Any] = {
    "job_image": {"env": "FXASSETS_IMAGE"},
    "job_namespace": {"env": "FXASSETS_K8S_NAMESPACE"},
    "max_concurrent": 4,
    "env_vars": ["FXASSETS_MODE=workspace", "FXASSETS_REPO", "FXASSETS_REMOTE", "DVC_NO_ANALYTICS=1"],
    "env_secrets": ["fxassets-dvc-remote"],  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL, if any)
    "step_k8s_config": {"container_config": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}},
    "per_step_k8s_config": {
        step: {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
        for step in ("teacher_images", "student_checkpoint")
    },
}
CELERY_CONFIG: dict[str, Any] = {"broker": {"env": "FXASSETS_CELERY_BROKER"}, "backend": "rpc://"}


def make_executor(kind: str = EXECUTOR_KIND):
    """The executor of the definitions (dagster-celery and dagster-k8s are not in `make setup`: docs/scale.md)."""
    if kind == "multiprocess":
        return multi_or_in_process_executor
    if kind not in ("celery", "k8s"):
        raise ValueError(f"$FXASSETS_EXECUTOR={kind!r}: expected multiprocess, celery or k8s")
    try:
        if kind == "celery":
            from dagster_celery import celery_executor

            return celery_executor.configured(CELERY_CONFIG, name="celery")
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(K8S_CONFIG, name="k8s")
    except ImportError as exc:
        raise ImportError(f"$FXASSETS_EXECUTOR={kind} needs dagster-{kind} ({exc}); see docs/scale.md") from exc


@dataclass
class Built:
    """What a materialization built: where (the project or a workspace), what DVC did, the stage's dvc.lock entry."""

    root: Path
    result: dvc_runner.ReproResult
    entry: dict[str, Any]
    commit: str | None = None  # workspace mode: the commit built


class DvcProject(ConfigurableResource):
    """The DVC project the assets materialize into (the folder with dvc.yaml), and where its stages run."""

    root: str
    mode: str = LOCAL  # local | workspace
    repo: str = ""  # workspace mode: the git repository to clone (default: root)
    remote: str = ""  # workspace mode: the DVC remote (default: the commit's default remote)
    workspaces: str = ""  # workspace mode: where the workspaces go (default: <tmp>/fxassets-workspaces)
    shared_cache: bool = True  # workspace mode: this machine's workspaces share one DVC cache beside them
    keep_workspaces: bool = False

    @property
    def path(self) -> Path:
        return Path(self.root)

    def effect_lock(self, effect: str, log: Callable[[str], None] | None = None) -> AbstractContextManager[None]:
        """Hold while building an effect and reading what was built (one builder per effect at a time)."""
        return dvc_runner.partition_lock(self.path, effect, on_wait=log)

    def repro(self, stage: str, effect: str, log: Callable[[str], None] | None = None) -> dvc_runner.ReproResult:
        """Run the stage through DVC; call it inside `effect_lock(effect)`."""
        return dvc_runner.repro(self.path, stage, effect, log, lock=False)

    def lock_entry(self, stage: str, effect: str) -> dict[str, Any]:
        return dvc_runner.lock_entry(self.path, stage, effect)

    def settings(self) -> workspace.Settings:
        parent = Path(self.workspaces or Path(tempfile.gettempdir()) / "fxassets-workspaces")
        return workspace.Settings(
            repo=self.repo or self.root, parent=parent / "runs", remote=self.remote or None,
            cache_dir=parent / "dvc-cache" if self.shared_cache else None,
            local_config=self.path / ".dvc" / "config.local", keep=self.keep_workspaces,
        )

    def pinned_commit(self, instance, run_id: str, tags: dict[str, str]) -> str:
        """The run's commit: its tag `fxassets/commit`, else $FXASSETS_COMMIT (an image's own commit), else HEAD of the
        checkout; recorded as that tag by the first step, so every step of the run builds the same commit."""
        if COMMIT_TAG not in tags:
            commit = os.environ.get("FXASSETS_COMMIT") or workspace.head_commit(self.path)
            instance.add_run_tags(run_id, {COMMIT_TAG: commit})
            tags = instance.get_run_by_id(run_id).tags
        return tags[COMMIT_TAG]

    @contextlib.contextmanager
    def build(self, stage: str, effect: str, log: Callable[[str], None] | None = None, commit: str | None = None) -> Iterator[Built]:
        """Build STAGE@EFFECT where the mode says; read the outputs inside the `with` (a workspace goes at its end)."""
        if self.mode == LOCAL:
            with self.effect_lock(effect, log):  # until the outputs are read: no other run rewrites them
                result = self.repro(stage, effect, log)
                yield Built(self.path, result, self.lock_entry(stage, effect))
        elif self.mode == WORKSPACE:
            if not commit:
                raise dvc_runner.DvcError(f"workspace mode: no commit to build {stage}@{effect} at")
            with workspace.workspace(self.settings(), commit, f"{stage}@{effect}", log) as ws:
                result = workspace.build(ws, stage, effect, log)
                yield Built(ws, result, dvc_runner.lock_entry(ws, stage, effect), commit)
        else:
            raise ValueError(f"dvc resource: mode {self.mode!r}: expected {LOCAL!r} or {WORKSPACE!r} ($FXASSETS_MODE)")


class QualityGates(ConfigurableResource):
    """Thresholds of the blocking checks on face_pairs (a great-expectations suite will join them)."""

    min_kept_pairs: int = 4
    max_rejected_share: float = 0.25


def make_resources(root: Path, mode: str | None = None) -> dict[str, Any]:
    env, mode = os.environ.get, mode or MODE
    if mode not in (LOCAL, WORKSPACE):
        raise ValueError(f"$FXASSETS_MODE={mode!r}: expected {LOCAL!r} or {WORKSPACE!r}")
    dvc = DvcProject(root=str(root), mode=mode, repo=env("FXASSETS_REPO", ""), remote=env("FXASSETS_REMOTE", ""),
                     workspaces=env("FXASSETS_WORKSPACES", ""))
    return {"dvc": dvc, "gates": QualityGates()}
