"""``medseg info SCAN``: what a scan or label map is, in numbers."""

from __future__ import annotations

import click
from rich.table import Table

from ..console import Console, command_options, escape


def _render(console: Console, facts: dict) -> None:
    from ..sizes import AREA_PIXELS, VOLUME_MM3, size_columns

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()

    def vec(values: list, digits: int = 4) -> str:
        return "(" + ", ".join(f"{v:.{digits}g}" for v in values) + ")"

    table.add_row("file", escape(str(facts["path"])))
    table.add_row("format", str(facts["format"]))
    if "dicom_series" in facts:
        others = facts.get("dicom_other_series") or {}
        uid = facts["dicom_series"] or "(no SeriesInstanceUID)"
        table.add_row("DICOM series", f"{uid} ({facts['dicom_slices']} slices"
                      + (f"; {len(others)} other series ignored)" if others else ")"))
        label = " · ".join(facts[k] for k in ("dicom_modality", "dicom_description") if facts.get(k))
        if label:
            table.add_row("DICOM modality", escape(label))
    z, y, x = facts["size_zyx"]
    table.add_row("size (Z, Y, X)", f"{z} × {y} × {x}" + (f", {facts['channels']} channels" if facts["channels"] > 1 else ""))
    if facts["size_unit"] == AREA_PIXELS:  # PNG/JPEG/TIFF/BMP: "1 mm" would be an invented size
        table.add_row("spacing", "none stored (the format keeps no physical pixel size)")
    else:
        table.add_row("spacing (x, y, z)", vec(facts["spacing_xyz_mm"]) + " mm")
        table.add_row("extent (x, y, z)", vec(facts["physical_size_xyz_mm"]) + " mm")
    table.add_row("origin (x, y, z)", vec(facts["origin_xyz_mm"], 6) + " mm (LPS)")
    d = facts["direction"]
    table.add_row("direction", " ".join(vec(d[i:i + 3], 3) for i in (0, 3, 6)))
    table.add_row("orientation", facts["orientation"] + " (world direction of increasing x, y, z index)")
    table.add_row("pixel type", str(facts["pixel_type"]))
    if facts["intensity_min"] is not None:
        table.add_row("intensity range", f"{facts['intensity_min']:.6g} … {facts['intensity_max']:.6g}")
    if facts.get("nonfinite_voxels"):
        table.add_row("NaN/Inf voxels", f"{facts['nonfinite_voxels']:,}")
    console.print(table)
    if facts.get("is_label_map"):
        labels = Table(title="labels", title_justify="left")
        labels.add_column("label", justify="right")
        columns = size_columns(facts["size_unit"])
        for heading, _ in columns:
            labels.add_column(heading, justify="right")
        for row in facts["labels"]:
            labels.add_row(str(row["label"]), *(cell(row) for _, cell in columns))
        console.print(labels)
    if facts.get("is_color_label_map"):
        colours = Table(title="colours (a colour-coded label map)", title_justify="left")
        colours.add_column("colour", justify="right")
        columns = size_columns(facts["size_unit"])
        if facts["size_unit"] == VOLUME_MM3:
            columns = columns[:2]  # voxels and mm³, as before
        for heading, _ in columns:
            colours.add_column(heading, justify="right")
        for row in facts["colors"]:
            colours.add_row(str(tuple(row["color"])), *(cell(row) for _, cell in columns))
        console.print(colours)


@click.command(name="info")
@click.argument("scan", type=click.Path(path_type=str))
@click.option("--series", "series_uid", default=None, help="DICOM SeriesInstanceUID to read from a folder.")
@click.option("--label/--no-label", "as_label", default=None,
              help="Treat the file as a label map (default: guess from its values).")
@command_options
def info(scan: str, series_uid: str | None, as_label: bool | None, console: Console) -> None:
    """Describe SCAN (NIfTI, NRRD, MetaImage, PNG/TIFF/JPEG, or a DICOM folder): size, spacing (mm),
    origin, direction, orientation code, pixel type, intensity range, and for a label map the
    voxel count and volume (mm³) of every label (of every colour for a colour-coded mask); for a 2D
    picture the area instead: mm², or pixels for PNG/JPEG/TIFF/BMP (which store no physical size)."""
    from ..imaging import describe, read_image  # numpy + SimpleITK: not loaded for `medseg info --help`
    from ..sizes import size_rows, size_unit

    image = read_image(scan, series_uid=series_uid)
    facts = describe(image, as_label=as_label)
    facts["size_unit"] = size_unit(image.source, image.spatial_shape)
    for key in ("labels", "colors"):
        if key in facts:
            facts[key] = size_rows(facts[key], facts["size_unit"], image.geometry)
    console.emit(facts, render=lambda: _render(console, facts))
