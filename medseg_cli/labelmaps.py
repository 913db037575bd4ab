"""Label maps given as colours: colour-coded PNG masks <-> integer label maps.

Many 2D data sets store masks as RGB images (e.g. LabelMe's palette: class 1 = (128, 0, 0), class 2 =
(0, 128, 0)) or as 0/255 grey images. A *colour table* maps each label value to its colour::

    {0: [0, 0, 0], 1: [128, 0, 0], 2: [0, 128, 0]}     # RGB masks
    {0: [0], 1: [255]}                                  # grey masks (one channel)

Every pixel must have a colour listed in the table: an unknown colour is an error, never a silent
background, because it usually means the wrong table or a lossy (JPEG) mask.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .errors import InputError
from .imaging import Image, read_image


def parse_color_table(table: Mapping, *, source: str | None = None) -> dict[int, tuple[int, ...]]:
    """Validate a colour table ({label: [c0, c1, ...]}) and return it with int keys and tuple colours.

    Raises :class:`InputError` when labels are not integers, colours have differing lengths or values
    outside 0..65535, or two labels share a colour.
    """
    if not isinstance(table, Mapping) or not table:
        raise InputError("colour table must be a non-empty mapping {label: [r, g, b]}", path=source)
    parsed: dict[int, tuple[int, ...]] = {}
    for key, colour in table.items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            raise InputError(f"colour table key {key!r} is not an integer label", path=source) from None
        values = (colour,) if isinstance(colour, (int, np.integer)) else tuple(colour)
        if not values or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 65535 for v in values):
            raise InputError(f"colour for label {label} must be integers 0..65535, got {colour!r}", path=source)
        parsed[label] = tuple(int(v) for v in values)
    lengths = {len(c) for c in parsed.values()}
    if len(lengths) != 1:
        raise InputError("every colour in the table must have the same number of channels", path=source)
    seen: dict[tuple[int, ...], int] = {}
    for label, colour in parsed.items():
        if colour in seen:
            raise InputError(f"labels {seen[colour]} and {label} share the colour {list(colour)}", path=source)
        seen[colour] = label
    return parsed


def colors_to_labels(colours: np.ndarray, table: Mapping, *, source: str | None = None) -> np.ndarray:
    """Map a colour image to labels.

    colours: ``(C, ...)`` with C equal to the table's colour length (a single-channel mask may also be
    given without the C axis). Returns the label map ``(...)`` as the smallest fitting unsigned type.
    Raises :class:`InputError` naming the first unknown colour, how many pixels have it and where.
    """
    table = parse_color_table(table, source=source)
    width = len(next(iter(table.values())))
    if colours.ndim >= 1 and width == 1 and (colours.shape[0] != 1 or colours.ndim == 1):
        colours = colours[None]
    if colours.shape[0] != width:
        raise InputError(f"mask has {colours.shape[0]} colour channels but the colour table has {width}",
                         path=source, hint="Give colours with as many values as the mask has channels.")
    table_codes = {_code(colour): label for label, colour in table.items()}
    described = "the colour table {" + ", ".join(f"{k}: {list(v)}" for k, v in table.items()) + "}"
    return _lookup(colours, table_codes, max(table), source=source, described=described,
                   hint="Add it to the config's colour table, or check the mask is lossless (PNG).")


def _code(colour: Sequence[int]) -> int:
    """One integer per colour: its values as base-65536 digits."""
    code = 0
    for value in colour:
        code = code * 65536 + int(value)
    return code


def _lookup(colours: np.ndarray, table_codes: Mapping[int, int], max_label: int, *, source: str | None,
            described: str, hint: str) -> np.ndarray:
    """``(C, ...)`` colours -> ``(...)`` labels by ``{colour code: label}``; an unlisted colour is an
    :class:`InputError` naming it, its pixel count, its first index, ``described`` (the table) and ``source``."""
    width = colours.shape[0]
    flat = colours.reshape(width, -1).astype(np.int64)
    codes = np.zeros(flat.shape[1], dtype=np.int64)
    for channel in flat:
        codes = codes * 65536 + channel
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [code for code in unique if int(code) not in table_codes]
    if unknown:
        code = int(unknown[0])
        first = int(np.flatnonzero(codes == code)[0])
        position = np.unravel_index(first, colours.shape[1:])
        count = int(np.count_nonzero(codes == code))
        colour = [(code // 65536 ** (width - 1 - i)) % 65536 for i in range(width)] if width > 1 else [code]
        raise InputError(f"colour {colour} ({count} pixels, first at index {tuple(int(p) for p in position)}) "
                         f"is not in {described}", path=source, hint=hint)
    dtype = np.uint8 if max_label < 256 else np.uint16
    lookup = np.array([table_codes[int(code)] for code in unique], dtype=dtype)
    return lookup[inverse.reshape(-1)].reshape(colours.shape[1:])


def apply_label_map(colours: np.ndarray, label_map: Mapping[tuple[int, ...], int], *, source: str | None = None,
                    option: str = "--label-map") -> np.ndarray:
    """Map a mask to labels with a parsed ``{raw: class}`` map (training's ``data.label_map`` syntax,
    keys ``(r, g, b)`` for colour masks or ``(value,)`` for grey ones; see ``training.config.parse_label_map``).

    colours: ``(C, ...)`` integer values, C equal to the keys' length. Returns ``(...)`` labels (uint8,
    uint16 above 255). Several raw colours may map to one class. Raises :class:`InputError` naming
    ``source`` and the first unlisted colour (with its pixel count and first index).
    """
    width = len(next(iter(label_map)))
    if colours.shape[0] != width:
        raise InputError(f"mask has {colours.shape[0]} channel(s) but the {option} keys have {width} value(s)",
                         path=source, hint=f"Give {option} keys with as many values as the mask has channels.")
    if not np.issubdtype(colours.dtype, np.integer):
        raise InputError(f"mask has pixel type {colours.dtype}; {option} maps integer values", path=source)
    table_codes = {_code(raw): int(label) for raw, label in label_map.items()}
    keys = ", ".join('"' + ",".join(map(str, raw)) + f'": {label}' for raw, label in label_map.items())
    return _lookup(colours, table_codes, max(label_map.values()), source=source,
                   described=f"{option} {{{keys}}}",
                   hint=f"Add it to {option}, or check the mask is lossless (PNG, not JPEG).")


def labels_to_colors(labels: np.ndarray, table: Mapping, *, source: str | None = None) -> np.ndarray:
    """Inverse of :func:`colors_to_labels`: ``(...)`` labels -> ``(C, ...)`` colours (uint8 or uint16)."""
    table = parse_color_table(table, source=source)
    present = np.unique(labels)
    missing = [int(v) for v in present if int(v) not in table]
    if missing:
        raise InputError(f"labels {missing} have no colour in the table", path=source)
    width = len(next(iter(table.values())))
    dtype = np.uint8 if max(max(c) for c in table.values()) < 256 else np.uint16
    lookup = np.zeros((max(max(table), int(present.max())) + 1, width), dtype=dtype)
    for label, colour in table.items():
        lookup[label] = colour
    return np.moveaxis(lookup[labels.astype(np.int64)], -1, 0)


def read_label_map(path: str, color_table: Mapping | None = None) -> Image:
    """Read a label map; with ``color_table``, convert a colour-coded mask to labels.

    Without a table, a multi-channel mask is an error (its colours need a table to mean labels).
    """
    image = read_image(path)
    if color_table is None:
        if image.has_channels:
            raise InputError(f"mask has {image.num_channels} colour channels", path=path,
                             hint="Give a colour table (label: [r, g, b]) in the config's data.color_table.")
        return image
    labels = colors_to_labels(image.channels(), color_table, source=path)
    return Image(labels, image.geometry, image.source, {**image.info, "color_table": True})


def default_binary_table(foreground: Sequence[int] = (255,)) -> dict[int, tuple[int, ...]]:
    """Table for 0 / 255 binary masks (e.g. DRIVE's vessel and field-of-view masks)."""
    return {0: tuple(0 for _ in foreground), 1: tuple(foreground)}
