"""Hostile inputs, run the way a user runs medseg (a subprocess per command): every command that reads
a file fails with one ``error:`` line naming the file and the fix, exit 2 (input) / 3 (model) / 4
(runtime), no traceback, no partial file, and earlier good outputs untouched. Usable-but-odd inputs
(NaN voxels, a blank scan, a DICOM series with a missing slice) succeed with a warning line.

docs/errors.md lists every case with its exit code and message; the faults (kill -9) are in
tests/test_faults.py. Small synthetic inputs are built here; models are tiny ONNX files.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml

from http_server import Fault, TestServer
from test_fetch import entry, make_model_bytes, sha, write_manifest
from test_runners import conv1x1_model, export_tiny_onnx, make_card

torch.set_num_threads(1)

ZSCORE = {"roi": "nonzero", "normalization": {"kind": "zscore_roi"}}
SHAPE_XYZ = (20, 24, 16)  # nibabel order; medseg sees (Z, Y, X) = (16, 24, 20)


# ------------------------------------------------------------------------------------------ helpers
def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def warning_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("warning:")]


def assert_clean_failure(done: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit ``code``, exactly one ``error:`` line holding ``words`` (case-insensitive), no traceback."""
    assert done.returncode == code, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden scratch folders included) with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def volume() -> np.ndarray:
    return (np.random.default_rng(0).random(SHAPE_XYZ) * 100).astype(np.float32)


AFFINE = np.diag([1.0, 1.0, 1.5, 1.0])


def patch_nifti_header(src: Path, dst: Path, pixdim: dict[int, float]) -> Path:
    """Copy a .nii.gz, overwriting pixdim[i] (raw header bytes: nibabel would 'fix' them) and making
    the qform (which uses pixdim) the geometry ITK reads."""
    raw = bytearray(gzip.decompress(src.read_bytes()))
    for index, value in pixdim.items():
        struct.pack_into("<f", raw, 76 + 4 * index, value)
    struct.pack_into("<hh", raw, 252, 1, 0)  # qform_code 1, sform_code 0
    dst.write_bytes(gzip.compress(bytes(raw)))
    return dst


def write_dicom_series(folder: Path, array: np.ndarray, z_positions: list[float], *, uid: str,
                       spacing_xy: float = 0.8) -> list[Path]:
    """One CT series (int16 slices of ``array`` (Z, Y, X)) at the given slice positions (mm)."""
    import locale

    folder.mkdir(parents=True, exist_ok=True)
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches the C locale to "C" ...
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    written = []
    for index, (plane, z) in enumerate(zip(array, z_positions)):
        image = sitk.GetImageFromArray(plane.astype(np.int16))
        image.SetSpacing((spacing_xy, spacing_xy))
        for key, value in {"0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0010|0020": "hostile",
                           "0020|000d": uid + ".0", "0020|000e": uid, "0020|0011": uid.rsplit(".", 1)[-1],
                           "0008|0018": f"{uid}.{index + 1}", "0020|0013": str(index + 1),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": f"0\\0\\{z:g}",
                           "0018|0050": "2", "0028|0030": f"{spacing_xy}\\{spacing_xy}",
                           "0028|1052": "0", "0028|1053": "1"}.items():
            image.SetMetaData(key, value)
        path = folder / f"{uid.rsplit('.', 1)[-1]}_{index:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(image)
        written.append(path)
    locale.setlocale(locale.LC_ALL, saved_locale)  # ... else subprocess output decodes as ASCII
    return written


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny real models: a 3D and a 2D 1x1-conv ONNX (2 classes) and a pickle that would run code."""
    folder = tmp_path_factory.mktemp("hostile_models")
    card = make_card(num_classes=2, input_patch=(8, 16, 16), preprocessing=ZSCORE).with_updates(name="hostile3d")
    paths = {"3d": export_tiny_onnx(conv1x1_model(1, 2, seed=3), card, folder / "m3d.onnx")}
    card2 = make_card(num_classes=2, input_patch=(16, 16), spatial_dims=2,
                      preprocessing=ZSCORE).with_updates(name="hostile2d")
    paths["2d"] = export_tiny_onnx(conv1x1_model(1, 2, dims=2, seed=4), card2, folder / "m2d.onnx")
    marker = folder / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "medseg-checkpoint", "version": 1, "model_state": Evil()}, folder / "evil.pt")
    paths["evil"], paths["marker"] = folder / "evil.pt", marker
    return paths


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of hostile scans (and one good one), each small."""
    folder = tmp_path_factory.mktemp("hostile_inputs")
    data = volume()
    nib.save(nib.Nifti1Image(data, AFFINE), str(folder / "good.nii.gz"))
    good = (folder / "good.nii.gz").read_bytes()
    raw = gzip.decompress(good)
    (folder / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (folder / "not_nifti.nii.gz").write_bytes(gzip.compress(b"patient notes, not a scan\n" * 40))
    (folder / "not_gzip.nii.gz").write_bytes(b"plain text with a .nii.gz name\n")
    (folder / "short_data.nii.gz").write_bytes(gzip.compress(raw[:-1000]))
    patch_nifti_header(folder / "good.nii.gz", folder / "zero_spacing.nii.gz", {2: 0.0})
    patch_nifti_header(folder / "good.nii.gz", folder / "nan_spacing.nii.gz", {3: float("nan")})
    patch_nifti_header(folder / "good.nii.gz", folder / "negative_spacing.nii.gz", {2: -2.0})
    holes = data.copy()
    holes[1, 2, 3], holes[4, 5, 6] = np.nan, np.inf
    nib.save(nib.Nifti1Image(holes, AFFINE), str(folder / "nan_voxels.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(SHAPE_XYZ, np.nan, np.float32), AFFINE), str(folder / "all_nan.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(SHAPE_XYZ, np.float32), AFFINE), str(folder / "all_zero.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), AFFINE), str(folder / "four_d.nii.gz"))
    nib.save(nib.Nifti1Image(data[:, :, :1], AFFINE), str(folder / "one_slice.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((data[:, :, 0].T * 2).astype(np.uint8)), str(folder / "flat.png"))
    sitk.WriteImage(sitk.GetImageFromArray(data.T.copy()), str(folder / "detached.nhdr"))
    for companion in folder.glob("detached.raw*"):
        companion.unlink()  # the header names a data file that is not there
    return folder


# ------------------------------------------------------------------------------------------ info
INFO_FAILS = {
    "truncated.nii.gz": "truncated",
    "not_nifti.nii.gz": "not a readable image",
    "not_gzip.nii.gz": "not gzip",
    "short_data.nii.gz": "shorter than its header",
    "zero_spacing.nii.gz": "spacing",
    "nan_spacing.nii.gz": "spacing",
    "all_nan.nii.gz": "NaN",
    "detached.nhdr": "missing",
    "does_not_exist.nii.gz": "no such file",
}


def test_info_refuses_each_broken_file_with_one_line(bad, medseg):
    before = snapshot(bad)
    for name, words in INFO_FAILS.items():
        line = assert_clean_failure(medseg("info", bad / name), 2, name, words)
        assert line.rstrip().endswith("."), line  # problem, then what to do
    assert snapshot(bad) == before  # reading never writes


def test_info_describes_odd_but_usable_files(bad, medseg):
    done = medseg("info", "--json", bad / "nan_voxels.nii.gz")
    assert done.returncode == 0 and json.loads(done.stdout)["nonfinite_voxels"] == 2
    assert len(warning_lines(done)) == 1 and "2 voxels are NaN or infinite" in done.stderr

    facts = json.loads(medseg("info", "--json", bad / "four_d.nii.gz").stdout)
    assert facts["channels"] == 2 and facts["size_zyx"] == [16, 24, 20]
    facts = json.loads(medseg("info", "--json", bad / "all_zero.nii.gz").stdout)
    assert facts["intensity_min"] == facts["intensity_max"] == 0.0
    # a negative pixdim is read as a positive spacing along a mirrored axis, and said so
    done = medseg("info", "--json", bad / "negative_spacing.nii.gz")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["spacing_xyz_mm"] == [1.0, 2.0, 1.5]
    assert len(warning_lines(done)) == 1 and "negative" in done.stderr and "negative_spacing" in done.stderr


# ------------------------------------------------------------------------------------------ predict
def test_predict_refuses_broken_scans_and_writes_nothing(bad, models, medseg, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.nii.gz").write_bytes(b"an earlier good result")
    # every file of INFO_FAILS is refused by predict too (the cohort test below runs them in one process)
    cases = {"truncated.nii.gz": "truncated", "zero_spacing.nii.gz": "spacing",
             "four_d.nii.gz": "takes 1 channel(s)", "flat.png": "single 2D slice",
             "one_slice.nii.gz": "single 2D slice"}
    for name, words in cases.items():
        done = medseg("predict", bad / name, "-o", out / "mask.nii.gz", "--model", models["3d"], "--device", "cpu")
        assert_clean_failure(done, 2, name, words)
    assert snapshot(out) == {"earlier.nii.gz": b"an earlier good result"}


def test_predict_cohort_of_broken_scans_reports_each_and_keeps_going(bad, models, medseg, tmp_path):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in [*INFO_FAILS, "four_d.nii.gz", "flat.png", "good.nii.gz", "nan_voxels.nii.gz", "all_zero.nii.gz"]:
        if (bad / name).exists():
            shutil.copy(bad / name, cohort / name)
    out = tmp_path / "masks"
    done = medseg("predict", cohort, "-o", out, "--model", models["3d"], "--device", "cpu", "--json")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    rows = {row["case"]: row for row in json.loads(done.stdout)["cases"]}
    failed = {name for name, row in rows.items() if row["status"] == "failed"}
    assert failed == {"truncated", "not_nifti", "not_gzip", "short_data", "zero_spacing", "nan_spacing", "all_nan",
                      "detached", "four_d", "flat"}
    for name in failed:
        assert rows[name]["exit_code"] == 2 and name in rows[name]["error"] and "\n" not in rows[name]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["all_zero.nii.gz", "good.nii.gz", "nan_voxels.nii.gz"]
    blank = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "all_zero.nii.gz")))
    assert blank.shape == (16, 24, 20) and not blank.any()  # a blank scan gives an empty mask, said so:
    assert any("all_zero" in line and "blank" in line for line in warning_lines(done)), done.stderr
    assert any("nan_voxels" in line and "NaN" in line for line in warning_lines(done)), done.stderr


def test_predict_3d_volume_with_a_2d_model_runs_slice_by_slice(bad, models, medseg, tmp_path):
    done = medseg("predict", bad / "good.nii.gz", "-o", tmp_path / "m.nii.gz", "--model", models["2d"], "-q",
                  "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert sitk.ReadImage(str(tmp_path / "m.nii.gz")).GetSize() == SHAPE_XYZ


def test_predict_refuses_a_checkpoint_that_would_run_code(bad, models, medseg, tmp_path):
    done = medseg("predict", bad / "good.nii.gz", "-o", tmp_path / "m.nii.gz", "--model", models["evil"],
                  "--backend", "torch", "--device", "cpu")
    assert_clean_failure(done, 3, "evil.pt", "refused", "refers to", "system", "trust")
    assert not models["marker"].exists() and not (tmp_path / "m.nii.gz").exists()


# ------------------------------------------------------------------------------------------ outputs
def run_full_disk(*args: str, room: int = 0) -> subprocess.CompletedProcess:
    """Run medseg where no file may grow past ``room`` bytes (writes fail with EFBIG, as on a full
    disk; ITK ignores such failures and leaves a short file); SIGXFSZ is ignored."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "medseg_cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def test_unwritable_outputs_fail_cleanly_and_keep_earlier_results(bad, models, medseg, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should be")
    scan = bad / "good.nii.gz"
    predict = ("predict", scan, "--model", models["3d"], "--device", "cpu")
    assert_clean_failure(medseg(*predict, "-o", blocker / "mask.nii.gz"), 2, "results", "not a folder")
    assert_clean_failure(medseg("predict", bad, "-o", blocker, "--model", models["3d"]), 2, "results", "folder")

    done_dir = tmp_path / "done"
    assert medseg(*predict, "-o", done_dir / "mask.nii.gz", "-q").returncode == 0
    good = (done_dir / "mask.nii.gz").read_bytes()
    full = run_full_disk(*predict, "-o", done_dir / "mask.nii.gz")  # the disk is full: nothing changes
    assert_clean_failure(full, 4, "mask.nii.gz", "writing failed", "no data reached the disk", "disk space")
    assert (done_dir / "mask.nii.gz").read_bytes() == good
    assert len(good) > 512  # room for half a file: ITK writes a short file and says nothing; medseg checks
    full = run_full_disk(*predict, "-o", done_dir / "mask.nii.gz", room=512)
    assert_clean_failure(full, 4, "mask.nii.gz", "writing failed", "incomplete")
    assert (done_dir / "mask.nii.gz").read_bytes() == good
    assert sorted(p.name for p in done_dir.iterdir()) == ["mask.nii.gz"]  # no scratch left behind
    mask = done_dir / "mask.nii.gz"
    assert_clean_failure(medseg("eval", mask, mask, "-o", blocker), 2, "results")
    full = run_full_disk("eval", mask, mask, "-o", tmp_path / "report")
    assert_clean_failure(full, 4, "writing failed")
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())
    assert blocker.read_text() == "a file where the output folder should be"

    if os.geteuid() != 0:  # root ignores permission bits: the full-disk case above covers it there
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert_clean_failure(medseg(*predict, "-o", locked / "mask.nii.gz"), 2, "locked", "not writable")
        finally:
            locked.chmod(0o755)


def test_names_with_spaces_and_non_ascii(bad, models, medseg, tmp_path):
    folder = tmp_path / "Patient Müller 患者"
    folder.mkdir()
    scan = folder / "scan T1 ä.nii.gz"
    shutil.copy(bad / "good.nii.gz", scan)
    info = medseg("info", "--json", scan)
    assert info.returncode == 0 and json.loads(info.stdout)["path"] == str(scan)
    mask = folder / "out put é" / "mäsk 1.nii.gz"
    done = medseg("predict", scan, "-o", mask, "--model", models["3d"], "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cases"][0]["output"] == str(mask)
    report = medseg("eval", mask, mask, "-o", folder / "bericht ü", "--json")
    assert report.returncode == 0, report.stderr
    assert (folder / "bericht ü" / "summary.json").is_file()
    missing = folder / "fehlt ö.nii.gz"
    assert_clean_failure(medseg("info", missing), 2, "fehlt ö.nii.gz")


# ------------------------------------------------------------------------------------------ DICOM
def test_dicom_folders_mixed_series_missing_slice_and_stray_files(models, medseg, tmp_path):
    rng = np.random.default_rng(1)
    array = (rng.random((8, 24, 20)) * 400 - 100).astype(np.int16)
    mixed = tmp_path / "mixed"
    write_dicom_series(mixed, array, [2.0 * k for k in range(8)], uid="1.2.826.0.1.3680043.2.1125.7.1")
    write_dicom_series(mixed, array[:3], [2.0 * k for k in range(3)], uid="1.2.826.0.1.3680043.2.1125.7.2")
    (mixed / "README.txt").write_text("exported by PACS, not an image")
    (mixed / "DICOMDIR.bak").write_bytes(os.urandom(512))
    done = medseg("info", "--json", mixed)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["size_zyx"] == [8, 24, 20] and facts["dicom_slices"] == 8
    assert facts["spacing_xyz_mm"] == pytest.approx([0.8, 0.8, 2.0])
    warnings = warning_lines(done)
    assert len(warnings) == 1 and "2 DICOM series" in warnings[0] and "--series" in warnings[0]

    gap = tmp_path / "gap"  # slice at 8 mm missing: steps of 2 mm and one of 4 mm
    write_dicom_series(gap, array[:7], [0, 2, 4, 6, 10, 12, 14], uid="1.2.826.0.1.3680043.2.1125.7.3")
    done = medseg("info", "--json", gap)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["dicom_slice_steps_mm"] == [2.0, 4.0]
    warnings = warning_lines(done)
    assert len(warnings) == 1 and "uneven slice spacing" in warnings[0] and "from 2 to 4 mm" in warnings[0]

    out = tmp_path / "gap_mask.nii.gz"
    done = medseg("predict", gap, "-o", out, "--model", models["3d"], "--device", "cpu", "-q")
    assert done.returncode == 0, done.stderr
    assert "uneven slice spacing" in done.stderr and out.is_file()

    only_junk = tmp_path / "junk"
    only_junk.mkdir()
    (only_junk / "notes.txt").write_text("no images here")
    assert_clean_failure(medseg("info", only_junk), 2, "junk", "no DICOM series")
    assert_clean_failure(medseg("predict", only_junk, "-o", tmp_path / "j.nii.gz", "--model", models["3d"]), 2,
                         "junk")
    assert not (tmp_path / "j.nii.gz").exists()


# ------------------------------------------------------------------------------------------ eval
@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile_labels")
    label = np.zeros((16, 24, 20), np.uint8)
    label[4:10, 5:15, 5:12], label[10:14, 5:15, 5:12] = 1, 2

    def write(array: np.ndarray, name: str, origin=(0.0, 0.0, 0.0)) -> None:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 1.5))
        image.SetOrigin(origin)
        sitk.WriteImage(image, str(folder / name))

    write(label, "reference.nii.gz")
    unknown = label.copy()
    unknown[0:2, 0:3, 0:3] = 7
    write(unknown, "unknown_label.nii.gz")
    write(label, "shifted.nii.gz", origin=(5.0, 0.0, 0.0))
    write(label[8], "slice_2d.nii.gz")
    write(np.stack([label, label], -1), "two_channel.nii.gz")
    holes = label.astype(np.float32)
    holes[1, 1, 1] = np.nan
    write(holes, "nan_label.nii.gz")
    write(label.astype(np.float32) + 0.5, "probabilities.nii.gz")
    data = (folder / "reference.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    return folder


EVAL_FAILS = {
    "shifted.nii.gz": "geometry differs",
    "slice_2d.nii.gz": "geometry differs",
    "two_channel.nii.gz": "2 channels",
    "nan_label.nii.gz": "NaN",
    "probabilities.nii.gz": "non-integer",
    "truncated.nii.gz": "truncated",
}


def test_eval_refuses_unusable_predictions_and_references(labels, medseg, tmp_path):
    reference = labels / "reference.nii.gz"
    for name, words in EVAL_FAILS.items():
        assert_clean_failure(medseg("eval", labels / name, reference, "-o", tmp_path / "r"), 2, name, words)
    # the same file as the reference side
    assert_clean_failure(medseg("eval", reference, labels / "truncated.nii.gz"), 2, "truncated.nii.gz")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_eval_unknown_labels_are_reported_not_hidden(labels, medseg):
    done = medseg("eval", labels / "unknown_label.nii.gz", labels / "reference.nii.gz", "--json")
    assert done.returncode == 0, done.stderr
    assert any("label 7" in line and "no reference" in line for line in warning_lines(done)), done.stderr
    report = json.loads(done.stdout)
    assert report["unexpected_prediction_labels"] == {"7": ["reference"]}
    assert report["summary"]["7"]["metrics"]["dice"]["mean"] == 0.0  # evaluated, not dropped


# ------------------------------------------------------------------------------------------ train
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A 3-case training set; case_c's image is truncated."""
    root = tmp_path_factory.mktemp("hostile_dataset")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(2)
    for name in ("case_a", "case_b", "case_c"):
        image = sitk.GetImageFromArray((rng.random((16, 24, 20)) * 100).astype(np.float32))
        label = np.zeros((16, 24, 20), np.uint8)
        label[4:10, 5:15, 5:12] = 1
        label_image = sitk.GetImageFromArray(label)
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(label_image, str(root / "labelsTr" / f"{name}.nii.gz"))
    cut = root / "imagesTr" / "case_c.nii.gz"
    cut.write_bytes(cut.read_bytes()[:300])
    return root


def train_config(dataset: Path, tmp_path: Path, **changes) -> dict:
    data = {"name": "hostile", "labels": {0: "background", 1: "fg"},
            "data": {"root": str(dataset), "val_every_nth": 3, "cache": str(tmp_path / "cache")},
            "model": {"name": "unet3d", "kwargs": {"init_features": 2, "num_levels": 2}},
            "training": {"patch_size": [8, 16, 16], "batch_size": 1, "epochs": 1, "iterations_per_epoch": 1,
                         "num_workers": 0, "threads": 1},
            "output": str(tmp_path / "run")}
    data.update(changes)
    return data


def test_train_refuses_bad_configs_and_data_before_training(dataset, medseg, tmp_path):
    config = tmp_path / "train.yaml"
    cases = [
        ("truncated scan", yaml.safe_dump(train_config(dataset, tmp_path)), 2, ("case_c.nii.gz", "truncated")),
        ("yaml syntax", "model: {name: unet3d\ntraining: [", 2, ("train.yaml", "not valid YAML", "line 2")),
        # a typo'd key, a wrong type and a missing data path: tests/test_train.py (BAD_INPUT)
        ("output is a file", yaml.safe_dump(train_config(dataset, tmp_path, output=str(config))), 2,
         ("train.yaml", "is a file, not a folder")),
    ]
    for what, text, code, words in cases:
        config.write_text(text)
        before = config.read_bytes()
        done = medseg("train", "--config", config, "--no-export")
        assert_clean_failure(done, code, *words)
        assert config.read_bytes() == before, what
        assert not (tmp_path / "run" / "last.pt").exists(), what
    assert_clean_failure(medseg("train", "--config", tmp_path / "nope.yaml"), 2, "nope.yaml", "not found")
    config.write_text(yaml.safe_dump(train_config(dataset, tmp_path)))
    assert_clean_failure(medseg("train", "--config", config, "--set", "training.epochs=many"), 2,
                         "train.yaml", "training.epochs: expected int, got str 'many'")


def test_config_cannot_execute_code(dataset, medseg, tmp_path):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                      + yaml.safe_dump({k: v for k, v in train_config(dataset, tmp_path).items() if k != "name"}))
    assert_clean_failure(medseg("train", "--config", config), 2, "evil.yaml", "not valid YAML")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ fetch
def test_fetch_bad_manifest_entries(medseg, medseg_home, tmp_path, monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                "MEDSEG_MIRROR", "MEDSEG_MANIFEST"):
        monkeypatch.delenv(var, raising=False)
    model = make_model_bytes(0)
    import socket

    with socket.socket() as probe:  # a port where nothing listens: connection refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with TestServer() as server:
        url = server.add("/m.onnx", model)
        server.faults["/loop.onnx"] = Fault(redirect_loop=True)
        manifest = write_manifest(
            tmp_path,
            entry("unreachable", f"http://127.0.0.1:{closed}/m.onnx", sha(model)),
            entry("loop", server.url("/loop.onnx"), sha(model)),
            entry("larger", url, sha(model), size=len(model) // 2),
            entry("gone", server.url("/gone.onnx"), sha(model)))
        cases = {"unreachable": (f"127.0.0.1:{closed}", "refused"), "loop": ("loop.onnx", "redirect"),
                 "larger": ("m.onnx", "larger than the manifest says"), "gone": ("gone.onnx", "404")}
        for name, words in cases.items():
            assert_clean_failure(medseg("fetch", name, "--manifest", manifest), 3, *words)
        models_folder = medseg_home / "models"
        assert not models_folder.exists() or sorted(p.name for p in models_folder.iterdir()) == []

        bad_url = write_manifest(tmp_path, entry("badurl", "htp:/nowhere/m.onnx", sha(model)))
        assert_clean_failure(medseg("fetch", "badurl", "--manifest", bad_url), 3, "manifest.json", "scheme 'htp'")
        typo = json.loads(bad_url.read_text())
        typo["models"][0]["sources"][0] = {"ulr": url, "sha256": sha(model), "format": "onnx"}
        bad_url.write_text(json.dumps(typo))
        assert_clean_failure(medseg("fetch", "badurl", "--manifest", bad_url), 3, "manifest.json", "ulr")
        bad_url.write_text('{"schema_version": 1, "models": [')
        assert_clean_failure(medseg("fetch", "badurl", "--manifest", bad_url), 3, "manifest.json")
        assert_clean_failure(medseg("fetch", "x", "--manifest", tmp_path / "none.json"), 3, "none.json")
