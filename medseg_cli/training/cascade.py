"""Training a locator -> segmenter cascade from one config (the ``cascade:`` section).

The main ``model:`` is the segmenter; ``cascade.locator`` names the locator network. Training runs the
ordinary loop (:func:`medseg_cli.training.loop.train`) twice on data derived from the config's cases:

1. **locator** (``OUT/locator/``): a binary target (``cascade.target_labels``, default every label > 0)
   on the scan seen as the cascade will show it at prediction time: resampled to spacing x
   ``cascade.downscale`` (written to ``OUT/data/locator/``), or, with ``cascade.spacing_mm``, the
   original scans with the locator's preprocessing resampling them to that spacing;
2. **segmenter** (``OUT/segmenter/``): every case cropped at full resolution to the bounding box of
   its target plus ``cascade.margin_mm`` (``OUT/data/segmenter/``), exactly the crop the cascade
   segments, so intensity statistics (z-score on the crop) match; patches are drawn inside the
   crop by the usual foreground-oversampling sampler;
3. the cascade card ``OUT/<name>.cascade.json`` (see :mod:`medseg_cli.inference.cascade`) pointing at
   ``locator/model.onnx`` and ``segmenter/model.onnx``; ``medseg predict --model`` reads it.

``--resume`` continues the unfinished stage from its own ``last.pt`` and skips a finished one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError, MedsegError
from .config import TrainConfig, TrainingConfig, _build, check_config

DERIVED_VERSION = 1


# ------------------------------------------------------------------------------- the two configs
def _three(value: Any) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def locator_factor(config: TrainConfig) -> tuple[float, float, float]:
    """The cascade card's ``locator_downscale`` (z, y, x): the factor, or 1 with ``spacing_mm``."""
    c = config.cascade
    if c.spacing_mm is not None:
        return (1.0, 1.0, 1.0)
    return _three(c.downscale if c.downscale is not None else 2.0)


def stage_output(config: TrainConfig, stage: str) -> Path:
    return Path(config.output) / stage


def data_folder(config: TrainConfig, stage: str) -> Path:
    return Path(config.output) / "data" / stage


def locator_config(config: TrainConfig, data: Any = None) -> TrainConfig:
    """The locator stage's config: binary labels, the locator net, its training overrides."""
    c = config.cascade
    training = _build(TrainingConfig, {**dataclasses.asdict(config.training), **c.locator.training},
                      config.source, "cascade.locator.training")
    pre = dict(config.preprocessing if c.locator.preprocessing is None else c.locator.preprocessing)
    pre["target_spacing_zyx"] = list(_three(c.spacing_mm)) if c.spacing_mm is not None else None
    weights = config.loss.class_weights
    loss = dataclasses.replace(config.loss, class_weights=None) if weights is not None and len(weights) != 2 \
        else config.loss
    return dataclasses.replace(
        config, name=f"{config.name}-locator", labels={0: "background", 1: "target"},
        description=f"locator of the {config.name} cascade: finds the target on a coarse grid",
        data=data or config.data, preprocessing=pre, training=training, loss=loss,
        model=dataclasses.replace(config.model, name=c.locator.name, kwargs=dict(c.locator.kwargs)),
        output=str(stage_output(config, "locator")), cascade=None)


def segmenter_config(config: TrainConfig, data: Any = None) -> TrainConfig:
    """The segmenter stage's config: the main config on the target crops."""
    return dataclasses.replace(config, name=f"{config.name}-segmenter", data=data or config.data,
                               output=str(stage_output(config, "segmenter")), cascade=None)


def _derived_data(config: TrainConfig, stage: str) -> Any:
    d = config.data
    return dataclasses.replace(d, root="", cases_csv=str(data_folder(config, stage) / "cases.csv"),
                               max_cases=None, label_map=None,
                               cache=d.cache or str(Path(config.output) / "cache"))


_KEY_NAMES = {"model.name": "cascade.locator.name", "model.kwargs": "cascade.locator.kwargs",
              "model": "cascade.locator", "training.": "cascade.locator.training.",
              "preprocessing": "cascade.locator.preprocessing"}


def check_cascade(config: TrainConfig, fail: Callable[..., None]) -> None:
    """Semantic checks of the ``cascade:`` section (types are checked by the loader)."""
    c = config.cascade
    if c.downscale is not None and c.spacing_mm is not None:
        fail("cascade", "give cascade.downscale or cascade.spacing_mm, not both")
    for key, low, strict in (("downscale", 1.0, False), ("spacing_mm", 0.0, True), ("margin_mm", 0.0, False)):
        value = getattr(c, key)
        if value is None:
            continue
        values = [value] if isinstance(value, (int, float)) else list(value)
        if len(values) not in (1, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in values):
            fail(f"cascade.{key}", f"must be one number or three (z, y, x), got {value!r}")
        if any((v <= low) if strict else (v < low) for v in values):
            fail(f"cascade.{key}", f"must be {'>' if strict else '>='} {low:g}, got {value!r}")
    bad = [v for v in c.target_labels if not (isinstance(v, int) and 0 < v < config.num_classes)]
    if bad:
        fail("cascade.target_labels", f"{bad} are not foreground labels 1..{config.num_classes - 1}")
    if c.on_empty not in ("whole", "error"):
        fail("cascade.on_empty", f"must be 'whole' or 'error', got {c.on_empty!r}")
    from ..zoo import get_entry

    if get_entry(config.model.name).spatial_dims != 3:
        fail("model.name", f"a cascade needs 3D networks; {config.model.name} is 2D")
    try:
        entry = get_entry(c.locator.name)
    except MedsegError as err:
        fail("cascade.locator.name", err.problem, err.hint)
    if entry.spatial_dims != 3:
        fail("cascade.locator.name", f"a cascade needs 3D networks; {entry.name} is 2D")
    try:
        check_config(locator_config(config))
    except InputError as err:
        problem = err.problem
        for old, new in _KEY_NAMES.items():
            if problem.startswith(old):
                problem = new + problem[len(old):]
                break
        problem = problem if problem.startswith("cascade") else f"cascade.locator: {problem}"
        raise InputError(problem, path=config.source, hint=err.hint) from None


# ------------------------------------------------------------------------------- derived datasets
def _digest(config: TrainConfig, cases: Sequence[Any]) -> str:
    from .data import file_stamps

    c = config.cascade
    blob = {"v": DERIVED_VERSION, "files": file_stamps(cases),
            "map": {str(k): v for k, v in (config.data.label_map or {}).items()}, "k": config.num_classes,
            "targets": list(c.target_labels), "factor": list(locator_factor(config)),
            "spacing": c.spacing_mm, "margin": c.margin_mm, "channels": config.data.channels}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_csv(path: Path, rows: list[dict]) -> None:
    from ..atomic import atomic_write_text

    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _write_channels(image: Any, folder: Path, name: str) -> dict:
    from ..imaging import Image, write_image

    volumes = image.channels()
    row = {}
    for c in range(volumes.shape[0]):
        path = folder / f"{name}_{c:04d}.nii.gz"
        write_image(Image(np.ascontiguousarray(volumes[c]), image.geometry), path)
        row[f"image_{c:04d}"] = str(path)
    return row


def target_box(values: np.ndarray, targets: Sequence[int], spacing_zyx: Sequence[float],
               margin_mm: Any) -> tuple[slice, slice, slice] | None:
    """The crop the segmenter trains on: the target's bounding box plus ``margin_mm``, clipped (z, y, x)."""
    from ..inference.cascade import clip_box, grow_box, margin_voxels
    from ..preprocessing import bounding_box

    mask = np.isin(values, list(targets)) if targets else values > 0
    box = bounding_box(mask, 0)
    if box is None:
        return None
    return clip_box(grow_box(box, margin_voxels(_three(margin_mm), spacing_zyx)), values.shape)


def prepare_derived_data(config: TrainConfig, progress: Any = None, log: Callable[[str], None] | None = None) -> None:
    """Write ``OUT/data/locator/`` and ``OUT/data/segmenter/`` (each a ``cases.csv`` with its files),
    checking every case first as training does; reused when the sources and settings are unchanged."""
    from ..atomic import atomic_write_text
    from ..imaging import Image, read_channels, read_image, write_image
    from ..inference.cascade import crop_image
    from ..preprocessing import resample_image_to_spacing
    from ..progress import ensure_progress
    from .data import _check_case, find_cases

    c = config.cascade
    cases = find_cases(config.data)
    key = _digest(config, cases)
    stamp = Path(config.output) / "data" / "derived.json"
    try:
        if json.loads(stamp.read_text())["key"] == key:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    loc_dir, seg_dir = data_folder(config, "locator"), data_folder(config, "segmenter")
    for folder in (loc_dir, seg_dir):
        folder.mkdir(parents=True, exist_ok=True)
    factor = locator_factor(config)
    loc_rows, seg_rows, whole = [], [], []
    with ensure_progress(progress).task("cascade: locator and segmenter data", total=len(cases)) as task:
        for case in cases:
            image = read_channels(list(case.images)) if len(case.images) > 1 else read_image(case.images[0])
            label = read_image(case.label)
            values = _check_case(case, image, label, config.num_classes, config.data.label_map,
                                 config.data.channels)
            target = (np.isin(values, list(c.target_labels)) if c.target_labels else values > 0).astype(np.uint8)
            binary = Image(target, label.geometry, case.label)
            # locator: the scan as the cascade shows it (spacing x factor), binary target
            if any(f != 1 for f in factor):
                spacing = image.geometry.spacing_zyx
                small = resample_image_to_spacing(image, [s * f for s, f in zip(spacing, factor)])
                binary = resample_image_to_spacing(binary, [s * f for s, f in zip(spacing, factor)], is_label=True)
                row = _write_channels(small, loc_dir, case.name)
            else:
                row = ({"image": case.images[0]} if len(case.images) == 1
                       else {f"image_{i:04d}": p for i, p in enumerate(case.images)})
            loc_label = loc_dir / f"{case.name}_label.nii.gz"
            write_image(binary, loc_label, label=True)
            loc_rows.append({"case": case.name, **row, "label": str(loc_label)})
            # segmenter: the full-resolution crop around the target, margin included
            box = target_box(values, c.target_labels, image.geometry.spacing_zyx, c.margin_mm)
            if box is None:
                whole.append(case.name)
                box = tuple(slice(0, n) for n in values.shape)
            crop = crop_image(image, box)
            seg_label = seg_dir / f"{case.name}_label.nii.gz"
            write_image(crop_image(Image(values, label.geometry, case.label), box), seg_label, label=True)
            seg_rows.append({"case": case.name, **_write_channels(crop, seg_dir, case.name), "label": str(seg_label)})
            task.advance(1)
    for rows in (loc_rows, seg_rows):  # one column layout per CSV
        if len({tuple(r) for r in rows}) > 1:
            raise InputError("cases mix single multi-channel files and per-channel files", path=config.source,
                             hint="Give every case its channels the same way.")
    _write_csv(loc_dir / "cases.csv", loc_rows)
    _write_csv(seg_dir / "cases.csv", seg_rows)
    if whole and log:
        log(f"cascade: {len(whole)} case(s) without target ({', '.join(whole[:5])}) train the segmenter whole")
    atomic_write_text(stamp, json.dumps({"key": key, "cases": len(cases)}) + "\n")


# ------------------------------------------------------------------------------------ the stages
@dataclass
class CascadeTrainResult:
    """What :func:`train_cascade` did; ``card_path`` is None when stopped early or without export."""

    output: Path
    card_path: Path | None
    stages: dict = field(default_factory=dict)  # "locator" / "segmenter" -> loop.TrainResult (None: skipped)
    seconds: float = 0.0
    stopped_early: bool = False
    summary: dict = field(default_factory=dict)


def train_cascade(config: TrainConfig, *, resume: bool = False, max_minutes: float | None = None,
                  device: str | None = None, progress: Any = None,
                  on_epoch: Callable[[str, TrainConfig], Callable[[dict], None] | None] | None = None,
                  export: bool = True, log: Callable[[str], None] | None = None) -> CascadeTrainResult:
    """Train the locator, then the segmenter, then write ``OUT/<name>.cascade.json``.

    ``on_epoch(stage, stage_config)`` returns the per-epoch callback of that stage. ``max_minutes``
    bounds both stages together; a stage stopped by it is continued by ``resume=True``.
    """
    from ..inference.cascade import CASCADE_SUFFIX, CascadeSpec
    from .loop import finished_summary, train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("a cascade config trains on one process; run it without torchrun", path=config.source)
    say = log or (lambda message: None)
    started = time.monotonic()
    output = Path(config.output)
    from ..atomic import ensure_writable_folder

    ensure_writable_folder(output)
    prepare_derived_data(config, progress, say)
    stages = {"locator": locator_config(config, _derived_data(config, "locator")),
              "segmenter": segmenter_config(config, _derived_data(config, "segmenter"))}
    results: dict = {}
    summaries: dict = {}
    stopped = False
    for stage, stage_config in stages.items():
        folder = Path(stage_config.output)
        done = finished_summary(folder, export) if resume else None
        if done is not None:
            say(f"cascade: {stage} already trained ({folder}); skipped")
            results[stage], summaries[stage] = None, done
            continue
        minutes = None
        if max_minutes is not None:
            minutes = max_minutes - (time.monotonic() - started) / 60
            if minutes <= 0:
                stopped = True
                say(f"--max-minutes reached before the {stage} stage; continue with --resume")
                break
        has_checkpoint = (folder / "last.pt").exists() or (folder / "previous.pt").exists()
        say(f"cascade: training the {stage} ({stage_config.model.name}) in {folder}")
        result = train(stage_config, resume=resume and has_checkpoint, max_minutes=minutes, device=device,
                       progress=progress, on_epoch=on_epoch(stage, stage_config) if on_epoch else None,
                       export=export, log=log)
        results[stage], summaries[stage] = result, result.summary
        if result.stopped_early:
            stopped = True
            break
    card_path = None
    if export and not stopped:
        spec = CascadeSpec(name=config.name, locator="locator/model.onnx", segmenter="segmenter/model.onnx",
                           locator_downscale=locator_factor(config), locator_labels=(),
                           locator_keep_largest=config.cascade.keep_largest,
                           margin_mm=_three(config.cascade.margin_mm), on_empty=config.cascade.on_empty,
                           description=config.description)
        card_path = spec.save(output / f"{config.name}{CASCADE_SUFFIX}")
    seconds = time.monotonic() - started
    summary = {"cascade": str(card_path) if card_path else None, "stopped_early": stopped,
               "seconds": round(seconds, 1), "stages": summaries}
    from ..atomic import atomic_write_text
    from ..console import to_json

    atomic_write_text(output / "summary.json", to_json(summary) + "\n")
    return CascadeTrainResult(output=output, card_path=card_path, stages=results, seconds=seconds,
                              stopped_early=stopped, summary=summary)
