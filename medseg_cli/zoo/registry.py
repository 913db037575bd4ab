"""One registry for every network: ``@register_model`` on a builder, ``build_model(name, ...)`` to build.

A builder is ``fn(in_channels: int, num_classes: int, **kwargs) -> torch.nn.Module``. Registration
records the family, the spatial dimensionality (2 or 3) and whether the net uses valid (unpadded)
convolutions, so tests and the sliding window can treat every model alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ModelError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable
    family: str
    spatial_dims: int
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, family: str, spatial_dims: int, description: str = "") -> Callable:
    """Decorator: register ``builder`` under ``name`` (case-insensitive lookup)."""

    def decorate(builder: Callable) -> Callable:
        key = name.lower()
        if key in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[key] = ModelEntry(name, builder, family, spatial_dims, description or (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return decorate


def _load_families() -> None:
    from . import load_all_families

    load_all_families()


def list_models() -> list[ModelEntry]:
    """Every registered model, sorted by family then name."""
    _load_families()
    return sorted(_REGISTRY.values(), key=lambda e: (e.family, e.name.lower()))


def get_entry(name: str) -> ModelEntry:
    _load_families()
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(e.name for e in list_models())
        raise ModelError(f"unknown architecture {name!r}", hint=f"Known: {known}.") from None


def build_model(name: str, in_channels: int, num_classes: int, **kwargs):
    """Build the registered network ``name`` (a ``torch.nn.Module``)."""
    entry = get_entry(name)
    try:
        return entry.builder(in_channels, num_classes, **kwargs)
    except TypeError as err:
        raise ModelError(f"cannot build {entry.name}: {err}",
                         hint="Check the model kwargs in the config or card.") from None
