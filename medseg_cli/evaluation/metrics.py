"""Segmentation metrics as pure array functions: overlap, volumes, surface distances, confusion.

Every function takes numpy arrays (boolean masks or integer label maps, 2D ``(Y, X)`` or 3D
``(Z, Y, X)``; a one-slice 3D array counts as 2D) and a spacing in mm per array axis. Distances are
in mm, volumes in mm³ (mm² for 2D images, whose Z spacing is ignored). The exact definitions, the
surface conventions and the empty-mask table are in docs/metrics.md; :data:`EMPTY_CASES` is that
table in code.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from ..preprocessing import bounding_box
from .surfaces import SurfaceDistances, surface_distances

# status -> values of the metrics that are not computed from counts when a mask is empty
BOTH_EMPTY, PRED_EMPTY, REF_EMPTY, OK = "both_empty", "pred_empty", "ref_empty", "ok"
STATUSES = (OK, BOTH_EMPTY, PRED_EMPTY, REF_EMPTY)
DISTANCE_KEYS = ("hd", "hd95", "assd", "msd_pred_to_ref", "msd_ref_to_pred")
METRIC_KEYS = ("dice", "iou", "precision", "recall", "specificity", "volume_pred_mm3", "volume_ref_mm3",
               "volume_diff_mm3", "hd", "hd95", "assd", "msd_pred_to_ref", "msd_ref_to_pred", "nsd")
EMPTY_CASES = {
    BOTH_EMPTY: {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "nsd": 1.0,
                 **{key: 0.0 for key in DISTANCE_KEYS}},
    PRED_EMPTY: {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "nsd": 0.0,
                 **{key: math.inf for key in DISTANCE_KEYS}},
    REF_EMPTY: {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0, "nsd": 0.0,
                **{key: math.inf for key in DISTANCE_KEYS}},
}


def planar(array: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Drop the Z axis of a one-slice 3D array (and its spacing); other arrays pass unchanged."""
    spacing = tuple(float(s) for s in spacing)
    if array.ndim == 3 and array.shape[0] == 1:
        return array[0], spacing[1:]
    return array, spacing


# ------------------------------------------------------------------------------- overlap counts

def overlap_counts(pred: np.ndarray, ref: np.ndarray, fov: np.ndarray | None = None, *,
                   box: Sequence[slice] | None = None) -> dict[str, int]:
    """True/false positives/negatives (voxel counts) of two boolean masks, inside ``fov`` if given.

    box: the bounding box of ``pred | ref`` when already known (only voxels inside it are counted).
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if fov is not None:
        fov = np.asarray(fov, dtype=bool)
        pred, ref = pred & fov, ref & fov
        total = int(np.count_nonzero(fov))
    else:
        total = int(pred.size)
    if box is None:
        box = bounding_box(pred | ref)
    if box is None:
        return {"tp": 0, "fp": 0, "fn": 0, "tn": total}
    p, r = pred[box], ref[box]
    tp = int(np.count_nonzero(p & r))
    n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(r))
    fp, fn = n_pred - tp, n_ref - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": total - tp - fp - fn}


def _ratio(numerator: float, denominator: float, if_zero: float) -> float:
    return float(numerator) / float(denominator) if denominator else float(if_zero)


def overlap_metrics(counts: dict[str, int], voxel_volume: float) -> dict[str, float]:
    """Dice, IoU, precision, recall, specificity and volumes (mm³) from :func:`overlap_counts`.

    Dice = 2TP / (2TP + FP + FN); IoU = TP / (TP + FP + FN); precision = TP / (TP + FP);
    recall = TP / (TP + FN); specificity = TN / (TN + FP). A 0/0 ratio takes its value from the
    empty-case table (both empty: 1; one empty: 0); specificity with no negatives is 1.
    """
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    both_empty = tp + fp + fn == 0
    empty_value = 1.0 if both_empty else 0.0
    volume_pred = (tp + fp) * voxel_volume
    volume_ref = (tp + fn) * voxel_volume
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "precision": _ratio(tp, tp + fp, empty_value),
        "recall": _ratio(tp, tp + fn, empty_value),
        "specificity": _ratio(tn, tn + fp, 1.0),
        "volume_pred_mm3": volume_pred,
        "volume_ref_mm3": volume_ref,
        "volume_diff_mm3": volume_pred - volume_ref,
    }


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Sørensen–Dice coefficient of two boolean masks (1.0 when both are empty)."""
    counts = overlap_counts(pred, ref)
    return _ratio(2 * counts["tp"], 2 * counts["tp"] + counts["fp"] + counts["fn"], 1.0)


# ----------------------------------------------------------------------------- surface metrics

def _weighted_percentile(distances: np.ndarray, weights: np.ndarray, percent: float) -> float:
    """The smallest distance d such that the surface weight at distances <= d reaches ``percent`` %.

    Distances sorted ascending, cumulative weight normalised by the total, first index where it
    reaches percent/100 (clipped to the last element); as DeepMind's compute_robust_hausdorff.
    """
    if distances.size == 0:
        return math.inf
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(weights[order]) / np.sum(weights[order])
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order[min(index, distances.size - 1)]])


def hausdorff(sd: SurfaceDistances, percent: float = 100.0) -> float:
    """Hausdorff distance (mm) at ``percent`` (100 = maximum, 95 = HD95); inf if one surface is empty.

    element convention: max over both directions of the area-weighted percentile of that
    direction's distances. voxel convention: percent = 100 gives the maximum of all distances;
    otherwise ``numpy.percentile`` (linear interpolation) of the union of both directions (MedPy).
    """
    if sd.pred_to_ref.size == 0 and sd.ref_to_pred.size == 0:
        return 0.0
    if sd.pred_to_ref.size == 0 or sd.ref_to_pred.size == 0:
        return math.inf
    if percent >= 100.0:
        return float(max(sd.pred_to_ref.max(), sd.ref_to_pred.max()))
    if sd.convention == "voxel":
        return float(np.percentile(np.concatenate([sd.pred_to_ref, sd.ref_to_pred]), percent))
    return max(_weighted_percentile(sd.ref_to_pred, sd.ref_weights, percent),
               _weighted_percentile(sd.pred_to_ref, sd.pred_weights, percent))


def mean_surface_distances(sd: SurfaceDistances) -> tuple[float, float]:
    """Weighted mean distance (mm) pred→ref and ref→pred (inf when the target surface is empty)."""
    def mean(distances: np.ndarray, weights: np.ndarray) -> float:
        if distances.size == 0:
            return 0.0 if sd.pred_to_ref.size == sd.ref_to_pred.size == 0 else math.inf
        if not np.all(np.isfinite(distances)):
            return math.inf
        return float(np.sum(distances * weights) / np.sum(weights))

    return mean(sd.pred_to_ref, sd.pred_weights), mean(sd.ref_to_pred, sd.ref_weights)


def assd(sd: SurfaceDistances) -> float:
    """Average symmetric surface distance (mm): the weighted mean distance over the points of both
    surfaces, (Σ w·d over pred→ref and ref→pred) / (Σ w_pred + Σ w_ref); MedPy's ``assd`` (0.5) under
    the voxel convention (all weights 1). 0 for two empty surfaces, inf when exactly one is empty."""
    total = float(np.sum(sd.pred_weights) + np.sum(sd.ref_weights))
    if total == 0:
        return 0.0
    if sd.pred_to_ref.size == 0 or sd.ref_to_pred.size == 0:
        return math.inf
    return float((np.sum(sd.pred_to_ref * sd.pred_weights) + np.sum(sd.ref_to_pred * sd.ref_weights)) / total)


def normalised_surface_dice(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """Share of both surfaces (by weight) lying within ``tolerance_mm`` of the other surface, in [0, 1].

    NSD = (w_pred[d_pred→ref <= τ] + w_ref[d_ref→pred <= τ]) / (Σ w_pred + Σ w_ref); 1 for two
    empty surfaces, 0 when exactly one is empty.
    """
    total = float(np.sum(sd.pred_weights) + np.sum(sd.ref_weights))
    if total == 0:
        return 1.0
    close = float(np.sum(sd.pred_weights[sd.pred_to_ref <= tolerance_mm])
                  + np.sum(sd.ref_weights[sd.ref_to_pred <= tolerance_mm]))
    return close / total


# ------------------------------------------------------------------------------ one label, all

def mask_status(pred_voxels: int, ref_voxels: int) -> str:
    """The empty-case status of a pair of masks from their voxel counts."""
    if pred_voxels == 0 and ref_voxels == 0:
        return BOTH_EMPTY
    if pred_voxels == 0:
        return PRED_EMPTY
    if ref_voxels == 0:
        return REF_EMPTY
    return OK


def compare_masks(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *,
                  tolerance_mm: float = 1.0, convention: str = "element",
                  fov: np.ndarray | None = None, method: str = "kdtree", workers: int = 1) -> dict:
    """Every metric of one binary prediction against its reference.

    pred, ref: boolean masks ``(Z, Y, X)`` or ``(Y, X)`` (a one-slice volume is 2D).
    spacing: mm per array axis. tolerance_mm: NSD tolerance. convention: ``element`` | ``voxel``.
    fov: optional boolean mask; voxels outside it are ignored (both masks are cut to it and
    specificity counts negatives inside it only).
    Returns ``{"status", "dice", "iou", "precision", "recall", "specificity", "volume_pred_mm3",
    "volume_ref_mm3", "volume_diff_mm3", "hd", "hd95", "assd", "msd_pred_to_ref", "msd_ref_to_pred",
    "nsd", "tolerance_mm", "voxels_pred", "voxels_ref"}``; distances of an empty case follow
    :data:`EMPTY_CASES` (``inf`` for a missing surface).
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
    pred, spacing2 = planar(pred, spacing)
    ref, _ = planar(ref, spacing)
    if fov is not None:
        fov, _ = planar(np.asarray(fov, dtype=bool), spacing)
        if fov.shape != pred.shape:
            raise ValueError(f"field-of-view mask {fov.shape} does not fit masks {pred.shape}")
        pred, ref = pred & fov, ref & fov
    box = bounding_box(pred | ref)
    counts = overlap_counts(pred, ref, box=box)  # the masks are already cut to fov: only TN needs it
    if fov is not None:
        counts["tn"] = int(np.count_nonzero(fov)) - counts["tp"] - counts["fp"] - counts["fn"]
    result: dict = {"status": mask_status(counts["tp"] + counts["fp"], counts["tp"] + counts["fn"])}
    result.update(overlap_metrics(counts, float(np.prod(spacing2))))
    if result["status"] == OK:
        sd = surface_distances(pred, ref, spacing2, convention=convention, method=method, workers=workers,
                               box=box)
        to_ref, to_pred = mean_surface_distances(sd)
        result.update({"hd": hausdorff(sd, 100.0), "hd95": hausdorff(sd, 95.0), "assd": assd(sd),
                       "msd_pred_to_ref": to_ref, "msd_ref_to_pred": to_pred,
                       "nsd": normalised_surface_dice(sd, tolerance_mm)})
    else:
        result.update(EMPTY_CASES[result["status"]])
    result.update({"tolerance_mm": float(tolerance_mm), "voxels_pred": counts["tp"] + counts["fp"],
                   "voxels_ref": counts["tp"] + counts["fn"]})
    return result


# ------------------------------------------------------------------------------- multi-class

def confusion_matrix(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int],
                     fov: np.ndarray | None = None, *, unlisted_as_background: bool = False) -> np.ndarray:
    """Confusion matrix ``(K, K)`` with rows = reference class, columns = predicted class.

    classes: the K label values, background included. A voxel whose value is not in ``classes``
    is not counted, or, with ``unlisted_as_background``, counts as ``classes[0]`` (background).
    fov: optional boolean mask of the voxels to count.
    """
    classes = [int(c) for c in classes]
    k = len(classes)
    pred = np.asarray(pred).ravel()
    ref = np.asarray(ref).ravel()
    keep_all = None if fov is None else np.asarray(fov, dtype=bool).ravel()
    total = np.zeros(k * k, dtype=np.int64)
    step = 1 << 22  # voxels per chunk: bounds the int64 temporaries on large volumes
    for low in range(0, pred.size, step):
        p, r = pred[low:low + step], ref[low:low + step]
        if keep_all is not None:
            keep = keep_all[low:low + step]
            p, r = p[keep], r[keep]
        pred_index = _class_index(p, classes)
        ref_index = _class_index(r, classes)
        if unlisted_as_background:
            pred_index[pred_index < 0] = 0
            ref_index[ref_index < 0] = 0
        valid = (pred_index >= 0) & (ref_index >= 0)
        if not valid.all():
            pred_index, ref_index = pred_index[valid], ref_index[valid]
        total += np.bincount(ref_index * k + pred_index, minlength=k * k)
    return total.reshape(k, k)


def _class_index(values: np.ndarray, classes: list[int]) -> np.ndarray:
    """Position of each value in ``classes`` (-1 when absent)."""
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = min(classes), max(classes)
    vmin, vmax = int(values.min()), int(values.max())
    lo, hi = min(low, vmin), max(high, vmax)
    if hi - lo <= 1 << 20:
        lookup = np.full(hi - lo + 1, -1, dtype=np.int64)
        lookup[np.asarray(classes) - lo] = np.arange(len(classes))
        return lookup[values.astype(np.int64) - lo]
    order = np.argsort(classes)
    sorted_classes = np.asarray(classes)[order]
    position = np.clip(np.searchsorted(sorted_classes, values), 0, len(classes) - 1)
    found = sorted_classes[position] == values
    return np.where(found, order[position], -1)


def class_scores(matrix: np.ndarray) -> dict[str, list[float]]:
    """Per-class IoU and pixel accuracy from a confusion matrix (rows reference, columns prediction).

    IoU_c = M[c,c] / (row_c + col_c - M[c,c]); PA_c = M[c,c] / row_c (the share of the reference
    voxels of class c predicted as c, i.e. per-class recall). A class with a zero denominator gets
    NaN and is left out of the means.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    hits = np.diag(matrix)
    rows, cols = matrix.sum(axis=1), matrix.sum(axis=0)
    union = rows + cols - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, hits / np.where(union > 0, union, 1), np.nan)
        pa = np.where(rows > 0, hits / np.where(rows > 0, rows, 1), np.nan)
    return {"iou": iou.tolist(), "pixel_accuracy": pa.tolist()}


def miou_mpa(matrix: np.ndarray) -> tuple[float, float]:
    """mIoU and mPA: means over classes (background included) of IoU_c and PA_c, NaN classes left out."""
    scores = class_scores(matrix)
    return _nanmean(scores["iou"]), _nanmean(scores["pixel_accuracy"])


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan
