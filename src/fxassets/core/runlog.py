"""The run log: how a stage's last run went, kept beside its outputs but outside them.

A stage's outputs (DVC's outs and metrics) hold only what its inputs decide, so that a rerun on the same inputs
writes the same bytes and leaves every later stage up to date. What the run alone decides (wall-clock seconds,
latencies, the machine, what came from a cache, where training resumed) goes to the stage's run log,
`<cache root>/runs/<stage>/<effect>.json` (`.cache/fxassets/runs/`, gitignored; `$FXASSETS_CACHE` moves it): the
summary the stage returned, whole, with the CPU and when the run finished. `fxassets report` and the Dagster
metadata read it; DVC never hashes it. Outputs restored by DVC (run-cache, `dvc pull`) have the log of the last run
here, or none."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from fxassets.core.atomic import write_json
from fxassets.core.machine import cpu_info
from fxassets.core.paths import cache_root


def run_log_path(root: Path, stage: str, effect: str) -> Path:
    return cache_root(root) / "runs" / stage / f"{effect}.json"


def write_run_log(root: Path, stage: str, effect: str, summary: dict[str, Any]) -> Path:
    path = run_log_path(root, stage, effect)
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(path, {"stage": stage, "effect": effect, "finished": finished, "cpu": cpu_info(), **summary})
    return path


def read_run_log(root: Path, stage: str, effect: str) -> dict[str, Any]:
    """The last run's log, or {} when there is none (outputs pulled or restored, a cache cleared)."""
    try:
        return json.loads(run_log_path(root, stage, effect).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
