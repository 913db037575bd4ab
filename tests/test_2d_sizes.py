"""Label sizes of 2D pictures: an area, never a volume. In pixels for formats that store no physical
pixel size (PNG/JPEG/TIFF), in mm² for those that do (NIfTI, MetaImage, ...); 3D keeps mm³ / mL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg_cli.imaging import Geometry, Image, write_image

from test_runners import export_tiny_onnx, make_card

torch.set_num_threads(1)

SPACING = (0.5, 0.7)  # mm per pixel (x, y) of the 2D MetaImage / NIfTI pictures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    net = torch.nn.Conv2d(1, 3, 1)  # known weights: dark pixels -> 2, middle -> 0, bright -> 1
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.0, 8.0, -8.0]).reshape(3, 1, 1, 1))
        net.bias.copy_(torch.tensor([0.0, -2.0, -2.0]))
    card = make_card(in_channels=1, num_classes=3, input_patch=(32, 32), spatial_dims=2, architecture="unet2d",
                     preprocessing={"normalization": {"kind": "scale", "divide_by": 255.0, "mean": 0.5}})
    return export_tiny_onnx(net, card, tmp_path_factory.mktemp("sizes") / "tiny2d.onnx")


def _picture() -> np.ndarray:
    """A smooth (1, 60, 80) uint8 picture: dark, middle and bright blobs (every label)."""
    rng = np.random.default_rng(3)
    coarse = rng.random((5, 6))
    return (np.kron(coarse, np.ones((12, 14)))[:60, :80] * 250).astype(np.uint8)[None]


def _counts(mask: Path) -> dict[int, int]:
    values, counts = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(mask))), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def test_predict_reports_pixels_for_png_and_mm2_for_metaimage(model, tmp_path, medseg):
    png = write_image(Image(_picture()), tmp_path / "pic.png")
    mha = write_image(Image(_picture(), Geometry(spacing=SPACING + (1.0,))), tmp_path / "pic.mha", compress=False)

    done = medseg("predict", "--model", model, png, "-o", tmp_path / "png_mask.png", "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    case = json.loads(done.stdout)["cases"][0]
    counts = _counts(tmp_path / "png_mask.png")
    assert case["size_unit"] == "pixels" and set(counts) == {0, 1, 2}
    for row in case["volumes"]:
        assert "volume_mm3" not in row and row["area_pixels"] == row["voxels"] == counts.get(row["label"], 0)

    for extra in ((), ("--stream",)):  # whole picture, and tile-streamed
        out = tmp_path / f"mha_mask{len(extra)}.mha"
        done = medseg("predict", "--model", model, mha, "-o", out, "--threads", "1", "--json", *extra)
        assert done.returncode == 0, done.stderr
        case = json.loads(done.stdout)["cases"][0]
        assert case["size_unit"] == "mm2" and case.get("streamed", False) == bool(extra)
        counts = _counts(out)
        for row in case["volumes"]:
            assert "volume_mm3" not in row and row["voxels"] == counts.get(row["label"], 0)
            assert row["area_mm2"] == pytest.approx(row["voxels"] * SPACING[0] * SPACING[1], rel=1e-12)

    text = medseg("predict", "--model", model, png, "-o", tmp_path / "again.png", "--threads", "1")
    assert text.returncode == 0, text.stderr
    assert "area (pixels)" in text.stdout and "mm³" not in text.stdout and "mL" not in text.stdout
    text = medseg("predict", "--model", model, mha, "-o", tmp_path / "again.mha", "--threads", "1")
    assert text.returncode == 0, text.stderr
    assert "area (mm²)" in text.stdout and "mm³" not in text.stdout and "mL" not in text.stdout

    # a cohort's one-line summaries say the same
    folder = tmp_path / "cohort"
    folder.mkdir()
    (folder / "pic.png").write_bytes(png.read_bytes())
    text = medseg("predict", "--model", model, folder, "-o", tmp_path / "out", "--format", ".png", "--threads", "1")
    assert text.returncode == 0, text.stderr
    assert " px" in text.stdout and "mL" not in text.stdout


def test_info_reports_areas_for_2d_label_maps_and_volumes_for_3d(tmp_path, medseg, shared_data):
    labels = np.zeros((1, 30, 40), np.uint8)
    labels[0, 5:15, 5:25] = 1                                                  # 200 pixels
    nifti = write_image(Image(labels, Geometry(spacing=SPACING + (1.0,))), tmp_path / "mask2d.nii.gz", label=True)
    facts = json.loads(medseg("info", "--json", nifti).stdout)
    assert facts["size_unit"] == "mm2"
    row = next(r for r in facts["labels"] if r["label"] == 1)
    assert row["voxels"] == 200 and row["area_mm2"] == pytest.approx(200 * 0.35) and "volume_mm3" not in row
    text = medseg("info", nifti).stdout
    assert "area (mm²)" in text and "70.0" in text and "mm³" not in text

    png = write_image(Image(labels), tmp_path / "mask2d.png", label=True)
    facts = json.loads(medseg("info", "--json", png).stdout)
    assert facts["size_unit"] == "pixels"
    assert next(r for r in facts["labels"] if r["label"] == 1)["area_pixels"] == 200

    colour = shared_data / "ultrasound" / "masks" / "0000.png"                 # a real RGB colour mask
    facts = json.loads(medseg("info", "--json", colour).stdout)
    assert facts["size_unit"] == "pixels" and sum(r["area_pixels"] for r in facts["colors"]) == 512 * 512
    assert all("volume_mm3" not in r for r in facts["colors"])

    volume = shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"  # 3D: unchanged
    facts = json.loads(medseg("info", "--json", volume).stdout)
    assert facts["size_unit"] == "mm3" and all("volume_mm3" in r and "area_mm2" not in r for r in facts["labels"])
