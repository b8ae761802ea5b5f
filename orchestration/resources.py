"""Resources and the executor, in one place.

* `DvcProject`: runs a stage through DVC and reads what DVC recorded (see `dvc_runner.py`).
* `QualityGates`: the thresholds of the face-pair checks (configurable per deployment or in the launchpad).
* `EXECUTOR`: multiprocess by default (one process per step); a run may ask for in-process instead with run config
  `execution: {config: {in_process: {}}}` (saves a Python start-up per step). To run steps elsewhere, change
  only this line, e.g.
  `from dagster_k8s import k8s_job_executor; EXECUTOR = k8s_job_executor` or
  `from dagster_celery import celery_executor; EXECUTOR = celery_executor` (the project folder, its DVC cache and
  `.dvc/tmp` must then be on a shared filesystem: the per-effect lock is a file lock there).
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource, multi_or_in_process_executor

from orchestration import dvc_runner

EXECUTOR = multi_or_in_process_executor


class DvcProject(ConfigurableResource):
    """The DVC project the assets materialize into (the folder with dvc.yaml)."""

    root: str

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


class QualityGates(ConfigurableResource):
    """Thresholds of the blocking checks on face_pairs (a great-expectations suite will join them)."""

    min_kept_pairs: int = 4
    max_rejected_share: float = 0.25


def make_resources(root: Path) -> dict[str, Any]:
    return {"dvc": DvcProject(root=str(root)), "gates": QualityGates()}
