"""The model zoo: every network of the seed code bases, built by name.

>>> from medseg_cli.zoo import build_model
>>> net = build_model("unet3d", in_channels=1, num_classes=3)
"""

from __future__ import annotations

import importlib

from .registry import build_model, get_entry, list_models, register_model

# One module per family; each registers its models on import.
FAMILY_MODULES = ("autofocus", "unet", "vnet", "foveation")


def load_all_families() -> None:
    for module in FAMILY_MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise


__all__ = ["build_model", "get_entry", "list_models", "register_model", "load_all_families"]
