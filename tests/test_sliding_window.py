"""The sliding window stitches patches exactly: identity and known-kernel "networks" whose whole-volume
answer is computable with scipy, for same and valid convolutions, odd sizes, small volumes, 2D,
RoI boxes, Gaussian blending and mirroring TTA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from medseg_cli.inference.sliding_window import (SlidingWindow, embed_probabilities, gaussian_weights_1d,
                                                 mirrored, window_starts)

RNG = np.random.default_rng(7)


def identity_net(num_classes: int):
    """A 'same' network: returns the first channels of its input."""
    def predict(batch: np.ndarray) -> np.ndarray:
        return batch[:, :num_classes].copy()
    return predict


def valid_conv_net(kernel: np.ndarray):
    """A 'valid' network: correlates channel 0 with ``kernel`` without padding (output smaller by k - 1)."""
    margin = [k // 2 for k in kernel.shape]

    def predict(batch: np.ndarray) -> np.ndarray:
        out = []
        for item in batch:
            full = ndimage.correlate(item[0].astype(np.float64), kernel, mode="constant")
            crop = tuple(slice(m, full.shape[a] - m) for a, m in enumerate(margin))
            out.append(np.stack([full[crop], -full[crop]]))
        return np.asarray(out, dtype=np.float32)
    return predict, tuple(margin)


@pytest.mark.parametrize("shape,patch,overlap,batch", [
    ((13, 17, 11), (8, 8, 8), 0.5, 1),
    ((9, 30, 21), (4, 16, 8), 0.25, 3),
    ((3, 5, 4), (8, 8, 8), 0.5, 2),          # smaller than one patch on every axis
    ((20, 6, 40), (8, 16, 8), 0.6, 4),       # smaller on one axis only
])
def test_identity_network_is_reproduced_exactly(shape, patch, overlap, batch):
    volume = RNG.normal(size=(2,) + shape).astype(np.float32)
    window = SlidingWindow(patch, overlap=overlap, batch_size=batch)
    result = window.run(identity_net(2), volume, num_classes=2)
    assert result.shape == volume.shape and result.dtype == np.float32
    np.testing.assert_allclose(result, volume, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad_mode,scipy_mode", [("constant", "constant"), ("edge", "nearest")])
@pytest.mark.parametrize("shape", [(11, 14, 9), (4, 5, 3)])
def test_valid_convolution_matches_whole_volume_correlation(pad_mode, scipy_mode, shape):
    kernel = RNG.normal(size=(3, 5, 3))
    predict, margin = valid_conv_net(kernel)
    volume = RNG.normal(size=(1,) + shape).astype(np.float32)
    window = SlidingWindow((6, 6, 6), margin=margin, overlap=0.5, batch_size=2, pad_mode=pad_mode)
    assert window.input_patch == (8, 10, 8)
    result = window.run(predict, volume, num_classes=2)
    expected = ndimage.correlate(volume[0].astype(np.float64), kernel, mode=scipy_mode)
    np.testing.assert_allclose(result[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result[1], -expected, rtol=1e-4, atol=1e-4)


def test_two_dimensional_patches_on_single_slice_volumes():
    kernel = RNG.normal(size=(1, 3, 3))
    predict, margin = valid_conv_net(kernel)
    assert margin == (0, 1, 1)
    volume = RNG.normal(size=(1, 1, 37, 23)).astype(np.float32)
    result = SlidingWindow((1, 16, 16), margin=margin, overlap=0.5).run(predict, volume, 2)
    expected = ndimage.correlate(volume[0].astype(np.float64), kernel, mode="constant")
    np.testing.assert_allclose(result[0], expected, rtol=1e-4, atol=1e-4)


def test_roi_box_limits_windows_and_fills_background_outside():
    volume = RNG.random(size=(3, 40, 40, 40)).astype(np.float32)
    calls = []

    def predict(batch):
        calls.append(len(batch))
        return batch[:, :3].copy()

    box = (slice(10, 20), slice(5, 30), slice(20, 28))
    window = SlidingWindow((8, 8, 8), overlap=0.5)
    result = window.run(predict, volume, 3, roi_box=box)
    assert sum(calls) == len(window.windows(volume.shape[1:], box)) < len(window.windows(volume.shape[1:]))
    np.testing.assert_allclose(result[(slice(None),) + box], volume[(slice(None),) + box], atol=1e-5)
    outside = np.ones(volume.shape[1:], bool)
    outside[box] = False
    assert np.all(result[0][outside] == 1) and np.all(result[1:][:, outside] == 0)
    inside, got_box = window.run_box(predict, volume, 3, roi_box=box)
    assert inside.shape == (3, 10, 25, 8) and got_box == box
    np.testing.assert_array_equal(embed_probabilities(inside, got_box, volume.shape[1:]), result)


def test_gaussian_blending_weights_windows_by_importance():
    """Each window returns its own id everywhere: the blend is the Gaussian-weighted mean of ids."""
    shape, patch = (1, 1, 30), (1, 1, 12)
    window = SlidingWindow(patch, overlap=0.5, batch_size=1)
    starts = window.windows(shape)
    assert len(starts) >= 3
    counter = iter(range(100))

    def predict(batch):
        return np.full((len(batch), 1) + patch, float(next(counter)), np.float32)

    result = window.run(predict, np.zeros((1,) + shape, np.float32), 1)[0, 0, 0]
    g = gaussian_weights_1d(12)
    numerator, denominator = np.zeros(30), np.zeros(30)
    for index, (_, _, x0) in enumerate(starts):
        numerator[x0:x0 + 12] += index * g
        denominator[x0:x0 + 12] += g
    np.testing.assert_allclose(result, numerator / denominator, rtol=1e-5)
    uniform = SlidingWindow(patch, overlap=0.5, gaussian=False)
    counter = iter(range(100))
    flat = uniform.run(predict, np.zeros((1,) + shape, np.float32), 1)[0, 0, 0]
    assert not np.allclose(flat, result)  # the weighting changes the blend


def test_gaussian_profile():
    g = gaussian_weights_1d(16)
    assert g.max() == pytest.approx(1.0, abs=0.01) and np.allclose(g, g[::-1])
    sigma = 16 / 8
    assert g[0] == pytest.approx(np.exp(-0.5 * (7.5 / sigma) ** 2) / np.exp(-0.5 * (0.5 / sigma) ** 2), rel=1e-6)


def test_window_starts_cover_with_requested_overlap():
    for extent, patch, overlap in [(100, 32, 0.5), (33, 32, 0.5), (64, 16, 0.25), (50, 10, 0.0), (7, 16, 0.5)]:
        starts = window_starts(0, extent, patch, extent, overlap)
        covered = np.zeros(extent, bool)
        for s in starts:
            covered[max(s, 0):s + patch] = True
        assert covered.all()
        if len(starts) > 1:
            assert starts[0] == 0 and starts[-1] == extent - patch
            assert min(np.diff(starts)) > 0 and max(np.diff(starts)) <= patch * (1 - overlap) + 1


def test_mirroring_tta_symmetrises_the_kernel():
    """TTA over all flips of a valid net equals the net with the flip-averaged kernel, and is
    flip-equivariant."""
    kernel = RNG.normal(size=(3, 3, 3))
    predict, margin = valid_conv_net(kernel)
    symmetric = np.mean([np.flip(kernel, axes) if axes else kernel
                         for r in range(4) for axes in itertools.combinations(range(3), r)], axis=0)
    volume = RNG.normal(size=(1, 14, 10, 12)).astype(np.float32)
    window = SlidingWindow((6, 6, 6), margin=margin, overlap=0.5, batch_size=2)
    tta = mirrored(predict, axes=(0, 1, 2))
    result = window.run(tta, volume, 2)
    expected = ndimage.correlate(volume[0].astype(np.float64), symmetric, mode="constant")
    np.testing.assert_allclose(result[0], expected, rtol=1e-4, atol=1e-4)
    flipped = window.run(tta, np.ascontiguousarray(volume[:, ::-1, :, ::-1]), 2)
    np.testing.assert_allclose(flipped[:, ::-1, :, ::-1], result, rtol=1e-4, atol=1e-4)
    plain = window.run(predict, volume, 2)
    assert np.abs(plain - result).max() > 1e-2  # TTA really changed something


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        SlidingWindow((8, 8), overlap=0.5)
    with pytest.raises(ValueError):
        SlidingWindow((8, 8, 8), overlap=1.0)
    window = SlidingWindow((4, 4, 4))
    with pytest.raises(ValueError, match="expected"):
        window.run(lambda b: np.zeros((len(b), 1, 3, 3, 3), np.float32), np.zeros((1, 5, 5, 5), np.float32), 1)
