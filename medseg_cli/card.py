"""ModelCard: one JSON document saying how a network was trained and how it must be fed.

It travels inside the .onnx file (``metadata_props["medseg.card"]``) and beside a torch checkpoint
(``<checkpoint>.card.json`` or inside the checkpoint dict under ``"card"``). Training writes it,
``predict`` obeys it, so prediction mirrors training exactly.

Array-related sizes are in array order: ``input_patch`` / ``output_patch`` are ``(Z, Y, X)`` voxels
for 3D networks and ``(Y, X)`` pixels for 2D ones; ``preprocessing["target_spacing_zyx"]`` is mm.

``preprocessing`` keys (all optional; see ``preprocessing.Preprocessor``):
    roi: "none" | "nonzero" | "otsu"            how the region of interest is found
    crop_to_roi: bool                            crop to the RoI bounding box before inference
    target_spacing_zyx: [z, y, x] | null         resample to this spacing (mm); null keeps the grid
    normalization: {"kind": "zscore" | "zscore_roi" | "percentile_zscore" | "ct_window" |
                    "autofocus" | "scale" | "none", ...parameters}
    channel_normalization: list of the above, one per channel (overrides ``normalization``)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ModelError

ONNX_METADATA_KEY = "medseg.card"
CARD_VERSION = 1

DEFAULT_COLORS = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
]


@dataclass(frozen=True)
class ModelCard:
    """How a network was trained and must be fed. See the module docstring for units and orders."""

    name: str
    architecture: str
    in_channels: int
    num_classes: int
    spatial_dims: int = 3
    architecture_kwargs: dict = field(default_factory=dict)
    channel_names: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # {"0": "background", "1": "anterior", ...}
    label_colors: dict = field(default_factory=dict)  # {"1": [r, g, b]}
    input_patch: list = field(default_factory=list)
    output_patch: list = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)
    output_activation: str = "softmax"  # "softmax" over classes, or "sigmoid" for one-channel nets
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    description: str = ""
    licence: str = ""
    citation: str = ""
    card_version: int = CARD_VERSION

    def __post_init__(self) -> None:
        problems = []
        if not self.name:
            problems.append("name is empty")
        if self.in_channels < 1:
            problems.append("in_channels must be >= 1")
        if self.num_classes < 1:
            problems.append("num_classes must be >= 1")
        if self.spatial_dims not in (2, 3):
            problems.append("spatial_dims must be 2 or 3")
        for key in ("input_patch", "output_patch"):
            patch = getattr(self, key)
            if patch and (len(patch) != self.spatial_dims or any(int(v) < 1 for v in patch)):
                problems.append(f"{key} must have {self.spatial_dims} positive sizes, got {patch}")
        if self.channel_names and len(self.channel_names) != self.in_channels:
            problems.append(f"channel_names lists {len(self.channel_names)} names for {self.in_channels} channels")
        if self.output_activation not in ("softmax", "sigmoid"):
            problems.append("output_activation must be 'softmax' or 'sigmoid'")
        if problems:
            raise ModelError("invalid model card: " + "; ".join(problems), path=self.name or None)
        object.__setattr__(self, "labels", {str(k): str(v) for k, v in self.labels.items()})
        object.__setattr__(self, "label_colors", {str(k): list(v) for k, v in self.label_colors.items()})

    # ------------------------------------------------------------------ derived facts
    @property
    def margin(self) -> list[int]:
        """Voxels lost per side by valid convolutions: (input_patch - output_patch) / 2 per axis."""
        if not self.input_patch or not self.output_patch:
            return [0] * self.spatial_dims
        return [(int(i) - int(o)) // 2 for i, o in zip(self.input_patch, self.output_patch)]

    def label_name(self, value: int) -> str:
        return self.labels.get(str(value), f"label_{value}")

    def label_color(self, value: int) -> list[int]:
        if str(value) in self.label_colors:
            return list(self.label_colors[str(value)])
        return list(DEFAULT_COLORS[value % len(DEFAULT_COLORS)])

    def with_updates(self, **changes: Any) -> "ModelCard":
        return replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = None) -> "ModelCard":
        if not isinstance(data, dict):
            raise ModelError("model card is not a JSON object", path=source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"model card has unknown keys {unknown}", path=source,
                             hint=f"Known keys: {', '.join(sorted(known))}.")
        missing = [k for k in ("name", "architecture", "in_channels", "num_classes") if k not in data]
        if missing:
            raise ModelError(f"model card lacks {', '.join(missing)}", path=source)
        try:
            return cls(**data)
        except TypeError as err:
            raise ModelError(f"invalid model card ({err})", path=source) from None

    @classmethod
    def from_json(cls, text: str, *, source: str | None = None) -> "ModelCard":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelError(f"model card is not valid JSON ({err.msg}, line {err.lineno})", path=source) from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | Path) -> Path:
        from .atomic import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ModelError(f"cannot read model card ({err.strerror})", path=path) from None
        return cls.from_json(text, source=str(path))


def read_card_from_onnx(path: str | Path) -> ModelCard:
    """Read the card stored in an ONNX file's metadata (without loading the weights)."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and friends
        raise ModelError(f"not a valid ONNX model ({type(err).__name__})", path=path,
                         hint="Re-export or re-fetch the model.") from None
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return ModelCard.from_json(prop.value, source=str(path))
    raise ModelError("ONNX model carries no medseg card (metadata 'medseg.card')", path=path,
                     hint="Export it with `medseg export` or attach a card.")


def write_card_to_onnx_model(model: "Any", card: ModelCard) -> None:
    """Store ``card`` in an in-memory ``onnx.ModelProto``'s metadata_props (replacing any earlier)."""
    for index in reversed(range(len(model.metadata_props))):
        if model.metadata_props[index].key == ONNX_METADATA_KEY:
            del model.metadata_props[index]
    entry = model.metadata_props.add()
    entry.key = ONNX_METADATA_KEY
    entry.value = card.to_json(indent=None)
