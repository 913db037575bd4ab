"""The 2D pipeline on real pictures: colour masks <-> labels, colour <-> grey input, a tiny 2D training
on real ultrasound images whose exported model `medseg predict` runs on PNGs, clear errors for bad colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from medseg_cli.errors import InputError
from medseg_cli.imaging import Geometry, Image, match_planar_channels, read_image, write_image
from medseg_cli.labelmaps import colors_to_labels, labels_to_colors, read_label_map
from medseg_cli.training.data import map_label_values

US_TABLE = {0: [0, 0, 0], 1: [128, 0, 0], 2: [0, 128, 0]}          # background, nerve, vessel
US_LABEL_MAP = {"0,0,0": 0, "128,0,0": 1, "0,128,0": 2}            # the same table as data.label_map
# a few real USGRA training cases: grey 512x512 PNGs and near-grey RGB 534x512 PNGs (colour -> grey)
US_CASES = ("0000", "0001", "0002", "0003", "0040", "0042")


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    p, g = a == label, b == label
    return float(2 * np.logical_and(p, g).sum() / max(p.sum() + g.sum(), 1))


# ------------------------------------------------------------------------- colour masks <-> labels
def test_colour_masks_round_trip_through_labels(shared_data, tmp_path):
    mask_path = shared_data / "ultrasound" / "masks" / "0000.png"
    colours = read_image(mask_path)
    assert colours.num_channels == 3 and colours.is_planar
    labels = read_label_map(str(mask_path), US_TABLE)
    assert labels.spatial_shape == colours.spatial_shape and labels.geometry == colours.geometry
    assert set(np.unique(labels.array).tolist()) == {0, 1, 2}                 # nerve and vessel present
    # the training loader's data.label_map gives exactly the same labels as the colour table
    assert np.array_equal(map_label_values(colours.array, US_LABEL_MAP, str(mask_path)), labels.array)
    # labels -> colours gives the original mask back, also through a PNG file on disk
    back = labels_to_colors(labels.array, US_TABLE)
    assert back.dtype == np.uint8 and np.array_equal(back, colours.channels())
    written = write_image(Image(back, labels.geometry), tmp_path / "mask.png")
    again = read_label_map(str(written), US_TABLE)
    assert np.array_equal(again.array, labels.array) and again.geometry == labels.geometry
    # a grey 0 / 255 mask (DRIVE vessels) with a one-value table
    drive = read_image(shared_data / "drive" / "training" / "1st_manual" / "21_manual1.png")
    vessels = colors_to_labels(drive.channels(), {0: [0], 1: [255]})              # (C=1, Z, Y, X) -> (Z, Y, X)
    assert vessels.shape == drive.array.shape and 0.05 < vessels.mean() < 0.2
    assert np.array_equal(map_label_values(drive.array, {0: 0, 255: 1}, "21_manual1.png"), vessels)


def test_a_colour_not_in_the_table_is_a_clear_error(shared_data, tmp_path):
    colours = read_image(shared_data / "ultrasound" / "masks" / "0000.png").channels().copy()
    colours[:, 0, 10:12, 20:23] = np.array([0, 0, 128], np.uint8)[:, None, None]   # 6 blue pixels
    bad = write_image(Image(colours), tmp_path / "bad_mask.png")
    with pytest.raises(InputError) as info:
        read_label_map(str(bad), US_TABLE)
    message = str(info.value)
    assert "[0, 0, 128]" in message and "6 pixels" in message and "(0, 10, 20)" in message
    assert str(bad) in message
    with pytest.raises(InputError, match=r"label values \['0,0,128'\] are not in data.label_map") as info:
        map_label_values(colours, US_LABEL_MAP, str(bad))
    assert str(bad) in str(info.value)
    with pytest.raises(InputError, match="3 colour channels"):
        read_label_map(str(bad))                                             # colours need a table


def test_colour_and_grey_pictures_convert_for_the_model(shared_data):
    rgb = read_image(shared_data / "drive" / "training" / "images" / "21_training.png")
    grey = match_planar_channels(rgb, 1)
    assert not grey.has_channels and grey.spatial_shape == rgb.spatial_shape and grey.geometry == rgb.geometry
    r, g, b = rgb.channels().astype(np.float64)
    assert np.allclose(grey.array, 0.299 * r + 0.587 * g + 0.114 * b, atol=1e-3)
    three = match_planar_channels(grey, 3)
    assert three.num_channels == 3 and np.array_equal(three.array[0], three.array[2])
    assert match_planar_channels(rgb, 3) is rgb                               # nothing to do
    volume = Image(np.zeros((2, 4, 5, 6), np.float32))                        # 3D data is never converted
    assert match_planar_channels(volume, 1) is volume


# ------------------------------------------------------------------------------- train -> predict
def tiny_us_config(shared_data: Path, tmp_path: Path, *, mask_folder: Path | None = None) -> dict:
    rows = ["case,image,label"]
    for case in US_CASES:
        mask = (mask_folder or shared_data / "ultrasound" / "masks") / f"{case}.png"
        rows.append(f"us_{case},{shared_data / 'ultrasound' / 'images' / f'{case}.png'},{mask}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    return {
        "name": "tiny-ultrasound", "licence": "CC-BY-4.0", "training_data": "6 USGRA images",
        "labels": {0: "background", 1: "nerve", 2: "vessel"}, "channel_names": ["US"],
        "data": {"cases_csv": str(tmp_path / "cases.csv"), "channels": 1, "val_cases": ["us_0003"],
                 "label_map": US_LABEL_MAP, "cache": str(tmp_path / "cache")},
        "preprocessing": {"target_spacing_zyx": [1.0, 8.0, 8.0], "normalization": {"kind": "zscore"}},
        "model": {"name": "attention_unet2d", "kwargs": {"base_width": 8}},
        "training": {"patch_size": [1, 64, 64], "batch_size": 4, "epochs": 15, "iterations_per_epoch": 10,
                     "val_every": 5, "num_workers": 0, "threads": 1},
        "augmentation": {"flip_prob": 0.0},
        "optimizer": {"name": "adam", "lr": 0.003},
        "seed": 0,
        "output": str(tmp_path / "run"),
    }


def test_tiny_2d_training_on_ultrasound_exports_a_model_that_predicts_pngs(shared_data, tmp_path, medseg):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_us_config(shared_data, tmp_path)))
    result = medseg("train", "--config", config, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["epochs_done"] == 15 and set(summary["validation_dice"]) == {"nerve", "vessel"}
    model = tmp_path / "run" / "model.onnx"
    from medseg_cli.card import read_card_from_onnx

    card = read_card_from_onnx(model)
    assert card.spatial_dims == 2 and card.in_channels == 1 and card.input_patch == [64, 64]
    assert card.labels == {"0": "background", "1": "nerve", "2": "vessel"}

    # a grey 512x512 training picture and a colour 534x512 one: masks on each input's exact grid
    nerve_dice = []
    for case in ("0000", "0040"):
        scan = shared_data / "ultrasound" / "images" / f"{case}.png"
        out = tmp_path / f"pred_{case}.png"
        result = medseg("predict", "--model", model, scan, "-o", out, "--quiet")
        assert result.returncode == 0, result.stderr
        source, mask = sitk.ReadImage(str(scan)), sitk.ReadImage(str(out))
        assert mask.GetSize() == source.GetSize() and mask.GetNumberOfComponentsPerPixel() == 1
        assert mask.GetSpacing() == source.GetSpacing() and mask.GetOrigin() == source.GetOrigin()
        predicted = sitk.GetArrayFromImage(mask)
        assert set(np.unique(predicted).tolist()) <= {0, 1, 2}
        truth = read_label_map(str(shared_data / "ultrasound" / "masks" / f"{case}.png"), US_TABLE).array[0]
        nerve_dice.append(dice(predicted, truth, 1))
    # 150 steps of a width-8 net on 5 pictures at 1/8 resolution: chance (the nerve covers ~4 % of the
    # picture) gives ~0.05; measured 0.32-0.33 and 0.65-0.70
    assert np.mean(nerve_dice) > 0.3, nerve_dice

    # a single-slice NIfTI of the same picture: the same labels, on the NIfTI's own grid
    picture = read_image(shared_data / "ultrasound" / "images" / "0000.png")
    moved = Geometry(spacing=(1.0, 1.0, 2.5), origin=(5.0, -3.0, 7.0))     # in-plane pixels as in the PNG
    nifti = write_image(Image(picture.array, moved), tmp_path / "slice.nii.gz")
    result = medseg("predict", "--model", model, nifti, "-o", tmp_path / "slice_mask.nii.gz", "--quiet")
    assert result.returncode == 0, result.stderr
    source, mask = sitk.ReadImage(str(nifti)), sitk.ReadImage(str(tmp_path / "slice_mask.nii.gz"))
    assert mask.GetSize() == source.GetSize() == (512, 512, 1)
    assert mask.GetSpacing() == source.GetSpacing() and mask.GetOrigin() == source.GetOrigin()
    png_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred_0000.png")))
    assert np.array_equal(sitk.GetArrayFromImage(mask)[0], png_labels)


def test_a_mask_colour_outside_the_label_map_stops_training_before_it_starts(shared_data, tmp_path, medseg):
    masks = tmp_path / "masks"
    masks.mkdir()
    for case in US_CASES:
        colours = read_image(shared_data / "ultrasound" / "masks" / f"{case}.png")
        array = colours.channels().copy()
        if case == "0002":
            array[:, 0, 5, 7] = (255, 255, 255)                            # one stray white pixel
        write_image(Image(array, colours.geometry), masks / f"{case}.png")
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_us_config(shared_data, tmp_path, mask_folder=masks)))
    result = medseg("train", "--config", config)
    assert result.returncode == 2, result.stderr
    assert "255,255,255" in result.stderr and "0002.png" in result.stderr and "data.label_map" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


# -------------------------------------------------------------------------- the packaged 2D models
def test_packaged_ultrasound_model_segments_real_test_images(shared_data, tmp_path, medseg, medseg_home):
    """ultrasound-nerves on two held-out USGRA test pictures (one grey, one colour): real Dice."""
    scores = []
    for case in ("0004", "0009"):
        out = tmp_path / f"{case}.png"
        result = medseg("predict", "--model", "ultrasound-nerves", "--offline",
                        shared_data / "ultrasound" / "test" / "images" / f"{case}.png", "-o", out, "--quiet")
        assert result.returncode == 0, result.stderr
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        truth = read_label_map(str(shared_data / "ultrasound" / "test" / "masks" / f"{case}.png"), US_TABLE)
        assert predicted.shape == truth.array.shape[1:]
        scores.append((dice(predicted, truth.array[0], 1), dice(predicted, truth.array[0], 2)))
    nerve, vessel = np.mean(scores, axis=0)
    # measured 0.669 / 0.684 (nerve) and 0.671 / 0.897 (vessel); chance is below 0.1
    assert nerve > 0.5 and vessel > 0.5, scores


def test_packaged_retina_model_segments_a_drive_test_image_as_a_png_cohort(shared_data, tmp_path, medseg,
                                                                          medseg_home):
    """retina-vessels on a DRIVE test picture given as a folder (a one-file colour PNG cohort), scored
    inside the field-of-view mask with `medseg eval --fov-mask`."""
    images, refs, fovs = (tmp_path / n for n in ("images", "refs", "fov"))
    for folder in (images, refs, fovs):
        folder.mkdir()
    drive = shared_data / "drive" / "test"
    (images / "01_test.png").symlink_to(drive / "images" / "01_test.png")
    (fovs / "01_test.png").symlink_to(drive / "mask" / "01_test_mask.png")
    manual = read_label_map(str(drive / "1st_manual" / "01_manual1.png"), {0: [0], 1: [255]})
    write_image(manual, refs / "01_test.png", label=True)
    result = medseg("predict", "--model", "retina-vessels", "--offline", images, "-o", tmp_path / "pred",
                    "--format", ".png", "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pred" / "01_test.png").is_file()
    result = medseg("eval", tmp_path / "pred", refs, "--fov-mask", fovs, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    vessel = next(iter(report["summary"].values()))["metrics"]
    # measured 0.80 Dice inside the field of view (the whole DRIVE test set: 0.804 +- 0.019)
    assert vessel["dice"]["mean"] > 0.7 and report["multiclass"]["miou"] > 0.7, report["multiclass"]
