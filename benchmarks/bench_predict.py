"""Speed, peak memory and agreement of medseg's sliding-window prediction against MONAI's
``sliding_window_inference`` (Gaussian mode) in torch eager mode: the same zoo network and weights, the
same volume, patch, overlap and batch, in one run. Contenders (``--precision``):

* ``medseg``      -- ONNX Runtime, float32 (the default ``medseg predict`` path);
* ``medseg-bf16`` -- medseg's torch runner with ``--precision bf16`` (torch autocast, bfloat16);
* ``monai``       -- MONAI, float32 eager: the peer the ratios are against;
* ``monai-bf16``  -- MONAI with the predictor wrapped in the same bf16 autocast, so the bf16 gain can
  be told apart from anything medseg does (the equal-arithmetic comparison).

MONAI is installed only for this benchmark, in its own venv, never as a medseg dependency. The venv
borrows medseg's own environment (torch, onnxruntime, medseg itself) through a .pth file, so only
MONAI's pure-Python package is added:

    python3 -m venv /tmp/benchenv_p
    /tmp/benchenv_p/bin/pip install --no-deps monai
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/benchenv_p/lib/python3.11/site-packages/medseg_venv.pth
    /tmp/benchenv_p/bin/python benchmarks/bench_predict.py [--size 160] [--patch 64] [--threads N] [--repeats R]
        [--precision fp32|bf16|both]

(run from the repository root; any venv with medseg, torch, onnxruntime and monai will do). Defaults:
a 160³ volume, 64³ patches, overlap 0.5, batch 1, all physical cores, all four contenders; it takes
about 3 minutes on 2 cores (``--no-check`` skips the untimed agreement run). Run it on an idle machine.

The parent process builds the network (zoo ``unet3d`` at its default width: 16 features, 4 levels,
1 -> 3 classes, seeded), saves its weights, exports it to ONNX (with medseg's parity check) and
makes a smooth random volume (size³ voxels, Gaussian-filtered noise). Each contender then runs in
its own fresh Python process (``--worker``): load, one untimed warm-up window, then the whole
volume timed (best of ``--repeats``); peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of
that process (imports included; the RSS before the timed run is printed too; the parent never
imports torch, since Linux carries a parent's RSS at fork over into the child's getrusage). medseg runs the
full ``Predictor`` (card preprocessing "none", Gaussian blending, probabilities out); MONAI runs
``sliding_window_inference(mode="gaussian", sigma_scale=0.125)`` on softmax outputs. All give
(3, Z, Y, X) float32 probabilities; the maximum absolute difference to MONAI float32 and the argmax
agreement are printed. The windows are the same, but MONAI clamps its 3D Gaussian map to >= 1e-3, so
near the volume's faces it averages overlapping windows almost uniformly where medseg keeps the
Gaussian ratio: with an untrained network (windows disagree a lot) that shows as a visible
difference there. An untimed second MONAI run given medseg's own Gaussian map (``roi_weight_map``)
must agree with medseg float32 within 1e-4 (exit 1 otherwise).

Results (2026-12-02, idle AMD EPYC with AVX512-BF16, 2 threads, best of 2; also in the README):

    medseg           25.68 s   527 MiB   onnx (CPU)                           1.02x MONAI
    medseg-bf16      11.29 s   526 MiB   torch (cpu, bf16)                    2.31x MONAI
    monai            26.11 s   714 MiB   monai 1.6.1 / torch 2.13.0 eager     1x
    monai-bf16       11.14 s   538 MiB   the same under bf16 autocast         (medseg-bf16: 0.99x of it)

i.e. the network dominates; the bf16 gain is torch's, available to both. Before the 2x nearest
upsampling was exported as a copy (not ONNX Resize), medseg float32 took 27.6 s (0.93x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHITECTURE = "unet3d"
CLASSES = 3
CONTENDERS = ("medseg", "medseg-bf16", "monai", "monai-bf16")


def peak_rss_mib() -> float:
    """Peak RSS of this process, MiB: ``getrusage`` (Linux carries the parent's RSS at fork over exec, so
    the parent stays lean), or VmHWM of /proc/self/status when that is smaller (this process image only)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    peak = min(peak, int(line.split()[1]) / 1024.0)
    except OSError:
        pass
    return peak


def smooth_volume(size: int, seed: int = 0) -> np.ndarray:
    """(size, size, size) float32: Gaussian-filtered noise (sigma 3 voxels), z-scored."""
    from scipy import ndimage

    noise = np.random.default_rng(seed).standard_normal((size,) * 3, dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, 3.0)
    return ((smooth - smooth.mean()) / smooth.std()).astype(np.float32)


def make_card(patch: int):
    from medseg_cli.card import ModelCard

    return ModelCard(name="bench-unet3d", architecture=ARCHITECTURE, in_channels=1, num_classes=CLASSES,
                     input_patch=[patch] * 3, output_patch=[patch] * 3,
                     labels={"0": "background", "1": "a", "2": "b"},
                     preprocessing={"roi": "none", "normalization": {"kind": "none"}})


# ------------------------------------------------------------------------------------ workers

def run_medseg(args) -> dict:
    """medseg's Predictor with ONNX Runtime in float32 (``medseg``) or torch in bfloat16 (``medseg-bf16``)."""
    from medseg_cli.imaging import Image
    from medseg_cli.inference.predictor import Predictor
    from medseg_cli.inference.runners import OnnxRunner, TorchRunner

    work = Path(args.workdir)
    if args.worker == "medseg-bf16":
        import torch

        from medseg_cli.zoo import build_model

        model = build_model(ARCHITECTURE, 1, CLASSES)
        model.load_state_dict(torch.load(work / "weights.pt", weights_only=True))
        runner = TorchRunner(model, make_card(args.patch), device="cpu", threads=args.threads, precision="bf16")
    else:
        runner = OnnxRunner(work / "model.onnx", device="cpu", threads=args.threads)
    predictor = Predictor(runner, overlap=args.overlap, batch_size=args.batch)
    runner.predict_batch(np.zeros((args.batch, 1) + (args.patch,) * 3, np.float32))  # warm-up
    volume = np.load(work / "volume.npy")
    rss_before = peak_rss_mib()
    best, probabilities = float("inf"), None
    for _ in range(args.repeats):
        del probabilities
        start = time.perf_counter()
        # the copy is passed inline, as `medseg predict` does, so the predictor frees it once preprocessed
        result = predictor.predict(Image(volume.copy()), probabilities=True)
        best = min(best, time.perf_counter() - start)
        probabilities = result.probabilities.array
        del result
    np.save(work / f"{args.worker}.npy", probabilities)
    return {"seconds": best, "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
            "backend": runner.description, "threads": args.threads}


def run_monai(args) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from medseg_cli.zoo import build_model

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    model = build_model(ARCHITECTURE, 1, CLASSES)
    model.load_state_dict(torch.load(work / "weights.pt", weights_only=True))
    model.eval()

    bf16 = args.worker == "monai-bf16"  # MONAI's own mixed precision: the user wraps the call in autocast

    def predictor(x: torch.Tensor) -> torch.Tensor:
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.softmax(model(x).float(), dim=1)
        return torch.softmax(model(x), dim=1)

    with torch.inference_mode():
        predictor(torch.zeros((args.batch, 1) + (args.patch,) * 3))  # warm-up
    volume = np.load(work / "volume.npy")
    rss_before = peak_rss_mib()
    best, output = float("inf"), None
    for _ in range(args.repeats):
        del output
        inputs = torch.from_numpy(volume.copy())[None, None]
        start = time.perf_counter()
        with torch.inference_mode():
            output = sliding_window_inference(inputs, roi_size=(args.patch,) * 3, sw_batch_size=args.batch,
                                              predictor=predictor, overlap=args.overlap, mode="gaussian",
                                              sigma_scale=0.125, padding_mode="constant", cval=0.0)
        best = min(best, time.perf_counter() - start)
        del inputs
    np.save(work / f"{args.worker}.npy", output[0].numpy().astype(np.float32))
    del output
    if args.check and not bf16:  # untimed: MONAI's stitching with medseg's (unclamped) Gaussian map must give medseg's numbers
        from medseg_cli.inference.sliding_window import gaussian_weights_1d

        g = gaussian_weights_1d(args.patch)
        weights = torch.from_numpy(np.einsum("i,j,k->ijk", g, g, g).astype(np.float32))
        with torch.inference_mode():
            same = sliding_window_inference(torch.from_numpy(volume)[None, None], roi_size=(args.patch,) * 3,
                                            sw_batch_size=args.batch, predictor=predictor, overlap=args.overlap,
                                            mode="gaussian", roi_weight_map=weights)
        np.save(work / "monai_same_weights.npy", same[0].numpy().astype(np.float32))
    import monai

    return {"seconds": best, "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(),
            "backend": f"monai {monai.__version__} / torch {torch.__version__} eager (cpu{', bf16 autocast' if bf16 else ''})",
            "threads": args.threads}


# ------------------------------------------------------------------------------------ parent

def prepare(args, work: Path) -> None:
    import torch

    from exporters.onnx_export import export_onnx
    from medseg_cli.zoo import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(ARCHITECTURE, 1, CLASSES).eval()
    torch.save(model.state_dict(), work / "weights.pt")
    export_onnx(model, make_card(args.patch), work / "model.onnx", input_shape=(1, 1) + (args.patch,) * 3)
    np.save(work / "volume.npy", smooth_volume(args.size))
    parameters = sum(p.numel() for p in model.parameters())
    print(f"network: zoo {ARCHITECTURE} default width ({parameters:,} parameters), 1 -> {CLASSES} classes")


def spawn(name: str, args, work: Path, parse: bool = True):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--workdir", str(work),
               "--size", str(args.size), "--patch", str(args.patch), "--overlap", str(args.overlap),
               "--batch", str(args.batch), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    if not args.check:
        command.append("--no-check")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{name} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) if parse else done.stdout


def main() -> None:
    from medseg_cli.inference.runners import physical_cores  # numpy only: the parent stays lean

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=160, help="volume edge in voxels (default 160)")
    parser.add_argument("--patch", type=int, default=64, help="patch edge in voxels (default 64)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1, help="windows per network call (both)")
    parser.add_argument("--threads", type=int, default=physical_cores(), help="CPU threads (both)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per contender; best is kept")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the untimed MONAI run with medseg's importance map (agreement check)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                        help="fp32: medseg ONNX vs MONAI; bf16: medseg torch bf16 vs MONAI (fp32 eager, and its "
                             "own bf16 autocast); both (default)")
    parser.add_argument("--worker", choices=["prepare"] + list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "prepare":  # torch is imported here, not in the parent (see peak_rss_mib)
        prepare(args, Path(args.workdir))
        return
    if args.worker:
        result = (run_medseg if args.worker.startswith("medseg") else run_monai)(args)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="bench_predict_") as folder:
        work = Path(folder)
        print(f"volume {args.size}³ (smooth random), patch {args.patch}³, overlap {args.overlap}, Gaussian, "
              f"batch {args.batch}, {args.threads} thread(s), best of {args.repeats}")
        print(spawn("prepare", args, work, parse=False), end="")
        names = ["medseg", "monai"]
        if args.precision != "fp32":
            names = (["medseg"] if args.precision == "both" else []) + ["medseg-bf16", "monai", "monai-bf16"]
        results = {name: spawn(name, args, work) for name in names}
        outputs = {name: np.load(work / f"{name}.npy") for name in names}
        same = None
        if args.check:
            c = np.load(work / "monai_same_weights.npy")
            a = outputs.get("medseg", outputs.get("medseg-bf16"))
            same = float(np.abs(a - c).max()) if a.shape == c.shape else float("inf")
    print(f"{'':12} {'time (s)':>9} {'peak RSS (MiB)':>15} {'RSS before run':>15}  backend")
    for name, r in results.items():
        print(f"{name:12} {r['seconds']:9.2f} {r['peak_rss_mib']:15.0f} {r['rss_before_mib']:15.0f}  {r['backend']}")
    monai = results["monai"]
    for name in (n for n in names if n.startswith("medseg")):
        r = results[name]
        print(f"speed: {name} is {monai['seconds'] / r['seconds']:.2f}x MONAI's speed (target >= 2x); "
              f"peak RSS {name}/MONAI = {r['peak_rss_mib'] / monai['peak_rss_mib']:.2f}")
    if "monai-bf16" in results:
        print(f"speed at equal arithmetic: medseg-bf16 is "
              f"{results['monai-bf16']['seconds'] / results['medseg-bf16']['seconds']:.2f}x MONAI under bf16 autocast")
    reference = outputs["monai"]
    for name in (n for n in names if n != "monai"):
        a = outputs[name]
        difference = float(np.abs(a - reference).max()) if a.shape == reference.shape else float("inf")
        agreement = float((a.argmax(0) == reference.argmax(0)).mean()) if a.shape == reference.shape else 0.0
        print(f"outputs: max |{name} - MONAI| = {difference:.2e} over {a.size:,} probabilities; argmax agreement "
              f"{agreement:.6f}")
    print("(MONAI clamps its 3D Gaussian map to >= 1e-3, so near the volume's faces it averages windows almost "
          "uniformly; medseg keeps the pure Gaussian. bf16 rounds activations to 8 significant bits.)")
    if same is not None:
        print(f"same importance map (MONAI given medseg's Gaussian via roi_weight_map, untimed): "
              f"max |difference| = {same:.2e}")
        if "medseg" in outputs and not same <= 1e-4:
            sys.exit("medseg and MONAI disagree beyond 1e-4 with the same weights")


if __name__ == "__main__":
    main()
