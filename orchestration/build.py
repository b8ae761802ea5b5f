"""`make run`'s driver: every effect's chain reproduced through DVC, the effects side by side (no Dagster imports).

    python -m orchestration.build [--jobs N] [EFFECT ...]

Each effect is its own `dvc --wait-for-lock repro --keep-going mobile_model@EFFECT` (its prompts, teacher images,
face pairs, student and mobile model), run under the same per-effect lock the Dagster assets take, so exactly what
`dvc repro --keep-going` would build gets built: the same stages, `dvc.lock` and cache. DVC releases its repo lock
while a stage's command runs, so the effects overlap; they wait for each other only to read and write `dvc.lock`.

Why side by side: a training step scales poorly over threads (Intel Xeon, 2 cores: 302 ms at 1 thread, 193 ms at
2), so two one-thread trainings at once (290-300 ms a step each) build two effects in 0.78x the time of one
two-thread training after the other (benchmarks/bench_train_step.py, README "How long it takes"). `train.threads`
fixes the model's arithmetic; `--jobs` (default: the cores over `train.threads`, at most one job per effect) only
changes how long the build takes, never what is built.

With more than one job each line of DVC's output is prefixed with its effect; an effect that fails does not stop
the others, and the exit status is the first failure's (0 when every effect built).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from orchestration.dvc_runner import dvc_env, partition_lock

from fxassets.core.config import ConfigError, load_params


def default_jobs(effects: int, threads: int, cores: int | None = None) -> int:
    """One job per `threads` cores, at least one, at most one per effect."""
    return max(1, min(effects, (cores or os.cpu_count() or 1) // max(1, threads)))


def command(effect: str) -> list[str]:
    return ["dvc", "--wait-for-lock", "repro", "--keep-going", f"mobile_model@{effect}"]


class ProgressThrottle:
    """Which progress-bar lines to pass on: a bar's first and last, and one every `every` seconds in between (in a
    pipe a bar redraws on every update; interleaved with another effect's that is a flood)."""

    def __init__(self, every: float = 15.0, clock=time.monotonic):
        self.every, self.clock, self.last = every, clock, {}

    def show(self, line: str) -> bool:
        if "%|" not in line:  # not a tqdm bar
            return True
        bar, now = line.split(":", 1)[0], self.clock()
        if bar not in self.last or "100%|" in line or now - self.last[bar] >= self.every:
            self.last[bar] = now
            return True
        return False


def build_one(root: Path, effect: str, prefix: bool, out_lock: threading.Lock) -> int:
    """Reproduce one effect's chain; its output line by line (prefixed), or passed through as it is (one job)."""
    with partition_lock(root, effect, on_wait=lambda m: print(f"[{effect}] {m}", flush=True)):
        if not prefix:  # one job: DVC's own output, progress bars and all
            return subprocess.call(command(effect), cwd=root, env=dvc_env())
        env = {**dvc_env(), "TQDM_DISABLE": "0"}  # progress lines every 15 s (a pipe, not a terminal)
        proc = subprocess.Popen(command(effect), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        pending, bars = b"", ProgressThrottle()
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
            text = "".join(f"[{effect}] {ln}\n" for ln in (b.decode(errors="replace").rstrip() for b in lines)
                           if ln.strip() and bars.show(ln))
            if text:
                with out_lock:
                    sys.stdout.write(text)
                    sys.stdout.flush()
        if pending.strip():
            with out_lock:
                print(f"[{effect}] {pending.decode(errors='replace').rstrip()}", flush=True)
        return proc.wait()


def build(root: Path, effects: list[str], jobs: int) -> dict[str, int]:
    """Every effect's chain, `jobs` at a time; {effect: DVC's exit status}."""
    codes: dict[str, int] = {}
    queue = list(effects)
    queue_lock, out_lock = threading.Lock(), threading.Lock()

    def worker() -> None:
        while True:
            with queue_lock:
                if not queue:
                    return
                effect = queue.pop(0)
            codes[effect] = build_one(root, effect, prefix=jobs > 1, out_lock=out_lock)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(jobs, len(effects)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestration.build", description=__doc__.splitlines()[0])
    p.add_argument("effects", nargs="*", help="effects to build (default: every effect in params.yaml)")
    p.add_argument("--jobs", "-j", type=int, help="effects built at once (default: cores / train.threads)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = p.parse_args(argv)
    root = args.params.resolve().parent
    try:
        params = load_params(args.params)
        for e in args.effects:
            params.effect(e)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"fxassets: error: {exc}", file=sys.stderr)
        return 2
    effects = args.effects or list(params.effects)
    threads = max(params.train_for(e).threads for e in effects)
    jobs = args.jobs if args.jobs and args.jobs > 0 else default_jobs(len(effects), threads)
    if jobs > 1:
        print(f"building {len(effects)} effects, {jobs} at a time ({threads} training thread(s) each): "
              f"{', '.join(effects)}", flush=True)
    codes = build(root, effects, jobs)
    failed = [e for e in effects if codes.get(e)]
    if failed:
        print(f"failed: {', '.join(f'{e} (dvc exit {codes[e]})' for e in failed)}", file=sys.stderr)
    return next((codes[e] for e in effects if codes.get(e)), 0)


if __name__ == "__main__":
    sys.exit(main())
