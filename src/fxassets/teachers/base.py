"""The teacher interface.

A teacher edits face photos (`edit` / `edit_batch`) or, for a source generator, makes portraits from prompts
(`generate_batch`). Its `fingerprint()` names everything that changes its output; it is cheap (no model is loaded)
so that DVC records, Dagster observations and the per-sample cache can all key on it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fxassets.core.config import fingerprint
from fxassets.core.images import ImageError


class SampleRejected(ImageError):
    """The teacher ran but refuses this one sample (e.g. a safety checker flagged it); recorded, not raised."""


class TeacherError(RuntimeError):
    """The teacher failed in a way that stops the run (an API that gave up, ...); the message names the teacher and
    the cause, `sample` the sample it failed on when the teacher knows it. Finished samples stay cached."""

    sample: str | None = None


class Teacher(ABC):
    """Edits face photos. Subclasses set `kind` and `version` and describe their settings."""

    kind: str = ""
    version: str = "1"  # bump when the code changes what the teacher outputs
    edits: bool = True  # edit() / edit_batch() work
    generates: bool = False  # generate_batch() works (text-to-image source generators)
    batch_size: int = 1  # samples per edit_batch() call; never changes an output
    # the photo is resized to a fixed face scale first (fxassets.faces.scale): for teachers that work at the photo's
    # own pixel size (the classical filters); those that resize to a working resolution of their own do not need it
    face_scaled: bool = True
    root: Path = Path(".")  # project root: relative model folders are found under it

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes the output (model, steps, style, ...)."""

    def edit(self, rgb: np.ndarray, record: dict[str, Any]) -> np.ndarray:
        """Return the edited image (RGB uint8, same size as `rgb`) for one prompt record."""
        raise NotImplementedError(f"the {self.kind!r} teacher does not edit images")

    def edit_batch(self, images: list[np.ndarray], records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        """Edit several samples at once. Each output depends only on its own image and record (seed included),
        never on the rest of the batch. A refused sample comes back as a `SampleRejected` in its slot."""
        return [self.edit(img, rec) for img, rec in zip(images, records, strict=True)]

    def generate_batch(self, records: list[dict[str, Any]]) -> list[np.ndarray | SampleRejected]:
        """Text-to-image: one RGB uint8 image per record (`prompt`, `negative_prompt`, `seed`)."""
        raise NotImplementedError(f"the {self.kind!r} teacher does not generate images")

    def bind_root(self, root: Path) -> None:
        """Tell the teacher the project root (stages call this before `fingerprint()`)."""
        self.root = Path(root)

    def runtime(self) -> dict[str, Any]:
        """Where and how it runs (device, dtype, library versions): recorded, but not part of the fingerprint."""
        return {}

    def close(self) -> None:
        """Free the model, if one was loaded."""

    def generate_settings(self) -> dict[str, Any]:
        """What changes a generated (text-to-image) portrait; by default the same as `settings()`."""
        return self.settings()

    @contextmanager
    def run_session(self, n_uncached: int) -> Iterator[None]:
        """Wraps one run of `n_uncached` samples that are not cached yet: a teacher behind a paid API estimates
        the cost here and refuses to start over its bound, and may raise on leaving to stop a run it cut short."""
        yield

    def fingerprint(self, task: str = "edit") -> dict[str, Any]:
        """`task`: "edit" (the teacher stage) or "generate" (source portraits, which use `generate_settings()`)."""
        settings = self.generate_settings() if task == "generate" else self.settings()
        s = {"kind": self.kind, "version": self.version, **settings}
        return {**s, "hash": fingerprint(s)}


class BatchTeacher(Teacher):
    """A teacher that works in batches (`edit_batch`, which subclasses implement): `edit` is one sample through it,
    and a refused sample raises its `SampleRejected`."""

    def edit(self, rgb: np.ndarray, record: dict[str, Any]) -> np.ndarray:
        out = self.edit_batch([rgb], [record])[0]
        if isinstance(out, SampleRejected):
            raise out
        return out
