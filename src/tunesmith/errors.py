"""The exception tree of tunesmith.

Every error a user can cause is one of these, and every message says what to change::

    TunesmithError            base class; carries an exit code for the CLI (2)
    ├── ConfigError           the run configuration (YAML) is wrong
    ├── DataError             a data file is wrong; names the file, line and field
    ├── ModelError            a model reference cannot be resolved or loaded
    ├── TrainingError         training cannot start or cannot go on
    ├── CheckpointError       a checkpoint cannot be written or read
    └── ServiceError          the HTTP service (carries an HTTP status)

Third-party errors are wrapped with ``raise ... from err`` so ``--debug`` still shows the cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TunesmithError(Exception):
    """Base class of every error tunesmith raises on purpose."""

    exit_code: int = 2


class ConfigError(TunesmithError):
    """The run configuration is invalid. ``problems`` lists every problem found at once."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        text = message
        if self.problems:
            text += "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


def location(path: Path | str | None, line: int | None = None, field: str | None = None) -> str:
    """Where something is in a data file: ``train.jsonl line 41: messages[1].role``."""
    where = str(path) if path is not None else "<data>"
    if line is not None:
        where += f" line {line}"
    if field:
        where += f": {field}"
    return where


@dataclass(frozen=True)
class Problem:
    """One finding in a data file: its category, what to do about it, and where it is.

    ``code`` is a stable category (``missing_content``, ``too_long``; the full list is
    ``tunesmith.data.rejects.PROBLEM_CODES``) for reports, ``--json`` and rejects files to
    count and filter by; ``message`` says what is wrong and what to change, for a person.
    """

    code: str
    message: str
    line: int | None = None
    field: str | None = None

    def render(self, path: Path | str | None) -> str:
        return f"{location(path, self.line, self.field)}: {self.code}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "line": self.line,
                "field": self.field}


class DataError(TunesmithError):
    """A data file cannot be used. Names the file, and the line and field where known.

    ``problems`` holds every row-level finding; an error about the file as a whole holds one
    problem of category ``code``.
    """

    max_shown = 20

    def __init__(
        self,
        message: str,
        *,
        path: Path | str | None = None,
        line: int | None = None,
        field: str | None = None,
        problems: Sequence[Problem] = (),
        code: str = "data_error",
    ) -> None:
        self.path = path
        self.problems = list(problems) or [Problem(code, message, line, field)]
        if problems:
            shown = [p.render(path) for p in self.problems[: self.max_shown]]
            more = len(self.problems) - len(shown)
            text = message + "\n" + "\n".join(f"  {s}" for s in shown)
            if more:
                text += f"\n  ... and {more} more"
        else:
            text = f"{location(path, line, field)}: {message}" if path else message
        super().__init__(text)


class ModelError(TunesmithError):
    """A model reference cannot be resolved, imported or loaded."""


class TrainingError(TunesmithError):
    """Training cannot start or cannot continue."""


class CheckpointError(TunesmithError):
    """A checkpoint cannot be written or read back."""


class ServiceError(TunesmithError):
    """An error of the HTTP service, with the HTTP status it answers."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None,
                 param: str | None = None) -> None:
        self.status = status
        self.code = code
        self.param = param
        super().__init__(message)
