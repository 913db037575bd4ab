"""Terminal output: rich progress bars and tables, ``--quiet`` / ``--json`` / ``--debug``, and the one
place where a :class:`MedsegError` becomes one red line and an exit code.

Commands get a :class:`Console` through the :func:`command_options` decorator::

    @click.command()
    @click.argument("scan")
    @command_options
    def info(scan, console):
        facts = library_call(scan, progress=console.progress())
        console.emit(facts, render=lambda: console.print(...))
"""

from __future__ import annotations

import functools
import json
import math
import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click
from rich.console import Console as RichConsole
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from .errors import MedsegError, MedsegWarning
from .progress import NullProgress


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        value = float(value)
    if isinstance(value, float):
        return None if not math.isfinite(value) else value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_null(value: Any) -> Any:
    """JSON has no inf/NaN: turn them into null (the row's status says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def to_json(data: Any) -> str:
    """Strict JSON (inf/NaN -> null, numpy scalars and paths converted)."""
    return json.dumps(_finite_or_null(data), default=_json_default, indent=2, allow_nan=False)


class _RichProgress:
    """Implements the ``progress.Progress`` protocol with one shared rich live display."""

    def __init__(self, console: RichConsole):
        self._console = console
        self._progress: Progress | None = None
        self._depth = 0

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Any]:
        if self._progress is None:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=self._console, transient=True)
            self._progress.start()
        self._depth += 1
        task_id = self._progress.add_task(description, total=total)
        progress = self._progress

        class _Task:
            def advance(self, amount: float = 1) -> None:
                progress.advance(task_id, amount)

        try:
            yield _Task()
        finally:
            progress.remove_task(task_id)
            self._depth -= 1
            if self._depth == 0:
                progress.stop()
                self._progress = None


class Console:
    """Where a command's output goes: human text on stdout, warnings/errors/progress on stderr.

    quiet: no progress bars, no informational lines (results and errors still print).
    json_mode: the result is printed as one JSON document on stdout and nothing else goes there.
    """

    def __init__(self, *, quiet: bool = False, json_mode: bool = False, debug: bool = False):
        self.quiet = quiet
        self.json_mode = json_mode
        self.debug = debug
        self.out = RichConsole(highlight=False, soft_wrap=True)
        self.err = RichConsole(stderr=True, highlight=False, soft_wrap=True)

    # ---------------------------------------------------------------- progress
    def progress(self):
        """A ``progress.Progress`` for library calls (silent under --quiet, --json or no terminal)."""
        if self.quiet or self.json_mode or not self.err.is_terminal:
            return NullProgress()
        return _RichProgress(self.err)

    # ---------------------------------------------------------------- messages
    def info(self, message: str) -> None:
        if not self.quiet and not self.json_mode:
            self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]warning:[/yellow] {escape(message)}")

    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/bold red] {escape(message)}")

    def print(self, *renderables: Any) -> None:
        """Human output on stdout (suppressed in --json mode, where only the JSON goes to stdout)."""
        if not self.json_mode:
            self.out.print(*renderables)

    def emit(self, data: Any, render: Callable[[], None] | None = None) -> None:
        """Print a command's result: JSON under --json, else ``render()`` (or pretty JSON)."""
        if self.json_mode:
            click.echo(to_json(data))
        elif render is not None:
            render()
        else:
            self.out.print_json(to_json(data))


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def _install_warning_printer(console: Console) -> None:
    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
        if issubclass(category, MedsegWarning) or console.debug:
            console.warn(str(message))

    warnings.showwarning = show
    warnings.simplefilter("default", MedsegWarning)
    if not console.debug:
        for noisy in (UserWarning, DeprecationWarning, FutureWarning, RuntimeWarning):
            warnings.filterwarnings("ignore", category=noisy)
        warnings.filterwarnings("default", category=MedsegWarning)


def run_guarded(console: Console, body: Callable[[], Any]) -> Any:
    """Run a command body; map failures to one red line and an exit code (2 input, 3 model, 4 runtime)."""
    _install_warning_printer(console)
    try:
        return body()
    except MedsegError as err:
        if console.debug:
            console.err.print(traceback.format_exc())
        console.error(str(err))
        sys.exit(err.exit_code)
    except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        console.error("interrupted; nothing partial was left behind")
        sys.exit(130)
    except MemoryError:
        console.error("out of memory; try a smaller --batch, a smaller patch, or a machine with more RAM")
        sys.exit(4)
    except Exception as err:  # noqa: BLE001 - the last line of defence against a bare traceback
        if console.debug:
            console.err.print(traceback.format_exc())
        summary = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        console.error(f"internal error ({summary}); rerun with --debug for the traceback and report it")
        sys.exit(4)


def command_options(function: Callable) -> Callable:
    """Add ``--json``, ``--quiet`` and ``--debug`` to a click command and pass it a ``console``.

    The decorated function runs inside :func:`run_guarded`.
    """

    @click.option("--debug", is_flag=True, help="Show tracebacks and every warning.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars or informational lines.")
    @click.option("--json", "json_mode", is_flag=True, help="Print the result as JSON on stdout.")
    @functools.wraps(function)
    def wrapper(*args: Any, debug: bool, quiet: bool, json_mode: bool, **kwargs: Any) -> Any:
        console = Console(quiet=quiet, json_mode=json_mode, debug=debug)
        return run_guarded(console, lambda: function(*args, console=console, **kwargs))

    return wrapper
