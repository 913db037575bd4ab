"""Locator -> segmenter cascade: margin in mm per axis, low-res box -> full-res box, crop / paste-back
geometry (anisotropic spacing, oblique direction), empty locator output (fallback or error), boxes
outside the image, and `medseg predict` with a cascade card, all with real ONNX Runtime sessions on
known-weight 1x1-conv networks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from medseg_cli.errors import MedsegWarning, ModelError, ProcessingError
from medseg_cli.imaging import Geometry, Image, read_image, to_sitk, write_image
from medseg_cli.inference.cascade import (CascadePredictor, CascadeSpec, clip_box, crop_geometry, crop_image,
                                          is_cascade_path, load_cascade, low_box_to_full, margin_voxels,
                                          paste_labels)
from medseg_cli.inference.predictor import Predictor
from medseg_cli.inference.runners import OnnxRunner

from test_runners import conv1x1_model, export_tiny_onnx, make_card

torch.set_num_threads(1)

OBLIQUE = tuple(Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix().ravel())
SPACING_XYZ = (0.7, 1.1, 2.5)  # array (z, y, x) spacing = (2.5, 1.1, 0.7) mm
NONE_PRE = {"roi": "none", "normalization": {"kind": "none"}}


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """A locator (voxel > 0.5 -> label 1) and a segmenter (1 -> posterior, -1 -> anterior, 0 -> background)."""
    folder = tmp_path_factory.mktemp("cascade")
    locator = conv1x1_model(1, 2, seed=1)
    with torch.no_grad():
        locator.weight.copy_(torch.tensor([0.0, 10.0]).reshape(2, 1, 1, 1, 1))
        locator.bias.copy_(torch.tensor([0.0, -5.0]))
    segmenter = conv1x1_model(1, 3, seed=2)
    with torch.no_grad():
        segmenter.weight.copy_(torch.tensor([0.0, -3.0, 3.0]).reshape(3, 1, 1, 1, 1))
        segmenter.bias.copy_(torch.tensor([1.5, 0.0, 0.0]))
    paths = {
        "locator": export_tiny_onnx(locator, make_card(num_classes=2, input_patch=(8, 8, 8), preprocessing=NONE_PRE)
                                    .with_updates(name="loc"), folder / "locator.onnx"),
        "segmenter": export_tiny_onnx(segmenter, make_card(num_classes=3, input_patch=(8, 16, 16),
                                                           preprocessing=NONE_PRE).with_updates(name="seg"),
                                      folder / "segmenter.onnx"),
    }
    return paths


def write_card(folder: Path, name: str = "c.cascade.json", **changes) -> Path:
    data = {"medseg_cascade": 1, "name": "test-cascade", "locator": "locator.onnx", "segmenter": "segmenter.onnx",
            "locator_downscale": [1, 2, 2], "margin_mm": 3.0, **changes}
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def cascade_for(stages: dict, **changes) -> CascadePredictor:
    card = write_card(stages["locator"].parent, **changes)
    return CascadePredictor(load_cascade(card, device="cpu", threads=1))


def scan_with_blob(shape=(12, 40, 44), blob=(slice(5, 8), slice(18, 26), slice(20, 27)),
                   geometry=Geometry(SPACING_XYZ, (-12.0, 30.5, 7.25), OBLIQUE)) -> Image:
    """Zeros, a bright box of ones (the target), and a dark spot of -1 far away (a false anterior)."""
    array = np.zeros(shape, dtype=np.float32)
    array[blob] = 1.0
    array[1:3, 2:5, 2:5] = -1.0
    return Image(array, geometry, "scan.nii.gz")


# ------------------------------------------------------------------------------------ pure geometry

def test_margin_in_mm_converts_per_axis_with_anisotropic_spacing():
    assert margin_voxels((5.0, 5.0, 5.0), (2.5, 0.7, 1.0)) == (2, 8, 5)
    assert margin_voxels((0.0, 1.0, 2.0), (3.0, 1.0, 0.9)) == (0, 1, 3)  # exact multiples do not round up
    spec = CascadeSpec.from_dict({"medseg_cascade": 1, "name": "c", "locator": "a", "segmenter": "b",
                                  "margin_mm": [4, 2, 1]})
    assert spec.margin_mm == (4.0, 2.0, 1.0) and spec.on_empty == "whole"


def test_low_resolution_box_covers_every_touched_full_voxel():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ratio = float(rng.uniform(1.0, 4.0))
        a = int(rng.integers(0, 10))
        b = a + int(rng.integers(1, 6))
        (got,) = low_box_to_full([slice(a, b)], [ratio], [1.0])
        low, high = (a - 0.5) * ratio, (b - 0.5) * ratio  # continuous full-index span of the low voxels
        touched = [i for i in range(-5, 60) if i + 0.5 > low + 1e-9 and i - 0.5 < high - 1e-9]
        assert (got.start, got.stop) == (touched[0], touched[-1] + 1), (ratio, a, b)


def test_crop_and_paste_back_keep_world_geometry_exact():
    image = scan_with_blob()
    box = (slice(3, 10), slice(11, 33), slice(5, 40))
    crop = crop_image(image, box)
    full_itk, crop_itk = to_sitk(image), to_sitk(crop)
    for index_zyx in [(0, 0, 0), (6, 21, 34), (2, 7, 30)]:
        z, y, x = index_zyx
        world_crop = crop_itk.TransformIndexToPhysicalPoint((x, y, z))
        world_full = full_itk.TransformIndexToPhysicalPoint((x + box[2].start, y + box[1].start, z + box[0].start))
        np.testing.assert_allclose(world_crop, world_full, atol=1e-9)
    assert crop.geometry.spacing == image.geometry.spacing and crop.geometry.direction == image.geometry.direction
    labels = Image((crop.array > 0.5).astype(np.uint8), crop.geometry, "seg")
    pasted = paste_labels(labels, box, image.spatial_shape, image.geometry)
    assert pasted.geometry == image.geometry and pasted.spatial_shape == image.spatial_shape
    np.testing.assert_array_equal(pasted.array, (image.array > 0.5).astype(np.uint8))  # the blob lies in the box
    moved = Image(labels.array, crop_geometry(image.geometry, (slice(4, 11),) + box[1:]), "seg")
    with pytest.raises(ProcessingError, match="does not sit at box"):
        paste_labels(moved, box, image.spatial_shape, image.geometry)


def test_a_box_outside_the_image_is_a_clear_error():
    with pytest.raises(ProcessingError, match=r"crop box \[20:25, 0:4, 0:4\] lies outside"):
        clip_box((slice(20, 25), slice(0, 4), slice(0, 4)), (12, 40, 44), source="scan.nii.gz")
    assert clip_box((slice(-3, 5), slice(30, 60), slice(0, 44)), (12, 40, 44)) == (
        slice(0, 5), slice(30, 40), slice(0, 44))
    with pytest.raises(ProcessingError, match="not inside"):
        crop_image(scan_with_blob(), (slice(0, 5), slice(35, 45), slice(0, 4)))


def test_bad_cascade_cards_are_model_errors(tmp_path):
    for changes, words in [({"on_empty": "guess"}, "on_empty"), ({"margin_mm": [1, 2]}, "margin_mm"),
                           ({"locator_downscale": 0.5}, ">= 1"), ({"extra": 1}, "unknown keys"),
                           ({"medseg_cascade": 7}, "medseg_cascade")]:
        with pytest.raises(ModelError, match=words):
            CascadeSpec.load(write_card(tmp_path, **changes))
    (tmp_path / "broken.cascade.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        CascadeSpec.load(tmp_path / "broken.cascade.json")
    assert is_cascade_path("a/b.CASCADE.json") and not is_cascade_path("b.onnx") and not is_cascade_path(None)


# ------------------------------------------------------------------------------------ both stages

def test_cascade_equals_whole_volume_segmenter_inside_the_box(stages):
    image = scan_with_blob()
    predictor = cascade_for(stages)
    result = predictor.predict(image, probabilities=True)
    box = predictor.last_step.box
    assert not predictor.last_step.fallback
    margin = margin_voxels((3.0,) * 3, image.geometry.spacing_zyx)  # (2, 3, 5)
    blob = (slice(5, 8), slice(18, 26), slice(20, 27))
    for part, target, m in zip(box, blob, margin):  # the blob plus at least the margin, at most one low voxel more
        assert part.start <= target.start - m and part.stop >= target.stop + m
        assert part.start >= target.start - m - 3 and part.stop <= target.stop + m + 3
    whole = Predictor(OnnxRunner(stages["segmenter"], device="cpu", threads=1)).predict(image, probabilities=True)
    assert result.labels.geometry == image.geometry and result.labels.spatial_shape == image.spatial_shape
    np.testing.assert_array_equal(result.labels.array[box], whole.labels.array[box])
    outside = np.ones(image.spatial_shape, bool)
    outside[box] = False
    assert not result.labels.array[outside].any() and whole.labels.array[outside].any()  # the dark spot is cut
    np.testing.assert_array_equal(result.labels.array == 2, image.array == 1.0)
    np.testing.assert_allclose(result.probabilities.array.sum(0), 1.0, atol=1e-5)
    assert result.labels.info["cascade_box"] == [[b.start, b.stop] for b in box]
    assert result.volumes["organ2"] == pytest.approx(3 * 8 * 7 * np.prod(SPACING_XYZ))


def test_empty_locator_output_falls_back_to_the_whole_scan_or_errors(stages):
    image = Image(np.where(np.arange(12 * 40 * 44).reshape(12, 40, 44) % 7 == 0, -1.0, 0.0).astype(np.float32),
                  Geometry(SPACING_XYZ), "dark.nii.gz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cascade_for(stages).predict(image)
    assert any(isinstance(w.message, MedsegWarning) and "segmenting the whole scan" in str(w.message) for w in caught)
    whole = Predictor(OnnxRunner(stages["segmenter"], device="cpu", threads=1)).predict(image)
    np.testing.assert_array_equal(result.labels.array, whole.labels.array)
    assert result.labels.info["cascade_fallback"] is True
    with pytest.raises(ProcessingError, match="found no target"):
        cascade_for(stages, on_empty="error").predict(image)


def test_predict_cli_runs_both_stages_and_keeps_the_grid(medseg, stages, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    write_image(scan_with_blob(), scan)
    card = write_card(stages["locator"].parent, name="cli.cascade.json")
    out = tmp_path / "mask.nii.gz"
    done = medseg("predict", scan, "-o", out, "--model", card, "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == "test-cascade"
    written, original = sitk.ReadImage(str(out)), sitk.ReadImage(str(scan))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written) == 2, read_image(scan).array == 1.0)
    missing = write_card(stages["locator"].parent, name="bad.cascade.json", segmenter="nowhere.onnx")
    done = medseg("predict", scan, "-o", tmp_path / "m2.nii.gz", "--model", missing)
    assert done.returncode == 3 and "nowhere.onnx" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "m2.nii.gz").exists()
