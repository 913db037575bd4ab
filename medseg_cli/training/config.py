"""Training configuration: YAML -> frozen dataclasses, strictly checked.

Unknown keys, wrong types and missing paths raise :class:`InputError` naming the config file and the
dotted key, e.g. ``cfg.yaml: model.nam: unknown key; known: name, kwargs``. Relative paths
(``data.root``, ``data.cases_csv``, ``output``) resolve against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import InputError, MedsegError
from .augment import AugmentConfig


@dataclass(frozen=True)
class DataConfig:
    """Where the cases are and how they split into training and validation."""

    root: str = ""                       # folder in the MSD / nnU-Net layout
    images: str = "imagesTr"             # sub-folder of images (channel files CASE_0000.nii.gz, ... or CASE.nii.gz)
    labels: str = "labelsTr"             # sub-folder of label maps CASE.nii.gz
    cases_csv: Optional[str] = None      # instead of the folders: CSV with columns case, image[_0000, ...], label
    channels: int = 1                    # input channels per case
    val_every_nth: Optional[int] = None  # every n-th case (sorted by name, starting with the first) validates
    val_fraction: Optional[float] = None  # or: the last fraction of a seeded shuffle validates
    val_cases: Optional[list] = None     # or: these case names validate
    folds: Optional[int] = None          # or: k-fold split of the sorted cases ...
    fold: int = 0                        # ... with this fold validating
    max_cases: Optional[int] = None      # use only the first n cases (sorted), for quick runs
    cache: Optional[str] = None          # preprocessed .npy cache folder (default: <output>/../cache)
    label_map: Optional[dict] = None     # raw label value -> class, e.g. {0: 0, 255: 1}; "R,G,B" keys for colour masks


@dataclass(frozen=True)
class ModelConfig:
    name: str = "unet3d"                 # zoo name (`medseg zoo` lists them)
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingConfig:
    patch_size: list = field(default_factory=lambda: [40, 56, 40])  # OUTPUT patch (Z, Y, X) voxels; 2D: (1, Y, X)
    batch_size: int = 8
    foreground_ratio: float = 0.33       # share of patches centred on foreground (nnU-Net 1/3, Autofocus 0.5)
    class_balanced: bool = True          # foreground centres: pick a class uniformly, then a voxel of it
    epochs: int = 100
    iterations_per_epoch: Optional[int] = None  # default: ceil(training cases / batch size)
    val_every: int = 1                   # validate every n epochs (and after the last)
    val_overlap: float = 0.5             # sliding-window overlap in validation (as predict)
    amp: bool = True                     # mixed precision on CUDA
    grad_clip: Optional[float] = 12.0    # max gradient norm (None: off)
    num_workers: int = 2                 # DataLoader worker processes
    threads: Optional[int] = None        # torch CPU threads (None: torch's default)


@dataclass(frozen=True)
class HybridConfig:
    """Weight of term ``a`` = alpha(epoch) = max(start - step * epoch, minimum); term ``b`` gets
    ``1 - alpha``. The VNet seed: a = dice, b = boundary, start 1, step 0.01, minimum ~0.14."""

    a: str = "dice"
    b: str = "boundary"
    start: float = 1.0
    step: float = 0.01
    minimum: float = 0.14

    def alpha(self, epoch: int) -> float:
        return max(self.start - self.step * epoch, self.minimum)


@dataclass(frozen=True)
class LossConfig:
    terms: dict = field(default_factory=lambda: {"dice": 1.0, "ce": 1.0})  # ce, dice, focal, boundary -> weight
    class_weights: Optional[list] = None
    dice_batch: bool = True
    dice_include_background: bool = False
    focal_gamma: float = 2.0
    hybrid: Optional[HybridConfig] = None  # alpha-schedule: a gets alpha(epoch), b gets 1 - alpha


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"                   # adam | sgd | rmsprop
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.99               # sgd, rmsprop
    nesterov: bool = True                # sgd
    alpha: float = 0.99                  # rmsprop smoothing
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "poly"                   # none | poly | exponential | plateau
    power: float = 0.9                   # poly: lr * (1 - it / max_it) ** power, per iteration
    gamma: float = 0.95                  # exponential: lr * gamma ** epoch
    factor: float = 0.5                  # plateau: multiply by factor ...
    patience: int = 10                   # ... after this many validations without a better Dice
    min_lr: float = 0.0


@dataclass(frozen=True)
class LocatorConfig:
    """The cascade's first stage (see :mod:`medseg_cli.training.cascade`)."""

    name: str = "unet3d"                 # zoo network of the locator
    kwargs: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # overrides of `training:` keys for the locator (epochs, ...)
    preprocessing: Optional[dict] = None  # default: the main `preprocessing:` (target spacing set by the cascade)


@dataclass(frozen=True)
class CascadeConfig:
    """Locator -> segmenter cascade: the main ``model:`` is the segmenter."""

    locator: LocatorConfig = field(default_factory=LocatorConfig)
    downscale: Optional[Union[float, list]] = None  # locator grid = scan spacing x factor (z, y, x); default 2 ...
    spacing_mm: Optional[Union[float, list]] = None  # ... or this fixed locator spacing in mm (z, y, x)
    target_labels: list = field(default_factory=list)  # labels the locator finds; [] = every label > 0
    margin_mm: Union[float, list] = 8.0  # added around the located box on each side (one value or z, y, x)
    keep_largest: bool = False           # box of the locator's largest connected target component only
    on_empty: str = "whole"              # locator finds nothing: segment the whole scan, or "error"


@dataclass(frozen=True)
class TrainConfig:
    name: str = "model"
    description: str = ""
    licence: str = ""
    citation: str = ""
    training_data: str = ""              # what the model was trained on (goes into the card)
    labels: dict = field(default_factory=lambda: {0: "background", 1: "foreground"})
    channel_names: list = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: dict = field(default_factory=dict)  # as the model card's (see medseg_cli.card)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seed: int = 0
    output: str = "runs/model"
    cascade: Optional[CascadeConfig] = None  # train a locator -> segmenter cascade (see training.cascade)
    source: str = ""                     # the config file (set by load_config)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------------- checking
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {list: "list", tuple: "list", dict: "mapping"}.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # a mapping for an optional section: report its own errors (unknown keys, ...)
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _build(arg, value, source, key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except InputError:
                continue
        raise InputError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}", path=source)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key)
    base = origin or tp
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif base in (list, tuple):
        ok = isinstance(value, (list, tuple))
        value = base(value) if ok else value
    elif base is dict:
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise InputError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}", path=source)
    return value


def _build(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping of keys, got {type(data).__name__}", path=source)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise InputError(f"{dotted}: unknown key; known: {', '.join(known)}", path=source)
        values[key] = _convert(value, hints[key], dotted, source)
    return cls(**values)


def _resolve(path: str | None, base: Path) -> str | None:
    if path in (None, ""):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def config_from_dict(data: dict, *, source: str = "<config>", base: Path | None = None) -> TrainConfig:
    """Build and check a :class:`TrainConfig` from parsed YAML; relative paths resolve against ``base``."""
    config = _build(TrainConfig, data, source)
    base = base or Path.cwd()
    data_cfg = dataclasses.replace(config.data, root=_resolve(config.data.root, base) or "",
                                   cases_csv=_resolve(config.data.cases_csv, base),
                                   cache=_resolve(config.data.cache, base))
    config = dataclasses.replace(config, data=data_cfg, output=_resolve(config.output, base), source=source)
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Semantic checks (values, paths) that types alone cannot express."""
    src = config.source

    def fail(key: str, problem: str, hint: str | None = None) -> None:
        raise InputError(f"{key}: {problem}", path=src, hint=hint)

    d = config.data
    if d.cases_csv:
        if not Path(d.cases_csv).is_file():
            fail("data.cases_csv", f"file not found: {d.cases_csv}")
    else:
        if not d.root:
            fail("data.root", "missing", "Give the dataset folder (imagesTr/ labelsTr/) or data.cases_csv.")
        if not Path(d.root).is_dir():
            fail("data.root", f"folder not found: {d.root}", "Relative paths resolve against the config file's folder.")
        for key in ("images", "labels"):
            if not (Path(d.root) / getattr(d, key)).is_dir():
                fail(f"data.{key}", f"folder not found: {Path(d.root) / getattr(d, key)}")
    splits = [k for k in ("val_every_nth", "val_fraction", "val_cases", "folds") if getattr(d, k) is not None]
    if len(splits) > 1:
        fail("data", f"choose one validation split, got {', '.join(splits)}")
    if d.val_fraction is not None and not 0 < d.val_fraction < 1:
        fail("data.val_fraction", "must lie between 0 and 1")
    if d.val_every_nth is not None and d.val_every_nth < 2:
        fail("data.val_every_nth", "must be >= 2")
    if d.folds is not None and not (d.folds >= 2 and 0 <= d.fold < d.folds):
        fail("data.fold", f"must satisfy 0 <= fold < folds (folds = {d.folds})")
    if d.channels < 1:
        fail("data.channels", "must be >= 1")
    if d.label_map is not None:
        try:
            parse_label_map(d.label_map)
        except ValueError as err:
            fail("data.label_map", str(err), 'Map raw values to classes, e.g. {0: 0, 255: 1} or {"128,0,0": 1}.')
        bad = sorted({v for v in d.label_map.values() if not (isinstance(v, int) and 0 <= v < config.num_classes)})
        if bad:
            fail("data.label_map", f"classes {bad} are not label values 0..{config.num_classes - 1}")
    if config.channel_names and len(config.channel_names) != d.channels:
        fail("channel_names", f"lists {len(config.channel_names)} names for {d.channels} channels")
    try:
        values = sorted(int(k) for k in config.labels)
    except (TypeError, ValueError):
        fail("labels", "keys must be integer label values")
    if values != list(range(len(values))) or len(values) < 2:
        fail("labels", f"must name the values 0..K-1 (K >= 2), got {values}")
    t = config.training
    if len(t.patch_size) not in (2, 3) or any(not isinstance(v, int) or v < 1 for v in t.patch_size):
        fail("training.patch_size", f"must be 3 positive integers (Z, Y, X), got {t.patch_size}")
    for key in ("batch_size", "epochs", "val_every"):
        if getattr(t, key) < 1:
            fail(f"training.{key}", "must be >= 1")
    if not 0 <= t.foreground_ratio <= 1:
        fail("training.foreground_ratio", "must lie between 0 and 1")
    if not 0 <= t.val_overlap < 1:
        fail("training.val_overlap", "must lie in [0, 1)")
    try:
        from ..zoo import get_entry

        entry = get_entry(config.model.name)
    except MedsegError as err:
        fail("model.name", err.problem, err.hint)
    if len(t.patch_size) == 2 and entry.spatial_dims == 3:
        fail("training.patch_size", f"{entry.name} is a 3D network: give 3 sizes (Z, Y, X)")
    if entry.spatial_dims == 2 and len(t.patch_size) == 3 and t.patch_size[0] != 1:
        fail("training.patch_size", f"{entry.name} is a 2D network: give (1, Y, X) or (Y, X), got {t.patch_size}")
    if not all(isinstance(k, str) for k in config.model.kwargs):
        fail("model.kwargs", "keys must be argument names")
    _check_preprocessing(config.preprocessing, fail)
    from .losses import TERMS

    if not config.loss.terms and config.loss.hybrid is None:
        fail("loss.terms", "give at least one loss term", f"Known: {', '.join(TERMS)}.")
    for term, weight in config.loss.terms.items():
        if term not in TERMS:
            fail(f"loss.terms.{term}", f"unknown loss term; known: {', '.join(TERMS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            fail(f"loss.terms.{term}", f"weight must be a number >= 0, got {weight!r}")
    if config.loss.hybrid is not None:
        for key in ("a", "b"):
            if getattr(config.loss.hybrid, key) not in TERMS:
                fail(f"loss.hybrid.{key}", f"unknown loss term; known: {', '.join(TERMS)}")
    weights = config.loss.class_weights
    if weights is not None and (len(weights) != config.num_classes or not all(_is_number(w) for w in weights)):
        fail("loss.class_weights", f"needs {config.num_classes} numbers (one per label), got {weights!r}")
    if config.optimizer.name.lower() not in ("adam", "sgd", "rmsprop"):
        fail("optimizer.name", f"unknown optimiser {config.optimizer.name!r}; known: adam, sgd, rmsprop")
    if config.optimizer.lr <= 0:
        fail("optimizer.lr", "must be > 0")
    if config.schedule.name.lower() not in ("none", "poly", "exponential", "plateau"):
        fail("schedule.name", f"unknown schedule {config.schedule.name!r}; known: none, poly, exponential, plateau")
    a = config.augmentation
    for f in dataclasses.fields(AugmentConfig):
        value = getattr(a, f.name)
        if f.name.endswith("_prob") and not 0 <= value <= 1:
            fail(f"augmentation.{f.name}", "must lie between 0 and 1")
        if f.name.endswith("_range") and not (len(value) == 2 and all(_is_number(v) for v in value)
                                               and 0 < value[0] <= value[1]):
            fail(f"augmentation.{f.name}", f"must be [low, high] with 0 < low <= high, got {list(value)}")
    if not all(isinstance(v, int) and 0 <= v <= 2 for v in a.flip_axes):
        fail("augmentation.flip_axes", f"array axes 0 (Z), 1 (Y), 2 (X), got {list(a.flip_axes)}")
    for key in ("rotation_degrees", "translation_voxels", "elastic_sigma", "elastic_magnitude", "noise_std"):
        if getattr(a, key) < 0:
            fail(f"augmentation.{key}", "must be >= 0")
    if config.cascade is not None:
        from .cascade import check_cascade

        check_cascade(config, fail)


def parse_label_map(label_map: dict) -> dict[tuple[int, ...], int]:
    """``{raw: class}`` with raw an int, or "R,G,B" / a list for colour masks -> ``{(values...): class}``."""
    parsed: dict[tuple[int, ...], int] = {}
    for raw, cls in label_map.items():
        if isinstance(raw, str):
            parts = [p for p in raw.replace(" ", "").split(",") if p != ""]
        elif isinstance(raw, (list, tuple)):
            parts = list(raw)
        else:
            parts = [raw]
        try:
            key = tuple(int(v) for v in parts)
        except (TypeError, ValueError):
            raise ValueError(f"raw value {raw!r} is not an integer or a list of integers") from None
        if not key or any(isinstance(v, float) and not float(v).is_integer() for v in parts):
            raise ValueError(f"raw value {raw!r} is not an integer or a list of integers")
        parsed[key] = cls
    if len({len(k) for k in parsed}) > 1:
        raise ValueError("mixes single values and colours")
    return parsed


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_preprocessing(spec: dict, fail: Any) -> None:
    """The ``preprocessing`` section must be a valid model-card preprocessing spec."""
    from ..preprocessing import Preprocessor

    try:
        Preprocessor.from_dict(spec)
    except MedsegError as err:
        problem = err.problem[len("preprocessing: "):] if err.problem.startswith("preprocessing: ") else err.problem
        fail("preprocessing", problem, err.hint)
    except (TypeError, ValueError, KeyError) as err:
        fail("preprocessing", f"invalid ({type(err).__name__}: {err})")


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML training config; ``overrides`` ({"training.epochs": 2}) are applied before checking."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", path=path, hint="Write one with `medseg train --print-config MODEL`.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"not valid YAML{where}", path=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("config must be a YAML mapping of keys", path=path)
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent or null (e.g. `cascade: null`): a new section
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise InputError(f"--set {dotted}: {'.'.join(parts[:depth + 1])} is a value, not a section",
                                 path=path)
        node[parts[-1]] = value
    return config_from_dict(data, source=str(path), base=path.resolve().parent)


# ------------------------------------------------------------------------------ example configs
_EXAMPLE = """\
# medseg training config for {model} ({family} family, {dims}D).  Train: medseg train --config THIS.yaml
# Relative paths resolve against this file's folder. Unknown keys are errors; every key is listed here.
name: {model}-example            # model name (goes into the model card)
description: "{model} trained with medseg"
licence: ""                      # licence of the trained weights (follow the training data's)
citation: ""                     # papers to cite (data set, method)
training_data: ""                # what the model was trained on, in words (goes into the card)
labels:                          # label value -> name; values must be 0..K-1
  0: background
  1: foreground
channel_names: [image]           # one name per input channel
data:
  root: data/my_dataset          # MSD / nnU-Net layout: imagesTr/CASE[_0000].nii.gz, labelsTr/CASE.nii.gz
  images: imagesTr
  labels: labelsTr
  cases_csv: null                # or a CSV with columns case, image (image_0000, ...), label (then root is unused)
  channels: 1                    # input channels per case (files CASE_0000, CASE_0001, ... or one 4D file)
  val_every_nth: 5               # validation split: every 5th case by name ...
  val_fraction: null             # ... or this share of a seeded shuffle ...
  val_cases: null                # ... or these case names ...
  folds: null                    # ... or k-fold (cases sorted by name, case i in fold i % folds) ...
  fold: 0                        # ... with this fold validating. Give only one of the four.
  max_cases: null                # use only the first n cases (quick trials)
  cache: null                    # preprocessed .npy cache folder (default: <output>/../cache)
  label_map: null                # raw label value -> class, e.g. {{0: 0, 255: 1}}; colour masks: {{"128,0,0": 1}}
preprocessing:                   # exactly what `medseg predict` will apply (it travels in the model card)
  roi: {roi}                      # none | nonzero | otsu: region for normalisation statistics and cropping
  roi_fill_holes: true
  roi_keep_largest: false
  crop_to_roi: false             # crop every scan to its RoI bounding box (+ crop_margin voxels)
  crop_margin: 0
  target_spacing_zyx: null       # [z, y, x] mm, or null to keep each scan's grid
  interpolation_order: 1         # image resampling: 1 linear, 3 B-spline (labels: always nearest)
  normalization: {normalization}
                                 # kinds: none | zscore | zscore_roi | percentile_zscore | ct_window (low, high)
                                 #        | autofocus | scale
  channel_normalization: null    # or a list with one normalization per channel
model:
  name: {model}                  # `medseg zoo` lists the networks
  kwargs: {kwargs}
training:
  patch_size: {patch}    # OUTPUT patch (Z, Y, X) voxels{patch_note}
  batch_size: {batch}
  foreground_ratio: {fg}          # share of patches centred on a foreground voxel (nnU-Net 0.33, Autofocus 0.5)
  class_balanced: true           # pick the foreground class uniformly first, then one of its voxels
  epochs: {epochs}
  iterations_per_epoch: null     # null: one pass over the training cases (ceil(cases / batch))
  val_every: 1                   # validate (sliding window, exactly as predict) every n epochs
  val_overlap: 0.5
  amp: true                      # mixed precision (CUDA only; ignored on CPU)
  grad_clip: 12.0                # max gradient norm, null = off
  num_workers: 2                 # DataLoader worker processes (0: load in the main process)
  threads: null                  # torch CPU threads (null: torch's default)
augmentation:                    # on the fly, seeded; each transform fires with its probability
  flip_prob: {flip_prob}                 # per axis in flip_axes
  flip_axes: {flip_axes}              # array axes: 0 = Z, 1 = Y, 2 = X
  rotation_prob: {aug}
  rotation_degrees: 15.0         # uniform in [-d, d] about each axis (in-plane for 2D)
  scale_prob: {aug}
  scale_range: [0.85, 1.15]      # isotropic zoom
  translation_prob: 0.0
  translation_voxels: 5.0        # uniform in [-t, t] per axis
  elastic_prob: 0.0
  elastic_sigma: 4.0             # smoothness of the displacement field (voxels)
  elastic_magnitude: 2.0         # largest displacement (voxels)
  noise_prob: {noise}
  noise_std: 0.1                 # gaussian noise, normalised intensity units
  brightness_prob: {noise}
  brightness_range: [0.75, 1.25]
  contrast_prob: {noise}
  contrast_range: [0.75, 1.25]
  gamma_prob: {noise}
  gamma_range: [0.7, 1.5]
loss:
  terms: {terms}    # ce | dice | focal | boundary -> weight
  class_weights: null            # one weight per label for ce / focal
  dice_batch: true               # soft Dice over the whole batch (false: per sample, then averaged)
  dice_include_background: false
  focal_gamma: 2.0
  hybrid: {hybrid}
                                 # a gets alpha = max(start - step * epoch, minimum), b gets 1 - alpha
optimizer:
  name: {opt}                    # adam | sgd | rmsprop
  lr: {lr}
  weight_decay: {wd}
  momentum: {momentum}                 # sgd / rmsprop
  nesterov: true                 # sgd
  alpha: {alpha}                    # rmsprop smoothing
  eps: {eps}
schedule:
  name: {schedule}                     # none | poly (per iteration) | exponential (per epoch) | plateau (on val Dice)
  power: 0.9                     # poly
  gamma: {gamma}                    # exponential: lr * gamma ** epoch
  factor: {factor}                    # plateau: lr *= factor ...
  patience: {patience}                    # ... after this many validations without a better Dice
  min_lr: 0.0
seed: 0
output: runs/{model}             # checkpoints (last.pt, previous.pt, best.pt), log.csv, model.onnx
cascade: null                    # or a locator -> segmenter cascade (3D); `model:` is then the segmenter:
#  locator:                      # the first stage, trained on a coarse grid with a binary target
#    name: unet3d                # zoo network
#    kwargs: {{init_features: 8}}
#    training: {{epochs: 20, patch_size: [32, 32, 32]}}  # overrides of `training:` for the locator
#    preprocessing: null         # default: the main `preprocessing:`
#  downscale: 2                  # locator grid = scan spacing x this (one number or z, y, x) ...
#  spacing_mm: null              # ... or a fixed locator spacing in mm (z, y, x); give one of the two
#  target_labels: []             # labels that count as target; [] = every label > 0
#  margin_mm: 8.0                # added around the located box, each side (one number or z, y, x)
#  keep_largest: false          # box of the locator's largest connected component (ignores stray hits)
#  on_empty: whole               # locator finds nothing: whole (segment the whole scan) | error
# A cascade writes OUTPUT/locator/, OUTPUT/segmenter/ (each as above) and OUTPUT/NAME.cascade.json for
# `medseg predict --model OUTPUT/NAME.cascade.json SCAN`.
"""


def _example_values(name: str, family: str, dims: int) -> dict:
    """Settings of the seed code base that each family comes from (DIGEST), sized for one GPU."""
    values = dict(roi="none", normalization="{kind: zscore}", kwargs="{}", batch=2, fg="0.33", epochs=100,
                  flip_prob="0.5", flip_axes="[0, 1, 2]", aug="0.2", noise="0.15",
                  terms="{dice: 1.0, ce: 1.0}", hybrid="null", opt="adam", lr="0.001", wd="0.0",
                  momentum="0.99", alpha="0.99", eps="1.0e-08", schedule="poly", gamma="0.95", factor="0.5",
                  patience=10)
    if dims == 2:
        values.update(patch="[1, 256, 256]", patch_note="; 2D: Z = 1", batch=8, flip_axes="[1, 2]")
    else:
        values.update(patch="[64, 64, 64]", patch_note="; multiples of the net's pooling factor")
    if family == "autofocus":  # Autofocus-Layer train.py: 50/50 sampling, flips of axis 0, CE, RMSprop, poly
        values.update(roi="nonzero", normalization="{kind: autofocus}", patch="[47, 47, 47]",
                      patch_note="; the net sees 75^3 (valid convolutions)", fg="0.5", epochs=400,
                      flip_axes="[0]", aug="0.0", noise="0.0", terms="{ce: 1.0}", opt="rmsprop",
                      wd="0.0001", momentum="0.6", alpha="0.9", eps="0.0001")
    elif name.lower() == "vnet_la":  # VNet LASC 2018: hybrid Dice -> boundary, Adam, plateau
        values.update(terms="{}", hybrid="{a: dice, b: boundary, start: 1.0, step: 0.01, minimum: 0.14}",
                      lr="0.0003", schedule="plateau", factor="0.8", patience=7, epochs=200)
    elif family == "unet" and dims == 2:  # liver U-Nets: Adam 1e-4, lr * 0.92 per epoch, CE + Dice
        values.update(lr="0.0001", schedule="exponential", gamma="0.92", epochs=50)
    return values


def example_config(model: str) -> str:
    """A complete, commented example config for zoo network ``model`` (loads once data.root exists)."""
    from ..zoo import get_entry

    entry = get_entry(model)
    values = _example_values(entry.name, entry.family, entry.spatial_dims)
    return _EXAMPLE.format(model=entry.name, family=entry.family, dims=entry.spatial_dims, **values)
