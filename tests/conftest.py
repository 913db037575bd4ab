"""Shared fixtures: the real data in ../shared/data and a way to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Two cores, two xdist workers: one BLAS/OpenMP thread per test process avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; fail loudly (never skip) when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}: check out ../shared beside the repository")
    return SHARED_DATA


@pytest.fixture()
def medseg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated cache folder (MEDSEG_HOME) so tests never touch the user's cache."""
    home = tmp_path / "medseg_home"
    monkeypatch.setenv("MEDSEG_HOME", str(home))
    return home


def run_medseg(*args: str, cwd: Path | None = None, env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m medseg_cli ARGS`` in a subprocess, capturing text output."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "medseg_cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)


@pytest.fixture()
def medseg():
    """Callable fixture: ``medseg("info", path)`` -> CompletedProcess."""
    return run_medseg
