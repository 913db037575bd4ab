"""`medseg train` with a `cascade:` section: both stages from one config, the card, predict with it, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import SimpleITK as sitk
import yaml

from medseg_cli.card import read_card_from_onnx
from medseg_cli.errors import InputError
from medseg_cli.imaging import read_image
from medseg_cli.inference.cascade import CascadeSpec
from medseg_cli.training.config import config_from_dict

from test_cascade import stages  # noqa: F401  (fixture: known-weight locator and segmenter)

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]  # the first 3 cases by name


def tiny_cascade(shared_data: Path, tmp_path: Path, **cascade) -> dict:
    """3 real hippocampus cases, tiny networks, a few iterations, one thread, no validation."""
    return {
        "name": "tiny-cascade",
        "labels": {0: "background", 1: "anterior", 2: "posterior"},
        "data": {"root": str(shared_data / "hippocampus"), "max_cases": 3},
        "preprocessing": {"normalization": {"kind": "zscore"}},
        "model": {"name": "unet3d", "kwargs": {"init_features": 4, "num_levels": 2}},
        "training": {"patch_size": [16, 16, 16], "batch_size": 2, "epochs": 1, "iterations_per_epoch": 2,
                     "num_workers": 0, "threads": 1},
        "augmentation": {"flip_prob": 0.0},
        "output": str(tmp_path / "run"),
        "cascade": {"locator": {"name": "unet3d", "kwargs": {"init_features": 4, "num_levels": 2},
                                "training": {"patch_size": [8, 16, 8], "epochs": 2}},
                    "downscale": 2, "margin_mm": 4.0, **cascade},
    }


def test_one_config_trains_both_stages_and_predict_runs_the_card(shared_data, tmp_path, medseg):
    config = tmp_path / "cascade.yaml"
    config.write_text(yaml.safe_dump(tiny_cascade(shared_data, tmp_path)))
    done = medseg("train", "--config", config, "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    run = tmp_path / "run"
    card_path = run / "tiny-cascade.cascade.json"
    assert summary["cascade"] == str(card_path) and not summary["stopped_early"]
    assert summary["stages"]["locator"]["epochs_done"] == 2 and summary["stages"]["segmenter"]["epochs_done"] == 1

    # the card is what inference/cascade.py reads; both stages are real ONNX files with their cards
    spec = CascadeSpec.load(card_path)
    assert spec.locator_downscale == (2.0, 2.0, 2.0) and spec.margin_mm == (4.0, 4.0, 4.0)
    locator, segmenter = Path(spec.stage_path("locator")), Path(spec.stage_path("segmenter"))
    assert locator == run / "locator" / "model.onnx" and segmenter == run / "segmenter" / "model.onnx"
    for path in (locator, segmenter):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert read_card_from_onnx(locator).labels == {"0": "background", "1": "target"}
    assert read_card_from_onnx(segmenter).labels == {"0": "background", "1": "anterior", "2": "posterior"}

    # the locator learnt on the scans at twice the spacing, with a binary target
    original = read_image(shared_data / "hippocampus" / "imagesTr" / f"{CASES[0]}.nii.gz")
    reference = read_image(shared_data / "hippocampus" / "labelsTr" / f"{CASES[0]}.nii.gz").array
    small = read_image(run / "data" / "locator" / f"{CASES[0]}_0000.nii.gz")
    np.testing.assert_allclose(small.geometry.spacing_zyx, [2 * s for s in original.geometry.spacing_zyx])
    assert set(np.unique(read_image(run / "data" / "locator" / f"{CASES[0]}_label.nii.gz").array)) == {0, 1}
    # the segmenter learnt on full-resolution crops holding the whole target plus the 4 mm margin
    crop = read_image(run / "data" / "segmenter" / f"{CASES[0]}_label.nii.gz")
    np.testing.assert_allclose(crop.geometry.spacing_zyx, original.geometry.spacing_zyx)
    assert np.prod(crop.spatial_shape) < np.prod(original.spatial_shape)
    assert np.array_equal(np.bincount(crop.array.ravel().astype(int), minlength=3)[1:],
                          np.bincount(reference.ravel().astype(int), minlength=3)[1:])

    # medseg predict with the card: a mask on the input's exact grid
    scan = shared_data / "hippocampus" / "imagesTr" / "hippocampus_006.nii.gz"
    out = tmp_path / "mask.nii.gz"
    done = medseg("predict", scan, "-o", out, "--model", card_path, "--device", "cpu", "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(scan))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2}

    # --resume after a finished run: both stages are skipped, their checkpoints untouched
    stamp = (run / "segmenter" / "last.pt").stat().st_mtime_ns
    done = medseg("train", "--config", config, "--device", "cpu", "--resume")
    assert done.returncode == 0, done.stderr
    assert "locator already trained" in done.stderr and "segmenter already trained" in done.stderr
    assert (run / "segmenter" / "last.pt").stat().st_mtime_ns == stamp and card_path.is_file()


@pytest.mark.parametrize("cascade, message", [
    ({"margin_mm": -1}, "cascade.margin_mm: must be >= 0"),
    ({"marginmm": 3}, "cascade.marginmm: unknown key; known: locator, downscale, spacing_mm"),
    ({"downscale": 0.5}, "cascade.downscale: must be >= 1"),
    ({"spacing_mm": [4, 4, 4]}, "give cascade.downscale or cascade.spacing_mm, not both"),
    ({"margin_mm": [1, 2]}, "cascade.margin_mm: must be one number or three"),
    ({"target_labels": [3]}, "cascade.target_labels: [3] are not foreground labels 1..2"),
    ({"on_empty": "skip"}, "cascade.on_empty: must be 'whole' or 'error'"),
    ({"locator": {"name": "unet3dd"}}, "cascade.locator.name: unknown architecture 'unet3dd'"),
    ({"locator": {"name": "unet2d_bn"}}, "cascade.locator.name: a cascade needs 3D networks"),
    ({"locator": {"training": {"epoch": 3}}}, "cascade.locator.training.epoch: unknown key"),
    ({"locator": {"training": {"epochs": 0}}}, "cascade.locator.training.epochs: must be >= 1"),
])
def test_bad_cascade_sections_are_input_errors(shared_data, tmp_path, cascade, message):
    data = tiny_cascade(shared_data, tmp_path, **cascade)
    with pytest.raises(InputError) as caught:
        config_from_dict(data, source="cfg.yaml")
    assert message in str(caught.value) and str(caught.value).startswith("cfg.yaml: ")


def test_bad_cascade_section_on_the_command_line_exits_2_with_one_line(shared_data, tmp_path, medseg):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(tiny_cascade(shared_data, tmp_path, margin_mm=-2.0)))
    done = medseg("train", "--config", config)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "cascade.margin_mm: must be >= 0" in done.stderr
    assert not (tmp_path / "run").exists()


def test_print_config_documents_the_cascade_section(medseg):
    done = medseg("train", "--print-config", "unet3d")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["cascade"] is None
    for key in ("locator:", "downscale:", "spacing_mm:", "target_labels:", "margin_mm:", "on_empty:"):
        assert f"#  {key}" in done.stdout or f"#    {key}" in done.stdout, key


def test_keep_largest_ignores_stray_locator_hits(stages):
    """With locator_keep_largest the box holds the largest located blob only (+ margin), not a stray one."""
    from test_cascade import cascade_for, scan_with_blob  # noqa: PLC0415

    image = scan_with_blob()
    image.array[10:12, 34:37, 38:42] = 1.0  # a small second bright blob far from the target
    wide = cascade_for(stages)
    wide.predict(image)
    keep = cascade_for(stages, locator_keep_largest=True)
    result = keep.predict(image)
    assert wide.last_step.box[2].stop >= 42 and keep.last_step.box[2].stop < 38
    assert keep.last_step.box[0].start <= 5 - 2 and keep.last_step.box[1].start <= 18 - 3
    assert not result.labels.array[10:12, 34:37, 38:42].any() and (result.labels.array[5:8, 18:26, 20:27] == 2).all()
    assert CascadeSpec.load(keep.spec.folder / "c.cascade.json").to_dict()["locator_keep_largest"] is True
