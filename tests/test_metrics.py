"""Metrics against values computed by hand, a brute-force reference and the real TotalSegmentator pair.

No peer library is needed: agreement with DeepMind's surface-distance and MedPy is checked in
benchmarks/bench_eval.py; here every expected number is derived in the test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from medseg_cli.console import to_json
from medseg_cli.evaluation.metrics import (assd, class_scores, compare_masks, confusion_matrix, hausdorff,
                                           mean_surface_distances, miou_mpa, normalised_surface_dice)
from medseg_cli.evaluation.surfaces import element_area_table, surface_distances

SPACING = (2.0, 0.5, 0.7)  # mm (Z, Y, X): anisotropic on purpose
CONVENTIONS = ("element", "voxel")


def corner_area(spacing):
    """Area of the one marching-cubes triangle cutting a voxel corner (area vector (1,1,1)/8)."""
    s0, s1, s2 = spacing
    return math.sqrt((s1 * s2) ** 2 + (s0 * s2) ** 2 + (s0 * s1) ** 2) / 8


# ----------------------------------------------------------------------------- hand-computable

@pytest.mark.parametrize("convention", CONVENTIONS)
def test_single_voxels_three_slices_apart(convention):
    pred = np.zeros((9, 5, 5), bool)
    ref = np.zeros_like(pred)
    pred[2, 2, 2] = ref[5, 2, 2] = True
    sd = surface_distances(pred, ref, SPACING, convention=convention)
    sz = SPACING[0]
    if convention == "voxel":  # one border voxel each, 3 slices apart
        assert sd.pred_to_ref.tolist() == [3 * sz] and sd.ref_to_pred.tolist() == [3 * sz]
        expected = {"hd": 3 * sz, "hd95": 3 * sz, "assd": 3 * sz}
        assert normalised_surface_dice(sd, 3 * sz - 0.01) == 0.0
    else:  # 8 corners each of equal area; near corners 2 slices apart, far ones 3
        assert sd.pred_weights.size == 8 and np.allclose(sd.pred_weights, corner_area(SPACING))
        assert sorted(sd.pred_to_ref.tolist()) == [2 * sz] * 4 + [3 * sz] * 4
        expected = {"hd": 3 * sz, "hd95": 3 * sz, "assd": 2.5 * sz}
        assert normalised_surface_dice(sd, 2 * sz) == pytest.approx(0.5)
    assert hausdorff(sd) == pytest.approx(expected["hd"], abs=1e-12)
    assert hausdorff(sd, 95) == pytest.approx(expected["hd95"], abs=1e-12)
    assert assd(sd) == pytest.approx(expected["assd"], abs=1e-12)
    assert normalised_surface_dice(sd, 3 * sz) == 1.0


def test_single_voxel_surface_area_is_eight_corner_triangles():
    mask = np.zeros((3, 3, 3), bool)
    mask[1, 1, 1] = True
    sd = surface_distances(mask, mask, SPACING)
    assert sd.pred_weights.sum() == pytest.approx(8 * corner_area(SPACING), rel=1e-12)
    assert np.all(sd.pred_to_ref == 0) and np.all(sd.ref_to_pred == 0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_cubes_offset_along_z(convention):
    """Cube B = cube A moved t slices along z: every point of A's bottom face is t·sz from B's
    surface and no point is farther, and that face holds more than 5 % of the surface weight."""
    n, t = 6, 2
    pred = np.zeros((14, 10, 10), bool)
    ref = np.zeros_like(pred)
    pred[2:2 + n, 2:2 + n, 2:2 + n] = True
    ref[2 + t:2 + t + n, 2:2 + n, 2:2 + n] = True
    metrics = compare_masks(pred, ref, SPACING, convention=convention, tolerance_mm=100.0)
    assert metrics["hd"] == pytest.approx(t * SPACING[0], abs=1e-12)
    assert metrics["hd95"] == pytest.approx(t * SPACING[0], abs=1e-12)
    assert metrics["nsd"] == 1.0
    assert metrics["dice"] == pytest.approx(2 * (n - t) / (2 * n))
    assert metrics["volume_pred_mm3"] == pytest.approx(n ** 3 * np.prod(SPACING))
    assert 0 < metrics["assd"] < metrics["hd95"]
    swapped = compare_masks(ref, pred, SPACING, convention=convention, tolerance_mm=100.0)
    for key in ("dice", "iou", "hd", "hd95", "assd", "nsd"):
        assert swapped[key] == pytest.approx(metrics[key], abs=1e-12), key
    assert swapped["msd_pred_to_ref"] == pytest.approx(metrics["msd_ref_to_pred"], abs=1e-12)
    assert swapped["precision"] == pytest.approx(metrics["recall"])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_planes_two_slices_apart(convention):
    """One-voxel-thick plates 2 slices apart: voxel borders all at 2·sz; corner points at sz or 2·sz
    with equal weight above and below."""
    pred = np.zeros((8, 6, 7), bool)
    ref = np.zeros_like(pred)
    pred[2, 1:5, 1:6] = True
    ref[4, 1:5, 1:6] = True
    sd = surface_distances(pred, ref, SPACING, convention=convention)
    sz = SPACING[0]
    if convention == "voxel":
        assert np.allclose(sd.pred_to_ref, 2 * sz) and np.allclose(sd.ref_to_pred, 2 * sz)
        assert assd(sd) == pytest.approx(2 * sz)
    else:
        assert assd(sd) == pytest.approx(1.5 * sz, abs=1e-12)
        assert set(np.round(sd.pred_to_ref, 9)) == {round(sz, 9), round(2 * sz, 9)}
    assert hausdorff(sd) == pytest.approx(2 * sz) and hausdorff(sd, 95) == pytest.approx(2 * sz)


def test_plate_face_cells_have_the_face_area():
    """Inside a flat face every surface point is one face cell: area = spacing_y × spacing_x."""
    mask = np.zeros((6, 8, 8), bool)
    mask[2:4, 1:7, 1:7] = True
    table = element_area_table(SPACING)
    assert table[0b11110000] == pytest.approx(SPACING[1] * SPACING[2])  # lower half of the cube inside
    assert table[0b11001100] == pytest.approx(SPACING[0] * SPACING[2])
    assert table[0b10101010] == pytest.approx(SPACING[0] * SPACING[1])
    assert table[0] == table[255] == 0
    assert np.allclose(table[1:255], table[254:0:-1])  # a code and its complement: one surface


def test_square_2d_perimeter_and_shift():
    """Marching squares on an n×n square: straight sides plus four half-diagonal corners."""
    n, s0, s1 = 5, 0.5, 0.8
    pred = np.zeros((1, 12, 12), bool)  # a 2D image is a one-slice volume
    pred[0, 2:2 + n, 2:2 + n] = True
    ref = np.roll(pred, 3, axis=2)
    sd = surface_distances(pred, ref, (9.9, s0, s1))  # the Z spacing of a 2D image is ignored
    perimeter = 2 * (n - 1) * (s0 + s1) + 2 * math.hypot(s0, s1)
    assert sd.pred_weights.sum() == pytest.approx(perimeter, rel=1e-12)
    assert hausdorff(sd) == pytest.approx(3 * s1) and hausdorff(sd, 95) == pytest.approx(3 * s1)
    voxel = compare_masks(pred, ref, (9.9, s0, s1), convention="voxel")
    assert voxel["hd"] == pytest.approx(3 * s1)
    assert voxel["volume_pred_mm3"] == pytest.approx(n * n * s0 * s1)  # mm² for 2D


# --------------------------------------------------------------------------------- brute force

def _brute_force(pred, ref, spacing, convention):
    """Reference implementation: surface points from explicit neighbourhood tests, distances from
    every pair of points (no cropping, no k-d tree, no distance transform)."""
    def points(mask):
        padded = np.pad(mask, 1)
        if convention == "voxel":
            inside = padded[1:-1, 1:-1, 1:-1]
            eroded = inside.copy()
            for axis in range(3):
                for shift in (-1, 1):
                    eroded &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
            border = inside & ~eroded
            return np.argwhere(border), np.ones(int(border.sum()))
        corners, weights = [], []
        table = element_area_table(tuple(spacing))
        for z in range(padded.shape[0] - 1):
            for y in range(padded.shape[1] - 1):
                for x in range(padded.shape[2] - 1):
                    cube = padded[z:z + 2, y:y + 2, x:x + 2].ravel()
                    code = int(sum(int(bit) << (7 - i) for i, bit in enumerate(cube)))
                    if 0 < code < 255:
                        corners.append((z, y, x))
                        weights.append(table[code])
        return np.array(corners), np.array(weights)

    (pa, wa), (pb, wb) = points(pred), points(ref)
    step = np.asarray(spacing)
    pairwise = np.sqrt((((pa[:, None, :] - pb[None, :, :]) * step) ** 2).sum(-1))
    return pairwise.min(1), pairwise.min(0), wa, wb


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_on_random_blobs(convention, seed):
    rng = np.random.default_rng(seed)
    shape = (9, 14, 13)
    smooth = ndimage.gaussian_filter(rng.random(shape), 1.5)
    pred = smooth > np.quantile(smooth, 0.7)
    ref = ndimage.binary_dilation(pred, iterations=1) & (rng.random(shape) > 0.1)
    ref[0, :3, :3] = True  # touches the array border: cropping must treat it as outside
    pred_to_ref, ref_to_pred, wp, wr = _brute_force(pred, ref, SPACING, convention)
    for method in ("kdtree", "edt"):
        sd = surface_distances(pred, ref, SPACING, convention=convention, method=method)
        # same points in the same (C) order, same distances
        assert np.allclose(sd.pred_to_ref, pred_to_ref, atol=1e-9, rtol=0)
        assert np.allclose(sd.ref_to_pred, ref_to_pred, atol=1e-9, rtol=0)
        assert np.allclose(sd.pred_weights, wp) and np.allclose(sd.ref_weights, wr)
    sd = surface_distances(pred, ref, SPACING, convention=convention)
    assert hausdorff(sd) == pytest.approx(max(pred_to_ref.max(), ref_to_pred.max()))
    expected_assd = (np.sum(pred_to_ref * wp) + np.sum(ref_to_pred * wr)) / (wp.sum() + wr.sum())
    assert assd(sd) == pytest.approx(expected_assd)
    if convention == "voxel":
        assert hausdorff(sd, 95) == pytest.approx(np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), 95))


def test_far_apart_blobs_use_the_tree_fallback():
    """Surfaces farther apart than the local offset search still get exact distances."""
    pred = np.zeros((4, 40, 40), bool)
    ref = np.zeros_like(pred)
    pred[1:3, 2:6, 2:6] = True
    ref[1:3, 30:35, 25:37] = True
    a, b, _, _ = _brute_force(pred, ref, SPACING, "voxel")
    sd = surface_distances(pred, ref, SPACING, convention="voxel")
    assert np.allclose(sd.pred_to_ref, a) and np.allclose(sd.ref_to_pred, b)


# ------------------------------------------------------------------------------------ empty cases

@pytest.mark.parametrize("convention", CONVENTIONS)
def test_empty_case_table(convention):
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = True
    both = compare_masks(empty, empty, SPACING, convention=convention)
    assert both["status"] == "both_empty"
    assert (both["dice"], both["iou"], both["nsd"], both["precision"], both["recall"]) == (1, 1, 1, 1, 1)
    assert all(both[k] == 0.0 for k in ("hd", "hd95", "assd", "msd_pred_to_ref", "msd_ref_to_pred"))
    for pred, ref, status in ((empty, some, "pred_empty"), (some, empty, "ref_empty")):
        row = compare_masks(pred, ref, SPACING, convention=convention)
        assert row["status"] == status
        assert row["dice"] == row["iou"] == row["nsd"] == 0.0
        assert all(math.isinf(row[k]) for k in ("hd", "hd95", "assd", "msd_pred_to_ref", "msd_ref_to_pred"))
        as_json = json.loads(to_json(row))
        assert as_json["hd95"] is None and as_json["status"] == status
    assert compare_masks(some, some, SPACING, convention=convention)["hd"] == 0.0


def test_surface_functions_on_empty_surfaces():
    empty = np.zeros((3, 3, 3), bool)
    sd = surface_distances(empty, empty, (1, 1, 1))
    assert hausdorff(sd) == 0 and assd(sd) == 0 and normalised_surface_dice(sd, 1) == 1
    one = empty.copy()
    one[1, 1, 1] = True
    sd = surface_distances(one, empty, (1, 1, 1))
    assert math.isinf(hausdorff(sd, 95)) and math.isinf(assd(sd)) and normalised_surface_dice(sd, 1) == 0
    assert math.isinf(mean_surface_distances(sd)[0])


# ------------------------------------------------------------------------ FOV, mIoU and mPA

def test_fov_mask_excludes_voxels_outside():
    pred = np.zeros((1, 6, 6), bool)
    ref = pred.copy()
    pred[0, 1:3, 1:3] = ref[0, 1:3, 1:3] = True
    pred[0, 5, 5] = True  # a false positive outside the field of view
    fov = np.ones_like(pred)
    fov[0, 4:, 4:] = False
    assert compare_masks(pred, ref, (1, 1, 1))["dice"] < 1
    inside = compare_masks(pred, ref, (1, 1, 1), fov=fov)
    assert inside["dice"] == 1.0 and inside["hd"] == 0.0
    assert inside["specificity"] == 1.0
    counted = compare_masks(pred, ref, (1, 1, 1), fov=fov)
    assert counted["voxels_pred"] == 4
    pred[0, 0, 5] = True  # a false positive inside: negatives are counted inside the fov only (32 - 4)
    assert compare_masks(pred, ref, (1, 1, 1), fov=fov)["specificity"] == pytest.approx(27 / 28)


def test_confusion_matrix_miou_and_mpa_by_hand():
    ref = np.array([0, 0, 1, 1, 2, 2, 0, 0])
    pred = np.array([0, 1, 1, 1, 2, 0, 0, 0])
    matrix = confusion_matrix(pred, ref, [0, 1, 2])
    assert matrix.tolist() == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows: reference, columns: prediction
    scores = class_scores(matrix)
    # PA_c = hits / reference voxels of c (not / predicted voxels: the seed's swap)
    assert scores["pixel_accuracy"] == pytest.approx([3 / 4, 2 / 2, 1 / 2])
    assert scores["iou"] == pytest.approx([3 / 5, 2 / 3, 1 / 2])
    miou, mpa = miou_mpa(matrix)
    assert miou == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 3)
    assert mpa == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    # a class absent from both maps is left out of the means, not counted as 0 or 1
    assert miou_mpa(confusion_matrix(pred, ref, [0, 1, 2, 7])) == pytest.approx((miou, mpa))
    # voxels of a label outside the class list: ignored, or background on request
    assert confusion_matrix(pred, ref, [0, 1]).sum() == 6
    assert confusion_matrix(pred, ref, [0, 1], unlisted_as_background=True).tolist() == [[5, 1], [0, 2]]
    fov = np.array([1, 1, 1, 1, 1, 0, 1, 1], bool)
    assert confusion_matrix(pred, ref, [0, 1, 2], fov=fov).sum() == 7


# ------------------------------------------------------------------------------- the real pair

@pytest.fixture(scope="module")
def real_pair(shared_data):
    from medseg_cli.imaging import read_image

    ref = read_image(shared_data / "totalseg" / "example_seg.nii.gz")
    pred = read_image(shared_data / "totalseg" / "example_seg_fast.nii.gz")
    return pred, ref


def test_real_totalsegmentator_pair(real_pair):
    pred_img, ref_img = real_pair
    spacing = ref_img.geometry.spacing_zyx
    labels = sorted(set(np.unique(ref_img.array)) & set(np.unique(pred_img.array)) - {0})[:6]
    assert len(labels) >= 4
    for label in labels:
        pred, ref = pred_img.array == label, ref_img.array == label
        tp = np.logical_and(pred, ref).sum()
        expected_dice = 2 * tp / (pred.sum() + ref.sum())
        for convention in CONVENTIONS:
            m = compare_masks(pred, ref, spacing, convention=convention, tolerance_mm=1e6)
            assert m["status"] == "ok"
            assert m["dice"] == pytest.approx(expected_dice, abs=1e-12)
            assert m["nsd"] == 1.0
            assert m["hd"] >= m["hd95"] >= 0 and m["hd"] >= m["assd"] >= 0
            assert m["volume_ref_mm3"] == pytest.approx(ref.sum() * np.prod(spacing))
            swapped = compare_masks(ref, pred, spacing, convention=convention, tolerance_mm=1.0)
            again = compare_masks(pred, ref, spacing, convention=convention, tolerance_mm=1.0)
            for key in ("dice", "hd", "hd95", "assd", "nsd"):
                assert swapped[key] == pytest.approx(again[key], abs=1e-12)
            assert 0 <= again["nsd"] <= 1


@pytest.mark.parametrize("spacing", [(50.0, 0.1, 0.1), (6.5, 0.78, 0.78), (1.0, 1.0, 1.0)])
def test_local_search_equals_distance_transform_at_any_anisotropy(spacing):
    smooth = ndimage.gaussian_filter(np.random.default_rng(3).random((6, 40, 40)), 2)
    pred = smooth > 0.5
    ref = np.roll(pred, 3, axis=1)
    for convention in CONVENTIONS:
        fast = surface_distances(pred, ref, spacing, convention=convention)
        slow = surface_distances(pred, ref, spacing, convention=convention, method="edt")
        assert np.allclose(fast.pred_to_ref, slow.pred_to_ref, rtol=0, atol=1e-9)
        assert np.allclose(fast.ref_to_pred, slow.ref_to_pred, rtol=0, atol=1e-9)
