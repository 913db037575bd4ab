"""Download, verify and cache model weights; resolve a model name to a file.

Every download goes to ``<file>.part`` beside its final place; an interrupted one is resumed with
``Range: bytes=N-`` (a server answering 200 instead of 206 restarts it). The sha256 is checked
before the file is moved into place with ``os.replace``, so the final name only ever holds a
verified file and an earlier good copy survives a bad download. An ``fcntl`` lock per model and per
download keeps two concurrent fetches from writing the same file. ``urllib`` honours the usual
proxy variables (``https_proxy``, ``no_proxy``...). Nothing is sent anywhere except the requests
for the files themselves.
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_output
from ..errors import ChecksumError, InputError, MedsegError, MedsegWarning, ModelError, ProcessingError
from ..progress import Progress, ensure_progress
from .archive import extract_member
from .cache import Cache, sha256_file
from .manifest import _NAME_RE, Manifest, ManifestEntry, Source, load_manifest

DEFAULT_TIMEOUT = 30.0
DEFAULT_MODEL = "hippocampus"
RETRIES = 2  # automatic resumes after a connection that dropped mid-file (having delivered bytes)
_CHUNK = 1 << 16
MIRROR_HINT = ("Run `medseg fetch NAME` where the internet is reachable, or use --mirror URL|DIR "
               "(or MEDSEG_MIRROR) to fetch from a local server or folder.")

# converter format -> "module:function", called as ``function(checkpoint, destination, entry)``:
#   checkpoint: Path of the extracted upstream file (e.g. a ``*_checkpoint.pth.tar``),
#   destination: Path of the ONNX file to write (a scratch path; fetch moves it into place),
#   entry: the ManifestEntry (name, architecture, labels, modalities, licence, citation, card overrides);
# and, when the entry's card gives both patches, ``input_shape=(1, C, *spatial)``: the input the graph is
# traced and parity-checked on (see :func:`_probe_shape`).
CONVERTERS = {"autofocus-original": "exporters.autofocus_original:convert"}


class NetworkError(ModelError):
    """The server could not be reached or did not deliver the file (exit code 3)."""


class NotFoundError(NetworkError):
    """The server (or mirror) has no such file: HTTP 404 or a missing local file."""


class DroppedError(NetworkError):
    """The connection broke mid-file after delivering bytes; the ``.part`` file is kept for a resume."""


def default_timeout() -> float:
    """Seconds to wait for each read from a server: ``$MEDSEG_TIMEOUT`` or 30."""
    text = os.environ.get("MEDSEG_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(f"MEDSEG_TIMEOUT must be a positive number of seconds, got {text!r}",
                         hint="Unset it or set e.g. MEDSEG_TIMEOUT=60.")
    return value


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    sha256: str
    size: int
    status: str  # "downloaded" | "cached" | "packaged" | "registered"
    source: str

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "size": self.size,
                "status": self.status, "source": self.source}


def default_model_name() -> str:
    """The model ``predict`` uses when none is named."""
    return DEFAULT_MODEL


def _package_root() -> Path:
    return Path(__file__).resolve().parents[1]


def package_path(source: Source) -> Path:
    """Where a ``package:<relative path>`` source lives inside the installed ``medseg_cli`` folder."""
    relative = source.url.split(":", 1)[1]
    root = _package_root()
    path = (root / relative).resolve()
    if root not in path.parents:
        raise ModelError(f"package path '{relative}' leaves the medseg_cli package", path=source.url)
    return path


# ============================================================================ byte transfer
def _mirror_candidates(source: Source, mirror: str) -> list[str]:
    """Mirror layout: files by their basename, or by their sha256 (when the manifest pins one)."""
    names = [source.basename] + ([source.sha256] if source.sha256 else [])
    scheme = urllib.parse.urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https", "file"):
        return [mirror.rstrip("/") + "/" + urllib.parse.quote(name) for name in names]
    folder = Path(mirror).expanduser()
    if not folder.is_dir():
        raise InputError("mirror folder not found", path=folder, hint="Give an existing folder or an http(s) URL.")
    return [str(folder / name) for name in names]


def _describe_url_error(err: urllib.error.URLError, url: str, timeout: float) -> NetworkError:
    reason = err.reason
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return NetworkError(f"no answer within {timeout:g} s", path=url,
                            hint="The server is slow or unreachable; retry, raise --timeout, or use --mirror.")
    if isinstance(reason, socket.gaierror):
        return NetworkError("host not found (no DNS / no network)", path=url, hint=MIRROR_HINT)
    if isinstance(reason, ConnectionRefusedError):
        return NetworkError("connection refused: host unreachable", path=url, hint=MIRROR_HINT)
    return NetworkError(f"cannot reach the server ({reason})", path=url, hint=MIRROR_HINT)


class _Transfer:
    """One attempt to bring the bytes at ``url`` into ``part`` (appending after ``part``'s size)."""

    def __init__(self, url: str, part: Path, *, size: int | None, timeout: float, progress: Progress,
                 label: str):
        self.url, self.part, self.size, self.timeout = url, part, size, timeout
        self.progress, self.label = progress, label

    def run(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme.lower()
        if scheme in ("http", "https"):
            self._http()
        else:
            path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(self.url).path)) if scheme == "file" \
                else Path(self.url)
            self._copy_local(path)

    def _too_big(self, total: int) -> ModelError:
        self.part.unlink(missing_ok=True)
        return ModelError(f"the file is larger than the manifest says ({total:,} > {self.size:,} bytes)",
                          path=self.url, hint="The upstream file changed or the mirror holds another file; "
                                              "nothing was kept.")

    def _copy_local(self, path: Path) -> None:
        if not path.is_file():
            raise NotFoundError("file not found", path=path, hint=MIRROR_HINT)
        total = path.stat().st_size
        if self.size is not None and total > self.size:
            raise self._too_big(total)
        try:
            with self.progress.task(self.label, total=total) as task, open(path, "rb") as source, \
                    open(self.part, "wb") as target:
                while block := source.read(1 << 20):
                    target.write(block)
                    task.advance(len(block))
        except OSError as err:
            self.part.unlink(missing_ok=True)
            raise ProcessingError(f"cannot copy the file into the cache ({err.strerror or err})", path=path,
                                  hint="Check that the mirror file is readable and the cache disk has space.") \
                from None

    def _http(self) -> None:
        offset = self.part.stat().st_size if self.part.exists() else 0
        if self.size is not None and offset > self.size:
            self.part.unlink()
            offset = 0
        headers = {"User-Agent": "medseg", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:
                whole = re.match(r"bytes \*/(\d+)$", err.headers.get("Content-Range", "") if err.headers else "")
                if whole and int(whole.group(1)) == offset:
                    return None  # the partial file is already complete (killed before it was verified)
                self.part.unlink(missing_ok=True)  # it does not fit the server's file: start over
                return self._http()
            if 300 <= err.code < 400:
                raise NetworkError(f"too many redirects (HTTP {err.code}, a redirect loop)", path=self.url,
                                   hint="The server is misconfigured; use another source or --mirror.") from None
            if err.code == 404:
                raise NotFoundError("not found on the server (HTTP 404)", path=self.url,
                                   hint="The file moved; update the manifest or use --mirror.") from None
            raise NetworkError(f"the server refused the download (HTTP {err.code} {err.reason})", path=self.url,
                               hint=MIRROR_HINT) from None
        except urllib.error.URLError as err:
            raise _describe_url_error(err, self.url, self.timeout) from None
        except (TimeoutError, socket.timeout):
            raise NetworkError(f"no answer within {self.timeout:g} s", path=self.url,
                               hint="Retry, raise --timeout, or use --mirror.") from None
        except (http.client.HTTPException, ConnectionError) as err:
            raise NetworkError(f"the server broke the connection ({type(err).__name__})", path=self.url,
                               hint="Run the same command again.") from None
        with response:
            status = response.status
            if status == 206:
                match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
                if not match or int(match.group(1)) != offset:
                    self.part.unlink(missing_ok=True)
                    raise NetworkError("the server resumed at the wrong place", path=self.url,
                                       hint="Run the same command again (it will restart from the beginning).")
                mode = "ab"
            else:
                offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            expected_total = offset + int(length) if length and length.isdigit() else None
            if self.size is not None and expected_total is not None and expected_total > self.size:
                raise self._too_big(expected_total)
            received = offset
            with self.progress.task(self.label, total=expected_total or self.size) as task, \
                    open(self.part, mode) as target:
                task.advance(offset)
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (TimeoutError, socket.timeout):
                        raise NetworkError(f"no data for {self.timeout:g} s after {received:,} bytes",
                                           path=self.url,
                                           hint="Run the same command again to resume, or raise --timeout.") from None
                    except (http.client.HTTPException, ConnectionError, OSError) as err:
                        raise self._dropped(received, offset, f"after {received:,} bytes ({type(err).__name__})") \
                            from None
                    if not block:
                        break
                    received += len(block)
                    if self.size is not None and received > self.size:
                        target.close()
                        raise self._too_big(received)
                    try:
                        target.write(block)
                        target.flush()  # what arrived survives a killed process: the next run resumes
                    except OSError as err:  # disk full, quota: not the network's fault, not retried
                        raise ProcessingError(f"cannot write the download ({err.strerror or err})", path=self.part,
                                              hint="Free disk space or set MEDSEG_HOME to a larger disk; "
                                                   "the next run resumes.") from None
                    task.advance(len(block))
            if expected_total is not None and received < expected_total:
                raise self._dropped(received, offset, f"after {received:,} of {expected_total:,} bytes")

    def _dropped(self, received: int, offset: int, detail: str) -> NetworkError:
        kind = DroppedError if received > offset else NetworkError  # resume only when bytes came through
        return kind(f"the connection dropped {detail}", path=self.url,
                    hint="The partial download is kept: run the same command again to resume.")


def _transfer_with_resume(url: str, part: Path, *, size: int | None, timeout: float, progress: Progress,
                          label: str) -> None:
    """One transfer, resumed with a Range request up to :data:`RETRIES` times when the connection drops."""
    for attempt in range(RETRIES + 1):
        try:
            _Transfer(url, part, size=size, timeout=timeout, progress=progress, label=label).run()
            return
        except DroppedError:
            if attempt == RETRIES:
                raise


def _transfer_any(source: Source, part: Path, *, candidates: list[str], mirror: str | None, timeout: float,
                  progress: Progress, label: str) -> None:
    """Bring the file into ``part`` from the first candidate URL that has it (mirror layouts in turn)."""
    errors: list[MedsegError] = []
    for url in candidates:
        try:
            _transfer_with_resume(url, part, size=source.size, timeout=timeout, progress=progress, label=label)
            return
        except NotFoundError as err:
            errors.append(err)  # try the next mirror layout
    if mirror:
        raise NetworkError(f"the mirror has neither {' nor '.join(Path(c).name for c in candidates)}",
                           path=mirror, hint="Copy the file into the mirror under its file name or its sha256.")
    raise errors[-1]


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def download_verified(source: Source, dest: Path, *, cache: Cache, timeout: float = DEFAULT_TIMEOUT,
                      mirror: str | None = None, progress: Progress | None = None, label: str | None = None,
                      model: str | None = None) -> str:
    """Bring the file of ``source`` to ``dest``, verified; return its sha256.

    The expected digest is the manifest's, else the one recorded on first use (trust-on-first-use,
    with a warning). A mismatch deletes the download, leaves any earlier ``dest`` as it was and
    raises :class:`ChecksumError` showing both digests.
    """
    progress = ensure_progress(progress)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, meta = _part_paths(dest)
    expected = source.sha256 or cache.trusted_digest(source.url)
    identity = {"url": source.url, "sha256": expected, "size": source.size}
    try:
        if json.loads(meta.read_text()) != identity:
            part.unlink(missing_ok=True)  # a leftover of another file: never append to it
    except (OSError, ValueError):
        part.unlink(missing_ok=True)
    meta.write_text(json.dumps(identity))

    try:
        _transfer_any(source, part, candidates=_mirror_candidates(source, mirror) if mirror else [source.url],
                      mirror=mirror, timeout=timeout, progress=progress, label=label or source.basename)
    except BaseException:
        if not part.exists() or part.stat().st_size == 0:  # nothing to resume: leave nothing behind
            part.unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
        raise

    size = part.stat().st_size
    digest = sha256_file(part)
    if source.size is not None and size != source.size:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        raise ChecksumError(f"size mismatch: expected {source.size:,} bytes, got {size:,}", path=source.url,
                            hint="The download was deleted" + (" and the earlier copy kept" if dest.exists() else "")
                                 + "; check the manifest or the mirror.")
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        pinned = "the manifest" if source.sha256 else "the digest recorded on first use"
        kept = " and the earlier copy kept" if dest.exists() else ""
        if source.sha256:
            advice = "; the file upstream or on the mirror is not the one medseg knows."
        else:
            advice = ("; the upstream file changed since it was first fetched: if its authors announced a new "
                      "release, accept it with `medseg fetch NAME --forget-trust`.")
        raise ChecksumError(f"sha256 mismatch: expected {expected} ({pinned}), got {digest}", path=source.url,
                            hint="The download was deleted" + kept + advice)
    if expected is None:
        cache.trust(source.url, digest, size)
        warnings.warn(MedsegWarning(
            f"{source.url}: no published sha256; trusting it on first use and recording {digest} in "
            f"{cache.registry_path} (every later download must match)"), stacklevel=2)
    with open(part, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    cache.record_file(dest, digest, source=source.url, model=model)
    return digest


# ============================================================================ models
def _expected_final_digest(entry: ManifestEntry, cache: Cache) -> str | None:
    """The digest the ready-to-use file must have, or None when only the registry can tell."""
    source = entry.sources[0]
    if source.member is None and source.format in ("onnx", "torch"):
        return source.sha256 or cache.trusted_digest(source.url)
    return None


def model_status(entry: ManifestEntry, *, cache: Cache | None = None, rehash: bool = False) -> tuple[str, Path]:
    """``("missing" | "cached" | "verified", path)`` of a manifest model in the cache (or package)."""
    cache = cache or Cache()
    packaged = [s for s in entry.sources if s.scheme == "package"]
    if packaged:
        path = package_path(packaged[0])
        if not path.is_file():
            return "missing", path
        return ("verified" if cache.is_verified(path, packaged[0].sha256, rehash=rehash) else "cached"), path
    path = cache.models_dir / entry.file_name
    if not path.is_file():
        return "missing", path
    expected = _expected_final_digest(entry, cache)
    if expected is None:
        record = cache.read_registry()["files"].get(cache.relative(path), {})
        if record.get("model") != entry.name:
            return "cached", path
        expected = record.get("sha256")
    return ("verified" if cache.is_verified(path, expected, rehash=rehash) else "cached"), path


PROBE_OUTPUT = 9  # voxels per axis of the output the conversion's tracing / parity input produces


def _probe_shape(entry: ManifestEntry) -> tuple[int, ...] | None:
    """(1, C, *spatial): the smallest input giving a ``PROBE_OUTPUT``-voxel output per axis, for a
    valid-convolution network whose card gives ``input_patch`` > ``output_patch`` (75^3 -> 47^3 for
    Autofocus: 37^3 -> 9^3). The exported graph has dynamic axes, so tracing and checking parity on
    this input proves as much as on a whole patch at an eighth of the cost. None: the converter's default.
    """
    patch_in, patch_out = entry.card.get("input_patch"), entry.card.get("output_patch")
    if not (isinstance(patch_in, list) and isinstance(patch_out, list) and len(patch_in) == len(patch_out)):
        return None
    if not all(isinstance(i, int) and isinstance(o, int) and i > o > 0 for i, o in zip(patch_in, patch_out)):
        return None
    return (1, len(entry.modalities), *(i - o + PROBE_OUTPUT for i, o in zip(patch_in, patch_out)))


def _convert(entry: ManifestEntry, source: Source, checkpoint: Path, dest: Path) -> None:
    module_name, function = CONVERTERS[source.format].split(":")
    try:
        converter = getattr(importlib.import_module(module_name), function)
    except ImportError as err:
        raise ModelError(f"the converter for '{source.format}' is not available ({err})", path=entry.name,
                         hint="Reinstall medseg (the exporters package ships with it).") from None
    try:
        probe = _probe_shape(entry)
        converter(checkpoint, dest, entry, **({"input_shape": probe} if probe else {}))
    except MedsegError:
        raise
    except Exception as err:  # noqa: BLE001 - a checkpoint that does not fit the converter
        summary = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise ModelError(f"cannot convert the upstream checkpoint of {entry.name} ({summary})", path=checkpoint,
                         hint="The archive does not hold the checkpoint this converter expects; "
                              "check the manifest's 'member' and 'architecture'.") from None
    if not dest.is_file():
        raise ModelError(f"the '{source.format}' converter wrote no file", path=dest)


def _fetch_from_source(entry: ManifestEntry, source: Source, final: Path, *, cache: Cache, timeout: float,
                       mirror: str | None, progress: Progress, force: bool) -> str:
    if source.member is None and source.format in ("onnx", "torch"):
        return download_verified(source, final, cache=cache, timeout=timeout, mirror=mirror, progress=progress,
                                 label=f"{entry.name} ({source.basename})", model=entry.name)
    raw = cache.downloads_dir / source.basename
    with cache.lock(f"download-{source.basename}", progress):
        expected = source.sha256 or cache.trusted_digest(source.url)
        if force or expected is None or not cache.is_verified(raw, expected):
            download_verified(source, raw, cache=cache, timeout=timeout, mirror=mirror, progress=progress,
                              label=f"{entry.name} ({source.basename})")
    with atomic_output(final) as produced:
        extracted = produced.with_name(".member")  # removed before atomic_output moves the folder's files
        with progress.task(f"{entry.name}: extracting {source.member}", total=None):
            extract_member(raw, source.member, extracted)
        if source.format in CONVERTERS:
            with progress.task(f"{entry.name}: converting ({source.format})", total=None):
                _convert(entry, source, extracted, produced)
            extracted.unlink()
        else:
            extracted.rename(produced)
        digest = sha256_file(produced)
    cache.record_file(final, digest, source=source.url, model=entry.name)
    return digest


def fetch_model(entry: ManifestEntry, *, cache: Cache | None = None, timeout: float = DEFAULT_TIMEOUT,
                mirror: str | None = None, progress: Progress | None = None, force: bool = False) -> FetchResult:
    """Make ``entry`` available, verified: from the package, the cache, or by downloading it."""
    cache = cache or Cache()
    progress = ensure_progress(progress)
    mirror = mirror or os.environ.get("MEDSEG_MIRROR") or None
    packaged = [s for s in entry.sources if s.scheme == "package"]
    if packaged:
        path = package_path(packaged[0])
        if not path.is_file():
            raise ModelError("the packaged model file is missing", path=path, hint="Reinstall medseg.")
        digest = sha256_file(path)
        if digest != packaged[0].sha256:
            raise ChecksumError(f"sha256 mismatch: expected {packaged[0].sha256} (the manifest), got {digest}",
                                path=path, hint="The installation is damaged; reinstall medseg.")
        return FetchResult(entry.name, path, digest, path.stat().st_size, "packaged", packaged[0].url)
    cache.ensure()
    final = cache.models_dir / entry.file_name
    with cache.lock(f"model-{entry.name}", progress):
        status, _ = model_status(entry, cache=cache)
        if status == "verified" and not force:
            return FetchResult(entry.name, final, cache.recorded_digest(final) or sha256_file(final),
                               final.stat().st_size, "cached", entry.sources[0].url)
        errors: list[MedsegError] = []
        for source in entry.sources:
            try:
                digest = _fetch_from_source(entry, source, final, cache=cache, timeout=timeout, mirror=mirror,
                                            progress=progress, force=force)
                return FetchResult(entry.name, final, digest, final.stat().st_size, "downloaded", source.url)
            except NetworkError as err:  # try the next source; a checksum error is final
                errors.append(err)
        raise errors[0] if len(errors) == 1 else NetworkError(
            f"no source of {entry.name} could be fetched: " + " | ".join(str(e) for e in errors), hint=MIRROR_HINT)


# ============================================================================ local models
def register_local_model(path: str | Path, name: str | None = None, *, cache: Cache | None = None,
                         manifest: Manifest | None = None) -> FetchResult:
    """Copy a local ONNX model (with a medseg card) into the cache under ``name``; record its sha256."""
    from ..card import read_card_from_onnx

    cache = cache or Cache()
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError("model file not found", path=path, hint="Check the path.")
    if path.suffix.lower() != ".onnx":
        raise InputError("only .onnx models can be registered", path=path,
                         hint="Export a checkpoint with `medseg export` first.")
    card = read_card_from_onnx(path)
    name = name or card.name
    if not _NAME_RE.match(name):
        raise InputError(f"invalid model name {name!r}", path=path,
                         hint="Use letters, digits and _ . + - (e.g. --name my-model).")
    manifest = manifest or load_manifest()
    if manifest.find(name) is not None:
        raise InputError(f"'{name}' is a model of the manifest", path=path, hint="Choose another --name.")
    cache.ensure()
    final = cache.models_dir / f"{name}.onnx"
    with cache.lock(f"model-{name}"):
        with atomic_output(final) as copy:
            shutil.copyfile(path, copy)
            digest = sha256_file(copy)
        cache.record_file(final, digest, source=str(path.resolve()), model=name)
        cache.register_local(name, {"file": cache.relative(final), "sha256": digest, "size": final.stat().st_size,
                                    "registered_from": str(path.resolve()), "card_name": card.name})
    return FetchResult(name, final, digest, final.stat().st_size, "registered", str(path.resolve()))


def _local_path(record: dict, cache: Cache) -> Path:
    path = cache.root / record["file"]
    if not path.is_file():
        raise ModelError(f"the registered model '{record['name']}' is gone from the cache", path=path,
                         hint=f"Register it again: medseg fetch {record.get('registered_from', 'MODEL.onnx')} "
                              f"--name {record['name']}.")
    if not cache.is_verified(path, record.get("sha256")):
        raise ChecksumError(f"the registered model '{record['name']}' changed since it was registered "
                            f"(sha256 no longer {record.get('sha256')})", path=path,
                            hint="Register it again with `medseg fetch FILE --name NAME`.")
    return path


# ============================================================================ resolve
def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.lower().endswith((".onnx", ".pt", ".pth", ".pth.tar"))


def resolve_model(name_or_path: str, *, progress: Progress | None = None, offline: bool = False,
                  mirror: str | None = None, timeout: float | None = None,
                  manifest: Manifest | None = None) -> Path:
    """A model file to run: an existing path as is; a manifest or registered name → its verified cached file.

    A manifest model missing from the cache is fetched on demand (``mirror`` or ``$MEDSEG_MIRROR``;
    ``timeout`` seconds per read, default ``$MEDSEG_TIMEOUT`` or 30), unless ``offline`` (or
    ``MEDSEG_OFFLINE=1``), where a :class:`ModelError` says how to fetch it or use a mirror.
    ``manifest`` defaults to :func:`load_manifest` (``$MEDSEG_MANIFEST`` or the packaged one).
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    if _looks_like_path(name_or_path):
        raise ModelError("model file not found", path=name_or_path,
                         hint="Check the path, or give a model name from `medseg models`.")
    cache = Cache()
    local = cache.find_local(name_or_path)
    if local is not None:
        return _local_path(local, cache)
    entry = (manifest or load_manifest()).get(name_or_path)
    status, path = model_status(entry, cache=cache)
    if status == "verified":
        return path
    offline = offline or os.environ.get("MEDSEG_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline and not any(s.scheme == "package" for s in entry.sources):
        raise ModelError(f"model '{entry.name}' is not in the cache and medseg is offline", path=cache.root,
                         hint=f"Run `medseg fetch {entry.name}` where the internet is reachable, or "
                              f"`medseg fetch {entry.name} --mirror URL|DIR` from a local server or folder.")
    return fetch_model(entry, cache=cache, progress=progress, mirror=mirror,
                       timeout=timeout if timeout is not None else default_timeout()).path
