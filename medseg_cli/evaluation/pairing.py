"""Which prediction goes with which reference: by case stem, or from a CSV of pairs.

A *case stem* is the file name without its format suffix (``imaging.case_stem``), so
``case_001.nii.gz`` pairs with ``case_001.nrrd``. Files present on one side only are listed as
unmatched (a warning); no match at all is an error.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..imaging import case_stem, file_suffix


@dataclass(frozen=True)
class Pair:
    """One case: its name, the prediction file and the reference (label) file."""

    case: str
    prediction: Path
    reference: Path


@dataclass
class Pairing:
    """The pairs found, and the files left without a partner (sorted by case name)."""

    pairs: list[Pair]
    unmatched_predictions: list[Path] = field(default_factory=list)
    unmatched_references: list[Path] = field(default_factory=list)


def list_label_files(folder: Path, role: str) -> dict[str, Path]:
    """Image files (supported suffixes, not hidden) directly inside ``folder``, keyed by case stem.

    Raises :class:`InputError` for an empty folder or two files with one stem.
    """
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not file_suffix(path):
            continue
        stem = case_stem(path)
        if stem in files:
            raise InputError(f"two {role} files for case {stem!r}: {files[stem].name} and {path.name}",
                             path=folder, hint="Keep one file per case in the folder.")
        files[stem] = path
    if not files:
        raise InputError(f"no {role} image files in this folder", path=folder,
                         hint="Give a folder of .nii.gz/.nrrd/.mha/.png label maps, or a single file.")
    return files


def _check_exists(path: Path, role: str) -> None:
    if not path.exists():
        raise InputError(f"{role} not found", path=path, hint="Check the path.")


def pair_by_name(predictions: str | Path, references: str | Path) -> Pairing:
    """Pair predictions with references; each argument is a file or a folder of files.

    Two files are one pair whatever their names (the case is the reference's stem). A file and a
    folder: the folder's file with the same stem. Two folders: every stem found on both sides.
    """
    predictions, references = Path(predictions), Path(references)
    _check_exists(predictions, "prediction")
    _check_exists(references, "reference")
    if predictions.is_file() and references.is_file():
        return Pairing([Pair(case_stem(references), predictions, references)])
    pred_files = list_label_files(predictions, "prediction") if predictions.is_dir() else \
        {case_stem(predictions): predictions}
    ref_files = list_label_files(references, "reference") if references.is_dir() else \
        {case_stem(references): references}
    common = sorted(set(pred_files) & set(ref_files))
    pairing = Pairing([Pair(stem, pred_files[stem], ref_files[stem]) for stem in common],
                      [pred_files[s] for s in sorted(set(pred_files) - set(ref_files))],
                      [ref_files[s] for s in sorted(set(ref_files) - set(pred_files))])
    if not pairing.pairs:
        some_pred = ", ".join(sorted(pred_files)[:3])
        some_ref = ", ".join(sorted(ref_files)[:3])
        raise InputError(f"no prediction has a reference with the same case name (predictions: {some_pred}"
                         f"{', ...' if len(pred_files) > 3 else ''}; references: {some_ref}"
                         f"{', ...' if len(ref_files) > 3 else ''})", path=predictions,
                         hint="Name each prediction like its reference (any image suffix), or give --pairs CSV.")
    return pairing


_PRED_COLUMNS = ("prediction", "pred", "predicted")
_REF_COLUMNS = ("reference", "ref", "label", "labels", "ground_truth", "gt")


def pairs_from_csv(csv_path: str | Path) -> Pairing:
    """Pairs from a CSV with a header naming a prediction column (``prediction``/``pred``) and a
    reference column (``reference``/``ref``/``label``/``gt``), and optionally ``case``.

    Relative paths are taken relative to the CSV's folder. Every listed file must exist.
    """
    csv_path = Path(csv_path)
    _check_exists(csv_path, "pairs CSV")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip().lower() for name in (reader.fieldnames or [])]
        pred_col = next((c for c in _PRED_COLUMNS if c in header), None)
        ref_col = next((c for c in _REF_COLUMNS if c in header), None)
        if pred_col is None or ref_col is None:
            raise InputError(f"header {header} lacks a prediction and a reference column", path=csv_path,
                             hint="Start the CSV with a header line: case,prediction,reference")
        pairs, seen = [], set()
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not row.get(pred_col) and not row.get(ref_col):
                continue
            pred = _resolve(row.get(pred_col, ""), csv_path, line, "prediction")
            ref = _resolve(row.get(ref_col, ""), csv_path, line, "reference")
            case = row.get("case") or case_stem(ref)
            if case in seen:
                raise InputError(f"case {case!r} is listed twice (line {line})", path=csv_path,
                                 hint="Give each row a unique case name (a 'case' column).")
            seen.add(case)
            pairs.append(Pair(case, pred, ref))
    if not pairs:
        raise InputError("no pairs listed", path=csv_path, hint="Add rows: case,prediction,reference")
    return Pairing(pairs)


def _resolve(value: str, csv_path: Path, line: int, role: str) -> Path:
    if not value:
        raise InputError(f"line {line} has no {role} path", path=csv_path)
    path = Path(value)
    if not path.is_absolute():
        path = csv_path.parent / path
    if not path.exists():
        raise InputError(f"{role} file on line {line} not found: {path}", path=csv_path, hint="Fix the path.")
    return path
