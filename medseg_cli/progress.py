"""The progress protocol library code reports to; the CLI renders it with rich (console.py).

Library functions take ``progress: Progress | None``; ``None`` means silent. A notebook user can
pass their own object with the same two methods.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class ProgressTask(Protocol):
    def advance(self, amount: float = 1) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None) -> "contextmanager[ProgressTask]": ...


class _NullTask:
    def advance(self, amount: float = 1) -> None:  # noqa: D102 - nothing to report
        pass


class NullProgress:
    """Progress that reports nothing."""

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[_NullTask]:
        yield _NullTask()


def ensure_progress(progress: "Progress | None") -> "Progress":
    """Return ``progress`` or a silent stand-in."""
    return progress if progress is not None else NullProgress()
