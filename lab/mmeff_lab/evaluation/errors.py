"""The one exception the benchmark loaders raise: bad input data, named by file and line."""

from __future__ import annotations

from pathlib import Path

from mmeff.errors import MmeffError


class DataError(MmeffError):
    """A missing, corrupt or inconsistent benchmark file; the message names the file (and line)."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")
