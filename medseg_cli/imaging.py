"""Images with their geometry: reading and writing NIfTI, NRRD, MetaImage, DICOM series, 2D files.

Conventions (the one conversion point of the project):

* ``Image.array`` is ``(Z, Y, X)`` for one channel or ``(C, Z, Y, X)`` for several; a 2D image is
  a single slice, ``(1, Y, X)`` or ``(C, 1, Y, X)``.
* ``Geometry`` holds ``spacing`` (mm), ``origin`` (mm, LPS world coordinates) and ``direction``
  (3×3 row-major, columns are the world directions of the x, y, z index axes) in SimpleITK's
  ``(x, y, z)`` order. ``spacing_zyx`` gives the array-order spacing.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output
from .errors import InputError, MedsegWarning, ProcessingError

sitk.ProcessObject_SetGlobalWarningDisplay(False)  # we report problems ourselves, in one line

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PLANAR_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
SUPPORTED_SUFFIXES = VOLUME_SUFFIXES + PLANAR_SUFFIXES
_FORMAT_NAMES = {
    ".nii.gz": "NIfTI (gzip)", ".nii": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD (detached header)",
    ".mha": "MetaImage", ".mhd": "MetaImage (detached header)", ".png": "PNG", ".tif": "TIFF",
    ".tiff": "TIFF", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP",
}
_GEOMETRY_TOLERANCE = 1e-4


def file_suffix(path: str | os.PathLike[str]) -> str:
    """The format suffix of ``path`` (``.nii.gz`` counts as one), lower case; ``""`` if unknown."""
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def case_stem(path: str | os.PathLike[str]) -> str:
    """The file name without its format suffix: ``case_001.nii.gz`` -> ``case_001``."""
    name = Path(path).name
    suffix = file_suffix(path)
    if name.lower().endswith(".seg.nrrd"):
        return name[: -len(".seg.nrrd")]
    return name[: len(name) - len(suffix)] if suffix else name


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True for a file with a supported suffix or a folder (a possible DICOM series)."""
    return Path(path).is_dir() or bool(file_suffix(path))


@dataclass(frozen=True)
class Geometry:
    """Where the voxel grid lies in the world, in SimpleITK's (x, y, z) order.

    spacing: voxel size (mm) along the x, y, z index axes.
    origin: world position (mm, LPS) of the centre of voxel (0, 0, 0).
    direction: 3×3 direction cosines, row-major; column j is the world direction of index axis j.
    """

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 spacings, 3 origin values and 9 direction cosines")

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array order (Z, Y, X), mm."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        """3×3 direction matrix (columns = world directions of the x, y, z index axes)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def index_to_world_matrix(self) -> np.ndarray:
        """4×4 matrix mapping (x, y, z, 1) voxel indices to LPS world millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def orientation_code(self) -> str:
        """Three letters naming the world direction in which the x, y, z indices increase (LPS world).

        Identity direction gives ``"LPS"``; a typical NIfTI from a scanner in RAS+ storage gives ``"RAS"``.
        """
        positive, negative = "LPS", "RAI"
        letters = []
        for column in self.direction_matrix.T:
            axis = int(np.argmax(np.abs(column)))
            letters.append(positive[axis] if column[axis] > 0 else negative[axis])
        return "".join(letters)

    def differences(self, other: "Geometry", tolerance: float = _GEOMETRY_TOLERANCE) -> list[str]:
        """Human-readable differences beyond ``tolerance`` (relative for spacing, mm for origin)."""
        found = []
        if not np.allclose(self.spacing, other.spacing, rtol=tolerance, atol=tolerance):
            found.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=tolerance):
            found.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=tolerance):
            found.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return found

    def matches(self, other: "Geometry", tolerance: float = _GEOMETRY_TOLERANCE) -> bool:
        return not self.differences(other, tolerance)

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Geometry":
        dims = image.GetDimension()
        spacing = list(image.GetSpacing())[:3]
        origin = list(image.GetOrigin())[:3]
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dims, dims)
        if dims == 2:
            spacing += [1.0]
            origin += [0.0]
            full = np.eye(3)
            full[:2, :2] = direction
            direction = full
        elif dims == 4:
            direction = direction[:3, :3]
        return cls(tuple(spacing), tuple(origin), tuple(direction.ravel()))

    def apply_to(self, image: sitk.Image) -> None:
        """Copy this geometry onto a 3D (or, dropping z, a 2D) SimpleITK image."""
        if image.GetDimension() == 2:
            image.SetSpacing(self.spacing[:2])
            image.SetOrigin(self.origin[:2])
            image.SetDirection(tuple(self.direction_matrix[:2, :2].ravel()))
        else:
            image.SetSpacing(self.spacing)
            image.SetOrigin(self.origin)
            image.SetDirection(self.direction)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


@dataclass
class Image:
    """A voxel array with its geometry.

    array: ``(Z, Y, X)`` or ``(C, Z, Y, X)``; 2D images are one slice (``Z = 1``).
    geometry: see :class:`Geometry`.
    source: where it was read from (for messages), if anywhere.
    info: extra facts found while reading (format, DICOM series, ...), for display.
    """

    array: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)
    source: str | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim not in (3, 4):
            raise ValueError(f"Image arrays are (Z, Y, X) or (C, Z, Y, X); got shape {self.array.shape}")

    @property
    def has_channels(self) -> bool:
        return self.array.ndim == 4

    @property
    def num_channels(self) -> int:
        return self.array.shape[0] if self.has_channels else 1

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) voxels."""
        return tuple(int(v) for v in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def is_planar(self) -> bool:
        """A single-slice (2D) image."""
        return self.spatial_shape[0] == 1

    def channels(self) -> np.ndarray:
        """The array as ``(C, Z, Y, X)`` (a view; adds C = 1 when needed)."""
        return self.array if self.has_channels else self.array[None]

    def with_array(self, array: np.ndarray, **info: object) -> "Image":
        """A new image on the same grid (same geometry) holding ``array``."""
        if tuple(array.shape[-3:]) != self.spatial_shape:
            raise ValueError(f"array {array.shape} does not fit grid {self.spatial_shape}")
        return Image(array, self.geometry, self.source, {**self.info, **info})


# ----------------------------------------------------------------------------------------- reading

class _NativeOutput:
    """Text that native code (ITK, GDCM, MetaIO) printed to the process's stderr while captured."""

    def __init__(self) -> None:
        self.text = ""


@contextlib.contextmanager
def _captured_native_stderr() -> Iterator[_NativeOutput]:
    """Redirect file descriptor 2 to a scratch file while ITK runs.

    MetaIO and GDCM print diagnostics straight to stderr (bypassing Python and SimpleITK's warning
    switch); a user must see one clear line instead, so the text is captured and used to explain a
    failure. Falls back to doing nothing when fd 2 cannot be duplicated.
    """
    captured = _NativeOutput()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    try:
        scratch_file = tempfile.TemporaryFile(mode="w+b")
    except OSError:  # no usable temporary folder (e.g. a full disk): read without capturing
        os.close(saved)
        yield captured
        return
    with scratch_file as scratch:
        try:
            os.dup2(scratch.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            scratch.seek(0)
            captured.text = scratch.read(1 << 16).decode("utf-8", "replace")


def _describe_itk_failure(message: str) -> str:
    lowered = message.lower()
    if "unable to determine imageio reader" in lowered or "could not create io object" in lowered:
        return "not a readable image: unknown format, or a corrupt header"
    if "orthonormal" in lowered or "direction" in lowered and "cosine" in lowered:
        return "its direction cosines are not orthonormal (a broken header)"
    if "gzip" in lowered or "zlib" in lowered or "compressed" in lowered:
        return "the compressed data is truncated or corrupt"
    if "size" in lowered and ("data" in lowered or "file" in lowered) or "eof" in lowered \
            or "read failed" in lowered or "truncated" in lowered or "not read completely" in lowered \
            or "fread got only" in lowered:
        return "the data is shorter than its header says (truncated or corrupt file)"
    if "does not exist" in lowered or "no such file" in lowered:
        return "a data file named in its header is missing, or the file is corrupt"
    last = [line.strip() for line in message.splitlines() if line.strip()]
    detail = last[-1][:160] if last else "unknown reason"
    return f"cannot be read ({detail})"


def _check_gzip(path: Path) -> int:
    """Fail clearly on a .gz that is not gzip or that is truncated (ITK's messages are cryptic).

    Returns the number of decompressed bytes.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        problem = "is not gzip-compressed data" if "Not a gzipped" in str(err) else \
            "the gzip data is truncated or corrupt"
        raise InputError(problem, path=path, hint="Re-export or re-download the file.") from None
    return total


_DETACHED_DATA_KEYS = {".mhd": re.compile(r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", re.M),
                       ".nhdr": re.compile(r"^\s*data ?file\s*:\s*(.+?)\s*$", re.M | re.I)}


def _check_detached_data(path: Path, suffix: str) -> None:
    """A detached header (.mhd, .nhdr) must name a data file that exists (one clear line if not)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(1 << 16).decode("latin-1")
    except OSError:
        return
    found = _DETACHED_DATA_KEYS[suffix].search(header)
    if not found:
        return
    name = found.group(1).strip()
    if name.upper().startswith(("LOCAL", "LIST")) or "%" in name or any(c.isspace() for c in name):
        return  # data in the header file itself, or a list / pattern of files: ITK checks those
    data = Path(name) if Path(name).is_absolute() else path.parent / name
    if not data.exists():
        raise InputError(f"its data file {data.name} (named in the header) is missing", path=path,
                         hint=f"Put {data.name} beside the header, or re-export as one file (.nrrd/.mha).")


def _is_dicom_file(path: Path) -> bool:
    """Whether ``path`` starts like a DICOM Part 10 file (128-byte preamble, then ``DICM``)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _check_png_end(path: Path) -> None:
    """A PNG cut short still decodes (libpng fills the rest with 0, silently): require its IEND chunk."""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4096))  # tolerate a little trailing data
        tail = handle.read()
    if b"IEND" not in tail:
        raise InputError("the PNG data is truncated (its end marker is missing)", path=path,
                         hint="Re-export or re-download the file.")


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype code -> numpy type (the ones that hold NaN)


def _nifti_header(path: Path) -> dict | None:
    """The few NIfTI-1/2 header fields medseg needs (``None`` when the header is not recognised).

    Returns ``{"endian", "shape" (x, y, z, ...), "datatype", "bitpix", "vox_offset"}``.
    """
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(540)
    except (OSError, EOFError):
        return None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:347] == b"n+1":
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            pixdim = struct.unpack(endian + "8f", head[76:108])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or any(int(d) < 1 for d in dims[1:ndim + 1]) or bitpix <= 0:
        return None
    return {"endian": endian, "shape": tuple(int(d) for d in dims[1:ndim + 1]), "datatype": int(datatype),
            "bitpix": int(bitpix), "vox_offset": offset, "pixdim": tuple(float(v) for v in pixdim)}


def _nifti_checks(path: Path, image: sitk.Image, array: np.ndarray, data_bytes: int | None) -> np.ndarray:
    """NIfTI facts that ITK hides: data shorter than the header says, and NaN/Inf voxels.

    ITK 5.4's NIfTI reader pads a short data block silently and replaces every NaN/Inf voxel by 0
    (fixed later upstream, ITK PR #6683); the header is parsed here to catch both. Returns ``array``
    with the non-finite voxels restored.
    """
    header = _nifti_header(path)
    if header is None:
        return array
    # ITK silently reads a zero/NaN pixdim as 1 mm and a negative one as positive on a mirrored axis
    spatial = header["pixdim"][1:1 + min(3, len(header["shape"]))]
    if any(not math.isfinite(v) or v == 0 for v in spatial):
        raise InputError(f"invalid voxel spacing in the header (pixdim {_fmt(spatial)} mm; each must be > 0)",
                         path=path, hint="Fix the header (pixdim) of the file, e.g. re-export it.")
    if any(v < 0 for v in spatial):
        warnings.warn(MedsegWarning(f"{path}: negative voxel spacing in the header (pixdim {_fmt(spatial)} mm): "
                                    "read as positive spacing along a mirrored axis; check the orientation"),
                      stacklevel=3)
    count = int(np.prod(header["shape"], dtype=np.int64))
    expected = header["vox_offset"] + count * header["bitpix"] // 8
    available = data_bytes if data_bytes is not None else path.stat().st_size
    if available < expected:
        raise InputError(f"the data is shorter than its header says ({available:,} of {expected:,} bytes): "
                         "the file is truncated", path=path, hint="Re-export or re-download the file.")
    kind = _NIFTI_FLOAT_TYPES.get(header["datatype"])
    if kind is None or count != array.size or not np.issubdtype(array.dtype, np.floating) \
            or image.GetNumberOfComponentsPerPixel() != 1 or not (array == 0).any():
        return array  # ITK turns non-finite values into 0: without zeros there were none
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        handle.seek(header["vox_offset"])
        raw = np.frombuffer(handle.read(count * header["bitpix"] // 8), dtype=header["endian"] + kind)
    raw = raw.reshape(array.shape)  # x varies fastest on disk, as in ITK's (t, z, y, x) array
    nonfinite = ~np.isfinite(raw)
    if nonfinite.any():
        array = np.array(array, copy=True)
        array[nonfinite] = raw[nonfinite]
    return array


def _read_file(path: Path) -> tuple[sitk.Image, int | None]:
    """Read one image file with ITK; returns it and, for .nii.gz, the decompressed size in bytes."""
    suffix = file_suffix(path)
    if not suffix:
        if _is_dicom_file(path):
            raise InputError("a single DICOM file; medseg reads a DICOM series as the folder of its slices",
                             path=path, hint=f"Give the folder instead: {path.parent}")
        if path.name.lower().endswith(".gif"):
            raise InputError("GIF images are not supported (SimpleITK cannot read them)", path=path,
                             hint="Convert it losslessly to PNG (e.g. `convert in.gif out.png`).")
        raise InputError("unsupported file type", path=path,
                         hint="Use NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr), MetaImage (.mha/.mhd), "
                              "PNG/TIFF/JPEG/BMP, or a DICOM series folder.")
    if path.stat().st_size == 0:
        raise InputError("file is empty", path=path, hint="Re-export the scan.")
    data_bytes = _check_gzip(path) if suffix == ".nii.gz" else None
    if suffix == ".png":
        _check_png_end(path)
    if suffix in _DETACHED_DATA_KEYS:
        _check_detached_data(path, suffix)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _captured_native_stderr() as native:
        try:
            image = reader.Execute()
            failure = None
        except RuntimeError as err:
            failure = str(err)
    if failure is not None:
        # MetaIO says why on stderr ("data not read completely") and only "no such file" in the exception
        raise InputError(_describe_itk_failure(native.text + "\n" + failure), path=path,
                         hint="Check that the file is complete and of the format its name says.")
    return image, data_bytes


def list_dicom_series(folder: str | os.PathLike[str]) -> dict[str, list[str]]:
    """DICOM series in ``folder``: {SeriesInstanceUID: sorted file names}, largest series first.

    An anonymised series may have an empty UID (``""``).
    """
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = {}
    with _captured_native_stderr():
        for uid in reader.GetGDCMSeriesIDs(str(folder)):
            series[uid] = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return dict(sorted(series.items(), key=lambda item: -len(item[1])))


def _slice_positions(files: Sequence[str]) -> np.ndarray:
    """Positions (mm) of the slices along the slice normal, from ImagePositionPatient."""
    positions, normal = [], None
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.LoadPrivateTagsOff()
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0020|0032"):
            return np.array([])
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
        if normal is None and reader.HasMetaDataKey("0020|0037"):
            cosines = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
            normal = np.cross(cosines[:3], cosines[3:])
        positions.append(float(position @ normal) if normal is not None else float(position[2]))
    return np.sort(np.asarray(positions))


def _dicom_labels(name: str) -> dict:
    """Modality and series description of a DICOM file (for display), when it has them."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    reader.LoadPrivateTagsOff()
    found = {}
    with _captured_native_stderr():
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return found
    for key, tag in (("dicom_modality", "0008|0060"), ("dicom_description", "0008|103e")):
        if reader.HasMetaDataKey(tag) and reader.GetMetaData(tag).strip():
            found[key] = reader.GetMetaData(tag).strip()
    return found


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[sitk.Image, dict]:
    series = list_dicom_series(folder)
    if not series:
        raise InputError("no DICOM series found in this folder", path=folder,
                         hint="Give a folder that holds the .dcm files of one scan, or a NIfTI/NRRD file.")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"series {series_uid} is not in this folder", path=folder,
                             hint="Available: " + ", ".join(f"{uid or '(no UID)'} ({len(f)} slices)"
                                                      for uid, f in series.items()))
        chosen = series_uid
    else:
        chosen = next(iter(series))
    files = series[chosen]
    ignored = {uid: len(f) for uid, f in series.items() if uid != chosen}
    if ignored and series_uid is None:
        warnings.warn(MedsegWarning(
            f"{folder}: {len(series)} DICOM series found; using {chosen or '(no UID)'} with {len(files)} slices, "
            f"ignoring {len(ignored)} other(s) ({', '.join(f'{n} slices' for n in ignored.values())}); "
            "pick one with --series UID"), stacklevel=3)
    info = {"dicom_series": chosen, "dicom_slices": len(files), "dicom_other_series": ignored,
            **_dicom_labels(files[0])}
    positions = _slice_positions(files) if len(files) > 2 else np.array([])
    if positions.size > 2:
        steps = np.diff(positions)
        median = float(np.median(steps))
        if median > 0 and float(np.max(np.abs(steps - median))) > 0.01 * median + 1e-3:
            info["dicom_slice_steps_mm"] = [float(steps.min()), float(steps.max())]
            warnings.warn(MedsegWarning(
                f"{folder}: uneven slice spacing (steps from {steps.min():.3g} to {steps.max():.3g} mm, "
                f"median {median:.3g} mm): a slice may be missing; geometry uses the mean spacing"), stacklevel=3)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    with _captured_native_stderr() as native:
        try:
            return reader.Execute(), info
        except RuntimeError as err:
            failure = str(err)
    raise InputError(_describe_itk_failure(native.text + "\n" + failure), path=folder,
                     hint="Check that the DICOM files are complete.")


def _validate(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    if any(not math.isfinite(s) or s <= 0 for s in geometry.spacing):
        raise InputError(f"invalid voxel spacing {_fmt(geometry.spacing)} mm (must be positive)", path=path,
                         hint="Fix the header (pixdim) of the file.")
    if not all(math.isfinite(v) for v in geometry.origin + geometry.direction):
        raise InputError("origin or direction holds NaN/Inf", path=path, hint="Fix the header of the file.")
    if array.size == 0:
        raise InputError("image has no voxels", path=path)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.any():
            raise InputError("every voxel is NaN or infinite", path=path,
                             hint="The scan holds no data; re-export it.")
        bad = int(finite.size - np.count_nonzero(finite))
        if bad:
            warnings.warn(MedsegWarning(f"{path}: {bad} voxels are NaN or infinite"), stacklevel=3)


def _sitk_to_array(image: sitk.Image) -> np.ndarray:
    """SimpleITK image -> (Z, Y, X) or (C, Z, Y, X)."""
    array = sitk.GetArrayFromImage(image)
    dims = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if dims == 2:
        array = array[None]  # (1, Y, X[, C])
    elif dims == 4:
        if components > 1:
            raise InputError("4D images with vector pixels are not supported", path=None)
        return np.ascontiguousarray(array)  # (T, Z, Y, X): the 4th axis becomes channels
    if components > 1:
        array = np.moveaxis(array, -1, 0)  # (C, Z, Y, X)
    return np.ascontiguousarray(array)


def read_file_as_stored(path: str | os.PathLike[str]) -> tuple[sitk.Image, np.ndarray, Geometry]:
    """Read one image file once with :func:`read_image`'s checks but without copying its pixels.

    Returns the SimpleITK image (it owns the pixel buffer: keep it as long as the view), a read-only
    view of the pixels in ITK's array order, ``((T,) (Z,) Y, X[, C])``, in the stored type (uint8
    stays uint8), and the geometry. For pictures too large to hold twice (tile streaming).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file" if not path.exists() else "is a folder, not an image file", path=path,
                         hint="Give one image file.")
    if not os.access(path, os.R_OK):
        raise InputError("file is not readable (permission denied)", path=path)
    image, data_bytes = _read_file(path)
    geometry = Geometry.from_sitk(image)
    view = sitk.GetArrayViewFromImage(image)
    if file_suffix(path) in (".nii", ".nii.gz"):
        view = _nifti_checks(path, image, view, data_bytes)  # NaN/Inf that ITK turned into 0 (a copy then)
    view = view.view()
    view.flags.writeable = False
    _validate(view, geometry, path)
    return image, view, geometry


def read_image(path: str | os.PathLike[str], *, series_uid: str | None = None) -> Image:
    """Read a scan or label map: NIfTI, NRRD, MetaImage, 2D PNG/TIFF/JPEG/BMP, or a DICOM folder.

    A DICOM folder with several series gives the one with most slices (a warning names the others);
    ``series_uid`` picks one. A 4D NIfTI (e.g. MSD multi-modal) becomes ``(C, Z, Y, X)``; RGB 2D
    images become ``(3, 1, Y, X)``. Raises :class:`InputError` with a one-line reason otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=path, hint="Check the path.")
    info: dict = {}
    if path.is_dir():
        image, info = _read_dicom_folder(path, series_uid)
        info["format"] = "DICOM series"
    else:
        if not os.access(path, os.R_OK):
            raise InputError("file is not readable (permission denied)", path=path)
        image, data_bytes = _read_file(path)
        info["format"] = _FORMAT_NAMES.get(file_suffix(path), "image")
    if image.GetDimension() not in (2, 3, 4):
        raise InputError(f"{image.GetDimension()}D images are not supported", path=path)
    geometry = Geometry.from_sitk(image)
    try:
        array = _sitk_to_array(image)
    except InputError as err:
        raise InputError(err.problem, path=path) from None
    if not path.is_dir() and file_suffix(path) in (".nii", ".nii.gz"):
        array = _nifti_checks(path, image, array, data_bytes)
    if image.GetDimension() == 4:
        info["channels_from_4th_axis"] = True
    info["pixel_type"] = image.GetPixelIDTypeAsString()
    _validate(array, geometry, path)
    return Image(array, geometry, str(path), info)


def read_channels(paths: Sequence[str | os.PathLike[str]], *, series_uid: str | None = None) -> Image:
    """Read one file per modality and stack them as ``(C, Z, Y, X)`` in the given order.

    Every file must share the first one's grid (shape, spacing, origin, direction within 1e-4).
    """
    if not paths:
        raise InputError("no input files given")
    images = [read_image(p, series_uid=series_uid) for p in paths]
    if len(images) == 1:
        return images[0]
    reference = images[0]
    stacked = []
    for image in images:
        if image.spatial_shape != reference.spatial_shape:
            raise InputError(f"grid {image.spatial_shape} differs from {reference.spatial_shape} of {reference.source}",
                             path=image.source, hint="All modalities must be co-registered on one voxel grid.")
        differences = image.geometry.differences(reference.geometry)
        if differences:
            raise InputError(f"geometry differs from {reference.source}: " + "; ".join(differences),
                             path=image.source, hint="All modalities must be co-registered on one voxel grid.")
        stacked.append(image.channels().astype(np.float32, copy=False))
    array = np.concatenate(stacked, axis=0)
    return Image(array, reference.geometry, reference.source,
                 {**reference.info, "channel_sources": [str(p) for p in paths]})


# ----------------------------------------------------------------------------------------- writing

def smallest_label_dtype(array: np.ndarray) -> np.dtype:
    """The smallest integer type that holds every value of a label map."""
    if array.size == 0:
        return np.dtype(np.uint8)
    low, high = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def to_sitk(image: Image, *, label: bool = False, planar: bool | None = None) -> sitk.Image:
    """Convert an :class:`Image` to SimpleITK, with its geometry. ``planar`` drops Z (for PNG etc.)."""
    array = image.array
    if label:
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise InputError("label map holds non-integer values", path=image.source,
                             hint="Labels must be whole numbers.")
        array = array.astype(smallest_label_dtype(array), copy=False)
    planar = image.is_planar if planar is None else planar
    if image.has_channels:
        moved = np.moveaxis(array, 0, -1)  # (Z, Y, X, C)
        sitk_image = sitk.GetImageFromArray(moved[0] if planar else moved, isVector=True)
    else:
        sitk_image = sitk.GetImageFromArray(array[0] if planar else array)
    image.geometry.apply_to(sitk_image)
    return sitk_image


def write_image(image: Image, path: str | os.PathLike[str], *, label: bool = False,
                compress: bool = True) -> Path:
    """Write ``image`` atomically (no partial file on failure); the format follows the suffix.

    ``label=True`` stores the smallest integer type that holds the labels. 2D formats (PNG, ...)
    need a single-slice image; PNG/JPEG/BMP need 8- or 16-bit unsigned data.
    """
    path = Path(path)
    suffix = file_suffix(path)
    if not suffix:
        raise InputError("unsupported output file type", path=path,
                         hint="Use .nii.gz, .nii, .nrrd, .seg.nrrd, .mha, .mhd or, for 2D, .png/.tif.")
    planar = suffix in PLANAR_SUFFIXES
    if planar and not image.is_planar:
        raise InputError(f"a {image.spatial_shape} volume cannot be stored as {suffix}", path=path,
                         hint="Use .nii.gz, .nrrd or .mha for 3D data.")
    if image.has_channels and suffix in (".nii", ".nii.gz") and not planar:
        # NIfTI stores channels on its 4th axis (as MSD does); write a 4D image.
        array = image.array
        volumes = [to_sitk(Image(array[c], image.geometry), label=label) for c in range(array.shape[0])]
        sitk_image = sitk.JoinSeries(volumes)
        sitk_image.SetSpacing(image.geometry.spacing + (1.0,))
        sitk_image.SetOrigin(image.geometry.origin + (0.0,))
        direction = np.eye(4)
        direction[:3, :3] = image.geometry.direction_matrix
        sitk_image.SetDirection(tuple(direction.ravel()))
    else:
        sitk_image = to_sitk(image, label=label, planar=planar)
    if planar and suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        if sitk_image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkVectorUInt8,
                                           sitk.sitkVectorUInt16):
            raise InputError(f"{suffix} stores only 8/16-bit unsigned pixels", path=path,
                             hint="Write a label map (integers 0..65535) or use .tif/.nii.gz.")
    return write_sitk_image(sitk_image, path, compress=compress)


def write_sitk_image(sitk_image: sitk.Image, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """Write a prepared SimpleITK image atomically, checked complete before it replaces ``path``."""
    path = Path(path)
    with atomic_output(path) as temp_path:
        try:
            sitk.WriteImage(sitk_image, str(temp_path), useCompression=compress)
        except RuntimeError as err:
            raise ProcessingError(f"writing failed: {_describe_itk_failure(str(err))}", path=path) from None
        verify_written(temp_path, path)
    return path


def verify_written(written: Path, destination: str | os.PathLike[str]) -> None:
    """Raise :class:`ProcessingError` unless ``written`` (an image ITK just wrote) is complete.

    ITK ignores failed writes (a full disk or a file-size limit leaves a short or empty file and no
    error), so the file is checked before it may replace ``destination``: NIfTI by its header and
    (decompressed) data size, other formats by reading them back.
    """
    written = Path(written)
    problem = None
    if not written.is_file() or written.stat().st_size == 0:
        problem = "no data reached the disk"
    else:
        try:
            suffix = file_suffix(written)
            if suffix in (".nii", ".nii.gz"):
                available = _check_gzip(written) if suffix == ".nii.gz" else written.stat().st_size
                header = _nifti_header(written)
                count = int(np.prod(header["shape"], dtype=np.int64)) if header else 0
                if header is None or available < header["vox_offset"] + count * header["bitpix"] // 8:
                    problem = "the file on disk is incomplete"
            else:
                with _captured_native_stderr():
                    sitk.ReadImage(str(written))
        except (InputError, RuntimeError):
            problem = "the file on disk is incomplete"
    if problem:
        raise ProcessingError(f"writing failed: {problem}", path=destination,
                              hint="Check free disk space and permissions; nothing was written.")


def label_statistics(array: np.ndarray, geometry: Geometry) -> list[dict]:
    """Per label value present (background 0 included): voxel count and volume in mm³."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.view(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.size and array.min() >= 0 and array.max() < (1 << 20):
        counts = np.bincount(array.ravel())  # far faster than np.unique on a large label map
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(array, return_counts=True)
    voxel = geometry.voxel_volume_mm3
    return [{"label": int(v), "voxels": int(c), "volume_mm3": float(c) * voxel} for v, c in zip(values, counts)]


def _distinct_at_most(array: np.ndarray, limit: int) -> bool:
    """Whether ``array`` holds at most ``limit`` distinct values (a strided sample rules out most scans fast)."""
    sample = array.ravel()[:: max(1, array.size // 20_000)]
    if np.unique(sample).size > limit:
        return False
    if array.dtype == bool:
        return True
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() < (1 << 20):
        return int(np.count_nonzero(np.bincount(array.ravel()))) <= limit  # O(N), no sort
    return np.unique(array).size <= limit


def looks_like_label_map(array: np.ndarray, max_labels: int = 64) -> bool:
    """Heuristic: integer-valued, non-negative, and few distinct values."""
    if array.size == 0:
        return False
    if np.issubdtype(array.dtype, np.floating):
        sample = array.ravel()[:: max(1, array.size // 200_000)]
        if not np.all(np.isfinite(sample)) or not np.array_equal(sample, np.round(sample)):
            return False
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            return False
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        return False
    if array.min() < 0:
        return False
    return _distinct_at_most(array, max_labels)


def color_statistics(channels: np.ndarray, geometry: Geometry, max_colors: int = 64) -> list[dict] | None:
    """Per colour of a ``(C, Z, Y, X)`` integer image with few colours (e.g. an RGB mask): voxel count
    and volume in mm³; ``None`` when it is not such an image (too many colours, floats, C > 4)."""
    if channels.ndim != 4 or not 1 < channels.shape[0] <= 4 or not np.issubdtype(channels.dtype, np.integer):
        return None
    if channels.min() < 0 or channels.max() > 65535:
        return None
    flat = channels.reshape(channels.shape[0], -1)

    def pack(columns: np.ndarray) -> np.ndarray:  # one 64-bit key per voxel: 16 bits per channel
        packed = np.zeros(columns.shape[1], dtype=np.uint64)
        for channel in columns:
            packed = (packed << np.uint64(16)) | channel.astype(np.uint64)
        return packed

    candidates = np.unique(pack(flat[:, :: max(1, flat.shape[1] // 20_000)]))  # a strided sample first
    if candidates.size > max_colors:
        return None
    packed = pack(flat)
    where = np.minimum(np.searchsorted(candidates, packed), candidates.size - 1)
    if np.array_equal(candidates[where], packed):  # every colour was in the sample: count by index
        keys, counts = candidates, np.bincount(where, minlength=candidates.size)
        keys, counts = keys[counts > 0], counts[counts > 0]
    else:
        keys, counts = np.unique(packed, return_counts=True)
        if keys.size > max_colors:
            return None
    voxel = geometry.voxel_volume_mm3
    rows = []
    for key, count in zip(keys, counts):
        key = int(key)
        colour = [(key >> (16 * (channels.shape[0] - 1 - c))) & 0xFFFF for c in range(channels.shape[0])]
        rows.append({"color": colour, "voxels": int(count), "volume_mm3": float(count) * voxel})
    return rows


def describe(image: Image, *, as_label: bool | None = None) -> dict:
    """Facts about an image for ``medseg info``: format, size, spacing, origin, direction, ...

    ``as_label=None`` guesses whether the array is a label map. A multi-channel integer image with at
    most 64 distinct colours (a colour-coded mask, e.g. RGB PNG) gets per-colour counts and volumes
    under ``colors`` (``is_color_label_map``).
    """
    array = image.array
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        low = float(np.min(array, where=finite, initial=np.inf)) if finite.any() else None
        high = float(np.max(array, where=finite, initial=-np.inf)) if finite.any() else None
        nonfinite = int(finite.size - np.count_nonzero(finite))
    else:
        low, high, nonfinite = (float(array.min()), float(array.max()), 0) if array.size else (None, None, 0)
    facts: dict = {
        "path": image.source,
        "format": image.info.get("format"),
        "size_zyx": list(image.spatial_shape),
        "channels": image.num_channels,
        "spacing_xyz_mm": list(image.geometry.spacing),
        "origin_xyz_mm": list(image.geometry.origin),
        "direction": list(image.geometry.direction),
        "orientation": image.geometry.orientation_code(),
        "pixel_type": image.info.get("pixel_type", str(array.dtype)),
        "intensity_min": low,
        "intensity_max": high,
        "nonfinite_voxels": nonfinite,
        "physical_size_xyz_mm": [float(n * s) for n, s in
                                 zip(image.spatial_shape[::-1], image.geometry.spacing)],
        "voxel_volume_mm3": image.geometry.voxel_volume_mm3,
    }
    for key in ("dicom_series", "dicom_slices", "dicom_other_series", "dicom_modality", "dicom_description",
                "dicom_slice_steps_mm"):
        if key in image.info:
            facts[key] = image.info[key]
    is_label = looks_like_label_map(array) if as_label is None else as_label
    facts["is_label_map"] = bool(is_label and not image.has_channels)
    if facts["is_label_map"]:
        if np.issubdtype(array.dtype, np.floating) and not (np.isfinite(array).all()
                                                             and np.array_equal(array, np.round(array))):
            raise InputError("not a label map: it holds non-integer or non-finite values", path=image.source,
                             hint="Drop --label to describe it as an intensity image.")
        facts["labels"] = label_statistics(array, image.geometry)
    elif image.has_channels and as_label is not False:
        colours = color_statistics(array, image.geometry)
        if colours is not None:
            facts["is_color_label_map"] = True
            facts["colors"] = colours
    return facts


# ------------------------------------------------------------------------- 2D colour <-> grey
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" conversion


def match_planar_channels(image: Image, channels: int) -> Image:
    """A 2D (single-slice) picture with the channel count a model wants: colour <-> grey.

    RGB / RGBA (3 / 4 channels) -> 1 channel: BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (alpha
    dropped), float32 (Z=1, Y, X). Grey (1 channel) -> 3: the grey plane repeated (3, 1, Y, X).
    RGBA -> 3: alpha dropped. Anything else (3D volumes, other counts) is returned unchanged, so
    the caller's channel check still reports it. The geometry is kept.
    """
    have = image.num_channels
    if have == channels or not image.is_planar:
        return image
    if channels == 1 and have in (3, 4):
        rgb = image.channels()[:3].astype(np.float32)
        grey = sum(np.float32(w) * rgb[c] for c, w in enumerate(LUMA_WEIGHTS))
        return image.with_array(grey.astype(np.float32), converted="grey from RGB")
    if channels == 3 and have == 1:
        return image.with_array(np.repeat(image.channels(), 3, axis=0), converted="RGB from grey")
    if channels == 3 and have == 4:
        return image.with_array(image.channels()[:3], converted="RGB from RGBA")
    return image
