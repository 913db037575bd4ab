"""`medseg predict` as a user runs it (a subprocess), with tiny models built here: real scans in, masks
on the exact input grid out, probabilities, Slicer segmentations, DICOM, channels, cohorts with
shards / skipping / a failing case, the torch backend, and bad input that writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medseg_cli.imaging import Image, read_image, write_image
from medseg_cli.inference.runners import onnx_cuda_usable

from test_runners import conv1x1_model, export_tiny_onnx, make_card

torch.set_num_threads(1)

LABELS = {"0": "background", "1": "anterior", "2": "posterior"}
COLORS = {"1": [255, 128, 0], "2": [0, 64, 255]}
ZSCORE = {"roi": "nonzero", "normalization": {"kind": "zscore_roi"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 3-class 1-channel ONNX (1x1 conv: known answer), a 2-channel one, a tiny UNet3D as .onnx and .pt."""
    from medseg_cli.checkpoint import save_checkpoint
    from medseg_cli.zoo import build_model

    folder = tmp_path_factory.mktemp("models")
    card = make_card(num_classes=3, input_patch=(16, 16, 16), preprocessing=ZSCORE).with_updates(
        name="tiny-hippo", labels=LABELS, label_colors=COLORS)
    model = conv1x1_model(1, 3, seed=11)
    with torch.no_grad():  # bright voxels -> posterior, dark -> anterior, mid -> background
        model.weight.copy_(torch.tensor([0.0, -3.0, 3.0]).reshape(3, 1, 1, 1, 1))
        model.bias.copy_(torch.tensor([1.5, 0.0, 0.0]))
    paths = {"conv": export_tiny_onnx(model, card, folder / "conv.onnx")}
    wide = card.with_updates(input_patch=[16, 128, 128], output_patch=[16, 128, 128])  # for 512 x 512 CT slices
    paths["wide"] = export_tiny_onnx(model, wide, folder / "wide.onnx")
    two = make_card(in_channels=2, num_classes=2, input_patch=(16, 16, 16), preprocessing=ZSCORE)
    paths["two"] = export_tiny_onnx(conv1x1_model(2, 2, seed=12), two, folder / "two.onnx")
    kwargs = {"init_features": 2, "num_levels": 2}
    torch.manual_seed(0)
    unet = build_model("unet3d", 1, 3, **kwargs).eval()
    unet_card = make_card(num_classes=3, input_patch=(24, 32, 24), preprocessing=ZSCORE,
                          architecture_kwargs=kwargs).with_updates(labels=LABELS)
    paths["unet_pt"] = save_checkpoint(folder / "unet.pt", unet.state_dict(), unet_card)
    paths["unet_onnx"] = export_tiny_onnx(unet, unet_card, folder / "unet.onnx")
    return paths


@pytest.fixture(scope="module")
def hippo(shared_data) -> list[Path]:
    return sorted((shared_data / "hippocampus" / "imagesTr").glob("hippocampus_00*.nii.gz"))[:4]


def error_lines(done) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


def assert_same_grid(written: Path, reference: Image) -> sitk.Image:
    image = sitk.ReadImage(str(written))
    assert image.GetSize()[:3] == tuple(reversed(reference.spatial_shape))
    np.testing.assert_allclose(image.GetSpacing()[:3], reference.geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin()[:3], reference.geometry.origin, atol=1e-5)
    direction = np.asarray(image.GetDirection()).reshape(image.GetDimension(), -1)[:3, :3]
    np.testing.assert_allclose(direction.ravel(), reference.geometry.direction, atol=1e-6)
    return image


# ----------------------------------------------------------------------------- one scan

def test_single_scan_mask_probabilities_volumes_json(medseg, models, hippo, tmp_path):
    scan = read_image(hippo[0])
    mask, probs = tmp_path / "out" / "mask.nii.gz", tmp_path / "out" / "probs.nii.gz"
    done = medseg("predict", hippo[0], "-o", mask, "--model", models["conv"], "--probabilities", probs, "--tta",
                  "--batch", "3", "--overlap", "0.25", "--device", "cuda", "--json")
    assert done.returncode == 0, done.stderr
    if not onnx_cuda_usable():  # exactly one clear line says why it runs on CPU
        assert len(error_lines(done)) == 1 and "CUDA" in done.stderr and "CPU" in done.stderr, done.stderr
    data = json.loads(done.stdout)
    labels = sitk.GetArrayFromImage(assert_same_grid(mask, scan))
    probabilities = sitk.GetArrayFromImage(assert_same_grid(probs, scan))  # (K, Z, Y, X) as a 4D NIfTI
    assert probabilities.shape == (3,) + scan.spatial_shape and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels, probabilities.argmax(0))
    rows = data["cases"][0]["volumes"]
    voxel = float(np.prod(scan.geometry.spacing))
    assert [r["name"] for r in rows] == ["anterior", "posterior"]
    for row in rows:
        assert row["voxels"] == int((labels == row["label"]).sum()) > 0
        assert row["volume_mm3"] == pytest.approx(row["voxels"] * voxel)
    assert data["model"] == "tiny-hippo" and data["summary"] == {"ok": 1, "skipped": 0, "failed": 0}

    human = medseg("predict", hippo[0], "-o", tmp_path / "again.nii.gz", "--model", models["conv"])
    assert human.returncode == 0 and "anterior" in human.stdout and "mm³" in human.stdout


def test_slicer_segmentation_and_keep_largest(medseg, models, hippo, tmp_path):
    from scipy import ndimage

    out = tmp_path / "mask.seg.nrrd"
    done = medseg("predict", hippo[1], "-o", out, "--model", models["conv"], "--keep-largest", "-q")
    assert done.returncode == 0, done.stderr
    image = assert_same_grid(out, read_image(hippo[1]))
    assert image.GetMetaData("Segment0_Name") == "anterior" and image.GetMetaData("Segment1_Name") == "posterior"
    assert image.GetMetaData("Segment0_Color") == "1 0.501961 0"
    assert image.GetMetaData("Segment1_LabelValue") == "2"
    labels = sitk.GetArrayFromImage(image)
    for value in (1, 2):
        assert ndimage.label(labels == value)[1] == 1  # one component per label


def test_dicom_folder_in_nifti_out_keeps_dicom_geometry(medseg, models, shared_data, tmp_path):
    folder = shared_data / "totalseg" / "example_ct_dicom"
    out = tmp_path / "ct_mask.nii.gz"
    done = medseg("predict", folder, "-o", out, "--model", models["wide"], "-q")
    assert done.returncode == 0, done.stderr
    scan = read_image(folder)
    assert scan.spatial_shape == (20, 512, 512)
    assert_same_grid(out, scan)
    assert read_image(out).geometry.matches(scan.geometry)


def test_channels_in_the_cards_order_and_count(medseg, models, hippo, tmp_path):
    out = tmp_path / "two.nii.gz"
    done = medseg("predict", "--channels", f"{hippo[0]},{hippo[0]}", "-o", out, "--model", models["two"], "-q")
    assert done.returncode == 0, done.stderr
    assert_same_grid(out, read_image(hippo[0]))
    for inputs in ([str(hippo[0])], [str(hippo[0])] * 3):  # one file for a 2-channel model, three files
        bad = tmp_path / "bad.nii.gz"
        done = medseg("predict", *inputs, "-o", bad, "--model", models["two"])
        assert done.returncode == 2 and len(error_lines(done)) == 1, done.stderr
        assert "2 channel" in done.stderr and "mod0, mod1" in done.stderr and not bad.exists()


def test_torch_backend_matches_onnx(medseg, models, hippo, tmp_path):
    outputs = {}
    for backend, model in (("onnx", models["unet_onnx"]), ("torch", models["unet_pt"])):
        probs = tmp_path / f"{backend}_probs.nii.gz"
        done = medseg("predict", hippo[2], "-o", tmp_path / f"{backend}.nii.gz", "--model", model,
                      "--backend", backend, "--probabilities", probs, "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["backend"].startswith(backend)
        outputs[backend] = sitk.GetArrayFromImage(sitk.ReadImage(str(probs)))
    assert np.abs(outputs["onnx"] - outputs["torch"]).max() <= 1e-4


def test_model_name_resolves_through_the_weights_cache(medseg, models, hippo, tmp_path, medseg_home):
    from medseg_cli.weights import register_local_model

    register_local_model(models["conv"], "tiny-test-model")
    out = tmp_path / "named.nii.gz"
    done = medseg("predict", hippo[0], "-o", out, "--model", "tiny-test-model", "-q", "--offline")
    assert done.returncode == 0, done.stderr
    assert out.is_file()


# ----------------------------------------------------------------------------- cohorts

def test_cohort_shards_skip_overwrite_and_a_failing_case(medseg, models, hippo, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for path in hippo:
        (cases / path.name).symlink_to(path)
    (cases / "hippocampus_000.nii.gz").write_bytes(b"not a nifti at all")  # fails, the others go on
    out = tmp_path / "masks"
    results = {}
    for shard in ("1/2", "2/2"):
        done = medseg("predict", cases, "-o", out, "--model", models["conv"], "--shard", shard, "--json")
        results[shard] = json.loads(done.stdout)
        failed = [c for c in results[shard]["cases"] if c["status"] == "failed"]
        assert done.returncode == (2 if failed else 0), done.stderr
    names = {shard: {c["case"] for c in r["cases"]} for shard, r in results.items()}
    assert not names["1/2"] & names["2/2"]
    assert names["1/2"] | names["2/2"] == {"hippocampus_000"} | {p.name[:-7] for p in hippo}
    failures = [c for r in results.values() for c in r["cases"] if c["status"] == "failed"]
    assert [c["case"] for c in failures] == ["hippocampus_000"] and "hippocampus_000.nii.gz" in failures[0]["error"]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(p.name for p in hippo)  # nothing for the broken case, no scratch left
    for path in hippo:
        assert_same_grid(out / path.name, read_image(path))

    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (cases / "hippocampus_000.nii.gz").unlink()
    again = medseg("predict", cases, "-o", out, "--model", models["conv"], "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["summary"] == {"ok": 0, "skipped": len(hippo), "failed": 0}
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    redo = medseg("predict", cases, "-o", out, "--model", models["conv"], "--overwrite", "--shard", "1/3",
                  "--json")
    assert redo.returncode == 0 and json.loads(redo.stdout)["summary"]["ok"] == 2  # cases 1 and 4 of 4


def test_cohort_from_csv_with_named_cases(medseg, models, hippo, tmp_path):
    table = tmp_path / "cases.csv"
    table.write_text("case,image\n" + "".join(f"subject{k},{p}\n" for k, p in enumerate(hippo[:2])))
    out, probs = tmp_path / "csv_out", tmp_path / "csv_probs"
    done = medseg("predict", table, "-o", out, "--model", models["conv"], "--format", ".nrrd", "-q",
                  "--probabilities", probs, "--prob-dtype", "uint8")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["subject0.nrrd", "subject1.nrrd"]
    assert sorted(p.name for p in probs.iterdir()) == ["subject0_probabilities.nii.gz",
                                                      "subject1_probabilities.nii.gz"]
    assert "2 segmented, 0 skipped, 0 failed" in done.stdout
    stored = sitk.GetArrayFromImage(assert_same_grid(probs / "subject1_probabilities.nii.gz", read_image(hippo[1])))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "subject1.nrrd")))
    assert stored.dtype == np.uint8 and stored.shape == (3,) + labels.shape  # round(p * 255) per class
    assert np.abs(stored.astype(int).sum(0) - 255).max() <= 2
    assert (stored.argmax(0) == labels).mean() > 0.99


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_one_line_an_exit_code_and_nothing_written(medseg, models, hippo, tmp_path, medseg_home):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(models["conv"].read_bytes()[:300])
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder")
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(hippo[0].read_bytes())
    cases = [
        ((hippo[0], "-o", tmp_path / "m1.nii.gz", "--model", tmp_path / "missing.onnx"), 3, "not found"),
        ((hippo[0], "-o", tmp_path / "m2.nii.gz", "--model", "no-such-model", "--offline"), 3, "no-such-model"),
        ((hippo[0], "-o", tmp_path / "m3.nii.gz", "--model", corrupt), 3, "corrupt.onnx"),
        ((hippo[0], "-o", blocker / "m4.nii.gz", "--model", models["conv"]), 2, "not a folder"),
        ((hippo[0], "-o", tmp_path / "m5.txt", "--model", models["conv"]), 2, "file type"),
        ((tmp_path / "nothing.nii.gz", "-o", tmp_path / "m6.nii.gz", "--model", models["conv"]), 2, "no such file"),
        ((scan, "-o", scan, "--model", models["conv"]), 2, "overwrite the input"),
        ((hippo[0], "-o", tmp_path / "m7.jpg", "--model", models["conv"]), 2, "JPEG"),  # lossy: alters labels
        ((hippo[0], "-o", tmp_path / "m8.png", "--model", models["conv"]), 2, "cannot be stored as .png"),
    ]
    before = sorted(os.listdir(tmp_path))
    for args, code, words in cases:
        done = medseg("predict", *args)
        lines = error_lines(done)
        assert done.returncode == code, (args, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and words in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert sorted(os.listdir(tmp_path)) == before
    assert blocker.read_text() == "I am a file, not a folder" and scan.read_bytes() == hippo[0].read_bytes()


def test_written_mask_reads_back_as_an_image(models, hippo, tmp_path):
    """The library call the CLI makes, once in process: Image in, label Image on the same grid out."""
    from medseg_cli.inference import Predictor, load_runner

    scan = read_image(hippo[3])
    result = Predictor(load_runner(models["conv"], device="cpu", threads=1)).predict(scan)
    path = write_image(result.labels, tmp_path / "m.nii.gz", label=True)
    back = read_image(path)
    assert back.spatial_shape == scan.spatial_shape and back.geometry.matches(scan.geometry)
    assert back.array.dtype == np.uint8


def test_case_discovery_folders_csv_dicom_globs_and_shards(shared_data, hippo, tmp_path):
    """What INPUT means (in process, no network run): nnU-Net channel groups in a folder, a CSV whose
    columns are the card's channel names, DICOM series sub-folders, a --channels glob, shards."""
    from medseg_cli.errors import InputError
    from medseg_cli.inference.cohort import discover_cases, parse_shard, select_shard

    two = make_card(in_channels=2, num_classes=2).with_updates(channel_names=["t1", "t2"])
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("a_0000", "a_0001", "b_0000", "b_0001", "c_0000", "loose"):
        (folder / f"{name}.nii.gz").symlink_to(hippo[0])
    cases, cohort = discover_cases([str(folder)], two)
    assert cohort and [c.name for c in cases] == ["a", "b", "c", "loose"]
    assert [p.name for p in cases[0].paths] == ["a_0000.nii.gz", "a_0001.nii.gz"] and cases[0].problem is None
    assert isinstance(cases[2].problem, InputError) and "c_0001" in str(cases[2].problem)  # missing channel
    assert isinstance(cases[3].problem, InputError) and "_0000" in str(cases[3].problem)

    table = tmp_path / "list.csv"  # columns in another order than the card's: matched by name
    table.write_text("t2,id,t1\nsecond.nii.gz,s1,first.nii.gz\n")
    (csv_case,), cohort = discover_cases([str(table)], two)
    assert cohort and csv_case.name == "s1" and [p.name for p in csv_case.paths] == ["first.nii.gz", "second.nii.gz"]
    assert csv_case.paths[0].parent == tmp_path  # relative to the CSV's folder

    one = make_card(num_classes=2)
    series = tmp_path / "dicoms"
    series.mkdir()
    (series / "ct7").symlink_to(shared_data / "totalseg" / "example_ct_dicom")
    dicom_cases, cohort = discover_cases([str(series)], one)
    assert cohort and [c.name for c in dicom_cases] == ["ct7"]
    single, cohort = discover_cases([str(shared_data / "totalseg" / "example_ct_dicom")], one)
    assert not cohort and single[0].paths == [shared_data / "totalseg" / "example_ct_dicom"]

    (glob_case,), cohort = discover_cases([], two, channels=str(folder / "a_000*.nii.gz"))
    assert not cohort and [p.name for p in glob_case.paths] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    with pytest.raises(InputError, match=r"takes 2 channel\(s\), 5 file\(s\) given"):
        discover_cases([], two, channels=str(folder / "*_000*.nii.gz"))

    many = [c for c in discover_cases([str(folder)], make_card(num_classes=2))[0]]
    shares = [select_shard(many, parse_shard(f"{i}/3")) for i in (1, 2, 3)]
    assert sorted(c.name for s in shares for c in s) == sorted(c.name for c in many)
    assert sum(len(s) for s in shares) == len(many) == 6
    for bad in ("0/3", "4/3", "x"):
        with pytest.raises(InputError, match="shard"):
            parse_shard(bad)


def test_packaged_default_model_in_bf16_matches_its_fp32_labels(medseg, shared_data, tmp_path, medseg_home):
    """The shipped network twice on a held-out case: ONNX float32 (default) and its torch twin
    (hippocampus-torch) with --precision bf16. Same grid, labels equal almost everywhere; mixed
    precision on the ONNX model and fp16 on CPU are one-line errors."""
    from medseg_cli.inference.runners import cpu_has_native_bf16

    scan = shared_data / "hippocampus" / "imagesTr" / "hippocampus_011.nii.gz"
    labels = {}
    for name, extra in (("fp32", []), ("bf16", ["--model", "hippocampus-torch", "--precision", "bf16"])):
        out = tmp_path / f"{name}.nii.gz"
        done = medseg("predict", scan, "-o", out, "--json", "--offline", "--device", "cpu", *extra)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["backend"] == ("onnx (CPU)" if name == "fp32" else
                                     "torch (cpu, bf16)" if cpu_has_native_bf16() else "torch (cpu)"), report
        assert_same_grid(out, read_image(scan))
        labels[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(labels["fp32"])) == {0, 1, 2}
    assert (labels["fp32"] == labels["bf16"]).mean() > 0.999
    done = medseg("predict", scan, "-o", tmp_path / "x.nii.gz", "--precision", "bf16", "--offline")
    assert done.returncode == 3 and "hippocampus-torch" in done.stderr and len(error_lines(done)) == 1
    done = medseg("predict", scan, "-o", tmp_path / "y.nii.gz", "--model", "hippocampus-torch", "--precision", "fp16",
                  "--device", "cpu", "--offline")
    assert done.returncode == 2 and "fp16 needs CUDA" in done.stderr and len(error_lines(done)) == 1
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "y.nii.gz").exists()
