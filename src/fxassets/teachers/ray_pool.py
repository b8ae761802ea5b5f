"""`teacher.executor: {kind: ray, ...}`: the teacher stage's uncached samples on a pool of Ray actors.

The stage stays the driver: it reads the sources, sends batches of (record, photo) to the actors, and writes each
batch's results into the per-sample cache (`teachers/stage.py`, atomically) the moment the batch comes back; the
outputs are then assembled from the cache exactly as after a local run, so they have the same bytes. Each actor
builds the teacher (and the face scaler) once and keeps it for the run. At most two batches wait per actor.

* An actor that dies (its process killed, its node lost): the batches it held go back to the front of the queue
  and run on another actor; a new actor replaces it (up to `max_worker_restarts` in a run). A sample is only ever
  sent again when its result never reached the driver, and a cached sample is never sent.
* A paid API teacher: the driver keeps the run's ledger. Before a batch goes out it reserves the batch's price
  (samples x price); the actor may spend at most that on it (its own client's bound is set per batch), and what it
  did not spend is released when the batch is back. A dead actor's reservations count as spent. So the run never
  spends more than `max_cost` however many actors there are; the provider's images also stay in the response cache
  (`<cache>/api/`) of the actor's node, so a batch sent again on that node pays nothing twice.
* Bad input fails before any sample is sent, in one line: an address with no cluster behind it (naming
  `teacher.executor.address`), more GPUs or CPUs than the cluster has (`ray.cluster_resources()`), actors that do not
  start within `startup_timeout` (e.g. the teacher cannot be built there).

The workers need fxassets and the teacher's dependencies (the same image as the driver), and the teacher's model
where its config says (a hub id, or the same path as on the driver). Test hook: `$FXASSETS_RAY_TEST_DIR` makes each
actor write one file per sample it edits there, and the first actor to take a batch dies (`os._exit`) before editing
it (tests/test_ray.py)."""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fxassets.core.ray_cluster import ExecutorError, check_resources, connect
from fxassets.teachers.base import TeacherError

log = logging.getLogger(__name__)
INFLIGHT_PER_ACTOR = 2
TEST_DIR_ENV = "FXASSETS_RAY_TEST_DIR"


def say(msg: str) -> None:
    """A progress line on stderr: what `dvc repro` prints and the Dagster asset streams into the run's logs."""
    print(f"teacher_images [ray]: {msg}", file=sys.stderr, flush=True)


# -- the actor ------------------------------------------------------------------------------------------------------


class TeacherWorker:
    """One actor: the teacher and the face scaler, built once; `run` edits one batch of already-read photos."""

    def __init__(self, teacher_cfg: Any, effect_cfg: Any, root: str, eye_px: float, detector: str, min_score: float):
        from pathlib import Path

        from fxassets.faces.scale import FaceScaler
        from fxassets.teachers.registry import make_teacher

        self.teacher = make_teacher(teacher_cfg, effect_cfg, Path(root))
        self.scaler = FaceScaler(eye_px, *((detector, min_score) if eye_px else ()))
        self.session = None
        if hasattr(self.teacher, "client"):  # an API teacher: one session for the actor's life, bound set per batch
            self.session = self.teacher.run_session(0)
            self.session.__enter__()
        self.test_dir = os.environ.get(TEST_DIR_ENV)

    def ready(self) -> dict[str, Any]:
        import ray

        return {"node": ray.get_runtime_context().get_node_id()[:8], "pid": os.getpid()}

    def _test_hook(self, records: list[dict[str, Any]]) -> None:
        from pathlib import Path

        d = Path(self.test_dir)  # type: ignore[arg-type]
        try:
            fd = os.open(d / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(1)  # the first actor to take a batch dies before editing it
        for rec in records:
            (d / f"{rec['sample_id']}.{os.getpid()}.{uuid.uuid4().hex[:8]}").touch()

    def run(self, records: list[dict[str, Any]], images: list[np.ndarray], budget: float) -> dict[str, Any]:
        if self.test_dir:
            self._test_hook(records)
        ledger = self.teacher.client.ledger if self.session is not None else None
        spent0 = ledger.spent if ledger is not None else 0.0
        if ledger is not None:
            ledger.max_cost = ledger.spent + ledger.reserved + budget  # this batch may spend what the driver reserved
        t0 = time.perf_counter()
        error: BaseException | None = None
        outs: list[Any] = []
        try:
            outs, _ = self.scaler.edit(self.teacher, images, records)
        except BaseException as exc:  # noqa: BLE001 - sent back whole: the driver decides
            error = exc
        seconds = time.perf_counter() - t0
        spent = (ledger.spent - spent0) if ledger is not None else 0.0
        import ray

        runtime = {**self.teacher.runtime(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
        return {"outs": outs, "error": error, "seconds": seconds, "spent": spent, "runtime": runtime, "pid": os.getpid()}

    def close(self) -> None:
        if self.session is not None:  # the response cache entries of this actor's images: cached by the driver now
            self.session.__exit__(None, None, None)
            self.session = None
        self.scaler.close()
        self.teacher.close()


# -- the driver -----------------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """The driver's ledger of a paid teacher across actors (price 0: no bound)."""

    price: float = 0.0
    max_cost: float = float("inf")
    spent: float = 0.0
    reserved: float = 0.0

    def affordable(self, n: int) -> int:
        """How many of `n` samples the bound lets go out now."""
        if self.price <= 0:
            return n
        room = self.max_cost - self.spent - self.reserved + 1e-9
        return max(0, min(n, int(room // self.price)))

    def reserve(self, n: int) -> float:
        amount = n * self.price
        self.reserved += amount
        return amount

    def settle(self, reserved: float, spent: float) -> None:
        self.reserved -= reserved
        self.spent += spent


@dataclass
class PoolStats:
    workers: int = 0
    restarts: int = 0
    resent_batches: int = 0
    per_worker: dict[str, int] = field(default_factory=dict)
    startup_seconds: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


def run_on_ray(
    todo: list[tuple[str, dict[str, Any]]],
    read: Callable[[dict[str, Any]], np.ndarray | None],
    store: Callable[[str, dict[str, Any], Any, float, dict[str, Any]], None],
    ex: Any,
    build: tuple[Any, Any, str, float, str, float],
    batch_size: int,
    bar: Any,
    budget: Budget | None = None,
    progress: bool = True,
) -> PoolStats:
    """Edit `todo` ((cache key, record) pairs) on `ex.workers` Ray actors.

    `read(record)`: the photo the teacher edits (None: it cannot be read, recorded by the caller, nothing sent);
    `store(key, record, output, seconds, runtime)`: cache one result (an image, a SampleRejected); `build`: the
    actor's arguments (teacher config, effect teacher config, root, eye distance, detector, min score)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    from fxassets.teachers.api.client import BudgetExceeded

    budget = budget or Budget()
    stats = PoolStats()
    started, where = connect(ex.address)
    actors: list[Any] = []
    try:
        t0 = time.perf_counter()
        stats.resources = check_resources(ex.workers, ex.gpus_per_worker, ex.cpus_per_worker, where)
        opts: dict[str, Any] = {"num_cpus": ex.cpus_per_worker, "num_gpus": ex.gpus_per_worker, "max_restarts": 0,
                                "max_task_retries": 0}
        if os.environ.get(TEST_DIR_ENV):  # the test hook reaches workers started before it was set
            opts["runtime_env"] = {"env_vars": {TEST_DIR_ENV: os.environ[TEST_DIR_ENV]}}
        actor_cls = ray.remote(**opts)(TeacherWorker)

        def start(n: int) -> list[Any]:
            new = [actor_cls.remote(*build) for _ in range(n)]
            try:
                ray.get([a.ready.remote() for a in new], timeout=ex.startup_timeout)
            except (GetTimeoutError, RayActorError, RayTaskError) as exc:
                for a in new:
                    ray.kill(a, no_restart=True)
                if isinstance(exc, GetTimeoutError):
                    raise ExecutorError(f"teacher.executor.startup_timeout: the Ray workers did not start within "
                                        f"{ex.startup_timeout:g} s on {where} ({stats.resources})") from None
                raise ExecutorError(f"teacher.executor: a Ray worker could not build the teacher: {_cause(exc)}") from None
            return new

        size = max(1, ex.batch_size or batch_size)
        queue: deque[list[tuple[str, dict[str, Any]]]] = deque(todo[i : i + size] for i in range(0, len(todo), size))
        n_workers = min(ex.workers, max(1, len(queue)))
        actors.extend(start(n_workers))
        stats.workers = n_workers
        stats.startup_seconds = round(time.perf_counter() - t0, 3)
        say(f"{len(todo)} samples in {len(queue)} batches on {n_workers} workers ({where}; {stats.resources}); "
            f"started in {stats.startup_seconds:.1f} s")
        load = {i: 0 for i in range(len(actors))}
        inflight: dict[Any, tuple[int, list[tuple[str, dict[str, Any]]], float]] = {}
        failure: BaseException | None = None
        over_budget = False
        done = 0
        last_said = time.monotonic()

        def dispatch() -> None:
            nonlocal over_budget
            for i in list(load):
                while load.get(i, INFLIGHT_PER_ACTOR) < INFLIGHT_PER_ACTOR and queue and failure is None and not over_budget:
                    batch = queue.popleft()
                    recs, imgs = [], []
                    for key, rec in batch:
                        img = read(rec)
                        if img is not None:
                            recs.append((key, rec))
                            imgs.append(img)
                    if not recs:
                        bar.update(len(batch))
                        continue
                    fits = budget.affordable(len(recs))
                    if fits < len(recs):  # send what the bound allows now; the rest waits for reservations to clear
                        queue.appendleft(recs[fits:])
                        recs, imgs = recs[:fits], imgs[:fits]
                        if not recs:
                            over_budget = not inflight
                            return
                    reserved = budget.reserve(len(recs))
                    ref = actors[i].run.remote([r for _, r in recs], imgs, reserved)
                    inflight[ref] = (i, recs, reserved)
                    load[i] += 1
                    bar.update(len(batch) - len(recs))  # unreadable sources: recorded by the caller

        dispatch()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            ref = ready[0]
            i, recs, reserved = inflight.pop(ref)
            try:
                res = ray.get(ref)
            except RayActorError:
                budget.settle(reserved, reserved)  # it may have been billed
                stats.resent_batches += 1
                queue.appendleft(recs)  # its samples never reached the cache: they run elsewhere
                if i in load:
                    del load[i]
                    ray.kill(actors[i], no_restart=True)
                    say(f"worker {i} died; {len(recs)} samples sent again"
                        + (f"; {stats.restarts + 1} of {ex.max_worker_restarts} replacements" if stats.restarts < ex.max_worker_restarts else ""))
                    if stats.restarts < ex.max_worker_restarts and failure is None:
                        stats.restarts += 1
                        try:
                            actors.append(start(1)[0])
                            load[len(actors) - 1] = 0
                        except ExecutorError as exc:  # go on with the others; the batches in flight still count
                            say(f"no replacement for worker {i}: {exc}")
                if not load:
                    failure = failure or TeacherError(
                        f"every Ray worker died (teacher.executor.max_worker_restarts = {ex.max_worker_restarts} "
                        "replacements used); the samples finished before are cached: run again to continue")
                dispatch()
                continue
            load[i] -= 1
            budget.settle(reserved, res["spent"])
            err = res["error"]
            if isinstance(err, BudgetExceeded):  # the batch hit its own reservation (retried timeouts): try again
                queue.appendleft(recs)
            elif err is not None:
                if isinstance(err, TeacherError):
                    which = err.sample or ", ".join(str(r["sample_id"]) for _, r in recs)
                    err.args = (f"sample {which}: {err}; the samples finished before it are cached: run again to continue",)
                failure = failure or err
            else:
                each = round(res["seconds"] / len(recs), 4)
                where_ran = {**res["runtime"], "executor": "ray", "pid": res["pid"]}
                for (key, rec), out in zip(recs, res["outs"], strict=True):
                    store(key, rec, out, each, where_ran)
                stats.per_worker[str(i)] = stats.per_worker.get(str(i), 0) + len(recs)
                done += len(recs)
                bar.update(len(recs))
                if (not progress or getattr(bar, "disable", False)) and time.monotonic() - last_said > 10:  # no bar: a line
                    say(f"{done}/{len(todo)} samples done")
                    last_said = time.monotonic()
            dispatch()
        if failure is not None:
            raise failure
        if over_budget or queue:
            raise BudgetExceeded(
                f"stopped before exceeding teacher.max_cost {budget.max_cost:.2f} USD: spent {budget.spent:.2f} USD "
                f"across {stats.workers} Ray workers; the images already made are cached, raise max_cost and run again "
                "for the rest")
        ray.get([a.close.remote() for j, a in enumerate(actors) if j in load])
        say(f"{done} samples on {stats.workers} workers ({stats.restarts} replaced): {stats.per_worker}")
        return stats
    finally:
        for a in actors:  # a cluster this process keeps using (or a shared one) gets its CPUs and GPUs back now
            ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
