"""Inference: runners (ONNX Runtime, torch), the sliding window, and the whole-image predictor.

>>> from medseg_cli.inference import Predictor, load_runner
>>> result = Predictor(load_runner("model.onnx"), tta=True).predict(image)
"""

from __future__ import annotations

from .sliding_window import SlidingWindow, mirrored

__all__ = ["SlidingWindow", "mirrored", "Predictor", "PredictionResult", "load_runner", "OnnxRunner", "TorchRunner"]


def __getattr__(name: str):
    # runners and predictor import onnxruntime / torch lazily: `from medseg_cli.inference import SlidingWindow`
    # stays cheap for training code.
    if name in ("Predictor", "PredictionResult"):
        from . import predictor

        return getattr(predictor, name)
    if name in ("load_runner", "OnnxRunner", "TorchRunner"):
        from . import runners

        return getattr(runners, name)
    raise AttributeError(name)
