"""``medseg models``: the models medseg knows (manifest + locally registered) and their cache status."""

from __future__ import annotations

import click
from rich.table import Table

from ..console import Console, command_options, escape

_STATUS_STYLE = {"verified": "green", "cached": "yellow", "missing": "dim"}


def list_model_rows(*, rehash: bool = False, manifest_path: str | None = None) -> list[dict]:
    """One dict per known model: name, task, architecture, modalities, labels, licence, source, status, path."""
    from ..weights import Cache, load_manifest, model_status

    cache = Cache()
    rows = []
    for entry in load_manifest(manifest_path).entries:
        status, path = model_status(entry, cache=cache, rehash=rehash)
        source = entry.sources[0]
        rows.append({"name": entry.name, "kind": "manifest", "task": entry.task, "architecture": entry.architecture,
                     "modalities": entry.modalities, "labels": entry.labels, "licence": entry.licence,
                     "description": entry.description, "citation": entry.citation, "format": source.format,
                     "url": source.url, "sha256": source.sha256, "size": source.size, "status": status,
                     "path": str(path) if status != "missing" else None})
    for name, record in sorted(cache.local_models().items()):
        path = cache.root / record["file"]
        status = "missing" if not path.is_file() else (
            "verified" if cache.is_verified(path, record.get("sha256"), rehash=rehash) else "cached")
        rows.append({"name": name, "kind": "local", "task": "", "architecture": "", "modalities": [], "labels": {},
                     "licence": "", "description": f"registered from {record.get('registered_from')}",
                     "citation": "", "format": "onnx", "url": record.get("registered_from"),
                     "sha256": record.get("sha256"), "size": record.get("size"), "status": status,
                     "path": str(path) if status != "missing" else None})
    return rows


def _render(console: Console, rows: list[dict]) -> None:
    from ..weights import cache_dir

    table = Table(title=f"models (cache: {escape(str(cache_dir()))})", title_justify="left")
    for column in ("name", "task", "architecture", "inputs", "size", "status"):
        table.add_column(column, overflow="fold")
    for row in rows:
        size = f"{row['size'] / 1e6:,.1f} MB" if row.get("size") else "?"
        style = _STATUS_STYLE.get(row["status"], "")
        table.add_row(escape(row["name"]) + (" (local)" if row["kind"] == "local" else ""), escape(row["task"]),
                      escape(row["architecture"]), escape(", ".join(row["modalities"])), size,
                      f"[{style}]{row['status']}[/{style}]")
    console.print(table)
    if not rows:
        console.print("no models known: the manifest is empty")


@click.command(name="models")
@click.option("--verify", "rehash", is_flag=True, help="Re-hash cached files instead of trusting the registry.")
@click.option("--manifest", "manifest_path", default=None, envvar="MEDSEG_MANIFEST", show_envvar=True,
              type=click.Path(dir_okay=False), help="Use this weights manifest instead of the packaged one.")
@command_options
def models(rehash: bool, manifest_path: str | None, console: Console) -> None:
    """List the models of the weights manifest and those registered locally, with their cache status:
    missing, cached (present, not verified) or verified (sha256 checked)."""
    rows = list_model_rows(rehash=rehash, manifest_path=manifest_path)
    console.emit(rows, render=lambda: _render(console, rows))
