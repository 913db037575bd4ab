"""On-the-fly augmentation of one training sample, seeded by a ``numpy.random.Generator``.

``augment(image, label, config, rng)`` takes ``image`` ``(C, Z, Y, X)`` float32 and ``label``
``(Z, Y, X)`` int and returns both transformed alike. Spatial transforms (flips, rotation, scaling,
translation, elastic deformation) resample the image linearly (zero outside, like the patch padding)
and the label by NEAREST neighbour only; intensity transforms (noise, brightness, contrast, gamma)
touch the image alone. Each transform fires with its probability from :class:`AugmentConfig`. 2D
samples (Z == 1) are rotated, scaled and deformed in-plane only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (0..1) and ranges of each transform. Angles in degrees, shifts in voxels."""

    flip_prob: float = 0.5                 # per spatial axis listed in flip_axes
    flip_axes: tuple = (0, 1, 2)           # array axes (0 = Z, 1 = Y, 2 = X) that may be flipped
    rotation_prob: float = 0.0
    rotation_degrees: float = 10.0         # uniform in [-d, d] about each axis (in-plane only for 2D)
    scale_prob: float = 0.0
    scale_range: tuple = (0.9, 1.1)        # isotropic zoom factor
    translation_prob: float = 0.0
    translation_voxels: float = 5.0        # uniform in [-t, t] per axis
    elastic_prob: float = 0.0
    elastic_sigma: float = 4.0             # smoothing of the displacement field (voxels)
    elastic_magnitude: float = 2.0         # displacement amplitude (voxels)
    noise_prob: float = 0.0
    noise_std: float = 0.1                 # gaussian noise sigma (normalised intensity units)
    brightness_prob: float = 0.0
    brightness_range: tuple = (0.75, 1.25)  # multiplicative
    contrast_prob: float = 0.0
    contrast_range: tuple = (0.75, 1.25)   # scale around the mean
    gamma_prob: float = 0.0
    gamma_range: tuple = (0.7, 1.5)        # applied to the [0, 1]-rescaled image


def _rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """3x3 rotation in (z, y, x) array coordinates from angles about the z, y, x axes."""
    az, ay, ax = angles_rad
    rz = np.array([[1, 0, 0], [0, np.cos(az), -np.sin(az)], [0, np.sin(az), np.cos(az)]])  # rotates y-x plane
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])  # z-x plane
    rx = np.array([[np.cos(ax), -np.sin(ax), 0], [np.sin(ax), np.cos(ax), 0], [0, 0, 1]])  # z-y plane
    return rz @ ry @ rx


def spatial_transform(image: np.ndarray, label: np.ndarray, config: AugmentConfig,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rotation / scaling / translation / elastic deformation about the volume centre."""
    shape = np.array(label.shape)
    planar = shape[0] == 1
    matrix = np.eye(3)
    shift = np.zeros(3)
    changed = False
    if config.rotation_prob > 0 and rng.random() < config.rotation_prob:
        limit = np.deg2rad(config.rotation_degrees)
        angles = rng.uniform(-limit, limit, 3)
        if planar:
            angles[1:] = 0.0
        matrix = _rotation_matrix(angles) @ matrix
        changed = True
    if config.scale_prob > 0 and rng.random() < config.scale_prob:
        factor = rng.uniform(*config.scale_range)
        zoom = np.diag([1.0 if planar else 1.0 / factor, 1.0 / factor, 1.0 / factor])
        matrix = zoom @ matrix
        changed = True
    if config.translation_prob > 0 and rng.random() < config.translation_prob:
        shift = rng.uniform(-config.translation_voxels, config.translation_voxels, 3)
        if planar:
            shift[0] = 0.0
        changed = True
    displacement = None
    if config.elastic_prob > 0 and rng.random() < config.elastic_prob:
        displacement = []
        for axis in range(3):
            if planar and axis == 0:
                displacement.append(np.zeros(label.shape))
                continue
            field = rng.uniform(-1, 1, label.shape)
            field = ndimage.gaussian_filter(field, config.elastic_sigma, mode="constant")
            peak = np.abs(field).max() or 1.0
            displacement.append(field / peak * config.elastic_magnitude)
        changed = True
    if not changed:
        return image, label
    centre = (shape - 1) / 2.0
    grid = np.indices(label.shape, dtype=np.float64).reshape(3, -1)
    coords = matrix @ (grid - centre[:, None]) + centre[:, None] - shift[:, None]
    if displacement is not None:
        coords = coords + np.stack([d.reshape(-1) for d in displacement])
    coords = coords.reshape((3,) + label.shape)
    out_image = np.stack([ndimage.map_coordinates(ch, coords, order=1, mode="constant", cval=0.0).astype(np.float32)
                          for ch in image])
    out_label = ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0).astype(label.dtype)
    return out_image, out_label


def intensity_transform(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Noise, brightness, contrast, gamma: image only, per channel."""
    image = image.astype(np.float32, copy=True)
    if config.noise_prob > 0 and rng.random() < config.noise_prob:
        image += rng.normal(0.0, config.noise_std, image.shape).astype(np.float32)
    if config.brightness_prob > 0 and rng.random() < config.brightness_prob:
        image *= np.float32(rng.uniform(*config.brightness_range))
    if config.contrast_prob > 0 and rng.random() < config.contrast_prob:
        factor = np.float32(rng.uniform(*config.contrast_range))
        for c in range(image.shape[0]):
            mean = image[c].mean()
            lo, hi = image[c].min(), image[c].max()
            image[c] = np.clip((image[c] - mean) * factor + mean, lo, hi)
    if config.gamma_prob > 0 and rng.random() < config.gamma_prob:
        gamma = rng.uniform(*config.gamma_range)
        for c in range(image.shape[0]):
            lo, hi = float(image[c].min()), float(image[c].max())
            if hi > lo:
                image[c] = ((image[c] - lo) / (hi - lo)) ** gamma * (hi - lo) + lo
    return image


def augment(image: np.ndarray, label: np.ndarray, config: AugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply flips, spatial and intensity transforms; image ``(C, Z, Y, X)``, label ``(Z, Y, X)``."""
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    planar = label.shape[0] == 1
    for axis in config.flip_axes:
        if planar and axis == 0:
            continue
        if config.flip_prob > 0 and rng.random() < config.flip_prob:
            image = np.flip(image, axis + 1)
            label = np.flip(label, axis)
    image, label = spatial_transform(np.ascontiguousarray(image), np.ascontiguousarray(label), config, rng)
    image = intensity_transform(image, config, rng)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)
