"""Model weights: the manifest of known models, the local cache, verified downloads.

>>> from medseg_cli.weights import resolve_model
>>> path = resolve_model("hippocampus")   # fetched on first use, sha256-verified, cached
"""

from __future__ import annotations

from .cache import Cache, cache_dir, sha256_file
from .fetch import (FetchResult, NetworkError, NotFoundError, default_model_name, default_timeout, download_verified,
                    fetch_model, model_status, package_path, register_local_model, resolve_model)
from .manifest import Manifest, ManifestEntry, Source, load_manifest, parse_manifest, validate_manifest

__all__ = ["Cache", "FetchResult", "Manifest", "ManifestEntry", "NetworkError", "NotFoundError", "Source",
           "cache_dir", "default_model_name", "default_timeout", "download_verified", "fetch_model",
           "load_manifest", "model_status", "package_path", "parse_manifest", "register_local_model",
           "resolve_model", "sha256_file", "validate_manifest"]
