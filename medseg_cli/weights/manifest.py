"""The weights manifest: every model medseg knows how to fetch, and a validator for it.

``weights_manifest.json`` (schema in ``docs/manifest.md``) is installed inside the package as
``medseg_cli/weights_manifest.json``; an editable checkout reads it from the repository root.
``MEDSEG_MANIFEST=/path/to/manifest.json`` replaces it (a hospital's own list of models).

Validation never needs jsonschema: :func:`validate_manifest` returns every problem found, and
:func:`load_manifest` raises one :class:`ModelError` that lists them all.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

SCHEMA_VERSION = 1
MANIFEST_FILENAME = "weights_manifest.json"
FORMATS = ("onnx", "torch", "autofocus-original")
URL_SCHEMES = ("https", "http", "file", "package")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz", ".zip")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

ENTRY_REQUIRED = ("name", "description", "architecture", "task", "labels", "modalities", "licence",
                  "citation", "sources")
ENTRY_OPTIONAL = ("card",)
SOURCE_REQUIRED = ("url", "sha256", "format")
SOURCE_OPTIONAL = ("size", "member")


@dataclass(frozen=True)
class Source:
    """Where one model file comes from.

    url: ``https://``, ``http://``, ``file://`` or ``package:<path inside medseg_cli>``.
    sha256: lower-case hex digest of the file at ``url`` (the archive itself when ``member`` is set);
        ``None`` = not published upstream: trust on first use (the first digest seen is recorded).
    size: bytes of the file at ``url`` (``None`` = unknown).
    format: ``onnx`` | ``torch`` | a converter name (``autofocus-original``).
    member: for an archive, the member to extract (a glob such as ``saved_models/AFN1/*_checkpoint.pth.tar``
        picks the match with the highest number).
    """

    url: str
    sha256: str | None
    format: str
    size: int | None = None
    member: str | None = None

    @property
    def scheme(self) -> str:
        return self.url.split(":", 1)[0].lower()

    @property
    def basename(self) -> str:
        """The file name at the end of the URL (the name a mirror serves it under)."""
        path = self.url.split(":", 1)[1].split("?", 1)[0].split("#", 1)[0]
        return path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_archive(self) -> bool:
        return self.member is not None


@dataclass(frozen=True)
class ManifestEntry:
    """One model: what it segments, from which modalities, under which licence, and its sources."""

    name: str
    description: str
    architecture: str
    task: str
    labels: dict
    modalities: list
    licence: str
    citation: str
    sources: tuple
    card: dict = field(default_factory=dict)

    @property
    def model_format(self) -> str:
        """The format of the file ``resolve_model`` returns: ``onnx`` (also for converters) or ``torch``."""
        return "torch" if self.sources[0].format == "torch" else "onnx"

    @property
    def file_name(self) -> str:
        """Name of the ready-to-use file in the cache (``<name>.onnx`` or ``<name>.pt``)."""
        return f"{self.name}.{'pt' if self.model_format == 'torch' else 'onnx'}"


@dataclass(frozen=True)
class Manifest:
    entries: tuple
    path: Path | None = None

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def find(self, name: str) -> ManifestEntry | None:
        """The entry called ``name`` (case-insensitive), or None."""
        for entry in self.entries:
            if entry.name.lower() == name.lower():
                return entry
        return None

    def get(self, name: str) -> ManifestEntry:
        entry = self.find(name)
        if entry is None:
            raise ModelError(f"unknown model {name!r}", path=self.path,
                             hint=f"Known models: {', '.join(self.names()) or 'none'}; "
                                  "`medseg models` lists them, or give a path to an .onnx file.")
        return entry


# ---------------------------------------------------------------------------------------- validation
def _card_fields() -> set[str]:
    """Keys a manifest entry's ``card`` may override (ModelCard fields the manifest does not own)."""
    from dataclasses import fields

    from ..card import ModelCard

    return {f.name for f in fields(ModelCard)} - {"name", "card_version"}


def _check_source(where: str, source: Any) -> list[str]:
    problems: list[str] = []
    if not isinstance(source, dict):
        return [f"{where} is not an object"]
    for key in SOURCE_REQUIRED:
        if key not in source:
            problems.append(f"{where} lacks '{key}'")
    unknown = sorted(set(source) - set(SOURCE_REQUIRED) - set(SOURCE_OPTIONAL))
    if unknown:
        problems.append(f"{where} has unknown keys {unknown} (known: "
                        f"{', '.join(SOURCE_REQUIRED + SOURCE_OPTIONAL)})")
    url = source.get("url")
    if "url" in source:
        if not isinstance(url, str) or ":" not in url:
            problems.append(f"{where}.url must be a URL string")
        else:
            scheme = url.split(":", 1)[0].lower()
            if scheme not in URL_SCHEMES:
                problems.append(f"{where}.url scheme '{scheme}' is not one of {', '.join(URL_SCHEMES)}")
            if scheme == "package":
                rel = url.split(":", 1)[1]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                    problems.append(f"{where}.url 'package:' path must be relative inside the package")
    sha = source.get("sha256", "")
    if "sha256" in source and sha is not None and (not isinstance(sha, str) or not _SHA_RE.match(sha)):
        problems.append(f"{where}.sha256 must be 64 lower-case hex digits or null")
    if sha is None and isinstance(url, str) and url.lower().startswith("package:"):
        problems.append(f"{where}: a 'package:' source must pin its sha256")
    size = source.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        problems.append(f"{where}.size must be a non-negative integer or null")
    fmt = source.get("format")
    if "format" in source and fmt not in FORMATS:
        problems.append(f"{where}.format '{fmt}' is not one of {', '.join(FORMATS)}")
    member = source.get("member")
    if member is not None:
        if not isinstance(member, str) or not member or member.startswith("/") or ".." in Path(member).parts:
            problems.append(f"{where}.member must be a relative path inside the archive")
        elif isinstance(url, str) and not url.lower().split("?")[0].endswith(ARCHIVE_SUFFIXES):
            problems.append(f"{where}.member is set but the url is not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    elif fmt == "autofocus-original" and "member" not in source:
        problems.append(f"{where}: format 'autofocus-original' needs 'member' (the checkpoint in the archive)")
    return problems


def validate_manifest(data: Any) -> list[str]:
    """Every problem in a parsed manifest (empty list = valid). See ``docs/manifest.md``."""
    if not isinstance(data, dict):
        return ["the manifest is not a JSON object"]
    problems: list[str] = []
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}")
    unknown = sorted(set(data) - {"schema_version", "models", "$comment"})
    if unknown:
        problems.append(f"unknown top-level keys {unknown}")
    models = data.get("models")
    if not isinstance(models, list):
        return problems + ["'models' must be a list"]
    seen: set[str] = set()
    for index, entry in enumerate(models):
        where = f"models[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} is not an object")
            continue
        name = entry.get("name")
        if isinstance(name, str):
            where = f"model '{name}'"
            if not _NAME_RE.match(name):
                problems.append(f"{where}: name may hold letters, digits and _ . + - only")
            if name.lower() in seen:
                problems.append(f"{where} is listed twice (names are case-insensitive)")
            seen.add(name.lower())
        for key in ENTRY_REQUIRED:
            if key not in entry:
                problems.append(f"{where} lacks '{key}'")
        extra = sorted(set(entry) - set(ENTRY_REQUIRED) - set(ENTRY_OPTIONAL))
        if extra:
            problems.append(f"{where} has unknown keys {extra} (known: {', '.join(ENTRY_REQUIRED + ENTRY_OPTIONAL)})")
        for key in ("name", "description", "architecture", "task", "licence", "citation"):
            if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
                problems.append(f"{where}.{key} must be a non-empty string")
        labels = entry.get("labels")
        if "labels" in entry:
            if not isinstance(labels, dict) or not labels:
                problems.append(f"{where}.labels must be a non-empty object {{\"0\": \"background\", ...}}")
            elif not all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in labels.items()):
                problems.append(f"{where}.labels keys must be label values as strings (\"0\", \"1\", ...) "
                                "and values names")
        modalities = entry.get("modalities")
        if "modalities" in entry and (not isinstance(modalities, list) or not modalities
                                      or not all(isinstance(m, str) and m for m in modalities)):
            problems.append(f"{where}.modalities must be a non-empty list of channel names")
        card = entry.get("card", {})
        if not isinstance(card, dict):
            problems.append(f"{where}.card must be an object of model-card fields")
        else:
            unknown_card = sorted(set(card) - _card_fields())
            if unknown_card:
                problems.append(f"{where}.card has keys {unknown_card} that are not model-card fields "
                                f"(known: {', '.join(sorted(_card_fields()))})")
        sources = entry.get("sources")
        if "sources" in entry:
            if not isinstance(sources, list) or not sources:
                problems.append(f"{where}.sources must be a non-empty list")
            else:
                for s_index, source in enumerate(sources):
                    problems.extend(_check_source(f"{where}.sources[{s_index}]", source))
                formats = {s.get("format") for s in sources if isinstance(s, dict)}
                if len(formats) > 1:
                    problems.append(f"{where}: all sources must share one format (alternatives of one file)")
    return problems


# ---------------------------------------------------------------------------------------- loading
def default_manifest_path() -> Path:
    """``$MEDSEG_MANIFEST``, else the packaged manifest, else the repository root's (editable install)."""
    override = os.environ.get("MEDSEG_MANIFEST")
    if override:
        return Path(override).expanduser()
    package_dir = Path(__file__).resolve().parents[1]
    packaged = package_dir / MANIFEST_FILENAME
    if packaged.is_file():
        return packaged
    return package_dir.parent / MANIFEST_FILENAME


def parse_manifest(data: Any, *, path: str | Path | None = None) -> Manifest:
    """Validate parsed JSON and build a :class:`Manifest` (raises ModelError listing every problem)."""
    problems = validate_manifest(data)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ModelError(f"invalid weights manifest: {shown}", path=path,
                         hint="Fix it as docs/manifest.md describes.")
    entries = []
    for raw in data["models"]:
        sources = tuple(Source(url=s["url"], sha256=s["sha256"], format=s["format"], size=s.get("size"),
                               member=s.get("member")) for s in raw["sources"])
        entries.append(ManifestEntry(name=raw["name"], description=raw["description"],
                                     architecture=raw["architecture"], task=raw["task"],
                                     labels=dict(raw["labels"]), modalities=list(raw["modalities"]),
                                     licence=raw["licence"], citation=raw["citation"], sources=sources,
                                     card=dict(raw.get("card", {}))))
    return Manifest(entries=tuple(entries), path=Path(path) if path else None)


def load_manifest(path: str | Path | None = None) -> Manifest:
    """Read and validate the manifest at ``path`` (default: :func:`default_manifest_path`)."""
    path = Path(path) if path is not None else default_manifest_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ModelError(f"cannot read the weights manifest ({err.strerror})", path=path,
                         hint="Reinstall medseg, or point MEDSEG_MANIFEST at a manifest file.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelError(f"weights manifest is not valid JSON ({err.msg}, line {err.lineno})", path=path) from None
    return parse_manifest(data, path=path)
