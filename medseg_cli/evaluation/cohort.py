"""Evaluate a cohort: read each (prediction, reference) pair, check it, compute every metric per
label and region, in parallel, and aggregate. The library behind ``medseg eval``; no torch.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..imaging import Image, case_stem, read_image, to_sitk
from ..progress import Progress, ensure_progress
from ..sizes import size_unit
from .metrics import (BOTH_EMPTY, EMPTY_CASES, METRIC_KEYS, STATUSES, class_scores, compare_masks,
                      confusion_matrix, miou_mpa)
from .pairing import Pair, Pairing
from .surfaces import CONVENTIONS

GEOMETRY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class EvalOptions:
    """What to measure.

    labels: label values to evaluate (None: every non-zero value found in the case's maps).
    label_names: {value: name} for reports. regions: (name, values) merged labels (BraTS style).
    tolerance_mm: default NSD tolerance; tolerances: per label value (as text), label name or
    region name. convention: ``element`` or ``voxel`` surfaces. resample_prediction: nearest-
    neighbour resampling of a prediction onto its reference's grid instead of refusing it.
    fov_mask: a mask file (every case) or folder (one per case stem): metrics only inside it.
    label_map: ``((raw values...), class)`` pairs (training's ``data.label_map``): every prediction or
    reference with as many channels as the raw keys have values (colour masks for ``R,G,B`` keys) is
    mapped to classes before scoring; other files are read as label maps.
    """

    labels: tuple[int, ...] | None = None
    label_names: tuple[tuple[int, str], ...] = ()
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    tolerance_mm: float = 1.0
    tolerances: tuple[tuple[str, float], ...] = ()
    convention: str = "element"
    resample_prediction: bool = False
    fov_mask: str | None = None
    label_map: tuple[tuple[tuple[int, ...], int], ...] = ()

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise InputError(f"unknown surface convention {self.convention!r}",
                             hint=f"Use one of: {', '.join(CONVENTIONS)}.")
        if not (self.tolerance_mm >= 0) or any(not (v >= 0) for _, v in self.tolerances):
            raise InputError("a tolerance must be a non-negative number of mm")

    def name_of(self, value: int) -> str:
        return dict(self.label_names).get(int(value), str(int(value)))

    def tolerance_for(self, key: str, name: str | None = None) -> float:
        table = dict(self.tolerances)
        for candidate in (key, name):
            if candidate is not None and candidate in table:
                return float(table[candidate])
        return float(self.tolerance_mm)


# ------------------------------------------------------------------------------ reading & checks

def as_label_array(image: Image, role: str) -> np.ndarray:
    """The image's voxels as an integer label map ``(Z, Y, X)``; :class:`InputError` if it is not one."""
    if image.has_channels and image.num_channels > 1:
        raise InputError(f"{role} has {image.num_channels} channels; a label map has one", path=image.source,
                         hint="Give an integer label map (one value per voxel), not a probability image; "
                              "map a colour-coded mask with --label-map '{\"0,0,0\": 0, \"128,0,0\": 1}'.")
    array = image.array[0] if image.has_channels else image.array
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise InputError(f"{role} holds NaN or infinite values; a label map holds whole numbers",
                             path=image.source, hint="Export the segmentation as an integer label map.")
        if not np.array_equal(array, np.round(array)):
            example = float(array[array != np.round(array)].flat[0])
            raise InputError(f"{role} holds non-integer values (e.g. {example:g}); a label map holds whole numbers",
                             path=image.source,
                             hint="Turn probabilities into labels first (threshold or argmax), then evaluate.")
        return array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{role} has pixel type {array.dtype}, not an integer label map", path=image.source)
    return array


def read_labels(image: Image, role: str, options: EvalOptions) -> np.ndarray:
    """The label map ``(Z, Y, X)`` of a prediction or reference: mapped by ``options.label_map`` when the
    file has as many channels as its keys have values, else checked by :func:`as_label_array`."""
    if options.label_map:
        from ..labelmaps import apply_label_map

        width = len(options.label_map[0][0])
        if image.num_channels == width:
            channels = as_label_array(image, role)[None] if width == 1 else image.channels()
            return apply_label_map(channels, dict(options.label_map), source=image.source)
        if image.num_channels > 1:
            raise InputError(f"{role} has {image.num_channels} channels but the --label-map keys have {width} "
                             "value(s)", path=image.source,
                             hint="Give --label-map keys with one value per channel, e.g. {\"128,0,0\": 1} for RGB.")
    return as_label_array(image, role)


def label_counts(array: np.ndarray) -> dict[int, int]:
    """Voxel count of every value present in a label map."""
    if array.size and array.min() >= 0 and array.max() < (1 << 16):
        flat = array.ravel()
        counts = np.zeros(int(array.max()) + 1, dtype=np.int64)
        for low in range(0, flat.size, 1 << 22):  # chunks bound the int64 copy bincount makes
            part = np.bincount(flat[low:low + (1 << 22)].astype(np.intp), minlength=counts.size)
            counts += part
        present = np.flatnonzero(counts)
        return {int(v): int(counts[v]) for v in present}
    values, counts = np.unique(array, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def geometry_mismatch(pred: Image, ref: Image, tolerance: float = GEOMETRY_TOLERANCE) -> list[str]:
    """What differs between two label maps' grids (shape, spacing, origin, direction)."""
    found = []
    if pred.spatial_shape != ref.spatial_shape:
        found.append(f"grid {pred.spatial_shape} vs {ref.spatial_shape} voxels (Z, Y, X)")
    return found + pred.geometry.differences(ref.geometry, tolerance)


def resample_to_reference(pred: Image, ref: Image) -> Image:
    """Nearest-neighbour resampling of a label map onto the reference's grid (outside → 0)."""
    import SimpleITK as sitk

    moving = to_sitk(pred, label=True)
    fixed = to_sitk(Image(np.zeros(ref.spatial_shape, dtype=np.uint8), ref.geometry))
    if moving.GetDimension() != fixed.GetDimension():
        raise InputError(f"cannot resample a {moving.GetDimension()}D prediction onto the {fixed.GetDimension()}D "
                         f"reference {ref.source}", path=pred.source)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(fixed)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(0)
    array = sitk.GetArrayFromImage(resampler.Execute(moving))
    if array.ndim == 2:
        array = array[None]
    return Image(array, ref.geometry, pred.source, {**pred.info, "resampled_to": ref.source})


def fov_path_for(fov: str | None, case: str) -> Path | None:
    """The field-of-view mask of a case: the file itself, or the folder's file with the case stem."""
    if fov is None:
        return None
    path = Path(fov)
    if not path.exists():
        raise InputError("field-of-view mask not found", path=path, hint="Check the --fov-mask path.")
    if path.is_file():
        return path
    for candidate in sorted(path.iterdir()):
        if candidate.is_file() and case_stem(candidate) == case:
            return candidate
    raise InputError(f"no field-of-view mask for case {case!r} in this folder", path=path,
                     hint="Name each mask like its case (any image suffix), or give one mask file.")


@lru_cache(maxsize=1)
def _read_fov_image(path: Path, mtime_ns: int) -> Image:
    """One --fov-mask file is read once per process, not once per case (mtime_ns: a rewritten file is
    read again). Callers never modify the image."""
    return read_image(path)


def read_fov(path: Path, ref: Image) -> np.ndarray:
    """A field-of-view mask on the reference's grid: True where metrics count."""
    image = _read_fov_image(path, path.stat().st_mtime_ns)
    differences = geometry_mismatch(image, ref)
    if differences:
        raise InputError(f"field-of-view mask does not lie on the grid of {ref.source}: " + "; ".join(differences),
                         path=path, hint="Give a mask with the reference's size, spacing, origin and direction.")
    array = image.array
    return np.any(array != 0, axis=0) if image.has_channels else array != 0


# -------------------------------------------------------------------------------- one case

def evaluate_case(pair: Pair, options: EvalOptions) -> dict:
    """Every metric of one pair: ``{"case", "prediction", "reference", "rows": [per label/region],
    "classes", "confusion", "miou", "mpa", "reference_values", "prediction_values", "notes"}``."""
    ref_image = read_image(pair.reference)
    pred_image = read_image(pair.prediction)
    ref = read_labels(ref_image, "reference", options)
    pred = read_labels(pred_image, "prediction", options)
    notes: list[str] = []
    differences = geometry_mismatch(pred_image, ref_image)
    if differences:
        if not options.resample_prediction:
            raise InputError(f"geometry differs from the reference {pair.reference}: " + "; ".join(differences),
                             path=pair.prediction,
                             hint="Resample the prediction onto the reference grid, or pass --resample-prediction "
                                  "(nearest neighbour)")
        pred_image = resample_to_reference(Image(pred, pred_image.geometry, pred_image.source), ref_image)
        pred = pred_image.array
        notes.append("prediction resampled (nearest neighbour) onto the reference grid: " + "; ".join(differences))
    fov_file = fov_path_for(options.fov_mask, pair.case)
    fov = read_fov(fov_file, ref_image) if fov_file is not None else None
    spacing = ref_image.geometry.spacing_zyx
    ref_counts, pred_counts = label_counts(ref), label_counts(pred)
    if options.labels is not None:
        labels = sorted(set(options.labels))
    else:
        labels = sorted((set(ref_counts) | set(pred_counts)) - {0})
    rows = []
    for value in labels:
        name = options.name_of(value)
        if value not in ref_counts and value not in pred_counts:
            metrics = empty_metrics(options.tolerance_for(str(value), name))
        else:
            metrics = compare_masks(pred == value, ref == value, spacing, convention=options.convention,
                                    tolerance_mm=options.tolerance_for(str(value), name), fov=fov)
        rows.append({"case": pair.case, "label": name, "label_values": str(value), "kind": "label", **metrics})
    for name, values in options.regions:
        metrics = compare_masks(np.isin(pred, values), np.isin(ref, values), spacing,
                                convention=options.convention, tolerance_mm=options.tolerance_for(name), fov=fov)
        rows.append({"case": pair.case, "label": name, "label_values": "+".join(map(str, values)),
                     "kind": "region", **metrics})
    classes = [0] + [v for v in labels if v != 0]
    matrix = confusion_matrix(pred, ref, classes, fov=fov, unlisted_as_background=True)
    miou, mpa = miou_mpa(matrix)
    return {"case": pair.case, "prediction": str(pair.prediction), "reference": str(pair.reference),
            "fov_mask": str(fov_file) if fov_file is not None else None,
            "spacing_zyx_mm": list(spacing), "size_unit": size_unit(pair.reference, ref.shape),
            "rows": rows, "classes": classes, "confusion": matrix.tolist(),
            "miou": miou, "mpa": mpa, "reference_values": sorted(ref_counts), "prediction_values": sorted(pred_counts),
            "notes": notes}


def empty_metrics(tolerance_mm: float) -> dict:
    """The metrics of a label absent from both maps (status both_empty), without reading arrays."""
    row = {"status": BOTH_EMPTY, **EMPTY_CASES[BOTH_EMPTY], "specificity": 1.0, "volume_pred_mm3": 0.0,
           "volume_ref_mm3": 0.0, "volume_diff_mm3": 0.0, "tolerance_mm": float(tolerance_mm),
           "voxels_pred": 0, "voxels_ref": 0}
    return {key: row[key] for key in ("status", *METRIC_KEYS, "tolerance_mm", "voxels_pred", "voxels_ref")}


# ------------------------------------------------------------------------------------ cohort

def _evaluate_safely(pair: Pair, options: EvalOptions) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate_case(pair, options)


def evaluate_pairs(pairing: Pairing, options: EvalOptions, *, jobs: int = 1,
                   progress: Progress | None = None) -> list[dict]:
    """Evaluate every pair (in ``jobs`` processes when > 1); results in case order.

    The first failing case raises its error (an :class:`InputError` naming the file).
    """
    progress = ensure_progress(progress)
    pairs = list(pairing.pairs)
    results: dict[str, dict] = {}
    with progress.task("evaluating", total=len(pairs)) as task:
        if jobs <= 1 or len(pairs) <= 1:
            for pair in pairs:
                results[pair.case] = evaluate_case(pair, options)
                task.advance(1)
        else:
            with ProcessPoolExecutor(max_workers=min(jobs, len(pairs))) as pool:
                futures = {pool.submit(_evaluate_safely, pair, options): pair for pair in pairs}
                try:
                    for future in as_completed(futures):
                        result = future.result()
                        results[result["case"]] = result
                        task.advance(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    return [results[pair.case] for pair in pairs]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n_inf = sum(1 for v in values if v is not None and math.isinf(v))
    if finite.size == 0:
        return {"mean": None, "std": None, "median": None, "q1": None, "q3": None, "n": 0, "n_inf": n_inf}
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    return {"mean": float(finite.mean()), "std": float(finite.std(ddof=0)), "median": float(median),
            "q1": float(q1), "q3": float(q3), "n": int(finite.size), "n_inf": int(n_inf)}


def aggregate(results: list[dict], options: EvalOptions, pairing: Pairing | None = None) -> dict:
    """The report: per-case rows (labels missing from a case filled in as both_empty), a summary
    per label and region (mean, std, median, quartiles over finite values; inf counted apart; counts
    per status), mIoU/mPA per case and over the cohort (summed confusion matrix), warnings."""
    # labels evaluated anywhere are evaluated everywhere (absent from both maps = both_empty)
    label_rows: dict[str, dict] = {}
    for result in results:
        for row in result["rows"]:
            label_rows.setdefault(row["label"], row)
    order = sorted((r for r in label_rows.values() if r["kind"] == "label"), key=lambda r: int(r["label_values"]))
    order += [r for r in label_rows.values() if r["kind"] == "region"]
    rows = []
    for result in results:
        present = {row["label"]: row for row in result["rows"]}
        for template in order:
            if template["label"] in present:
                rows.append(present[template["label"]])
            else:
                tolerance = options.tolerance_for(template["label_values"], template["label"])
                rows.append({"case": result["case"], "label": template["label"],
                             "label_values": template["label_values"], "kind": template["kind"],
                             **empty_metrics(tolerance)})
    rows_of: dict[str, list[dict]] = {}
    for row in rows:
        rows_of.setdefault(row["label"], []).append(row)
    summary = {}
    for template in order:
        label_rows_all = rows_of[template["label"]]
        summary[template["label"]] = {
            "label_values": template["label_values"], "kind": template["kind"], "cases": len(label_rows_all),
            "status": {s: sum(1 for r in label_rows_all if r["status"] == s) for s in STATUSES},
            "metrics": {key: _stats([r[key] for r in label_rows_all]) for key in METRIC_KEYS},
        }
    # cohort confusion matrix over the union of classes
    classes = sorted({c for result in results for c in result["classes"]})
    index = {c: i for i, c in enumerate(classes)}
    total = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for result in results:
        positions = [index[c] for c in result["classes"]]
        total[np.ix_(positions, positions)] += np.asarray(result["confusion"], dtype=np.int64)
    cohort_miou, cohort_mpa = miou_mpa(total) if classes else (math.nan, math.nan)
    scores = class_scores(total) if classes else {"iou": [], "pixel_accuracy": []}
    # prediction values the references never use
    reference_set = {v for result in results for v in result["reference_values"]}
    reference_set |= {value for value, _ in options.label_names} | {0}
    unexpected: dict[str, list[str]] = {}
    for result in results:
        for value in result["prediction_values"]:
            if value not in reference_set:
                unexpected.setdefault(str(value), []).append(result["case"])
    units = {r.get("size_unit") for r in results}
    report = {
        "cases": len(results),
        # what volume_*_mm3 hold: mm3 (3D), mm2 or pixels (2D pictures, spacing 1 for PNG/JPEG/TIFF); None if mixed
        "size_unit": units.pop() if len(units) == 1 else None,
        "convention": options.convention,
        "tolerance_mm": options.tolerance_mm,
        "labels": [{"label": t["label"], "values": t["label_values"], "kind": t["kind"]} for t in order],
        "summary": summary,
        "multiclass": {
            "classes": classes,
            "miou": _finite(cohort_miou), "mpa": _finite(cohort_mpa),
            "iou_per_class": dict(zip(map(str, classes), map(_finite, scores["iou"]))),
            "pixel_accuracy_per_class": dict(zip(map(str, classes), map(_finite, scores["pixel_accuracy"]))),
            "miou_mean_over_cases": _stats([r["miou"] for r in results if not math.isnan(r["miou"])])["mean"],
            "mpa_mean_over_cases": _stats([r["mpa"] for r in results if not math.isnan(r["mpa"])])["mean"],
        },
        "per_case": rows,
        "case_details": [{"case": r["case"], "prediction": r["prediction"], "reference": r["reference"],
                          "fov_mask": r["fov_mask"], "miou": _finite(r["miou"]), "mpa": _finite(r["mpa"]),
                          "notes": r["notes"]} for r in results],
        "unexpected_prediction_labels": unexpected,
        "unmatched_predictions": [str(p) for p in (pairing.unmatched_predictions if pairing else [])],
        "unmatched_references": [str(p) for p in (pairing.unmatched_references if pairing else [])],
    }
    return report


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def report_warnings(report: dict) -> list[str]:
    """One line per thing the user should know: unmatched files, unexpected labels, resampling."""
    lines = []
    for key, role in (("unmatched_predictions", "prediction"), ("unmatched_references", "reference")):
        files = report[key]
        if files:
            names = ", ".join(Path(f).name for f in files[:5]) + (", ..." if len(files) > 5 else "")
            lines.append(f"{len(files)} {role} file(s) without a partner, not evaluated: {names}")
    # one line per set of cases, not per value: an intensity image given as a prediction has hundreds
    by_cases: dict[tuple[str, ...], list[str]] = {}
    for value, cases in sorted(report["unexpected_prediction_labels"].items(), key=lambda kv: int(kv[0])):
        by_cases.setdefault(tuple(cases), []).append(value)
    for cases, values in by_cases.items():
        names = ", ".join(cases[:5]) + (", ..." if len(cases) > 5 else "")
        which = f"label {values[0]} appears" if len(values) == 1 else \
            f"{len(values)} labels ({', '.join(values[:8])}{', ...' if len(values) > 8 else ''}) appear"
        lines.append(f"{which} in predictions but in no reference (cases: {names})")
    for detail in report["case_details"]:
        for note in detail["notes"]:
            lines.append(f"{detail['case']}: {note}")
    return lines
