"""Surface elements of a binary mask and the distances between two surfaces, in millimetres.

Two conventions (see docs/metrics.md):

* ``"element"`` (default), as DeepMind's ``surface-distance``: the surface is made of marching-cubes
  elements on the grid of voxel *corners*. Every 2×2×2 neighbourhood of voxels (2×2 in 2D) whose
  voxels are neither all inside nor all outside is one surface point, located at the shared corner,
  weighted by the area (mm², or contour length in mm for 2D) of the marching-cubes triangles that
  cross it.
* ``"voxel"``, as MedPy: the surface is the set of mask voxels with at least one face-neighbour
  outside the mask (``mask XOR binary_erosion(mask)``, connectivity 1, outside the image counts as
  outside); every border voxel has weight 1.

Distances from each surface point of one mask to the nearest surface point of the other are exact
Euclidean distances in mm (spacing per axis), computed only inside the joint bounding box of both
masks (plus one voxel): a k-d tree over the other surface's points, or scipy's Euclidean distance
transform of that box (``method="edt"``); both give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..preprocessing import bounding_box

CONVENTIONS = ("element", "voxel")
_GATHER_LIMIT = 1 << 21  # elements per (points × offsets) block of the local search (16 MiB as int64)

# Marching-cubes surface elements of every 2x2x2 neighbourhood code (code = sum of the voxel bits
# 128, 64, 32, 16, 8, 4, 2, 1 for offsets (0,0,0), (0,0,1), (0,1,0), ..., (1,1,1)). Each entry lists
# the triangles of that code as three digits: 8 x |area vector| along axes 0, 1, 2 on a unit grid.
# Codes k and 255 - k describe the same surface, so only codes 0..127 are listed. The numbers are
# the surface-element normals of DeepMind's surface-distance (Apache-2.0, lookup_tables.py),
# re-encoded, so that results agree with that reference implementation.
_TRIANGLES_3D = (
    '000', '111', '111', '220 220', '111', '202 202', '111 111', '400 222 111',
    '111', '111 111', '202 202', '400 222 111', '220 220', '400 222 111', '400 222 111', '400 400',
    '111', '022 022', '111 111', '040 222 111', '111 111', '004 222 111', '111 111 111', '111 222 222 111',
    '111 111', '022 022 111', '202 202 111', '111 333 022 202', '111 220 220', '333 022 111 220', '400 111 222 111', '400 111 222',
    '111', '111 111', '022 022', '040 111 222', '111 111', '111 202 202', '022 022 111', '333 022 111 202',
    '111 111', '111 111 111', '004 222 111', '222 222 111 111', '111 220 220', '400 222 111 111', '022 333 111 220', '400 222 111',
    '220 220', '040 222 111', '040 111 222', '040 040', '220 220 111', '333 202 111 220', '111 040 222 111', '040 222 111',
    '111 220 220', '040 222 111 111', '333 220 111 202', '040 222 111', '220 220 220 220', '220 220 111', '111 220 220', '220 220',
    '111', '111 111', '111 111', '111 220 220', '022 022', '004 222 111', '022 022 111', '333 022 111 220',
    '111 111', '111 111 111', '111 202 202', '400 222 111 111', '040 222 111', '222 222 111 111', '202 333 022 111', '400 222 111',
    '202 202', '004 222 111', '111 202 202', '202 333 220 111', '004 222 111', '004 004', '111 111 222 004', '111 222 004',
    '202 202 111', '004 222 111 111', '202 202 202 202', '111 202 202', '202 333 220 111', '004 222 111', '111 202 202', '202 202',
    '111 111', '111 111 111', '111 022 022', '040 111 222 111', '022 022 111', '004 222 111 111', '022 022 022 022', '022 022 111',
    '111 111 111', '111 111 111 111', '004 222 111 111', '111 111 111', '040 222 111 111', '111 111 111', '022 022 111', '111 111',
    '400 222 111', '222 111 222 111', '333 022 111 202', '040 222 111', '333 220 022 111', '111 222 004', '111 022 022', '022 022',
    '400 222 111 111', '111 111 111', '202 202 111', '111 111', '220 220 111', '111 111', '111 111', '111',
)


def _triangles(code: int) -> np.ndarray:
    """Area vectors (unit grid, axes 0..2) of the triangles of one 3D neighbourhood code."""
    text = _TRIANGLES_3D[code if code < 128 else 255 - code]
    return np.array([[int(c) / 8.0 for c in item] for item in text.split()], dtype=np.float64)


@lru_cache(maxsize=64)
def element_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Area (mm², 3D) or contour length (mm, 2D) of the surface element of every neighbourhood code.

    spacing: voxel size in mm per array axis, (Z, Y, X) or (Y, X). Returns 256 (3D) or 16 (2D) floats.
    """
    if len(spacing) == 3:
        s0, s1, s2 = spacing
        scale = np.array([s1 * s2, s0 * s2, s0 * s1])
        table = np.zeros(256)
        for code in range(1, 255):
            vectors = _triangles(code) * scale
            table[code] = float(np.sum(np.sqrt(np.sum(vectors * vectors, axis=1))))
        return table
    if len(spacing) == 2:
        vertical, horizontal = spacing  # along axis 0 and axis 1
        half_diagonal = 0.5 * float(np.hypot(vertical, horizontal))
        table = np.zeros(16)
        for code in range(1, 15):
            corners = bin(code).count("1")
            if corners in (1, 3):
                table[code] = half_diagonal
            elif code in (0b0011, 0b1100):  # one row inside: the contour crosses horizontally
                table[code] = horizontal
            elif code in (0b0101, 0b1010):  # one column inside
                table[code] = vertical
            else:  # two opposite corners
                table[code] = 2 * half_diagonal
        return table
    raise ValueError(f"surface elements need 2D or 3D masks, got spacing {spacing}")


@dataclass(frozen=True)
class SurfaceDistances:
    """Distances (mm) from every surface point of each mask to the other mask's surface.

    pred_to_ref / ref_to_pred: one distance per surface point of the prediction / reference.
    pred_weights / ref_weights: the weight of each point: element area (mm², mm in 2D) under the
    ``element`` convention, 1 under ``voxel``. Arrays are empty for an empty mask; distances to an
    empty surface are ``inf``.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray
    pred_weights: np.ndarray
    ref_weights: np.ndarray
    convention: str = "element"


def padded_crop(mask: np.ndarray, box: Sequence[slice]) -> np.ndarray:
    """``mask[box]`` with one False voxel added on every side (bool)."""
    shape = tuple(s.stop - s.start + 2 for s in box)
    out = np.zeros(shape, dtype=bool)
    out[tuple(slice(1, -1) for _ in box)] = mask[tuple(box)]
    return out


def neighbourhood_codes(padded: np.ndarray) -> np.ndarray:
    """Code of every 2×2×2 (2×2) neighbourhood of a padded mask: one per voxel corner, shape - 1.

    Bit weights: 128, 64, 32, 16, 8, 4, 2, 1 for offsets (0,0,0), (0,0,1), ..., (1,1,1) in 3D;
    8, 4, 2, 1 for (0,0), (0,1), (1,0), (1,1) in 2D.
    """
    ndim = padded.ndim
    out_shape = tuple(n - 1 for n in padded.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    bits = 2 ** ndim
    for index in range(bits):
        offsets = [(index >> (ndim - 1 - axis)) & 1 for axis in range(ndim)]
        view = padded[tuple(slice(o, o + n) for o, n in zip(offsets, out_shape))]
        weight = np.uint8(1 << (bits - 1 - index))
        codes |= view.view(np.uint8) * weight
    return codes


def element_surface(padded: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Surface points (boolean map on the corner grid) and their element areas (mm² / mm)."""
    codes = neighbourhood_codes(padded)
    full = (1 << (2 ** padded.ndim)) - 1
    border = (codes != 0) & (codes != full)
    areas = element_area_table(tuple(float(s) for s in spacing))[codes[border]]
    return border, areas


def voxel_surface(padded: np.ndarray) -> np.ndarray:
    """Border voxels of a padded mask: ``mask XOR erosion(mask)`` with face connectivity."""
    structure = ndimage.generate_binary_structure(padded.ndim, 1)
    return padded ^ ndimage.binary_erosion(padded, structure=structure, iterations=1)


def _exact_distances(offsets: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """sqrt(sum((offset * spacing)²)) for integer offsets (N, ndim), summed in axis order (as scipy)."""
    total = None
    for axis, step in enumerate(spacing):
        component = offsets[:, axis].astype(np.float64) * float(step)
        component = component * component
        total = component if total is None else total + component
    return np.sqrt(total)


def _points(mask: np.ndarray) -> np.ndarray:
    """Indices ``(N, ndim)`` of the True voxels of ``mask``, in C order."""
    return np.stack(np.unravel_index(np.flatnonzero(mask), mask.shape), axis=1)


@lru_cache(maxsize=32)
def _shell_offsets(spacing: tuple[float, ...], radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero integer offsets within ``radius_mm`` (spacing per axis), nearest first, and their
    distances in mm, computed as :func:`_exact_distances` computes them."""
    reach = [int(radius_mm // step) for step in spacing]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    distances = _exact_distances(offsets, spacing)
    keep = (distances > 0) & (distances <= radius_mm)
    order = np.argsort(distances[keep], kind="stable")
    return offsets[keep][order], distances[keep][order]


def _directed_kdtree(source: np.ndarray, target: np.ndarray, spacing: Sequence[float],
                     workers: int = 1) -> np.ndarray:
    """Distance (mm) from each True point of ``source`` to the nearest True point of ``target``.

    Exact nearest-neighbour search in three steps: points present in both maps are at distance 0;
    the others look for a target point at the integer offsets within a small radius, nearest
    offset first (the first hit is the nearest point); the few left over query a k-d tree of all
    target points. The distance is computed from the integer offset to the nearest point exactly as
    scipy's distance transform does, so ``method="edt"`` agrees to rounding (~1e-15 mm).
    Order of the result: C order of the True points of ``source``.
    """
    source_flat = np.flatnonzero(source)
    distances = np.zeros(source_flat.size, dtype=np.float64)
    if source_flat.size == 0:
        return distances
    if not target.any():
        distances[:] = np.inf
        return distances
    pending = np.flatnonzero(~target.ravel()[source_flat])  # positions in source_flat still unknown
    if pending.size == 0:
        return distances
    spacing = tuple(float(v) for v in spacing)
    # search radius: a step along the coarsest axis and a half, capped (very anisotropic grids)
    offsets, offset_distances = _shell_offsets(spacing, min(1.5 * max(spacing), 8.0 * min(spacing)))
    margin = np.max(np.abs(offsets), axis=0) if len(offsets) else np.zeros(source.ndim, dtype=int)
    padded = np.zeros(tuple(int(n + 2 * m) for n, m in zip(target.shape, margin)), dtype=bool)
    padded[tuple(slice(int(m), int(m) + n) for m, n in zip(margin, target.shape))] = target
    flat_target = padded.ravel()
    strides = np.array([st // padded.itemsize for st in padded.strides], dtype=np.int64)
    coords = np.unravel_index(source_flat[pending], source.shape)
    where = sum((c.astype(np.int64) + int(m)) * st for c, m, st in zip(coords, margin, strides))
    deltas = offsets.astype(np.int64) @ strides
    start = 0
    for stop in (8, 32, 128, 512, len(deltas)):  # blocks of offsets, nearest first
        stop = min(stop, len(deltas))
        if stop <= start:
            continue
        block = deltas[start:stop]
        found = np.zeros(pending.size, dtype=bool)
        chunk = max(1, _GATHER_LIMIT // block.size)  # bounds the (points, offsets) temporaries
        for low in range(0, pending.size, chunk):
            hits = flat_target[where[low:low + chunk, None] + block[None, :]]  # (points, offsets)
            first = np.argmax(hits, axis=1)
            hit = hits[np.arange(first.size), first]
            found[low:low + chunk] = hit
            distances[pending[low:low + chunk][hit]] = offset_distances[start:stop][first[hit]]
        pending, where = pending[~found], where[~found]
        start = stop
        if pending.size == 0:
            return distances
    from scipy.spatial import cKDTree

    target_points = _points(target)
    queries = np.stack(np.unravel_index(source_flat[pending], source.shape), axis=1)
    step = np.asarray(spacing, dtype=np.float64)
    tree = cKDTree(target_points * step, leafsize=32, balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(queries * step, k=1, workers=workers)
    distances[pending] = _exact_distances(queries - target_points[nearest], spacing)
    return distances


def _directed_edt(source: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Same as :func:`_directed_kdtree`, from a Euclidean distance transform of the whole box."""
    if not source.any():
        return np.zeros(0)
    if not target.any():
        return np.full(int(source.sum()), np.inf)
    distance_map = ndimage.distance_transform_edt(~target, sampling=tuple(float(s) for s in spacing))
    return distance_map[source]


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *,
                      convention: str = "element", method: str = "kdtree",
                      workers: int = 1, box: Sequence[slice] | None = None) -> SurfaceDistances:
    """Surface points of ``pred`` and ``ref`` and the distance from each to the other surface.

    pred, ref: boolean masks of one shape, 2D ``(Y, X)`` or 3D ``(Z, Y, X)``; a 3D array with a
    single slice is treated as 2D. spacing: mm per array axis (same length as the array's ndim).
    convention: ``"element"`` (area-weighted marching-cubes elements) or ``"voxel"`` (MedPy).
    method: ``"kdtree"`` (default, fast) or ``"edt"`` (distance transform of the joint box).
    Only the joint bounding box of both masks, padded by one voxel, is ever processed; ``box``
    (that bounding box, if the caller already has it) saves finding it again.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown surface convention {convention!r}; use one of {CONVENTIONS}")
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} does not fit a {pred.ndim}D mask")
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred, ref, spacing = pred[0], ref[0], spacing[1:]
        box = tuple(box[1:]) if box is not None and len(box) == 3 else box
    empty = np.zeros(0)
    if box is None:
        box = bounding_box(pred | ref)
    if box is None:
        return SurfaceDistances(empty, empty, empty, empty, convention)
    pred_box, ref_box = padded_crop(pred, box), padded_crop(ref, box)
    if convention == "element":
        pred_points, pred_weights = element_surface(pred_box, spacing)
        ref_points, ref_weights = element_surface(ref_box, spacing)
    else:
        pred_points, ref_points = voxel_surface(pred_box), voxel_surface(ref_box)
        pred_weights = np.ones(int(pred_points.sum()))
        ref_weights = np.ones(int(ref_points.sum()))
    if method == "kdtree":
        pred_to_ref = _directed_kdtree(pred_points, ref_points, spacing, workers)
        ref_to_pred = _directed_kdtree(ref_points, pred_points, spacing, workers)
    elif method == "edt":
        pred_to_ref = _directed_edt(pred_points, ref_points, spacing)
        ref_to_pred = _directed_edt(ref_points, pred_points, spacing)
    else:
        raise ValueError(f"unknown distance method {method!r}; use 'kdtree' or 'edt'")
    return SurfaceDistances(pred_to_ref, ref_to_pred, pred_weights, ref_weights, convention)
