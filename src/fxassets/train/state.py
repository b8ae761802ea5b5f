"""Resumable training: checkpoints kept outside the DVC outputs, keyed by everything that determines the run.

Every ``train.checkpoint_every`` steps the loop writes one folder (atomically: built under a temporary name, then
renamed, so a killed run leaves either a whole checkpoint or none), then removes the older ones::

    <state_dir>/                     the stage uses .cache/fxassets/train/<effect> ($FXASSETS_CACHE moves it)
      step-00000400/
        meta.json                    format, run key, step
        model.safetensors            the student's weights and BatchNorm statistics
        state.pt                     torch.save: optimizer, step, RNG states (batch generator, python, numpy,
                                     torch), the curve so far, the losses since the last evaluation, elapsed
                                     training seconds, the PatchGAN and its optimizer (gan_weight > 0)

A run picks up the newest checkpoint whose key matches its own (`run_key`: the train config, the pairs manifest,
the LPIPS weights file, the training code, the torch version); any other is ignored and removed once the run writes
its own.  Restoring every state makes a resumed run bitwise equal to an uninterrupted one (same machine and thread
count) when the budget is steps; a wall-clock budget (``max_seconds``) counts the seconds before the kill.  A run that
finishes deletes its checkpoints: the DVC output is the product.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fxassets.core.atomic import atomic_dir, write_json
from fxassets.core.config import TrainConfig
from fxassets.core.paths import PACKAGE_DIR, stage_code_files
from fxassets.core.hashing import sha256_file

FORMAT = "fxassets-train-state/1"
# the code a run's result depends on: the student_checkpoint stage's declared code (core.paths.STAGE_CODE)
CODE_STAGE = "student_checkpoint"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_OURS = re.compile(r"^(step-\d{8}|\.step-\d{8}\..*\.(tmp|old))$")  # checkpoints and atomic_dir's temp folders

log = logging.getLogger(__name__)


def run_key(cfg: TrainConfig, manifest: Path, lpips_file: Path | None = None, encoder_file: Path | None = None) -> str:
    """sha256 over what determines a training run: config, pairs, LPIPS and encoder weights, code, torch version."""
    package_dir = PACKAGE_DIR
    parts: dict[str, Any] = {
        "format": FORMAT,
        "train": cfg.model_dump(mode="json", exclude={"ray_address"}),  # where it runs is not what it makes
        "manifest": sha256_file(Path(manifest)),
        "lpips": sha256_file(lpips_file) if lpips_file is not None and Path(lpips_file).is_file() else None,
        "encoder": sha256_file(encoder_file) if encoder_file is not None and Path(encoder_file).is_file() else None,
        "code": {f.relative_to(package_dir).as_posix(): sha256_file(f) for f in stage_code_files(CODE_STAGE, package_dir)},
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every random stream a training draws from (the batch generator, torch's, Python's, NumPy's), as a resume
    checkpoint or a Ray worker gets it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "batches": gen.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    """Put back the streams `rng_state` took."""
    gen.set_state(state["batches"])
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


@dataclass
class Resumed:
    """Where a restored run continues."""

    step: int
    curve: list[dict[str, float]]
    losses: list[float]  # training losses since the last evaluation (the next curve row averages them)
    elapsed: float  # training seconds before the interruption
    path: Path


class Checkpointer:
    """Writes, finds, restores and finally deletes a run's resume checkpoints in `folder` (None: never)."""

    def __init__(self, folder: Path | None, key: str, every: int):
        self.folder = Path(folder) if folder is not None else None
        self.key = key
        self.every = every

    def due(self, step: int, total: int) -> bool:
        """A checkpoint after this step? (never after the last one: the run is about to finish)"""
        return self.folder is not None and self.every > 0 and step % self.every == 0 and step < total

    def _step_dirs(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run (same key), or None."""
        for path in reversed(self._step_dirs()):
            try:
                meta = json.loads((path / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("format") == FORMAT and meta.get("key") == self.key:
                return path
        return None

    def save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, extra: dict[str, Any],
             gen: torch.Generator, curve: list[dict[str, float]], losses: list[float], elapsed: float) -> Path:
        """Write the checkpoint after `step` (atomically), then remove every other one."""
        assert self.folder is not None
        path = self.folder / f"step-{step:08d}"
        state = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(gen), "curve": list(curve),
                 "losses": list(losses), "elapsed": float(elapsed), "objective": extra}
        with atomic_dir(path) as tmp:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"key": self.key, "step": str(step)})
            torch.save(state, tmp / "state.pt")
            write_json(tmp / "meta.json", {"format": FORMAT, "key": self.key, "step": step})
        self._remove(keep=path)  # older checkpoints, another run's, a killed write's temp folder
        return path

    def _remove(self, keep: Path | None = None) -> None:
        if self.folder is None or not self.folder.is_dir():
            return
        for other in self.folder.iterdir():
            if other != keep and other.is_dir() and _OURS.match(other.name):
                shutil.rmtree(other, ignore_errors=True)

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, objective: Any,
                gen: torch.Generator) -> Resumed | None:
        """Load the latest matching checkpoint into model, optimizer, objective and every RNG; None if there is none."""
        path = self.latest()
        if path is None:
            return None
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        objective.load_state_dict(state["objective"])
        set_rng_state(state["rng"], gen)
        step = int(state["step"])
        log.warning("resuming from step %d (%s)", step, path)
        return Resumed(step, list(state["curve"]), list(state["losses"]), float(state["elapsed"]), path)

    def clear(self) -> None:
        """The run finished: delete its checkpoints (and the state folder, once empty)."""
        self._remove()
        if self.folder is not None and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
