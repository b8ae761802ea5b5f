"""Joining a Ray cluster and checking it can hold the workers asked for, for both Ray executors (`teacher.executor`:
teachers/ray_pool.py; `train.workers`: train/distributed.py). Imports ray only when called."""

from __future__ import annotations

import logging
import socket
from typing import Any

CONNECT_TIMEOUT = 5.0  # seconds for the address to answer at all


class ExecutorError(ValueError):
    """A Ray executor cannot run (no cluster at the address, not enough GPUs, workers that do not start): one line
    naming the `params.yaml` key to change; nothing was sent."""


# -- the cluster ----------------------------------------------------------------------------------------------------


def connect(address: str, key: str = "teacher.executor.address") -> tuple[bool, str]:
    """Join the Ray cluster at `address` (a runtime this process already joined is used as it is). Returns (whether
    this call started the connection, so should end it; a description). ExecutorError naming `key` when it cannot."""
    import ray

    if ray.is_initialized():
        return False, "the Ray runtime this process already joined"
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if address not in ("auto", "local"):  # ray.init waits minutes on a GCS that is not there: a plain TCP check first
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
        except OSError as exc:
            raise ExecutorError(f"{key}: cannot reach a Ray cluster at {address!r}: {exc.strerror or exc} "
                                f"({host}:{port}, {CONNECT_TIMEOUT:g} s to answer)") from None
    try:
        if address == "local":
            ray.init(**kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        ray.shutdown()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("no running cluster found (start one: `ray start --head`, or set RAY_ADDRESS; `local` starts one "
                "in this process)") if address == "auto" else first
        raise ExecutorError(f"{key}: cannot reach a Ray cluster at {address!r}: {hint}") from None
    return True, f"the Ray cluster at {address}"


def check_resources(workers: int, gpus: float, cpus: float, where: str, prefix: str = "teacher.executor",
                    cpu_key: str = "cpus_per_worker") -> dict[str, float]:
    """Fail (ExecutorError) when the cluster lacks the CPUs or GPUs `workers` workers ask for, instead of waiting for
    them (a cluster that autoscales: keep enough nodes up, e.g. KubeRay's minReplicas)."""
    import ray

    have = ray.cluster_resources()
    for res, each, name in (("GPU", gpus, "gpus_per_worker"), ("CPU", cpus, cpu_key)):
        need = workers * each
        if need > have.get(res, 0.0) + 1e-9:
            lower = f"{prefix}.workers" + (f" or {prefix}.{name}" if name != "workers" else "")
            raise ExecutorError(
                f"{prefix}.{name}: {workers} workers x {each:g} {res}s = {need:g} {res}s requested, {where} has "
                f"{have.get(res, 0.0):g} (ray.cluster_resources()); lower {lower}")
    return {k: v for k, v in have.items() if k in ("CPU", "GPU", "memory")}
