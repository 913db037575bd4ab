"""Speed, memory and agreement of ``medseg eval`` metrics against DeepMind's surface-distance, MedPy
and MONAI (the peers are installed only for this benchmark, never as medseg dependencies).

    python3 -m venv /tmp/benchenv
    /tmp/benchenv/bin/pip install -c constraints.txt numpy scipy SimpleITK surface-distance medpy
    /tmp/benchenv/bin/pip install --no-deps monai      # MONAI needs torch: reuse the project's
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/benchenv/lib/python3.11/site-packages/zz_project.pth
    /tmp/benchenv/bin/python benchmarks/bench_eval.py [--shape 160 256 256] [--repeats 5]

(The .pth file appends the project's environment, for torch, click and rich, after the
benchmark's own packages; medseg itself is imported from this checkout.)

One run builds a realistic pair (a smooth random organ-like blob of about 1.2 L on a 160×256×256
grid at 2.5×0.8×0.8 mm and a perturbed copy), then, each library in its own forked process (so
peak memory is measured per library: VmHWM minus the RSS at the start of that process), times
Dice + HD95 + ASSD + NSD(1 mm) from the boolean masks (libraries imported beforehand), in
interleaved rounds (best round counts), and prints the ratios. It checks that medseg's values equal
surface-distance's to 1e-6 (default ``element`` convention) and MedPy's (``--surface voxel``), and
repeats the agreement check on the real TotalSegmentator pair (example_seg vs example_seg_fast,
every label) when ../shared/data is present. Exits non-zero when a value disagrees.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACING = (2.5, 0.8, 0.8)  # mm, (Z, Y, X)
TOLERANCE = 1.0  # mm


def make_pair(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth blob (about a quarter of the grid across) and a perturbed copy, as boolean arrays."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = tuple(max(4, n // 8) for n in shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in coarse], indexing="ij")
    ellipsoid = 1.0 - (grids[0] / 0.6) ** 2 - (grids[1] / 0.45) ** 2 - (grids[2] / 0.5) ** 2

    def field(noise_scale: float, noise_seed: int) -> np.ndarray:
        noise = ndimage.gaussian_filter(np.random.default_rng(noise_seed).standard_normal(coarse), 1.0)
        low = ellipsoid + noise_scale * noise / noise.std()
        zoom = [n / c for n, c in zip(shape, coarse)]
        return ndimage.zoom(low.astype(np.float32), zoom, order=3)[: shape[0], : shape[1], : shape[2]]

    base_seed = int(rng.integers(1 << 30))
    smooth = field(0.35, base_seed)
    ref = smooth > 0
    pred = (smooth + 0.15 * _smooth_noise(shape, base_seed + 7)) > 0.05
    return pred, ref


def _smooth_noise(shape, seed):
    from scipy import ndimage

    coarse = tuple(max(4, n // 6) for n in shape)
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(coarse), 1.0)
    noise /= noise.std()
    zoom = [n / c for n, c in zip(shape, coarse)]
    return ndimage.zoom(noise.astype(np.float32), zoom, order=1)[: shape[0], : shape[1], : shape[2]]


# ------------------------------------------------------------------------------------ libraries

def run_medseg(pred, ref, spacing, convention="element"):
    from medseg_cli.evaluation.metrics import compare_masks

    m = compare_masks(pred, ref, spacing, tolerance_mm=TOLERANCE, convention=convention)
    return {"dice": m["dice"], "hd": m["hd"], "hd95": m["hd95"], "assd": m["assd"], "nsd": m["nsd"]}


def run_surface_distance(pred, ref, spacing):
    if not hasattr(np, "Inf"):  # surface-distance 0.1 uses np.Inf, gone in numpy 2
        np.Inf = np.inf
    import surface_distance as sd

    d = sd.compute_surface_distances(ref, pred, spacing)
    return {"dice": float(sd.compute_dice_coefficient(ref, pred)),
            "hd": float(sd.compute_robust_hausdorff(d, 100)),
            "hd95": float(sd.compute_robust_hausdorff(d, 95)),
            # surface-distance gives the two directed means; ASSD is their area-weighted union mean
            "assd": float((np.sum(d["distances_gt_to_pred"] * d["surfel_areas_gt"])
                           + np.sum(d["distances_pred_to_gt"] * d["surfel_areas_pred"]))
                          / (np.sum(d["surfel_areas_gt"]) + np.sum(d["surfel_areas_pred"]))),
            "nsd": float(sd.compute_surface_dice_at_tolerance(d, TOLERANCE))}


def run_medpy(pred, ref, spacing):
    from medpy.metric import binary

    return {"dice": float(binary.dc(pred, ref)), "hd95": float(binary.hd95(pred, ref, spacing)),
            "assd": float(binary.assd(pred, ref, spacing)), "hd": float(binary.hd(pred, ref, spacing))}


def run_monai(pred, ref, spacing):
    import torch
    from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                               compute_surface_dice)

    torch.set_num_threads(1)
    p = torch.from_numpy(pred)[None, None]
    r = torch.from_numpy(ref)[None, None]
    return {"dice": float(compute_dice(p, r, include_background=True)),
            "hd95": float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                     spacing=list(spacing))),
            "assd": float(compute_average_surface_distance(p, r, include_background=True, symmetric=True,
                                                           spacing=list(spacing))),
            "nsd": float(compute_surface_dice(p, r, class_thresholds=[TOLERANCE], include_background=True,
                                              spacing=list(spacing)))}


LIBRARIES = {
    "medseg": lambda p, r, s: run_medseg(p, r, s, "element"),
    "medseg --surface voxel": lambda p, r, s: run_medseg(p, r, s, "voxel"),
    "surface-distance": run_surface_distance,
    "medpy": run_medpy,
    "monai": run_monai,
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(name, pred, ref, spacing, repeats, queue):
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS of this process
    except OSError:
        pass
    start_rss = _status_kib("VmRSS")
    times, values = [], None
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            values = LIBRARIES[name](pred, ref, spacing)
            times.append(time.perf_counter() - t0)
        queue.put({"time_s": min(times), "values": values,
                   "peak_extra_mib": (_status_kib("VmHWM") - start_rss) / 1024})
    except ImportError as err:
        queue.put({"error": f"not installed ({err})"})
    except Exception as err:  # noqa: BLE001 - report, keep benchmarking the others
        queue.put({"error": f"{type(err).__name__}: {err}"})


def measure(name, pred, ref, spacing, repeats):
    context = mp.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(name, pred, ref, spacing, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def agree(a: dict, b: dict, keys, tol=1e-6) -> list[str]:
    bad = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            continue
        if not (abs(x - y) <= tol * max(1.0, abs(y)) or (np.isinf(x) and np.isinf(y))):
            bad.append(f"{key}: medseg {x!r} vs {y!r}")
    return bad


def real_pair_check(shared: Path) -> list[str]:
    """Every label of TotalSegmentator's example_seg vs example_seg_fast, against the peers."""
    from medseg_cli.imaging import read_image

    ref_img = read_image(shared / "totalseg" / "example_seg.nii.gz")
    pred_img = read_image(shared / "totalseg" / "example_seg_fast.nii.gz")
    spacing = ref_img.geometry.spacing_zyx
    problems = []
    labels = sorted(set(np.unique(ref_img.array)) & set(np.unique(pred_img.array)) - {0})
    for label in labels:
        pred, ref = pred_img.array == label, ref_img.array == label
        ours = run_medseg(pred, ref, spacing)
        try:
            theirs = run_surface_distance(pred, ref, spacing)
            problems += [f"label {label} element {p}" for p in agree(ours, theirs, ("dice", "hd", "hd95", "assd", "nsd"))]
        except ImportError:
            pass
        try:
            ours_v = run_medseg(pred, ref, spacing, "voxel")
            theirs_v = run_medpy(pred, ref, spacing)
            problems += [f"label {label} voxel {p}" for p in agree(ours_v, theirs_v, ("dice", "hd", "hd95", "assd"))]
        except ImportError:
            pass
        print(f"  real pair label {label}: dice {ours['dice']:.4f} hd95 {ours['hd95']:.3f} mm "
              f"assd {ours['assd']:.3f} mm nsd {ours['nsd']:.4f}")
    return problems


def anisotropic_check(shared: Path) -> list[str]:
    """pyradiomics' brain tumour label (0.78×0.78×6.5 mm) against a perturbed copy (rolled one
    voxel in x, dilated in-plane, one slice removed), against both peers."""
    from scipy import ndimage

    from medseg_cli.imaging import read_image

    image = read_image(shared / "nrrd" / "brain1_label.nrrd")
    ref = image.array > 0
    pred = ndimage.binary_dilation(np.roll(ref, 1, axis=2), structure=np.ones((1, 3, 3), bool))
    slices = np.flatnonzero(pred.any(axis=(1, 2)))
    pred[slices[len(slices) // 2]] = False
    spacing = image.geometry.spacing_zyx
    problems = []
    ours, theirs = run_medseg(pred, ref, spacing), run_surface_distance(pred, ref, spacing)
    problems += [f"brain element {p}" for p in agree(ours, theirs, ("dice", "hd", "hd95", "assd", "nsd"))]
    ours_v, theirs_v = run_medseg(pred, ref, spacing, "voxel"), run_medpy(pred, ref, spacing)
    problems += [f"brain voxel {p}" for p in agree(ours_v, theirs_v, ("dice", "hd", "hd95", "assd"))]
    print(f"  brain tumour at {tuple(round(s, 3) for s in spacing)} mm: element hd95 {ours['hd95']:.3f} mm "
          f"(surface-distance {theirs['hd95']:.3f}), voxel hd95 {ours_v['hd95']:.3f} mm (MedPy {theirs_v['hd95']:.3f})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 256, 256))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (best one counts)")
    parser.add_argument("--skip", nargs="*", default=[], help="libraries to leave out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    t0 = time.perf_counter()
    pred, ref = make_pair(tuple(args.shape))
    print(f"pair {tuple(args.shape)} at {SPACING} mm built in {time.perf_counter() - t0:.1f} s: "
          f"{int(ref.sum()):,} reference voxels, {int(pred.sum()):,} predicted")

    # Import every library once here: the forked children inherit them, so no timing includes imports.
    for module in ("medseg_cli.evaluation.metrics", "scipy.spatial", "surface_distance", "medpy.metric.binary",
                   "torch", "monai.metrics"):
        try:
            __import__(module)
        except ImportError:
            pass
    if not hasattr(np, "Inf"):
        np.Inf = np.inf  # surface-distance 0.1 still writes np.Inf, gone in numpy 2
    # Rounds interleave the libraries so that each sees the same machine load; each library's best
    # round counts. MedPy (slowest by far) runs in the first round only.
    results: dict[str, dict] = {}
    for round_index in range(args.repeats):
        for name in LIBRARIES:
            if name in args.skip or (name == "medpy" and round_index > 0) or "error" in results.get(name, {}):
                continue
            current = measure(name, pred, ref, SPACING, 1)
            best = results.get(name)
            if best is None or "error" in current or current["time_s"] < best["time_s"]:
                results[name] = current

    base = results.get("medseg", {}).get("time_s")
    print(f"\n{'library':<24}{'time (s)':>10}{'vs medseg':>11}{'peak MiB':>10}   Dice      HD95 mm   ASSD mm   NSD@1mm")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24}  {r['error']}")
            continue
        v = r["values"]
        fmt = lambda k: f"{v[k]:<10.6f}" if k in v else f"{'-':<10}"  # noqa: E731
        print(f"{name:<24}{r['time_s']:>10.3f}{r['time_s'] / base:>10.1f}x{r['peak_extra_mib']:>10.1f}   "
              f"{fmt('dice')}{fmt('hd95')}{fmt('assd')}{fmt('nsd')}")

    problems = []
    if "values" in results.get("surface-distance", {}) and "values" in results.get("medseg", {}):
        problems += [f"element vs surface-distance: {p}" for p in
                     agree(results["medseg"]["values"], results["surface-distance"]["values"],
                           ("dice", "hd", "hd95", "assd", "nsd"))]
    if "values" in results.get("medpy", {}) and "values" in results.get("medseg --surface voxel", {}):
        problems += [f"voxel vs medpy: {p}" for p in
                     agree(results["medseg --surface voxel"]["values"], results["medpy"]["values"],
                           ("dice", "hd", "hd95", "assd"))]
    shared = REPO.parent / "shared" / "data"
    if shared.is_dir():
        print("\nagreement on the real TotalSegmentator pair:")
        problems += real_pair_check(shared)
        try:
            problems += anisotropic_check(shared)
        except ImportError as err:
            print(f"  anisotropic check skipped: {err}")
    print()
    if problems:
        print("DISAGREEMENT:\n  " + "\n  ".join(problems))
        return 1
    print("agreement: medseg = surface-distance (element) and = MedPy (voxel) to 1e-6 on every value checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
