"""Peak memory and time of tile-streamed ``medseg predict`` on a very large 2D picture.

    .venv/bin/python benchmarks/bench_large2d.py [--size 20000] [--patch 512] [--batch 8] [--threads N]
                                                 [--folder /tmp/bench_large2d] [--keep] [--foveation]
                                                 [--format mha|tif]

(run from the repository root). It writes a ``size`` x ``size`` uint8 picture as an uncompressed
``.mha`` (400 MB at 20000; free disk is checked first: the picture plus its mask), exports a tiny 2D
network (3x3 conv 1 -> 4, ReLU, 3x3 conv 4 -> 2, seeded; z-score preprocessing, softmax) to ONNX
with ``patch`` x ``patch`` windows, then runs ``medseg predict --stream`` (overlap 0.25, ``--batch``)
in a fresh process and reports its wall time and peak RSS (``ru_maxrss`` of that process from
``wait4``; the parent never imports torch, so nothing of it is carried into the child's figure). The
peak must stay under 2 GB (exit 1 otherwise); the whole-image path would need about
``size² x 4 bytes x (1 + K - 1)`` for the network input and accumulators alone (3.2 GB at 20000, K = 2)
before the scan itself. The mask is read back (memory-mapped) and its label fractions printed.
With ``--foveation`` the network is a foveation model instead (``medseg_cli.zoo.foveation``: a UNet-BN
of base width 4 fed, per window, a learnt mix of 3 views of 1, 2 and 4 x the ``patch``, so each
window reads a 4 x ``patch`` context; random weights, seed 0) and the run also writes the foveation
map (``--foveation-map``: the view chosen per pixel, a second streamed pass); both outputs' label
fractions are printed. It is much slower per pixel than the tiny net: use e.g. ``--size 6000 --patch 128``
(measured 2026-12-02, 1 thread on 2 busy cores: 148 s for labels and map, peak RSS 504 MiB; the
random net labels every pixel foreground and puts 88% of the picture on the 512 px view).
With ``--format tif`` the picture is a deflate-compressed TIFF (as histology mosaics come) and the mask
is written as a TIFF too: the picture is read whole once in its stored type (400 MB of uint8 at 20000),
the labels stream into a scratch ``.mha`` and are converted to the TIFF at the end (measured
2026-12-02, ``--size 20000 --format tif --threads 1`` on 2 busy cores: 369 MB TIFF, 55 s, peak RSS
1470 MiB; the same TIFF predicted into a ``.mha`` mask, i.e. without the conversion: 1261 MiB).
Peak RSS includes the file-backed pages of the memory-mapped picture and mask that the process
touched; the kernel may drop those under pressure, unlike the anonymous memory of the whole-image path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

LIMIT_BYTES = 2 * 1024 ** 3

EXPORT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from test_runners import export_tiny_onnx, make_card
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 2, 3, padding=1)).eval()
    patch = int(sys.argv[2])
    card = make_card(in_channels=1, num_classes=2, input_patch=(patch, patch), spatial_dims=2,
                     architecture="unet2d", preprocessing={"normalization": {"kind": "zscore"}})
    export_tiny_onnx(net, card, __import__("pathlib").Path(sys.argv[1]))
""")

EXPORT_FOVEATION = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from exporters.onnx_export import export_onnx
    from test_runners import make_card
    from medseg_cli.zoo import build_model
    torch.manual_seed(0)
    kwargs = {"segmenter": "unet2d_bn", "segmenter_kwargs": {"base_width": 4}, "fov_scales": [1, 2, 4],
              "width_factor": 2}
    net = build_model("foveation", 1, 2, **kwargs).eval()
    patch = (int(sys.argv[2]),) * 2
    card = make_card(in_channels=1, num_classes=2, input_patch=net.input_patch_for(patch), output_patch=patch,
                     spatial_dims=2, architecture="foveation", architecture_kwargs=kwargs,
                     preprocessing={"normalization": {"kind": "zscore"}})
    export_onnx(net, card, sys.argv[1])
""")


def read_fractions(path: Path, size: int, values: int) -> list[float]:
    """Fraction of each label value 0..values-1 in a (size x size) uint8 .mha written by medseg (memory-mapped)."""
    header = path.read_bytes()[:1024]
    offset = header.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    labels = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(size, size))
    counts = sum(np.bincount(labels[y:y + 1000].ravel(), minlength=values)[:values] for y in range(0, size, 1000))
    return [float(c) / (size * size) for c in counts]


def picture_rows(size: int):
    """Blocks of 1000 rows of a uint8 ``size`` x ``size`` picture (smooth waves plus noise)."""
    rng = np.random.default_rng(0)
    x = np.arange(size, dtype=np.float32)
    for y0 in range(0, size, 1000):
        y = np.arange(y0, min(y0 + 1000, size), dtype=np.float32)[:, None]
        waves = 128 + 60 * np.sin(x / 700.0) * np.cos(y / 900.0) + 40 * np.sin((x + y) / 130.0)
        yield np.clip(waves + rng.normal(0, 10, waves.shape), 0, 255).astype(np.uint8)


def write_tiff(path: Path, size: int) -> None:
    """The same picture as a deflate-compressed grey TIFF (spacing 0.25 mm)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.concatenate(list(picture_rows(size))))
    image.SetSpacing((0.25, 0.25))
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.SetCompressor("Deflate")
    writer.Execute(image)


def read_tiff_fractions(path: Path, values: int) -> list[float]:
    """Fraction of each label value 0..values-1 in a label TIFF."""
    import SimpleITK as sitk

    labels = sitk.GetArrayViewFromImage(image := sitk.ReadImage(str(path)))
    counts = np.bincount(labels.ravel(), minlength=values)[:values]
    del image
    return [float(c) / labels.size for c in counts]


def write_picture(path: Path, size: int) -> None:
    """A uint8 ``size`` x ``size`` picture as an uncompressed .mha, written 1000 rows at a time."""
    header = ("ObjectType = Image\nNDims = 2\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              "CompressedData = False\nTransformMatrix = 1 0 0 1\nOffset = 0 0\nCenterOfRotation = 0 0\n"
              "ElementSpacing = 0.25 0.25\nDimSize = {0} {0}\nElementType = MET_UCHAR\n"
              "ElementDataFile = LOCAL\n").format(size).encode()
    with open(path, "wb") as handle:
        handle.write(header)
        for block in picture_rows(size):
            handle.write(block.tobytes())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench_large2d"))
    parser.add_argument("--keep", action="store_true", help="keep the picture, model and mask")
    parser.add_argument("--foveation", action="store_true",
                        help="a foveation model (3 views, context 4 x patch), also writing the foveation map")
    parser.add_argument("--format", dest="fmt", choices=("mha", "tif"), default="mha",
                        help="picture and mask file type: uncompressed .mha (memory-mapped) or deflate TIFF")
    args = parser.parse_args()
    folder: Path = args.folder
    folder.mkdir(parents=True, exist_ok=True)
    need = 2 * args.size * args.size + (64 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        print(f"not enough disk in {folder}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed", file=sys.stderr)
        return 2
    picture, model, mask = folder / f"picture.{args.fmt}", folder / "tiny2d.onnx", folder / f"mask.{args.fmt}"
    fov_map = folder / f"foveation_map.{args.fmt}"
    try:
        start = time.perf_counter()
        (write_tiff if args.fmt == "tif" else write_picture)(picture, args.size)
        print(f"picture {args.size} x {args.size} uint8 {args.fmt} ({picture.stat().st_size / 1e6:.0f} MB) written in "
              f"{time.perf_counter() - start:.1f} s")
        subprocess.run([sys.executable, "-c", EXPORT_FOVEATION if args.foveation else EXPORT, str(model),
                        str(args.patch)], check=True)
        command = [sys.executable, "-m", "medseg_cli", "predict", "--model", str(model), str(picture), "-o", str(mask),
                   "--stream", "--overlap", "0.25", "--batch", str(args.batch), "--quiet"]
        if args.foveation:
            command += ["--foveation-map", str(fov_map)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        start = time.perf_counter()
        child = subprocess.Popen(command)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            print(f"medseg predict failed (exit {child.returncode})", file=sys.stderr)
            return 1
        peak = usage.ru_maxrss * 1024
        fractions = (read_tiff_fractions if args.fmt == "tif" else lambda p, v: read_fractions(p, args.size, v))
        fraction = 1.0 - fractions(mask, 2)[0]
        print(f"streamed predict{' (foveation, with its map)' if args.foveation else ''}: {seconds:.1f} s wall, "
              f"peak RSS {peak / 2 ** 20:.0f} MiB (limit {LIMIT_BYTES / 2 ** 30:.0f} GiB); patch {args.patch}, "
              f"batch {args.batch}; {args.fmt}; foreground fraction {fraction:.3f}")
        if args.foveation:
            shares = ", ".join(f"{s * args.patch} px {f:.3f}" for s, f in zip((1, 2, 4), fractions(fov_map, 3)))
            print(f"foveation map: share of the picture per view: {shares}")
        return 0 if peak < LIMIT_BYTES else 1
    finally:
        if not args.keep:
            for path in (picture, model, mask, fov_map):
                path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
