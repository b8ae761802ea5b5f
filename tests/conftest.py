"""Shared fixtures: a temporary copy of the project with a tiny params.yaml, and helpers to run its commands."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BIN = Path(sys.executable).parent

# A tiny pipeline: 5 faces per effect, a few training steps, a short latency run. Minutes, not hours.
TINY_OVERRIDES = {
    "effects": {"cartoon": {"samples": 5}, "sketch": {"samples": 5}},
    "faces": {"holdout_fraction": 0.25, "capture_variants": 0},  # the variants: test_captures.py
    "train": {"steps": 40, "batch_size": 8, "crop": 128, "eval_every": 20, "threads": 1},  # 2 threads, busy machine: 10x slower
    "export": {"calibration_samples": 4, "latency_runs": 5, "grid_samples": 2, "min_parity_db": 20.0},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def project_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["GX_ANALYTICS_ENABLED"] = "False"
    # the copy's own library first (not whichever checkout the venv's editable install points at), and
    # orchestration/ from the project root
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    return env


def run(root: Path, *cmd: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run a command in the project copy; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, cwd=root, env=project_env(root), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def make_project(dest: Path, overrides: dict | None = None) -> Path:
    """Copy the project's files (tracked and untracked-but-not-ignored) into `dest`, as a fresh git + DVC repo."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        if rel == "dvc.lock" or rel.startswith("metrics/"):  # the reference build's record: a copy builds its own
            continue
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, overrides or TINY_OVERRIDES), sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    if not (dest / ".dvc").is_dir():
        run(dest, "dvc", "init", "-q")
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "test project"], cwd=dest, check=True)
    return dest


def png_header(w: int, h: int) -> bytes:
    """A PNG that says it is w x h (8-bit RGB), with a few bytes of pixels: only a decoder that believes it runs out."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project built once the way `make run` builds (`orchestration.build`: every effect's `dvc repro`, two
    at once), shared by the read-only end-to-end tests; test_pipeline_dvc checks a plain `dvc repro` then does nothing."""
    root = make_project(tmp_path_factory.mktemp("built") / "project")
    run(root, sys.executable, "-m", "orchestration.build", "--jobs", "2")
    return root


def kill_at_first_checkpoint(proc: subprocess.Popen, state: Path, seconds: float, output) -> None:
    """Wait until a training run in `proc` has written its first resume checkpoint into `state`, then SIGKILL it (a
    power cut mid-run). `output`: the stream the run's errors go to, shown if it exits first."""
    import signal
    import time

    try:
        deadline = time.monotonic() + seconds
        while not list(state.glob("step-*/meta.json")):
            if proc.poll() is not None:
                raise AssertionError(f"training exited {proc.returncode} first:\n{output.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, f"no checkpoint within {seconds:.0f} s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
