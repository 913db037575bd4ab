"""Preprocessing with exact inverses: region of interest, resampling, cropping, intensity normalisation.

Arrays are in array order: ``(Z, Y, X)`` for one volume, ``(C, Z, Y, X)`` for channels or class
probabilities; spacings are ``(z, y, x)`` millimetres. A 2D image is one slice (``Z = 1``): an axis of
length 1 is never resampled or blurred (it keeps its length 1 and its spacing).

Resampling keeps the world position of voxel ``(0, 0, 0)`` fixed (the origin) and the direction;
only the spacing and the number of voxels change, so the inverse is mechanical: resample back with
the original spacing onto the original shape. Labels are never interpolated linearly (nearest
neighbour, or linear on one-hot channels followed by argmax).

:class:`Preprocessor` chains it all as recorded in a model card's ``preprocessing`` dict and returns
a :class:`PreprocessState` that its ``inverse_*`` methods use to bring network outputs back onto the
exact original grid.

Everything works in float32 (statistics accumulate in float64 over chunks) so that a
512 × 512 × 600 CT fits in a few times its own size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .errors import InputError, ModelError
from .imaging import Geometry, Image

Box = tuple  # tuple[slice, ...]

_CHUNK = 1 << 22  # elements per chunk for float64 statistics (32 MiB)


# ----------------------------------------------------------------------------------- boxes, crops

def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """Tight bounding box of the non-zero voxels of ``mask`` as one slice per axis.

    margin: voxels added on each side (one int, or one per axis); the box is clipped to the array.
    Returns ``None`` when ``mask`` has no non-zero voxel.
    """
    mask = np.asarray(mask)
    margins = _per_axis(margin, mask.ndim, "margin")
    box = []
    current = mask
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(current, axis=other) if other else current)
        if hits.size == 0:
            return None
        low = max(0, int(hits[0]) - margins[axis])
        high = min(mask.shape[axis], int(hits[-1]) + 1 + margins[axis])
        box.append(slice(low, high))
        # later axes only need to look inside the tight extent found so far
        index = [slice(None)] * mask.ndim
        index[axis] = slice(int(hits[0]), int(hits[-1]) + 1)
        current = current[tuple(index)]
    return tuple(box)


def _per_axis(value: int | float | Sequence, ndim: int, name: str) -> list:
    if np.isscalar(value):
        return [value] * ndim
    values = list(value)  # type: ignore[arg-type]
    if len(values) != ndim:
        raise ValueError(f"{name} needs 1 or {ndim} values, got {len(values)}")
    return values


def crop(array: np.ndarray, box: Sequence[slice]) -> np.ndarray:
    """``array`` restricted to ``box``; the box applies to the last ``len(box)`` axes (a view)."""
    return array[(Ellipsis, *box)]


def uncrop(array: np.ndarray, box: Sequence[slice], full_shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """Inverse of :func:`crop`: place ``array`` at ``box`` in a new array of ``full_shape`` filled with ``fill``.

    ``full_shape`` is either the whole shape or only the last ``len(box)`` (spatial) axes; leading
    axes are then taken from ``array``.
    """
    full_shape = tuple(int(v) for v in full_shape)
    if len(full_shape) == len(box):
        full_shape = tuple(array.shape[: array.ndim - len(box)]) + full_shape
    out = np.full(full_shape, fill, dtype=array.dtype)
    out[(Ellipsis, *box)] = array
    return out


# ---------------------------------------------------------------------------------- resampling

def resampled_shape(shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                    target_spacing_zyx: Sequence[float | None]) -> tuple[int, int, int]:
    """Voxels per axis after resampling ``shape_zyx`` from ``spacing_zyx`` to ``target_spacing_zyx`` (mm).

    ``round(n · spacing / target)``, at least 1; an axis of length 1 (2D) or with target ``None``
    keeps its length.
    """
    out = []
    for n, s, t in zip(shape_zyx, spacing_zyx, _full_target(target_spacing_zyx, spacing_zyx)):
        out.append(int(n) if int(n) == 1 or t is None else max(1, int(round(int(n) * float(s) / float(t)))))
    return tuple(out)  # type: ignore[return-value]


def _full_target(target: Sequence[float | None] | None, spacing: Sequence[float]) -> list:
    """Target spacing as one value (or None = keep) per axis; a 2-value target leaves z alone."""
    if target is None:
        return [None] * len(spacing)
    target = list(target)
    if len(target) < len(spacing):
        target = [None] * (len(spacing) - len(target)) + target
    if len(target) != len(spacing):
        raise ValueError(f"target spacing {target} does not match {len(spacing)} axes")
    return target


def _effective_spacing(shape, spacing, target) -> tuple[float, ...]:
    """The spacing actually used: target where given and the axis is not a singleton, else unchanged."""
    return tuple(float(s) if (int(n) == 1 or t is None) else float(t)
                 for n, s, t in zip(shape, spacing, _full_target(target, spacing)))


def resample_array(array: np.ndarray, spacing_zyx: Sequence[float],
                   target_spacing_zyx: Sequence[float | None] | None = None, *,
                   out_shape: Sequence[int] | None = None, order: int = 1) -> np.ndarray:
    """Resample a ``(Z, Y, X)`` or ``(C, Z, Y, X)`` array from ``spacing_zyx`` to ``target_spacing_zyx`` (mm).

    The centre of voxel 0 stays where it is: output voxel ``i`` samples input index
    ``i · target / spacing``; samples beyond the last voxel take the edge value.
    out_shape: output ``(Z, Y, X)``; it wins over the shape implied by the target spacing. Given
        alone, the target spacing is ``spacing · n_in / n_out`` (same physical extent).
    order: 0 nearest (keeps the dtype; for labels), 1 linear, 3 cubic B-spline (float32 output).
    Axes of length 1 in both input and output are copied, never interpolated.
    """
    if order not in (0, 1, 3):
        raise ValueError(f"interpolation order must be 0, 1 or 3, got {order}")
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected (Z, Y, X) or (C, Z, Y, X), got shape {array.shape}")
    shape = array.shape[-3:]
    spacing = [float(v) for v in spacing_zyx]
    if target_spacing_zyx is None and out_shape is None:
        raise ValueError("give target_spacing_zyx or out_shape")
    if out_shape is None:
        out_shape = resampled_shape(shape, spacing, target_spacing_zyx)  # type: ignore[arg-type]
    out_shape = tuple(int(v) for v in out_shape)
    if target_spacing_zyx is None:
        target = [s * n / m for s, n, m in zip(spacing, shape, out_shape)]
    else:
        target = [s if t is None else float(t) for s, t in zip(spacing, _full_target(target_spacing_zyx, spacing))]
    scale = [1.0 if (n == 1 and m == 1) else t / s for n, m, s, t in zip(shape, out_shape, spacing, target)]
    out_dtype = array.dtype if order == 0 else np.float32
    if array.dtype == bool:
        out_dtype = np.uint8 if order == 0 else np.float32
    if tuple(out_shape) == tuple(shape) and all(abs(f - 1.0) < 1e-9 for f in scale):
        return array.astype(out_dtype, copy=True)
    volumes = array[None] if array.ndim == 3 else array
    out = np.empty((volumes.shape[0],) + out_shape, dtype=out_dtype)
    for c in range(volumes.shape[0]):
        source = volumes[c]
        if source.dtype == bool:
            source = source.view(np.uint8)
        if order == 3:
            source = source.astype(np.float32, copy=True)
            for axis, n in enumerate(shape):
                if n > 1:
                    ndimage.spline_filter1d(source, 3, axis=axis, output=source, mode="mirror")
            mode = "mirror"
        elif order == 1 and source.dtype != np.float32:
            source = source.astype(np.float32)
            mode = "nearest"
        else:
            mode = "nearest"
        ndimage.affine_transform(source, np.asarray(scale), offset=0.0, output_shape=out_shape,
                                 output=out[c], order=order, mode=mode, prefilter=False)
    if array.dtype == bool and order == 0:
        out = out.astype(bool)
    return out[0] if array.ndim == 3 else out


def resample_labels(labels: np.ndarray, spacing_zyx: Sequence[float],
                    target_spacing_zyx: Sequence[float | None] | None = None, *,
                    out_shape: Sequence[int] | None = None, mode: str = "nearest") -> np.ndarray:
    """Resample a ``(Z, Y, X)`` label map; never interpolates label values linearly.

    mode: ``"nearest"`` (nearest neighbour) or ``"onehot"`` (linear interpolation of each label's
    indicator, then the label with the highest value wins: smoother edges, label set kept).
    The result has the dtype of ``labels``.
    """
    labels = np.asarray(labels)
    if mode == "nearest":
        return resample_array(labels, spacing_zyx, target_spacing_zyx, out_shape=out_shape, order=0)
    if mode != "onehot":
        raise ValueError(f"label resampling mode must be 'nearest' or 'onehot', got {mode!r}")
    values = np.unique(labels)
    best = None
    out = None
    for value in values:
        score = resample_array((labels == value), spacing_zyx, target_spacing_zyx, out_shape=out_shape, order=1)
        if best is None:
            best, out = score, np.full(score.shape, value, dtype=labels.dtype)
            continue
        better = score > best
        best[better] = score[better]
        out[better] = value
    return out


def _target_geometry(geometry: Geometry, spacing_zyx: Sequence[float]) -> Geometry:
    return Geometry(tuple(float(v) for v in spacing_zyx)[::-1], geometry.origin, geometry.direction)


def resample_image_to_spacing(image: Image, target_spacing_zyx: Sequence[float | None], *,
                              is_label: bool = False, order: int = 1) -> Image:
    """``image`` resampled to ``target_spacing_zyx`` (mm), same origin and direction.

    Labels use nearest neighbour; images use ``order`` (1 linear, 3 B-spline) and become float32.
    Axes of length 1 keep their spacing.
    """
    spacing = image.geometry.spacing_zyx
    shape = resampled_shape(image.spatial_shape, spacing, target_spacing_zyx)
    new_spacing = _effective_spacing(image.spatial_shape, spacing, target_spacing_zyx)
    if is_label:
        array = (resample_labels(image.array, spacing, new_spacing, out_shape=shape) if image.array.ndim == 3
                 else resample_array(image.array, spacing, new_spacing, out_shape=shape, order=0))
    else:
        array = resample_array(image.array, spacing, new_spacing, out_shape=shape, order=order)
    return Image(array, _target_geometry(image.geometry, new_spacing), image.source, dict(image.info))


def resample_image_to_grid(image: Image, shape_zyx: Sequence[int], geometry: Geometry, *,
                           is_label: bool = False) -> Image:
    """``image`` resampled onto an exact reference grid (``shape_zyx`` voxels, ``geometry``), in world space.

    Uses SimpleITK (physical coordinates, so any origin / direction / spacing); nearest neighbour for
    labels (dtype kept), linear for images (float32). Voxels outside the source image become 0.
    """
    import SimpleITK as sitk

    shape_zyx = tuple(int(v) for v in shape_zyx)
    if image.geometry.matches(geometry, 1e-6) and image.spatial_shape == shape_zyx:
        return Image(image.array.copy(), geometry, image.source, dict(image.info))
    reference = sitk.Image([shape_zyx[2], shape_zyx[1], shape_zyx[0]], sitk.sitkUInt8)
    geometry.apply_to(reference)
    volumes = image.channels()
    out_dtype = volumes.dtype if is_label else np.float32
    if volumes.dtype == bool:
        out_dtype = np.dtype(bool)
    out = np.empty((volumes.shape[0],) + shape_zyx, dtype=out_dtype)
    for c in range(volumes.shape[0]):
        source_array = volumes[c]
        if is_label:
            source_array = source_array.astype(np.int32 if source_array.dtype.itemsize <= 4 else np.int64)
        else:
            source_array = source_array.astype(np.float32, copy=False)
        source = sitk.GetImageFromArray(source_array)
        image.geometry.apply_to(source)
        interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
        result = sitk.Resample(source, reference, sitk.Transform(), interpolator, 0.0, source.GetPixelID())
        out[c] = sitk.GetArrayViewFromImage(result)
    array = out if image.has_channels else out[0]
    return Image(array, geometry, image.source, dict(image.info))


# ------------------------------------------------------------------------------- normalisation

def _values(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Finite values of ``array`` (inside ``mask`` when given), flattened (a copy only when needed)."""
    values = array[np.asarray(mask, dtype=bool)] if mask is not None else array.reshape(-1)
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():
            values = values[finite]
    return values


def merge_moments(moments: tuple[int, float, float], chunk: np.ndarray) -> tuple[int, float, float]:
    """Fold a non-empty chunk of values into running ``(count, mean, M2)`` (Chan et al.'s parallel
    update, in float64); ``sqrt(M2 / count)`` is the population standard deviation."""
    count, mean, m2 = moments
    values = chunk.astype(np.float64).reshape(-1)
    n = values.size
    chunk_mean = float(values.mean())
    chunk_m2 = float(np.square(values - chunk_mean).sum())
    delta = chunk_mean - mean
    total = count + n
    return total, mean + delta * n / total, m2 + chunk_m2 + delta * delta * count * n / total


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of a 1-D array, in float64, chunk by chunk."""
    count, mean, m2 = 0, 0.0, 0.0
    for start in range(0, values.size, _CHUNK):
        count, mean, m2 = merge_moments((count, mean, m2), values[start:start + _CHUNK])
    if count == 0:
        return 0.0, 0.0
    return mean, math.sqrt(max(m2 / count, 0.0))


def _standardise(array: np.ndarray, mean: float, std: float) -> np.ndarray:
    out = np.array(array, dtype=np.float32, copy=True)
    out -= np.float32(mean)
    if std > 0:
        out /= np.float32(std)
    return out


def zscore(array: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(array − mean) / std`` as float32, statistics over ``mask`` (or every finite voxel).

    A constant region (std 0) only has its mean subtracted; an empty mask uses the whole array.
    """
    values = _values(array, mask)
    if values.size == 0 and mask is not None:
        values = _values(array, None)
    mean, std = _mean_std(values)
    return _standardise(array, mean, std)


def zscore_in_roi(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score with the statistics of the RoI ``mask``; voxels outside the mask are set to 0 (float32)."""
    mask = np.asarray(mask, dtype=bool)
    out = zscore(array, mask)
    out[~mask] = 0.0
    return out


def autofocus_normalise(array: np.ndarray, mask: np.ndarray | None, *,
                        percentiles: Sequence[float] = (5.0, 95.0), std_cutoff: float = 3.0,
                        cut_below_image_mean: bool = True) -> np.ndarray:
    """The DeepMedic / Autofocus intensity normalisation (DIGEST §1.7), float32.

    1. negative intensities are set to 0;
    2. statistics start from the voxels inside the RoI ``mask``;
    3. keep those strictly between the RoI's 5th and 95th percentiles;
    4. and strictly within RoI-mean ± 3 · RoI-std (mean and std of the whole RoI);
    5. and strictly above the whole-image mean;
    6. the whole image (inside and outside the mask) is z-scored with the mean and std of that set.

    The published script only normalised inside its step-5 branch and skipped the first subject
    (bug 6); here the z-scoring always happens. When the final set is empty the RoI statistics are
    used (the whole image when the RoI is empty too); std 0 subtracts the mean only.
    """
    image = np.array(array, dtype=np.float32, copy=True)
    image[~np.isfinite(image)] = 0.0
    np.maximum(image, 0.0, out=image)
    roi = np.ones(image.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    roi_values = image[roi]
    if roi_values.size == 0:
        roi, roi_values = np.ones(image.shape, dtype=bool), image.reshape(-1)
    keep = roi.copy()
    if percentiles is not None:
        low, high = np.percentile(roi_values, [float(percentiles[0]), float(percentiles[1])])
        keep &= (image > low) & (image < high)
    roi_mean, roi_std = _mean_std(roi_values)
    if std_cutoff is not None:
        keep &= (image > roi_mean - std_cutoff * roi_std) & (image < roi_mean + std_cutoff * roi_std)
    if cut_below_image_mean:
        image_mean, _ = _mean_std(image.reshape(-1))
        keep &= image > image_mean
    final = image[keep]
    mean, std = _mean_std(final) if final.size else (roi_mean, roi_std)
    image -= np.float32(mean)
    if std > 0:
        image /= np.float32(std)
    return image


def ct_window(array: np.ndarray, low: float, high: float, *,
              scale_to: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """Clip to ``[low, high]`` (e.g. HU) and map linearly onto ``scale_to`` (float32)."""
    low, high = float(low), float(high)
    if not high > low:
        raise ValueError(f"CT window needs low < high, got [{low}, {high}]")
    a, b = float(scale_to[0]), float(scale_to[1])
    out = np.array(array, dtype=np.float32, copy=True)
    np.clip(out, low, high, out=out)
    out -= np.float32(low)
    out *= np.float32((b - a) / (high - low))
    out += np.float32(a)
    return out


def percentile_zscore(array: np.ndarray, mask: np.ndarray | None = None, lower: float = 0.5,
                      upper: float = 99.5) -> np.ndarray:
    """nnU-Net-style: clip to the ``lower``/``upper`` percentiles (of the masked voxels), then z-score
    with the statistics of the clipped masked voxels (float32)."""
    values = _values(array, mask)
    if values.size == 0:
        values = _values(array, None)
    if values.size == 0:
        return np.zeros(array.shape, dtype=np.float32)
    low, high = np.percentile(values, [float(lower), float(upper)])
    clipped_values = np.clip(values, low, high)
    mean, std = _mean_std(clipped_values)
    out = np.array(array, dtype=np.float32, copy=True)
    np.clip(out, low, high, out=out)
    out -= np.float32(mean)
    if std > 0:
        out /= np.float32(std)
    return out


def scale(array: np.ndarray, divide_by: float = 1.0, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """``(array / divide_by − mean) / std`` as float32 (e.g. 8-bit images: divide_by 255)."""
    out = np.array(array, dtype=np.float32, copy=True)
    out /= np.float32(divide_by)
    out -= np.float32(mean)
    out /= np.float32(std)
    return out


# kind -> {parameter: default}; ``...`` marks a required parameter
NORMALIZATION_KINDS: dict[str, dict[str, Any]] = {
    "none": {},
    "zscore": {"use_roi": True},
    "zscore_roi": {},
    "percentile_zscore": {"lower": 0.5, "upper": 99.5, "use_roi": True},
    "ct_window": {"low": ..., "high": ..., "scale_to": [0.0, 1.0]},
    "autofocus": {"percentiles": [5.0, 95.0], "std_cutoff": 3.0, "cut_below_image_mean": True},
    "scale": {"divide_by": 1.0, "mean": 0.0, "std": 1.0},
}


def normalization_spec(spec: dict | str | None) -> dict:
    """Validate a normalisation spec and fill in its defaults: ``{"kind": ..., params}``.

    Raises :class:`ModelError` on an unknown kind or parameter, a missing required one, or a bad value.
    """
    if spec is None:
        spec = {"kind": "none"}
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict):
        raise ModelError(f"normalization must be a mapping with a 'kind', got {spec!r}",
                         hint="Known kinds: " + ", ".join(NORMALIZATION_KINDS) + ".")
    kind = spec.get("kind", "none")
    if kind not in NORMALIZATION_KINDS:
        raise ModelError(f"unknown normalization kind {kind!r}",
                         hint="Known kinds: " + ", ".join(NORMALIZATION_KINDS) + ".")
    known = NORMALIZATION_KINDS[kind]
    unknown = sorted(set(spec) - set(known) - {"kind"})
    if unknown:
        raise ModelError(f"unknown parameter(s) {', '.join(unknown)} for normalization {kind!r}",
                         hint="Known parameters: " + (", ".join(known) or "none") + ".")
    out: dict[str, Any] = {"kind": kind}
    for name, default in known.items():
        if name not in spec:
            if default is ...:
                raise ModelError(f"normalization {kind!r} needs {name!r}",
                                 hint="Known parameters: " + ", ".join(known) + ".")
            value = default
        else:
            value = spec[name]
        out[name] = _check_param(kind, name, value, default)
    if kind == "ct_window" and not out["high"] > out["low"]:
        raise ModelError(f"ct_window needs low < high, got [{out['low']}, {out['high']}]")
    if kind == "percentile_zscore" and not 0 <= out["lower"] < out["upper"] <= 100:
        raise ModelError(f"percentile_zscore needs 0 <= lower < upper <= 100, got {out['lower']}, {out['upper']}")
    if kind == "scale" and (out["divide_by"] == 0 or out["std"] == 0):
        raise ModelError("scale needs non-zero divide_by and std")
    return out


def _check_param(kind: str, name: str, value: Any, default: Any) -> Any:
    template = default if default is not ... else 0.0
    try:
        if isinstance(template, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(template, list):
            if value is None and name == "percentiles":
                return None
            values = [float(v) for v in value]
            if len(values) != 2 or not all(math.isfinite(v) for v in values):
                raise TypeError
            return values
        if value is None and name == "std_cutoff":
            return None
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
        if not math.isfinite(number):
            raise TypeError
        return number
    except (TypeError, ValueError):
        raise ModelError(f"bad value {value!r} for {name!r} of normalization {kind!r}",
                         hint=f"Expected something like {template!r}.") from None


def normalise(array: np.ndarray, spec: dict | str | None, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise one ``(Z, Y, X)`` channel as ``spec`` says (see :data:`NORMALIZATION_KINDS`), float32.

    ``mask`` is the RoI: kinds with statistics (zscore, zscore_roi, percentile_zscore, autofocus)
    compute them inside it (``use_roi: false`` ignores it). Non-finite results become 0.
    """
    spec = normalization_spec(spec)
    kind = spec["kind"]
    if kind == "none":
        out = np.array(array, dtype=np.float32, copy=True)
    elif kind == "zscore":
        out = zscore(array, mask if spec["use_roi"] else None)
    elif kind == "zscore_roi":
        out = zscore_in_roi(array, mask if mask is not None else np.ones(array.shape, dtype=bool))
    elif kind == "percentile_zscore":
        out = percentile_zscore(array, mask if spec["use_roi"] else None, spec["lower"], spec["upper"])
    elif kind == "ct_window":
        out = ct_window(array, spec["low"], spec["high"], scale_to=spec["scale_to"])
    elif kind == "autofocus":
        out = autofocus_normalise(array, mask, percentiles=spec["percentiles"], std_cutoff=spec["std_cutoff"],
                                  cut_below_image_mean=spec["cut_below_image_mean"])
    else:  # scale
        out = scale(array, spec["divide_by"], spec["mean"], spec["std"])
    if not np.isfinite(out).all():
        out[~np.isfinite(out)] = 0.0
    return out


# -------------------------------------------------------------------------------- region of interest

def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D array (maximises the between-class variance of a histogram)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    hist, edges = np.histogram(values, bins=bins, range=(low, high))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(hist)
    weight2 = np.cumsum(hist[::-1])[::-1]
    mean1 = np.cumsum(hist * centres) / np.maximum(weight1, 1e-12)
    mean2 = (np.cumsum((hist * centres)[::-1]) / np.maximum(weight2[::-1], 1e-12))[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(np.argmax(variance))])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    if mask.shape[0] == 1:  # 2D: fill within the slice (in 3D every voxel of one slice touches the border)
        return ndimage.binary_fill_holes(mask[0])[None]
    return ndimage.binary_fill_holes(mask)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


ROI_METHODS = ("none", "nonzero", "otsu")


def roi_mask(channels: np.ndarray, method: str = "nonzero", fill_holes: bool = True,
             keep_largest: bool = False) -> np.ndarray:
    """Region of interest of a ``(C, Z, Y, X)`` (or ``(Z, Y, X)``) image as a bool ``(Z, Y, X)`` mask.

    method: ``"nonzero"``: any channel is non-zero (and finite); ``"otsu"``: the first channel above
        its Otsu threshold; ``"none"``: everything.
    fill_holes: fill enclosed holes (per slice for a 2D image); keep_largest: keep only the largest
        connected component.
    """
    channels = np.asarray(channels)
    if channels.ndim == 3:
        channels = channels[None]
    if method == "none":
        return np.ones(channels.shape[1:], dtype=bool)
    if method == "nonzero":
        mask = np.zeros(channels.shape[1:], dtype=bool)
        for channel in channels:
            found = channel != 0
            if np.issubdtype(channel.dtype, np.floating):
                found &= np.isfinite(channel)
            mask |= found
    elif method == "otsu":
        first = channels[0]
        values = _values(first, None)
        if values.size == 0:
            return np.zeros(first.shape, dtype=bool)
        sample = values[:: max(1, values.size // 2_000_000)]
        threshold = _otsu_threshold(sample)
        mask = first > threshold
        if np.issubdtype(first.dtype, np.floating):
            mask &= np.isfinite(first)
    else:
        raise ValueError(f"unknown RoI method {method!r}; known: {', '.join(ROI_METHODS)}")
    if keep_largest and mask.any():
        mask = _largest_component(mask)
    if fill_holes and mask.any():
        mask = _fill_holes(mask)
    return mask


# ------------------------------------------------------------------------------------ the pipeline

@dataclass(frozen=True)
class PreprocessState:
    """What :meth:`Preprocessor.forward` did to one image, enough to invert it exactly.

    original_shape: ``(Z, Y, X)`` of the input; original_geometry: its geometry.
    resampled_shape / resampled_spacing_zyx: the grid after resampling (the original one when
        nothing was resampled), mm.
    crop_box: slices on the resampled grid that the network input covers, or ``None`` (uncropped).
    """

    original_shape: tuple[int, int, int]
    original_geometry: Geometry
    resampled_shape: tuple[int, int, int]
    resampled_spacing_zyx: tuple[float, float, float]
    crop_box: tuple | None = None

    @property
    def resampled(self) -> bool:
        """Whether the voxel grid changed (then labels come back through probabilities)."""
        return self.resampled_shape != self.original_shape or not np.allclose(
            self.resampled_spacing_zyx, self.original_geometry.spacing_zyx, rtol=1e-6, atol=0)

    @property
    def resampled_geometry(self) -> Geometry:
        """Geometry of the resampled grid (same origin and direction as the original)."""
        return _target_geometry(self.original_geometry, self.resampled_spacing_zyx)

    @property
    def network_shape(self) -> tuple[int, int, int]:
        """``(z, y, x)`` of the network input (after cropping)."""
        if self.crop_box is None:
            return self.resampled_shape
        return tuple(s.stop - s.start for s in self.crop_box)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"original_shape": list(self.original_shape), "original_geometry": self.original_geometry.to_dict(),
                "resampled_shape": list(self.resampled_shape),
                "resampled_spacing_zyx": list(self.resampled_spacing_zyx),
                "crop_box": None if self.crop_box is None else [[s.start, s.stop] for s in self.crop_box]}


PREPROCESSOR_KEYS: dict[str, Any] = {
    "roi": "none",
    "roi_fill_holes": True,
    "roi_keep_largest": False,
    "crop_to_roi": False,
    "crop_margin": 0,
    "target_spacing_zyx": None,
    "interpolation_order": 1,
    "normalization": {"kind": "none"},
    "channel_normalization": None,
}


def _spec_error(problem: str) -> ModelError:
    return ModelError(f"preprocessing: {problem}",
                      hint="Known keys: " + ", ".join(PREPROCESSOR_KEYS) + " (see medseg_cli.preprocessing).")


class Preprocessor:
    """RoI → resample → crop → normalise, with exact inverses (see the module docstring).

    Built from a model card's ``preprocessing`` dict with :meth:`from_dict`; keys and defaults are
    :data:`PREPROCESSOR_KEYS`. ``target_spacing_zyx`` is mm (``None`` entries keep that axis; two values
    are (y, x) for 2D); ``crop_margin`` is voxels on the resampled grid; ``interpolation_order`` is 1
    (linear) or 3 (B-spline) for image intensities.
    """

    def __init__(self, roi: str = "none", crop_to_roi: bool = False, crop_margin: int | Sequence[int] = 0,
                 target_spacing_zyx: Sequence[float | None] | None = None, normalization: dict | None = None,
                 channel_normalization: Sequence[dict] | None = None, roi_fill_holes: bool = True,
                 roi_keep_largest: bool = False, interpolation_order: int = 1):
        self.roi = roi
        self.crop_to_roi = bool(crop_to_roi)
        self.crop_margin = crop_margin
        self.target_spacing_zyx = None if target_spacing_zyx is None else tuple(target_spacing_zyx)
        self.normalization = normalization_spec(normalization)
        self.channel_normalization = (None if channel_normalization is None
                                      else [normalization_spec(s) for s in channel_normalization])
        self.roi_fill_holes = bool(roi_fill_holes)
        self.roi_keep_largest = bool(roi_keep_largest)
        self.interpolation_order = int(interpolation_order)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, spec: dict | None) -> "Preprocessor":
        """Build from a card's ``preprocessing`` dict; :class:`ModelError` on unknown keys or bad values."""
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(PREPROCESSOR_KEYS))
        if unknown:
            raise _spec_error(f"unknown key(s) {', '.join(map(repr, unknown))}")
        values = {**PREPROCESSOR_KEYS, **spec}
        if values["roi"] is None:
            values["roi"] = "none"
        if values["roi"] not in ROI_METHODS:
            raise _spec_error(f"roi must be one of {', '.join(ROI_METHODS)}, got {values['roi']!r}")
        for key in ("crop_to_roi", "roi_fill_holes", "roi_keep_largest"):
            if not isinstance(values[key], bool):
                raise _spec_error(f"{key} must be true or false, got {values[key]!r}")
        margin = values["crop_margin"]
        margins = [margin] if isinstance(margin, (int, float)) and not isinstance(margin, bool) else margin
        if (not isinstance(margins, (list, tuple)) or len(margins) not in (1, 3)
                or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in margins)):
            raise _spec_error(f"crop_margin must be a whole number of voxels >= 0 (or 3 of them), got {margin!r}")
        values["crop_margin"] = margins[0] if len(margins) == 1 else [int(m) for m in margins]
        target = values["target_spacing_zyx"]
        if target is not None:
            ok = isinstance(target, (list, tuple)) and len(target) in (2, 3) and all(
                t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0)
                for t in target)
            if not ok:
                raise _spec_error(f"target_spacing_zyx must be [z, y, x] positive mm (or null), got {target!r}")
            values["target_spacing_zyx"] = [None if t is None else float(t) for t in target]
        if values["interpolation_order"] not in (1, 3) or isinstance(values["interpolation_order"], bool):
            raise _spec_error(f"interpolation_order must be 1 or 3, got {values['interpolation_order']!r}")
        channel_norm = values["channel_normalization"]
        if channel_norm is not None and (not isinstance(channel_norm, (list, tuple)) or not channel_norm):
            raise _spec_error(f"channel_normalization must be a list with one entry per channel, got {channel_norm!r}")
        return cls(**values)

    def to_dict(self) -> dict:
        """The full spec (defaults filled in); ``from_dict(to_dict())`` gives an equal preprocessor."""
        return {
            "roi": self.roi,
            "roi_fill_holes": self.roi_fill_holes,
            "roi_keep_largest": self.roi_keep_largest,
            "crop_to_roi": self.crop_to_roi,
            "crop_margin": list(self.crop_margin) if isinstance(self.crop_margin, (list, tuple)) else self.crop_margin,
            "target_spacing_zyx": None if self.target_spacing_zyx is None else list(self.target_spacing_zyx),
            "interpolation_order": self.interpolation_order,
            "normalization": dict(self.normalization),
            "channel_normalization": (None if self.channel_normalization is None
                                      else [dict(s) for s in self.channel_normalization]),
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocessor) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Preprocessor({self.to_dict()!r})"

    # ---------------------------------------------------------------- forward
    def _channel_specs(self, count: int, source: str | None) -> list[dict]:
        if self.channel_normalization is None:
            return [self.normalization] * count
        if len(self.channel_normalization) != count:
            raise InputError(f"the model normalises {len(self.channel_normalization)} channel(s), the image has "
                             f"{count}", path=source, hint="Give one co-registered file per channel the model expects.")
        return self.channel_normalization

    def forward(self, image: Image) -> tuple[np.ndarray, np.ndarray, PreprocessState]:
        """Network input for ``image``.

        Returns ``(volume, roi, state)``: volume float32 ``(C, z, y, x)``, roi bool ``(z, y, x)`` on the
        same grid, and the :class:`PreprocessState` for the inverses. Order: RoI on the original grid →
        resample (image linear / B-spline, RoI nearest) → crop to the RoI box (+ margin) → normalise
        each channel (statistics within the RoI for kinds that use one). Non-finite input voxels count
        as 0.
        """
        channels = image.channels()
        specs = self._channel_specs(channels.shape[0], image.source)
        if np.issubdtype(channels.dtype, np.floating) and not np.isfinite(channels).all():
            channels = np.where(np.isfinite(channels), channels, 0).astype(channels.dtype, copy=False)
        original_shape = image.spatial_shape
        spacing = image.geometry.spacing_zyx
        roi = roi_mask(channels, self.roi, fill_holes=self.roi_fill_holes, keep_largest=self.roi_keep_largest)
        new_shape, new_spacing = original_shape, spacing
        if self.target_spacing_zyx is not None:
            new_shape = resampled_shape(original_shape, spacing, self.target_spacing_zyx)
            new_spacing = _effective_spacing(original_shape, spacing, self.target_spacing_zyx)
        changed = new_shape != original_shape or not np.allclose(new_spacing, spacing, rtol=1e-6, atol=0)
        if changed:
            channels = resample_array(channels, spacing, new_spacing, out_shape=new_shape,
                                      order=self.interpolation_order)
            roi = resample_array(roi, spacing, new_spacing, out_shape=new_shape, order=0)
        else:
            new_spacing = spacing
        box = None
        if self.crop_to_roi and self.roi != "none":
            box = bounding_box(roi, self.crop_margin)
            if box is not None and all(s.start == 0 and s.stop == n for s, n in zip(box, new_shape)):
                box = None
        if box is not None:
            channels, roi = crop(channels, box), crop(roi, box)
        mask = roi if self.roi != "none" else None
        volume = np.empty(channels.shape, dtype=np.float32)
        for c, spec in enumerate(specs):
            volume[c] = normalise(channels[c], spec, mask)
        state = PreprocessState(tuple(original_shape), image.geometry, tuple(new_shape),  # type: ignore[arg-type]
                                tuple(float(v) for v in new_spacing), box)  # type: ignore[arg-type]
        return volume, np.ascontiguousarray(roi, dtype=bool), state

    def forward_labels(self, labels: np.ndarray | Image, state: PreprocessState) -> np.ndarray:
        """A ``(Z, Y, X)`` label map (array or :class:`Image`) on the network grid: nearest neighbour, same crop."""
        array = np.asarray(labels.array if isinstance(labels, Image) else labels)
        if array.ndim == 4 and array.shape[0] == 1:
            array = array[0]
        if tuple(array.shape) != tuple(state.original_shape):
            raise InputError(f"label map {tuple(array.shape)} does not match the image grid {state.original_shape}",
                             path=getattr(labels, "source", None), hint="Give the label map of this scan.")
        if state.resampled:
            array = resample_labels(array, state.original_geometry.spacing_zyx, state.resampled_spacing_zyx,
                                    out_shape=state.resampled_shape)
        if state.crop_box is not None:
            array = crop(array, state.crop_box)
        return np.ascontiguousarray(array)

    # ---------------------------------------------------------------- inverse
    def _check_network_grid(self, array: np.ndarray, state: PreprocessState) -> None:
        if tuple(array.shape[-3:]) != tuple(state.network_shape):
            raise ValueError(f"array {array.shape} is not on the network grid {state.network_shape}")

    def inverse_probabilities(self, probabilities: np.ndarray, state: PreprocessState) -> np.ndarray:
        """``(K, z, y, x)`` class probabilities → ``(K, Z, Y, X)`` float32 on the exact original grid.

        Outside the crop, class 0 has probability 1 and the others 0; resampling back is linear
        (probabilities are not labels), so each voxel's probabilities still sum to what they did.
        """
        probabilities = np.asarray(probabilities)
        if probabilities.ndim == 3:
            probabilities = probabilities[None]
        self._check_network_grid(probabilities, state)
        count = probabilities.shape[0]
        out = np.empty((count,) + tuple(state.original_shape), dtype=np.float32)
        for k in range(count):
            plane = probabilities[k].astype(np.float32, copy=False)
            if state.crop_box is not None:
                fill = 1.0 if (k == 0 and count > 1) else 0.0
                plane = uncrop(plane, state.crop_box, state.resampled_shape, fill=fill)
            if state.resampled:
                out[k] = resample_array(plane, state.resampled_spacing_zyx, state.original_geometry.spacing_zyx,
                                        out_shape=state.original_shape, order=1)
            else:
                out[k] = plane
        return out

    def inverse_labels(self, labels: np.ndarray, state: PreprocessState) -> np.ndarray:
        """``(z, y, x)`` labels on the network grid → ``(Z, Y, X)`` on the original grid (nearest; 0 outside the crop)."""
        labels = np.asarray(labels)
        self._check_network_grid(labels, state)
        if state.crop_box is not None:
            labels = uncrop(labels, state.crop_box, state.resampled_shape, fill=0)
        if state.resampled:
            labels = resample_labels(labels, state.resampled_spacing_zyx, state.original_geometry.spacing_zyx,
                                     out_shape=state.original_shape)
        return np.ascontiguousarray(labels)
