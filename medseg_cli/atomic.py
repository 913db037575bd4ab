"""Atomic outputs: nothing half-written ever appears under a final name.

A file is written into a hidden scratch folder next to its destination (same file system), under
its final name (so writers that derive a data-file name from the header, as .mhd/.nhdr do, stay
consistent), flushed to disk, then moved into place with ``os.replace``; companion data files
first, the named file last. On any error the scratch folder is removed and the destination is
untouched (an earlier good file stays as it was).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError, ProcessingError

SCRATCH_PREFIX = ".medseg-partial-"
STALE_SCRATCH_SECONDS = 6 * 3600  # a scratch folder untouched this long was left by a killed process


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def ensure_writable_folder(folder: Path, *, for_file: Path | None = None) -> None:
    """Create ``folder`` if needed; raise :class:`InputError` when it cannot hold new files."""
    target = for_file or folder
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder", path=target,
                         hint="Choose an output path inside a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create output folder ({err.strerror})", path=folder,
                         hint="Choose a writable output location.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError("output folder is not writable", path=folder,
                         hint="Choose a writable output location or fix its permissions.")


def check_output_path(destination: str | os.PathLike[str]) -> Path:
    """Raise :class:`InputError` unless a file can be written at ``destination`` (its folder is created
    if needed); return that folder. Commands call it before long work, :func:`atomic_output` again."""
    destination = Path(destination)
    folder = destination.parent if str(destination.parent) else Path(".")
    ensure_writable_folder(folder, for_file=destination)
    if destination.is_dir():
        raise InputError("output path is an existing folder", path=destination,
                         hint="Give a file name, e.g. mask.nii.gz.")
    return folder


_SWEPT: set[str] = set()  # folders already cleaned by this process


def remove_stale_scratch(folder: Path) -> None:
    """Delete scratch folders in ``folder`` that a killed process (``kill -9``) left behind: those not
    modified for :data:`STALE_SCRATCH_SECONDS` (a live write touches its folder far more recently).
    Each folder is looked at once per process."""
    import time

    key = os.path.abspath(folder)
    if key in _SWEPT:
        return
    _SWEPT.add(key)
    cutoff = time.time() - STALE_SCRATCH_SECONDS
    try:
        leftovers = [p for p in folder.glob(SCRATCH_PREFIX + "*") if p.is_dir() and p.stat().st_mtime < cutoff]
    except OSError:
        return
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_output(destination: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a scratch path with the destination's file name; move it (and companions) into place.

    Usage::

        with atomic_output("out/mask.nii.gz") as tmp:
            writer(tmp)          # may also create companions, e.g. tmp.with_suffix(".raw")
    """
    destination = Path(destination)
    folder = check_output_path(destination)
    remove_stale_scratch(folder)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=folder))
    except OSError as err:
        raise InputError(f"cannot write in output folder ({err.strerror})", path=destination,
                         hint="Choose a writable output location.") from None
    try:
        temp_path = scratch / destination.name
        yield temp_path
        if not temp_path.exists():
            raise ProcessingError("writer produced no file", path=destination)
        produced = sorted(scratch.iterdir(), key=lambda p: p.name == destination.name)
        for item in produced:
            _fsync_file(item)
        for item in produced:  # companions first, the named file last
            os.replace(item, folder / item.name)
    except OSError as err:
        raise ProcessingError(f"writing failed ({err.strerror or err})", path=destination,
                              hint="Check free disk space and permissions; nothing was written.") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def atomic_write_bytes(destination: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``destination`` atomically and return the path."""
    with atomic_output(destination) as tmp:
        tmp.write_bytes(data)
    return Path(destination)


def atomic_write_text(destination: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``destination`` atomically and return the path."""
    return atomic_write_bytes(destination, text.encode("utf-8"))
