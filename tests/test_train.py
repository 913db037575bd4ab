"""`medseg train`: a short real training on hippocampus cases, exact resume, --max-minutes, bad input."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from medseg_cli.card import read_card_from_onnx
from medseg_cli.checkpoint import load_checkpoint
from medseg_cli.errors import MedsegWarning
from medseg_cli.training.config import config_from_dict
from medseg_cli.training.loop import train


def tiny_config(shared_data: Path, tmp_path: Path, **sections) -> dict:
    """8 real hippocampus cases (6 train / 2 val), a small 3D U-Net, small patches, one thread."""
    data = {
        "name": "tiny-hippocampus",
        "licence": "CC-BY-SA-4.0",
        "training_data": "8 MSD Task04 hippocampus cases",
        "labels": {0: "background", 1: "anterior", 2: "posterior"},
        "data": {"root": str(shared_data / "hippocampus"), "max_cases": 8, "val_every_nth": 4,
                 "cache": str(tmp_path / "cache")},
        "preprocessing": {"normalization": {"kind": "zscore"}},
        "model": {"name": "unet3d", "kwargs": {"init_features": 4}},
        "training": {"patch_size": [24, 32, 24], "batch_size": 2, "epochs": 6, "iterations_per_epoch": 10,
                     "val_every": 3, "num_workers": 0, "threads": 1},
        "augmentation": {"flip_prob": 0.0},
        "optimizer": {"name": "adam", "lr": 0.01},
        "seed": 0,
        "output": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return data


def read_log(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    p, g = a == label, b == label
    return 2 * np.logical_and(p, g).sum() / (p.sum() + g.sum())


# ----------------------------------------------------------------------------------- real training
def test_short_training_learns_and_exports_a_model_predict_runs(shared_data, tmp_path, medseg):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_config(shared_data, tmp_path)))
    result = medseg("train", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    run = tmp_path / "run"
    assert summary["epochs_done"] == 6 and not summary["stopped_early"]
    # 60 iterations of a 3D U-Net with F=4 on 6 cases: chance level is ~0.05; measured 0.43..0.58 over seeds
    assert summary["validation_dice_mean"] > 0.3, summary
    assert set(summary["validation_dice"]) == {"anterior", "posterior"}
    log = read_log(run / "log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4, 5, 6]
    assert float(log[-1]["loss"]) < 0.8 * float(log[0]["loss"])          # the loss went down
    assert log[2]["val_dice_mean"] and not log[1]["val_dice_mean"]         # validated every 3 epochs
    for name in ("last.pt", "previous.pt", "best.pt", "model.onnx", "summary.json"):
        assert (run / name).is_file(), name
    assert load_checkpoint(run / "last.pt")["epoch"] == 5 and load_checkpoint(run / "previous.pt")["epoch"] == 4
    assert not [p.name for p in run.iterdir() if p.name.endswith((".new", ".tmp")) or p.name.startswith(".")]

    card = read_card_from_onnx(run / "model.onnx")
    assert card.architecture == "unet3d" and card.labels == {"0": "background", "1": "anterior", "2": "posterior"}
    assert card.metrics["validation_dice_mean"] == pytest.approx(summary["validation_dice_mean"])
    assert card.training["train_cases"] == 6 and card.training["val_cases"] == 2
    assert card.licence == "CC-BY-SA-4.0" and card.input_patch == [24, 32, 24]

    # the exported model runs as is in `medseg predict`, on the input's grid
    case = card.training["val_case_names"][1]
    scan = shared_data / "hippocampus" / "imagesTr" / f"{case}.nii.gz"
    reference = sitk.ReadImage(str(shared_data / "hippocampus" / "labelsTr" / f"{case}.nii.gz"))
    result = medseg("predict", "--model", run / "model.onnx", scan, "-o", tmp_path / "mask.nii.gz", "--quiet")
    assert result.returncode == 0, result.stderr
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    assert mask.GetSize() == reference.GetSize() and mask.GetSpacing() == reference.GetSpacing()
    assert mask.GetOrigin() == reference.GetOrigin() and mask.GetDirection() == reference.GetDirection()
    predicted, truth = sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(reference)
    assert np.mean([dice(predicted, truth, 1), dice(predicted, truth, 2)]) > 0.2


# ------------------------------------------------------------------------------------------ resume
class Interrupt(Exception):
    pass


def stop_after(epoch: int):
    def on_epoch(row: dict) -> None:
        if row["epoch"] == epoch:
            raise Interrupt  # as if the process were killed right after this epoch's checkpoint
    return on_epoch


def resume_config(shared_data: Path, tmp_path: Path, name: str, **training) -> object:
    data = tiny_config(shared_data, tmp_path, output=str(tmp_path / name),
                       model={"name": "unet3d", "kwargs": {"init_features": 2}},
                       training={"patch_size": [16, 16, 16], "epochs": 4, "iterations_per_epoch": 3,
                                 "val_every": 2, **training},
                       augmentation={"flip_prob": 0.5, "rotation_prob": 0.5, "noise_prob": 0.5})
    return config_from_dict(data, source=f"{name}.yaml")


def assert_same_state(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a), load_checkpoint(b)
    assert first["epoch"] == second["epoch"] and first["iteration"] == second["iteration"]
    for key, value in first["model_state"].items():
        assert torch.equal(value, second["model_state"][key]), key
    for key, state in first["optimizer_state"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(second["optimizer_state"]["state"][key][name]))
    assert first["scheduler_state"]["last_epoch"] == second["scheduler_state"]["last_epoch"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(shared_data, tmp_path):
    full = train(resume_config(shared_data, tmp_path, "full"), export=False)
    assert full.epochs_done == 4

    # killed after epoch 2, resumed (with a DataLoader worker this time: sampling is seeded per item)
    split = resume_config(shared_data, tmp_path, "split")
    with pytest.raises(Interrupt):
        train(split, on_epoch=stop_after(2), export=False)
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    resumed = train(resume_config(shared_data, tmp_path, "split", num_workers=1), resume=True, export=False)
    assert resumed.epochs_done == 4
    assert_same_state(tmp_path / "full" / "last.pt", tmp_path / "split" / "last.pt")
    assert read_log(tmp_path / "full" / "log.csv") == [
        {**row, "seconds": full_row["seconds"]} for row, full_row in
        zip(read_log(tmp_path / "split" / "log.csv"), read_log(tmp_path / "full" / "log.csv"))]
    assert resumed.best_dice == pytest.approx(full.best_dice)

    # killed after epoch 3 with a corrupt last.pt: falls back to previous.pt (epoch 2) with a warning
    crash = resume_config(shared_data, tmp_path, "crash")
    with pytest.raises(Interrupt):
        train(crash, on_epoch=stop_after(3), export=False)
    last = tmp_path / "crash" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(crash, resume=True, export=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, MedsegWarning)]
    assert any("unreadable" in m and "previous.pt" in m for m in messages), messages
    assert_same_state(tmp_path / "full" / "last.pt", last)
    assert (tmp_path / "crash" / "last.pt.corrupt").is_file()  # set aside, never rotated into previous.pt
    assert load_checkpoint(tmp_path / "crash" / "previous.pt")["epoch"] == 2
    assert [r["epoch"] for r in read_log(tmp_path / "crash" / "log.csv")] == ["1", "2", "3", "4"]


def test_resume_fails_before_reading_data_without_a_fitting_checkpoint(shared_data, tmp_path):
    from medseg_cli.checkpoint import save_checkpoint
    from medseg_cli.errors import InputError, ModelError
    from medseg_cli.training.loop import build_for_training, make_card

    config = resume_config(shared_data, tmp_path, "nothing")
    with pytest.raises(InputError, match="--resume: no last.pt or previous.pt"):
        train(config, resume=True)
    # a checkpoint of another network (4 features where the config says 2)
    other = config_from_dict(tiny_config(shared_data, tmp_path), source="other.yaml")
    model, _, output_patch, _, input_patch = build_for_training(other)
    card = make_card(other, architecture="unet3d", spatial_dims=3, input_patch=input_patch,
                     output_patch=output_patch, metrics={}, training={})
    save_checkpoint(tmp_path / "nothing" / "last.pt", model.state_dict(), card, epoch=0)
    with pytest.raises(ModelError, match="last.pt: --resume: last.pt does not fit this config's model"):
        train(config, resume=True)
    assert not (tmp_path / "cache").exists()  # failed before the data was read


def test_max_minutes_stops_cleanly_with_a_checkpoint(shared_data, tmp_path):
    config = resume_config(shared_data, tmp_path, "timed")
    result = train(config, max_minutes=1e-6)
    assert result.stopped_early and result.epochs_done == 1 and result.onnx_path is None
    payload = load_checkpoint(tmp_path / "timed" / "last.pt")
    assert payload["epoch"] == 0 and payload["best_dice"] >= 0  # validated before stopping
    assert not (tmp_path / "timed" / "model.onnx").exists()
    result = train(config, resume=True)
    assert result.epochs_done == 4 and not result.stopped_early
    assert read_card_from_onnx(result.onnx_path).training["epochs"] == 4
    # --resume of the finished run: nothing is trained, validated or written again
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "timed").iterdir()}
    messages: list[str] = []
    again = train(config, resume=True, log=messages.append)
    assert any("all 4 epochs already trained" in m for m in messages), messages
    assert again.epochs_done == 4 and again.onnx_path == result.onnx_path and again.val_dice == result.val_dice
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "timed").iterdir()} == stamps


# --------------------------------------------------------------------------------------- bad input
def write_case(folder: Path, name: str, image: sitk.Image, label: sitk.Image) -> None:
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "imagesTr" / f"{name}.nii.gz"))
    sitk.WriteImage(label, str(folder / "labelsTr" / f"{name}.nii.gz"))


def bad_dataset(kind: str, shared_data: Path, root: Path) -> None:
    source = shared_data / "hippocampus"
    image = sitk.ReadImage(str(source / "imagesTr" / "hippocampus_001.nii.gz"))
    label = sitk.ReadImage(str(source / "labelsTr" / "hippocampus_001.nii.gz"))
    write_case(root, "good", image, label)
    if kind == "label_values":
        array = sitk.GetArrayFromImage(label)
        array[0, 0, 0] = 5
        bad = sitk.GetImageFromArray(array)
        bad.CopyInformation(label)
        write_case(root, "bad", image, bad)
    elif kind == "geometry":
        moved = sitk.Image(label)
        moved.SetOrigin(tuple(o + 3.0 for o in label.GetOrigin()))
        write_case(root, "bad", image, moved)
    elif kind == "empty":
        for path in [*root.glob("*/*.nii.gz")]:
            path.unlink()


BAD_INPUT = {
    "label_values": ("bad.nii.gz: label values [5] lie outside 0..2", {}),
    "geometry": ("bad.nii.gz: label geometry differs from the image", {}),
    "empty": ("empty dataset: no cases found", {}),
    "unknown_key": ("training.batchsize: unknown key; known:", {"training": {"batchsize": 2}}),
    "wrong_type": ("training.epochs: expected int, got str 'ten'", {"training": {"epochs": "ten"}}),
    "missing_path": ("data.root: folder not found", {"data": {"root": "no/such/folder"}}),
}


@pytest.mark.parametrize("kind", list(BAD_INPUT))
def test_bad_input_fails_before_training_with_one_clear_line(kind, shared_data, tmp_path, medseg):
    expected, sections = BAD_INPUT[kind]
    root = tmp_path / "data"
    bad_dataset(kind, shared_data, root)
    data = tiny_config(shared_data, tmp_path)
    data["data"] = {"root": str(root), "cache": str(tmp_path / "cache")}
    for key, value in sections.items():
        data[key] = {**data[key], **value}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(data))
    result = medseg("train", "--config", config)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "log.csv").exists()


# ------------------------------------------------------------------------------------ patch sampler
def synthetic_case(folder: Path) -> "CachedCase":
    """A 40^3 case: class 1 is a 2^3 cube (8 voxels), class 2 a 10^3 block (1000 voxels)."""
    from medseg_cli.training.data import CachedCase

    label = np.zeros((40, 40, 40), np.uint8)
    label[30:32, 5:7, 5:7] = 1
    label[5:15, 20:30, 20:30] = 2
    image = (label[None] * 10.0 + np.arange(40.0)[None, :, None, None]).astype(np.float32)  # image tracks z
    locations = np.concatenate([np.concatenate([np.full((n, 1), c), np.argwhere(label == c)], axis=1)
                                for c, n in ((1, 8), (2, 1000))]).astype(np.int32)
    case = CachedCase("synthetic", str(folder), label.shape, (1.0, 1.0, 1.0), (1, 2))
    np.save(case.path("image"), image)
    np.save(case.path("label"), label)
    np.save(case.path("locations"), locations)
    return case


def test_patch_sampler_oversamples_foreground_class_balanced(tmp_path):
    from medseg_cli.training.data import PatchDataset

    case = synthetic_case(tmp_path)
    assert isinstance(case.image(), np.memmap) and isinstance(case.label(), np.memmap)  # read memory-mapped

    def share(dataset, cls):
        return np.mean([(dataset.sample(i)[1] == cls).any() for i in range(len(dataset))])

    def make(**kwargs):
        return PatchDataset([case], (8, 8, 8), (2, 2, 2), 400, augmentation=None, seed=3, **kwargs)

    balanced = make(foreground_ratio=1.0, class_balanced=True)
    assert share(balanced, 1) > 0.45 and share(balanced, 2) > 0.45  # each class about half the patches
    by_voxel = make(foreground_ratio=1.0, class_balanced=False)
    assert share(by_voxel, 1) < 0.05 and share(by_voxel, 2) > 0.95  # voxel-uniform: the big class dominates
    third = make(foreground_ratio=1 / 3)
    uniform = make(foreground_ratio=0.0)
    fg = lambda d: np.mean([(d.sample(i)[1] > 0).any() for i in range(len(d))])  # noqa: E731
    assert fg(uniform) < 0.25 < fg(third) < 0.7

    image, label = balanced.sample(5)
    assert image.shape == (1, 12, 12, 12) and label.shape == (8, 8, 8) and label.dtype == np.int64
    # image and label are cut at the same place: image - 10 * label is the z index, the same in every column
    for i in range(20):
        image, label = balanced.sample(i)
        residual = image[0, 2:-2, 2:-2, 2:-2] - 10.0 * label
        assert np.all(residual == residual[:, :1, :1]) and np.all(np.diff(residual[:, 0, 0]) == 1.0)
    image, label = balanced.sample(5)
    np.testing.assert_array_equal(balanced.sample(5)[0], image)       # seeded by (seed, epoch, index)
    balanced.set_epoch(1)
    assert not np.array_equal(balanced.sample(5)[0], image)


def test_patch_sampler_pads_small_volumes(tmp_path):
    from medseg_cli.training.data import PatchDataset

    case = synthetic_case(tmp_path)
    dataset = PatchDataset([case], (48, 48, 48), (0, 0, 0), 4, foreground_ratio=1.0, seed=0)
    image, label = dataset[0]
    assert tuple(image.shape) == (1, 48, 48, 48) and tuple(label.shape) == (48, 48, 48)
    assert int((label == 2).sum()) == 1000 and int((label == 1).sum()) == 8  # the whole case fits in
