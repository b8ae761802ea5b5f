"""The teacher interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from fxassets.config import fingerprint


class Teacher(ABC):
    """Edits one face photo. Subclasses set `kind` and `version` and describe their settings."""

    kind: str = ""
    version: str = "1"  # bump when the code changes what the teacher outputs

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes the output (model, steps, style, ...)."""

    @abstractmethod
    def edit(self, rgb: np.ndarray, record: dict[str, Any]) -> np.ndarray:
        """Return the edited image (RGB uint8, same size as `rgb`) for one prompt record."""

    def fingerprint(self) -> dict[str, Any]:
        s = {"kind": self.kind, "version": self.version, **self.settings()}
        return {**s, "hash": fingerprint(s)}
