"""Tile streaming of pictures that cannot be memory-mapped (issue 8: "a histology tile mosaic or a
stitched fundus" come as TIFF / PNG): read once in their stored pixel type, streamed tile by tile, the
labels and geometry equal to whole-image prediction; the mask written as .mha tile by tile or converted
once at the end to .png / .tif / .nii.gz / .nrrd; the reader's checks (truncated PNG) still apply.

The pictures are real DRIVE fundus photographs, one image tiled 2 x 2 (1168 x 1130 pixels, RGB)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_medseg
from medseg_cli.errors import InputError
from medseg_cli.imaging import Geometry, Image, read_image
from medseg_cli.inference.postprocess import write_labels
from medseg_cli.inference.predictor import Predictor
from medseg_cli.inference.runners import load_runner
from medseg_cli.inference.streaming import open_picture, should_stream, stream_predict

from test_runners import export_tiny_onnx, make_card
from test_streaming import tiny_net

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("format_models")
    grey = make_card(in_channels=1, num_classes=3, input_patch=(96, 96), spatial_dims=2, architecture="unet2d",
                     preprocessing={"normalization": {"kind": "zscore"}})
    rgb = make_card(in_channels=3, num_classes=2, input_patch=(80, 112), spatial_dims=2, architecture="unet2d",
                    preprocessing={"normalization": {"kind": "scale", "divide_by": 255.0, "mean": 0.5}})
    return {"grey": export_tiny_onnx(tiny_net(1, 3, 2), grey, folder / "grey.onnx"),
            "rgb": export_tiny_onnx(tiny_net(3, 2, 3), rgb, folder / "rgb.onnx")}


@pytest.fixture(scope="module")
def fundus(shared_data) -> np.ndarray:
    """DRIVE training image 21 tiled 2 x 2: (1168, 1130, 3) uint8."""
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "drive" / "training" / "images" / "21_training.png")))
    assert rgb.shape == (584, 565, 3) and rgb.dtype == np.uint8
    return np.ascontiguousarray(np.tile(rgb, (2, 2, 1)))


def write_picture(array: np.ndarray, path: Path) -> Path:
    """Write (Y, X[, C]) pixels with the geometry the format can hold (TIFF: spacing; NRRD: all of it)."""
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 3)
    if path.suffix in (".tif", ".nrrd"):
        image.SetSpacing((0.5, 0.7))
    if path.suffix == ".nrrd":
        image.SetOrigin((3.0, -2.0))
        image.SetDirection((0.0, 1.0, 1.0, 0.0))
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    if path.suffix == ".tif":
        writer.SetCompressor("Deflate")                               # as histology mosaics are stored
    writer.Execute(image)
    return path


@pytest.mark.parametrize("name, model, grey", [("fundus.tif", "rgb", False), ("fundus.png", "grey", False),
                                               ("fundus.nrrd", "grey", True)])
def test_non_mappable_pictures_stream_to_the_whole_image_labels(models, fundus, tmp_path, name, model, grey):
    source = write_picture(fundus[..., 1] if grey else fundus, tmp_path / name)
    opened = open_picture(source)                                      # read once, as stored
    assert not isinstance(opened.array, np.memmap) and opened.array.dtype == np.uint8
    assert opened.array.shape == fundus.shape[:2] + ((1,) if grey else (3,)) and not opened.array.flags.writeable
    assert opened.geometry == read_image(source).geometry
    predictor = Predictor(load_runner(str(models[model]), threads=1), overlap=0.25, batch_size=4)
    whole = predictor.predict(read_image(source))
    rows = stream_predict(predictor, opened, tmp_path / "mask.mha", tile=384)  # 4 x 3 tiles
    assert opened.array.strides == (0, 0, 0) and opened.owner is None  # the pixels were released
    written = sitk.ReadImage(str(tmp_path / "mask.mha"))
    labels = sitk.GetArrayFromImage(written)
    assert labels.shape == (1,) + fundus.shape[:2] and len(np.unique(labels)) > 1
    assert np.array_equal(labels, whole.labels.array)
    assert rows == whole.rows
    assert Geometry.from_sitk(written) == whole.labels.geometry == read_image(source).geometry


@pytest.fixture(scope="module")
def streamed_outputs(models, fundus, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """``medseg predict --stream`` of a DRIVE TIFF into each output format."""
    folder = tmp_path_factory.mktemp("streamed_outputs")
    source = write_picture(fundus, folder / "mosaic.tif")
    outputs = {}
    for suffix in (".mha", ".png", ".tif", ".nii.gz", ".nrrd"):
        outputs[suffix] = folder / f"streamed{suffix}"
        done = run_medseg("predict", "--model", models["rgb"], source, "-o", outputs[suffix], "--stream",
                             "--batch", "4", "--threads", "1", "--json")
        assert done.returncode == 0, done.stderr
        assert '"streamed": true' in done.stdout
    return source, outputs


@pytest.mark.parametrize("suffix", [".png", ".tif", ".nii.gz", ".nrrd"])
def test_streamed_masks_in_other_formats_equal_the_whole_image_ones(models, streamed_outputs, tmp_path, suffix):
    source, outputs = streamed_outputs
    predictor = Predictor(load_runner(str(models["rgb"]), threads=1), overlap=0.5, batch_size=4)
    whole = predictor.predict(read_image(source))
    reference = write_labels(whole.labels, tmp_path / f"whole{suffix}", predictor.card)  # the whole-image writer
    mha = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[".mha"])))
    assert np.array_equal(mha, whole.labels.array) and len(np.unique(mha)) > 1
    streamed, expected = sitk.ReadImage(str(outputs[suffix])), sitk.ReadImage(str(reference))
    assert np.array_equal(sitk.GetArrayFromImage(streamed), sitk.GetArrayFromImage(expected))
    assert streamed.GetPixelID() == expected.GetPixelID() == sitk.sitkUInt8
    assert (streamed.GetSize(), streamed.GetSpacing(), streamed.GetOrigin(), streamed.GetDirection()) == \
        (expected.GetSize(), expected.GetSpacing(), expected.GetOrigin(), expected.GetDirection())
    assert read_image(outputs[suffix]).geometry == read_image(reference).geometry
    assert not [p for p in outputs[suffix].parent.iterdir() if p.name.startswith(".medseg-partial-")]


def test_truncated_png_is_refused_when_streamed(models, fundus, tmp_path, medseg):
    good = write_picture(fundus, tmp_path / "fundus.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    done = medseg("predict", "--model", models["rgb"], cut, "-o", tmp_path / "mask.png", "--stream")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "truncated" in lines[0] and "cut.png" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "mask.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".medseg-partial-")]


def test_big_pictures_of_any_2d_format_stream_automatically(fundus, tmp_path):
    """The size is read from the header (1.32 megapixels here); volumes and unreadable files never stream."""
    for name in ("a.tif", "a.png", "a.nrrd", "a.mha"):
        path = write_picture(fundus, tmp_path / name)                 # .mha: compressed, so not mappable
        assert should_stream(path, megapixels=1.0) and not should_stream(path, megapixels=2.0)
    volume = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 600, 600), np.uint8)), str(volume))
    assert not should_stream(volume, megapixels=0.1)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff at all")
    assert not should_stream(broken, megapixels=0.1)
    assert not should_stream(tmp_path, megapixels=0.1)               # a folder (DICOM series): never


def test_unwritable_or_lossy_streamed_outputs_are_input_errors(models, fundus, tmp_path):
    """A mask folder where no scratch file can be made (/proc), or a JPEG mask (lossy: it alters label
    values), is refused as an InputError naming the output, before any tile is predicted."""
    source = write_picture(fundus[:200, :200], tmp_path / "small.png")
    predictor = Predictor(load_runner(str(models["rgb"]), threads=1))
    for output, words in ((Path("/proc") / "mask.png", "writ"), (tmp_path / "mask.jpg", "JPEG")):
        with pytest.raises(InputError, match=words) as caught:
            stream_predict(predictor, source, output)
        assert str(output) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.png"]
