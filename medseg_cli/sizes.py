"""Per-label sizes as ``predict`` and ``info`` report them: volumes for 3D images, areas for 2D pictures.

A 3D image (more than one slice) gets ``volume_mm3`` (and mL in tables). A 2D picture (one slice) gets
an area instead, because multiplying by a slice thickness would invent a third dimension:

* ``area_mm2`` (voxels × x spacing × y spacing) when its format stores a physical pixel size: NIfTI,
  NRRD, MetaImage, a DICOM series;
* ``area_pixels`` when it does not: PNG, JPEG, TIFF, BMP (their spacing is 1 per pixel by convention,
  or a print resolution, never a physical size).

Rows keep their ``voxels`` count (pixels in 2D) in every case.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from .imaging import PLANAR_SUFFIXES, Geometry, file_suffix

VOLUME_MM3, AREA_MM2, AREA_PIXELS = "mm3", "mm2", "pixels"


def size_unit(source: str | os.PathLike[str] | None, shape_zyx: Sequence[int]) -> str:
    """``"mm3"`` for a volume; for a one-slice picture ``"mm2"`` when the file ``source`` stores its
    spacing (any format but PNG/JPEG/TIFF/BMP; a folder is a DICOM series), else ``"pixels"``."""
    if int(shape_zyx[0]) != 1:
        return VOLUME_MM3
    if source is not None and file_suffix(source) in PLANAR_SUFFIXES:
        return AREA_PIXELS
    return AREA_MM2


def size_rows(rows: Sequence[dict], unit: str, geometry: Geometry) -> list[dict]:
    """Rows with ``voxels`` (and ``volume_mm3``) in the keys of ``unit``: unchanged for ``"mm3"``; for a 2D
    picture ``volume_mm3`` is replaced by ``area_mm2`` (voxels × x × y spacing, mm²) or ``area_pixels``."""
    if unit == VOLUME_MM3:
        return [dict(row) for row in rows]
    pixel_mm2 = float(geometry.spacing[0]) * float(geometry.spacing[1])
    out = []
    for row in rows:
        row = {key: value for key, value in row.items() if key != "volume_mm3"}
        if unit == AREA_MM2:
            row["area_mm2"] = float(row["voxels"]) * pixel_mm2
        else:
            row["area_pixels"] = int(row["voxels"])
        out.append(row)
    return out


def size_columns(unit: str) -> list[tuple[str, Callable[[dict], str]]]:
    """Table columns (heading, cell formatter) for the sizes of one row, after its label columns."""
    if unit == AREA_PIXELS:
        return [("area (pixels)", lambda row: f"{row['area_pixels']:,}")]
    if unit == AREA_MM2:
        return [("pixels", lambda row: f"{row['voxels']:,}"), ("area (mm²)", lambda row: f"{row['area_mm2']:,.1f}")]
    return [("voxels", lambda row: f"{row['voxels']:,}"), ("volume (mm³)", lambda row: f"{row['volume_mm3']:,.1f}"),
            ("volume (mL)", lambda row: f"{row['volume_mm3'] / 1000:,.2f}")]


def size_text(row: dict) -> str:
    """A row's size in a few characters, for one-line summaries: ``1.23 mL``, ``45.6 mm²``, ``789 px``."""
    if "area_pixels" in row:
        return f"{row['area_pixels']:,} px"
    if "area_mm2" in row:
        return f"{row['area_mm2']:,.1f} mm²"
    return f"{row['volume_mm3'] / 1000:.2f} mL"
