"""Tile-streamed prediction of large 2D pictures: the same labels as whole-image prediction (bit for bit,
over several tiles and batch sizes, grey and colour pictures), the input's geometry, and clear errors for
inputs that cannot stream. (Pictures that cannot be memory-mapped: tests/test_streaming_formats.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg_cli.errors import InputError
from medseg_cli.imaging import Geometry, Image, read_image, write_image
from medseg_cli.inference.predictor import Predictor
from medseg_cli.inference.runners import load_runner
from medseg_cli.inference.streaming import open_picture, should_stream, stream_predict

from test_runners import export_tiny_onnx, make_card

torch.set_num_threads(1)

SHAPE = (700, 900)  # (Y, X): several 256-pixel tiles, and windows that straddle tile borders


def tiny_net(in_channels: int, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, num_classes, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("stream_models")
    zscore = {"normalization": {"kind": "zscore"}}
    grey = make_card(in_channels=1, num_classes=3, input_patch=(64, 64), spatial_dims=2, architecture="unet2d",
                     preprocessing=zscore)
    rgb = make_card(in_channels=3, num_classes=2, input_patch=(48, 80), spatial_dims=2, architecture="unet2d",
                    preprocessing={"normalization": {"kind": "scale", "divide_by": 255.0, "mean": 0.5}})
    resampling = grey.with_updates(preprocessing={"target_spacing_zyx": [1.0, 3.0, 3.0], **zscore})
    return {"grey": export_tiny_onnx(tiny_net(1, 3, 0), grey, folder / "grey.onnx"),
            "rgb": export_tiny_onnx(tiny_net(3, 2, 1), rgb, folder / "rgb.onnx"),
            "resampling": export_tiny_onnx(tiny_net(1, 3, 0), resampling, folder / "resampling.onnx")}


def picture(path: Path, channels: int = 1, *, compress: bool = False) -> Path:
    """A smooth random picture (blobs, so the tiny nets give every label) with a non-trivial 2D geometry."""
    rng = np.random.default_rng(channels)
    coarse = rng.random((channels, SHAPE[0] // 50 + 2, SHAPE[1] // 50 + 2))
    smooth = np.stack([np.kron(c, np.ones((50, 50)))[:SHAPE[0], :SHAPE[1]] for c in coarse])
    array = np.clip(smooth * 200 + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1) if channels > 1 else array[0],
                                   isVector=channels > 1)
    image.SetSpacing((0.5, 0.7))
    image.SetOrigin((3.0, -2.0))
    image.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(image, str(path), compress)
    return path


@pytest.mark.parametrize("model, channels, batch", [("grey", 1, 1), ("grey", 1, 3), ("grey", 3, 2),
                                                     ("rgb", 3, 4), ("rgb", 1, 1)])
def test_tiles_give_exactly_the_whole_image_labels(models, tmp_path, model, channels, batch):
    source = picture(tmp_path / "big.mha", channels)
    predictor = Predictor(load_runner(str(models[model]), threads=1), overlap=0.5, batch_size=batch)
    whole = predictor.predict(read_image(source))
    rows = stream_predict(predictor, source, tmp_path / "mask.mha", tile=256)
    written = sitk.ReadImage(str(tmp_path / "mask.mha"))
    labels = sitk.GetArrayFromImage(written)                            # (1, Y, X), as write_labels gives it
    assert labels.shape == (1,) + SHAPE and labels.dtype == np.uint8
    assert np.array_equal(labels, whole.labels.array)
    assert len(np.unique(labels)) > 1                                   # not a trivially blank answer
    assert rows == whole.rows
    assert Geometry.from_sitk(written) == read_image(source).geometry
    reference = sitk.ReadImage(str(source))                            # in-plane: the picture's own numbers
    assert written.GetSpacing()[:2] == reference.GetSpacing() and written.GetOrigin()[:2] == reference.GetOrigin()
    assert [written.GetDirection()[i] for i in (0, 1, 3, 4)] == list(reference.GetDirection())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".medseg-partial-")]


def test_cli_stream_equals_whole_image_and_keeps_geometry(models, tmp_path, medseg):
    source = picture(tmp_path / "big.mha")
    streamed, whole = tmp_path / "streamed.mha", tmp_path / "whole.mha"
    done = medseg("predict", "--model", models["grey"], source, "-o", streamed, "--stream", "--batch", "4",
                  "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert '"streamed": true' in done.stdout
    done = medseg("predict", "--model", models["grey"], source, "-o", whole, "--no-stream", "--batch", "4",
                  "--threads", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    a, b = sitk.ReadImage(str(streamed)), sitk.ReadImage(str(whole))
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert (a.GetSize(), a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == \
        (b.GetSize(), b.GetSpacing(), b.GetOrigin(), b.GetDirection())


def test_inputs_that_cannot_stream_are_one_clear_line(models, tmp_path, medseg):
    volume = write_image(Image(np.zeros((3, 40, 50), np.uint8)), tmp_path / "volume.nii.gz")
    done = medseg("predict", "--model", models["grey"], volume, "-o", tmp_path / "b.mha", "--stream")
    assert done.returncode == 2 and "single 2D picture" in done.stderr and "volume.nii.gz" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b.mha").exists()
    plain = picture(tmp_path / "plain.mha")
    done = medseg("predict", "--model", models["resampling"], plain, "-o", tmp_path / "c.mha", "--stream")
    assert done.returncode == 2 and "resamples" in done.stderr and not (tmp_path / "c.mha").exists()
    # a compressed MetaImage cannot be memory-mapped: it is read once, as stored, and streams the same
    compressed = picture(tmp_path / "packed.mha", compress=True)
    done = medseg("predict", "--model", models["grey"], compressed, "-o", tmp_path / "a.mha", "--stream", "--json")
    assert done.returncode == 0 and '"streamed": true' in done.stdout, done.stderr
    done = medseg("predict", "--model", models["grey"], plain, "-o", tmp_path / "e.mha", "--quiet")
    assert done.returncode == 0, done.stderr
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.mha"))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "e.mha"))))


def test_only_big_2d_metaimages_stream_automatically(tmp_path):
    small = picture(tmp_path / "small.mha")
    assert not should_stream(small) and should_stream(small, megapixels=0.5)
    packed = picture(tmp_path / "packed.mha", compress=True)                # read whole, but streamed
    assert should_stream(packed, megapixels=0.5) and not should_stream(packed)
    assert not isinstance(open_picture(packed).array, np.memmap)
    # a 20000 x 20000 header over a sparse file: decided from the header, no pixel is read
    big = tmp_path / "huge.mha"
    header = (b"ObjectType = Image\nNDims = 2\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              b"CompressedData = False\nDimSize = 20000 20000\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    with open(big, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + 20000 * 20000)
    assert should_stream(big)
    mapped = open_picture(big)
    assert mapped.shape == (20000, 20000) and mapped.channels == 1 and isinstance(mapped.array, np.memmap)
    big.write_bytes(header + b"\0" * 100)                               # truncated data
    with pytest.raises(InputError, match="shorter"):
        open_picture(big)


def test_streamed_zscore_statistics_equal_the_whole_image_ones(tmp_path, monkeypatch):
    """Many small chunks (and bands of rows that do not end on a chunk boundary): the same float64 sums."""
    import medseg_cli.inference.streaming as streaming
    import medseg_cli.preprocessing as preprocessing

    monkeypatch.setattr(preprocessing, "_CHUNK", 1000)
    monkeypatch.setattr(streaming, "_CHUNK", 1000)
    for channels, model_channels in ((1, 1), (3, 1), (1, 3)):
        source = picture(tmp_path / f"p{channels}.mha", channels)
        image = read_image(source)
        from medseg_cli.imaging import match_planar_channels

        expected = [preprocessing._mean_std(plane.reshape(-1))
                    for plane in match_planar_channels(image, model_channels).channels()]
        assert streaming._zscore_statistics(open_picture(source), model_channels) == expected


def test_nan_pixels_give_the_whole_image_labels(models, tmp_path):
    """A float picture with NaN pixels: whole-image prediction counts them as 0 (``Preprocessor.forward``
    zeroes non-finite input before the z-score statistics), so the streamed statistics must as well."""
    rng = np.random.default_rng(5)
    coarse = rng.random((6, 8))
    array = (np.kron(coarse, np.ones((40, 40)))[:220, :300] * 300 + 900).astype(np.float32)
    array[::9, ::7] = np.nan                                          # 3% NaN, spread over every tile
    array[100:110, 50:90] = np.inf
    source = tmp_path / "nan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(source), False)
    predictor = Predictor(load_runner(str(models["grey"]), threads=1), overlap=0.5, batch_size=2)
    with pytest.warns(Warning, match="NaN or infinite"):
        whole = predictor.predict(read_image(source))
    rows = stream_predict(predictor, source, tmp_path / "mask.mha", tile=64)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.mha")))
    assert len(np.unique(labels)) > 1 and np.array_equal(labels, whole.labels.array)
    assert rows == whole.rows
