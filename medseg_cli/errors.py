"""Errors and warnings meant for a person.

Library code raises a :class:`MedsegError` subclass whose message names the file and says what to
do; the CLI (``console.run_guarded``) prints it as one red line and exits with ``exit_code``:
2 bad input, 3 model or weights, 4 runtime failure.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """A failure explained for a person. ``str(err)`` is one line: ``<file>: <problem>. <fix>``."""

    exit_code = 4

    def __init__(self, problem: str, *, path: str | Path | None = None, hint: str | None = None):
        self.problem = " ".join(str(problem).split())
        self.path = str(path) if path is not None else None
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.path}: {self.problem}" if self.path else self.problem
        if self.hint:
            text = text.rstrip(".") + ". " + self.hint
        return text


class InputError(MedsegError):
    """The user's input (scan, label, config, option) is unusable. Exit code 2."""

    exit_code = 2


class ModelError(MedsegError):
    """A model, its card, or its weights are missing or invalid. Exit code 3."""

    exit_code = 3


class ChecksumError(ModelError):
    """A downloaded file's sha256 does not match the manifest. Exit code 3."""


class ProcessingError(MedsegError):
    """Something failed while running (out of memory, disk full, a worker died). Exit code 4."""

    exit_code = 4


class MedsegWarning(UserWarning):
    """Something the user should know, that does not stop the work (shown as one yellow line)."""
