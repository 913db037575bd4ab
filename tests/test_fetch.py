"""`medseg fetch` / `medseg models` and the weights library against a real HTTP server on 127.0.0.1.

Every download goes over a real socket (tests/http_server.py) into an isolated MEDSEG_HOME; the
manifest is a test manifest named by MEDSEG_MANIFEST (or --manifest). Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from http_server import Fault, TestServer
from medseg_cli.errors import ChecksumError, ModelError

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
              "NO_PROXY")
PACKAGE_FILE = Path(__import__("medseg_cli").__file__).resolve().parent / "card.py"  # surely in the package
MEDSEG_VARS = ("MEDSEG_MIRROR", "MEDSEG_MANIFEST", "MEDSEG_TIMEOUT", "MEDSEG_OFFLINE")


# ------------------------------------------------------------------------------------------ helpers
def make_model_bytes(seed: int = 0, name: str = "tiny", *, light: bool = False) -> bytes:
    """A real 3-layer 3D CNN as ONNX (about 640 KB) carrying a medseg card: (N,1,Z,Y,X) -> (N,2,Z,Y,X).

    ``light``: 1x1x1 kernels and 4 channels instead (a few hundred bytes of weights, fast to run)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from medseg_cli.card import ModelCard, write_card_to_onnx_model

    rng = np.random.default_rng(seed)
    k1, k2, width = (1, 1, 4) if light else (9, 5, 32)
    w1 = rng.normal(0, 0.05, (width, 1, k1, k1, k1)).astype(np.float32)
    w2 = rng.normal(0, 0.05, (width, width, k2, k2, k2)).astype(np.float32)
    w3 = rng.normal(0, 0.05, (2, width, 1, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "w1"], ["h1"], pads=[k1 // 2] * 6),
             helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["h2"], pads=[k2 // 2] * 6),
             helper.make_node("Relu", ["h2"], ["a2"]),
             helper.make_node("Conv", ["a2", "w3"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "Z", "Y", "X"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, "Z", "Y", "X"])],
        [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    card = ModelCard(name=name, architecture="tiny-cnn", in_channels=1, num_classes=2,
                     labels={"0": "background", "1": "foreground"}, input_patch=[16, 16, 16],
                     output_patch=[16, 16, 16])
    write_card_to_onnx_model(model, card)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry(name: str, url: str, digest: str | None, *, size: int | None = None, fmt: str = "onnx",
          member: str | None = None, **extra) -> dict:
    source = {"url": url, "sha256": digest, "size": size, "format": fmt}
    if member is not None:
        source["member"] = member
    return {"name": name, "description": f"test model {name}", "architecture": extra.pop("architecture", "tiny-cnn"),
            "task": "test", "labels": {"0": "background", "1": "foreground"}, "modalities": ["T1"],
            "licence": "CC0", "citation": "none", "sources": [source], **extra}


def write_manifest(folder: Path, *entries: dict) -> Path:
    path = folder / "manifest.json"
    path.write_text(json.dumps({"schema_version": 1, "models": list(entries)}, indent=2))
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, medseg_home: Path) -> Path:
    """No proxy or medseg variables leak in from the machine; an isolated cache for every test."""
    for var in PROXY_VARS + MEDSEG_VARS:
        monkeypatch.delenv(var, raising=False)
    return medseg_home


def run_cli(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `medseg` click command in this process (no interpreter start-up): the same code,
    exit codes and output as ``python -m medseg_cli``."""
    import contextlib

    from click.testing import CliRunner

    from medseg_cli.cli import main

    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture()
def cli():
    """``cli("fetch", NAME, ...)`` -> CompletedProcess, in-process. Tests that need a process of their own
    (a kill, two at once, proxies, a terminal progress bar) use the ``medseg`` fixture instead."""
    return run_cli


@pytest.fixture()
def server():
    with TestServer() as running:
        yield running


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return make_model_bytes(0)


def models_json(cli, manifest: Path) -> dict:
    done = cli("models", "--json", "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json.loads(done.stdout)}


class RecordingProgress:
    """A Progress that records every task and how far it advanced."""

    def __init__(self):
        self.tasks: list[dict] = []

    def task(self, description, total):
        from contextlib import contextmanager

        record = {"description": description, "total": total, "done": 0}
        self.tasks.append(record)

        class _Task:
            def advance(self, amount=1):
                record["done"] += amount

        @contextmanager
        def manager():
            yield _Task()

        return manager()


# ------------------------------------------------------------------------------------------ tests
def test_normal_fetch_reports_progress_verifies_and_resolves(server, model_bytes, tmp_path, medseg_home,
                                                             monkeypatch, cli, medseg):
    from medseg_cli.card import read_card_from_onnx
    from medseg_cli.weights import Cache, fetch_model, load_manifest, resolve_model

    url = server.add("/files/tiny.onnx", model_bytes)
    manifest = write_manifest(tmp_path, entry("tiny", url, sha(model_bytes), size=len(model_bytes)))
    monkeypatch.setenv("MEDSEG_MANIFEST", str(manifest))

    progress = RecordingProgress()
    result = fetch_model(load_manifest().get("TINY"), progress=progress, timeout=5)
    assert result.status == "downloaded" and result.sha256 == sha(model_bytes)
    assert result.path == medseg_home / "models" / "tiny.onnx"
    assert result.path.read_bytes() == model_bytes
    download = [t for t in progress.tasks if "tiny" in t["description"]]
    assert download and download[0]["total"] == len(model_bytes) and download[0]["done"] == len(model_bytes)
    assert read_card_from_onnx(result.path).architecture == "tiny-cnn"
    assert sorted(p.name for p in (medseg_home / "models").iterdir()) == ["tiny.onnx"]  # no .part left
    registry = json.loads((medseg_home / "registry.json").read_text())
    assert registry["files"]["models/tiny.onnx"]["sha256"] == sha(model_bytes)

    # cached now: resolve_model does not touch the network again
    requests = len(server.requests_for("/files/tiny.onnx"))
    assert resolve_model("tiny") == result.path
    assert fetch_model(load_manifest().get("tiny"), cache=Cache()).status == "cached"
    assert len(server.requests_for("/files/tiny.onnx")) == requests == 1

    # the CLI draws a byte progress bar (rich, forced onto a non-terminal stderr) and reports JSON
    server.faults["/files/tiny.onnx"] = Fault(throttle=0.05)
    done = medseg("fetch", "tiny", "--force", env={"FORCE_COLOR": "1", "COLUMNS": "160"})
    assert done.returncode == 0, done.stderr
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stderr)
    assert "tiny (tiny.onnx)" in plain
    total_kb = f"{len(model_bytes) / 1000:.1f} kB"
    assert re.search(r"\b[1-9]\d*\.\d/" + re.escape(total_kb), plain), plain  # bytes so far / total
    assert re.search(r"\d+\.\d (kB|MB)/s", plain), plain  # transfer rate
    assert re.search(r"\b0:00:0\d\b", plain), plain  # ETA
    done = cli("fetch", "tiny", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["status"] == "cached" and row["sha256"] == sha(model_bytes) and row["path"] == str(result.path)


def test_dropped_connection_is_resumed_with_range_requests(server, model_bytes, tmp_path, medseg_home, cli):
    url = server.add("/tiny.onnx", model_bytes)
    manifest = write_manifest(tmp_path, entry("tiny", url, sha(model_bytes)))
    part = medseg_home / "models" / "tiny.onnx.part"

    # one drop: the same command resumes by itself from the byte where the server hung up
    server.faults["/tiny.onnx"] = Fault(drop_after=100_000, times=1)
    done = cli("fetch", "tiny", "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    assert server.requests_for("/tiny.onnx") == [("/tiny.onnx", None, 200),
                                                 ("/tiny.onnx", "bytes=100000-", 206)]
    assert (medseg_home / "models" / "tiny.onnx").read_bytes() == model_bytes

    # three drops in a row exhaust the automatic resumes: the partial file is kept, exit 3 ...
    (medseg_home / "models" / "tiny.onnx").unlink()
    server.log.clear()
    server.faults["/tiny.onnx"] = Fault(drop_after=100_000, times=3)
    done = cli("fetch", "tiny", "--manifest", manifest)
    assert done.returncode == 3
    assert "dropped" in done.stderr and "run the same command again" in done.stderr.lower()
    assert part.read_bytes() == model_bytes[:300_000]
    assert not (medseg_home / "models" / "tiny.onnx").exists()
    # ... and the next attempt asks only for the rest
    done = cli("fetch", "tiny", "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    assert [r[1] for r in server.requests_for("/tiny.onnx")] == [None, "bytes=100000-", "bytes=200000-",
                                                                 "bytes=300000-"]
    assert (medseg_home / "models" / "tiny.onnx").read_bytes() == model_bytes
    assert not part.exists()


def test_killed_fetch_leaves_no_stale_lock_and_resumes(server, model_bytes, tmp_path, medseg_home, cli):
    url = server.add("/tiny.onnx", model_bytes)
    manifest = write_manifest(tmp_path, entry("tiny", url, sha(model_bytes)))
    part = medseg_home / "models" / "tiny.onnx.part"
    server.faults["/tiny.onnx"] = Fault(throttle=0.5)  # 64 KiB every half second
    env = {**os.environ, "MEDSEG_MANIFEST": str(manifest), "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, "-m", "medseg_cli", "fetch", "tiny"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= 2 * 65536) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)  # dies holding the model lock
        process.wait()
    kept = part.stat().st_size
    assert 2 * 65536 <= kept < len(model_bytes)
    server.faults.pop("/tiny.onnx")
    done = cli("fetch", "tiny", "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    assert server.requests_for("/tiny.onnx")[-1] == ("/tiny.onnx", f"bytes={kept}-", 206)
    assert (medseg_home / "models" / "tiny.onnx").read_bytes() == model_bytes


def test_checksum_mismatch_deletes_download_and_keeps_good_copy(server, model_bytes, tmp_path, medseg_home,
                                                                 cli):
    tampered = bytearray(model_bytes)
    tampered[-10] ^= 0xFF
    tampered = bytes(tampered)
    url = server.add("/tiny.onnx", tampered)
    manifest = write_manifest(tmp_path, entry("tiny", url, sha(model_bytes)))
    final = medseg_home / "models" / "tiny.onnx"

    done = cli("fetch", "tiny", "--manifest", manifest)  # nothing good yet: nothing is kept
    assert done.returncode == 3
    assert sha(model_bytes) in done.stderr and sha(tampered) in done.stderr
    assert "sha256 mismatch" in done.stderr and "download was deleted" in done.stderr
    assert list((medseg_home / "models").iterdir()) == []

    server.add("/tiny.onnx", model_bytes)
    assert cli("fetch", "tiny", "--manifest", manifest).returncode == 0
    good_stat = final.stat()
    server.add("/tiny.onnx", tampered)
    done = cli("fetch", "tiny", "--force", "--manifest", manifest)
    assert done.returncode == 3
    assert sha(model_bytes) in done.stderr and sha(tampered) in done.stderr and "earlier copy kept" in done.stderr
    assert final.read_bytes() == model_bytes and final.stat().st_mtime_ns == good_stat.st_mtime_ns
    assert sorted(p.name for p in (medseg_home / "models").iterdir()) == ["tiny.onnx"]
    assert models_json(cli, manifest)["tiny"]["status"] == "verified"


def test_missing_file_and_redirects(server, model_bytes, tmp_path, medseg_home, cli):
    server.add("/real.onnx", model_bytes)
    server.redirects["/moved.onnx"] = "/real.onnx"
    server.faults["/loop.onnx"] = Fault(redirect_loop=True)
    manifest = write_manifest(tmp_path, entry("gone", server.url("/gone.onnx"), sha(model_bytes)),
                              entry("moved", server.url("/moved.onnx"), sha(model_bytes)),
                              entry("loop", server.url("/loop.onnx"), sha(model_bytes)))
    done = cli("fetch", "gone", "--manifest", manifest)
    assert done.returncode == 3
    assert server.url("/gone.onnx") in done.stderr and "HTTP 404" in done.stderr
    assert "update the manifest or use --mirror" in done.stderr
    done = cli("fetch", "moved", "--manifest", manifest)  # a redirect is followed
    assert done.returncode == 0, done.stderr
    assert (medseg_home / "models" / "moved.onnx").read_bytes() == model_bytes
    done = cli("fetch", "loop", "--manifest", manifest)
    assert done.returncode == 3 and "redirect" in done.stderr
    assert sorted(p.name for p in (medseg_home / "models").iterdir()) == ["moved.onnx"]


def test_slow_server_times_out(server, model_bytes, tmp_path, medseg_home, cli):
    url = server.add("/slow.onnx", model_bytes)
    server.faults["/slow.onnx"] = Fault(delay=5.0)
    manifest = write_manifest(tmp_path, entry("slow", url, sha(model_bytes)))
    done = cli("fetch", "slow", "--manifest", manifest, env={"MEDSEG_TIMEOUT": "0.5"})
    assert done.returncode == 3
    assert "no data for 0.5 s" in done.stderr and url in done.stderr
    assert not (medseg_home / "models" / "slow.onnx").exists()
    done = cli("fetch", "slow", "--manifest", manifest, "--timeout", "0")
    assert done.returncode == 2  # a zero timeout is refused by the option


def _lock_waiters(lock_file: Path) -> list[int]:
    """Pids blocked in flock() on ``lock_file`` (the ``->`` lines of Linux's /proc/locks)."""
    if not lock_file.exists():
        return []
    inode = lock_file.stat().st_ino
    waiters = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and fields[6].endswith(f":{inode}"):
            waiters.append(int(fields[5]))
    return waiters


def test_two_concurrent_fetches_share_one_download(server, model_bytes, tmp_path, medseg_home, cli):
    """The second fetch blocks on the model's lock while the first downloads, then finds the model verified."""
    url = server.add("/tiny.onnx", model_bytes)
    gate = threading.Event()
    server.faults["/tiny.onnx"] = Fault(gate=gate)  # the first download stalls after its headers ...
    manifest = write_manifest(tmp_path, entry("tiny", url, sha(model_bytes)))
    env = {**os.environ, "MEDSEG_MANIFEST": str(manifest), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "medseg_cli", "fetch", "tiny", "--json"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.monotonic() + 60
        while not server.requests_for("/tiny.onnx") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.requests_for("/tiny.onnx"), "the first fetch never reached the server"
        second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lock_file = medseg_home / "locks" / "model-tiny.lock"
        while second.pid not in _lock_waiters(lock_file) and second.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert second.pid in _lock_waiters(lock_file)  # ... and the second waits for the lock meanwhile
    finally:
        gate.set()
        outputs = [p.communicate(timeout=60) for p in (first, second) if p is not None]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert [json.loads(out)[0]["status"] for out, _ in outputs] == ["downloaded", "cached"]
    assert server.requests_for("/tiny.onnx") == [("/tiny.onnx", None, 200)]  # one download between the two
    assert sorted(p.name for p in (medseg_home / "models").iterdir()) == ["tiny.onnx"]
    assert (medseg_home / "models" / "tiny.onnx").read_bytes() == model_bytes
    assert models_json(cli, manifest)["tiny"]["status"] == "verified"


def test_mirror_folder_and_mirror_url(server, model_bytes, tmp_path, medseg_home, cli):
    other = make_model_bytes(1, name="other")
    # upstream is this server under paths it does not serve: any contact would show in its log
    manifest = write_manifest(tmp_path, entry("tiny", server.url("/upstream/tiny.onnx"), sha(model_bytes)),
                              entry("other", server.url("/upstream/other.onnx"), sha(other)))
    folder = tmp_path / "hospital-mirror"
    folder.mkdir()
    (folder / "tiny.onnx").write_bytes(model_bytes)  # a folder mirror by file name
    server.add(f"/mirror/{sha(other)}", other)  # a server mirror by sha256

    done = cli("fetch", "tiny", "--mirror", folder, "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    done = cli("fetch", "other", "--manifest", manifest, env={"MEDSEG_MIRROR": server.url("/mirror/")})
    assert done.returncode == 0, done.stderr
    assert (medseg_home / "models" / "tiny.onnx").read_bytes() == model_bytes
    assert (medseg_home / "models" / "other.onnx").read_bytes() == other
    assert not any(path.startswith("/upstream") for path, _, _ in server.log)
    rows = models_json(cli, manifest)
    assert rows["tiny"]["status"] == rows["other"]["status"] == "verified"

    # a mirror lacking the file says which names it looked for
    done = cli("fetch", "tiny", "--force", "--manifest", manifest, "--mirror", server.url("/empty"))
    assert done.returncode == 3
    assert "the mirror has neither tiny.onnx nor " + sha(model_bytes) in done.stderr
    done = cli("fetch", "tiny", "--force", "--manifest", manifest, "--mirror", tmp_path / "no-such-folder")
    assert done.returncode == 2 and "mirror folder not found" in done.stderr


def test_register_local_model(model_bytes, tmp_path, medseg_home, cli, monkeypatch):
    from medseg_cli.weights import resolve_model

    manifest = write_manifest(tmp_path, entry("tiny", "http://127.0.0.1:9/tiny.onnx", sha(model_bytes)))
    (tmp_path / "model.onnx").write_bytes(model_bytes)
    done = cli("fetch", "./model.onnx", "--name", "my-model", "--manifest", manifest, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cached = medseg_home / "models" / "my-model.onnx"
    assert cached.read_bytes() == model_bytes
    row = models_json(cli, manifest)["my-model"]
    assert row["kind"] == "local" and row["status"] == "verified" and row["sha256"] == sha(model_bytes)
    monkeypatch.setenv("MEDSEG_MANIFEST", str(manifest))
    assert resolve_model("my-model") == cached

    # a name of the manifest, a bad name, or a file that is not ONNX are refused (exit 2)
    from medseg_cli.errors import InputError
    from medseg_cli.weights import register_local_model

    with pytest.raises(InputError, match="'tiny' is a model of the manifest"):
        register_local_model(tmp_path / "model.onnx", "tiny")
    with pytest.raises(InputError, match="invalid model name '../evil'"):
        register_local_model(tmp_path / "model.onnx", "../evil")
    (tmp_path / "notes.txt").write_text("not a model")
    done = cli("fetch", "notes.txt", "--name", "x", "--manifest", manifest, cwd=tmp_path)
    assert done.returncode == 2 and "only .onnx models can be registered" in done.stderr

    # a cached file changed behind medseg's back is no longer verified, and is refused
    with open(cached, "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\0\0\0\0")
    assert models_json(cli, manifest)["my-model"]["status"] == "cached"
    with pytest.raises(ChecksumError, match="changed since it was registered"):
        resolve_model("my-model")


def test_models_table_and_json_status(server, model_bytes, tmp_path, medseg_home, cli):
    other = make_model_bytes(2, name="other")
    manifest = write_manifest(tmp_path, entry("tiny", server.add("/tiny.onnx", model_bytes), sha(model_bytes)),
                              entry("other", server.add("/other.onnx", other), sha(other)),
                              entry("absent", server.url("/absent.onnx"), sha(other)),
                              # a file shipped inside the installed package (as the default model will be)
                              entry("packaged", "package:card.py", sha(PACKAGE_FILE.read_bytes())))
    done = cli("fetch", "--all", "--json", "--manifest", manifest)  # one fails; the others are fetched
    assert done.returncode == 3
    assert "absent.onnx" in done.stderr and "HTTP 404" in done.stderr
    assert "1 of 4 models could not be fetched" in done.stderr
    assert {row["name"]: row["status"] for row in json.loads(done.stdout)} == {
        "tiny": "downloaded", "other": "downloaded", "packaged": "packaged"}
    assert sorted(p.name for p in (medseg_home / "models").iterdir()) == ["other.onnx", "tiny.onnx"]
    done = cli("fetch", "--manifest", manifest)
    assert done.returncode == 2 and "name a model to fetch, or --all" in done.stderr
    (medseg_home / "models" / "other.onnx").write_bytes(model_bytes)  # replaced by another file
    rows = models_json(cli, manifest)
    assert {name: row["status"] for name, row in rows.items()} == {"tiny": "verified", "other": "cached",
                                                                   "absent": "missing", "packaged": "verified"}
    assert rows["packaged"]["path"] == str(PACKAGE_FILE)
    assert rows["tiny"]["path"] == str(medseg_home / "models" / "tiny.onnx") and rows["absent"]["path"] is None
    assert rows["tiny"]["sha256"] == sha(model_bytes) and rows["tiny"]["modalities"] == ["T1"]
    done = cli("models", "--manifest", manifest, env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    lines = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") > 3}
    assert "verified" in lines["tiny"] and "cached" in lines["other"] and "missing" in lines["absent"]
    # fetching `other` again repairs it
    assert cli("fetch", "other", "--manifest", manifest).returncode == 0
    assert models_json(cli, manifest)["other"]["status"] == "verified"


def test_proxy_variables_are_honoured(server, model_bytes, tmp_path, medseg_home, medseg):
    """Run in fresh processes: urllib reads the proxy variables when it builds its opener, once per process."""
    server.add("/models/tiny.onnx", model_bytes)
    # a host that does not exist: only a proxy can deliver it
    manifest = write_manifest(tmp_path, entry("tiny", "http://weights.medseg-test.invalid/models/tiny.onnx",
                                              sha(model_bytes)))
    done = medseg("fetch", "tiny", "--manifest", manifest, env={"http_proxy": server.url("")})
    assert done.returncode == 0, done.stderr
    assert server.proxied_hosts == ["weights.medseg-test.invalid"]
    assert (medseg_home / "models" / "tiny.onnx").read_bytes() == model_bytes

    # NO_PROXY exempts the local server from a (dead) proxy; without it the dead proxy is used and fails
    local = write_manifest(tmp_path, entry("local", server.url("/models/tiny.onnx"), sha(model_bytes)))
    dead_proxy = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    done = medseg("fetch", "local", "--manifest", local, env=dead_proxy)
    assert done.returncode == 3 and "connection refused" in done.stderr
    done = medseg("fetch", "local", "--manifest", local, env={**dead_proxy, "NO_PROXY": "127.0.0.1"})
    assert done.returncode == 0, done.stderr
    assert server.proxied_hosts == ["weights.medseg-test.invalid"]


def test_trust_on_first_use(server, model_bytes, tmp_path, medseg_home, cli):
    url = server.add("/unpinned.onnx", model_bytes)
    manifest = write_manifest(tmp_path, entry("unpinned", url, None))
    done = cli("fetch", "unpinned", "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    assert "no published sha256; trusting it on first use" in done.stderr and sha(model_bytes) in done.stderr
    trust = json.loads((medseg_home / "registry.json").read_text())["trust"]
    assert trust[url]["sha256"] == sha(model_bytes) and trust[url]["size"] == len(model_bytes)
    assert models_json(cli, manifest)["unpinned"]["status"] == "verified"

    done = cli("fetch", "unpinned", "--force", "--manifest", manifest)  # same bytes: accepted, no warning
    assert done.returncode == 0 and "trusting it on first use" not in done.stderr
    changed = make_model_bytes(3)
    server.add("/unpinned.onnx", changed)
    done = cli("fetch", "unpinned", "--force", "--manifest", manifest)
    assert done.returncode == 3
    assert "recorded on first use" in done.stderr and sha(changed) in done.stderr and "--forget-trust" in done.stderr
    assert (medseg_home / "models" / "unpinned.onnx").read_bytes() == model_bytes
    done = cli("fetch", "unpinned", "--force", "--forget-trust", "--manifest", manifest)
    assert done.returncode == 0, done.stderr
    assert json.loads((medseg_home / "registry.json").read_text())["trust"][url]["sha256"] == sha(changed)


def test_resolve_model_paths_names_and_offline(server, model_bytes, tmp_path, medseg_home, monkeypatch):
    from medseg_cli.weights import default_model_name, resolve_model

    assert default_model_name() == "hippocampus"
    url = server.add("/tiny.onnx", model_bytes)
    monkeypatch.setenv("MEDSEG_MANIFEST", str(write_manifest(tmp_path, entry("tiny", url, sha(model_bytes)))))
    local = tmp_path / "mine.onnx"
    local.write_bytes(model_bytes)
    assert resolve_model(str(local)) == local  # an existing file is used as it is
    with pytest.raises(ModelError, match="model file not found"):
        resolve_model(str(tmp_path / "missing.onnx"))
    with pytest.raises(ModelError, match="unknown model 'nope'.*Known models: tiny"):
        resolve_model("nope")
    with pytest.raises(ModelError, match=r"offline.*medseg fetch tiny.*--mirror"):
        resolve_model("tiny", offline=True)
    monkeypatch.setenv("MEDSEG_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline"):
        resolve_model("tiny")
    assert server.log == []
    monkeypatch.delenv("MEDSEG_OFFLINE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pinned download warns about nothing
        path = resolve_model("tiny")  # fetched on demand
    assert path == medseg_home / "models" / "tiny.onnx" and path.read_bytes() == model_bytes
    assert resolve_model("tiny", offline=True) == path  # cached: offline is fine


def test_leftover_partial_files(server, model_bytes, tmp_path, medseg_home, monkeypatch):
    """A complete .part (killed before verification) is accepted on 416; a .part of another file is discarded."""
    from medseg_cli.weights import fetch_model, load_manifest

    url = server.add("/tiny.onnx", model_bytes)
    monkeypatch.setenv("MEDSEG_MANIFEST", str(write_manifest(tmp_path, entry("tiny", url, sha(model_bytes)))))
    models = medseg_home / "models"
    models.mkdir(parents=True)
    part, meta = models / "tiny.onnx.part", models / "tiny.onnx.part.json"
    part.write_bytes(model_bytes)
    meta.write_text(json.dumps({"url": url, "sha256": sha(model_bytes), "size": None}))
    result = fetch_model(load_manifest().get("tiny"), timeout=5)
    assert server.log == [("/tiny.onnx", f"bytes={len(model_bytes)}-", 416)]
    assert result.status == "downloaded" and result.path.read_bytes() == model_bytes
    assert not part.exists() and not meta.exists()

    part.write_bytes(b"x" * 1000)  # left by a download of a different file
    meta.write_text(json.dumps({"url": "http://elsewhere/other.onnx", "sha256": None, "size": None}))
    result = fetch_model(load_manifest().get("tiny"), timeout=5, force=True)
    assert server.log[-1] == ("/tiny.onnx", None, 200) and result.path.read_bytes() == model_bytes


def test_server_without_ranges_restarts_and_oversize_is_stopped(server, model_bytes, tmp_path, medseg_home,
                                                                monkeypatch):
    """A server that ignores Range (200) restarts the file from byte 0; a file larger than the manifest's
    `size` is stopped as soon as it overflows, and nothing is kept."""
    from medseg_cli.weights import fetch_model, load_manifest

    url = server.add("/tiny.onnx", model_bytes)
    big = server.add("/big.onnx", model_bytes + b"\0" * 100_000)
    monkeypatch.setenv("MEDSEG_MANIFEST", str(write_manifest(
        tmp_path, entry("tiny", url, sha(model_bytes)),
        entry("big", big, sha(model_bytes), size=len(model_bytes)))))
    models = medseg_home / "models"
    models.mkdir(parents=True)
    part = models / "tiny.onnx.part"
    part.write_bytes(b"garbage" * 1000)  # a partial file the server will not resume
    (models / "tiny.onnx.part.json").write_text(json.dumps({"url": url, "sha256": sha(model_bytes), "size": None}))
    server.faults["/tiny.onnx"] = Fault(ranges=False)
    result = fetch_model(load_manifest().get("tiny"), timeout=5)
    assert server.requests_for("/tiny.onnx") == [("/tiny.onnx", "bytes=7000-", 200)]
    assert result.path.read_bytes() == model_bytes and not part.exists()

    with pytest.raises(ModelError, match=f"larger than the manifest says .*> {len(model_bytes):,} bytes"):
        fetch_model(load_manifest().get("big"), timeout=5)
    assert sorted(p.name for p in models.iterdir()) == ["tiny.onnx"]


def test_predict_fetches_a_named_model_on_demand(server, tmp_path, medseg_home, shared_data, cli, monkeypatch):
    """`predict --model NAME` of a manifest model missing from the cache: refused with --offline (exit 3,
    nothing requested), downloaded on demand otherwise, then used from the cache."""
    import SimpleITK as sitk

    from medseg_cli.weights import resolve_model

    model_bytes = make_model_bytes(0, light=True)
    url = server.add("/tiny.onnx", model_bytes)
    env = {"MEDSEG_MANIFEST": str(write_manifest(tmp_path, entry("tiny", url, sha(model_bytes))))}
    scan = shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    out = tmp_path / "mask.nii.gz"
    done = cli("predict", scan, "-o", out, "--model", "tiny", "--offline", env=env)
    assert done.returncode == 3 and "not in the cache and medseg is offline" in done.stderr
    assert "medseg fetch tiny" in done.stderr and server.log == [] and not out.exists()
    done = cli("predict", scan, "-o", out, "--model", "tiny", env=env)
    assert done.returncode == 0, done.stderr
    assert server.requests_for("/tiny.onnx") == [("/tiny.onnx", None, 200)]
    assert (medseg_home / "models" / "tiny.onnx").read_bytes() == model_bytes
    mask, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(scan))
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
    monkeypatch.setenv("MEDSEG_MANIFEST", env["MEDSEG_MANIFEST"])
    assert resolve_model("tiny", offline=True) == medseg_home / "models" / "tiny.onnx"  # from the cache now
    assert len(server.log) == 1
