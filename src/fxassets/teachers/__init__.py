"""Teachers: the slow, strong models whose edits the student learns. One interface, a registry by `kind`."""

from __future__ import annotations

from fxassets.config import EffectTeacher
from fxassets.teachers.base import Teacher
from fxassets.teachers.classical import ClassicalTeacherImpl

REGISTRY: dict[str, type[Teacher]] = {"classical": ClassicalTeacherImpl}


def make_teacher(cfg, effect: EffectTeacher) -> Teacher:
    try:
        cls = REGISTRY[cfg.kind]
    except KeyError:
        raise ValueError(f"teacher.kind: unknown teacher {cfg.kind!r}; known: {', '.join(sorted(REGISTRY))}") from None
    return cls(cfg, effect)


__all__ = ["REGISTRY", "Teacher", "make_teacher"]
