"""Take one member out of a downloaded tar or zip archive, safely.

An archive from the internet may try to write outside the folder it is unpacked into (``../``
names, absolute names, symbolic or hard links pointing elsewhere, device files). We never call
``extractall``: the whole member list is checked first — any unsafe member refuses the archive —
and then only the wanted member's bytes are streamed to a file name *we* choose.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError


@dataclass(frozen=True)
class _Member:
    name: str  # normalised: no leading "./"
    kind: str  # "file" | "dir" | "symlink" | "hardlink" | "device" | "other"
    link_target: str | None
    handle: object


def _normalise(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _escapes(name: str) -> bool:
    """True when ``name`` is absolute or climbs out of the archive root."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return True
    return ".." in parts


def _tar_members(archive: tarfile.TarFile) -> list[_Member]:
    members = []
    for info in archive.getmembers():
        if info.isreg():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        elif info.isdev() or info.isfifo():
            kind = "device"
        else:
            kind = "other"
        members.append(_Member(_normalise(info.name), kind, info.linkname or None, info))
    return members


def _zip_members(archive: zipfile.ZipFile) -> list[_Member]:
    members = []
    for info in archive.infolist():
        mode = info.external_attr >> 16  # Unix mode, when the archiver recorded one (0 from Windows tools)
        if stat.S_ISLNK(mode):
            kind, target = "symlink", archive.read(info).decode("utf-8", "replace")
        elif info.is_dir():
            kind, target = "dir", None
        elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # permission bits alone mean a plain file
            kind, target = "device", None
        else:
            kind, target = "file", None
        members.append(_Member(_normalise(info.filename), kind, target, info))
    return members


def check_members(members: list[_Member], *, archive_path: Path) -> None:
    """Refuse the archive if any member could write outside the extraction folder."""
    for member in members:
        problem = None
        if _escapes(member.name):
            problem = f"member '{member.name}' points outside the archive folder"
        elif member.kind in ("device", "other"):
            problem = f"member '{member.name}' is a device or special file"
        elif member.kind in ("symlink", "hardlink"):
            target = member.link_target or ""
            resolved = (posixpath.join(posixpath.dirname(member.name), target)
                        if member.kind == "symlink" else target)
            if target.startswith("/") or _escapes(resolved):
                problem = f"member '{member.name}' is a link to '{target}' outside the archive folder"
        if problem:
            raise ModelError(f"refused an unsafe archive: {problem}", path=archive_path,
                             hint="The download may be tampered with; delete it and fetch from a trusted source.")


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _select(members: list[_Member], pattern: str, archive_path: Path) -> _Member:
    pattern = _normalise(pattern)
    exact = [m for m in members if m.name == pattern]
    matches = exact or sorted((m for m in members if fnmatch.fnmatchcase(m.name, pattern) and m.kind != "dir"),
                              key=lambda m: _natural_key(m.name))
    if not matches:
        files = [m.name for m in members if m.kind == "file"]
        shown = ", ".join(files[:8]) + (" ..." if len(files) > 8 else "")
        raise ModelError(f"the archive has no member '{pattern}' (it holds: {shown or 'nothing'})",
                         path=archive_path, hint="Fix the manifest's 'member'.")
    chosen = matches[-1]  # a glob picks the highest number, e.g. the last epoch
    if chosen.kind != "file":
        raise ModelError(f"refused an unsafe archive: member '{chosen.name}' is a {chosen.kind}, not a file",
                         path=archive_path, hint="Fetch the archive from a trusted source.")
    return chosen


def extract_member(archive_path: str | Path, member: str, destination: str | Path) -> str:
    """Copy archive member ``member`` (exact name or glob) to the file ``destination``.

    Returns the member name that was extracted. Raises :class:`ModelError` for an unreadable or
    unsafe archive, or a missing member. ``destination`` is written directly; callers write into a
    scratch path and move it into place themselves.
    """
    archive_path = Path(archive_path)
    destination = Path(destination)
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as archive:
                members = _zip_members(archive)
                check_members(members, archive_path=archive_path)
                chosen = _select(members, member, archive_path)
                with archive.open(chosen.handle) as source, open(destination, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
                return chosen.name
        with tarfile.open(archive_path, "r:*") as archive:
            members = _tar_members(archive)
            check_members(members, archive_path=archive_path)
            chosen = _select(members, member, archive_path)
            source = archive.extractfile(chosen.handle)
            if source is None:
                raise ModelError(f"cannot read member '{chosen.name}'", path=archive_path)
            with source, open(destination, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
            return chosen.name
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ModelError(f"the archive is corrupt or truncated ({type(err).__name__}: {err})", path=archive_path,
                         hint="Delete it and fetch again.") from None
