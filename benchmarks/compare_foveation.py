"""Foveation vs fixed field-of-view / resolution on DRIVE retinal vessels (issue 8, Foveation section).

Trains, with the same 2D U-Net, data, loss, optimiser and wall-clock budget:

* ``foveation``  -- configs/foveation_drive.yaml: per location a learnt soft mix of 3 views
  (96 px full resolution, 192 px at 1/2, 384 px at 1/4, each resampled to 96 x 96);
* ``foveation_argmax`` / ``foveation_gumbel`` -- the same with ``model.kwargs.fusion`` argmax (the
  seed's "Ours-Mode": the most probable view, straight-through gradient) or gumbel (its "Ours-GSM":
  a soft Gumbel-softmax sample at tau 1 in training, the softmax in prediction); chosen with
  ``--fusions mean,argmax,gumbel`` (default: mean only);
* ``fixed_k``    -- configs/foveation_drive_fixed.yaml with ``force_config=k`` (k = 0, 1, 2): the
  same wrapper and context, the segmenter fed only view k (the seed's fixed-patch baselines);

then segments the 20 DRIVE test images (``medseg predict``, ONNX) and scores them inside the
field-of-view mask (``medseg eval --fov-mask``), printing a table (Dice / IoU of the vessel label,
training minutes) and writing it to OUT/results.json.

Run (from the repo root)::

    .venv/bin/python benchmarks/compare_foveation.py --out /tmp/fov --minutes 8 --epochs 44 --val-every 11
    # the argmax and Gumbel fusions alone, without rerunning the fixed views:
    .venv/bin/python benchmarks/compare_foveation.py --out /tmp/fov_fusions --minutes 30 --epochs 44 \
        --val-every 11 --fusions argmax,gumbel --skip-fixed [--dice-loss]

Duration: 4 trainings, ``--parallel`` (2) at a time with one thread each, plus ~2 min of prediction and
evaluation: ~16 min on 2 CPU cores (measured 2026-12-01 on 2 cores shared with a CI run: 44 epochs x 25
iterations of batch 4 took 6.1-6.8 min per run, the foveated one ~10% slower than a fixed view).
``--epochs`` sets the poly learning-rate schedule and is meant to be the binding limit; ``--minutes``
(``medseg train --max-minutes``) is only a safety stop, so every configuration sees the same number of
iterations (check ``epochs`` in the table). The script also reports how the trained foveation net
splits the test images among its views. Results from such short CPU trainings are indicative only:
the seed trained for hours on a GPU, and DRIVE images (565 x 584) are not ultra-high resolution.
As in the seed, every view is segmented into the labels of the central P x P output patch, so for a
view of s_k * P pixels the network must also learn the s_k zoom to the central 1/s_k of its input.
``--dice-loss`` (CE + soft Dice for every run) is a diagnostic for the plain-CE recipe of the seed.

Results of 2026-12-01 (44 x 25 iterations, base width 8, DRIVE test set, inside the FoV mask), plain CE:
foveation Dice 0.751 / IoU 0.603; fixed 96 px 0.773 / 0.631; fixed 192 px and 384 px 0.000 (all
background). The foveation net put 99% of the test cells on the 96 px view (mean weight 0.92).
With ``--dice-loss``: foveation 0.784 / 0.646; fixed 96 px 0.788 / 0.650; 192 px 0.210 / 0.119;
384 px 0.125 / 0.069 (foveation: 99.7% of cells on the 96 px view). Foveation did not beat the best
fixed view here; it learnt to pick it, at ~10% more compute.

Results of 2026-12-02, the other two fusions, same recipe and test set (``--fusions argmax,gumbel
--skip-fixed``; 44 x 25 iterations each; 5.9-13.6 min per run, two at a time on 2 cores shared with
other jobs, so the minutes say nothing about the fusions). Vessel Dice (mean +- sd over the 20
images) / IoU, plain CE: argmax 0.753 +- 0.036 / 0.605, Gumbel 0.757 +- 0.031 / 0.609 (mean fusion
0.751 +- 0.036, fixed 96 px 0.773 +- 0.030). CE + Dice: argmax 0.782 +- 0.030 / 0.643, Gumbel
0.778 +- 0.027 / 0.637 (mean 0.784 +- 0.024, fixed 96 px 0.788 +- 0.024). Cells inside the FoV whose
most probable view is the 96 px one: argmax 95.2% (CE) / 97.8% (CE + Dice), Gumbel 98.5% / 99.5%.
No fusion beat the best fixed view; the three fusions differ by less than their spread over the
images (one training each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVE = REPO.parent / "shared" / "data" / "drive"
MEDSEG = [sys.executable, "-m", "medseg_cli"]
RUNS = {
    "foveation": ("configs/foveation_drive.yaml", []),
    "foveation_argmax (Mode, ST)": ("configs/foveation_drive.yaml", ["model.kwargs.fusion=argmax"]),
    "foveation_gumbel (GSM, soft)": ("configs/foveation_drive.yaml", ["model.kwargs.fusion=gumbel"]),
    "fixed_0 (96 px, 1/1)": ("configs/foveation_drive_fixed.yaml", ["model.kwargs.force_config=0"]),
    "fixed_1 (192 px, 1/2)": ("configs/foveation_drive_fixed.yaml", ["model.kwargs.force_config=1"]),
    "fixed_2 (384 px, 1/4)": ("configs/foveation_drive_fixed.yaml", ["model.kwargs.force_config=2"]),
}


FUSION_RUNS = {"mean": "foveation", "argmax": "foveation_argmax", "gumbel": "foveation_gumbel"}


def slug(name: str) -> str:
    """Folder name of a run: 'fixed_0 (96 px, 1/1)' -> 'fixed_0'."""
    return name.split(" ")[0]


def prepare_references(out: Path) -> tuple[Path, Path]:
    """Integer reference masks (0/1) and FoV masks named like the test images (OUT/ref, OUT/fov)."""
    from medseg_cli.imaging import Image, write_image
    from medseg_cli.labelmaps import read_label_map

    ref, fov = out / "ref", out / "fov"
    ref.mkdir(parents=True, exist_ok=True)
    fov.mkdir(parents=True, exist_ok=True)
    for path in sorted((DRIVE / "test" / "1st_manual").glob("*_manual1.png")):
        number = path.name.split("_")[0]
        target = ref / f"{number}_test.png"
        if not target.exists():
            lab = read_label_map(str(path), {0: [0], 1: [255]})
            write_image(Image(lab.array, lab.geometry), target, label=True)
        link = fov / f"{number}_test.png"
        if not link.exists():
            os.symlink(DRIVE / "test" / "mask" / f"{number}_test_mask.png", link)
    return ref, fov


def train_command(name: str, args: argparse.Namespace) -> list[str]:
    config, sets = RUNS[name]
    sets = sets + [f"output={args.out / slug(name)}", "training.threads=1", f"training.epochs={args.epochs}",
                   f"training.val_every={args.val_every}",
                   f"model.kwargs.segmenter_kwargs={{base_width: {args.width}}}"]
    if args.dice_loss:
        sets.append("loss.terms={ce: 1.0, dice: 1.0}")
    cmd = MEDSEG + ["train", "--config", str(REPO / config), "--max-minutes", str(args.minutes), "--json", "-q"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def run_parallel(commands: dict[str, list[str]], parallel: int, log_dir: Path) -> dict[str, dict]:
    """Run commands, ``parallel`` at a time (OMP_NUM_THREADS=1); returns name -> {rc, seconds, stdout}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, done = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name = pending.pop(0)
            log = open(log_dir / f"{slug(name)}.{commands[name][3]}.log", "w")
            proc = subprocess.Popen(commands[name], stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO)
            running[name] = (proc, time.time(), log)
            print(f"started {name}", flush=True)
        time.sleep(2)
        for name, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                stdout = proc.stdout.read()
                log.close()
                done[name] = {"rc": proc.returncode, "seconds": time.time() - start, "stdout": stdout}
                print(f"finished {name}: rc {proc.returncode} in {done[name]['seconds'] / 60:.1f} min", flush=True)
                del running[name]
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/fov"))
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock safety stop per run")
    parser.add_argument("--epochs", type=int, default=44, help="epochs of 25 iterations (sets the lr schedule)")
    parser.add_argument("--val-every", type=int, default=11)
    parser.add_argument("--width", type=int, default=8, help="U-Net base width")
    parser.add_argument("--dice-loss", action="store_true",
                        help="train with CE + soft Dice instead of the seed's plain CE (all runs)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--runs", nargs="*", default=None, help="runs by slug, in this order (overrides --fusions "
                        "and --skip-fixed)", choices=[slug(n) for n in RUNS])
    parser.add_argument("--fusions", default="mean", help="comma-separated fusions of the foveated runs: mean "
                        "(the seed's Ours-Mean), argmax (Ours-Mode, straight-through), gumbel (Ours-GSM, soft)")
    parser.add_argument("--skip-fixed", action="store_true", help="leave out the fixed-view baselines")
    parser.add_argument("--skip-train", action="store_true", help="reuse OUT/<run>/model.onnx")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    by_slug = {slug(n): n for n in RUNS}
    if args.runs is not None:
        names = [by_slug[r] for r in args.runs]
    else:
        fusions = [f.strip() for f in args.fusions.split(",") if f.strip()]
        bad = [f for f in fusions if f not in FUSION_RUNS]
        if bad:
            parser.error(f"unknown fusion(s) {bad}: use {', '.join(FUSION_RUNS)}")
        names = [by_slug[FUSION_RUNS[f]] for f in fusions]
        names += [] if args.skip_fixed else [n for n in RUNS if n.startswith("fixed_")]
    ref, fov = prepare_references(args.out)

    train = {}
    if not args.skip_train:
        train = run_parallel({n: train_command(n, args) for n in names}, args.parallel, args.out)
    preds = {}
    for name in names:
        model = args.out / slug(name) / "model.onnx"
        preds[name] = MEDSEG + ["predict", str(DRIVE / "test" / "images"), "-o", str(args.out / "pred" / slug(name)),
                                "-m", str(model), "--batch", "8", "--overwrite", "-q"]
    predicted = run_parallel(preds, args.parallel, args.out)

    results = []
    for name in names:
        row = {"config": name}
        summary = args.out / slug(name) / "summary.json"
        if summary.exists():
            info = json.loads(summary.read_text())
            row["train_minutes"] = round(info.get("seconds", float("nan")) / 60, 1)
            row["epochs_done"] = info.get("epochs_done")
            row["val_dice"] = info.get("validation_dice_mean")
        if predicted[name]["rc"] != 0:
            row["error"] = "predict failed"
            results.append(row)
            continue
        report = args.out / "eval" / slug(name)
        proc = subprocess.run(MEDSEG + ["eval", str(args.out / "pred" / slug(name)), str(ref), "--fov-mask", str(fov),
                                        "--labels", "1", "-o", str(report), "--json", "-q"],
                              capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            row["error"] = proc.stderr.strip().splitlines()[-1:]
        else:
            row.update(extract_metrics(report / "summary.json"))
        results.append(row)

    usage = {}
    for name in names:
        checkpoint = args.out / slug(name) / "best.pt"
        if not name.startswith("foveation") or not checkpoint.exists():
            continue
        try:
            usage[slug(name)] = view_usage(checkpoint, fov)
        except Exception as err:  # an analysis extra: never lose the table over it
            usage[slug(name)] = {"error": f"{type(err).__name__}: {err}"}
    (args.out / "results.json").write_text(json.dumps({"runs": results, "foveation_view_usage": usage}, indent=2))
    print(f"\n{'config':30s} {'Dice':>7s} {'IoU':>7s} {'train min':>9s} {'epochs':>6s} {'val Dice':>8s}")
    for row in results:
        print(f"{row['config']:30s} {row.get('dice', float('nan')):7.3f} {row.get('iou', float('nan')):7.3f} "
              f"{row.get('train_minutes', float('nan')):9.1f} {str(row.get('epochs_done')):>6s} "
              f"{row['val_dice'] if row.get('val_dice') is not None else float('nan'):8.3f}  {row.get('error', '')}")
    for run, share in usage.items():
        print(f"{run} view usage on the test images (inside the FoV): {share}")


def view_usage(checkpoint: Path, fov: Path) -> dict:
    """How the trained foveation net splits the test images among its views.

    Runs :meth:`Foveation.foveation_map` on each normalised test image averaged over ``fov_map_scale``
    cells (the per-patch weights used by the sliding window are this map read at each patch centre)
    and returns, over the cells inside the FoV mask of all test images, the mean probability of each
    view and the fraction of cells where it is the most probable.
    """
    import numpy as np
    import torch
    from torch.nn import functional as F

    from medseg_cli.checkpoint import load_model_from_checkpoint
    from medseg_cli.imaging import read_image
    from medseg_cli.preprocessing import Preprocessor

    model, card = load_model_from_checkpoint(checkpoint)
    prep = Preprocessor.from_dict(card.preprocessing)
    probs, argmax = [], []
    with torch.no_grad():
        for path in sorted((DRIVE / "test" / "images").glob("*_test.png")):
            volume, _, _ = prep.forward(read_image(path))                   # (C, 1, Y, X)
            x = torch.from_numpy(np.ascontiguousarray(volume[:, 0]))[None]  # (1, C, Y, X)
            fmap = model.foveation_map(model.lowres(x))[0]                  # (K, h, w)
            mask = np.asarray(read_image(fov / path.name).array).reshape(x.shape[-2:]) > 0
            cells = F.avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], model.fov_map_scale)[0, 0] > 0.5
            probs.append(fmap[:, cells].T)
            argmax.append(fmap[:, cells].argmax(0))
    p, a = torch.cat(probs), torch.cat(argmax)
    return {"scales": list(model.fov_scales), "mean_prob": [round(float(v), 3) for v in p.mean(0)],
            "argmax_share": [round(float((a == k).float().mean()), 3) for k in range(model.num_configs)]}


def extract_metrics(summary: Path) -> dict:
    """Mean (and sd) vessel Dice and IoU over the test cases, and mIoU, from ``medseg eval``'s summary.json."""
    data = json.loads(summary.read_text())
    (entry,) = data["summary"].values()  # one evaluated label: 1 (vessel)
    metrics = entry["metrics"]
    out = {"dice": metrics["dice"]["mean"], "dice_sd": metrics["dice"]["std"],
           "iou": metrics["iou"]["mean"], "iou_sd": metrics["iou"]["std"]}
    if isinstance(data.get("multiclass"), dict) and "miou" in data["multiclass"]:
        out["miou"] = data["multiclass"]["miou"]
    return out


if __name__ == "__main__":
    main()
