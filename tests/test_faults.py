"""Faults on a shared machine: ``kill -9`` in the middle of a cohort prediction or of a training run, and
a corrupt checkpoint. Nothing half-written appears under a final name, and the next run picks up
where the killed one stopped. (``kill -9`` during ``fetch``, with resume and verification, is in
tests/test_fetch.py::test_killed_fetch_leaves_no_stale_lock_and_resumes.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk
import torch
import yaml

from medseg_cli.checkpoint import load_checkpoint
from test_hostile import ZSCORE, assert_clean_failure, warning_lines
from test_runners import conv1x1_model, export_tiny_onnx, make_card

torch.set_num_threads(1)


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "medseg_cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true (fail if it ends or times out first)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, "the command finished before it could be killed"
            assert time.monotonic() < deadline, "the command never reached the point to kill it at"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_killed_cohort_prediction_leaves_no_partial_mask_and_rerun_finishes(shared_data, medseg, tmp_path):
    card = make_card(num_classes=2, input_patch=(8, 16, 16), preprocessing=ZSCORE).with_updates(name="slowish")
    model = export_tiny_onnx(conv1x1_model(1, 2, seed=5), card, tmp_path / "m.onnx")
    cases = tmp_path / "cases"
    cases.mkdir()
    scans = sorted((shared_data / "hippocampus" / "imagesTr").glob("hippocampus_0*.nii.gz"))[:4]
    for scan in scans:
        (cases / scan.name).symlink_to(scan)
    out = tmp_path / "masks"
    command = ("predict", cases, "-o", out, "--model", model, "--device", "cpu", "--threads", "1")

    def masks() -> list[Path]:
        return [p for p in out.glob("*.nii.gz")] if out.is_dir() else []

    kill_when(start(*command, "--overlap", "0.9"), lambda: len(masks()) >= 1)  # slow: ~1000 windows a case
    finished = {p.name: p.stat().st_mtime_ns for p in masks()}
    assert 1 <= len(finished) < len(scans)
    for name in finished:  # whatever carries a final name is complete and on the scan's grid
        mask = sitk.ReadImage(str(out / name))
        assert mask.GetSize() == sitk.ReadImage(str(cases / name)).GetSize()
    # nothing else under a visible name (a hidden .medseg-partial-* scratch folder may remain after kill -9)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".medseg-partial-")) == sorted(finished)

    stale = out / ".medseg-partial-left-by-a-kill"  # a scratch folder a killed run left yesterday ...
    stale.mkdir()
    (stale / "hippocampus_999.nii.gz").write_bytes(b"half a mask")
    os.utime(stale, (time.time() - 86400, time.time() - 86400))

    done = medseg(*command, "--json")  # the same cohort, the default (faster) overlap
    assert not stale.exists()  # ... is cleaned up by the next run that writes there
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["summary"]
    assert summary == {"ok": len(scans) - len(finished), "skipped": len(finished), "failed": 0}
    assert sorted(p.name for p in masks()) == sorted(s.name for s in scans)
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # not redone


def train_config(shared_data: Path, tmp_path: Path) -> dict:
    return {"name": "killed", "labels": {0: "background", 1: "anterior", 2: "posterior"},
            "data": {"root": str(shared_data / "hippocampus"), "max_cases": 3, "val_every_nth": 3,
                     "cache": str(tmp_path / "cache")},
            "model": {"name": "unet3d", "kwargs": {"init_features": 2, "num_levels": 2}},
            "training": {"patch_size": [8, 16, 16], "batch_size": 1, "epochs": 40, "iterations_per_epoch": 2,
                         "val_every": 100, "num_workers": 0, "threads": 1},
            "seed": 0, "output": str(tmp_path / "run")}


def test_killed_training_resumes_from_the_last_complete_checkpoint(shared_data, medseg, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(shared_data, tmp_path)))
    run = tmp_path / "run"
    kill_when(start("train", "--config", config, "--no-export", "-q"), lambda: (run / "previous.pt").exists(),
              timeout=240)
    names = sorted(p.name for p in run.iterdir())
    assert "model.onnx" not in names and "summary.json" not in names, names
    # every checkpoint under a final name is complete (killed between "last -> previous" and the new
    # last.pt, only previous.pt exists: resume then starts there, with a warning)
    saved = {name: int(load_checkpoint(run / name)["epoch"]) for name in ("last.pt", "previous.pt")
             if (run / name).exists()}
    assert "previous.pt" in saved and saved.get("last.pt", saved["previous.pt"] + 1) > saved["previous.pt"], saved
    source = "last.pt" if "last.pt" in saved else "previous.pt"

    # resume trains the epochs left after the last complete checkpoint (here: just one more)
    epochs = saved[source] + 2
    resume = ("train", "--config", config, "--no-export", "--resume", "--set", f"training.epochs={epochs}")
    done = medseg(*resume)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run / source} after epoch {saved[source] + 1}" in done.stderr, done.stderr
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == epochs
    assert load_checkpoint(run / "last.pt")["epoch"] == epochs - 1

    # a corrupt last checkpoint: resume falls back on the previous one and says so
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    fallback = int(load_checkpoint(run / "previous.pt")["epoch"])
    done = medseg(*resume)
    assert done.returncode == 0, done.stderr
    lines = warning_lines(done)
    assert len(lines) == 1 and "last.pt" in lines[0] and "corrupt" in lines[0] and "previous.pt" in lines[0], lines
    assert f"resumed from {run / 'previous.pt'} after epoch {fallback + 1}" in done.stderr, done.stderr
    assert load_checkpoint(run / "last.pt")["epoch"] == epochs - 1

    # a checkpoint that would run code is never loaded, even as the fallback
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "medseg-checkpoint", "model_state": Evil(), "epoch": 0}, run / "last.pt")
    torch.save({"format": "medseg-checkpoint", "model_state": Evil(), "epoch": 0}, run / "previous.pt")
    done = medseg("train", "--config", config, "--no-export", "--resume")
    assert_clean_failure(done, 3, "previous.pt", "refused")
    assert not marker.exists()
