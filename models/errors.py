"""Errors of saved models, importable without torch (the stage harness reports them in one line)."""

from __future__ import annotations

from pathlib import Path


class ArtifactError(ValueError):
    """A saved file that is missing, truncated or corrupt; `str()` is `<file>: <what is wrong>`."""

    def __init__(self, file: Path | str, problem: str) -> None:
        super().__init__(str(file), problem)
        self.file, self.problem = Path(file), problem

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"
