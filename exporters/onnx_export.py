"""torch -> ONNX export of any zoo network, with its model card and a parity check in ONNX Runtime.

>>> from exporters.onnx_export import export_onnx
>>> export_onnx(model, card, "model.onnx")        # raises ModelError when ORT and torch disagree

The graph has one input ``image`` of shape (N, C, *spatial) and one output ``logits`` of shape
(N, K, *spatial_out), then the network's ``extra_output_names`` if it declares any (computed by its
``forward_extras``: foveation's ``fov_weights`` (N, K)); runners read ``logits`` by name. The batch
axis is always dynamic, the spatial axes too unless ``dynamic=False``
or the network pins them (``fixed_shape``: slice attention's depth). Valid-convolution nets keep their
margin (``spatial_out = spatial - 2 * margin``). Opset >= 17, IR version <= 13 (what ONNX Runtime 1.31
reads). The model card is stored as JSON in ``metadata_props['medseg.card']``. The file is written
atomically (a failed parity check leaves nothing at ``path``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medseg_cli.atomic import atomic_output
from medseg_cli.card import ModelCard, write_card_to_onnx_model
from medseg_cli.errors import MedsegError, ModelError

#: onnxruntime 1.31 refuses IR version 14 (written by onnx >= 1.23 by default).
MAX_IR_VERSION = 13
DEFAULT_OPSET = 17


def _probe_shape(card: ModelCard, input_shape: Sequence[int] | None,
                 model: torch.nn.Module | None = None) -> tuple[int, ...]:
    """(N, C, *spatial) of the tracing / parity input.

    ``input_shape`` when given; else one patch of the card's ``input_patch``; else the model's input
    patch for the card's ``output_patch``; else the smallest cubic output patch (4 ... 128 voxels per
    axis) the model's ``input_patch_for`` accepts.
    """
    if input_shape is not None:
        return tuple(int(v) for v in input_shape)
    if card.input_patch:
        return (1, int(card.in_channels), *(int(v) for v in card.input_patch))
    contract = getattr(model, "input_patch_for", None)
    if contract is not None:
        if card.output_patch:
            return (1, int(card.in_channels), *contract(tuple(int(v) for v in card.output_patch)))
        for size in range(4, 129, 2):
            try:
                return (1, int(card.in_channels), *contract((size,) * int(card.spatial_dims)))
            except MedsegError:
                continue
    raise ModelError(f"cannot tell the input size of {card.architecture}: its card has no input_patch",
                     hint="Add input_patch to the card (or pass input_shape=(N, C, *spatial) to export_onnx).")


def dynamic_spatial_axes(model: torch.nn.Module, spatial_dims: int) -> list[int]:
    """Spatial axes (0-based, array order) the network accepts at any size: all but those pinned by its
    ``fixed_shape`` (e.g. the depth of slice attention, one weight per slice)."""
    fixed = getattr(model, "fixed_shape", None) or {}
    return [axis for axis in range(spatial_dims) if axis not in fixed]


def extra_outputs(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the outputs after ``logits`` that ``model`` declares (``extra_output_names``); its
    ``forward_extras(x)`` returns ``(logits, *extras)``, each extra with the batch as its first axis."""
    return tuple(getattr(model, "extra_output_names", ()) or ()) if hasattr(model, "forward_extras") else ()


class _WithExtras(torch.nn.Module):
    """Traces ``model.forward_extras`` (logits and the extra outputs) instead of ``model.forward``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training  # the exporter restores this mode on the whole tree afterwards

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_extras(x))


def torch_outputs(model: torch.nn.Module, example: torch.Tensor) -> list[np.ndarray]:
    """The exported graph's outputs computed by torch: ``[logits, *extras]`` (see :func:`extra_outputs`)."""
    with torch.no_grad():
        outputs = model.forward_extras(example) if extra_outputs(model) else (model(example),)
    return [o.numpy() for o in outputs]


def to_onnx_bytes(model: torch.nn.Module, example: torch.Tensor, *, dynamic: bool = True,
                  opset: int = DEFAULT_OPSET) -> bytes:
    """Trace ``model`` (in eval mode) on ``example`` and return the serialised ONNX model.

    Axis 0 (batch) is always dynamic; with ``dynamic`` also the spatial axes of
    :func:`dynamic_spatial_axes` (named ``d0``, ``d1`` ... in array order). Extra outputs
    (:func:`extra_outputs`) follow ``logits``, with a dynamic batch axis.
    """
    axes = {0: "batch"}
    if dynamic:
        axes.update({axis + 2: f"d{axis}" for axis in dynamic_spatial_axes(model, example.ndim - 2)})
    extras = extra_outputs(model)
    traced = _WithExtras(model) if extras else model
    dynamic_axes = {"image": axes, "logits": dict(axes), **{name: {0: "batch"} for name in extras}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes
        torch.onnx.export(traced, (example,), buffer, dynamo=False, input_names=["image"],
                          output_names=["logits", *extras], opset_version=opset, dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    return buffer.getvalue()


def parity_difference(onnx_bytes: bytes, model: torch.nn.Module, example: torch.Tensor) -> float:
    """Max abs difference between ONNX Runtime (CPU) and torch outputs on ``example``, in units of the
    output's scale: divided by ``max(1, max |torch output|)``; the largest over ``logits`` and the
    extra outputs (:func:`extra_outputs`).

    Logits of a trained network reach tens; float32 kernels that sum in a different order then differ
    by a few 1e-4 in absolute terms (1e-5 relative), which changes no probability or label. Outputs
    of magnitude <= 1 are compared in absolute terms.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    names = ["logits", *extra_outputs(model)]
    if [o.name for o in session.get_outputs()] != names:
        return float("inf")
    worst = 0.0
    for ort_out, torch_out in zip(session.run(names, {"image": example.numpy()}), torch_outputs(model, example)):
        if ort_out.shape != torch_out.shape:
            return float("inf")
        if ort_out.size:
            scale = max(1.0, float(np.max(np.abs(torch_out))))
            worst = max(worst, float(np.max(np.abs(ort_out - torch_out))) / scale)
    return worst


def export_onnx(model: torch.nn.Module, card: ModelCard, path: str | Path, *,
                input_shape: Sequence[int] | None = None, dynamic: bool = True, opset: int = DEFAULT_OPSET,
                check_parity: bool = True, atol: float = 1e-4, seed: int = 0) -> Path:
    """Export ``model`` to ``path`` (.onnx) with ``card`` in its metadata (``metadata_props['medseg.card']``).

    ``input_shape`` is (N, C, *spatial) for tracing and the parity check (default: see
    :func:`_probe_shape`, normally one patch of the card's ``input_patch``). With ``check_parity`` the
    exported graph is run in ONNX Runtime (CPU) on a random N(0, 1) input and compared with torch: a max
    abs difference (in units of the output's scale, see :func:`parity_difference`) above ``atol`` raises
    ``ModelError`` and writes nothing. The model is traced in eval
    mode on the CPU; its mode and device are restored afterwards (a training loop can keep using it).
    """
    if opset < 17:
        raise ModelError(f"opset {opset} is too old; medseg exports with opset >= 17", path=path,
                         hint="Use --opset 17 or newer.")
    path = Path(path)
    modes = [(module, module.training) for module in model.modules()]
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    try:
        model.eval().cpu()
        data = _export_checked(model, card, path, input_shape, dynamic, opset, check_parity, atol, seed)
    finally:
        model.to(device)
        for module, training in modes:
            module.training = training
    with atomic_output(path) as scratch:
        Path(scratch).write_bytes(data)
    return path


def _export_checked(model: torch.nn.Module, card: ModelCard, path: Path, input_shape: Sequence[int] | None,
                    dynamic: bool, opset: int, check_parity: bool, atol: float, seed: int) -> bytes:
    """The serialised ONNX model with its card, parity-checked (see :func:`export_onnx`)."""
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(_probe_shape(card, input_shape, model), generator=generator)
    try:
        raw = to_onnx_bytes(model, example, dynamic=dynamic, opset=opset)
    except Exception as err:  # the exporter raises many types; the user needs one line
        raise ModelError(f"ONNX export of {card.architecture} failed ({type(err).__name__}: {err})".split("\n")[0],
                         path=path, hint="Check the model's kwargs in the card, or export with --static.") from err

    import onnx

    onnx_model = onnx.load_from_string(raw)
    onnx_model.ir_version = min(onnx_model.ir_version, MAX_IR_VERSION)
    write_card_to_onnx_model(onnx_model, card)
    onnx.checker.check_model(onnx_model)
    data = onnx_model.SerializeToString()
    if check_parity:
        difference = parity_difference(data, model, example)
        if not difference <= atol:
            raise ModelError(f"ONNX Runtime and torch disagree (max abs difference {difference:.3g} of the output scale > {atol:g})",
                             path=path, hint="Nothing was written; report this model and use the torch checkpoint "
                             "meanwhile.")
    return data


def export_checkpoint(checkpoint: str | Path, path: str | Path, **kwargs) -> Path:
    """Export a medseg checkpoint (.pt with its card) to ONNX; kwargs go to :func:`export_onnx`."""
    from medseg_cli.checkpoint import load_model_from_checkpoint

    model, card = load_model_from_checkpoint(checkpoint)
    return export_onnx(model, card, path, **kwargs)
