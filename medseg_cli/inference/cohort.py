"""What to segment: turn ``predict``'s INPUT arguments into cases, shard them, and run a cohort.

Inputs understood (see ``discover_cases``):

* one file, or one DICOM series folder: one case;
* several files, or ``channels`` (a comma list or a glob): the channels of one case, in the card's
  ``channel_names`` order;
* a folder of images (cohort): one case per file; when the model takes C > 1 channels, files are
  grouped nnU-Net style, ``case_0000.nii.gz`` ... ``case_000{C-1}.nii.gz``; sub-folders holding a
  DICOM series are cases too;
* a CSV file (cohort): a header row; a ``case`` (or ``id``) column names the case, the other
  columns hold one path per channel (matched by the card's channel names when the header uses them,
  else in column order); relative paths are relative to the CSV's folder.
"""

from __future__ import annotations

import csv
import glob
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..card import ModelCard
from ..errors import InputError, MedsegError
from ..imaging import PLANAR_SUFFIXES, SUPPORTED_SUFFIXES, case_stem, file_suffix, list_dicom_series

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")
_GLOB_CHARS = set("*?[")


@dataclass
class Case:
    """One scan to segment: its name (for output files) and one path per channel (or a DICOM folder)."""

    name: str
    paths: list[Path]
    problem: MedsegError | None = None  # found while discovering (reported as a failed case)
    extra: dict = field(default_factory=dict)


def _strip_channel_suffix(stem: str) -> str:
    match = _CHANNEL_SUFFIX.match(stem)
    return match.group("case") if match and match.group("index") == "0000" else stem


def _expand_channels(channels: str) -> list[Path]:
    if _GLOB_CHARS & set(channels) and "," not in channels:
        found = sorted(Path(p) for p in glob.glob(channels))
        if not found:
            raise InputError(f"no file matches the pattern {channels!r}", hint="Check the --channels pattern.")
        return found
    return [Path(p.strip()) for p in channels.split(",") if p.strip()]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and file_suffix(p) and not p.name.startswith("."))


def group_files(files: Sequence[Path], card: ModelCard) -> list[Case]:
    """Cases from a list of image files: one per file (1 channel) or nnU-Net ``_0000`` groups (C > 1)."""
    channels = card.in_channels
    if channels == 1:
        return [Case(_strip_channel_suffix(case_stem(f)), [f]) for f in files]
    groups: dict[str, dict[int, Path]] = {}
    loose = []
    for f in files:
        match = _CHANNEL_SUFFIX.match(case_stem(f))
        if match:
            groups.setdefault(match.group("case"), {})[int(match.group("index"))] = f
        else:
            loose.append(f)
    cases = []
    for name, members in sorted(groups.items()):
        indices = sorted(members)
        if indices != list(range(channels)):
            names = ", ".join(card.channel_names) if card.channel_names else f"{channels} channels"
            problem = InputError(f"case {name} has channel files {['%04d' % i for i in indices]}, the model needs "
                                 f"{channels} ({names})", path=members[indices[0]].parent,
                                 hint=f"Name them {name}_0000 ... {name}_{channels - 1:04d} in channel order.")
            cases.append(Case(name, [members[i] for i in indices], problem))
        else:
            cases.append(Case(name, [members[i] for i in indices]))
    for f in loose:
        if file_suffix(f) in PLANAR_SUFFIXES:  # a 2D colour picture (PNG, TIFF, ...) holds its channels itself
            cases.append(Case(case_stem(f), [f]))
            continue
        cases.append(Case(case_stem(f), [f], InputError(
            f"the model takes {channels} channels but this file has no _0000-style channel suffix", path=f,
            hint="Name channel files case_0000.nii.gz, case_0001.nii.gz, ... (nnU-Net style).")))
    return cases


def _cases_from_csv(path: Path, card: ModelCard) -> list[Case]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read the case list ({err})", path=path) from None
    if not rows:
        raise InputError("the case list has no rows", path=path, hint="Write a header row, then one row per case.")
    header = [h for h in rows[0].keys() if h is not None]
    name_column = next((h for h in header if h.strip().lower() in ("case", "id", "name", "case_id")), None)
    channel_columns = [h for h in header if h != name_column]
    if card.channel_names and all(n in channel_columns for n in card.channel_names):
        channel_columns = list(card.channel_names)
    if len(channel_columns) != card.in_channels:
        raise InputError(f"the case list has {len(channel_columns)} path column(s) ({', '.join(channel_columns)}), "
                         f"model {card.name} takes {card.in_channels} channel(s)", path=path,
                         hint="Give one column per channel" + (f": {', '.join(card.channel_names)}."
                                                               if card.channel_names else "."))
    cases = []
    for number, row in enumerate(rows, start=2):
        paths = []
        for column in channel_columns:
            value = (row.get(column) or "").strip()
            if not value:
                raise InputError(f"line {number}: column {column!r} is empty", path=path)
            item = Path(value).expanduser()
            paths.append(item if item.is_absolute() else path.parent / item)
        name = (row.get(name_column) or "").strip() if name_column else ""
        cases.append(Case(name or _strip_channel_suffix(case_stem(paths[0])), paths))
    return cases


def discover_cases(inputs: Sequence[str], card: ModelCard, channels: str | None = None) -> tuple[list[Case], bool]:
    """``(cases, is_cohort)`` for ``predict``'s arguments (see the module docstring).

    Raises :class:`InputError` when the inputs cannot be understood or do not fit the model's channels.
    """
    if channels:
        if inputs:
            raise InputError("give the scan either as INPUT or with --channels, not both")
        paths = _expand_channels(channels)
        return [_single_case(paths, card)], False
    if not inputs:
        raise InputError("no input given", hint="medseg predict SCAN -o MASK (a file, a DICOM folder, a folder "
                                                "or CSV of cases).")
    if len(inputs) > 1:
        return [_single_case([Path(p) for p in inputs], card)], False
    text = inputs[0]
    path = Path(text).expanduser()
    if not path.exists() and _GLOB_CHARS & set(text):
        found = sorted(Path(p) for p in glob.glob(text) if file_suffix(p))
        if not found:
            raise InputError(f"no image file matches {text!r}", hint="Check the pattern (quote it for the shell).")
        return group_files(found, card), True
    if not path.exists():
        raise InputError("no such file or folder", path=path, hint="Check the path.")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return _cases_from_csv(path, card), True
        return [_single_case([path], card)], False
    files = _image_files(path)
    if files:
        return group_files(files, card), True
    if list_dicom_series(path):
        return [_single_case([path], card)], False
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    dicom_cases = [Case(f.name, [f]) for f in folders if list_dicom_series(f)]
    if dicom_cases:
        return dicom_cases, True
    raise InputError("no images and no DICOM series found in this folder", path=path,
                     hint=f"Supported: {', '.join(SUPPORTED_SUFFIXES)} files, DICOM series folders, or a CSV list.")


def _single_case(paths: list[Path], card: ModelCard) -> Case:
    if len(paths) != card.in_channels and not (len(paths) == 1 and card.in_channels > 1):
        names = ", ".join(card.channel_names) if card.channel_names else f"{card.in_channels} channel(s)"
        hint = (f"Give {card.in_channels} file(s) in this order: {names}." if card.in_channels > 1 else
                "For several cases give a folder or a CSV list; for several channels use a model that takes them.")
        raise InputError(f"model {card.name} takes {card.in_channels} channel(s), {len(paths)} file(s) given",
                         path=paths[0], hint=hint)
    # one multi-channel file (4D NIfTI) for a multi-channel model is checked when read
    return Case(_strip_channel_suffix(case_stem(paths[0])) if paths[0].is_file() or file_suffix(paths[0])
                else paths[0].name, paths)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1 <= i <= n) -> ``(i, n)``; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise InputError(f"invalid --shard {text!r}", hint="Use i/n with 1 <= i <= n, e.g. --shard 2/4.")
    return int(match.group(1)), int(match.group(2))


def select_shard(cases: Sequence[Case], shard: tuple[int, int] | None) -> list[Case]:
    """Cases of the i-th of n disjoint shares: sorted by name, case k goes to share (k mod n) + 1."""
    ordered = sorted(cases, key=lambda c: c.name)
    duplicates = sorted(n for n, k in Counter(c.name for c in ordered).items() if k > 1)
    if duplicates:
        raise InputError(f"several inputs give the same case name(s) {duplicates[:5]}",
                         hint="Case names must be unique: outputs are named after them.")
    if shard is None:
        return ordered
    index, count = shard
    return [c for k, c in enumerate(ordered) if k % count == index - 1]


def run_cases(cases: Sequence[Case], process: Callable[[Case], dict], *,
              on_result: Callable[[dict], None] | None = None) -> tuple[list[dict], int]:
    """Run ``process`` on every case, continuing past failures.

    Returns ``(rows, exit_code)``: one dict per case (``status`` ok / skipped / failed, ``error``,
    ``exit_code``) and the highest exit code of the failures (0 when none failed).
    """
    rows, worst = [], 0
    for case in cases:
        row = {"case": case.name, "inputs": [str(p) for p in case.paths], "status": "ok"}
        try:
            if case.problem is not None:
                raise case.problem
            row.update(process(case))
        except MedsegError as err:
            row.update(status="failed", error=str(err), exit_code=err.exit_code)
        except MemoryError:
            row.update(status="failed", error="out of memory; try a smaller --batch", exit_code=4)
        except Exception as err:  # noqa: BLE001 - one broken case must not stop a cohort
            summary = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            row.update(status="failed", error=f"internal error ({summary})", exit_code=4)
        if row["status"] == "failed":
            worst = max(worst, row["exit_code"])
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows, worst
