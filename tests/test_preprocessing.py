"""Preprocessing with exact inverses, on real scans from ../shared/data (small crops to stay fast)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medseg_cli.errors import InputError, ModelError
from medseg_cli.imaging import Geometry, Image, read_image, write_image
from medseg_cli.preprocessing import (Preprocessor, bounding_box, crop, ct_window, normalise, percentile_zscore,
                                      resample_array, resample_image_to_grid, resample_image_to_spacing,
                                      resample_labels, roi_mask, uncrop, zscore_in_roi)


def _crop_image(image: Image, box: tuple[slice, slice, slice]) -> Image:
    """A real sub-volume with its own correct geometry (origin = world position of its first voxel)."""
    start = image.geometry.index_to_world_matrix() @ np.array([box[2].start, box[1].start, box[0].start, 1.0])
    geometry = Geometry(image.geometry.spacing, tuple(start[:3]), image.geometry.direction)
    return Image(np.ascontiguousarray(image.array[box]), geometry, image.source)


@pytest.fixture(scope="module")
def brain(shared_data):
    """Anisotropic brain MRI crop (0.78 × 0.78 × 6.5 mm, LAS) with its tumour label."""
    box = (slice(8, 20), slice(90, 150), slice(150, 220))
    image = _crop_image(read_image(shared_data / "nrrd" / "brain1_image.nrrd"), box)
    label = _crop_image(read_image(shared_data / "nrrd" / "brain1_label.nrrd"), box)
    return Image(image.array.astype(np.float32), image.geometry), label


@pytest.fixture(scope="module")
def head(shared_data):
    """A larger slab of the same brain MRI with the tumour label, reaching past the head's right edge
    (the last ~5 columns are air) so that a RoI crop has something to cut."""
    box = (slice(8, 20), slice(60, 200), slice(140, 256))
    image = _crop_image(read_image(shared_data / "nrrd" / "brain1_image.nrrd"), box)
    label = _crop_image(read_image(shared_data / "nrrd" / "brain1_label.nrrd"), box)
    return image, label


# ------------------------------------------------------------------------------------ crop / uncrop

def test_bounding_box_crop_and_uncrop_are_inverse(brain):
    _, label = brain
    box = bounding_box(label.array, margin=2)
    assert box is not None
    tight = bounding_box(label.array)
    for axis, (s, t) in enumerate(zip(box, tight)):
        assert s.start == max(0, t.start - 2) and s.stop == min(label.array.shape[axis], t.stop + 2)
        # the tight box touches the label on both faces of every axis
        assert np.take(label.array, t.start, axis=axis).any() and np.take(label.array, t.stop - 1, axis=axis).any()
    cropped = crop(label.array, box)
    assert cropped.sum() == label.array.sum()
    assert np.array_equal(uncrop(cropped, box, label.array.shape), label.array)
    channels = np.stack([label.array, 2 * label.array])
    assert np.array_equal(uncrop(crop(channels, box), box, label.array.shape), channels)
    assert bounding_box(np.zeros((3, 4, 5), bool)) is None


# ---------------------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("order", [1, 3])
def test_resample_to_1mm_and_back_returns_the_original_grid(brain, order, tmp_path):
    image, _ = brain
    fine = resample_image_to_spacing(image, (1.0, 1.0, 1.0), order=order)
    assert fine.geometry.spacing == (1.0, 1.0, 1.0)
    assert fine.geometry.origin == image.geometry.origin and fine.geometry.direction == image.geometry.direction
    expected = tuple(int(round(n * s)) for n, s in zip(image.spatial_shape, image.geometry.spacing_zyx))
    assert fine.spatial_shape == expected == (78, 47, 55)

    back = resample_image_to_grid(fine, image.spatial_shape, image.geometry)
    assert back.spatial_shape == image.spatial_shape and back.geometry == image.geometry
    # and through a file: the written result reads back on exactly the original grid
    reread = read_image(write_image(back, tmp_path / "back.nii.gz"))
    assert reread.spatial_shape == image.spatial_shape
    for got, want in ((reread.geometry.spacing, image.geometry.spacing), (reread.geometry.origin, image.geometry.origin),
                      (reread.geometry.direction, image.geometry.direction)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # in-plane 0.78 -> 1 mm loses detail, but the content is the same scan in the same place
    assert np.corrcoef(back.array.ravel(), image.array.ravel())[0, 1] > 0.97
    # index-space resampling (scipy) == world-space resampling (SimpleITK) onto the same grid
    back_index = resample_array(fine.array, fine.geometry.spacing_zyx, image.geometry.spacing_zyx,
                                out_shape=image.spatial_shape, order=1)
    interior = (slice(0, -1), slice(0, -1), slice(0, -1))
    np.testing.assert_allclose(back_index[interior], back.array[interior], atol=1e-3 * np.ptp(image.array))


def test_scipy_resampling_matches_simpleitk_in_world_space(brain):
    """Voxel 0 stays put and the other voxels land where SimpleITK (physical coordinates) puts them."""
    image, _ = brain
    fine = resample_image_to_spacing(image, (1.0, 1.0, 1.0))
    reference = resample_image_to_grid(image, fine.spatial_shape, fine.geometry)  # SimpleITK, linear
    z, y, x = fine.spatial_shape
    inner = (slice(0, z - 7), slice(0, y - 1), slice(0, x - 1))  # away from the far faces (edge handling differs)
    np.testing.assert_allclose(fine.array[inner], reference.array[inner], atol=1e-3 * np.ptp(image.array))


@pytest.mark.parametrize("mode", ["nearest", "onehot"])
def test_labels_keep_their_label_set(shared_data, mode):
    prostate = read_image(shared_data / "nrrd" / "prostate_phantom_subvolume-label.nrrd")  # 0.5 × 0.5 × 3 mm
    seg = read_image(shared_data / "totalseg" / "example_seg.nii.gz")  # 3 mm, many organs
    seg = _crop_image(seg, (slice(12, 20), slice(40, 64), slice(40, 72)))
    for label in (prostate, seg):
        values = np.unique(label.array)
        assert values.size >= 5
        fine = resample_labels(label.array, label.geometry.spacing_zyx, (1.0, 1.0, 1.0), mode=mode)
        assert fine.dtype == label.array.dtype
        assert np.array_equal(np.unique(fine), values)
        back = resample_labels(fine, (1.0, 1.0, 1.0), label.geometry.spacing_zyx, out_shape=label.spatial_shape,
                               mode=mode)
        assert back.shape == label.array.shape and back.dtype == label.array.dtype
        assert np.array_equal(np.unique(back), values)
        assert (back == label.array).mean() > 0.95
    # 3 mm -> 1 mm is an integer ratio: nearest neighbour comes back exactly
    fine = resample_labels(seg.array, seg.geometry.spacing_zyx, (1.0, 1.0, 1.0))
    assert np.array_equal(resample_labels(fine, (1.0, 1.0, 1.0), seg.geometry.spacing_zyx, out_shape=seg.spatial_shape),
                          seg.array)
    image = resample_image_to_spacing(seg, (1.0, 1.0, 1.0), is_label=True)
    assert np.array_equal(image.array, fine) and image.geometry.spacing == (1.0, 1.0, 1.0)


def test_planar_images_keep_their_single_slice(shared_data):
    grey = read_image(shared_data / "drive" / "training" / "1st_manual" / "21_manual1.png")
    half = resample_image_to_spacing(grey, (0.5, 2.0, 2.0), is_label=True)
    assert half.spatial_shape == (1, 292, 282) and half.geometry.spacing == (2.0, 2.0, 1.0)
    assert set(np.unique(half.array)) == {0, 255}


# ------------------------------------------------------------------------------------ normalisation

def test_zscore_inside_roi_sets_outside_to_zero(head):
    image, _ = head
    roi = roi_mask(image.array, "otsu")
    assert 0.2 < roi.mean() < 0.9
    out = zscore_in_roi(image.array, roi)
    assert out.dtype == np.float32
    assert np.all(out[~roi] == 0)
    assert out[roi].mean() == pytest.approx(0.0, abs=1e-4) and out[roi].std() == pytest.approx(1.0, abs=1e-4)
    values = image.array[roi].astype(np.float64)
    np.testing.assert_allclose(out[roi], (values - values.mean()) / values.std(), rtol=1e-4, atol=1e-4)


def test_ct_window_clips_and_scales(shared_data):
    ct = read_image(shared_data / "totalseg" / "example_ct_sm.nii.gz").array[10:14]
    out = ct_window(ct, -160, 240)
    assert out.min() == 0.0 and out.max() == 1.0 and out.dtype == np.float32
    expected = (np.clip(ct.astype(np.float64), -160, 240) + 160) / 400
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert normalise(ct, {"kind": "ct_window", "low": -160, "high": 240, "scale_to": [-1, 1]}).min() == -1.0


def test_percentile_zscore_matches_its_definition(brain):
    image, label = brain
    roi = image.array > 0
    out = percentile_zscore(image.array, roi, 0.5, 99.5)
    values = image.array[roi].astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(values, low, high)
    expected = (np.clip(image.array.astype(np.float64), low, high) - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert out.max() == pytest.approx((high - clipped.mean()) / clipped.std(), rel=1e-5)


def test_otsu_roi_with_hole_filling(shared_data):
    image = read_image(shared_data / "nrrd" / "brain1_image.nrrd").array[10:16].astype(np.float32)
    raw = roi_mask(image, "otsu", fill_holes=False)
    filled = roi_mask(image, "otsu", fill_holes=True)
    # the threshold agrees with SimpleITK's Otsu filter (an independent implementation), to a bin or two
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(image))
    itk_mask = image > otsu.GetThreshold()
    assert np.mean(raw != itk_mask) < 0.01
    # a head: a sizeable region, with enclosed holes (dark CSF/vessels) that filling removes
    assert 0.1 < raw.mean() < 0.9
    assert filled.sum() > raw.sum() and np.all(filled[raw])
    assert np.array_equal(ndimage.binary_fill_holes(filled), filled)
    assert np.array_equal(filled, ndimage.binary_fill_holes(raw))


# ----------------------------------------------------------------------------------- the pipeline

SPEC = {"roi": "otsu", "crop_to_roi": True, "crop_margin": 2, "target_spacing_zyx": [2.0, 1.0, 1.0],
        "normalization": {"kind": "zscore_roi"}}


def test_preprocessor_forward_then_inverse_gives_the_original_grid(head, tmp_path):
    image, label = head
    pre = Preprocessor.from_dict(SPEC)
    assert Preprocessor.from_dict(pre.to_dict()) == pre
    volume, roi, state = pre.forward(image)
    assert volume.dtype == np.float32 and volume.shape == (1,) + state.network_shape == (1,) + roi.shape
    assert state.resampled and state.crop_box is not None
    assert state.resampled_spacing_zyx == (2.0, 1.0, 1.0)
    assert state.resampled_shape == (39, 109, 91)  # round(12 × 6.5 / 2), round(140 × 0.78), round(116 × 0.78)
    assert np.all(volume[0][~roi] == 0) and volume[0][roi].std() == pytest.approx(1.0, abs=1e-3)

    network_labels = pre.forward_labels(label, state)
    assert network_labels.shape == state.network_shape and network_labels.dtype == label.array.dtype
    back = pre.inverse_labels(network_labels, state)
    assert back.shape == label.array.shape and back.dtype == label.array.dtype
    assert set(np.unique(back)) == set(np.unique(label.array)) == {0, 1}
    dice = 2 * np.sum((back == 1) & (label.array == 1)) / (np.sum(back == 1) + np.sum(label.array == 1))
    assert dice > 0.9
    # the mask written on the original geometry lies exactly where the scan lies
    written = read_image(write_image(image.with_array(back), tmp_path / "mask.nii.gz", label=True))
    assert written.spatial_shape == image.spatial_shape
    np.testing.assert_allclose(written.geometry.origin, image.geometry.origin, atol=1e-6)
    np.testing.assert_allclose(written.geometry.direction, image.geometry.direction, atol=1e-6)

    probabilities = np.stack([network_labels == k for k in range(2)]).astype(np.float32)
    full = pre.inverse_probabilities(probabilities, state)
    assert full.shape == (2,) + image.spatial_shape
    np.testing.assert_allclose(full.sum(axis=0), 1.0, atol=1e-5)
    assert (full.argmax(axis=0) == label.array).mean() > 0.99


def test_preprocessor_without_resampling_is_exactly_invertible(head):
    image, label = head
    pre = Preprocessor.from_dict({"roi": "otsu", "crop_to_roi": True, "crop_margin": 1,
                                  "normalization": "percentile_zscore"})
    _, roi, state = pre.forward(image)
    assert not state.resampled and state.network_shape == roi.shape and state.crop_box is not None
    labels = pre.forward_labels(label.array, state)
    restored = pre.inverse_labels(labels, state)
    inside = np.zeros(label.array.shape, bool)
    inside[state.crop_box] = True
    assert np.array_equal(restored[inside], label.array[inside]) and not restored[~inside].any()


def test_preprocessor_spec_errors_are_model_errors():
    for bad in ({"target_spacing": [1, 1, 1]}, {"roi": "brain"}, {"normalization": {"kind": "ct_window"}},
                {"crop_margin": -1}, {"target_spacing_zyx": [0, 1, 1]}):
        with pytest.raises(ModelError) as caught:
            Preprocessor.from_dict(bad)
        assert caught.value.exit_code == 3


def test_autofocus_normalisation_follows_the_published_recipe(head):
    """DIGEST §1.7: negatives → 0; RoI voxels strictly inside the RoI's 5th–95th percentiles, strictly
    within RoI mean ± 3 std, strictly above the whole-image mean; the WHOLE image z-scored with them."""
    image, _ = head
    array = image.array.astype(np.float32) - 50  # some negative intensities, as after bias correction
    roi = roi_mask(np.maximum(array, 0), "nonzero")
    out = normalise(array, {"kind": "autofocus"}, roi)

    x = np.maximum(array.astype(np.float64), 0)
    inside = x[roi]
    p5, p95 = np.percentile(inside, [5, 95])
    keep = roi & (x > p5) & (x < p95)
    keep &= (x > inside.mean() - 3 * inside.std()) & (x < inside.mean() + 3 * inside.std())
    keep &= x > x.mean()
    assert 0.1 < keep.sum() / roi.sum() < 0.9
    expected = (x - x[keep].mean()) / x[keep].std()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert out[~roi].size and np.all(out[~roi] < 0)  # outside the RoI is normalised too, not zeroed
    assert out[keep].mean() == pytest.approx(0.0, abs=1e-4) and out[keep].std() == pytest.approx(1.0, abs=1e-4)


def test_each_channel_is_normalised_on_its_own(head):
    """Multi-modal input: every image gets its own statistics (Autofocus: per image, per modality)."""
    image, _ = head
    t2 = image.array.astype(np.float32)
    flair = 3.0 * t2 + 700.0  # another "modality": same anatomy, other intensity scale
    stacked = Image(np.stack([t2, flair]), image.geometry)
    for kind in ("zscore_roi", "autofocus", "percentile_zscore"):
        volume, roi, _ = Preprocessor.from_dict({"roi": "otsu", "normalization": {"kind": kind}}).forward(stacked)
        np.testing.assert_allclose(volume[0], volume[1], atol=1e-3, err_msg=kind)
        if kind == "zscore_roi":
            assert np.all(volume[:, ~roi] == 0)
            for channel in volume:
                assert channel[roi].mean() == pytest.approx(0, abs=1e-4) and channel[roi].std() == pytest.approx(1, abs=1e-4)
    # one spec per channel: CT-style window on the first, z-score on the second
    pre = Preprocessor.from_dict({"roi": "nonzero", "channel_normalization": [
        {"kind": "ct_window", "low": 0, "high": 1000}, {"kind": "zscore"}]})
    volume, _, _ = pre.forward(stacked)
    assert volume[0].min() == 0.0 and volume[0].max() == 1.0
    assert volume[1].mean() == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(InputError, match="2 channel"):
        pre.forward(image)


def test_nonzero_roi_uses_every_channel_and_fills_holes(head):
    image, _ = head
    first = np.zeros(image.array.shape, np.float32)
    second = np.zeros_like(first)
    first[2:10, 20:60, 20:60] = 1.0   # a block in one channel
    second[2:10, 80:120, 30:70] = 2.0  # another block in the other channel, with a hole inside
    second[4:8, 90:110, 40:60] = 0.0
    raw = roi_mask(np.stack([first, second]), "nonzero", fill_holes=False)
    assert np.array_equal(raw, (first != 0) | (second != 0))
    filled = roi_mask(np.stack([first, second]), "nonzero")
    assert filled[5, 100, 50] and not raw[5, 100, 50]
    assert filled.sum() == raw.sum() + 4 * 20 * 20
    assert bounding_box(filled) == (slice(2, 10), slice(20, 120), slice(20, 70))
