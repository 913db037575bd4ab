"""Training data: find the cases, check them, preprocess once into a .npy cache, sample patches.

* :func:`find_cases` reads the MSD / nnU-Net layout (``imagesTr/CASE[_0000].nii.gz``,
  ``labelsTr/CASE.nii.gz``) or a CSV (columns ``case``, ``image`` or ``image_0000``.., ``label``).
* :func:`split_cases` gives the fixed train / validation split of the config.
* :func:`prepare_cache` checks every case BEFORE training (label values in 0..K-1, image and label
  on one grid, at least one case) and writes the preprocessed arrays as ``.npy`` (memory-mapped by
  the DataLoader workers): input ``(C, z, y, x)`` float32, label ``(z, y, x)`` uint8.
* :class:`PatchDataset` draws patches with foreground oversampling (class-balanced) and augments
  them; every sample is seeded by ``(seed, epoch, index)``, so a run is reproducible and resumable
  whatever the number of workers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from .augment import AugmentConfig, augment
from .config import DataConfig

CACHE_VERSION = 1
LOCATIONS_PER_CLASS = 20000


@dataclass(frozen=True)
class Case:
    name: str
    images: tuple[str, ...]   # one file per channel
    label: str


# ------------------------------------------------------------------------------------ discovery
def _cases_from_folders(config: DataConfig) -> list[Case]:
    from ..imaging import case_stem, file_suffix

    root = Path(config.root)
    image_dir, label_dir = root / config.images, root / config.labels
    labels = {case_stem(p): p for p in sorted(label_dir.iterdir()) if file_suffix(p) and not p.name.startswith(".")}
    images: dict[str, dict[int, Path]] = {}
    for path in sorted(image_dir.iterdir()):
        if not file_suffix(path) or path.name.startswith("."):
            continue
        stem = case_stem(path)
        head, _, tail = stem.rpartition("_")
        if head and len(tail) == 4 and tail.isdigit() and head in labels:
            images.setdefault(head, {})[int(tail)] = path
        elif stem in labels:
            images.setdefault(stem, {})[0] = path
        else:
            raise InputError(f"image {path.name} has no label map in {label_dir}", path=path,
                             hint="Labels are named like the image without its channel suffix (CASE.nii.gz).")
    cases = []
    for name in sorted(images):
        channels = images[name]
        if len(channels) == 1 and 0 in channels and config.channels > 1:  # one 4D file holds every channel
            cases.append(Case(name, (str(channels[0]),), str(labels[name])))
            continue
        if sorted(channels) != list(range(config.channels)):
            raise InputError(f"case {name} has channel files {sorted(channels)}, expected 0..{config.channels - 1}",
                             path=image_dir, hint="Name channel files CASE_0000, CASE_0001, ... or set data.channels.")
        cases.append(Case(name, tuple(str(channels[c]) for c in range(config.channels)), str(labels[name])))
    missing = sorted(set(labels) - set(images))
    if missing:
        raise InputError(f"label map(s) without image: {', '.join(missing[:5])}", path=label_dir)
    return cases


def _cases_from_csv(config: DataConfig) -> list[Case]:
    path = Path(config.cases_csv)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return []
    columns = set(rows[0])
    if "image" in columns:  # one file per case (several channels: a 4D / colour file)
        image_cols = ["image"]
    else:
        image_cols = [f"image_{c:04d}" for c in range(config.channels)]
    needed = {"label", *image_cols}
    if not needed <= columns:
        raise InputError(f"CSV lacks column(s) {', '.join(sorted(needed - columns))}", path=path,
                         hint="Columns: case, image (or image_0000, image_0001, ...), label.")
    base = path.parent

    def resolve(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else base / p)

    cases = []
    for index, row in enumerate(rows):
        name = row.get("case") or Path(row["label"] or "").name.split(".")[0] or f"case_{index:04d}"
        files = [row[c] for c in image_cols] + [row["label"]]
        if not all(files):
            raise InputError(f"row {index + 2} (case {name}) has an empty file entry", path=path)
        case = Case(name, tuple(resolve(row[c]) for c in image_cols), resolve(row["label"]))
        for file in (*case.images, case.label):
            if not Path(file).exists():
                raise InputError(f"row {index + 2} (case {name}): file not found: {file}", path=path,
                                 hint="Relative paths in the CSV resolve against the CSV's folder.")
        cases.append(case)
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"case names repeat: {', '.join(duplicates[:5])}", path=path)
    return sorted(cases, key=lambda c: c.name)


def find_cases(config: DataConfig) -> list[Case]:
    """Every case of the dataset, sorted by name; raises :class:`InputError` if there are none."""
    cases = _cases_from_csv(config) if config.cases_csv else _cases_from_folders(config)
    if config.max_cases is not None:
        cases = cases[: config.max_cases]
    if not cases:
        where = config.cases_csv or str(Path(config.root) / config.images)
        raise InputError("empty dataset: no cases found", path=where,
                         hint="Put images in imagesTr/ and label maps in labelsTr/, or list cases in a CSV.")
    return cases


def split_cases(cases: Sequence[Case], config: DataConfig, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """``(train, validation)`` by the config's rule (cases are sorted by name first)."""
    cases = sorted(cases, key=lambda c: c.name)
    if config.val_every_nth:
        val = [c for i, c in enumerate(cases) if i % config.val_every_nth == 0]
    elif config.val_fraction:
        order = np.random.default_rng(seed).permutation(len(cases))
        count = max(1, int(round(len(cases) * config.val_fraction)))
        chosen = set(order[len(cases) - count:].tolist())
        val = [c for i, c in enumerate(cases) if i in chosen]
    elif config.val_cases is not None:
        wanted = set(str(v) for v in config.val_cases)
        unknown = wanted - {c.name for c in cases}
        if unknown:
            raise InputError(f"data.val_cases names unknown case(s): {', '.join(sorted(unknown)[:5])}")
        val = [c for c in cases if c.name in wanted]
    elif config.folds:
        val = [c for i, c in enumerate(cases) if i % config.folds == config.fold]
    else:
        val = []
    names = {c.name for c in val}
    train = [c for c in cases if c.name not in names]
    if not train:
        raise InputError("no training cases left after the validation split", hint="Use fewer validation cases.")
    return train, val


# ------------------------------------------------------------------------------------ the cache
@dataclass(frozen=True)
class CachedCase:
    """One preprocessed case on disk: ``<folder>/<name>_image.npy`` etc."""

    name: str
    folder: str
    shape: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    classes_present: tuple[int, ...]

    def path(self, kind: str) -> Path:
        return Path(self.folder) / f"{self.name}_{kind}.npy"

    def image(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.path("image"), mmap_mode="r" if mmap else None)

    def label(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.path("label"), mmap_mode="r" if mmap else None)

    def locations(self) -> np.ndarray:
        """(N, 4) int32 rows (class, z, y, x): sampled voxels of every foreground class."""
        return np.load(self.path("locations"))


def file_stamps(cases: Sequence[Case]) -> list[list]:
    """``[path, size in bytes, mtime in s]`` of every file of ``cases`` (-1, -1 when unreadable), for cache keys."""
    stamps = []
    for case in cases:
        for p in (*case.images, case.label):
            try:
                st = Path(p).stat()
                stamps.append([p, st.st_size, int(st.st_mtime)])
            except OSError:
                stamps.append([p, -1, -1])
    return stamps


def cache_key(cases: Sequence[Case], preprocessing: dict, num_classes: int, label_map: dict | None = None,
              channels: int | None = None) -> str:
    """A digest of what the cache depends on: preprocessing, labels, files (size + mtime)."""
    blob = json.dumps({"v": CACHE_VERSION, "pre": preprocessing, "k": num_classes, "files": file_stamps(cases),
                       "map": {str(k): v for k, v in (label_map or {}).items()},
                       **({"ch": channels} if channels is not None else {})},  # 2D colour <-> grey conversion
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def map_label_values(array: np.ndarray, label_map: dict | None, path: str) -> np.ndarray:
    """Raw label file array ((Z, Y, X), or (C, Z, Y, X) for colour masks) -> class values (Z, Y, X) int64.

    Without ``label_map`` the values are used as they are (integers required). With it, every raw
    value (or colour) must be listed: ``{raw: class}``, raw an int or "R,G,B".
    """
    from .config import parse_label_map

    array = np.asarray(array)
    if label_map is None:
        if array.ndim == 4:
            raise InputError(f"label map has {array.shape[0]} channels", path=path,
                             hint='Give one integer label map per case, or data.label_map with colour keys '
                                  '(e.g. {"128,0,0": 1}).')
        rounded = np.rint(array)
        if not np.array_equal(array, rounded):
            raise InputError("label map holds non-integer values", path=path, hint="Labels must be integers 0..K-1.")
        return rounded.astype(np.int64)
    table = parse_label_map(label_map)
    width = len(next(iter(table)))
    voxels = array.reshape(array.shape[0], -1).T if array.ndim == 4 else array.reshape(-1, 1)
    if voxels.shape[1] != width:
        raise InputError(f"label file has {voxels.shape[1]} channel(s) but data.label_map keys have {width}",
                         path=path)
    colours, inverse = np.unique(voxels, axis=0, return_inverse=True)
    out = np.full(len(colours), -1, np.int64)
    unlisted = []
    for i, colour in enumerate(colours):
        key = tuple(int(v) for v in colour)
        if key in table:
            out[i] = table[key]
        else:
            unlisted.append(key[0] if width == 1 else ",".join(map(str, key)))
    if unlisted:
        raise InputError(f"label values {unlisted[:8]} are not in data.label_map", path=path,
                         hint="List every raw value (or colour) of the label files in data.label_map.")
    return out[inverse.reshape(-1)].reshape(array.shape[-3:])


def _check_case(case: Case, image, label, num_classes: int, label_map: dict | None = None,
                channels: int | None = None) -> np.ndarray:
    """Check one case BEFORE training; returns its class values (Z, Y, X) uint8 (int32 for > 256 classes)."""
    if channels is not None and image.num_channels != channels:
        raise InputError(f"image has {image.num_channels} channel(s), the config says data.channels = {channels}",
                         path=case.images[0], hint="Fix data.channels or the image files.")
    if image.spatial_shape != label.spatial_shape:
        raise InputError(f"label grid {label.spatial_shape} (Z, Y, X) differs from the image's {image.spatial_shape} "
                         f"({case.images[0]})", path=case.label, hint="Image and label map must share one voxel grid.")
    differences = image.geometry.differences(label.geometry, 1e-3)
    if differences:
        raise InputError(f"label geometry differs from the image ({case.images[0]}): " + "; ".join(differences),
                         path=case.label, hint="Image and label map must share one voxel grid.")
    values = map_label_values(label.array, label_map, case.label)
    present = np.unique(values)
    bad = present[(present < 0) | (present >= num_classes)]
    if bad.size:
        raise InputError(f"label values {bad.tolist()[:8]} lie outside 0..{num_classes - 1}", path=case.label,
                         hint=f"The config names {num_classes} labels; add the missing ones to `labels:`, "
                              "map them with data.label_map, or fix the map.")
    return values.astype(np.uint8 if num_classes <= 256 else np.int32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    from ..atomic import atomic_output

    with atomic_output(path) as temp:
        np.save(temp, array)


def prepare_cache(cases: Sequence[Case], preprocessing: dict, num_classes: int, folder: str | Path,
                  progress=None, *, label_map: dict | None = None, channels: int | None = None) -> list[CachedCase]:
    """Check every case, then preprocess into ``folder/<key>/`` (reused when already complete).

    Raises :class:`InputError` naming the file on the first bad case (label values outside
    0..K-1, image / label grids that differ, wrong channel count) before anything is trained.
    """
    from ..imaging import match_planar_channels, read_channels, read_image
    from ..preprocessing import Preprocessor
    from ..progress import ensure_progress

    key = cache_key(cases, preprocessing, num_classes, label_map, channels)
    target = Path(folder) / key
    index_path = target / "index.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            cached = [CachedCase(e["name"], str(target), tuple(e["shape"]), tuple(e["spacing_zyx"]),
                                 tuple(e["classes_present"])) for e in index["cases"]]
            if [c.name for c in cached] == [c.name for c in cases]:
                return cached
        except (ValueError, KeyError, OSError):
            pass
    fresh = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    preprocessor = Preprocessor.from_dict(preprocessing)
    result = []
    try:
        with ensure_progress(progress).task("preprocessing cases", total=len(cases)) as task:
            for case in cases:
                image = read_channels(list(case.images)) if len(case.images) > 1 else read_image(case.images[0])
                if channels is not None:  # 2D pictures: colour <-> grey to the configured channels, as predict does
                    image = match_planar_channels(image, channels)
                label = read_image(case.label)
                values = _check_case(case, image, label, num_classes, label_map, channels)
                label = label.with_array(values)
                array, _, state = preprocessor.forward(image)  # (C, z, y, x) float32
                seg = preprocessor.forward_labels(label, state).astype(values.dtype)
                if seg.shape != array.shape[1:]:
                    raise InputError(f"preprocessed label {seg.shape} does not match image {array.shape[1:]}",
                                     path=case.label)
                spacing = tuple(float(v) for v in state.resampled_spacing_zyx)  # the grid the net sees, mm
                rng = np.random.default_rng(int(hashlib.sha256(case.name.encode()).hexdigest()[:8], 16))
                rows = []
                present = []
                for c in range(1, num_classes):
                    where = np.argwhere(seg == c)
                    if len(where):
                        present.append(c)
                        if len(where) > LOCATIONS_PER_CLASS:
                            where = where[rng.choice(len(where), LOCATIONS_PER_CLASS, replace=False)]
                        rows.append(np.concatenate([np.full((len(where), 1), c), where], axis=1))
                locations = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)
                entry = CachedCase(case.name, str(target), tuple(int(v) for v in seg.shape), spacing, tuple(present))
                _save_npy(entry.path("image"), array)
                _save_npy(entry.path("label"), seg)
                _save_npy(entry.path("locations"), locations)
                result.append(entry)
                task.advance(1)
    except BaseException:  # a bad case (or a kill) leaves no half-written cache behind
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    index = {"version": CACHE_VERSION, "preprocessing": preprocessing,
             "cases": [{"name": c.name, "shape": list(c.shape), "spacing_zyx": list(c.spacing_zyx),
                        "classes_present": list(c.classes_present)} for c in result]}
    from ..atomic import atomic_write_text

    atomic_write_text(index_path, json.dumps(index))
    return result


# ------------------------------------------------------------------------------------- sampling
def _patch_start(centre: int | None, length: int, patch: int, rng: np.random.Generator) -> int:
    """Start of a patch along one axis: containing ``centre`` (if given) at a random position,
    inside the volume when it is larger than the patch, else holding the whole volume."""
    lo, hi = min(0, length - patch), max(0, length - patch)
    if centre is None:
        return int(rng.integers(lo, hi + 1))
    start = int(centre) - int(rng.integers(0, patch))
    return min(max(start, lo), hi)


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0) -> np.ndarray:
    """The window ``[start, start + size)`` of the last 3 axes of ``array``, padded with ``fill``."""
    lead = array.shape[:-3]
    shape = array.shape[-3:]
    out = np.full(lead + tuple(size), fill, dtype=array.dtype)
    src = tuple(slice(max(s, 0), min(s + n, l)) for s, n, l in zip(start, size, shape))
    dst = tuple(slice(x.start - s, x.stop - s) for x, s in zip(src, start))
    if all(x.stop > x.start for x in src):
        out[(Ellipsis,) + dst] = array[(Ellipsis,) + src]
    return out


class PatchDataset:
    """A torch-style map dataset of ``length`` random patches per epoch.

    Item ``i`` of epoch ``e`` is drawn with ``numpy.random.default_rng([seed, e, i])``: the case
    uniformly; with probability ``foreground_ratio`` a foreground centre (class-balanced: a class
    present in the case uniformly, then one of its voxels) else a uniform position; the INPUT patch
    (output patch + 2 * margin) is cropped (zero padded), augmented, and the label cropped to the
    output patch. Returns ``(image (C, *input_patch) float32, label (*output_patch) int64)`` tensors.
    """

    def __init__(self, cases: Sequence[CachedCase], output_patch: Sequence[int], margin: Sequence[int],
                 length: int, *, foreground_ratio: float = 0.33, class_balanced: bool = True,
                 augmentation: AugmentConfig | None = None, seed: int = 0):
        self.cases = list(cases)
        self.output_patch = tuple(int(v) for v in output_patch)
        self.margin = tuple(int(v) for v in margin)
        self.input_patch = tuple(p + 2 * m for p, m in zip(self.output_patch, self.margin))
        self.length = int(length)
        self.foreground_ratio = float(foreground_ratio)
        self.class_balanced = class_balanced
        self.augmentation = augmentation
        self.seed = int(seed)
        self.epoch = 0
        self._arrays: dict[int, tuple] = {}
        self._locations: dict[int, np.ndarray] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _case(self, index: int):
        if index not in self._arrays:  # memory-mapped, opened lazily in each worker
            case = self.cases[index]
            self._arrays[index] = (case.image(), case.label())
            self._locations[index] = case.locations()
        return self._arrays[index], self._locations[index]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        which = int(rng.integers(len(self.cases)))
        (image, label), locations = self._case(which)
        shape = label.shape
        centre = None
        if len(locations) and rng.random() < self.foreground_ratio:
            if self.class_balanced:
                classes = np.unique(locations[:, 0])
                cls = classes[rng.integers(len(classes))]
                rows = np.flatnonzero(locations[:, 0] == cls)
                centre = locations[rows[rng.integers(len(rows))], 1:]
            else:
                centre = locations[rng.integers(len(locations)), 1:]
        out_start = [_patch_start(None if centre is None else centre[a], shape[a], self.output_patch[a], rng)
                     for a in range(3)]
        in_start = [s - m for s, m in zip(out_start, self.margin)]
        patch_image = crop(image, in_start, self.input_patch, 0.0).astype(np.float32)
        patch_label = crop(label, in_start, self.input_patch, 0)
        if self.augmentation is not None:
            patch_image, patch_label = augment(patch_image, patch_label, self.augmentation, rng)
        m = self.margin
        patch_label = patch_label[m[0]:m[0] + self.output_patch[0], m[1]:m[1] + self.output_patch[1],
                                  m[2]:m[2] + self.output_patch[2]]
        return patch_image, patch_label.astype(np.int64)

    def __getitem__(self, index: int):
        import torch

        image, label = self.sample(index)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(label))


def iterations_per_epoch(num_train: int, batch_size: int, configured: int | None) -> int:
    """Optimiser steps per epoch: ``configured``, else one pass over the training cases (ceil(cases / batch))."""
    return int(configured) if configured else max(1, math.ceil(num_train / batch_size))
