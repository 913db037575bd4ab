"""``medseg zoo``: the networks medseg can build, with their family, dimensionality and size."""

from __future__ import annotations

import click
from rich.table import Table

from ..console import Console, command_options, escape


def count_default_parameters(name: str, in_channels: int, num_classes: int) -> int | None:
    """Parameters of zoo model ``name`` at its default (paper) width, counted on the ``meta`` device
    (no memory, no initialisation cost); ``None`` when the model cannot be built with defaults."""
    import torch

    from ..errors import MedsegError
    from ..zoo import build_model
    from ..zoo.blocks import count_parameters

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build_model(name, in_channels, num_classes)
            return count_parameters(model)
        except (MedsegError, RuntimeError, NotImplementedError, ValueError, TypeError):
            continue
    return None


def zoo_rows(*, in_channels: int = 1, num_classes: int = 2, family: str | None = None) -> list[dict]:
    """One dict per registered model: name, family, spatial_dims, parameters (at default width for
    ``in_channels`` -> ``num_classes``), description."""
    from ..errors import InputError
    from ..zoo import FAMILY_MODULES, list_models

    if family and family.lower() not in FAMILY_MODULES:
        raise InputError(f"unknown model family {family!r}", hint=f"Use one of: {', '.join(FAMILY_MODULES)}.")
    rows = []
    for entry in list_models():
        if family and entry.family.lower() != family.lower():
            continue
        rows.append({"name": entry.name, "family": entry.family, "spatial_dims": entry.spatial_dims,
                     "parameters": count_default_parameters(entry.name, in_channels, num_classes),
                     "in_channels": in_channels, "num_classes": num_classes, "description": entry.description})
    return rows


def _render(console: Console, rows: list[dict], in_channels: int, num_classes: int) -> None:
    table = Table(title=f"model zoo (parameters at default width, {in_channels} channel(s) in, "
                        f"{num_classes} class(es) out)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("family")
    table.add_column("dims", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("description", overflow="fold")
    for row in rows:
        params = f"{row['parameters']:,}" if row["parameters"] is not None else "?"
        table.add_row(escape(row["name"]), escape(row["family"]), f"{row['spatial_dims']}D", params,
                      escape(row["description"]))
    console.print(table)
    if not rows:
        console.print("no models match")


@click.command(name="zoo")
@click.option("--family", default=None, help="Only this family (autofocus, unet, vnet, foveation).")
@click.option("--in-channels", type=click.IntRange(min=1), default=1, show_default=True,
              help="Input channels used to count parameters.")
@click.option("--num-classes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Output classes used to count parameters.")
@command_options
def zoo(family: str | None, in_channels: int, num_classes: int, console: Console) -> None:
    """List the networks of the model zoo (build one by name with `model: {name: NAME}` in a training
    config): name, family, 2D/3D, parameter count at the paper's default width, description."""
    rows = zoo_rows(in_channels=in_channels, num_classes=num_classes, family=family)
    console.emit(rows, render=lambda: _render(console, rows, in_channels, num_classes))
