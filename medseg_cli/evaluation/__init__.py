"""Evaluation of segmentations against references: metrics (overlap, surface distances in mm,
mIoU/mPA), pairing of files, cohort runs and reports. Needs numpy, scipy and SimpleITK, never torch.

Pure array functions live in :mod:`.metrics` and :mod:`.surfaces`; :mod:`.cohort` reads files and
runs cases in parallel; :mod:`.report` writes ``per_case.csv`` / ``summary.json``.
"""

from .metrics import (EMPTY_CASES, assd, class_scores, compare_masks, confusion_matrix, dice, hausdorff,
                      mean_surface_distances, miou_mpa, normalised_surface_dice, overlap_counts)
from .surfaces import SurfaceDistances, surface_distances

__all__ = ["EMPTY_CASES", "SurfaceDistances", "assd", "class_scores", "compare_masks", "confusion_matrix", "dice",
           "hausdorff", "mean_surface_distances", "miou_mpa", "normalised_surface_dice", "overlap_counts",
           "surface_distances"]
