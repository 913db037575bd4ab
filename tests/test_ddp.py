"""`torchrun --nproc_per_node 2 -m medseg_cli train`: DDP on CPU (gloo) keeps the ranks' weights identical."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg_cli.checkpoint import load_checkpoint
from medseg_cli.training.config import load_config
from medseg_cli.training.loop import build_for_training, state_digest


def tiny_ddp_config(shared_data: Path, tmp_path: Path, root: Path | None = None) -> Path:
    data = {
        "name": "ddp",
        "labels": {0: "background", 1: "anterior", 2: "posterior"},
        "data": {"root": str(root or shared_data / "hippocampus"), "max_cases": 4, "val_every_nth": 4,
                 "cache": str(tmp_path / "cache")},
        "preprocessing": {"normalization": {"kind": "zscore"}},
        "model": {"name": "unet3d", "kwargs": {"init_features": 2}},
        "training": {"patch_size": [16, 16, 16], "batch_size": 2, "epochs": 2, "iterations_per_epoch": 3,
                     "val_every": 2, "num_workers": 0, "threads": 1},
        "augmentation": {"flip_prob": 0.5, "noise_prob": 0.5},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def torchrun(config: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """torchrun (``python -m torch.distributed.run``, what ``.venv/bin/torchrun`` runs) with 2 CPU processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "medseg_cli", "train", "--config", str(config), "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_cpu_ranks_stay_in_sync(shared_data, tmp_path):
    config = tiny_ddp_config(shared_data, tmp_path)
    result = torchrun(config, "--json", "--no-export")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)  # only rank 0 prints
    assert summary["world_size"] == 2 and summary["epochs_done"] == 2
    digests = summary["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and summary["ranks_in_sync"]
    # the ranks trained on different patches (DistributedSampler), so equal weights come from DDP's all-reduce
    losses = summary["rank_losses"]
    assert len(losses) == 2 and losses[0] != pytest.approx(losses[1], rel=1e-6)
    # rank 0 alone wrote the checkpoints and the log, and they hold the synchronised weights
    run = tmp_path / "run"
    with (run / "log.csv").open(newline="") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    model = build_for_training(load_config(config))[0]
    model.load_state_dict(load_checkpoint(run / "last.pt")["model_state"])
    assert state_digest(model) == digests[0]
    assert load_checkpoint(run / "last.pt")["card"]["training"]["world_size"] == 2


def test_bad_data_on_rank_0_stops_every_rank(shared_data, tmp_path):
    root = tmp_path / "broken"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name in ("case_000", "case_001"):  # case_000 validates, case_001 trains: neither is an image
        (root / "imagesTr" / f"{name}.nii.gz").write_bytes(b"not an image")
        (root / "labelsTr" / f"{name}.nii.gz").write_bytes(b"not an image")
    result = torchrun(tiny_ddp_config(shared_data, tmp_path, root), timeout=180)  # no hang until gloo's timeout
    assert result.returncode != 0
    assert "case_000.nii.gz" in result.stderr and "rank 0 stopped" in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()
