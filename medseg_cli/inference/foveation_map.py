"""The foveation map: per pixel, which field-of-view / resolution view a foveation model chose there.

A foveation model (``medseg_cli.zoo.foveation``) fuses, per window, K views of its context with
weights (N, K) (see ``Foveation.forward_with_weights``). Its ONNX export carries them as a second
output ``fov_weights`` (runners read ``logits`` by name and ignore it). :class:`FoveationMapRunner`
wraps the model's runner so that ``predict_batch`` returns each window's weights spread over its
output patch, (B, K, 1, P_y, P_x): a ``Predictor`` over it blends them across overlapping windows with
the same Gaussian importance as the labels and takes the argmax, so the "label" of a pixel is the
index k of the view with the largest (blended) weight -- on the input's exact grid, and tile by tile
with ``stream_predict`` for large pictures. It costs a second pass of the network.

    map_predictor = foveation_map_predictor(predictor)      # ModelError for a non-foveation model
    map_predictor.predict(read_image("fundus.png")).labels  # Image (1, Y, X): 0 .. K-1
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..card import ModelCard
from ..errors import ModelError
from .runners import _check_batch

OUTPUT = "fov_weights"


def _scales(card: ModelCard, num_views: int) -> list[int] | None:
    scales = (card.architecture_kwargs or {}).get("fov_scales", [1, 2, 4] if card.architecture == "foveation" else None)
    return [int(s) for s in scales] if scales is not None and len(scales) == num_views else None


def map_card(card: ModelCard, num_views: int) -> ModelCard:
    """The model's card, with the K views as the "classes" (labels ``view k: S px at 1/s``)."""
    scales = _scales(card, num_views)
    patch = list(card.output_patch or card.input_patch)[-1]
    labels = {str(k): (f"view {k}: {s * patch} px at 1/{s}" if scales else f"view {k}")
              for k, s in enumerate(scales or [1] * num_views)}
    return card.with_updates(name=f"{card.name}-foveation-map", num_classes=num_views, labels=labels,
                             label_colors={}, output_activation="softmax")


class FoveationMapRunner:
    """A runner whose "probabilities" are the fusion weights of each window, (B, K, 1, P_y, P_x).

    base: an ``OnnxRunner`` of a model exported with the ``fov_weights`` output, or a ``TorchRunner``
    of a foveation checkpoint (``forward_with_weights``). Same windows (patch, margin) as ``base``.
    """

    def __init__(self, base):
        self.base = base
        card = base.card
        session = getattr(base, "session", None)
        model = getattr(base, "model", None)
        source = getattr(base, "path", None) or card.name
        if session is not None:
            outputs = {o.name: o for o in session.get_outputs()}
            if OUTPUT not in outputs:
                raise ModelError(f"the model has no {OUTPUT!r} output: it is not a foveation model, or it was "
                                 "exported before foveation maps existed", path=source,
                                 hint="Re-export its checkpoint (`medseg export CHECKPOINT.pt`), or drop "
                                      "--foveation-map.")
            views = outputs[OUTPUT].shape[-1]
            self._weights = self._onnx_weights
        elif model is not None and hasattr(model, "forward_with_weights") and hasattr(model, "num_configs"):
            views = int(model.num_configs)
            self._weights = self._torch_weights
        else:
            raise ModelError("--foveation-map needs a foveation model (architecture 'foveation')", path=source,
                             hint="Drop --foveation-map, or give a foveation model.")
        if not isinstance(views, int) or views < 1:  # a dynamic K in the graph: ask the card
            views = len((card.architecture_kwargs or {}).get("fov_scales", [1, 2, 4]))
        self.num_views = views
        self.card = map_card(card, views)
        self.window_output_patch, self.window_margin = base.window_output_patch, base.window_margin
        self.input_patch = base.input_patch
        self.description = base.description

    def _onnx_weights(self, inputs: np.ndarray) -> np.ndarray:
        step = getattr(self.base, "_fixed_batch", None) or inputs.shape[0]
        parts = [self.base.session.run([OUTPUT], {"image": inputs[i:i + step]})[0]
                 for i in range(0, inputs.shape[0], step)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _torch_weights(self, inputs: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            _, weights = self.base.model.forward_with_weights(torch.from_numpy(inputs).to(self.base.device))
        return weights.float().cpu().numpy()

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, 1, *input_patch_yx) float32 -> (B, K, 1, P_y, P_x) float32: each window's weights, constant
        over its output patch."""
        inputs = _check_batch(self.base.card, batch, self.input_patch)
        weights = np.asarray(self._weights(inputs), dtype=np.float32)
        if weights.shape != (inputs.shape[0], self.num_views):
            raise ModelError(f"the model's {OUTPUT} output has shape {weights.shape}, expected "
                             f"({inputs.shape[0]}, {self.num_views})", path=self.card.name)
        patch = self.window_output_patch
        return np.ascontiguousarray(np.broadcast_to(weights[:, :, None, None, None], weights.shape + patch))


def foveation_map_predictor(predictor):
    """A ``Predictor`` with ``predictor``'s window, TTA and preprocessing over :class:`FoveationMapRunner`."""
    from .predictor import Predictor

    if type(predictor) is not Predictor:
        raise ModelError("--foveation-map works with a single foveation model, not a cascade",
                         hint="Drop --foveation-map.")
    window = predictor.window
    return Predictor(FoveationMapRunner(predictor.runner), overlap=window.overlap, tta=predictor.tta,
                     batch_size=window.batch_size, pad_mode=window.pad_mode)


def write_foveation_map(map_predictor, paths: list, output: str | os.PathLike[str], *, streamed: bool = False,
                        series_uid: str | None = None, progress=None) -> list[dict]:
    """Predict the foveation map of the case ``paths`` into ``output`` (the input's grid, view indices
    0..K-1, written atomically); ``streamed``: tile by tile into a ``.mha`` (as ``stream_predict``).
    Returns rows per view (``label``, ``name``, ``voxels``, ``volume_mm3``): how much of the image each
    view got."""
    from ..imaging import read_channels
    from .postprocess import write_labels
    from .streaming import check_stream, stream_predict

    output = Path(output)
    if streamed:
        picture = check_stream(map_predictor, paths[0], output)
        pixels, voxel = int(np.prod(picture.shape)), picture.geometry.voxel_volume_mm3
        rows = stream_predict(map_predictor, picture, output, progress=progress)  # opened once
    else:
        result = map_predictor.predict(read_channels(paths, series_uid=series_uid), progress=progress)
        write_labels(result.labels, output, map_predictor.card)
        pixels, voxel, rows = int(result.labels.array.size), result.labels.geometry.voxel_volume_mm3, result.rows
    first = pixels - sum(r["voxels"] for r in rows)  # view 0 is the "background" of the label rows
    card = map_predictor.card
    return [{"label": 0, "name": card.label_name(0), "voxels": first, "volume_mm3": first * voxel}] + rows


__all__ = ["FoveationMapRunner", "foveation_map_predictor", "map_card", "write_foveation_map"]
