"""Where the expensive stages compute: `teacher.executor` (the teacher stage's samples) and `train.workers` /
`train.ray_address` (the training). `local` is this process, as always; `ray` sends the work to a Ray cluster
(`fxassets.teachers.ray_pool`, `fxassets.train.distributed`; docs/scale.md). Neither changes an output: the
executor is in no fingerprint, and the outputs are assembled exactly as a local run assembles them."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

# auto: the running cluster (RAY_ADDRESS, or the one `ray start --head` left on this machine); local: a new one-node
# cluster in this process; ray://host:port (Ray Client) or host:port (the GCS of a cluster this machine is part of)
_ADDRESS = re.compile(r"^(auto|local|ray://[^\s:/]+:\d{1,5}|[^\s:/]+:\d{1,5})$")


def check_address(v: str) -> str:
    if not _ADDRESS.match(v):
        raise ValueError(f"{v!r} is not a Ray address: auto, local, ray://host:port or host:port")
    return v


class RayExecutor(BaseModel):
    """The teacher's samples on a Ray actor pool: one actor per worker builds the teacher once, the driver (the stage)
    sends the uncached samples in batches and caches each batch's results the moment they come back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ray"]
    address: str = Field("auto", description="auto | local | ray://host:port | host:port")
    workers: int = Field(2, ge=1, le=4096, description="actors, each with its own copy of the teacher")
    gpus_per_worker: float = Field(0.0, ge=0, le=16, description="GPUs per actor (Ray's num_gpus; 0: CPU)")
    cpus_per_worker: float = Field(1.0, ge=0, le=512, description="CPUs per actor (Ray's num_cpus)")
    batch_size: int = Field(0, ge=0, le=4096, description="samples per actor call; 0: the teacher's own batch size")
    max_worker_restarts: int = Field(3, ge=0, le=1000, description="actors that may die and be replaced in one run")
    startup_timeout: float = Field(300.0, gt=0, description="seconds for the actors to start (build the teacher)")

    _addr = field_validator("address")(classmethod(lambda cls, v: check_address(v)))


def _executor_kind(v: object) -> str:
    if isinstance(v, str):
        return "local"
    return str((v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)) or "ray")


# `local` (the string) or a `{kind: ray, ...}` mapping; an error's key path reads `teacher.executor.address`
Executor = Annotated[Union[Annotated[Literal["local"], Tag("local")], Annotated[RayExecutor, Tag("ray")]],
                     Discriminator(_executor_kind), Field(description="local (this process) or a Ray cluster")]
