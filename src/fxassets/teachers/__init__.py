"""Teachers: the slow, strong models whose edits the student learns (the teacher_images stage, stage.py). One interface
(base.py), a registry by `kind` (registry.py); see registry.py for the kinds.

Importing this package never imports torch, diffusers or an HTTP client; a teacher loads what it needs on first use."""

from fxassets.teachers.base import SampleRejected, Teacher, TeacherError
from fxassets.teachers.registry import REGISTRY, make_teacher

__all__ = ["REGISTRY", "SampleRejected", "Teacher", "TeacherError", "make_teacher"]
