"""``medseg fetch NAME... | --all | FILE.onnx --name NAME``: download (or register) model weights, verified."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click
from rich.table import Table

from ..console import Console, command_options, escape
from ..errors import InputError, MedsegError, ModelError
from ..progress import NullProgress


class ByteProgress:
    """A ``progress.Progress`` that shows bytes, transfer rate and ETA (rich), on stderr."""

    def __init__(self, console: Console):
        self._console = console.err

    @contextmanager
    def task(self, description: str, total: float | None) -> Iterator[Any]:
        from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total:
            columns += [BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self._console, transient=True) as bar:
            task_id = bar.add_task(escape(description), total=total)

            class _Task:
                def advance(self, amount: float = 1) -> None:
                    bar.advance(task_id, amount)

            yield _Task()


def _progress_for(console: Console):
    return NullProgress() if isinstance(console.progress(), NullProgress) else ByteProgress(console)


def _render(console: Console, results: list[dict]) -> None:
    table = Table(title="fetched", title_justify="left")
    for column in ("model", "status", "size", "sha256", "path"):
        table.add_column(column, overflow="fold")
    for row in results:
        table.add_row(escape(row["name"]), row["status"], f"{row['size'] / 1e6:,.1f} MB", row["sha256"][:16] + "…",
                      escape(row["path"]))
    console.print(table)


@click.command(name="fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "fetch_all", is_flag=True, help="Fetch every model of the manifest.")
@click.option("--name", "local_name", default=None,
              help="Register a local .onnx file (given as NAME) in the cache under this name.")
@click.option("--mirror", default=None, envvar="MEDSEG_MIRROR", show_envvar=True,
              help="Take files from this URL or folder instead (files by basename or by sha256).")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1), envvar="MEDSEG_TIMEOUT",
              show_envvar=True, help="Seconds to wait for each read from the server.")
@click.option("--manifest", "manifest_path", default=None, envvar="MEDSEG_MANIFEST", show_envvar=True,
              type=click.Path(dir_okay=False), help="Use this weights manifest instead of the packaged one.")
@click.option("--force", is_flag=True, help="Download again even when a verified copy is cached.")
@click.option("--forget-trust", is_flag=True,
              help="Forget digests recorded on first use for these models (after an announced upstream change).")
@command_options
def fetch(names: tuple[str, ...], fetch_all: bool, local_name: str | None, mirror: str | None, timeout: float,
          manifest_path: str | None, force: bool, forget_trust: bool, console: Console) -> None:
    """Download models of the manifest into the cache (MEDSEG_HOME or the user cache folder),
    resuming interrupted downloads and checking every sha256 before a file is used.

    \b
    medseg fetch AFN1               one model (archive shared by all Autofocus models)
    medseg fetch --all --mirror /srv/models
    medseg fetch ./model.onnx --name my-model   register your own model
    """
    from ..weights import Cache, fetch_model, load_manifest, register_local_model

    cache = Cache()
    manifest = load_manifest(manifest_path)
    if local_name is not None or any(Path(n).suffix.lower() == ".onnx" and Path(n).is_file() for n in names):
        if len(names) != 1 or fetch_all:
            raise InputError("register one local file at a time", hint="Use: medseg fetch FILE.onnx --name NAME.")
        result = register_local_model(names[0], local_name, cache=cache, manifest=manifest)
        console.info(f"registered {escape(result.name)} → {escape(str(result.path))}")
        rows = [result.to_dict()]
        console.emit(rows, render=lambda: _render(console, rows))
        return
    if fetch_all:
        entries = list(manifest.entries)
    elif names:
        entries = [manifest.get(name) for name in names]
    else:
        raise InputError("name a model to fetch, or --all",
                         hint=f"Known models: {', '.join(manifest.names()) or 'none'} (see `medseg models`).")
    if forget_trust:
        for entry in entries:
            for source in entry.sources:
                if cache.forget_trust(source.url):
                    console.warn(f"forgot the digest recorded on first use for {source.url}")
    progress = _progress_for(console)
    rows: list[dict] = []
    failures: list[MedsegError] = []
    for entry in entries:
        try:
            result = fetch_model(entry, cache=cache, timeout=timeout, mirror=mirror, progress=progress, force=force)
        except MedsegError as err:
            if len(entries) == 1:
                raise
            console.error(str(err))
            failures.append(err)
            continue
        rows.append(result.to_dict())
        console.info(f"{escape(result.name)}: {result.status}")
    console.emit(rows, render=lambda: _render(console, rows) if rows else None)
    if failures:
        raise ModelError(f"{len(failures)} of {len(entries)} models could not be fetched",
                         hint="See the errors above.")
