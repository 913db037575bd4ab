"""medseg torch checkpoints: one dict holding the weights, the model card and (for training) its state.

Format (``torch.save`` of a dict, loaded with ``weights_only=True`` so a pickle that runs code is
refused)::

    {"format": "medseg-checkpoint", "version": 1,
     "card": <ModelCard.to_dict()>, "model_state": <state_dict>,
     ... optional training state: "epoch", "optimizer_state", "scheduler_state", "scaler_state", "rng_state", ...}
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from .atomic import atomic_output
from .card import ModelCard
from .errors import ModelError

CHECKPOINT_FORMAT = "medseg-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, model_state: dict, card: ModelCard, **extra: Any) -> Path:
    """Write a checkpoint atomically (a crash never leaves a half-written file under ``path``)."""
    import torch

    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "card": card.to_dict(),
               "model_state": model_state, **extra}
    with atomic_output(path) as temp_path:
        torch.save(payload, temp_path)
    return Path(path)


def load_checkpoint(path: str | Path, *, map_location: str = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``); raise :class:`ModelError` with the reason."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError("checkpoint not found", path=path, hint="Check the path.")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic[:4] != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save: a zip archive, or a legacy pickle
        raise ModelError("is not a torch checkpoint (torch.save writes a zip archive or a pickle)", path=path,
                         hint="Give the .pt file that `medseg train` wrote (last.pt / best.pt).")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        import re  # torch names the forbidden callable ("... GLOBAL posix.system ...")

        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f"it refers to {found.group(1)}" if found else str(err).splitlines()[0][:120]
        raise ModelError("refused to load: the checkpoint holds Python objects or code, not just weights "
                         f"({detail})", path=path,
                         hint="Only load checkpoints from sources you trust; re-save it as a plain state_dict.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelError(f"checkpoint is corrupt or truncated ({type(err).__name__})", path=path,
                         hint="Use an earlier checkpoint or re-download it.") from None
    if not isinstance(payload, dict):
        raise ModelError("checkpoint is not a dict of weights", path=path)
    return payload


def card_from_checkpoint(payload: dict, *, source: str | Path | None = None) -> ModelCard:
    """The card inside a medseg checkpoint, or from ``<checkpoint>.card.json`` beside it."""
    if payload.get("format") == CHECKPOINT_FORMAT and "card" in payload:
        return ModelCard.from_dict(payload["card"], source=str(source) if source else None)
    if source is not None:
        sidecar = Path(str(source) + ".card.json")
        if sidecar.is_file():
            return ModelCard.load(sidecar)
    raise ModelError("checkpoint carries no model card", path=source,
                     hint="Train with `medseg train`, or put a <checkpoint>.card.json beside it.")


def load_model_from_checkpoint(path: str | Path):
    """Build the card's architecture and load the weights: returns ``(model in eval mode, card)``."""
    from .zoo import build_model

    payload = load_checkpoint(path)
    card = card_from_checkpoint(payload, source=path)
    state = payload.get("model_state", payload.get("state_dict", payload))
    model = build_model(card.architecture, card.in_channels, card.num_classes, **card.architecture_kwargs)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        raise ModelError(f"weights do not fit architecture {card.architecture} ({str(err).splitlines()[0][:160]})",
                         path=path) from None
    model.eval()
    return model, card
