"""The weights cache: where fetched models live, the registry that records what was verified, and locks.

Layout (``MEDSEG_HOME`` or platformdirs ``user_cache_dir("medseg")``)::

    models/<name>.onnx | <name>.pt     ready-to-use model files (what ``resolve_model`` returns)
    downloads/<file>                   raw downloads kept for reuse (archives shared by several models)
    downloads/<file>.part              an interrupted download (resumed with an HTTP Range request)
    locks/<key>.lock                   fcntl locks: one fetch of a file at a time, across processes
    registry.json                      verified files, locally registered models, trust-on-first-use digests

``registry.json``::

    {"version": 1,
     "files":  {"<path relative to the cache>": {"sha256", "size", "mtime_ns", "source", "model"}},
     "local":  {"<name>": {"file": "models/<name>.onnx", "sha256", "size", "registered_from", "card_name"}},
     "trust":  {"<source url>": {"sha256", "size", "first_seen"}}}

A file counts as *verified* when its registry record's sha256 is the expected one and its size and
modification time are unchanged since it was hashed (``models --verify`` re-hashes everything).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..atomic import atomic_write_text
from ..errors import ModelError
from ..progress import Progress, ensure_progress

REGISTRY_VERSION = 1
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The cache folder: ``$MEDSEG_HOME`` or the platform's user cache folder for ``medseg``."""
    home = os.environ.get("MEDSEG_HOME")
    if home:
        return Path(home).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("medseg"))


def sha256_file(path: Path, advance: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (``advance(n)`` is called with bytes read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
            if advance is not None:
                advance(len(block))
    return digest.hexdigest()


def _safe_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", key)[:150] or "_"


@contextmanager
def file_lock(key: str, *, root: Path | None = None, progress: Progress | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``locks/<key>.lock`` (waits for another process to finish).

    While another process holds it, ``progress`` shows a "waiting" task. The kernel drops the lock when
    its holder dies, so a killed fetch never leaves a stale lock behind.
    """
    root = root or cache_dir()
    folder = root / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_safe_key(key)}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with ensure_progress(progress).task(f"waiting for another medseg process ({path})", total=None):
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class Cache:
    """The cache folder and its registry. Every registry update is read-modify-write under a lock."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()

    # ------------------------------------------------------------------ folders
    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.json"

    def ensure(self) -> None:
        try:
            for folder in (self.root, self.models_dir, self.downloads_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ModelError(f"cannot create the model cache ({err.strerror})", path=self.root,
                             hint="Set MEDSEG_HOME to a writable folder.") from None

    def lock(self, key: str, progress: Progress | None = None):
        """Context manager: the exclusive lock ``locks/<key>.lock`` of this cache (see :func:`file_lock`)."""
        self.ensure()
        return file_lock(key, root=self.root, progress=progress)

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(Path(path).resolve())

    # ------------------------------------------------------------------ registry
    def read_registry(self) -> dict:
        empty = {"version": REGISTRY_VERSION, "files": {}, "local": {}, "trust": {}}
        try:
            data = json.loads(self.registry_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return empty
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            raise ModelError(f"the cache registry is unreadable ({err})", path=self.registry_path,
                             hint="Delete it; models will be re-verified "
                                  "(trust-on-first-use digests are lost).") from None
        for key in ("files", "local", "trust"):
            if not isinstance(data.get(key), dict):
                data[key] = {}
        return data

    @contextmanager
    def edit_registry(self) -> Iterator[dict]:
        """Read the registry, let the caller change it, write it back atomically (under a lock)."""
        with self.lock("registry"):
            data = self.read_registry()
            yield data
            atomic_write_text(self.registry_path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def record_file(self, path: Path, sha256: str, *, source: str | None = None, model: str | None = None) -> None:
        """Record that ``path`` was hashed to ``sha256`` (with its current size and mtime)."""
        stat = Path(path).stat()
        with self.edit_registry() as data:
            data["files"][self.relative(path)] = {"sha256": sha256, "size": stat.st_size,
                                                  "mtime_ns": stat.st_mtime_ns, "source": source,
                                                  "model": model}

    def recorded_digest(self, path: Path) -> str | None:
        """The sha256 recorded for ``path`` if the file is unchanged since (size + mtime), else None."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError:
            return None
        record = self.read_registry()["files"].get(self.relative(path))
        if record and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            return record.get("sha256")
        return None

    def is_verified(self, path: Path, expected_sha256: str | None, *, rehash: bool = False) -> bool:
        """True when ``path`` exists and its sha256 equals ``expected_sha256`` (recorded, or re-hashed)."""
        path = Path(path)
        if not path.is_file():
            return False
        digest = None if rehash else self.recorded_digest(path)
        if digest is None:
            digest = sha256_file(path)
            if expected_sha256 is not None and digest == expected_sha256:
                try:
                    self.record_file(path, digest)
                except (ModelError, OSError):  # a read-only cache only costs a re-hash next time
                    pass
        return expected_sha256 is not None and digest == expected_sha256

    # ------------------------------------------------------------------ trust on first use
    def trusted_digest(self, url: str) -> str | None:
        record = self.read_registry()["trust"].get(url)
        return record.get("sha256") if record else None

    def trust(self, url: str, sha256: str, size: int) -> None:
        with self.edit_registry() as data:
            if url not in data["trust"]:
                data["trust"][url] = {"sha256": sha256, "size": size,
                                      "first_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def forget_trust(self, url: str) -> bool:
        with self.edit_registry() as data:
            return data["trust"].pop(url, None) is not None

    # ------------------------------------------------------------------ local models
    def local_models(self) -> dict[str, dict]:
        return self.read_registry()["local"]

    def find_local(self, name: str) -> dict | None:
        for key, record in self.local_models().items():
            if key.lower() == name.lower():
                return {"name": key, **record}
        return None

    def register_local(self, name: str, record: dict[str, Any]) -> None:
        with self.edit_registry() as data:
            for key in list(data["local"]):
                if key.lower() == name.lower():
                    del data["local"][key]
            data["local"][name] = record
