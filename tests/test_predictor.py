"""Whole-image prediction with real ONNX Runtime sessions on known-weight networks: the stitched,
padded, preprocessed-and-inverted answer equals the whole-volume computation, the output grid is
the input grid exactly (oblique direction, anisotropic spacing, resampling in the card), the RoI box
limits the work, TTA averages probabilities and is flip-symmetric, memory stays bounded."""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from medseg_cli.errors import InputError
from medseg_cli.imaging import Geometry, Image, read_image, write_image
from medseg_cli.inference.postprocess import write_labels
from medseg_cli.inference.predictor import Predictor
from medseg_cli.inference.runners import OnnxRunner, TorchRunner
from medseg_cli.preprocessing import Preprocessor

from test_runners import conv1x1_model, export_tiny_onnx, make_card, softmax, valid_conv_model

torch.set_num_threads(1)

OBLIQUE = tuple(Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix().ravel())
NONE_PRE = {"roi": "none", "normalization": {"kind": "none"}}


def onnx_runner(tmp_path: Path, model, card, name: str = "m.onnx") -> OnnxRunner:
    return OnnxRunner(export_tiny_onnx(model, card, tmp_path / name), device="cpu", threads=1)


def conv1x1_expected(model, volume: np.ndarray) -> np.ndarray:
    """softmax(W x + b) per voxel of (C, Z, Y, X) -> (K, Z, Y, X), float64."""
    weight = model.weight.detach().double().numpy()[:, :, 0, 0, 0]
    bias = model.bias.detach().double().numpy()
    logits = np.einsum("kc,czyx->kzyx", weight, volume.astype(np.float64)) + bias[:, None, None, None]
    return softmax(logits, axis=0)


def same_padded_conv(model, volume: np.ndarray) -> np.ndarray:
    """A valid 3x3x3 conv run on the whole volume zero-padded by 1: what exact stitching must give."""
    weight, bias = model.weight.detach().double(), model.bias.detach().double()
    x = torch.from_numpy(volume.astype(np.float64))[None]
    logits = torch.nn.functional.conv3d(x, weight, bias, padding=1)[0].numpy()
    return softmax(logits, axis=0)


class CountingRunner:
    """Wraps a runner and counts the windows it is asked to predict."""

    def __init__(self, runner):
        self.runner, self.card, self.windows, self.calls = runner, runner.card, 0, 0
        self.window_output_patch, self.window_margin = runner.window_output_patch, runner.window_margin

    def predict_batch(self, batch):
        self.windows += len(batch)
        self.calls += 1
        return self.runner.predict_batch(batch)


# ----------------------------------------------------------------------------- stitching is exact

@pytest.mark.parametrize("shape", [(13, 17, 11), (3, 5, 4), (9, 20, 6)])
def test_same_convolution_probabilities_are_exact(tmp_path, shape):
    """Odd sizes, a volume smaller than one patch on every axis, and on one axis only."""
    model = conv1x1_model(2, 3, seed=3)
    runner = onnx_runner(tmp_path, model, make_card(in_channels=2, num_classes=3, input_patch=(8, 8, 8)))
    volume = np.random.default_rng(0).normal(size=(2,) + shape).astype(np.float32)
    image = Image(volume, Geometry((0.8, 1.1, 2.5)))
    result = Predictor(runner, overlap=0.5, batch_size=2).predict(image, probabilities=True)
    expected = conv1x1_expected(model, volume)
    assert result.probabilities.array.shape == (3,) + shape and result.labels.array.shape == shape
    np.testing.assert_allclose(result.probabilities.array, expected, atol=1e-5)
    np.testing.assert_array_equal(result.labels.array, expected.argmax(0))


@pytest.mark.parametrize("shape", [(11, 14, 9), (5, 4, 6)])
def test_valid_convolution_probabilities_are_exact(tmp_path, shape):
    """A net that crops 1 voxel per side (input patch 10, output 8): windows get real context."""
    model = valid_conv_model(3, seed=5)
    card = make_card(num_classes=3, input_patch=(10, 10, 10), output_patch=(8, 8, 8))
    runner = onnx_runner(tmp_path, model, card)
    assert runner.window_margin == (1, 1, 1)
    volume = np.random.default_rng(1).normal(size=(1,) + shape).astype(np.float32)
    result = Predictor(runner, overlap=0.5, batch_size=3).predict(Image(volume[0]), probabilities=True)
    np.testing.assert_allclose(result.probabilities.array, same_padded_conv(model, volume), atol=1e-5)


def test_batch_and_overlap_change_the_work_not_the_answer(tmp_path):
    model = valid_conv_model(2, seed=2)
    card = make_card(num_classes=2, input_patch=(10, 10, 10), output_patch=(8, 8, 8))
    runner = onnx_runner(tmp_path, model, card)
    image = Image(np.random.default_rng(2).normal(size=(21, 19, 23)).astype(np.float32))
    outputs, counts = [], []
    for overlap, batch in [(0.0, 1), (0.5, 4), (0.75, 3)]:
        counting = CountingRunner(runner)
        outputs.append(Predictor(counting, overlap=overlap, batch_size=batch).predict(image, probabilities=True))
        counts.append((counting.windows, counting.calls))
    assert counts[0][0] < counts[1][0] < counts[2][0]  # more overlap, more windows
    assert counts[1][1] == -(-counts[1][0] // 4) and counts[2][1] == -(-counts[2][0] // 3)  # batched calls
    for other in outputs[1:]:
        np.testing.assert_allclose(other.probabilities.array, outputs[0].probabilities.array, atol=1e-5)
    with pytest.raises(InputError, match="overlap"):
        Predictor(runner, overlap=1.0)


# ----------------------------------------------------------------------------- geometry

def test_output_grid_is_input_grid_with_oblique_anisotropic_resampled_input(tmp_path):
    """The card resamples to 1.5 mm; the scan is oblique and anisotropic; the mask comes back on the
    scan's exact grid, and equals argmax of the probabilities brought back linearly (never labels)."""
    rng = np.random.default_rng(3)
    shape = (9, 23, 17)  # (Z, Y, X)
    geometry = Geometry(spacing=(0.7, 0.9, 2.5), origin=(-12.5, 40.25, 7.0), direction=OBLIQUE)
    scan = tmp_path / "scan.nii.gz"
    write_image(Image(rng.normal(size=shape).astype(np.float32), geometry), scan)
    image = read_image(scan)
    preprocessing = {"roi": "none", "target_spacing_zyx": [1.5, 1.5, 1.5], "normalization": {"kind": "zscore"}}
    model = conv1x1_model(1, 3, seed=4)
    card = make_card(num_classes=3, input_patch=(8, 8, 8), preprocessing=preprocessing)
    result = Predictor(onnx_runner(tmp_path, model, card)).predict(image, probabilities=True)

    pre = Preprocessor.from_dict(preprocessing)
    volume, _, state = pre.forward(image)
    assert state.resampled and volume.shape[1:] == (15, 14, 8)  # really a different grid
    expected = pre.inverse_probabilities(conv1x1_expected(model, volume).astype(np.float32), state)
    np.testing.assert_allclose(result.probabilities.array, expected, atol=1e-5)
    np.testing.assert_array_equal(result.labels.array, expected.argmax(0))

    out = tmp_path / "mask.nii.gz"
    write_labels(result.labels, out, card)
    written = sitk.ReadImage(str(out))
    original = sitk.ReadImage(str(scan))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2}


def test_crop_to_roi_without_resampling_is_exact_and_background_outside(tmp_path):
    """A card that crops to the non-zero RoI: the network sees only the box, the mask is placed back."""
    rng = np.random.default_rng(4)
    array = np.zeros((20, 24, 22), np.float32)
    box = (slice(4, 15), slice(6, 13), slice(3, 20))
    array[box] = rng.uniform(1, 3, size=(11, 7, 17))
    preprocessing = {"roi": "nonzero", "crop_to_roi": True, "normalization": {"kind": "none"}}
    model = conv1x1_model(1, 3, seed=6)
    runner = CountingRunner(onnx_runner(tmp_path, model, make_card(num_classes=3, input_patch=(8, 8, 8),
                                                                   preprocessing=preprocessing)))
    predictor = Predictor(runner, overlap=0.5)
    result = predictor.predict(Image(array, Geometry((1.0, 2.0, 3.0))), probabilities=True)
    expected = conv1x1_expected(model, array[None])
    np.testing.assert_allclose(result.probabilities.array[(slice(None),) + box],
                               expected[(slice(None),) + box], atol=1e-5)
    outside = np.ones(array.shape, bool)
    outside[box] = False
    assert (result.labels.array[outside] == 0).all()
    assert (result.probabilities.array[0][outside] == 1).all()
    np.testing.assert_array_equal(result.labels.array[box], expected[(slice(None),) + box].argmax(0))
    assert runner.windows == len(predictor.window.windows((11, 7, 17)))  # only the box was run


class ConstantSigmoidRunner:
    """A 2-channel sigmoid 'network' answering 0.1 everywhere (below 0.5: no label anywhere)."""

    window_output_patch, window_margin = (8, 8, 8), (0, 0, 0)

    def __init__(self, card):
        self.card = card

    def predict_batch(self, batch):
        return np.full((len(batch), 2) + self.window_output_patch, 0.1, np.float32)


@pytest.mark.parametrize("spacing", [None, [2.0, 2.0, 2.0]])
def test_sigmoid_model_outside_the_roi_is_no_label_with_and_without_resampling(spacing):
    """A sigmoid model has no background channel (channel 0 is label 1): outside the RoI every channel's
    probability is 0, and no voxel there is labelled, also when probabilities are resampled back."""
    preprocessing = {"roi": "nonzero", "normalization": {"kind": "zscore_roi"}}
    if spacing:
        preprocessing["target_spacing_zyx"] = spacing
    card = make_card(num_classes=2, activation="sigmoid", preprocessing=preprocessing)
    array = np.zeros((32, 32, 32), np.float32)
    array[12:20, 12:20, 12:20] = np.random.default_rng(9).uniform(1, 2, size=(8, 8, 8))
    result = Predictor(ConstantSigmoidRunner(card)).predict(Image(array, Geometry()), probabilities=True)
    assert (result.labels.array == 0).all() and result.rows[0]["voxels"] == result.rows[1]["voxels"] == 0
    assert result.probabilities.array.shape == (2, 32, 32, 32)
    assert (result.probabilities.array[:, 0, 0, 0] == 0).all() and result.probabilities.array.max() <= 0.1 + 1e-6


def test_roi_box_restricts_windows_without_crop(tmp_path):
    """roi nonzero, no crop: windows only over the RoI bounding box; everything else is background."""
    array = np.zeros((30, 30, 30), np.float32)
    array[5:12, 18:27, 10:14] = 2.0
    preprocessing = {"roi": "nonzero", "normalization": {"kind": "none"}}
    model = conv1x1_model(1, 2, seed=7)
    with torch.no_grad():  # logit(1) - logit(0) = x - 1: foreground where x > 1
        model.weight.copy_(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1))
        model.bias.copy_(torch.tensor([0.0, -1.0]))
    runner = CountingRunner(onnx_runner(tmp_path, model, make_card(num_classes=2, input_patch=(8, 8, 8),
                                                                   preprocessing=preprocessing)))
    predictor = Predictor(runner, overlap=0.5)
    result = predictor.predict(Image(array, Geometry((0.5, 0.5, 2.0))))
    full = predictor.window.windows(array.shape)
    inside = predictor.window.windows(array.shape, (slice(5, 12), slice(18, 27), slice(10, 14)))
    assert runner.windows == len(inside) < len(full) // 4
    np.testing.assert_array_equal(result.labels.array, (array > 1).astype(np.uint8))
    assert result.rows == [{"label": 1, "name": "organ1", "voxels": 7 * 9 * 4, "volume_mm3": 7 * 9 * 4 * 0.5}]
    assert result.volumes == {"organ1": 126.0}


# ----------------------------------------------------------------------------- TTA, parity

def test_tta_averages_probabilities_over_all_flips_and_is_flip_symmetric(tmp_path):
    model = valid_conv_model(3, seed=8)
    card = make_card(num_classes=3, input_patch=(10, 10, 10), output_patch=(8, 8, 8))
    runner = onnx_runner(tmp_path, model, card)
    volume = np.random.default_rng(5).normal(size=(1, 12, 9, 13)).astype(np.float32)
    predictor = Predictor(runner, tta=True, batch_size=2)
    result = predictor.predict(Image(volume[0]), probabilities=True).probabilities.array
    expected = np.mean([np.flip(same_padded_conv(model, np.flip(volume, [1 + a for a in axes]).copy()),
                                [1 + a for a in axes]) if axes else same_padded_conv(model, volume)
                        for r in range(4) for axes in itertools.combinations(range(3), r)], axis=0)
    np.testing.assert_allclose(result, expected, atol=1e-5)  # mean of softmaxes, not softmax of means
    flipped = predictor.predict(Image(np.ascontiguousarray(volume[0, ::-1, :, ::-1])), probabilities=True)
    np.testing.assert_allclose(flipped.probabilities.array[:, ::-1, :, ::-1], result, atol=1e-5)
    plain = Predictor(runner).predict(Image(volume[0]), probabilities=True).probabilities.array
    assert np.abs(plain - result).max() > 1e-2


def test_torch_and_onnx_predictions_agree_on_a_real_scan(tmp_path, shared_data):
    from medseg_cli.checkpoint import save_checkpoint
    from medseg_cli.zoo import build_model

    kwargs = {"init_features": 2, "num_levels": 2}
    torch.manual_seed(0)
    model = build_model("unet3d", 1, 3, **kwargs).eval()
    preprocessing = {"roi": "nonzero", "normalization": {"kind": "zscore_roi"}}
    card = make_card(num_classes=3, input_patch=(16, 16, 16), architecture_kwargs=kwargs, preprocessing=preprocessing)
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), card)
    image = read_image(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    a = Predictor(onnx_runner(tmp_path, model, card)).predict(image, probabilities=True)
    b = Predictor(TorchRunner.from_checkpoint(tmp_path / "m.pt", device="cpu")).predict(image, probabilities=True)
    assert a.probabilities.array.shape == (3,) + image.spatial_shape
    assert np.abs(a.probabilities.array - b.probabilities.array).max() <= 1e-4
    assert a.labels.geometry == image.geometry


# ----------------------------------------------------------------------------- channels, postprocessing, memory

def test_channel_count_is_checked(tmp_path):
    runner = onnx_runner(tmp_path, conv1x1_model(2, 2), make_card(in_channels=2, num_classes=2))
    with pytest.raises(InputError, match=r"takes 2 channel\(s\) \(mod0, mod1\), the input has 1") as info:
        Predictor(runner).predict(Image(np.zeros((8, 8, 8), np.float32), source="one.nii.gz"))
    assert info.value.exit_code == 2 and "one.nii.gz" in str(info.value)


def test_keep_largest_component_per_label(tmp_path):
    array = np.zeros((12, 16, 16), np.float32)
    array[1:5, 1:5, 1:5] = 2.0      # 64 voxels
    array[7:10, 9:12, 9:11] = 2.0   # 18 voxels, a separate component
    model = conv1x1_model(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1))
        model.bias.copy_(torch.tensor([0.0, -1.0]))
    runner = onnx_runner(tmp_path, model, make_card(num_classes=2, input_patch=(8, 8, 8), preprocessing=NONE_PRE))
    plain = Predictor(runner).predict(Image(array))
    largest = Predictor(runner, keep_largest=True).predict(Image(array))
    assert plain.rows[0]["voxels"] == 82 and largest.rows[0]["voxels"] == 64
    assert largest.labels.array[1:5, 1:5, 1:5].all() and not largest.labels.array[7:10].any()


def test_slicer_segmentation_carries_names_colours_and_geometry(tmp_path):
    card = make_card(num_classes=3).with_updates(labels={"0": "background", "1": "anterior", "2": "posterior"},
                                                 label_colors={"1": [255, 0, 0], "2": [0, 0, 255]})
    labels = np.zeros((6, 7, 8), np.uint8)
    labels[1:3, 2:5, 3:7] = 1
    labels[4, 1, 1] = 2
    geometry = Geometry((0.5, 0.75, 3.0), (1.0, -2.0, 3.0), OBLIQUE)
    path = write_labels(Image(labels, geometry), tmp_path / "mask.seg.nrrd", card)
    read = sitk.ReadImage(str(path))
    assert read.GetMetaData("Segment0_Name") == "anterior" and read.GetMetaData("Segment1_Name") == "posterior"
    assert read.GetMetaData("Segment0_Color") == "1 0 0" and read.GetMetaData("Segment1_Color") == "0 0 1"
    assert read.GetMetaData("Segment0_LabelValue") == "1" and read.GetMetaData("Segment0_Layer") == "0"
    assert read.GetMetaData("Segment0_Extent") == "3 6 2 4 1 2"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), labels)
    assert Geometry.from_sitk(read).matches(geometry, 1e-9)


def test_memory_stays_within_four_times_the_input(tmp_path):
    """numpy allocations (traced) while segmenting a 3-class 96^3 volume passed inline (the predictor
    holds the only reference, so the scan is freed once preprocessed): the peak stays under 4 times
    the input's float32 size (the issue's bound), window buffers included. Inside the window loop a
    softmax model holds K - 1 class accumulators (class 0 = 1 - the others), a sigmoid model K."""
    from medseg_cli.inference.sliding_window import SlidingWindow

    channels, classes, batch, patch = 1, 3, 4, (16, 16, 16)
    shape = (96, 96, 96)
    size = np.prod(shape) * 4
    rng = np.random.default_rng(0)
    # per call: the input batch and the output batch (twice: ORT's array, then ours), one weighted patch,
    # the importance map; all independent of the volume's size
    window_buffers = (2 * batch * (channels + classes) + classes + 1) * np.prod(patch) * 4
    assert window_buffers < 0.2 * size
    model = conv1x1_model(channels, classes, seed=9)
    runner = onnx_runner(tmp_path, model, make_card(num_classes=classes, input_patch=patch, preprocessing=NONE_PRE))
    predictor = Predictor(runner, overlap=0.5, batch_size=batch)
    predictor.predict(Image(rng.standard_normal(shape, dtype=np.float32)))  # warm up ORT
    tracemalloc.start()
    try:
        result = predictor.predict(Image(rng.standard_normal(shape, dtype=np.float32)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.labels.array.dtype == np.uint8
    assert peak < 4 * size, f"peak {peak / size:.2f} x the input's float32 size"

    volume = rng.standard_normal((1,) + shape, dtype=np.float32)
    window = SlidingWindow(patch, overlap=0.5, batch_size=batch)
    for implicit, held in ((True, classes - 1), (False, classes)):
        tracemalloc.start()
        try:
            inside, _ = window.run_box(runner.predict_batch, volume, classes, implicit_first=implicit)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert inside.shape == (held,) + shape
        assert held * size < peak < held * size + window_buffers, f"peak {peak / size:.2f} x, {held} held"
        del inside


def test_implicit_background_gives_the_same_labels_and_probabilities(tmp_path):
    """Accumulating K - 1 softmax classes and deriving class 0 changes nothing the user sees."""
    from medseg_cli.inference.postprocess import probabilities_to_labels
    from medseg_cli.inference.sliding_window import SlidingWindow, with_first_class

    model = valid_conv_model(4, seed=12)
    card = make_card(num_classes=4, input_patch=(10, 10, 10), output_patch=(8, 8, 8))
    runner = onnx_runner(tmp_path, model, card)
    volume = np.random.default_rng(8).normal(size=(1, 13, 11, 17)).astype(np.float32)
    window = SlidingWindow((8, 8, 8), margin=(1, 1, 1), overlap=0.5, batch_size=2)
    full, _ = window.run_box(runner.predict_batch, volume, 4)
    rest, _ = window.run_box(runner.predict_batch, volume, 4, implicit_first=True)
    assert full.shape == (4, 13, 11, 17) and rest.shape == (3, 13, 11, 17)
    np.testing.assert_allclose(with_first_class(rest), full, atol=1e-6)
    np.testing.assert_array_equal(probabilities_to_labels(rest, implicit_first=True, chunk=5),
                                  probabilities_to_labels(full))
    labels = Predictor(runner, batch_size=2).predict(Image(volume[0])).labels.array
    np.testing.assert_array_equal(labels, full.argmax(0))
    ties = np.zeros((2, 1, 1, 3), np.float32)  # p = (0.5, 0.5, 0), (0.2, 0.3, 0.5), (0.25, 0.375, 0.375)
    ties[:, 0, 0, 0], ties[:, 0, 0, 1], ties[:, 0, 0, 2] = (0.5, 0.0), (0.3, 0.5), (0.375, 0.375)
    np.testing.assert_array_equal(probabilities_to_labels(ties, implicit_first=True)[0, 0], [0, 2, 1])


def test_label_volumes_count_every_label_in_mm3():
    from medseg_cli.inference.postprocess import label_volumes

    labels = np.zeros((19, 5, 6), np.uint8)
    labels[0, 0, :4] = 1
    labels[17:, 2:4, 1:3] = 2
    labels[9, 4, 5] = 7  # not a label of the card: ignored
    rows = label_volumes(labels, Geometry((0.5, 2.0, 3.0)), make_card(num_classes=3))
    assert rows == [{"label": 1, "name": "organ1", "voxels": 4, "volume_mm3": 12.0},
                    {"label": 2, "name": "organ2", "voxels": 8, "volume_mm3": 24.0}]


def test_two_dimensional_model_on_a_planar_image_and_slice_by_slice(tmp_path):
    """A 2D card (patch (Y, X)) segments a one-slice image, and a volume slice by slice, exactly."""
    model = conv1x1_model(1, 3, dims=2, seed=10)
    card = make_card(num_classes=3, input_patch=(16, 12), spatial_dims=2, preprocessing=NONE_PRE)
    predictor = Predictor(onnx_runner(tmp_path, model, card), tta=True)
    weight = model.weight.detach().double().numpy()[:, :, 0, 0]
    bias = model.bias.detach().double().numpy()
    for shape in [(1, 37, 23), (5, 20, 30)]:
        array = np.random.default_rng(6).normal(size=shape).astype(np.float32)
        result = predictor.predict(Image(array, Geometry((0.3, 0.3, 4.0))), probabilities=True)
        expected = softmax(np.einsum("kc,czyx->kzyx", weight, array[None].astype(np.float64))
                           + bias[:, None, None, None], axis=0)
        np.testing.assert_allclose(result.probabilities.array, expected, atol=1e-5)
        assert result.labels.array.shape == shape
