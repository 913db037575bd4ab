"""``medseg eval`` as a user runs it: real files, real reports, clear one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medseg_cli.imaging import Geometry, Image, write_image

GEOMETRY = Geometry(spacing=(0.8, 0.8, 2.5), origin=(-10.0, 5.0, 3.0))


def _write(path: Path, array: np.ndarray, geometry: Geometry = GEOMETRY, label: bool = True) -> Path:
    write_image(Image(array, geometry), path, label=label)
    return path


def _cube_pair(shift: int = 1):
    ref = np.zeros((8, 16, 16), np.uint8)
    ref[2:6, 3:9, 3:9] = 1
    ref[2:6, 10:14, 10:14] = 2
    pred = np.roll(ref, shift, axis=2)
    return pred, ref


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_real_pair_reports(medseg, shared_data, tmp_path):
    ref = shared_data / "totalseg" / "example_seg.nii.gz"
    pred = shared_data / "totalseg" / "example_seg_fast.nii.gz"
    out = tmp_path / "report"
    result = medseg("eval", pred, ref, "-o", out, "--labels", "1,2,3", "--region", "kidneys=2,3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [r["label"] for r in rows] == ["1", "2", "3", "kidneys"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["1"]["metrics"]["dice"]["mean"] == pytest.approx(float(rows[0]["dice"]))
    assert report["summary"]["kidneys"]["label_values"] == "2+3" and summary["size_unit"] == "mm3"
    # Dice recomputed independently from the files
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(pred)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(ref)))
    for row in rows[:3]:
        value = int(row["label_values"])
        expected = 2 * np.sum((a == value) & (b == value)) / (np.sum(a == value) + np.sum(b == value))
        assert float(row["dice"]) == pytest.approx(expected, abs=1e-12)
    assert 0 < report["multiclass"]["miou"] <= 1 and 0 < report["multiclass"]["mpa"] <= 1


def test_folders_multilabel_names_tolerances_jobs(medseg, tmp_path):
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    preds.mkdir(), refs.mkdir()
    pred, ref = _cube_pair()
    _write(refs / "case_a.nii.gz", ref)
    _write(preds / "case_a.nrrd", pred)  # any supported suffix on either side
    empty_pred = np.where(ref == 2, 0, ref).astype(np.uint8)  # label 2 missed entirely
    _write(refs / "case_b.nii.gz", ref)
    _write(preds / "case_b.mha", empty_pred)
    _write(refs / "case_c.nii.gz", ref)  # no prediction: listed as unmatched
    extra = pred.copy()
    extra[0, 0, 0] = 9  # a label no reference has
    _write(preds / "case_d.nii.gz", extra)
    _write(refs / "case_d.nii.gz", ref)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "background", "1": "liver", "2": "spleen"}))
    out = tmp_path / "out"
    result = medseg("eval", preds, refs, "-o", out, "--label-names", names, "--region", "organs=liver,spleen",
                    "--tolerance", "0.5", "--tolerance", "spleen=2.0", "--jobs", "2")
    assert result.returncode == 0, result.stderr
    assert "case_c" in result.stderr and "without a partner" in result.stderr
    assert "label 9 appears in predictions but in no reference" in result.stderr
    assert "liver" in result.stdout and "spleen" in result.stdout
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert {r["case"] for r in rows} == {"case_a", "case_b", "case_d"}
    assert len(rows) == 3 * 3  # liver, spleen, organs per case
    by = {(r["case"], r["label"]): r for r in rows}
    assert by[("case_b", "spleen")]["status"] == "pred_empty"
    assert by[("case_b", "spleen")]["hd95"] == "inf" and float(by[("case_b", "spleen")]["dice"]) == 0
    assert float(by[("case_a", "spleen")]["tolerance_mm"]) == 2.0
    assert float(by[("case_a", "liver")]["tolerance_mm"]) == 0.5
    # shift of one voxel along x (0.8 mm): HD is exactly 0.8 mm in both conventions
    assert float(by[("case_a", "liver")]["hd"]) == pytest.approx(0.8)
    summary = json.loads((out / "summary.json").read_text())
    spleen = summary["summary"]["spleen"]
    assert spleen["status"]["pred_empty"] == 1 and spleen["metrics"]["hd95"]["n_inf"] == 1
    assert spleen["metrics"]["hd95"]["n"] == 2  # inf left out of the mean, counted apart
    assert summary["unexpected_prediction_labels"] == {"9": ["case_d"]}
    assert summary["multiclass"]["classes"] == [0, 1, 2]


def test_empty_cases_in_json_are_null_with_status(medseg, tmp_path):
    ref = np.zeros((4, 8, 8), np.uint8)
    ref[1:3, 2:5, 2:5] = 1
    pred = np.zeros_like(ref)
    pred[1:3, 2:5, 2:5] = 2
    result = medseg("eval", _write(tmp_path / "p.nii.gz", pred), _write(tmp_path / "r.nii.gz", ref),
                    "--labels", "1,2,3", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["label"]: r for r in json.loads(result.stdout)["per_case"]}
    assert rows["1"]["status"] == "pred_empty" and rows["1"]["hd"] is None and rows["1"]["dice"] == 0
    assert rows["2"]["status"] == "ref_empty" and rows["2"]["assd"] is None
    assert rows["3"]["status"] == "both_empty" and rows["3"]["dice"] == 1 and rows["3"]["hd95"] == 0


def test_voxel_surface_and_pairs_csv(medseg, tmp_path):
    pred, ref = _cube_pair(shift=2)
    p = _write(tmp_path / "prediction_one.nii.gz", pred)
    r = _write(tmp_path / "reference_one.nii.gz", ref)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("case,prediction,reference\nfirst,prediction_one.nii.gz,reference_one.nii.gz\n")
    result = medseg("eval", "--pairs", pairs, "--surface", "voxel", "--labels", "1", "--json")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["per_case"][0]
    assert row["case"] == "first" and row["hd"] == pytest.approx(1.6) and row["hd95"] == pytest.approx(1.6)
    assert json.loads(result.stdout)["convention"] == "voxel"
    assert p.exists() and r.exists()


def test_fov_mask_2d_png(medseg, tmp_path):
    ref = np.zeros((1, 20, 20), np.uint8)
    ref[0, 5:12, 5:12] = 1
    pred = ref.copy()
    pred[0, 17:19, 17:19] = 1  # false positive outside the field of view
    fov = np.zeros_like(ref)
    fov[0, :15, :15] = 255
    planar = Geometry()
    args = [_write(tmp_path / "p.png", pred, planar), _write(tmp_path / "r.png", ref, planar)]
    plain = json.loads(medseg("eval", *args, "--json").stdout)
    assert plain["per_case"][0]["dice"] < 1
    result = medseg("eval", *args, "--fov-mask", _write(tmp_path / "fov.png", fov, planar), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["per_case"][0]["dice"] == 1.0 and report["per_case"][0]["hd"] == 0
    assert report["multiclass"]["miou"] == 1.0 and report["multiclass"]["mpa"] == 1.0


# ------------------------------------------------------------------------------------ bad input

def test_mismatched_geometry_refused_then_resampled(medseg, tmp_path):
    pred, ref = _cube_pair(shift=0)
    moved = Geometry(spacing=GEOMETRY.spacing, origin=(-10.0, 5.0, 3.5))
    p = _write(tmp_path / "p.nii.gz", pred, moved)
    r = _write(tmp_path / "r.nii.gz", ref)
    out = tmp_path / "out"
    result = medseg("eval", p, r, "-o", out)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert str(p) in line and str(r) in line and "origin" in line and "--resample-prediction" in line
    assert not out.exists()  # nothing half-written
    result = medseg("eval", p, r, "--resample-prediction", "--json")
    assert result.returncode == 0, result.stderr
    assert "resampled" in result.stderr


def test_missing_partner_float_labels_and_empty_folders(medseg, tmp_path):
    preds, refs, empty = tmp_path / "pred", tmp_path / "ref", tmp_path / "empty"
    for folder in (preds, refs, empty):
        folder.mkdir()
    pred, ref = _cube_pair()
    _write(preds / "alpha.nii.gz", pred)
    _write(refs / "beta.nii.gz", ref)
    result = medseg("eval", preds, refs)
    assert result.returncode == 2 and "same case name" in _one_error_line(result)

    result = medseg("eval", empty, refs)
    assert result.returncode == 2 and "no prediction image files" in _one_error_line(result)

    soft = (ref.astype(np.float32) * 0.5)
    f = _write(tmp_path / "soft.nii.gz", soft, label=False)
    result = medseg("eval", f, refs / "beta.nii.gz")
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "non-integer" in line and "soft.nii.gz" in line

    # the same error from a worker process (--jobs 2) is still one line and exit 2
    _write(preds / "beta.nii.gz", soft, label=False)
    _write(refs / "alpha.nii.gz", ref)
    result = medseg("eval", preds, refs, "--jobs", "2")
    assert result.returncode == 2
    assert "non-integer" in _one_error_line(result)

    result = medseg("eval", tmp_path / "nothing.nii.gz", refs / "beta.nii.gz")
    assert result.returncode == 2 and "not found" in _one_error_line(result)

    result = medseg("eval", preds / "alpha.nii.gz", refs / "beta.nii.gz", "--tolerance", "x=abc")
    assert result.returncode == 2 and "not a number" in _one_error_line(result)


def test_eval_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys, medseg_cli.evaluation.cohort, medseg_cli.evaluation.report, "
            "medseg_cli.commands.evaluate; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inline_label_names(medseg, tmp_path):
    """--label-names also takes JSON inline (what the README's first command uses)."""
    pred, ref = _cube_pair()
    result = medseg("eval", _write(tmp_path / "p.nii.gz", pred), _write(tmp_path / "r.nii.gz", ref),
                    "--label-names", '{"1": "lesion"}', "--labels", "lesion", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["per_case"]
    assert row["label"] == "lesion" and 0 < row["dice"] < 1
    broken = medseg("eval", tmp_path / "p.nii.gz", tmp_path / "r.nii.gz", "--label-names", '{"1": "lesion"')
    line = _one_error_line(broken)                      # inline JSON is no file: named as the option, not a path
    assert broken.returncode == 2 and line.startswith("error: --label-names is not readable JSON"), line


# ------------------------------------------------------------------------ colour-coded masks
US_LABEL_MAP = '{"0,0,0": 0, "128,0,0": 1, "0,128,0": 2}'   # the ultrasound config's data.label_map
US_NAMES = '{"1": "nerve", "2": "vessel"}'
REPO = Path(__file__).resolve().parents[1]


def test_colour_masks_are_mapped_to_labels_with_label_map(medseg, shared_data, tmp_path):
    """Real RGB ultrasound masks against the same masks as grey label maps: Dice 1 either way round."""
    from medseg_cli.labelmaps import colors_to_labels
    from medseg_cli.imaging import read_image

    colour, grey = tmp_path / "colour", tmp_path / "grey"
    colour.mkdir()
    grey.mkdir()
    for case in ("0000", "0001"):
        source = shared_data / "ultrasound" / "masks" / f"{case}.png"
        (colour / f"{case}.png").symlink_to(source)
        image = read_image(source)
        labels = colors_to_labels(image.channels(), {0: [0, 0, 0], 1: [128, 0, 0], 2: [0, 128, 0]})
        write_image(Image(labels, image.geometry), grey / f"{case}.png", label=True)

    refused = medseg("eval", grey, colour)                                    # colours need a map
    assert refused.returncode == 2 and "3 channels" in _one_error_line(refused) and "--label-map" in refused.stderr

    for pred, ref, label_map in ((grey, colour, US_LABEL_MAP), (colour, grey, US_LABEL_MAP),
                                 (colour, colour, str(REPO / "configs" / "ultrasound_attention_unet2d.yaml"))):
        result = medseg("eval", pred, ref, "--label-map", label_map, "--label-names", US_NAMES, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["cases"] == 2 and set(report["summary"]) == {"nerve", "vessel"}
        for row in report["per_case"]:
            assert row["dice"] == 1.0 and row["voxels_ref"] > 0, row
        assert report["multiclass"]["classes"] == [0, 1, 2] and report["multiclass"]["miou"] == 1.0
        assert report["size_unit"] == "pixels"                             # PNG areas: pixels, never mL
    text = medseg("eval", grey, colour, "--label-map", US_LABEL_MAP)
    assert text.returncode == 0 and "ΔA px" in text.stdout and "mL" not in text.stdout, text.stderr
    assert "HD95 px" in text.stdout and "NSD at 1 px" in text.stdout and "HD95 mm" not in text.stdout  # spacing 1/px


def test_a_colour_missing_from_the_label_map_is_one_clear_line(medseg, shared_data, tmp_path):
    from medseg_cli.imaging import read_image

    source = shared_data / "ultrasound" / "masks" / "0000.png"
    colours = read_image(source).channels().copy()
    colours[:, 0, 10:12, 20:23] = np.array([0, 0, 128], np.uint8)[:, None, None]   # 6 blue pixels
    bad = write_image(Image(colours), tmp_path / "0000.png")
    result = medseg("eval", bad, source, "--label-map", US_LABEL_MAP)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert str(bad) in line and "[0, 0, 128]" in line and "6 pixels" in line and "--label-map" in line
    # a map file (YAML), an RGBA mask for an RGB map, and a map that is not one
    yaml_map = tmp_path / "map.yaml"
    yaml_map.write_text('label_map: {"0,0,0": 0, "128,0,0": 1}\n')
    result = medseg("eval", source, source, "--label-map", yaml_map)
    assert result.returncode == 2 and "[0, 128, 0]" in _one_error_line(result) and str(source) in result.stderr
    rgba = write_image(Image(np.concatenate([colours, np.full_like(colours[:1], 255)])), tmp_path / "rgba.png")
    result = medseg("eval", rgba, source, "--label-map", US_LABEL_MAP)
    assert result.returncode == 2 and "4 channels" in _one_error_line(result) and "rgba.png" in result.stderr
    result = medseg("eval", source, source, "--label-map", '{"0,0,0": 0, "128,0": 1}')
    assert result.returncode == 2 and "--label-map" in _one_error_line(result)


def test_a_region_named_like_a_label_is_refused(medseg, tmp_path):
    pred, ref = _cube_pair()
    p, r = _write(tmp_path / "p.nii.gz", pred), _write(tmp_path / "r.nii.gz", ref)
    names = '{"1": "liver", "2": "spleen"}'
    result = medseg("eval", p, r, "--label-names", names, "--region", "liver=1,2")
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "'liver' is already the name of label 1" in line and "another name" in line
    result = medseg("eval", p, r, "--region", "2=1,2")                      # unnamed label 2 is called "2"
    assert result.returncode == 2 and "'2' is the name of label 2" in _one_error_line(result)
    result = medseg("eval", p, r, "--label-names", names, "--region", "organs=liver,spleen", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert set(summary) == {"liver", "spleen", "organs"} and summary["organs"]["kind"] == "region"


def test_many_unexpected_labels_make_one_warning_line(medseg, tmp_path):
    """An intensity image given as the prediction: its many values are one warning, not one line each."""
    pred, ref = _cube_pair()
    pred = pred.copy()
    pred[0, 0, :12] = np.arange(3, 15)                                  # twelve values no reference has
    result = medseg("eval", _write(tmp_path / "p.nii.gz", pred), _write(tmp_path / "r.nii.gz", ref))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "no reference" in line]
    assert warnings == ["warning: 12 labels (3, 4, 5, 6, 7, 8, 9, 10, ...) appear in predictions but in no "
                        "reference (cases: r)"], result.stderr
