"""Cascade vs whole volume: the same trained segmenter run (a) on the whole scan and (b) inside the
locator -> segmenter cascade (locator on a coarse grid, segmenter on the located crop), on a scan the
models never saw. Same machine, same threads, one script; Dice by ``medseg eval``.

Train the cascade first (both stages from one config, ~5 min on one CPU thread), then run this from
the repository root:

    OMP_NUM_THREADS=1 medseg train --config configs/cascade_spine.yaml --device cpu
    .venv/bin/python benchmarks/bench_cascade.py [--run runs/cascade_spine] [--threads 1] [--repeats 3]

Test scan: the TotalSegmentator example DICOM series (20 slices of 512 x 512, 0.98 x 0.98 x 2 mm;
a different scan from the one the models were trained on), reference = its TotalSegmentator
vertebrae T12 and T11 (example_seg_dicom.nii.gz, labels 32 and 33 merged, ``--reference-labels``;
resampled nearest-neighbour onto the DICOM reader's grid: that NIfTI stores the y axis flipped).
For each way, ``medseg predict --device cpu --threads T`` runs as a user would (wall time of the
whole command: start-up, DICOM reading, models, writing; best of ``--repeats``, the ways
alternating), then, in this process, the prediction alone is timed
(``Predictor.predict`` vs ``CascadePredictor.predict`` on the already-read scan, ONNX Runtime with T
threads, best of ``--repeats``). Masks are scored with ``medseg eval --labels 1``.

Measured (2026-12-02, 2-core shared VM loaded by other jobs, one thread, ``--repeats 3``, with
``--baseline`` = the same config trained with ``--set cascade=null`` on the whole scan, same budget):

    way                                   Dice    predict (s)   medseg predict wall (s)
    cascade (locator + segmenter)         0.635       1.39          3.55
    same segmenter on the whole volume    0.059      12.99         13.98
    baseline segmenter (whole-scan train) 0.117      13.14         13.56

    speed-up of the cascade: 9.4x (prediction), 3.9x (whole command incl. start-up and DICOM reading);
    an earlier run on the same models gave 8.2x and 3.9x (the machine's load varies)
    located box: 20 x 138 x 110 of 20 x 512 x 512 voxels (5.8 %), margin 20 mm included
    inside that box the whole-volume run and the cascade agree on 93 % of the voxels

Dice is NOT equal: the cascade is far better. With one training scan, both segmenters put false
positives on other bone and soft tissue across the 512 x 512 slices; the cascade's box (largest
located component + 20 mm) discards them (the whole-volume mask cut to the box scores 0.55). Inside
the box the two ways differ a little because the segmenter resamples (2 x 1.5 x 1.5 mm) and tiles
the crop on a grid anchored at the crop, not at the scan. Models trained on more than one scan
would be needed to measure the speed-up at equal Dice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = (REPO / ".." / "shared" / "data" / "totalseg").resolve()


def medseg(*args: str, threads: int) -> tuple[float, str]:
    """Run the CLI; (wall seconds, stdout). Fails loudly."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medseg_cli", *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"medseg {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return seconds, done.stdout


def reference(work: Path, labels: list[int]) -> Path:
    """``labels`` of example_seg_dicom.nii.gz, merged into label 1, on the DICOM reader's grid."""
    import numpy as np

    from medseg_cli.imaging import Image, read_image, write_image
    from medseg_cli.preprocessing import resample_image_to_grid

    scan = read_image(DATA / "example_ct_dicom")
    seg = read_image(DATA / "example_seg_dicom.nii.gz")
    on_grid = resample_image_to_grid(seg, scan.spatial_shape, scan.geometry, is_label=True)
    path = work / "reference" / "ct.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(Image(np.isin(on_grid.array, labels).astype(np.uint8), scan.geometry), path, label=True)
    return path


def dice_of(prediction: Path, ref: Path, threads: int) -> float:
    _, out = medseg("eval", str(prediction), str(ref), "--labels", "1", "--json", threads=threads)
    return float(json.loads(out)["summary"]["1"]["metrics"]["dice"]["mean"])


def in_process(models: dict, threads: int, repeats: int) -> dict:
    """Seconds of the prediction alone (scan already read), best of ``repeats``, per way."""
    from medseg_cli.imaging import read_image
    from medseg_cli.inference.cascade import CascadePredictor, load_cascade
    from medseg_cli.inference.predictor import Predictor
    from medseg_cli.inference.runners import load_runner

    scan = read_image(DATA / "example_ct_dicom")
    predictors = {name: CascadePredictor(load_cascade(model, device="cpu", threads=threads)) if name == "cascade"
                  else Predictor(load_runner(model, device="cpu", threads=threads)) for name, model in models.items()}
    best = {name: float("inf") for name in predictors}
    for _ in range(repeats):
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.predict(scan)
            best[name] = min(best[name], time.perf_counter() - start)
    box = predictors["cascade"].last_step.box
    return {"seconds": best, "box": [[b.start, b.stop] for b in box], "scan": list(scan.spatial_shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/cascade_spine", help="output folder of the cascade training")
    parser.add_argument("--reference-labels", default="32,33",
                        help="TotalSegmentator labels of example_seg_dicom.nii.gz that form the reference (T12, T11)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=None,
                        help="optional third way: a segmenter trained on whole scans (the same config with "
                             "--set cascade=null), run on the whole scan")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    run = Path(args.run).resolve()
    cards = sorted(run.glob("*.cascade.json"))
    if not cards or not (run / "segmenter" / "model.onnx").is_file():
        sys.exit(f"{run}: no trained cascade (NAME.cascade.json, segmenter/model.onnx); train it first")
    models = {"whole": str(run / "segmenter" / "model.onnx"), "cascade": str(cards[0])}
    if args.baseline:
        models["baseline"] = str(Path(args.baseline).resolve())
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_cascade_"))
    ref = reference(work, [int(v) for v in args.reference_labels.split(",")])
    scan = str(DATA / "example_ct_dicom")
    wall = {name: float("inf") for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            out = work / name / "ct.nii.gz"
            seconds, _ = medseg("predict", scan, "-o", str(out), "--model", model, "--device", "cpu",
                                "--threads", str(args.threads), "--overwrite", "--quiet", threads=args.threads)
            wall[name] = min(wall[name], seconds)
    dice = {name: dice_of(work / name / "ct.nii.gz", ref, args.threads) for name in models}
    timed = in_process(models, args.threads, args.repeats)
    from medseg_cli.imaging import read_image

    box = tuple(slice(*b) for b in timed["box"])
    inside = {name: read_image(work / name / "ct.nii.gz").array[box] for name in ("whole", "cascade")}
    agreement = float((inside["whole"] == inside["cascade"]).mean())  # same segmenter inside the box?
    result = {"threads": args.threads, "repeats": args.repeats, "scan_zyx": timed["scan"],
              "cascade_box_zyx": timed["box"], "dice": dice, "box_voxels_equal_whole_vs_cascade": agreement,
              "cli_wall_s": wall,
              "predict_s": timed["seconds"],
              "speedup_cli": {name: wall[name] / wall["cascade"] for name in models if name != "cascade"},
              "speedup_predict": {name: timed["seconds"][name] / timed["seconds"]["cascade"]
                                  for name in models if name != "cascade"}, "work": str(work)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
