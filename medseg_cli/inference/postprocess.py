"""After the network: probabilities to labels, keep-largest-component, volumes, and output writers
(label map, probability maps, 3D Slicer ``.seg.nrrd``). Every writer is atomic."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..card import ModelCard
from ..errors import InputError
from ..imaging import Geometry, Image, smallest_label_dtype, to_sitk, write_image, write_sitk_image

PROBABILITY_DTYPES = ("float32", "uint8")


def label_values(card: ModelCard) -> list[int]:
    """Foreground label values the model produces: 1..K-1 for softmax, 1..K for sigmoid."""
    count = card.num_classes if card.output_activation == "sigmoid" else card.num_classes - 1
    return list(range(1, count + 1))


def probabilities_to_labels(probabilities: np.ndarray, activation: str = "softmax", *,
                            out: np.ndarray | None = None, chunk: int = 16, implicit_first: bool = False) -> np.ndarray:
    """Label map (Z, Y, X) from probabilities (K, Z, Y, X), a few z-slices at a time (no big temporaries).

    softmax: argmax over classes (the first on ties). sigmoid: channel k gives label k + 1 where its
    probability is the largest and above 0.5, else 0. implicit_first (softmax only): ``probabilities``
    holds classes 1..K-1 only, class 0 being ``1 - their sum`` (as ``SlidingWindow.run_box`` returns them).
    """
    num_classes = probabilities.shape[0] + (1 if implicit_first else 0)
    shape = probabilities.shape[1:]
    dtype = np.uint8 if num_classes < 255 else np.uint16
    labels = out if out is not None else np.empty(shape, dtype=dtype)
    for z0 in range(0, shape[0], chunk):
        part = probabilities[:, z0:z0 + chunk]
        if activation == "sigmoid":
            best = part.argmax(axis=0)
            top = np.take_along_axis(part, best[None], axis=0)[0]
            labels[z0:z0 + chunk] = np.where(top > 0.5, best + 1, 0)
        elif implicit_first:
            best = part.argmax(axis=0)
            top = np.take_along_axis(part, best[None], axis=0)[0]
            background = 1.0 - part.sum(axis=0)
            labels[z0:z0 + chunk] = np.where(background >= top, 0, best + 1)
        else:
            labels[z0:z0 + chunk] = part.argmax(axis=0)
    return labels


def keep_largest_component(labels: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """Keep, for each label value, only its largest connected component (face connectivity); in place.

    Work is restricted to each label's bounding box. Removed voxels become background (0).
    """
    from scipy import ndimage

    present = [int(v) for v in np.unique(labels) if v != 0] if values is None else list(values)
    if not present:
        return labels
    top = max(present)
    boxes = ndimage.find_objects(labels.astype(smallest_label_dtype(labels), copy=False), max_label=top)
    for value in present:
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        region = labels[box]
        mask = region == value
        components, count = ndimage.label(mask)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        region[mask & (components != int(sizes.argmax()))] = 0
    return labels


def label_volumes(labels: np.ndarray, geometry: Geometry, card: ModelCard) -> list[dict]:
    """Per foreground label of the card: value, name, voxel count and volume (mm³, from the spacing).

    Counted a few slices at a time (``np.bincount`` would otherwise make an int64 copy of the map).
    """
    values = label_values(card)
    counts = np.zeros(max(values, default=0) + 1, dtype=np.int64)
    flat = labels.reshape(labels.shape[0], -1) if labels.ndim > 1 else labels.reshape(1, -1)
    for z0 in range(0, flat.shape[0], 8):
        part = np.bincount(flat[z0:z0 + 8].ravel(), minlength=counts.size)
        counts += part[:counts.size]
    voxel = geometry.voxel_volume_mm3
    return [{"label": v, "name": card.label_name(v), "voxels": int(counts[v]),
             "volume_mm3": float(counts[v]) * voxel} for v in values]


def write_probabilities(probabilities: np.ndarray, geometry: Geometry, path: str | os.PathLike[str],
                        dtype: str = "float32") -> Path:
    """Write (K, Z, Y, X) probabilities: a 4D NIfTI (one volume per class) or a multi-component
    NRRD/MetaImage, on ``geometry``. ``dtype="uint8"`` stores ``round(p * 255)`` (a quarter of the size).
    """
    if dtype not in PROBABILITY_DTYPES:
        raise InputError(f"unknown probability dtype {dtype!r}", hint=f"Use one of {', '.join(PROBABILITY_DTYPES)}.")
    if dtype == "uint8":
        stored = np.empty(probabilities.shape, dtype=np.uint8)
        for k in range(probabilities.shape[0]):
            stored[k] = np.rint(np.clip(probabilities[k], 0.0, 1.0) * 255.0)
    else:
        stored = probabilities.astype(np.float32, copy=False)
    return write_image(Image(stored, geometry), path)


def is_slicer_segmentation(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(".seg.nrrd")


def _slicer_metadata(labels: np.ndarray, card: ModelCard) -> dict[str, str]:
    """The key/values 3D Slicer writes in a .seg.nrrd header (one layer, one segment per label)."""
    from scipy import ndimage

    values = label_values(card)
    boxes = ndimage.find_objects(labels, max_label=max(values, default=0)) if values else []
    meta = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": "",
    }
    for index, value in enumerate(values):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            extent = "0 -1 0 -1 0 -1"
        else:  # Slicer's extent is (i min, i max, j min, j max, k min, k max) in x, y, z index order
            z, y, x = box
            extent = f"{x.start} {x.stop - 1} {y.start} {y.stop - 1} {z.start} {z.stop - 1}"
        red, green, blue = (c / 255.0 for c in card.label_color(value))
        name = card.label_name(value)
        prefix = f"Segment{index}_"
        meta.update({
            prefix + "ID": f"Segment_{value}",
            prefix + "Name": name,
            prefix + "NameAutoGenerated": "0",
            prefix + "Color": f"{red:.6g} {green:.6g} {blue:.6g}",
            prefix + "ColorAutoGenerated": "0",
            prefix + "LabelValue": str(value),
            prefix + "Layer": "0",
            prefix + "Extent": extent,
            prefix + "Tags": f"medseg.model:{card.name}|",
        })
    return meta


def write_slicer_segmentation(labels: Image, path: str | os.PathLike[str], card: ModelCard) -> Path:
    """Write a 3D Slicer segmentation (``.seg.nrrd``): the label map with segment names, colours,
    label values, layer and extent in the header, as Slicer writes them."""
    path = Path(path)
    array = labels.array.astype(smallest_label_dtype(labels.array), copy=False)
    sitk_image = to_sitk(Image(array, labels.geometry), label=True, planar=False)
    for key, value in _slicer_metadata(array, card).items():
        sitk_image.SetMetaData(key, value)
    return write_sitk_image(sitk_image, path, compress=True)


LOSSY_SUFFIXES = (".jpg", ".jpeg")
"""Formats whose compression alters pixel values: never used for label maps or probabilities."""


def check_lossless(path: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` when ``path`` names a lossy format (JPEG changes label values)."""
    if str(path).lower().endswith(LOSSY_SUFFIXES):
        raise InputError("JPEG compression alters pixel values, so a label map cannot be stored as JPEG",
                         path=path, hint="Use .png or .tif for a 2D mask (or .nii.gz, .nrrd, .mha).")


def write_labels(labels: Image, path: str | os.PathLike[str], card: ModelCard) -> Path:
    """Write the label map: a Slicer ``.seg.nrrd`` when the name ends so, else by suffix (atomic)."""
    check_lossless(path)
    if is_slicer_segmentation(path):
        return write_slicer_segmentation(labels, path, card)
    return write_image(labels, path, label=True)
