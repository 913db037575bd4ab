"""``medseg --version``, ``--help`` and ``medseg info`` on every kind of real file in ../shared/data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from medseg_cli import __version__
from medseg_cli.cli import main
from medseg_cli.imaging import Image, describe, file_suffix, read_image

LABEL_NAME = re.compile(r"label|seg|manual|mask", re.I)


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """Every scan under ``root`` (an image file, or a folder of DICOM slices counted once) and every
    other file (documentation, licences)."""
    scans, others, dicom_folders = [], [], set()
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        if file_suffix(path):
            scans.append(path)
        elif _is_dicom(path):
            dicom_folders.add(path.parent)
        else:
            others.append(path)
    return scans + sorted(dicom_folders), others


def _sitk_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """Size (x, y[, z]), spacing and components per pixel as SimpleITK reads them from the header alone."""
    reader = sitk.ImageFileReader()
    if path.is_dir():
        reader.SetFileName(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))[0])
        reader.ReadImageInformation()
        count = len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        return (*reader.GetSize()[:2], count), reader.GetSpacing()[:2], reader.GetNumberOfComponents()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetSpacing(), reader.GetNumberOfComponents()


def test_version_and_help(medseg):
    version = medseg("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"medseg, version {__version__}"
    helped = medseg("--help")
    assert helped.returncode == 0
    for word in ("info", "predict", "eval", "train", "Exit codes"):
        assert word in helped.stdout
    info_help = medseg("info", "--help")
    assert info_help.returncode == 0 and "--json" in info_help.stdout and "--series" in info_help.stdout


def test_info_json_on_every_file_in_shared_data(shared_data):
    """``medseg info --json`` (in-process) on EVERY scan in ../shared/data, the DICOM folder as one scan:
    parseable, equal to SimpleITK's header, label volumes adding up; other files fail cleanly (exit 2)."""
    runner = CliRunner()
    scans, others = _walk(shared_data)
    assert len(scans) == 1042 and shared_data / "totalseg" / "example_ct_dicom" in scans
    assert {p.name for p in others} == {"README.md", "LICENSE"}
    seen_kinds = set()
    for path in scans:
        result = runner.invoke(main, ["info", "--json", str(path)])
        assert result.exit_code == 0, (path, result.output)
        facts = json.loads(result.stdout)
        size, spacing, components = _sitk_header(path)
        expected_size = list(size)[::-1]
        if len(expected_size) == 2:
            expected_size = [1] + expected_size
        assert facts["size_zyx"] == expected_size, path
        np.testing.assert_allclose(facts["spacing_xyz_mm"][: len(spacing)], spacing, rtol=1e-6, err_msg=str(path))
        assert facts["channels"] == components, path
        assert len(facts["orientation"]) == 3 and facts["intensity_min"] <= facts["intensity_max"]
        total = int(np.prod(expected_size))
        voxel = float(np.prod(facts["spacing_xyz_mm"]))
        is_mask = bool(LABEL_NAME.search("/".join(path.relative_to(shared_data).parts[1:])))
        rows = facts.get("labels") or facts.get("colors")
        assert (rows is not None) == is_mask, (path, facts["is_label_map"])
        if rows is not None:
            assert sum(row["voxels"] for row in rows) == total, path
            for row in rows:  # 3D: volumes; 2D: areas (pixels for PNG/JPEG/TIFF, mm² otherwise)
                if facts["size_unit"] == "mm3":
                    assert row["volume_mm3"] == pytest.approx(row["voxels"] * voxel, rel=1e-9)
                elif facts["size_unit"] == "mm2":
                    pixel = facts["spacing_xyz_mm"][0] * facts["spacing_xyz_mm"][1]
                    assert row["area_mm2"] == pytest.approx(row["voxels"] * pixel, rel=1e-9)
                else:
                    assert row["area_pixels"] == row["voxels"] and "volume_mm3" not in row
            seen_kinds.add("colors" if "colors" in facts else "labels")
        seen_kinds.add(facts["format"])
    assert {"labels", "colors", "NIfTI (gzip)", "NRRD", "PNG", "DICOM series"} <= seen_kinds
    for path in others:
        result = runner.invoke(main, ["info", str(path)])
        assert result.exit_code == 2 and "unsupported file type" in result.stderr, (path, result.output)
        assert len(result.stderr.strip().splitlines()) == 1


def test_info_label_volumes_of_a_real_segmentation(medseg, shared_data):
    """The TotalSegmentator label map of the DICOM series: labels by value, volumes in mm³."""
    path = shared_data / "totalseg" / "example_seg_dicom.nii.gz"
    result = medseg("info", "--json", path)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    values, counts = np.unique(array, return_counts=True)
    assert [row["label"] for row in facts["labels"]] == values.tolist()
    assert [row["voxels"] for row in facts["labels"]] == counts.tolist()
    voxel_mm3 = 0.9765625 * 0.9765625 * 2.0
    assert facts["labels"][1]["volume_mm3"] == pytest.approx(counts[1] * voxel_mm3, rel=1e-6)
    assert facts["orientation"] == "LAS" and facts["size_zyx"] == [20, 512, 512]


def test_info_human_output_dicom_and_colour_mask(medseg, shared_data):
    dicom = medseg("info", shared_data / "totalseg" / "example_ct_dicom")
    assert dicom.returncode == 0, dicom.stderr
    for text in ("DICOM series", "20 × 512 × 512", "(0.9766, 0.9766, 2) mm", "LPS", "16-bit signed integer",
                 "-1024"):
        assert text in dicom.stdout, text
    mask = medseg("info", shared_data / "ultrasound" / "masks" / "0000.png")
    assert mask.returncode == 0, mask.stderr
    assert "colour-coded label map" in mask.stdout and "(128, 0, 0)" in mask.stdout and "area (pixels)" in mask.stdout
    assert "none stored" in mask.stdout and "extent" not in mask.stdout  # a PNG has no size in mm
    label = medseg("info", "--quiet", shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz")
    assert label.returncode == 0 and "labels" in label.stdout and "volume (mm³)" in label.stdout
    assert label.stderr.strip() == ""
    # --debug shows the traceback behind the one red line; without it there is none
    missing = shared_data / "totalseg" / "no_such_scan.nii.gz"
    plain, debug = medseg("info", missing), medseg("info", "--debug", missing)
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr and "InputError" in debug.stderr
    assert "error:" in debug.stderr and "no such file" in debug.stderr


def test_colour_and_label_counts_include_a_single_rare_voxel(shared_data):
    """Counting uses a strided sample only as a shortcut: a colour or label on one voxel between the
    sampled ones is still counted (the ultrasound mask with one extra-coloured pixel, a label map too)."""
    mask = read_image(shared_data / "ultrasound" / "masks" / "0000.png")
    odd = mask.array.copy()
    odd[:, 0, 101, 257] = (7, 8, 9)  # flat index 101·512 + 257 = 51969: odd, so off a stride of 2 or more
    facts = describe(mask.with_array(odd))
    colours = {tuple(row["color"]): row["voxels"] for row in facts["colors"]}
    assert colours[(7, 8, 9)] == 1 and sum(colours.values()) == 512 * 512
    label = read_image(shared_data / "hippocampus" / "labelsTr" / "hippocampus_001.nii.gz")
    rare = label.array.copy()
    rare.ravel()[12_345] = 9
    rows = {row["label"]: row["voxels"] for row in describe(label.with_array(rare))["labels"]}
    assert rows[9] == 1 and sum(rows.values()) == rare.size
    too_many = np.arange(70, dtype=np.uint8).repeat(4).reshape(1, 14, 20)  # 70 values: not a label map
    assert not describe(Image(too_many))["is_label_map"]
