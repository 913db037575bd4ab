"""Reports of an evaluation: ``per_case.csv``, ``summary.json`` and a rich table for the terminal.

``per_case.csv`` has one row per case × label (or region); distances of a one-sided empty case are
written ``inf`` and their ``status`` column says why. ``summary.json`` is strict JSON: ``inf`` and
NaN become ``null`` (the counts ``n_inf`` and ``status`` keep the information).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..atomic import atomic_write_text, ensure_writable_folder
from ..console import escape, to_json

CSV_COLUMNS = ("case", "label", "label_values", "kind", "status", "dice", "iou", "precision", "recall",
               "specificity", "volume_pred_mm3", "volume_ref_mm3", "volume_diff_mm3", "hd", "hd95", "assd",
               "msd_pred_to_ref", "msd_ref_to_pred", "nsd", "tolerance_mm", "voxels_pred", "voxels_ref")


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        return repr(value)
    return "" if value is None else str(value)


def per_case_csv(rows: list[dict]) -> str:
    """The per-case table as CSV text (header + one line per case × label)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in CSV_COLUMNS])
    return buffer.getvalue()


def summary_document(report: dict) -> dict:
    """summary.json: everything in the report except the per-case rows (those are in the CSV)."""
    return {key: value for key, value in report.items() if key != "per_case"}


def write_reports(report: dict, folder: str | Path) -> dict[str, Path]:
    """Write ``per_case.csv`` and ``summary.json`` into ``folder`` (created), each atomically."""
    folder = Path(folder)
    ensure_writable_folder(folder)
    csv_path = atomic_write_text(folder / "per_case.csv", per_case_csv(report["per_case"]))
    json_path = atomic_write_text(folder / "summary.json", to_json(summary_document(report)) + "\n")
    return {"per_case_csv": csv_path, "summary_json": json_path}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def summary_table(report: dict):
    """A rich Table: one row per label/region with the headline numbers."""
    from rich.table import Table

    # volume_diff_mm3 is an area for 2D pictures (mm², or pixels for PNG/JPEG/TIFF): never shown as mL there;
    # PNG/JPEG/TIFF spacing is 1 per pixel, so their distances (and the NSD tolerance) are pixels, not mm
    unit = report.get("size_unit", "mm3")
    size_heading, size_scale, size_digits = {"mm3": ("ΔV mL", 1e-3, 2), "mm2": ("ΔA mm²", 1.0, 1),
                                             "pixels": ("ΔA px", 1.0, 0)}.get(unit, ("ΔV mm³ / ΔA mm²", 1.0, 1))
    distance = "px" if unit == "pixels" else "mm"
    title = (f"{report['cases']} case(s), {report['convention']} surfaces, NSD at {report['tolerance_mm']:g} "
             f"{distance} (per-label overrides in per_case.csv)")
    table = Table(title=title, title_justify="left")
    for column, justify in (("label", "left"), ("n", "right"), ("Dice", "right"), (f"HD95 {distance}", "right"),
                            (f"ASSD {distance}", "right"), ("NSD", "right"), (size_heading, "right"),
                            ("empty b/p/r", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for name, entry in report["summary"].items():
        metrics, status = entry["metrics"], entry["status"]

        def mean_sd(key: str, digits: int = 3) -> str:
            stats = metrics[key]
            if stats["mean"] is None:
                return "–"
            text = f"{stats['mean']:.{digits}f}" if stats["n"] == 1 else \
                f"{stats['mean']:.{digits}f}±{stats['std']:.{digits}f}"
            return text + (f" (+{stats['n_inf']} inf)" if stats["n_inf"] else "")

        hd95 = metrics["hd95"]
        hd95_text = "–" if hd95["median"] is None else \
            (f"{hd95['median']:.2f}" if hd95["n"] == 1 else
             f"{hd95['median']:.2f} \\[{hd95['q1']:.2f}–{hd95['q3']:.2f}]") + \
            (f" (+{hd95['n_inf']} inf)" if hd95["n_inf"] else "")
        volume = metrics["volume_diff_mm3"]
        label = escape(name if entry["kind"] == "label" else f"{name} ({entry['label_values']})")
        table.add_row(label, str(entry["cases"]), mean_sd("dice"), hd95_text, mean_sd("assd", 2),
                      mean_sd("nsd"), _fmt(None if volume["mean"] is None else volume["mean"] * size_scale,
                                           size_digits),
                      f"{status['both_empty']}/{status['pred_empty']}/{status['ref_empty']}")
    multiclass = report["multiclass"]
    if multiclass["classes"]:
        table.caption = (f"over all {len(multiclass['classes'])} classes incl. background (cohort confusion "
                         f"matrix): mIoU {_fmt(multiclass['miou'])}, mPA {_fmt(multiclass['mpa'])}. Dice, ASSD, NSD: "
                         "mean±sd; HD95: median \\[q1–q3]; inf (one mask empty) counted apart")
        table.caption_justify = "left"
    return table
