"""training/augment.py: image and label are transformed alike; labels stay labels (nearest neighbour)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medseg_cli.imaging import read_image
from medseg_cli.training.augment import AugmentConfig, augment

SPATIAL = AugmentConfig(flip_prob=0.5, rotation_prob=1.0, rotation_degrees=25.0, scale_prob=1.0,
                        scale_range=(0.8, 1.2), translation_prob=1.0, translation_voxels=3.0, elastic_prob=1.0,
                        elastic_sigma=3.0, elastic_magnitude=2.0)
OFF = AugmentConfig(flip_prob=0.0)


@pytest.fixture(scope="module")
def hippocampus_label(shared_data) -> np.ndarray:
    """A real label map (Z, Y, X) with values 0, 1, 2."""
    return np.asarray(read_image(shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz").array,
                      dtype=np.int64)


def test_spatial_transforms_keep_image_and_label_aligned(hippocampus_label):
    label = hippocampus_label
    # the image IS the label (as float): after a consistent transform, linear interpolation of the image
    # agrees with the nearest-neighbour label almost everywhere (they differ only at class borders)
    image = label[None].astype(np.float32)
    for seed in range(6):
        out_image, out_label = augment(image, label, SPATIAL, np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_label.shape == label.shape
        assert out_label.dtype == label.dtype
        assert set(np.unique(out_label)) <= {0, 1, 2}           # nearest neighbour: no new label values
        assert not np.array_equal(out_label, label)              # something happened
        agree = np.mean(np.abs(out_image[0] - out_label) < 0.5)
        assert agree > 0.97, f"seed {seed}: image and label disagree on {1 - agree:.1%} of voxels"
        ratio = (out_label > 0).sum() / (label > 0).sum()
        assert 0.4 < ratio < 2.0  # zoom 0.8..1.2 in 3D changes volumes by at most ~1.7x
    # nearest neighbour commutes with relabelling (linear interpolation + rounding would not)
    _, relabelled = augment(image, label * 5, SPATIAL, np.random.default_rng(1))
    _, plain = augment(image, label, SPATIAL, np.random.default_rng(1))
    np.testing.assert_array_equal(relabelled, plain * 5)
    # the check has teeth: a label left untransformed would disagree with the transformed image
    out_image, _ = augment(image, label, SPATIAL, np.random.default_rng(0))
    assert np.mean(np.abs(out_image[0] - label) < 0.5) < 0.95


def test_flips_are_exact_and_seeded():
    rng = np.random.default_rng(7)
    image = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    label = rng.integers(0, 3, size=(4, 5, 6))
    out_image, out_label = augment(image, label, AugmentConfig(flip_prob=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image[:, ::-1, ::-1, ::-1])
    np.testing.assert_array_equal(out_label, label[::-1, ::-1, ::-1])
    only_x = AugmentConfig(flip_prob=1.0, flip_axes=(2,))
    out_image, out_label = augment(image, label, only_x, np.random.default_rng(0))
    np.testing.assert_array_equal(out_label, label[:, :, ::-1])
    np.testing.assert_array_equal(out_image, image[:, :, :, ::-1])
    a = augment(image, label, SPATIAL, np.random.default_rng(3))
    b = augment(image, label, SPATIAL, np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_intensity_transforms_touch_the_image_only():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 6, 7, 8)).astype(np.float32)
    label = rng.integers(0, 2, size=(6, 7, 8))
    for name in ("noise", "brightness", "contrast", "gamma"):
        config = dataclasses.replace(OFF, **{f"{name}_prob": 1.0})
        out_image, out_label = augment(image, label, config, np.random.default_rng(0))
        np.testing.assert_array_equal(out_label, label)
        assert not np.allclose(out_image, image), name
        assert out_image.dtype == np.float32
    out_image, out_label = augment(image, label, OFF, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)


def test_probabilities_are_respected():
    image = np.zeros((1, 6, 6, 6), np.float32)
    label = np.zeros((6, 6, 6), np.int64)
    label[2:4, 1:5, 2:5] = 1
    config = dataclasses.replace(OFF, translation_prob=0.3, translation_voxels=2.0)
    changed = sum(not np.array_equal(augment(image, label, config, np.random.default_rng(s))[1], label)
                  for s in range(300))
    assert 0.2 < changed / 300 < 0.4


def test_planar_samples_stay_in_plane():
    rng = np.random.default_rng(2)
    label = np.zeros((1, 32, 32), np.int64)
    label[0, 8:24, 10:20] = 1
    image = label[None].astype(np.float32) + rng.normal(0, 0.01, (1, 1, 32, 32)).astype(np.float32)
    config = dataclasses.replace(SPATIAL, flip_prob=1.0, flip_axes=(0, 1, 2))
    out_image, out_label = augment(image, label, config, np.random.default_rng(5))
    assert out_image.shape == (1, 1, 32, 32) and out_label.shape == (1, 32, 32)
    assert out_label.sum() > 0.5 * label.sum()  # not lost out of plane
    assert np.mean(np.abs(out_image[0] - out_label) < 0.5) > 0.95
