"""training/losses.py against values computed by hand (see each test's arithmetic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg_cli.training.losses import (HybridSchedule, SegmentationLoss, boundary, cross_entropy, focal,
                                        signed_distance_map, soft_dice)

LN3 = math.log(3.0)


def two_class_logits(p_fg: list[list[float]]) -> torch.Tensor:
    """(N, 2, 1, 1, V) logits whose softmax gives foreground probability ``p_fg[n][v]``."""
    p = torch.tensor(p_fg, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)  # softmax([0, logit]) = p
    return logits[:, :, None, None, :]


def targets(values: list[list[int]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)[:, None, None, :]


def test_cross_entropy_plain_and_class_weighted():
    # voxel a: p(fg) = 3/4, class 1 -> -ln(3/4); voxel b: p(fg) = 1/2, class 0 -> -ln(1/2)
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]], dtype=torch.float64)[:, :, None, None, :]
    target = targets([[1, 0]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(cross_entropy(logits, target)) == pytest.approx(expected, abs=1e-6)
    # weights (1, 3): (3 * -ln(3/4) + 1 * -ln(1/2)) / (3 + 1)
    weighted = (3 * -math.log(0.75) + 1 * -math.log(0.5)) / 4
    assert float(cross_entropy(logits, target, [1.0, 3.0])) == pytest.approx(weighted, abs=1e-6)


def test_cross_entropy_one_channel_is_binary():
    logits = torch.tensor([[[[[LN3, 0.0]]]]], dtype=torch.float64)  # sigmoid: 3/4 and 1/2
    target = targets([[1, 0]])
    assert float(cross_entropy(logits, target)) == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2, abs=1e-6)


def test_soft_dice_batch_and_per_sample():
    # sample 0: p = (0.75, 0.5), g = (1, 0); sample 1: p = (0.25, 0.25), g = (1, 1)   (foreground class only)
    logits = two_class_logits([[0.75, 0.5], [0.25, 0.25]])
    target = targets([[1, 0], [1, 1]])
    s = 1e-5
    # batch Dice: sum p*g = 0.75 + 0.25 + 0.25 = 1.25; sum p = 1.75; sum g = 3
    batch = 1 - (2 * 1.25 + s) / (1.75 + 3 + s)
    # per sample: (2*0.75 + s) / (1.25 + 1 + s) and (2*0.5 + s) / (0.5 + 2 + s), averaged
    per_sample = 1 - ((1.5 + s) / (2.25 + s) + (1.0 + s) / (2.5 + s)) / 2
    assert float(soft_dice(logits, target, batch=True)) == pytest.approx(batch, abs=1e-6)
    assert float(soft_dice(logits, target, batch=False)) == pytest.approx(per_sample, abs=1e-6)
    assert batch != pytest.approx(per_sample, abs=1e-3)


def test_soft_dice_with_background_and_perfect_prediction():
    logits = two_class_logits([[0.75, 0.5]])
    target = targets([[1, 0]])
    s = 1e-5
    fg = (2 * 0.75 + s) / (1.25 + 1 + s)
    bg = (2 * 0.5 + s) / (0.75 + 1 + s)  # background p = (0.25, 0.5), g = (0, 1)
    value = soft_dice(logits, target, include_background=True)
    assert float(value) == pytest.approx(1 - (fg + bg) / 2, abs=1e-6)
    perfect = torch.zeros(1, 3, 2, 2, 2)
    labels = torch.randint(0, 3, (1, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    perfect.scatter_(1, labels[:, None], 50.0)
    assert float(soft_dice(perfect, labels)) < 1e-6


def test_focal_loss_matches_formula_and_reduces_to_ce():
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]], dtype=torch.float64)[:, :, None, None, :]
    target = targets([[1, 0]])
    # p_t = 3/4 and 1/2: mean((1 - p_t)^2 * -ln p_t)
    expected = ((0.25 ** 2) * -math.log(0.75) + (0.5 ** 2) * -math.log(0.5)) / 2
    assert float(focal(logits, target, gamma=2.0)) == pytest.approx(expected, abs=1e-6)
    weighted = (3 * (0.25 ** 2) * -math.log(0.75) + 1 * (0.5 ** 2) * -math.log(0.5)) / 2
    assert float(focal(logits, target, gamma=2.0, class_weights=[1.0, 3.0])) == pytest.approx(weighted, abs=1e-6)
    assert float(focal(logits, target, gamma=0.0)) == pytest.approx(float(cross_entropy(logits, target)), abs=1e-6)


def test_signed_distance_map_in_mm():
    # 1 x 6 mask, 2 mm between voxels along x: outside distances 4, 2 / 2; inside: EDT - 2 mm -> 0, 2, 0
    mask = np.array([[0, 0, 1, 1, 1, 0]])
    phi = signed_distance_map(mask, spacing=(1.0, 2.0))
    np.testing.assert_allclose(phi, [[4.0, 2.0, 0.0, -2.0, 0.0, 2.0]])
    iso = signed_distance_map(mask)
    np.testing.assert_allclose(iso, [[2.0, 1.0, 0.0, -1.0, 0.0, 1.0]])
    # 3 x 3 square in a 5 x 5 image, voxels 2 mm (y) x 1 mm (x)
    square = np.zeros((5, 5), bool)
    square[1:4, 1:4] = True
    phi = signed_distance_map(square, spacing=(2.0, 1.0))
    assert phi[2, 2] == pytest.approx(-1.0)          # centre: nearest boundary voxel 1 mm away along x
    assert phi[1, 1] == phi[3, 2] == 0.0             # boundary voxels
    assert phi[0, 2] == pytest.approx(2.0)           # above: one voxel along y = 2 mm
    assert phi[2, 0] == pytest.approx(1.0)           # left: one voxel along x = 1 mm
    assert phi[0, 0] == pytest.approx(math.sqrt(5))  # corner: diagonal (2 mm, 1 mm)
    assert not signed_distance_map(np.zeros((3, 3))).any()
    assert not signed_distance_map(np.ones((3, 3))).any()


def test_boundary_loss_is_mean_of_probability_times_distance():
    # p(fg) = (0.5, 0.25, 0.75, 0.75, 0.5, 0.25) along 6 voxels at 2 mm, phi as above
    p = [[0.5, 0.25, 0.75, 0.75, 0.5, 0.25]]
    logits = two_class_logits(p)[:, :, 0]  # (1, 2, 1, 6): a 2D sample
    target = torch.tensor([[[0, 0, 1, 1, 1, 0]]])
    phi = [4.0, 2.0, 0.0, -2.0, 0.0, 2.0]
    expected = sum(a * b for a, b in zip(p[0], phi)) / 6  # (2 + 0.5 + 0 - 1.5 + 0 + 0.5) / 6
    assert float(boundary(logits, target, spacing=(1.0, 2.0))) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.25)


def test_hybrid_schedule_decays_dice_and_grows_boundary():
    schedule = HybridSchedule("dice", "boundary", start=1.0, step=0.01, minimum=0.14)
    assert [schedule.alpha(e) for e in (0, 10, 50)] == pytest.approx([1.0, 0.9, 0.5])
    assert schedule.alpha(86) == pytest.approx(0.14)
    assert schedule.alpha(300) == pytest.approx(0.14)
    loss = SegmentationLoss({}, hybrid=schedule, spacing=(1.0, 2.0))
    logits = two_class_logits([[0.5, 0.25, 0.75, 0.75, 0.5, 0.25]])[:, :, 0]
    target = torch.tensor([[[0, 0, 1, 1, 1, 0]]])
    dice = float(soft_dice(logits, target))
    bound = float(boundary(logits, target, spacing=(1.0, 2.0)))
    for epoch, alpha in ((0, 1.0), (30, 0.7), (100, 0.14)):
        loss.set_epoch(epoch)
        assert loss.weights() == pytest.approx({"dice": alpha, "boundary": 1 - alpha})
        total, parts = loss(logits, target)
        assert float(total) == pytest.approx(alpha * dice + (1 - alpha) * bound, abs=1e-6)
        if alpha == 1.0:
            assert set(parts) == {"dice"}  # a zero-weight term is not computed
        else:
            assert parts["boundary"] == pytest.approx(bound, abs=1e-6)


def test_weighted_sum_of_terms_and_unknown_term():
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])[:, :, None, None, :]
    target = targets([[1, 0]])
    loss = SegmentationLoss({"ce": 0.5, "dice": 2.0})
    total, parts = loss(logits, target)
    assert float(total) == pytest.approx(0.5 * parts["ce"] + 2.0 * parts["dice"], abs=1e-6)
    assert parts["ce"] == pytest.approx(float(cross_entropy(logits, target)), abs=1e-6)
    with pytest.raises(ValueError, match="unknown loss terms"):
        SegmentationLoss({"dcie": 1.0})
