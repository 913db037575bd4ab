"""Segment one image end to end: the card's preprocessing, the sliding window, the inverse, postprocessing.

For notebooks::

    from medseg_cli.imaging import read_image
    from medseg_cli.inference import Predictor, load_runner

    runner = load_runner("hippocampus")                  # or a path: model.onnx / checkpoint.pt
    result = Predictor(runner, overlap=0.5, tta=True).predict(read_image("scan.nii.gz"))
    result.labels            # Image (Z, Y, X) on the scan's exact grid
    result.volumes           # {"anterior": 1234.0, ...} mm³

The output grid equals the input grid exactly (shape, spacing, origin, direction): the network runs
on the preprocessed grid and the card's preprocessing is inverted afterwards. Labels are never
interpolated: when preprocessing resampled the scan, the probabilities are resampled back and the
argmax is taken on the original grid.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..card import ModelCard
from ..errors import InputError, MedsegWarning, ProcessingError
from ..imaging import Image, match_planar_channels
from ..progress import Progress
from .postprocess import keep_largest_component, label_values, label_volumes, probabilities_to_labels
from .runners import Runner, load_runner
from .sliding_window import (SlidingWindow, background_probabilities, embed_probabilities, mirrored,
                             with_first_class)


@dataclass
class PredictionResult:
    """What :meth:`Predictor.predict` returns.

    labels: label map (Z, Y, X) on the input's grid (uint8 for < 255 classes).
    probabilities: (K, Z, Y, X) float32 on the input's grid, when asked for; else None.
    volumes: {label name: volume in mm³} for every foreground label of the card.
    rows: per label {"label", "name", "voxels", "volume_mm3"} (the same numbers, for tables / JSON).
    """

    labels: Image
    probabilities: Image | None
    volumes: dict
    rows: list = field(default_factory=list)


def check_channels(image: Image, card: ModelCard) -> None:
    """Raise :class:`InputError` when ``image`` does not have the channels (or, a single 2D slice for a
    3D model, the dimensions) that ``card`` expects."""
    patch = list(card.input_patch or [])
    if card.spatial_dims == 3 and image.is_planar and len(patch) == 3 and patch[0] > 1:
        z, y, x = image.spatial_shape
        raise InputError(f"model {card.name} is a 3D model (patch {patch[0]}×{patch[1]}×{patch[2]}); the input "
                         f"is a single 2D slice ({y}×{x})", path=image.source,
                         hint="Give the whole 3D volume (all slices), or use a 2D model.")
    if image.num_channels == card.in_channels:
        return
    if card.spatial_dims == 2 and match_planar_channels(image, card.in_channels).num_channels == card.in_channels:
        return  # a 2D colour picture for a grey model (or grey for a colour one): converted by predict
    names = ", ".join(card.channel_names) if card.channel_names else f"{card.in_channels} channel(s)"
    raise InputError(f"model {card.name} takes {card.in_channels} channel(s) ({names}), the input has "
                     f"{image.num_channels}", path=image.source,
                     hint=f"Give {card.in_channels} co-registered file(s) in this order: {names} "
                          "(--channels a.nii.gz,b.nii.gz).")


class Predictor:
    """Run a runner over whole images (see the module docstring).

    runner: an ``OnnxRunner`` / ``TorchRunner`` (or anything with ``card``, ``window_output_patch``,
        ``window_margin`` and ``predict_batch``).
    overlap: fraction shared by neighbouring windows, [0, 1).
    tta: average over every flip of the spatial axes (8 runs in 3D, 4 in 2D).
    batch_size: windows per network call.
    keep_largest: keep only the largest connected component of each label.
    pad_mode: "constant" (0, after normalisation) or "edge" for voxels outside the volume.
    """

    def __init__(self, runner: Runner, overlap: float = 0.5, tta: bool = False, batch_size: int = 1,
                 keep_largest: bool = False, pad_mode: str = "constant"):
        self.runner = runner
        self.card: ModelCard = runner.card
        self.tta = bool(tta)
        self.keep_largest = bool(keep_largest)
        try:
            self.window = SlidingWindow(runner.window_output_patch, margin=runner.window_margin, overlap=overlap,
                                        batch_size=batch_size, gaussian=True, pad_mode=pad_mode)
        except ValueError as err:
            raise InputError(str(err), hint="Check --overlap (0 <= overlap < 1) and --batch (>= 1).") from None
        from ..preprocessing import Preprocessor

        self.preprocessor = Preprocessor.from_dict(self.card.preprocessing or {})

    def _predict_batch(self):
        if not self.tta:
            return self.runner.predict_batch
        axes = (1, 2) if self.card.spatial_dims == 2 else (0, 1, 2)
        return mirrored(self.runner.predict_batch, axes)

    def predict(self, image: Image, *, probabilities: bool = False,
                progress: Progress | None = None) -> PredictionResult:
        """Segment ``image`` ((Z, Y, X) or (C, Z, Y, X)); see :class:`PredictionResult`.

        Memory: besides the scan itself, the network input (C float32 volumes on the network grid)
        and the class accumulators over the RoI bounding box are held: K - 1 float32 volumes for a
        softmax model (class 0 is 1 minus the others), K for sigmoid; labels come out a few slices at
        a time. Pass the image inline, e.g. ``predict(read_image(path))``: the scan's voxels are then
        released once the network input is built, so a 3-class softmax prediction of a 1-channel scan
        peaks near 3 times the scan's float32 size (measured: 3.2x on 512 x 512 x 240). With
        ``probabilities`` (or when the card resamples) K float32 volumes on the input grid are
        built as well.
        """
        from ..preprocessing import bounding_box

        card = self.card
        if card.spatial_dims == 2:  # 2D pictures: RGB -> grey (BT.601 luma) or grey -> RGB, as in training
            image = match_planar_channels(image, card.in_channels)
        check_channels(image, card)
        _warn_if_blank(image)
        geometry, spatial_shape, source = image.geometry, image.spatial_shape, image.source
        volume, roi, state = self.preprocessor.forward(image)
        del image  # when the caller passed the only reference, the scan's voxels are freed here
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        num_classes = card.num_classes
        grid = tuple(volume.shape[1:])
        box = bounding_box(roi, 0) if roi is not None else tuple(slice(0, n) for n in grid)
        del roi
        resampled = state.resampled  # the network grid differs from the scan's
        # softmax classes sum to 1: class 0 is not accumulated but derived (one class volume less)
        implicit = card.output_activation == "softmax" and num_classes > 1
        if box is None:  # empty region of interest: nothing to segment
            inside = None
        else:
            inside, box = self.window.run_box(self._predict_batch(), volume, num_classes, roi_box=box,
                                              progress=progress, implicit_first=implicit)
        del volume
        if inside is not None and implicit and (resampled or probabilities):
            inside = with_first_class(inside)
            implicit = False
        prob_image = None
        if resampled:
            # the network grid differs from the scan's: bring probabilities back (linear), then argmax
            activation = card.output_activation
            full = (embed_probabilities(inside, box, grid, activation) if inside is not None
                    else background_probabilities(num_classes, grid, activation))
            del inside
            original = np.asarray(self.preprocessor.inverse_probabilities(full, state), dtype=np.float32)
            del full
            labels = probabilities_to_labels(original, card.output_activation)
            if probabilities:
                prob_image = Image(original, geometry, source)
            del original
        else:
            # same voxel grid (at most cropped): argmax inside the box only, exact, no resampling
            offset = [0, 0, 0] if getattr(state, "crop_box", None) is None else [s.start for s in state.crop_box]
            labels = np.zeros(spatial_shape, dtype=np.uint8 if num_classes < 255 else np.uint16)
            if inside is not None:
                target = tuple(slice(b.start + o, b.stop + o) for b, o in zip(box, offset))
                probabilities_to_labels(inside, card.output_activation, out=labels[target], implicit_first=implicit)
                if probabilities:
                    prob_image = Image(embed_probabilities(inside, target, spatial_shape, card.output_activation),
                                       geometry, source)
            elif probabilities:
                prob_image = Image(background_probabilities(num_classes, spatial_shape, card.output_activation),
                                   geometry, source)
            del inside
        labels = labels.astype(np.uint8 if max(label_values(card), default=0) < 256 else np.uint16, copy=False)
        if tuple(labels.shape) != spatial_shape:
            raise ProcessingError(f"the inverse preprocessing gave a {tuple(labels.shape)} grid for a "
                                  f"{spatial_shape} image", path=source,
                                  hint="This is a bug in the preprocessing inverse; please report it.")
        if self.keep_largest:
            keep_largest_component(labels, label_values(card))
        rows = label_volumes(labels, geometry, card)
        return PredictionResult(labels=Image(labels, geometry, source, {"model": card.name}),
                                probabilities=prob_image, volumes={r["name"]: r["volume_mm3"] for r in rows},
                                rows=rows)


def _warn_if_blank(image: Image) -> None:
    """A scan whose every (finite) voxel has one value holds nothing to segment: say so."""
    array = image.array
    if not array.size:
        return
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        low = np.min(array, where=finite, initial=np.inf)
        high = np.max(array, where=finite, initial=-np.inf)
    else:
        low, high = array.min(), array.max()
    if low == high:
        warnings.warn(MedsegWarning(f"{image.source}: the scan is blank (every voxel is {float(low):g}): "
                                    "there is nothing to segment; check the export"),
                      stacklevel=3)


__all__ = ["Predictor", "PredictionResult", "load_runner", "check_channels"]
