"""Patch-wise prediction of a whole volume: Gaussian-blended sliding window over output patches.

One loop serves "same" networks (UNets: output patch == input patch) and "valid" networks
(DeepMedic, Autofocus: they see ``margin`` more voxels per side than they predict): the windows
tile the OUTPUT grid, and each window's input is the output patch grown by the margin, read from
the volume where it lies inside and padded (zero or edge) where it does not.

Blending (DESIGN.md): every window's probabilities are weighted by a Gaussian importance map
(sigma = patch / 8 per axis, 1 at the centre) and summed in float32 per class; the sum is divided by
the summed weights. Windows are placed on a regular grid per axis, so the summed weights are the
outer product of three 1D sums and are never stored as a volume. Only the region of interest's
bounding box (``roi_box``) is predicted and accumulated. For softmax outputs ``run_box`` can skip
class 0 (``implicit_first``): it is 1 minus the others, so K - 1 class volumes are held, not K.

Array order is (C, Z, Y, X) for volumes and (B, C, z, y, x) for batches; 2D networks use volumes
with Z = 1 and patches ``(1, py, px)``.

Example (the training loop validates with exactly this)::

    window = SlidingWindow(output_patch=(64, 64, 64), overlap=0.5, batch_size=2)
    probabilities = window.run(runner.predict_batch, volume, num_classes=3)   # (3, Z, Y, X)
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np

from ..progress import Progress, ensure_progress

PredictBatch = Callable[[np.ndarray], np.ndarray]
"""``(B, C, *input_patch) float32 -> (B, K, *output_patch) float32 probabilities``."""

Box = tuple[slice, slice, slice]


def gaussian_weights_1d(size: int, sigma_scale: float = 1.0 / 8.0) -> np.ndarray:
    """Importance of each position of a patch of ``size`` voxels: a Gaussian, 1 at the centre.

    sigma = ``size * sigma_scale``; symmetric (centre at ``(size - 1) / 2``), float64, all > 0.
    """
    if size <= 1:
        return np.ones(max(size, 1))
    sigma = size * sigma_scale
    positions = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    weights = np.exp(-0.5 * (positions / sigma) ** 2)
    return np.maximum(weights / weights.max(), 1e-6)


def window_starts(box_start: int, box_stop: int, patch: int, length: int, overlap: float) -> list[int]:
    """Start indices (output grid) of the windows covering ``[box_start, box_stop)`` along one axis.

    Windows may start before 0 or end after ``length`` when the volume is smaller than a patch;
    the input is padded there. Neighbours overlap by at least ``overlap * patch`` voxels.
    """
    extent = box_stop - box_start
    if extent <= patch:
        start = box_start - (patch - extent) // 2
        if length >= patch:  # use real context rather than padding where the volume allows
            start = min(max(start, 0), length - patch)
        return [start]
    step = max(1.0, patch * (1.0 - overlap))
    count = int(math.ceil((extent - patch) / step)) + 1
    positions = np.linspace(box_start, box_stop - patch, count)
    return sorted({int(math.floor(p + 0.5)) for p in positions})


def _summed_weights_1d(starts: Sequence[int], weights: np.ndarray, box_start: int, box_stop: int) -> np.ndarray:
    """Per position of ``[box_start, box_stop)``: the summed importance of the windows covering it."""
    total = np.zeros(box_stop - box_start, dtype=np.float64)
    patch = weights.size
    for start in starts:
        lo, hi = max(start, box_start), min(start + patch, box_stop)
        if hi > lo:
            total[lo - box_start:hi - box_start] += weights[lo - start:hi - start]
    return total


def mirrored(predict_batch: PredictBatch, axes: Sequence[int]) -> PredictBatch:
    """Test-time augmentation: average ``predict_batch`` over every flip of the given spatial axes.

    ``axes`` are spatial axes of the patch (0 = z, 1 = y, 2 = x); the 2**len(axes) flipped inputs are
    predicted one after the other (memory stays one batch) and their flipped-back probabilities
    averaged. With valid convolutions the margin is symmetric, so flips commute with cropping.
    """
    axes = tuple(sorted(set(int(a) for a in axes)))

    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def predict(batch: np.ndarray) -> np.ndarray:
        total = None
        for combo in combos:
            flip = tuple(2 + a for a in combo)
            source = np.ascontiguousarray(np.flip(batch, flip)) if flip else batch
            result = predict_batch(source)
            if flip:
                result = np.flip(result, flip)
            if total is None:
                total = np.array(result, dtype=np.float32, copy=True)
            else:
                total += result
        total *= np.float32(1.0 / len(combos))
        return total

    return predict


class SlidingWindow:
    """Predict a (C, Z, Y, X) volume patch by patch and blend the patches.

    output_patch: (z, y, x) voxels a network predicts per window (a 2D net: ``(1, py, px)``).
    margin: (z, y, x) voxels the network needs on EACH side beyond its output (valid convolutions);
        the input patch is ``output_patch + 2 * margin``.
    overlap: fraction of a patch shared by neighbouring windows, in [0, 1).
    batch_size: windows per ``predict_batch`` call.
    gaussian: blend with Gaussian importance (sigma = patch / 8); False averages uniformly.
    pad_mode: "constant" (``pad_value``, 0 = the mean after z-score normalisation) or "edge" for
        input voxels outside the volume.
    """

    def __init__(self, output_patch: Sequence[int], margin: Sequence[int] = (0, 0, 0), overlap: float = 0.5,
                 batch_size: int = 1, gaussian: bool = True, pad_mode: str = "constant", pad_value: float = 0.0):
        self.output_patch = tuple(int(v) for v in output_patch)
        self.margin = tuple(int(v) for v in margin)
        if len(self.output_patch) != 3 or len(self.margin) != 3:
            raise ValueError("output_patch and margin need 3 values (z, y, x); a 2D net uses (1, py, px)")
        if any(v < 1 for v in self.output_patch) or any(v < 0 for v in self.margin):
            raise ValueError(f"invalid patch {self.output_patch} or margin {self.margin}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if pad_mode not in ("constant", "edge"):
            raise ValueError("pad_mode must be 'constant' or 'edge'")
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.gaussian = bool(gaussian)
        self.pad_mode = pad_mode
        self.pad_value = float(pad_value)

    @property
    def input_patch(self) -> tuple[int, int, int]:
        return tuple(p + 2 * m for p, m in zip(self.output_patch, self.margin))  # type: ignore[return-value]

    def _weights_1d(self) -> list[np.ndarray]:
        if self.gaussian:
            return [gaussian_weights_1d(p) for p in self.output_patch]
        return [np.ones(p) for p in self.output_patch]

    def windows(self, shape: Sequence[int], roi_box: Box | None = None) -> list[tuple[int, int, int]]:
        """Output-grid start (z, y, x) of every window covering ``roi_box`` of a volume of ``shape``."""
        box = _normalise_box(roi_box, shape)
        per_axis = [window_starts(b.start, b.stop, p, n, self.overlap)
                    for b, p, n in zip(box, self.output_patch, shape)]
        return list(itertools.product(*per_axis))

    # ------------------------------------------------------------------------------ core loop
    def _read_input(self, volume: np.ndarray, start: Sequence[int], out: np.ndarray) -> None:
        """Fill ``out`` (C, *input_patch) with the input window whose OUTPUT starts at ``start``."""
        shape = volume.shape[1:]
        lo = [s - m for s, m in zip(start, self.margin)]
        hi = [l + p for l, p in zip(lo, self.input_patch)]
        src = tuple(slice(max(l, 0), min(h, n)) for l, h, n in zip(lo, hi, shape))
        if all(l >= 0 and h <= n for l, h, n in zip(lo, hi, shape)):
            out[...] = volume[(slice(None),) + src]
            return
        dst = tuple(slice(s.start - l, s.stop - l) for s, l in zip(src, lo))
        if self.pad_mode == "constant":
            out.fill(self.pad_value)
            out[(slice(None),) + dst] = volume[(slice(None),) + src]
        else:
            piece = volume[(slice(None),) + src]
            pads = [(0, 0)] + [(d.start, p - d.stop) for d, p in zip(dst, self.input_patch)]
            out[...] = np.pad(piece, pads, mode="edge")

    def run_box(self, predict_batch: PredictBatch, volume: np.ndarray, num_classes: int,
                roi_box: Box | None = None, progress: Progress | None = None, *,
                implicit_first: bool = False) -> tuple[np.ndarray, Box]:
        """Blend the windows over ``roi_box`` only: returns ``(probabilities (K, *box shape) float32, box)``.

        This is the memory-lean form used by ``Predictor``: nothing outside the box is allocated.
        implicit_first: for softmax outputs (classes sum to 1), accumulate only classes 1..K-1 and
            return ``(K - 1, *box shape)``; class 0 is ``1 - sum`` of them (see :func:`with_first_class`).
            One class volume less in memory.
        """
        if volume.ndim != 4:
            raise ValueError(f"volume must be (C, Z, Y, X), got shape {volume.shape}")
        shape = volume.shape[1:]
        box = _normalise_box(roi_box, shape)
        box_shape = tuple(b.stop - b.start for b in box)
        first = 1 if implicit_first and num_classes > 1 else 0
        accumulator = np.zeros((num_classes - first,) + box_shape, dtype=np.float32)
        weights_1d = self._weights_1d()
        importance = np.einsum("i,j,k->ijk", *weights_1d).astype(np.float32)
        per_axis = [window_starts(b.start, b.stop, p, n, self.overlap)
                    for b, p, n in zip(box, self.output_patch, shape)]
        starts = list(itertools.product(*per_axis))
        channels = volume.shape[0]
        batch = np.empty((self.batch_size, channels) + self.input_patch, dtype=np.float32)
        with ensure_progress(progress).task("sliding window", total=len(starts)) as task:
            for begin in range(0, len(starts), self.batch_size):
                group = starts[begin:begin + self.batch_size]
                for index, start in enumerate(group):
                    self._read_input(volume, start, batch[index])
                result = predict_batch(batch[:len(group)])
                expected = (len(group), num_classes) + self.output_patch
                if tuple(result.shape) != expected:
                    raise ValueError(f"predict_batch returned shape {tuple(result.shape)}, expected {expected}")
                for index, start in enumerate(group):
                    self._accumulate(accumulator, result[index, first:], importance, start, box)
                task.advance(len(group))
        # divide by the summed weights: their outer product, one z-slice at a time (no volume-sized temp)
        sums = [_summed_weights_1d(s, w, b.start, b.stop) for s, w, b in zip(per_axis, weights_1d, box)]
        inverse_yx = (1.0 / np.outer(sums[1], sums[2])).astype(np.float32)
        for z in range(box_shape[0]):
            accumulator[:, z] *= inverse_yx * np.float32(1.0 / sums[0][z])
        return accumulator, box

    @staticmethod
    def _accumulate(accumulator: np.ndarray, probabilities: np.ndarray, importance: np.ndarray,
                    start: Sequence[int], box: Box) -> None:
        patch = probabilities.shape[1:]
        src, dst = [], []
        for s, p, b in zip(start, patch, box):
            lo, hi = max(s, b.start), min(s + p, b.stop)
            src.append(slice(lo - s, hi - s))
            dst.append(slice(lo - b.start, hi - b.start))
        src_t, dst_t = tuple(src), tuple(dst)
        weighted = probabilities[(slice(None),) + src_t] * importance[src_t]
        accumulator[(slice(None),) + dst_t] += weighted

    def run(self, predict_batch: PredictBatch, volume: np.ndarray, num_classes: int, roi_box: Box | None = None,
            progress: Progress | None = None) -> np.ndarray:
        """Probabilities ``(K, Z, Y, X)`` float32 for the whole ``volume`` (C, Z, Y, X).

        predict_batch: ``(B, C, *input_patch) -> (B, K, *output_patch)`` probabilities.
        roi_box: (z, y, x) slices; only windows covering it are run. Outside the box, class 0 has
            probability 1 and the others 0 (all 0 when ``num_classes == 1``).
        """
        inside, box = self.run_box(predict_batch, volume, num_classes, roi_box, progress)
        return embed_probabilities(inside, box, volume.shape[1:])


def _normalise_box(roi_box: Box | None, shape: Sequence[int]) -> Box:
    if roi_box is None:
        return tuple(slice(0, int(n)) for n in shape)  # type: ignore[return-value]
    if len(roi_box) != 3:
        raise ValueError("roi_box needs 3 slices (z, y, x)")
    box = tuple(slice(*s.indices(int(n))[:2]) for s, n in zip(roi_box, shape))
    if any(b.stop <= b.start for b in box):
        raise ValueError(f"roi_box {roi_box} is empty for a volume of shape {tuple(shape)}")
    return box  # type: ignore[return-value]


def with_first_class(rest: np.ndarray) -> np.ndarray:
    """(K - 1, ...) softmax probabilities of classes 1..K-1 -> (K, ...) with class 0 = 1 - their sum."""
    full = np.empty((rest.shape[0] + 1,) + rest.shape[1:], dtype=np.float32)
    full[1:] = rest
    np.sum(rest, axis=0, out=full[0])
    np.subtract(np.float32(1.0), full[0], out=full[0])
    np.clip(full[0], 0.0, 1.0, out=full[0])
    return full


def background_probabilities(num_classes: int, shape: Sequence[int], activation: str = "softmax") -> np.ndarray:
    """(K, *shape) float32 probabilities of nothing found: softmax class 0 (background) = 1, all else 0.

    A sigmoid model has no background channel (channel k is label k + 1): every channel is 0.
    """
    full = np.zeros((num_classes,) + tuple(int(n) for n in shape), dtype=np.float32)
    if num_classes > 1 and activation == "softmax":
        full[0] = 1.0
    return full


def embed_probabilities(inside: np.ndarray, box: Box, shape: Sequence[int],
                        activation: str = "softmax") -> np.ndarray:
    """Place box probabilities (K, *box) into a full (K, *shape) array, :func:`background_probabilities`
    outside the box."""
    full = background_probabilities(inside.shape[0], shape, activation)
    full[(slice(None),) + tuple(box)] = inside
    return full
