"""Tile-streamed prediction of very large 2D images (whole-slide-like pictures) with bounded memory.

``Predictor.predict`` holds the whole image's class accumulators: K - 1 float32 planes, 3.2 GB for a
20000 x 20000 two-class picture. Streaming never does. An uncompressed MetaImage (``.mha`` with the
pixels inline, or ``.mhd`` + raw) is memory-mapped, not read; any other single-slice picture
SimpleITK reads (TIFF, PNG, JPEG, BMP, compressed MetaImage, NRRD, NIfTI) is read once, in its
stored pixel type (a 20000² grey uint8 TIFF: 400 MB; never converted to float), with the same
checks as :func:`medseg_cli.imaging.read_image`. The label map is written into a memory-mapped raw
behind a ``.mha`` header in a scratch file that is moved into place at the end
(:func:`medseg_cli.atomic.atomic_output`); another output format (``.png``, ``.tif``, ``.nii.gz``,
``.nrrd``, ...) is converted from that scratch map once at the end by ``write_labels`` (atomic and
verified, as the whole-image path writes it; the label map is one byte per pixel for up to 256 labels).

Exactness: the windows are those of the whole-image sliding window (the same start positions per
axis). A tile is a block of output pixels; every window that touches it is run (windows on a tile
border are run once per tile they touch), in the same order as the whole-image loop, and each
window reads its input from the tile's region grown by the window's reach, padded exactly as the
whole-image loop pads at the image border. Each pixel therefore sums the same Gaussian-weighted
probabilities in the same order and is divided by the same summed weights: the labels are equal
to ``Predictor.predict``'s, bit for bit (given a network whose per-window output does not depend
on which other windows share its batch). Valid-convolution cards (``input_patch`` larger than
``output_patch``) stream the same way: a window's reach is its output patch plus the card's margin
on each side, so the region read for a tile grows by patch + margin per side. A foveation model
(``medseg_cli.zoo.foveation``: context = s_max x the output patch) thus makes its per-location
choice of view inside every window from that window's own context, exactly as over the whole image.
Z-score statistics are computed in one streaming pass with the same chunking as
:func:`medseg_cli.preprocessing.zscore`, over the values the whole-image path gives it:
``Preprocessor.forward`` turns NaN/Inf pixels into 0 before normalising, so they count as 0 here too
(dropping them, as ``zscore`` would on raw input, changes the labels).

Supported: 2D cards whose preprocessing keeps the pixel grid (no RoI, no resampling, no crop) and
normalises per pixel (none, scale, ct_window) or with global statistics (zscore). Anything else
is reported by :func:`stream_problem` and ``medseg predict`` then uses the whole-image path.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import InputError
from ..imaging import Geometry, Image, file_suffix, match_planar_channels
from ..preprocessing import _CHUNK, _standardise, ct_window, merge_moments, scale
from ..progress import Progress, ensure_progress
from .postprocess import label_values, probabilities_to_labels

STREAM_MEGAPIXELS = 64.0
"""``medseg predict`` streams 2D pictures above this many megapixels automatically."""

DEFAULT_TILE = 2048  # output pixels per tile side

_MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
              "MET_INT": "i4", "MET_ULONG_LONG": "u8", "MET_LONG_LONG": "i8", "MET_FLOAT": "f4",
              "MET_DOUBLE": "f8"}
_STREAM_NORMALISATIONS = ("none", "scale", "ct_window", "zscore")


@dataclass
class RawPicture:
    """A 2D picture's pixels, ``array`` (Y, X, C) in the stored type, ``geometry`` as read_image gives it.

    ``array`` is a read-only memmap for an uncompressed MetaImage, else a read-only view of the pixel
    buffer of the SimpleITK image ``owner`` (kept here so the buffer lives as long as the picture).
    :meth:`rows` reads a band of rows: from a memmap with plain file reads, so no page of the picture
    stays mapped into the process (its resident size does not grow with the picture).
    """

    path: Path
    array: np.ndarray
    geometry: Geometry
    owner: object = None

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a (rows, X, C) array: read from the file, or a read-only view."""
        memmap = self.array
        if not isinstance(memmap, np.memmap):
            return memmap[start:stop]
        row_items = int(np.prod(memmap.shape[1:]))
        with open(memmap.filename, "rb") as handle:
            data = np.fromfile(handle, dtype=memmap.dtype, count=(stop - start) * row_items,
                               offset=memmap.offset + start * row_items * memmap.dtype.itemsize)
        return data.reshape((stop - start,) + memmap.shape[1:])

    def release(self) -> None:
        """Free the pixels once streamed: ``array`` becomes zeros of the same shape and type that hold no
        memory (a broadcast view of one value); shape, channels and geometry stay."""
        self.array = np.broadcast_to(np.zeros((), dtype=self.array.dtype), self.array.shape)
        self.owner = None

    @property
    def shape(self) -> tuple[int, int]:
        """(Y, X) pixels."""
        return int(self.array.shape[0]), int(self.array.shape[1])

    @property
    def channels(self) -> int:
        return int(self.array.shape[2])


def _read_header(path: Path) -> tuple[dict[str, str], int]:
    """MetaImage header fields and the byte length of the header."""
    fields: dict[str, str] = {}
    length = 0
    with open(path, "rb") as handle:
        for raw in handle:
            length += len(raw)
            if length > 1 << 16:
                break
            key, sep, value = raw.decode("latin-1").partition("=")
            if not sep:
                break
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return fields, length
    raise InputError("not a MetaImage header (no ElementDataFile line)", path=path,
                     hint="Stream only .mha / .mhd files written by ITK, 3D Slicer or medseg.")


def _is_metaimage(path: Path) -> bool:
    return file_suffix(path) in (".mha", ".mhd")


def _single_slice(sizes: list[int], path: Path) -> list[int]:
    """(X, Y) of a 2D picture (a 3D size with one slice counts); :class:`InputError` for anything else."""
    sizes = list(sizes)
    if len(sizes) == 3 and sizes[2] == 1:
        sizes = sizes[:2]
    if len(sizes) != 2:
        raise InputError(f"streamed prediction needs a single 2D picture, this has size {sizes}", path=path,
                         hint="Drop --stream for 3D volumes.")
    return sizes


def _read_whole(path: Path) -> RawPicture:
    """Read a non-memory-mappable picture once, in its stored pixel type, with ``read_image``'s checks."""
    from ..imaging import read_file_as_stored

    if path.is_dir():
        raise InputError("streamed prediction reads one picture file", path=path,
                         hint="Give one 2D picture file, or drop --stream.")
    image, view, geometry = read_file_as_stored(path)  # truncated PNG / gzip, bad spacing etc. refused there
    _single_slice(list(image.GetSize()), path)
    if image.GetDimension() == 3:
        view = view[0]                                  # (1, Y, X[, C]) -> (Y, X[, C]): still no copy
    if image.GetNumberOfComponentsPerPixel() == 1:
        view = view[..., None]
    return RawPicture(path, view, geometry, owner=image)


def picture_geometry(path: str | os.PathLike[str]) -> Geometry:
    """The geometry ``read_image`` would give ``path``, from its header only (no pixel is read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    probe = sitk.Image([1] * reader.GetDimension(), sitk.sitkUInt8)
    probe.SetSpacing(reader.GetSpacing())
    probe.SetOrigin(reader.GetOrigin())
    probe.SetDirection(reader.GetDirection())
    return Geometry.from_sitk(probe)


def open_picture(path: str | os.PathLike[str]) -> RawPicture:
    """Open a single-slice 2D picture for streaming.

    An uncompressed MetaImage (.mha inline or .mhd + raw) is memory-mapped without reading its pixels;
    any other file SimpleITK reads (TIFF, PNG, JPEG, BMP, compressed MetaImage, NRRD, NIfTI) is read
    once in its stored pixel type (Y x X x C x its bytes per sample of memory, no float copy).
    Raises :class:`InputError` for more than one slice or a file ``read_image`` would refuse.
    """
    path = Path(path)
    if not _is_metaimage(path):
        return _read_whole(path)
    fields, header_bytes = _read_header(path)
    if fields.get("CompressedData", "False").lower() == "true":
        return _read_whole(path)
    sizes = _single_slice([int(v) for v in fields.get("DimSize", "").split()], path)
    element = fields.get("ElementType", "")
    if element not in _MET_TYPES:
        raise InputError(f"unsupported MetaImage element type {element!r}", path=path,
                         hint="Re-save it as an 8/16/32-bit integer or float image.")
    dtype = np.dtype(_MET_TYPES[element]).newbyteorder(
        ">" if fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")).lower() == "true"
        else "<")
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    data_file = fields["ElementDataFile"]
    count = sizes[0] * sizes[1] * channels
    if data_file == "LOCAL":
        target, offset = path, header_bytes
    else:
        target, offset = path.parent / data_file, int(fields.get("HeaderSize", "0") or 0)
    if not target.is_file() or target.stat().st_size < offset + count * dtype.itemsize:
        raise InputError(f"the MetaImage data is shorter than {sizes[0]}x{sizes[1]}x{channels} pixels", path=target,
                         hint="The file is truncated or its header is wrong; re-export it.")
    array = np.memmap(target, dtype=dtype, mode="r", offset=offset, shape=(sizes[1], sizes[0], channels))
    return RawPicture(path, array, picture_geometry(path))


def stream_problem(card, preprocessor, picture_geometry: Geometry | None = None) -> str | None:
    """Why this card cannot be streamed (one phrase), or ``None`` when it can."""
    if card.spatial_dims != 2:
        return "the model is not a 2D model"
    if preprocessor.roi != "none":
        return f"the model's preprocessing uses a region of interest ({preprocessor.roi})"
    if preprocessor.target_spacing_zyx is not None:
        target = preprocessor.target_spacing_zyx[-2:]
        spacing = None if picture_geometry is None else picture_geometry.spacing_zyx[1:]
        if spacing is None or any(t is not None and not math.isclose(t, s, rel_tol=1e-6)
                                  for t, s in zip(target, spacing)):
            return "the model resamples its input (target_spacing_zyx)"
    specs = preprocessor.channel_normalization or [preprocessor.normalization]
    for spec in specs:
        if spec["kind"] not in _STREAM_NORMALISATIONS:
            return f"the model's normalisation {spec['kind']!r} is not streamable"
    return None


def _converted(block: np.ndarray, channels: int) -> np.ndarray:
    """(n, m, C) raw pixels -> (C', n, m) as the model wants them (colour <-> grey, as predict does)."""
    planes = np.moveaxis(block, -1, 0)[:, None]                      # (C, 1, n, m)
    image = Image(planes if planes.shape[0] > 1 else planes[0])
    return match_planar_channels(image, channels).channels()[:, 0]


def _zscore_statistics(picture: RawPicture, channels: int) -> list[tuple[float, float]]:
    """Per model channel: (mean, std) over every pixel, the same chunked float64 sums as ``zscore``."""
    height, width = picture.shape
    state: list[tuple[int, float, float]] = [(0, 0.0, 0.0)] * channels
    band_rows = max(1, (16 * _CHUNK) // width)                       # read a few chunks' worth of rows at once
    pending = np.empty((0, 1, picture.channels), dtype=picture.array.dtype)
    for band in range(0, height, band_rows):
        flat = np.concatenate([pending, picture.rows(band, min(band + band_rows, height)).reshape(
            -1, 1, picture.channels)])
        last = band + band_rows >= height
        usable = flat.shape[0] if last else flat.shape[0] - flat.shape[0] % _CHUNK
        pending = flat[usable:]
        for start in range(0, usable, _CHUNK):                          # chunk boundaries as zscore's
            _fold(state, _converted(flat[start:min(start + _CHUNK, usable)], channels))
    return [(mean, math.sqrt(max(m2 / count, 0.0))) if count else (0.0, 0.0) for count, mean, m2 in state]


def _fold(state: list, part: np.ndarray) -> None:
    """Add one chunk (C', n, 1) to the running (count, mean, M2) per channel, as ``_mean_std`` does.

    Non-finite pixels count as 0, never dropped: ``Preprocessor.forward`` zeroes them before ``zscore``
    sees the image, and the streamed labels must equal the whole-image ones
    (``tests/test_streaming.py::test_nan_pixels_give_the_whole_image_labels``).
    """
    for c in range(len(state)):
        values = part[c].reshape(-1)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            values = np.where(np.isfinite(values), values, 0).astype(values.dtype)
        state[c] = merge_moments(state[c], values)


def _normaliser(preprocessor, picture: RawPicture, channels: int):
    specs = preprocessor.channel_normalization or [preprocessor.normalization] * channels
    stats = _zscore_statistics(picture, channels) if any(s["kind"] == "zscore" for s in specs) else None

    def normalise(block: np.ndarray) -> np.ndarray:
        """(n, m, C) raw pixels -> (C', 1, n, m) float32 network input."""
        planes = _converted(block, channels)
        if np.issubdtype(planes.dtype, np.floating) and not np.isfinite(planes).all():
            planes = np.where(np.isfinite(planes), planes, 0).astype(planes.dtype)
        out = np.empty((channels, 1) + planes.shape[1:], dtype=np.float32)
        for c, spec in enumerate(specs):
            kind = spec["kind"]
            if kind == "none":
                out[c, 0] = planes[c]
            elif kind == "scale":
                out[c, 0] = scale(planes[c], spec["divide_by"], spec["mean"], spec["std"])
            elif kind == "ct_window":
                out[c, 0] = ct_window(planes[c], spec["low"], spec["high"], scale_to=spec["scale_to"])
            else:
                out[c, 0] = _standardise(planes[c], *stats[c])
            bad = ~np.isfinite(out[c])
            if bad.any():
                out[c][bad] = 0.0
        return out

    return normalise


def _mha_header(geometry: Geometry, shape: tuple[int, int], dtype: np.dtype, planar: bool = False) -> bytes:
    """The MetaImage header ``write_labels`` would give a (1, Y, X) label map (``planar``: as the 2D
    image it writes to .png / .tif): SimpleITK writes it for a one-pixel probe with the same geometry,
    and only the size is changed."""
    import tempfile

    import SimpleITK as sitk

    from ..imaging import to_sitk

    probe = to_sitk(Image(np.zeros((1, 1, 1), dtype=dtype), geometry), planar=planar)
    with tempfile.TemporaryDirectory() as folder:
        sitk.WriteImage(probe, os.path.join(folder, "probe.mha"), False)
        text = Path(folder, "probe.mha").read_bytes()
    end = text.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    size = f"{shape[1]} {shape[0]}" if planar else f"{shape[1]} {shape[0]} 1"
    lines = [f"DimSize = {size}".encode() if line.startswith(b"DimSize") else line
             for line in text[:end].split(b"\n")]
    return b"\n".join(lines)


def _tiles(length: int, tile: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + tile, length)) for lo in range(0, length, tile)]


def check_stream(predictor, source: str | os.PathLike[str], output: str | os.PathLike[str]) -> RawPicture:
    """Open ``source`` for streaming; :class:`InputError` (one line) when it, the model or ``output`` cannot stream.

    Hand the returned picture to :func:`stream_predict` as its ``source`` so the file is opened once.
    """
    from .postprocess import is_slicer_segmentation

    card = predictor.card
    if not (file_suffix(output) or is_slicer_segmentation(output)):
        raise InputError("unsupported output file type", path=output,
                         hint="Use .mha (written tile by tile), or .png/.tif/.nii.gz/.nrrd (converted at the end).")
    picture = open_picture(source)
    problem = stream_problem(card, predictor.preprocessor, picture.geometry)
    if problem:
        raise InputError(f"cannot stream this prediction: {problem}", path=source,
                         hint="Drop --stream (the image is then read whole).")
    probe = _converted(np.asarray(picture.array[:1, :1]), card.in_channels)
    if probe.shape[0] != card.in_channels:
        raise InputError(f"model {card.name} takes {card.in_channels} channel(s), the input has {picture.channels}",
                         path=source, hint="Give a picture with the model's channel count.")
    return picture


def stream_predict(predictor, source: str | os.PathLike[str] | RawPicture, output: str | os.PathLike[str], *,
                   tile: int = DEFAULT_TILE, progress: Progress | None = None) -> list[dict]:
    """Segment the 2D picture ``source`` tile by tile into the label map ``output``.

    source: a picture file (see :func:`open_picture`), or the :class:`RawPicture` that
        :func:`check_stream` returned for it (then it is not opened again).
    output: a ``.mha`` is written tile by tile; any other label format ``write_labels`` writes is
        streamed into a scratch ``.mha`` beside it and converted once at the end (the picture is
        released first; the conversion holds the Y x X label map and, while the written file is
        verified, a second copy).

    predictor: a :class:`~medseg_cli.inference.predictor.Predictor` (its runner, window, TTA and
        preprocessing are used; ``keep_largest`` is not supported here).
    tile: output pixels per tile side; memory is about (K - 1 + 2 C) float32 planes of
        (tile + 2 (patch + margin))² pixels plus one batch, independent of the image size (margin: the
        card's valid-convolution context per side, 0 for "same" nets).
    Returns the label rows (``label``, ``name``, ``voxels``, ``volume_mm3``) as ``Predictor`` does.
    """
    if isinstance(source, RawPicture):
        picture, source = source, source.path
    else:
        picture = check_stream(predictor, source, output)
    output = Path(output)
    if file_suffix(output) != ".mha":
        return _stream_converted(predictor, picture, output, tile=tile, progress=progress)
    return _stream(predictor, picture, output, tile=tile, progress=progress)


def _stream(predictor, picture: RawPicture, output: Path, *, tile: int, progress: Progress | None,
            planar: bool = False) -> list[dict]:
    """:func:`stream_predict` into the ``.mha`` ``output`` (``planar``: a 2D header, else (X, Y, 1))."""
    from ..errors import ProcessingError
    from .sliding_window import _summed_weights_1d, window_starts

    card, window, source = predictor.card, predictor.window, picture.path
    channels = card.in_channels
    normalise = _normaliser(predictor.preprocessor, picture, channels)
    height, width = picture.shape
    patch, margin, reach = window.output_patch, window.margin, window.input_patch
    shape3 = (1, height, width)
    per_axis = [window_starts(0, n, p, n, window.overlap) for p, n in zip(patch, shape3)]
    weights_1d = window._weights_1d()
    importance = np.einsum("i,j,k->ijk", *weights_1d).astype(np.float32)
    sums = [_summed_weights_1d(s, w, 0, n) for s, w, n in zip(per_axis, weights_1d, shape3)]
    z_scale = np.float32(1.0 / sums[0][0])
    implicit = card.output_activation == "softmax" and card.num_classes > 1
    first = 1 if implicit else 0
    predict_batch = predictor._predict_batch()
    dtype = np.dtype(np.uint8 if max(label_values(card), default=0) < 256 else np.uint16)
    counts = np.zeros(max(label_values(card), default=0) + 1, dtype=np.int64)
    header = _mha_header(picture.geometry, picture.shape, dtype, planar)
    tiles = list(itertools.product(_tiles(height, tile), _tiles(width, tile)))
    batch = np.empty((window.batch_size, channels) + reach, dtype=np.float32)
    expected_tail = (card.num_classes,) + patch
    with atomic_output(output) as scratch:
        with open(scratch, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + height * width * dtype.itemsize)
        sink = open(scratch, "r+b")
        band = np.zeros((0, width), dtype=dtype)
        with ensure_progress(progress).task("tiles", total=len(tiles)) as task:
            for (y0, y1), (x0, x1) in tiles:
                ys = [s for s in per_axis[1] if s < y1 and s + patch[1] > y0]
                xs = [s for s in per_axis[2] if s < x1 and s + patch[2] > x0]
                # the input region every window of this tile reads, clipped to the picture
                ry0, ry1 = max(min(ys) - margin[1], 0), min(max(ys) - margin[1] + reach[1], height)
                rx0, rx1 = max(min(xs) - margin[2], 0), min(max(xs) - margin[2] + reach[2], width)
                if x0 == 0:  # a new band of tiles: its label rows are written once it is done
                    band = np.zeros((y1 - y0, width), dtype=dtype)
                    rows = picture.rows(ry0, ry1)
                region = normalise(rows[:, rx0:rx1])                               # (C, 1, ry, rx)
                box = (slice(0, 1), slice(y0 - ry0, y1 - ry0), slice(x0 - rx0, x1 - rx0))
                accumulator = np.zeros((card.num_classes - first, 1, y1 - y0, x1 - x0), dtype=np.float32)
                starts = [(per_axis[0][0], y - ry0, x - rx0) for y, x in itertools.product(ys, xs)]
                for begin in range(0, len(starts), window.batch_size):
                    group = starts[begin:begin + window.batch_size]
                    for index, start in enumerate(group):
                        window._read_input(region, start, batch[index])
                    result = predict_batch(batch[:len(group)])
                    if tuple(result.shape) != (len(group),) + expected_tail:
                        raise ProcessingError(f"the network returned {tuple(result.shape)} for a batch of "
                                              f"{len(group)} windows", path=source)
                    for index, start in enumerate(group):
                        window._accumulate(accumulator, result[index, first:], importance, start, box)
                del region
                inverse_yx = (1.0 / np.outer(sums[1][y0:y1], sums[2][x0:x1])).astype(np.float32)  # the tile's part only
                accumulator[:, 0] *= inverse_yx * z_scale
                part = probabilities_to_labels(accumulator, card.output_activation, implicit_first=implicit)[0]
                band[:, x0:x1] = part
                if x1 == width:
                    sink.seek(len(header) + y0 * width * dtype.itemsize)
                    sink.write(band.tobytes())
                found = np.bincount(part.ravel(), minlength=counts.size)
                counts += found[:counts.size]
                task.advance(1)
        sink.close()
    voxel = picture.geometry.voxel_volume_mm3
    del rows
    picture.release()
    return [{"label": v, "name": card.label_name(v), "voxels": int(counts[v]), "volume_mm3": float(counts[v]) * voxel}
            for v in label_values(card)]


def _stream_converted(predictor, picture: RawPicture, output: Path, *, tile: int,
                      progress: Progress | None) -> list[dict]:
    """Stream into a scratch ``.mha`` beside ``output``, then write ``output`` from it once.

    The scratch header is the image ``write_labels`` would build (2D for .png / .tif, else (X, Y, 1)),
    so SimpleITK reads it back as exactly that image (one Y x X label buffer, no memory-mapped pages)
    and :func:`~medseg_cli.imaging.write_sitk_image` writes it atomically and verified, as
    ``write_labels`` does. A 3D Slicer ``.seg.nrrd`` goes through ``write_labels`` itself.
    """
    import shutil
    import tempfile

    import SimpleITK as sitk

    from ..atomic import SCRATCH_PREFIX, check_output_path
    from ..imaging import PLANAR_SUFFIXES, write_sitk_image
    from .postprocess import check_lossless, is_slicer_segmentation, write_labels

    check_lossless(output)
    folder = check_output_path(output)
    planar = file_suffix(output) in PLANAR_SUFFIXES
    try:
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=folder))  # swept if a killed run leaves it
    except OSError as err:
        raise InputError(f"cannot write in output folder ({err.strerror})", path=output,
                         hint="Choose a writable output location.") from None
    try:
        staged = scratch / "labels.mha"
        geometry = picture.geometry
        rows = _stream(predictor, picture, staged, tile=tile, progress=progress, planar=planar)
        if is_slicer_segmentation(output):
            labels = open_picture(staged)                              # memory-mapped, (Y, X, 1)
            write_labels(Image(labels.array[None, :, :, 0], geometry, str(output)), output, predictor.card)
        else:
            image = sitk.ReadImage(str(staged))
            present = max((r["label"] for r in rows if r["voxels"]), default=0)
            if image.GetPixelID() == sitk.sitkUInt16 and present < 256:  # as write_labels' smallest type
                image = sitk.Cast(image, sitk.sitkUInt8)
            write_sitk_image(image, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def should_stream(path: str | os.PathLike[str], megapixels: float = STREAM_MEGAPIXELS) -> bool:
    """Whether ``path`` is a single-slice 2D picture file larger than ``megapixels`` (header only is read).

    Any format SimpleITK reads the header of (MetaImage, TIFF, PNG, JPEG, BMP, NRRD, NIfTI); never a
    DICOM folder or a file that fails to open (the whole-image path then reports it).
    """
    import SimpleITK as sitk

    from ..imaging import _captured_native_stderr

    path = Path(path)
    if not file_suffix(path) or not path.is_file():
        return False
    if _is_metaimage(path):  # an uncompressed MetaImage: decided from its text header
        try:
            fields, _ = _read_header(path)
        except (InputError, OSError):
            return False
        sizes = [int(v) for v in fields.get("DimSize", "").split() if v.isdigit()]
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        with _captured_native_stderr():
            try:
                reader.ReadImageInformation()
                failed = False
            except RuntimeError:
                failed = True
        if failed:
            return False
        sizes = list(reader.GetSize())
    if not (len(sizes) == 2 or (len(sizes) == 3 and sizes[2] == 1)):
        return False
    return sizes[0] * sizes[1] > megapixels * 1e6


__all__ = ["open_picture", "check_stream", "stream_predict", "stream_problem", "should_stream", "RawPicture", "STREAM_MEGAPIXELS",
           "DEFAULT_TILE"]
