"""Exact-geometry image I/O on the real scans in ../shared/data: every format round-trips, NIfTI
agrees with nibabel, the DICOM series agrees with its segmentation, and bad input fails clearly."""

from __future__ import annotations

import gzip
import json
import locale
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg_cli.errors import InputError, MedsegWarning
from medseg_cli.imaging import Geometry, Image, read_channels, read_image, write_image

TOL = 1e-6
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
VOLUME_FORMATS = [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"]


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis`` (float64)."""
    k = np.asarray(axis, dtype=np.float64)
    k /= np.linalg.norm(k)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _oblique(image: Image) -> Image:
    """The same voxels and origin with an oblique direction (the scan's own direction, rotated)."""
    direction = _rotation((1.0, 2.0, 3.0), 17.0) @ image.geometry.direction_matrix
    geometry = Geometry(image.geometry.spacing, image.geometry.origin, tuple(direction.ravel()))
    return Image(image.array, geometry, image.source, dict(image.info))


def _assert_same_grid(got: Geometry, want: Geometry) -> None:
    np.testing.assert_allclose(got.spacing, want.spacing, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(got.origin, want.origin, rtol=0, atol=TOL)
    np.testing.assert_allclose(got.direction, want.direction, rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def hippocampus(shared_data):
    """A real T2 MRI (float32, RAS storage) and its label map (uint8 0/1/2)."""
    image = read_image(shared_data / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")
    label = read_image(shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz")
    return image, label


@pytest.fixture(scope="module")
def brain_crop(shared_data):
    """A crop of a real anisotropic brain MRI (int16, 0.78 × 0.78 × 6.5 mm) and its tumour label."""
    image = read_image(shared_data / "nrrd" / "brain1_image.nrrd")
    label = read_image(shared_data / "nrrd" / "brain1_label.nrrd")
    box = (slice(8, 20), slice(90, 150), slice(150, 220))
    assert label.array[box].max() == 1, "the crop should hold some tumour"
    # origin of the crop: world position of its first voxel
    start = image.geometry.index_to_world_matrix() @ np.array([box[2].start, box[1].start, box[0].start, 1.0])
    geometry = Geometry(image.geometry.spacing, tuple(start[:3]), image.geometry.direction)
    return Image(image.array[box].copy(), geometry), Image(label.array[box].copy(), geometry)


# ------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("suffix", VOLUME_FORMATS)
@pytest.mark.parametrize("source", ["hippocampus", "brain_crop"])
def test_every_volume_format_round_trips_exactly_with_oblique_direction(suffix, source, request, tmp_path):
    image, label = request.getfixturevalue(source)
    image, label = _oblique(image), _oblique(label)
    assert not np.allclose(np.abs(image.geometry.direction_matrix), np.eye(3), atol=0.1)

    written = write_image(image, tmp_path / f"scan{suffix}")
    back = read_image(written)
    assert back.array.dtype == image.array.dtype
    assert np.array_equal(back.array, image.array)
    _assert_same_grid(back.geometry, image.geometry)

    # a label map given as float64 is stored as the smallest integer type and reads back the same
    as_float = label.with_array(label.array.astype(np.float64))
    back_label = read_image(write_image(as_float, tmp_path / f"label{suffix}", label=True))
    assert back_label.array.dtype == np.uint8
    assert np.array_equal(back_label.array, label.array)
    _assert_same_grid(back_label.geometry, label.geometry)
    # nothing but the outputs (and, for detached headers, their data files) was left in the folder
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if n.startswith(".")], names


def test_label_maps_are_written_as_integers_wide_enough(hippocampus, tmp_path):
    _, label = hippocampus
    wide = label.with_array(label.array.astype(np.float32) * 300)  # 0, 300, 600
    back = read_image(write_image(wide, tmp_path / "wide.nii.gz", label=True))
    assert back.array.dtype == np.uint16
    assert np.array_equal(back.array, wide.array.astype(np.uint16))
    with pytest.raises(InputError, match="non-integer"):
        write_image(label.with_array(label.array + 0.5), tmp_path / "bad.nii.gz", label=True)
    assert not (tmp_path / "bad.nii.gz").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_multichannel_round_trip(hippocampus, suffix, tmp_path):
    image, label = hippocampus
    stacked = Image(np.stack([image.array, label.array.astype(np.float32)]), _oblique(image).geometry)
    back = read_image(write_image(stacked, tmp_path / f"two{suffix}"))
    assert back.array.shape == stacked.array.shape
    assert np.array_equal(back.array, stacked.array)
    _assert_same_grid(back.geometry, stacked.geometry)


def test_planar_png_and_tiff_round_trip(shared_data, tmp_path):
    rgb = read_image(shared_data / "ultrasound" / "masks" / "0000.png")
    assert rgb.array.shape == (3, 1, 512, 512) and rgb.geometry.spacing == (1.0, 1.0, 1.0)
    assert np.array_equal(read_image(write_image(rgb, tmp_path / "m.png")).array, rgb.array)
    grey = read_image(shared_data / "drive" / "training" / "1st_manual" / "21_manual1.png")
    assert grey.array.shape == (1, 584, 565)
    back = read_image(write_image(grey, tmp_path / "v.tif"))
    assert np.array_equal(back.array, grey.array)
    with pytest.raises(InputError, match="cannot be stored"):
        write_image(Image(np.zeros((2, 4, 4), np.uint8)), tmp_path / "vol.png")


# ------------------------------------------------------------------------------- NIfTI vs nibabel

def test_nifti_written_by_medseg_has_the_ras_affine_nibabel_expects(hippocampus, tmp_path):
    """SimpleITK's geometry is LPS; a NIfTI affine is RAS: affine = diag(-1, -1, 1) @ [D·S | o]."""
    image = _oblique(hippocampus[0])
    path = write_image(image, tmp_path / "oblique.nii.gz")
    loaded = nib.load(str(path))
    expected = LPS_TO_RAS @ image.geometry.index_to_world_matrix()
    np.testing.assert_allclose(loaded.affine, expected, atol=1e-5)
    # and the voxel order: nibabel data[x, y, z] is medseg array[z, y, x]
    assert np.array_equal(np.asarray(loaded.dataobj).T, image.array)


def test_real_nifti_geometry_matches_nibabel(shared_data):
    """Independent readers agree on where every real NIfTI lies (qform/sform handled the same way)."""
    for path in sorted((shared_data / "totalseg").glob("*.nii.gz")):
        image = read_image(path)
        affine = nib.load(str(path)).affine
        np.testing.assert_allclose(LPS_TO_RAS @ image.geometry.index_to_world_matrix(), affine, atol=1e-4,
                                   err_msg=str(path))


# --------------------------------------------------------------------------------- DICOM vs NIfTI

def _voxel_centres(image: Image, indices_xyz: np.ndarray) -> np.ndarray:
    """LPS world positions (mm) of voxel indices given as rows (x, y, z)."""
    homogeneous = np.c_[indices_xyz, np.ones(len(indices_xyz))]
    return (image.geometry.index_to_world_matrix() @ homogeneous.T).T[:, :3]


def test_dicom_series_and_its_segmentation_share_one_physical_grid(shared_data):
    """The 20-slice DICOM series and example_seg_dicom.nii.gz describe the SAME voxels in space.

    Facts: the DICOM series reads as 20 × 512 × 512 voxels of 0.977 × 0.977 × 2 mm, identity
    direction, origin y = −437.51 mm. The segmentation written for it (example_seg_dicom.nii.gz)
    has direction y = −1 and origin y = +61.51 mm = −437.51 + 511 × 0.9766: its writer stored the
    rows of each slice in the opposite order (the Y axis flipped, as RAS-minded tools do) and moved
    the origin to the other end of that axis. Headers differ, the physical grid does not: the two
    sets of voxel centres coincide, with Y index j of one being 511 − j of the other.

    example_ct.nii.gz is NOT this series: it is a different, 3 mm CT (112 × 101 × 122 voxels).
    """
    dicom = read_image(shared_data / "totalseg" / "example_ct_dicom")
    seg = read_image(shared_data / "totalseg" / "example_seg_dicom.nii.gz")
    assert dicom.info["format"] == "DICOM series" and dicom.info["dicom_slices"] == 20
    assert dicom.spatial_shape == seg.spatial_shape == (20, 512, 512)
    np.testing.assert_allclose(dicom.geometry.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    np.testing.assert_allclose(seg.geometry.spacing, dicom.geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(dicom.geometry.direction, np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_allclose(seg.geometry.direction, np.diag([1.0, -1.0, 1.0]).ravel(), atol=1e-6)
    assert dicom.geometry.origin[1] == pytest.approx(-437.51171875, abs=1e-4)
    assert seg.geometry.origin[1] == pytest.approx(-437.51171875 + 511 * 0.9765625, abs=1e-4)
    assert seg.geometry.origin[1] == pytest.approx(61.51, abs=0.01)
    np.testing.assert_allclose([seg.geometry.origin[0], seg.geometry.origin[2]],
                               [dicom.geometry.origin[0], dicom.geometry.origin[2]], atol=1e-4)

    # the physical voxel centres: every corner and some inner voxels, index j <-> 511 - j in Y
    rng = np.random.default_rng(0)
    corners = np.array([[x, y, z] for x in (0, 511) for y in (0, 511) for z in (0, 19)], dtype=float)
    inner = np.c_[rng.integers(0, 512, 50), rng.integers(0, 512, 50), rng.integers(0, 20, 50)].astype(float)
    indices = np.r_[corners, inner]
    flipped = indices.copy()
    flipped[:, 1] = 511 - flipped[:, 1]
    np.testing.assert_allclose(_voxel_centres(dicom, indices), _voxel_centres(seg, flipped), atol=1e-3)
    assert not np.allclose(_voxel_centres(dicom, indices), _voxel_centres(seg, indices), atol=1.0)

    # the segmentation lies on the body in the CT: organ voxels are soft tissue, not air
    organ_hu = dicom.array[:, ::-1, :][seg.array > 0]
    assert np.median(organ_hu) > -200
    assert np.median(dicom.array[:, ::-1, :][seg.array == 0][:: 97]) < np.median(organ_hu)



def _world_box(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS world coordinates (mm) of the image's voxel centres."""
    z, y, x = image.spatial_shape
    corners = np.array([[i, j, k] for i in (0, x - 1) for j in (0, y - 1) for k in (0, z - 1)], dtype=float)
    world = _voxel_centres(image, corners)
    return world.min(axis=0), world.max(axis=0)


def test_dicom_series_versus_example_ct_nifti(shared_data):
    """The issue asks to compare the DICOM series with example_ct.nii.gz: they differ, because they are
    two different scans, not two encodings of one scan.

    example_ct.nii.gz is TotalSegmentator's 3 mm example CT, 112 × 101 × 122 voxels stored RAS (x and
    y index axes point to −x and −y LPS); the DICOM series is a 20-slice 0.98 × 0.98 × 2 mm CT stored
    LPS. Shape, spacing, origin and orientation all differ, and the regions of space they cover do not
    even overlap (the CT lies 860 mm above the series along z). A reader bug (an axis flip or a
    transposition) could not produce that: the series' own segmentation matches it voxel for voxel
    (previous test), and the NIfTI agrees with nibabel (test_real_nifti_geometry_matches_nibabel).
    """
    dicom = read_image(shared_data / "totalseg" / "example_ct_dicom")
    ct = read_image(shared_data / "totalseg" / "example_ct.nii.gz")
    assert ct.spatial_shape == (112, 101, 122) and dicom.spatial_shape == (20, 512, 512)
    np.testing.assert_allclose(ct.geometry.spacing, (3.0, 3.0, 3.0), atol=1e-4)
    np.testing.assert_allclose(dicom.geometry.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert ct.geometry.orientation_code() == "RAS" and dicom.geometry.orientation_code() == "LPS"
    np.testing.assert_allclose(ct.geometry.origin, (177.956, -11.319, 94.302), atol=1e-3)
    np.testing.assert_allclose(dicom.geometry.origin, (-249.512, -437.512, -804.5), atol=1e-3)
    ct_low, ct_high = _world_box(ct)
    dicom_low, dicom_high = _world_box(dicom)
    assert dicom_high[2] < ct_low[2]  # disjoint along z: no common voxel
    assert ct_low[2] - dicom_high[2] == pytest.approx(860.8, abs=0.1)
    # both are CTs in Hounsfield units: air at about -1000 and a body in each
    for scan in (ct, dicom):
        assert scan.array.min() <= -1000 and np.median(scan.array) < 0 < scan.array.max()


# ---------------------------------------------------------------------------------- bad input (CLI)

def _one_clean_error_line(result, path: Path) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and path.name in lines[0], lines[0]
    assert result.stdout.strip() == ""
    return lines[0]


def _snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(medseg, shared_data, tmp_path):
    ct = shared_data / "totalseg" / "example_ct_sm.nii.gz"
    raw = gzip.decompress(ct.read_bytes())
    cases = {}
    cases["missing.nii.gz"] = None
    (tmp_path / "truncated.nii.gz").write_bytes(ct.read_bytes()[: ct.stat().st_size // 2])
    cases["truncated.nii.gz"] = "truncated or corrupt"
    (tmp_path / "short_data.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 3]))
    cases["short_data.nii.gz"] = "shorter than its header"
    (tmp_path / "short_data.nii").write_bytes(raw[: len(raw) // 3])
    cases["short_data.nii"] = "shorter than its header"
    (tmp_path / "notes.nii.gz").write_text("these are my notes, not a scan\n")
    cases["notes.nii.gz"] = "not gzip"
    (tmp_path / "empty_dicom").mkdir()
    cases["empty_dicom"] = "no DICOM series"
    nan = Image(np.full((4, 6, 5), np.nan, np.float32))
    sitk.WriteImage(sitk.GetImageFromArray(nan.array), str(tmp_path / "all_nan.nii.gz"))  # not via medseg
    cases["all_nan.nii.gz"] = "NaN"
    sitk.WriteImage(sitk.GetImageFromArray(nan.array), str(tmp_path / "all_nan.mha"))
    cases["all_nan.mha"] = "NaN"
    write_image(read_image(ct), tmp_path / "cut.mha")
    data = (tmp_path / "cut.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[: len(data) // 2])
    cases["cut.mha"] = "shorter than its header"
    write_image(read_image(ct), tmp_path / "detached.mhd")
    (tmp_path / "detached.raw").unlink(missing_ok=True)
    for companion in tmp_path.glob("detached.*raw*"):
        companion.unlink()
    cases["detached.mhd"] = "missing"
    # a real GIF (1 × 1 pixel); SimpleITK has no GIF reader and no chosen dependency reads GIF
    (tmp_path / "dot.gif").write_bytes(bytes.fromhex(
        "47494638396101000100800000000000ffffff2c00000000010001000002024401003b"))
    cases["dot.gif"] = "GIF"
    png = shared_data / "ultrasound" / "images" / "0000.png"
    (tmp_path / "cut.png").write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # libpng would zero-fill it
    cases["cut.png"] = "truncated"
    (tmp_path / "one_slice").mkdir()
    slice_file = sorted((shared_data / "totalseg" / "example_ct_dicom").iterdir())[0]
    shutil.copy(slice_file, tmp_path / "one_slice" / slice_file.name)
    cases[f"one_slice/{slice_file.name}"] = "single DICOM file"
    before = _snapshot(tmp_path)
    for name, expected in cases.items():
        line = _one_clean_error_line(medseg("info", tmp_path / name), tmp_path / name)
        if expected:
            assert expected.lower() in line.lower(), line
    assert _snapshot(tmp_path) == before


def test_nan_voxels_that_itk_would_hide_are_reported(tmp_path):
    """ITK 5.4 replaces NaN in NIfTI by 0; medseg restores them and warns (and refuses an all-NaN scan)."""
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    array[0, 1, 2] = np.nan
    array[2, 3, 4] = np.inf
    nib.save(nib.Nifti1Image(array.T, np.eye(4)), str(tmp_path / "holes.nii.gz"))
    with pytest.warns(MedsegWarning, match="2 voxels are NaN"):
        image = read_image(tmp_path / "holes.nii.gz")
    assert np.isnan(image.array[0, 1, 2]) and np.isposinf(image.array[2, 3, 4])
    assert image.array[0, 0, 0] == 0.0  # a real zero stays zero
    finite = np.isfinite(array)
    assert np.array_equal(image.array[finite], array[finite])


def test_folder_with_two_series_picks_the_largest_and_says_so(medseg, shared_data, tmp_path):
    """A copy of the real series plus 6 of its slices re-written as another series (new UID)."""
    folder = tmp_path / "two_series"
    folder.mkdir()
    source = sorted((shared_data / "totalseg" / "example_ct_dicom").iterdir())
    for path in source:
        shutil.copy(path, folder / path.name)
    uid = "1.2.826.0.1.3680043.2.1125.99.1"
    keep = ("0008|0008", "0008|0020", "0008|0060", "0018|0050", "0020|0013", "0020|0032", "0020|0037", "0028|0030")
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's DICOM writer switches the C locale to "C"
    for i, path in enumerate(source[:6]):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        image = reader.Execute()
        for key in image.GetMetaDataKeys():
            if key not in keep:
                image.EraseMetaData(key)
        image.SetMetaData("0020|000e", uid)  # SeriesInstanceUID
        image.SetMetaData("0020|0011", "99")  # SeriesNumber
        image.SetMetaData("0008|0018", f"{uid}.{i}")  # SOPInstanceUID
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"second_{i}.dcm"))
        writer.Execute(image)
    locale.setlocale(locale.LC_ALL, saved_locale)  # else later subprocess text decoding falls back to ASCII

    result = medseg("info", "--json", folder)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["size_zyx"] == [20, 512, 512] and facts["dicom_slices"] == 20
    assert facts["dicom_other_series"] == {uid: 6}
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "2 DICOM series" in warning[0] and "20 slices" in warning[0]
    assert "ignoring 1 other" in warning[0] and "--series" in warning[0]

    picked = medseg("info", "--json", "--series", uid, folder)
    assert picked.returncode == 0, picked.stderr
    assert json.loads(picked.stdout)["size_zyx"] == [6, 512, 512]
    _one_clean_error_line(medseg("info", "--series", "1.2.3", folder), folder)


def test_modalities_with_different_geometry_are_refused(shared_data, hippocampus, tmp_path):
    image, _ = hippocampus
    a = write_image(image, tmp_path / "t2.nii.gz")
    moved = Image(image.array, Geometry(image.geometry.spacing, (5.0, 0.0, 0.0), image.geometry.direction))
    b = write_image(moved, tmp_path / "flair.nii.gz")
    c = write_image(_oblique(image), tmp_path / "oblique.nii.gz")
    stacked = read_channels([a, a])
    assert stacked.array.shape == (2,) + image.spatial_shape
    for other in (b, c):
        with pytest.raises(InputError) as caught:
            read_channels([a, other])
        assert caught.value.exit_code == 2
        assert str(other) in str(caught.value) and "\n" not in str(caught.value)
    other_shape = shared_data / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz"
    with pytest.raises(InputError, match="grid"):
        read_channels([a, other_shape])


def test_unwritable_output_path_fails_cleanly(hippocampus, tmp_path):
    image, _ = hippocampus
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(InputError) as caught:
        write_image(image, blocker / "mask.nii.gz")
    assert caught.value.exit_code == 2 and "results" in str(caught.value)
    assert blocker.read_text().startswith("a file")
    # an existing good output is never damaged by a failed write
    good = write_image(image, tmp_path / "mask.nii.gz")
    before = good.read_bytes()
    with pytest.raises(InputError):
        write_image(image.with_array(image.array + 0.5), good, label=True)
    with pytest.raises(InputError):
        write_image(Image(np.zeros((2, 4, 4), np.float32)), tmp_path / "mask.png")
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "results"]
