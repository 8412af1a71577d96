"""The errors a user sees: one line each, `file:line: field: reason`.

The CLI catches `LorachatError` and prints `str(err)` alone (no traceback unless
`--debug`), then exits with `err.exit_code`: 2 for bad input, 1 for a run that failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Where:
    """A place in the user's input: a file, a 1-based line, a dotted field."""

    file: str | Path | None = None
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(f"{self.file}:{self.line}" if self.line else str(self.file))
        if self.field:
            parts.append(self.field)
        return ": ".join(parts)


class LorachatError(Exception):
    """Bad input: a recipe, a data row, a file or an option the user can fix."""

    exit_code = 2

    def __init__(self, reason: str, where: Where | None = None):
        self.reason = reason
        self.where = where or Where()
        super().__init__(str(self))

    def __str__(self) -> str:
        place = str(self.where)
        return f"{place}: {self.reason}" if place else self.reason


class RecipeError(LorachatError):
    """A recipe that does not validate; may carry several problems, one per line."""

    def __init__(self, problems: list[LorachatError]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class DataError(LorachatError):
    """A data file or row that cannot be used."""


class ModelError(LorachatError):
    """A base model that cannot be found or does not fit."""


class RunFailed(LorachatError):
    """A run that started on good input and then failed (NaN loss, disk full)."""

    exit_code = 1
