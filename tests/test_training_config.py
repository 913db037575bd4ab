"""Training configs: strict YAML -> dataclasses, clear errors, the shipped examples, case discovery and splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from medseg_cli.errors import InputError
from medseg_cli.training.config import DataConfig, config_from_dict, example_config, load_config
from medseg_cli.training.data import Case, find_cases, prepare_cache, split_cases
from medseg_cli.training.loop import build_for_training
from medseg_cli.zoo import list_models

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """An MSD-layout folder with five (empty) cases: enough for validation, which reads no pixels."""
    root = tmp_path / "ds"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(5):
        (root / "imagesTr" / f"case_{i:03d}_0000.nii.gz").touch()
        (root / "labelsTr" / f"case_{i:03d}.nii.gz").touch()
    return root


def minimal(root: Path, **sections) -> dict:
    data = {"labels": {0: "background", 1: "lesion"}, "data": {"root": str(root)},
            "model": {"name": "unet3d", "kwargs": {"init_features": 4}}, "training": {"patch_size": [16, 16, 16]}}
    for key, value in sections.items():
        if key in ("data", "training") and isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def error_of(data: dict, tmp_path: Path) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as info:
        load_config(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path))
    return text


# ------------------------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_config_is_valid(path: Path, dataset: Path):
    raw = yaml.safe_load(path.read_text())
    overrides = {}
    root = raw["data"].get("root")
    if root and not (path.parent / root).is_dir():  # the data is not shipped (BraTS, liver): validate the rest
        (dataset / raw["data"].get("images", "imagesTr")).mkdir(exist_ok=True)
        (dataset / raw["data"].get("labels", "labelsTr")).mkdir(exist_ok=True)
        overrides["data.root"] = str(dataset)
    config = load_config(path, overrides)
    assert config.source == str(path)
    assert config.name and config.licence is not None and config.training_data
    _, entry, output_patch, margin, input_patch = build_for_training(config)  # kwargs and patch fit the net
    assert len(output_patch) == 3 and all(i >= o for i, o in zip(input_patch, output_patch))
    if "data.root" not in overrides:  # real data in ../shared/data: the cases are found
        minimum = 1 if config.cascade is not None else 10  # configs/cascade_spleen.yaml: one training scan
        assert len(find_cases(config.data)) >= minimum


def test_default_model_config(shared_data):
    config = load_config(CONFIGS / "hippocampus.yaml")
    assert Path(config.data.root) == shared_data / "hippocampus"
    assert config.model.name == "unet3d" and config.num_classes == 3
    assert {int(k): v for k, v in config.labels.items()} == {0: "background", 1: "anterior", 2: "posterior"}
    train, val = split_cases(find_cases(config.data), config.data)
    assert (len(train), len(val)) == (166, 42) and val[0].name == "hippocampus_001"


@pytest.mark.parametrize("name", ["drive_unet2d", "ultrasound_attention_unet2d"])
def test_label_maps_of_png_datasets(name: str, tmp_path: Path):
    """DRIVE masks are 0 / 255, USGRA masks are RGB colours: label_map turns both into classes 0..K-1."""
    config = load_config(CONFIGS / f"{name}.yaml", {"data.max_cases": 2})
    cases = find_cases(config.data)
    cached = prepare_cache(cases, config.preprocessing, config.num_classes, tmp_path,
                           label_map=config.data.label_map, channels=config.data.channels)
    for case in cached:
        label = case.label()
        assert case.image().shape == (config.data.channels, *label.shape) and label.shape[0] == 1
        assert set(np.unique(label)) <= set(range(config.num_classes)) and label.max() >= 1
        assert case.classes_present == tuple(int(v) for v in np.unique(label) if v > 0)


# ------------------------------------------------------------------------------------- --print-config
@pytest.mark.parametrize("entry", list_models(), ids=lambda e: e.name)
def test_print_config_example_is_complete_and_valid(entry, dataset: Path):
    text = example_config(entry.name)
    assert text.startswith("#") and f"name: {entry.name}" in text
    data = yaml.safe_load(text)
    data["data"]["root"] = str(dataset)
    config = config_from_dict(data, source="example.yaml")
    # complete: every field of every section is spelled out
    for section in ("data", "training", "augmentation", "loss", "optimizer", "schedule"):
        names = {f.name for f in dataclasses.fields(getattr(config, section))}
        assert names == set(data[section]), section
    assert set(data["preprocessing"]) >= {"roi", "crop_to_roi", "target_spacing_zyx", "normalization"}
    build_for_training(config)


def test_print_config_cli(medseg):
    result = medseg("train", "--print-config", "unet3d")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["model"]["name"] == "unet3d"
    result = medseg("train", "--print-config", "unet3dd")
    assert result.returncode == 2 and "unknown architecture 'unet3dd'" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------- errors
def test_unknown_keys_list_the_known_ones(dataset: Path, tmp_path: Path):
    text = error_of(minimal(dataset, trainig={"epochs": 2}), tmp_path)
    assert "trainig: unknown key; known:" in text and "training" in text and "augmentation" in text
    text = error_of(minimal(dataset, training={"epoch": 2}), tmp_path)
    assert "training.epoch: unknown key" in text and "epochs" in text and "patch_size" in text
    text = error_of(minimal(dataset, loss={"hybrid": {"a": "dice", "b": "boundary", "stop": 0.1}}), tmp_path)
    assert "loss.hybrid.stop: unknown key" in text and "minimum" in text
    text = error_of(minimal(dataset, preprocessing={"normalisation": {"kind": "zscore"}}), tmp_path)
    assert "preprocessing" in text and "normalisation" in text


def test_wrong_types_name_the_key(dataset: Path, tmp_path: Path):
    text = error_of(minimal(dataset, training={"batch_size": "eight"}), tmp_path)
    assert "training.batch_size: expected int, got str 'eight'" in text
    text = error_of(minimal(dataset, training={"amp": "yes"}), tmp_path)
    assert "training.amp: expected bool" in text
    text = error_of(minimal(dataset, data={"root": str(dataset), "val_cases": "case_001"}), tmp_path)
    assert "data.val_cases: expected list or null" in text
    text = error_of(minimal(dataset, training=[1, 2]), tmp_path)
    assert "training: expected a mapping" in text
    # YAML 1.1 reads 1e-3 as a string: accepted for float keys
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(minimal(dataset)) + "optimizer: {lr: 1e-3}\n")
    assert load_config(path).optimizer.lr == pytest.approx(1e-3)


def test_missing_paths_and_bad_values(dataset: Path, tmp_path: Path):
    text = error_of(minimal(tmp_path / "nowhere"), tmp_path)
    assert "data.root: folder not found" in text
    text = error_of(minimal(dataset, data={"root": str(dataset), "cases_csv": "missing.csv"}), tmp_path)
    assert "data.cases_csv: file not found" in text
    checks = [
        (dict(model={"name": "unet3dd"}), "model.name: unknown architecture 'unet3dd'"),
        (dict(labels={0: "bg", 2: "x"}), "labels: must name the values 0..K-1"),
        (dict(data={"root": str(dataset), "val_every_nth": 5, "folds": 5}), "choose one validation split"),
        (dict(data={"root": str(dataset), "folds": 5, "fold": 5}), "data.fold"),
        (dict(loss={"terms": {"dcie": 1.0}}), "loss.terms.dcie: unknown loss term"),
        (dict(loss={"class_weights": [1.0]}), "loss.class_weights"),
        (dict(augmentation={"rotation_prob": 1.5}), "augmentation.rotation_prob: must lie between 0 and 1"),
        (dict(augmentation={"scale_range": [1.2, 0.8]}), "augmentation.scale_range"),
        (dict(training={"patch_size": [64, 64]}), "training.patch_size: unet3d is a 3D network"),
        (dict(optimizer={"name": "adamw"}), "optimizer.name: unknown optimiser"),
        (dict(schedule={"name": "cosine"}), "schedule.name: unknown schedule"),
        (dict(preprocessing={"normalization": {"kind": "zcore"}}), "preprocessing: unknown normalization kind"),
        (dict(data={"root": str(dataset), "label_map": {255: 7}}), "data.label_map"),
    ]
    for sections, expected in checks:
        assert expected in error_of(minimal(dataset, **sections), tmp_path), sections


def test_bad_patch_for_the_network_is_an_input_error(dataset: Path):
    config = config_from_dict(minimal(dataset, training={"patch_size": [20, 16, 16]}), source="cfg.yaml")
    with pytest.raises(InputError, match=r"training.patch_size: .*not a multiple of \(8, 8, 8\)"):
        build_for_training(config)
    config = config_from_dict(minimal(dataset, model={"name": "unet3d", "kwargs": {"init_featurs": 4}}),
                              source="cfg.yaml")
    with pytest.raises(InputError, match="init_featurs"):
        build_for_training(config)


def test_relative_paths_resolve_against_the_config(dataset: Path):
    (dataset / "sub").mkdir()
    path = dataset / "sub" / "cfg.yaml"
    path.write_text(yaml.safe_dump(minimal(Path(".."), output="../runs/x")))
    config = load_config(path, {"training.epochs": 3})
    assert config.data.root == str(dataset) and config.output == str(dataset / "runs" / "x")
    assert config.training.epochs == 3


def test_set_overrides_fill_null_sections_and_refuse_paths_through_values(dataset: Path):
    path = dataset / "cfg.yaml"
    path.write_text(yaml.safe_dump(minimal(dataset, loss=None)))
    config = load_config(path, {"loss.dice_batch": False})  # `loss: null` becomes a section
    assert config.loss.dice_batch is False
    with pytest.raises(InputError, match=r"cfg.yaml: --set training.epochs.x: training.epochs is a value"):
        load_config(path, {"training.epochs": 2, "training.epochs.x": 1})


# ----------------------------------------------------------------------------------- cases and splits
def test_find_cases_in_folders_and_csv(dataset: Path, tmp_path: Path):
    cases = find_cases(DataConfig(root=str(dataset)))
    assert [c.name for c in cases] == [f"case_{i:03d}" for i in range(5)]
    assert cases[0].images == (str(dataset / "imagesTr" / "case_000_0000.nii.gz"),)
    for i in range(5):
        (dataset / "imagesTr" / f"case_{i:03d}_0001.nii.gz").touch()
    assert len(find_cases(DataConfig(root=str(dataset), channels=2))[0].images) == 2
    with pytest.raises(InputError, match="channel files"):
        find_cases(DataConfig(root=str(dataset), channels=3))
    assert len(find_cases(DataConfig(root=str(dataset), channels=2, max_cases=2))) == 2
    (dataset / "imagesTr" / "orphan.nii.gz").touch()
    with pytest.raises(InputError, match="orphan.nii.gz has no label map"):
        find_cases(DataConfig(root=str(dataset), channels=2))

    csv = tmp_path / "cases.csv"
    csv.write_text("case,image,label\nb,ds/imagesTr/case_001_0000.nii.gz,ds/labelsTr/case_001.nii.gz\n"
                   "a,ds/imagesTr/case_000_0000.nii.gz,ds/labelsTr/case_000.nii.gz\n")
    cases = find_cases(DataConfig(cases_csv=str(csv)))
    assert [c.name for c in cases] == ["a", "b"] and Path(cases[0].label) == dataset / "labelsTr" / "case_000.nii.gz"
    csv.write_text("case,image,label\na,ds/imagesTr/nothere.nii.gz,ds/labelsTr/case_000.nii.gz\n")
    with pytest.raises(InputError, match="row 2 .*file not found"):
        find_cases(DataConfig(cases_csv=str(csv)))
    csv.write_text("case,image,label\n")
    with pytest.raises(InputError, match="empty dataset"):
        find_cases(DataConfig(cases_csv=str(csv)))


def test_splits_by_every_nth_fraction_list_and_fold():
    cases = [Case(f"c{i:02d}", (f"i{i}",), f"l{i}") for i in range(10)]
    names = lambda items: [c.name for c in items]  # noqa: E731
    train, val = split_cases(cases, DataConfig(val_every_nth=4))
    assert names(val) == ["c00", "c04", "c08"] and len(train) == 7
    train, val = split_cases(cases, DataConfig(val_fraction=0.3), seed=1)
    assert len(val) == 3 and not set(names(val)) & set(names(train))
    assert split_cases(cases, DataConfig(val_fraction=0.3), seed=1) == (train, val)     # seeded
    assert names(split_cases(cases, DataConfig(val_fraction=0.3), seed=2)[1]) != names(val)
    train, val = split_cases(cases, DataConfig(val_cases=["c03", "c07"]))
    assert names(val) == ["c03", "c07"] and len(train) == 8
    with pytest.raises(InputError, match="unknown case"):
        split_cases(cases, DataConfig(val_cases=["c99"]))
    folds = [names(split_cases(cases, DataConfig(folds=3, fold=k))[1]) for k in range(3)]
    assert sorted(sum(folds, [])) == names(cases)                                       # a partition
    assert [len(f) for f in folds] == [4, 3, 3]
    train, val = split_cases(cases, DataConfig())
    assert len(train) == 10 and val == []


# --------------------------------------------------------------------------- optimisers and schedules
def optimiser_for(dataset: Path, optimizer: dict, schedule: dict, total: int = 10):
    import torch

    from medseg_cli.training.loop import build_optimizer, build_scheduler

    config = config_from_dict(minimal(dataset, optimizer=optimizer, schedule=schedule), source="cfg.yaml")
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = build_optimizer(config, params)
    scheduler, when = build_scheduler(config, opt, total)
    return opt, scheduler, when


def test_optimisers_adam_sgd_momentum_rmsprop(dataset: Path):
    import torch

    opt, _, _ = optimiser_for(dataset, {"name": "adam", "lr": 0.002, "weight_decay": 1e-5}, {"name": "none"})
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 0.002 and opt.defaults["weight_decay"] == 1e-5
    opt, _, _ = optimiser_for(dataset, {"name": "SGD", "lr": 0.02, "momentum": 0.9, "nesterov": True}, {"name": "none"})
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    opt, _, _ = optimiser_for(dataset, {"name": "rmsprop", "lr": 1e-3, "momentum": 0.6, "alpha": 0.9, "eps": 1e-4},
                              {"name": "none"})
    assert type(opt) is torch.optim.RMSprop
    assert (opt.defaults["momentum"], opt.defaults["alpha"], opt.defaults["eps"]) == (0.6, 0.9, 1e-4)


def test_schedules_poly_exponential_plateau(dataset: Path):
    # poly, per iteration: lr * (1 - it / total) ** power
    opt, scheduler, when = optimiser_for(dataset, {"lr": 0.01}, {"name": "poly", "power": 0.9}, total=10)
    assert when == "iteration"
    for it in range(1, 6):
        opt.step()
        scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - it / 10) ** 0.9)
    # exponential, per epoch: lr * gamma ** epoch
    opt, scheduler, when = optimiser_for(dataset, {"lr": 0.01}, {"name": "exponential", "gamma": 0.92})
    assert when == "epoch"
    for epoch in range(1, 4):
        opt.step()
        scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.92 ** epoch)
    # reduce on plateau of the validation Dice (higher is better): lr * factor after `patience` flat validations
    opt, scheduler, when = optimiser_for(dataset, {"lr": 0.01}, {"name": "plateau", "factor": 0.5, "patience": 2})
    assert when == "validation"
    lrs = []
    for dice in (0.5, 0.6, 0.6, 0.6, 0.59, 0.7):
        opt.step()
        scheduler.step(dice)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.005, 0.005])
    opt, scheduler, when = optimiser_for(dataset, {"lr": 0.01}, {"name": "none"})
    assert scheduler is None and when == "none"


def test_config_is_frozen(dataset: Path):
    config = config_from_dict(minimal(dataset), source="cfg.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training.epochs = 3  # type: ignore[misc]


def test_channel_suffixed_cases_are_cached_in_channel_order(shared_data: Path, tmp_path: Path):
    """CASE_0000 / CASE_0001 become channels 0 / 1 of the cached (C, Z, Y, X) array."""
    import SimpleITK as sitk

    source = shared_data / "hippocampus"
    image = sitk.ReadImage(str(source / "imagesTr" / "hippocampus_001.nii.gz"))
    flipped = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :, ::-1].copy())
    flipped.CopyInformation(image)
    root = tmp_path / "two"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    sitk.WriteImage(image, str(root / "imagesTr" / "case_0000.nii.gz"))
    sitk.WriteImage(flipped, str(root / "imagesTr" / "case_0001.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(source / "labelsTr" / "hippocampus_001.nii.gz")),
                    str(root / "labelsTr" / "case.nii.gz"))
    cases = find_cases(DataConfig(root=str(root), channels=2))
    cached = prepare_cache(cases, {"normalization": {"kind": "zscore"}}, 3, tmp_path / "cache", channels=2)
    array = cached[0].image()
    assert array.shape == (2, *cached[0].label().shape)
    np.testing.assert_allclose(array[1], array[0][:, :, ::-1], atol=1e-5)
    assert not np.allclose(array[1], array[0])
    with pytest.raises(InputError, match="image has 1 channel.*data.channels = 2"):
        prepare_cache(find_cases(DataConfig(root=str(shared_data / "hippocampus"), max_cases=1)),
                      {"normalization": {"kind": "zscore"}}, 3, tmp_path / "cache1", channels=2)
    # a bad case after a good one: the half-written cache folder is removed
    good = cases[0]
    bad = Case("zz_bad", good.images, str(root / "imagesTr" / "case_0001.nii.gz"))  # an image as label map
    with pytest.raises(InputError, match=r"case_0001.nii.gz: label values \[3, 4"):
        prepare_cache([good, bad], {"normalization": {"kind": "zscore"}}, 3, tmp_path / "cache2", channels=2)
    assert list((tmp_path / "cache2").iterdir()) == []
