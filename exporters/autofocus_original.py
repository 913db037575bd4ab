"""Converter of the Autofocus authors' published checkpoints (``models.tar.gz``) to medseg ONNX models.

The archive holds ``saved_models/<id>/<epoch>_checkpoint.pth.tar`` for the ids Basic, ASPP_c,
ASPP_s, AFN1 ... AFN6 (DIGEST §1.6): a torch pickle of ``{"epoch", "state_dict", "opt_dict"}`` whose
``state_dict`` keys carry DataParallel's ``module.`` prefix and the seed's ``models.py`` names
(DIGEST §1.5). Checkpoints written by PyTorch 0.3 lack the BatchNorm ``num_batches_tracked`` buffers;
those are filled in (they do not change inference).

>>> from exporters.autofocus_original import load_original_checkpoint, convert
>>> model = load_original_checkpoint("saved_models/AFN1/390_checkpoint.pth.tar", "afn1")
>>> convert("saved_models/AFN1/390_checkpoint.pth.tar", "AFN1.onnx", architecture="afn1")

``convert(checkpoint, destination, entry)`` is what ``medseg fetch`` calls for the manifest format
``autofocus-original`` (``medseg_cli/weights/fetch.py``: CONVERTERS).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from medseg_cli.card import ModelCard
from medseg_cli.errors import ModelError
from medseg_cli.zoo import build_model
from medseg_cli.zoo.autofocus import SEED_IDS, AutofocusNet

DATAPARALLEL_PREFIX = "module."
CHANNEL_NAMES = ["Flair", "T1", "T1c", "T2"]
LABELS = {"0": "background", "1": "necrosis", "2": "edema", "3": "non-enhancing tumour", "4": "enhancing tumour"}
INPUT_PATCH = [75, 75, 75]
OUTPUT_PATCH = [47, 47, 47]
PREPROCESSING = {"roi": "nonzero", "normalization": {"kind": "autofocus"}}
CITATION = ("Y. Qin, K. Kamnitsas, S. Ancha, J. Nanavati, G. Cottrell, A. Criminisi, A. Nori. Autofocus Layer for "
            "Semantic Segmentation. MICCAI 2018. arXiv:1805.08403")
LICENCE = "MIT (yaq007/Autofocus-Layer); BRATS 2015 data terms apply"

#: any spelling of an Autofocus architecture -> its registry name: registry names, the seed's ``--id``
#: (``AFN1``, ``ASPP_c``) and the manifest's short names (``basic``, ``aspp_c``), case-insensitive.
ARCHITECTURE_ALIASES = {
    **{name: name for name in SEED_IDS.values()},
    **{seed_id.lower(): name for seed_id, name in SEED_IDS.items()},
    "aspp-c": "autofocus_aspp_c", "aspp-s": "autofocus_aspp_s",
}


def resolve_architecture(name: str) -> str:
    """The registry name of an Autofocus architecture (``AFN1``, ``basic``, ``autofocus_basic`` ...)."""
    key = str(name).strip().lower()
    if key not in ARCHITECTURE_ALIASES:
        raise ModelError(f"{name!r} is not an Autofocus architecture",
                         hint=f"Use one of {', '.join(SEED_IDS)} (or {', '.join(SEED_IDS.values())}).")
    return ARCHITECTURE_ALIASES[key]


def original_state_dict(model: AutofocusNet, prefix: str = DATAPARALLEL_PREFIX) -> "OrderedDict[str, torch.Tensor]":
    """``model``'s state_dict under the authors' key names (with DataParallel's ``module.`` prefix):
    what their ``train.py`` would have saved for this network (tensors cloned, on the CPU)."""
    mapping = model.seed_key_map()
    return OrderedDict((prefix + mapping[key], value.detach().cpu().clone())
                       for key, value in model.state_dict().items())


def read_original_checkpoint(path: str | Path) -> tuple[dict, int | None]:
    """``(state_dict, epoch)`` of an authors' checkpoint (``epoch`` None when absent).

    Loaded with ``weights_only=True`` on the CPU. Accepts the training dict (``state_dict`` key) or a
    bare state dict. Raises :class:`ModelError` when the file is not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError("checkpoint file not found", path=path, hint="Check the path, or run `medseg fetch` again.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors alike mean "not a checkpoint"
        summary = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ModelError(f"cannot read the file as a torch checkpoint ({summary})", path=path,
                         hint="Expected an Autofocus-Layer saved_models/<id>/<epoch>_checkpoint.pth.tar.") from None
    state: Any = payload.get("state_dict", payload) if isinstance(payload, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("the checkpoint holds no state_dict of tensors", path=path,
                         hint="Expected a dict with 'state_dict' as written by Autofocus-Layer's train.py.")
    epoch = payload.get("epoch") if isinstance(payload, Mapping) else None
    return dict(state), (int(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None)


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(key.startswith(DATAPARALLEL_PREFIX) for key in state):
        return {key[len(DATAPARALLEL_PREFIX):]: value for key, value in state.items()}
    return dict(state)


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_original_state_dict(model: AutofocusNet, state: Mapping[str, torch.Tensor],
                             source: str | Path | None = None) -> AutofocusNet:
    """Load an authors' state dict (``module.`` prefix optional) into ``model``; returns ``model``.

    Missing ``num_batches_tracked`` buffers (PyTorch 0.3 checkpoints) keep the model's values. Any other
    missing or unexpected key, or a shape that differs, raises :class:`ModelError` listing a few.
    """
    theirs = _strip_prefix(state)
    ours_to_theirs = model.seed_key_map()
    own = model.state_dict()
    expected = set(ours_to_theirs.values())
    unexpected = [key for key in theirs if key not in expected]
    missing = [t for t in expected if t not in theirs and not t.endswith("num_batches_tracked")]
    arch = type(model).__name__ + f" ({model.block_kinds}, {model.head_kind})"
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_few(unexpected)}")
        raise ModelError(f"the checkpoint does not fit {arch}: " + "; ".join(parts), path=source,
                         hint="Check that the architecture matches the checkpoint's saved_models/<id> folder.")
    converted = {}
    mismatched = []
    for ours, key in ours_to_theirs.items():
        if key not in theirs:  # an absent num_batches_tracked
            converted[ours] = own[ours]
            continue
        value = theirs[key]
        if tuple(value.shape) != tuple(own[ours].shape):
            mismatched.append(f"{key} {tuple(value.shape)} != {tuple(own[ours].shape)}")
        converted[ours] = value.to(own[ours].dtype)
    if mismatched:
        raise ModelError(f"the checkpoint's tensor shapes do not fit {arch}: {_few(mismatched, 3)}", path=source,
                         hint="Check the architecture, in_channels and num_classes.")
    model.load_state_dict(converted, strict=True)
    return model


def _infer_io(state: Mapping[str, torch.Tensor], architecture: str) -> tuple[int, int]:
    """(in_channels, num_classes) from the first conv and the classifier of an authors' state dict."""
    theirs = _strip_prefix(state)
    head = {"autofocus_aspp_c": "fc9.weight", "autofocus_aspp_s": "last_list.0.weight"}.get(architecture, "fc.weight")
    for key in ("conv1.weight", head):
        if key not in theirs or theirs[key].dim() != 5:
            raise ModelError(f"the checkpoint has no {key} of a {architecture} network",
                             hint="Check that the architecture matches the checkpoint's saved_models/<id> folder.")
    return int(theirs["conv1.weight"].shape[1]), int(theirs[head].shape[0])


def load_original_checkpoint(path: str | Path, architecture: str, **model_kwargs) -> AutofocusNet:
    """Build ``architecture`` (any spelling of :func:`resolve_architecture`) and load an authors'
    checkpoint into it; the model is returned in eval mode. In/out channels come from the weights."""
    name = resolve_architecture(architecture)
    state, _ = read_original_checkpoint(path)
    in_channels, num_classes = _infer_io(state, name)
    model = build_model(name, in_channels, num_classes, **model_kwargs)
    return load_original_state_dict(model, state, source=path).eval()


def autofocus_card(architecture: str, *, name: str | None = None, in_channels: int = 4, num_classes: int = 5,
                   entry: Any = None, epoch: int | None = None) -> ModelCard:
    """The model card of a converted Autofocus model; a manifest ``entry`` (``ManifestEntry``) supplies
    name, description, labels, modalities, licence, citation and card overrides where it has them."""
    arch = resolve_architecture(architecture)
    seed_id = next(k for k, v in SEED_IDS.items() if v == arch)
    modalities = list(getattr(entry, "modalities", None) or [])
    labels = dict(getattr(entry, "labels", None) or {})
    data: dict[str, Any] = {
        "name": getattr(entry, "name", None) or name or seed_id,
        "architecture": arch,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "spatial_dims": 3,
        "channel_names": modalities if len(modalities) == in_channels else
        (CHANNEL_NAMES if in_channels == len(CHANNEL_NAMES) else []),
        "labels": labels if len(labels) == num_classes else (LABELS if num_classes == len(LABELS) else {}),
        "input_patch": list(INPUT_PATCH),
        "output_patch": list(OUTPUT_PATCH),
        "preprocessing": {"roi": PREPROCESSING["roi"], "normalization": dict(PREPROCESSING["normalization"])},
        "output_activation": "softmax",
        "training": {"source": "published by the authors (yaq007/Autofocus-Layer, models.tar.gz)",
                     "dataset": "BRATS 2015", "seed_id": seed_id, "epoch": epoch,
                     "converted_by": "exporters.autofocus_original"},
        "description": getattr(entry, "description", None) or f"Autofocus {seed_id} trained by the authors on BRATS 2015.",
        "licence": getattr(entry, "licence", None) or LICENCE,
        "citation": getattr(entry, "citation", None) or CITATION,
    }
    data.update(dict(getattr(entry, "card", None) or {}))
    return ModelCard.from_dict(data, source=data["name"])


def convert(checkpoint: str | Path, destination: str | Path, entry: Any = None, *, architecture: str | None = None,
            input_shape: Sequence[int] | None = None, check_parity: bool = True) -> Path:
    """Convert an authors' checkpoint to an ONNX model with its card at ``destination``.

    ``entry`` is the manifest entry (``medseg fetch`` passes it; its ``architecture`` picks the network
    unless ``architecture`` is given). The ONNX graph has dynamic batch and spatial axes; the parity
    check against torch (max abs difference 1e-4) runs on ``input_shape`` (N, C, Z, Y, X), by default
    one 75^3 segment. Returns ``destination``.
    """
    arch = architecture or getattr(entry, "architecture", None)
    if not arch:
        raise ModelError("no architecture given for the Autofocus checkpoint", path=checkpoint,
                         hint=f"Pass architecture= one of {', '.join(SEED_IDS)}.")
    name = resolve_architecture(arch)
    state, epoch = read_original_checkpoint(checkpoint)
    in_channels, num_classes = _infer_io(state, name)
    model = load_original_state_dict(build_model(name, in_channels, num_classes), state, source=checkpoint).eval()
    card = autofocus_card(name, in_channels=in_channels, num_classes=num_classes, entry=entry, epoch=epoch)

    from exporters.onnx_export import export_onnx

    return export_onnx(model, card, destination, input_shape=input_shape, dynamic=True, check_parity=check_parity)
