"""Locator -> segmenter cascade (the VNet-LA seed's two-stage scheme).

A cascade is two ordinary medseg models described by one small JSON file, the *cascade card*
(``NAME.cascade.json``); the single-model path (``ModelCard`` inside one ONNX file) is untouched::

    {
      "medseg_cascade": 1,
      "name": "hippocampus-cascade",
      "locator": "locator.onnx",            # path (relative to this file) or a model name
      "segmenter": "hippocampus.onnx",      # path (relative to this file) or a model name
      "locator_downscale": [2, 2, 2],       # (z, y, x): the locator sees the scan at spacing x factor
      "locator_labels": [],                 # locator labels that count as target; [] = every label > 0
      "locator_keep_largest": false,        # box of the largest connected target component only
      "margin_mm": 8.0,                     # added on each side of the located box; one value or (z, y, x)
      "on_empty": "whole"                   # locator finds nothing: "whole" (segment the whole scan,
    }                                       #   with a warning) or "error" (ProcessingError)

Each stage keeps its own ``ModelCard`` (preprocessing, patch, labels) inside its ONNX file; the
cascade's output labels are the segmenter's. Steps of :meth:`CascadePredictor.predict`:

1. the scan is resampled (linear) to ``spacing * locator_downscale`` (origin and direction kept),
   the locator is run there (through an ordinary :class:`Predictor`; a locator whose own card sets
   ``target_spacing_zyx`` resamples the scan itself, its cascade then has ``locator_downscale`` 1);
2. the bounding box of its target labels (with ``locator_keep_largest``: of their largest connected
   component only, so stray detections elsewhere do not stretch the box) is mapped back to
   full-resolution voxel indices (:func:`low_box_to_full`, covering every full-resolution voxel a
   located low-resolution voxel touches), widened by ``margin_mm`` converted per axis with the
   scan's spacing (:func:`margin_voxels`) and clipped to the scan (:func:`clip_box`);
3. the segmenter runs on the full-resolution crop (:func:`crop_image`: same spacing and direction,
   origin moved to the crop's first voxel), and the result is pasted back into the full grid
   (:func:`paste_labels`), so the output has the scan's exact shape, spacing, origin and direction.

Note that the segmenter's intensity normalisation (e.g. z-score) is computed on the crop, not on the
whole scan.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..card import ModelCard
from ..errors import MedsegWarning, ModelError, ProcessingError
from ..imaging import Geometry, Image
from ..progress import Progress
from .postprocess import keep_largest_component, label_values, label_volumes
from .predictor import PredictionResult, Predictor, check_channels
from .runners import TORCH_SUFFIXES
from .sliding_window import embed_probabilities

CASCADE_SUFFIX = ".cascade.json"
CASCADE_VERSION = 1
_KEYS = {"medseg_cascade", "name", "locator", "segmenter", "locator_downscale", "locator_labels",
         "locator_keep_largest", "margin_mm", "on_empty", "description"}

Box = tuple  # tuple[slice, slice, slice], (z, y, x) voxel index ranges


def is_cascade_path(model: str | os.PathLike[str] | None) -> bool:
    """True when ``model`` names a cascade card (a ``*.cascade.json`` file)."""
    return model is not None and str(model).lower().endswith(CASCADE_SUFFIX)


def _three(value, name: str, source: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ModelError(f"cascade card: {name} must be one number or three (z, y, x), got {value!r}", path=source)
    return tuple(float(v) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class CascadeSpec:
    """The cascade card (see the module docstring). Paths are resolved against ``folder``."""

    name: str
    locator: str
    segmenter: str
    locator_downscale: tuple[float, float, float] = (2.0, 2.0, 2.0)
    locator_labels: tuple[int, ...] = ()
    locator_keep_largest: bool = False
    margin_mm: tuple[float, float, float] = (8.0, 8.0, 8.0)
    on_empty: str = "whole"
    description: str = ""
    folder: Path = field(default_factory=Path)

    @classmethod
    def from_dict(cls, data: dict, *, folder: Path = Path("."), source: str = "cascade card") -> "CascadeSpec":
        if not isinstance(data, dict):
            raise ModelError("cascade card is not a JSON object", path=source)
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ModelError(f"cascade card has unknown keys {unknown}", path=source,
                             hint=f"Known keys: {', '.join(sorted(_KEYS))}.")
        if data.get("medseg_cascade") != CASCADE_VERSION:
            raise ModelError(f"cascade card needs \"medseg_cascade\": {CASCADE_VERSION}", path=source)
        missing = [k for k in ("name", "locator", "segmenter") if not data.get(k)]
        if missing:
            raise ModelError(f"cascade card lacks {', '.join(missing)}", path=source)
        downscale = _three(data.get("locator_downscale", 2.0), "locator_downscale", source)
        margin = _three(data.get("margin_mm", 8.0), "margin_mm", source)
        if any(v < 1 for v in downscale):
            raise ModelError("cascade card: locator_downscale factors must be >= 1", path=source)
        if any(v < 0 for v in margin):
            raise ModelError("cascade card: margin_mm must be >= 0", path=source)
        on_empty = data.get("on_empty", "whole")
        if on_empty not in ("whole", "error"):
            raise ModelError(f"cascade card: on_empty must be 'whole' or 'error', got {on_empty!r}", path=source)
        labels = data.get("locator_labels", [])
        if not isinstance(labels, list) or not all(isinstance(v, int) and v > 0 for v in labels):
            raise ModelError("cascade card: locator_labels must be a list of labels > 0", path=source)
        keep_largest = data.get("locator_keep_largest", False)
        if not isinstance(keep_largest, bool):
            raise ModelError(f"cascade card: locator_keep_largest must be true or false, got {keep_largest!r}",
                             path=source)
        return cls(name=str(data["name"]), locator=str(data["locator"]), segmenter=str(data["segmenter"]),
                   locator_downscale=downscale, locator_labels=tuple(labels),
                   locator_keep_largest=keep_largest, margin_mm=margin,
                   on_empty=on_empty, description=str(data.get("description", "")), folder=Path(folder))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CascadeSpec":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ModelError(f"cannot read cascade card ({err.strerror})", path=path,
                             hint="Check the path of the .cascade.json file.") from None
        except json.JSONDecodeError as err:
            raise ModelError(f"cascade card is not valid JSON ({err.msg}, line {err.lineno})", path=path) from None
        return cls.from_dict(data, folder=path.parent, source=str(path))

    def to_dict(self) -> dict:
        return {"medseg_cascade": CASCADE_VERSION, "name": self.name, "locator": self.locator,
                "segmenter": self.segmenter, "locator_downscale": list(self.locator_downscale),
                "locator_labels": list(self.locator_labels), "locator_keep_largest": self.locator_keep_largest,
                "margin_mm": list(self.margin_mm),
                "on_empty": self.on_empty, "description": self.description}

    def save(self, path: str | os.PathLike[str]) -> Path:
        from ..atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def stage_path(self, which: str) -> str:
        """The locator's / segmenter's model: a path relative to the card's folder, else a model name."""
        text = getattr(self, which)
        candidate = Path(text).expanduser()
        looks_like_path = candidate.suffix.lower() in (".onnx",) + TORCH_SUFFIXES or os.sep in text
        if not candidate.is_absolute() and (looks_like_path or (self.folder / candidate).exists()):
            return str(self.folder / candidate)
        return str(candidate) if looks_like_path else text


# --------------------------------------------------------------------------------- pure geometry

def margin_voxels(margin_mm: Sequence[float], spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """``margin_mm`` (z, y, x) in mm -> whole voxels per axis, rounded up, for a grid of ``spacing_zyx`` mm."""
    return tuple(int(math.ceil(m / s - 1e-9)) if m > 0 else 0
                 for m, s in zip(margin_mm, spacing_zyx))  # type: ignore[return-value]


def low_box_to_full(box: Sequence[slice], low_spacing_zyx: Sequence[float],
                    full_spacing_zyx: Sequence[float]) -> Box:
    """A voxel box on the locator's grid -> the full-resolution voxel box it covers (not clipped).

    Both grids share origin (centre of voxel 0) and direction (as ``resample_image_to_spacing``
    makes them), so low voxel ``j`` spans full indices ``(j - 0.5) r .. (j + 0.5) r`` with
    ``r = low_spacing / full_spacing``.
    """
    out = []
    for part, low, full in zip(box, low_spacing_zyx, full_spacing_zyx):
        ratio = float(low) / float(full)
        start = math.floor((part.start - 0.5) * ratio + 0.5 + 1e-9)
        stop = math.ceil((part.stop - 0.5) * ratio - 0.5 - 1e-9) + 1
        out.append(slice(start, max(stop, start + 1)))
    return tuple(out)


def grow_box(box: Sequence[slice], margin: Sequence[int]) -> Box:
    """``box`` widened by ``margin`` voxels on each side (not clipped)."""
    return tuple(slice(b.start - m, b.stop + m) for b, m in zip(box, margin))


def clip_box(box: Sequence[slice], shape: Sequence[int], *, source: str | None = None) -> Box:
    """``box`` clipped to a grid of ``shape`` voxels; :class:`ProcessingError` when they do not overlap."""
    out = []
    for axis, (part, size) in enumerate(zip(box, shape)):
        start, stop = max(0, int(part.start)), min(int(size), int(part.stop))
        if stop <= start:
            raise ProcessingError(f"the crop box {_fmt_box(box)} lies outside the {tuple(shape)} image "
                                  f"(axis {'zyx'[axis]})", path=source,
                                  hint="The locator's box must overlap the scan; check the cascade card's "
                                       "locator_downscale and the locator model.")
        out.append(slice(start, stop))
    return tuple(out)


def _fmt_box(box: Sequence[slice]) -> str:
    return "[" + ", ".join(f"{b.start}:{b.stop}" for b in box) + "]"


def crop_geometry(geometry: Geometry, box: Sequence[slice]) -> Geometry:
    """The geometry of the sub-grid ``box`` (z, y, x): same spacing and direction, origin at its first voxel."""
    start_xyz = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ (np.asarray(geometry.spacing) * start_xyz)
    return Geometry(geometry.spacing, tuple(float(v) for v in origin), geometry.direction)


def crop_image(image: Image, box: Sequence[slice]) -> Image:
    """``image`` restricted to ``box`` (z, y, x), a copy, with :func:`crop_geometry`. The box must lie inside."""
    box = tuple(box)
    if any(b.start < 0 or b.stop > n or b.stop <= b.start for b, n in zip(box, image.spatial_shape)):
        raise ProcessingError(f"the crop box {_fmt_box(box)} is not inside the {image.spatial_shape} image",
                              path=image.source, hint="Clip the box to the image first (clip_box).")
    array = np.ascontiguousarray(image.array[(Ellipsis,) + box])
    return Image(array, crop_geometry(image.geometry, box), image.source, dict(image.info))


def paste_labels(crop: Image, box: Sequence[slice], full_shape: Sequence[int], geometry: Geometry) -> Image:
    """Put the label map ``crop`` (segmented on ``crop_image(full, box)``) back into the full grid.

    Voxels outside ``box`` are background (0). Raises :class:`ProcessingError` when ``crop`` is not the
    sub-grid ``box`` of ``geometry`` (shape or world position differ), so a misplaced paste cannot pass.
    """
    box = tuple(box)
    expected = crop_geometry(geometry, box)
    if tuple(crop.spatial_shape) != tuple(b.stop - b.start for b in box) or not crop.geometry.matches(expected):
        raise ProcessingError(f"the segmented crop {crop.spatial_shape} does not sit at box {_fmt_box(box)} of the "
                              "image grid", path=crop.source, hint="This is a bug in the cascade; please report it.")
    full = np.zeros(tuple(full_shape), dtype=crop.array.dtype)
    full[box] = crop.array
    return Image(full, geometry, crop.source, dict(crop.info))


# --------------------------------------------------------------------------------- the two stages

class Cascade:
    """The two loaded runners of a cascade card, and the card the output is described by.

    ``card`` is the segmenter's card renamed to the cascade's name (labels, colours, channels).
    """

    def __init__(self, spec: CascadeSpec, locator, segmenter):
        self.spec, self.locator, self.segmenter = spec, locator, segmenter
        if locator.card.in_channels != segmenter.card.in_channels:
            raise ModelError(f"cascade {spec.name}: the locator takes {locator.card.in_channels} channel(s), the "
                             f"segmenter {segmenter.card.in_channels}", path=spec.name,
                             hint="Both stages must read the same input channels.")
        self.card: ModelCard = segmenter.card.with_updates(name=spec.name)

    @property
    def description(self) -> str:
        return (f"cascade (locator {self.locator.card.name}, segmenter {self.segmenter.card.name}) on "
                f"{getattr(self.segmenter, 'description', 'onnx')}")


def load_cascade(path: str | os.PathLike[str], backend: str = "onnx", device: str = "auto",
                 threads: int | None = None, *, offline: bool = False, progress=None,
                 precision: str = "fp32") -> Cascade:
    """Read a ``*.cascade.json`` card and load both stages with :func:`runners.load_runner`."""
    from .runners import load_runner

    spec = CascadeSpec.load(path)
    stages = [load_runner(spec.stage_path(which), backend=backend, device=device, threads=threads,
                          offline=offline, progress=progress, precision=precision)
              for which in ("locator", "segmenter")]
    return Cascade(spec, *stages)


@dataclass
class CascadeStep:
    """What the locator found: the full-resolution box (z, y, x) the segmenter ran on, and whether it was a fallback."""

    box: Box
    fallback: bool


class CascadePredictor:
    """Run a :class:`Cascade` over whole images; same ``predict`` interface as :class:`Predictor`.

    overlap / tta / batch_size / pad_mode apply to both stages; keep_largest to the final labels.
    ``last_step`` holds the box of the latest call (for reports and tests).
    """

    def __init__(self, cascade: Cascade, overlap: float = 0.5, tta: bool = False, batch_size: int = 1,
                 keep_largest: bool = False, pad_mode: str = "constant"):
        self.cascade, self.spec, self.card = cascade, cascade.spec, cascade.card
        self.keep_largest = bool(keep_largest)
        self.locate_predictor = Predictor(cascade.locator, overlap=overlap, tta=tta, batch_size=batch_size,
                                          pad_mode=pad_mode)
        self.segment_predictor = Predictor(cascade.segmenter, overlap=overlap, tta=tta, batch_size=batch_size,
                                           pad_mode=pad_mode)
        self.last_step: CascadeStep | None = None

    def locate(self, image: Image, progress: Progress | None = None) -> CascadeStep:
        """Stage 1: the full-resolution box (z, y, x voxels, clipped, margin included) to segment."""
        from ..preprocessing import bounding_box, resample_image_to_spacing

        spec, shape = self.spec, image.spatial_shape
        spacing = image.geometry.spacing_zyx
        if any(f != 1 for f in spec.locator_downscale):
            small = resample_image_to_spacing(image, [s * f for s, f in zip(spacing, spec.locator_downscale)])
        else:
            small = image
        found = self.locate_predictor.predict(small, progress=progress).labels
        labels = found.array
        target = np.isin(labels, spec.locator_labels) if spec.locator_labels else labels > 0
        if spec.locator_keep_largest:
            target = keep_largest_component(target.astype(np.uint8), [1]) > 0
        low_box = bounding_box(target, 0)
        if low_box is None:
            if spec.on_empty == "error":
                raise ProcessingError(f"cascade {spec.name}: the locator found no target in the scan", path=image.source,
                                      hint="Check that the scan shows the target, or set \"on_empty\": \"whole\".")
            warnings.warn(MedsegWarning(f"{image.source}: cascade {spec.name}: the locator found no target; "
                                        "segmenting the whole scan"), stacklevel=3)
            return CascadeStep(tuple(slice(0, n) for n in shape), True)
        box = low_box_to_full(low_box, found.geometry.spacing_zyx, spacing)
        box = grow_box(box, margin_voxels(spec.margin_mm, spacing))
        return CascadeStep(clip_box(box, shape, source=image.source), False)

    def predict(self, image: Image, *, probabilities: bool = False,
                progress: Progress | None = None) -> PredictionResult:
        """Segment ``image`` ((Z, Y, X) or (C, Z, Y, X)); labels (and probabilities) on its exact grid."""
        card = self.card
        check_channels(image, card)
        step = self.locate(image, progress)
        self.last_step = step
        geometry, shape, source = image.geometry, image.spatial_shape, image.source
        crop = crop_image(image, step.box)
        del image
        inner = self.segment_predictor.predict(crop, probabilities=probabilities, progress=progress)
        labels = paste_labels(inner.labels, step.box, shape, geometry)
        prob_image = None
        if probabilities and inner.probabilities is not None:
            full = embed_probabilities(inner.probabilities.array, step.box, shape, card.output_activation)
            prob_image = Image(full, geometry, source)
        if self.keep_largest:
            keep_largest_component(labels.array, label_values(card))
        rows = label_volumes(labels.array, geometry, card)
        info = {"model": card.name, "cascade_box": [[b.start, b.stop] for b in step.box],
                "cascade_fallback": step.fallback}
        return PredictionResult(labels=Image(labels.array, geometry, source, info), probabilities=prob_image,
                                volumes={r["name"]: r["volume_mm3"] for r in rows}, rows=rows)


__all__ = ["CascadeSpec", "Cascade", "CascadePredictor", "CascadeStep", "load_cascade", "is_cascade_path",
           "margin_voxels", "low_box_to_full", "grow_box", "clip_box", "crop_geometry", "crop_image",
           "paste_labels"]
