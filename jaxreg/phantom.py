"""A deterministic breast MRI phantom with a known deformation, for tests and demos.

The anatomy is procedural: a body block, a chest-wall muscle slab and two half-ellipsoid
breasts in front of it (array axis 1 points anterior), each with a skin layer, fat and
fibroglandular tissue (FGT: smooth random blobs, denser towards the centre). Because it
is defined at any continuous position, both images are drawn from it without resampling
a label map:

* the moving image is the anatomy on the voxel grid, ``moving(y) = A(y)``;
* the fixed image is the anatomy pulled through the true field,
  ``fixed(x) = A(x + true_field(x))``.

So ``moving(x + true_field(x)) == fixed(x)`` holds exactly (pull convention, the one
jaxreg's warp uses), up to the interpolation of the moving image and the contrast change
of the task. One seed gives the same anatomy and field for every task; only the moving
image's contrast differs.

>>> pair = breast_pair("sequence", seed=0)
>>> pair["fixed"].shape, pair["true_field"].shape
((112, 80, 48), (112, 80, 48, 3))
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["TASKS", "TISSUES", "breast_pair", "random_field", "smooth_field"]

TASKS = ("date", "sequence", "modality", "lesion")
"""The four breast tasks of the reference paper (moving image of another date, another
sequence, another modality, with a lesion)."""

TISSUES = ("air", "fat", "fgt", "skin", "muscle", "body", "lesion")
"""Tissue classes of the phantom's label maps (index = label value)."""

AIR, FAT, FGT, SKIN, MUSCLE, BODY, LESION = range(7)

# Mean intensity of each tissue (indexed as TISSUES) per contrast; the lesion enhances.
_T1 = np.array([0.0, 0.85, 0.40, 0.55, 0.30, 0.35, 1.15], np.float32)
_FAT_SUPPRESSED = np.array([0.0, 0.12, 0.65, 0.35, 0.40, 0.30, 0.65], np.float32)

_VOXEL_MM = (2.0, 2.0, 2.5)


def _spline_upsample(coarse: np.ndarray, shape) -> np.ndarray:
    """Separable cubic-spline interpolation of a coarse grid onto ``shape`` (end-aligned,
    float64): exactly ``map_coordinates(order=3, mode="mirror")``, far cheaper."""
    out = coarse
    # Cubic spline interpolation is separable and linear in the data: apply it axis by
    # axis as small matrices.
    for c, s in zip(coarse.shape, shape):
        coords = np.linspace(0, c - 1, s)[None]
        matrix = np.stack([ndimage.map_coordinates(np.eye(c)[i], coords, order=3,
                                                   mode="mirror") for i in range(c)], axis=1)
        out = np.tensordot(out, matrix, axes=([0], [1]))  # consumed axis goes last
    return out


def _smooth_noise(rng: np.random.Generator, shape, *, coarse) -> np.ndarray:
    """Smooth noise in [-1, 1]-ish: cubic interpolation of a coarse normal grid."""
    out = _spline_upsample(rng.standard_normal(coarse), shape)
    return (out / (np.abs(out).max() + 1e-12)).astype(np.float32)


def _sample(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    return ndimage.map_coordinates(volume, coords, order=1, mode="nearest")


class _Anatomy:
    """The procedural anatomy: tissue labels and texture at any voxel position."""

    def __init__(self, shape, rng: np.random.Generator):
        h, w, d = shape
        self.wall = 0.16 * w + rng.uniform(-1, 1)  # front of the chest-wall muscle
        self.muscle = 0.08 * w
        depth = w - self.wall - 5
        self.breasts = []
        for side in (0.28, 0.72):
            centre = np.array([side * h + rng.uniform(-2, 2), self.wall,
                               d / 2 + rng.uniform(-2, 2)])
            radii = np.array([0.19 * h, depth, 0.36 * d]) * rng.uniform(0.85, 1.0, 3)
            self.breasts.append((centre, radii))
        self.skin = 1.8  # skin thickness in voxels (about)
        coarse = tuple(max(3, s // 12) for s in shape)
        self.shape_noise = _smooth_noise(rng, shape, coarse=coarse)
        self.fgt_noise = _smooth_noise(rng, shape, coarse=tuple(max(4, s // 8) for s in shape))
        self.texture = _smooth_noise(rng, shape, coarse=tuple(max(4, s // 3) for s in shape))
        self.fgt_level = None

    def radius(self, coords: np.ndarray) -> np.ndarray:
        """Normalised ellipsoid radius of the nearest breast (1 on the skin surface)."""
        r = np.full(coords.shape[1:], np.inf, np.float32)
        for centre, radii in self.breasts:
            rel = (coords - centre[:, None, None, None]) / radii[:, None, None, None]
            r = np.minimum(r, np.sqrt(np.sum(rel * rel, axis=0)))
        return r * (1.0 + 0.05 * _sample(self.shape_noise, coords))

    def tissues(self, coords: np.ndarray) -> np.ndarray:
        """(3, H, W, D) voxel positions -> (H, W, D) uint8 tissue labels."""
        y = coords[1]
        r = self.radius(coords)
        labels = np.zeros(coords.shape[1:], np.uint8)
        labels[y < self.wall] = MUSCLE
        labels[y < self.wall - self.muscle] = BODY
        breast = (y >= self.wall) & (r <= 1.0)
        labels[breast] = FAT
        mean_radius = np.mean([b[1] for b in self.breasts])
        labels[breast & (r > 1.0 - self.skin / mean_radius)] = SKIN
        score = _sample(self.fgt_noise, coords) + 1.2 * (0.75 - r)
        if self.fgt_level is None:  # fixed on the undeformed grid: ~30 % of the breast
            inner = score[(labels == FAT)]
            self.fgt_level = float(np.quantile(inner, 0.7)) if inner.size else 0.0
        labels[(labels == FAT) & (score > self.fgt_level) & (r < 0.85)] = FGT
        return labels


def smooth_field(shape, *, max_disp: float, seed, coarse=None, sigma: float | None = None,
                 unit_channels: bool = False, max_derivative: float | None = 0.5) -> np.ndarray:
    """A seeded smooth random displacement ``(H, W, D, 3)`` float32, in voxels.

    The one generator of jaxreg's synthetic fields (the phantom's, :func:`random_field`,
    and the benchmarks' MNI pairs). ``rng = numpy.random.default_rng(seed)``; channel i
    (array axis i, in order 0, 1, 2) is drawn from it in turn as either

    * spline (``coarse`` given): ``rng.standard_normal(coarse)`` interpolated onto
      ``shape`` by a cubic spline (end-aligned, ``map_coordinates(order=3,
      mode="mirror")``), float64; with ``unit_channels`` each channel is then divided
      by its largest absolute value (+1e-12) and cast to float32 (the phantom's recipe);
    * Gaussian (``sigma`` given): ``scipy.ndimage.gaussian_filter(
      rng.standard_normal(shape), sigma)`` (float64, scipy's defaults: reflect mode,
      truncate 4).

    The three channels are scaled together so that the longest vector is ``max_disp``
    voxels; then, with ``max_derivative``, scaled down further where a partial
    derivative (``numpy.gradient``) would exceed it (0.5 keeps the map invertible with
    margin, no folding; ``None``: no such cap).

    Args:
      shape: grid (H, W, D).
      max_disp: longest displacement, voxels.
      seed: anything ``numpy.random.default_rng`` takes (an int, a list of ints).
      coarse: spline: the coarse normal grid's size per axis.
      sigma: Gaussian: the filter's width in voxels (give ``coarse`` or ``sigma``).
      unit_channels: spline only: each channel scaled to a largest value of 1, float32.
      max_derivative: largest partial derivative allowed, or None.
    """
    if (coarse is None) == (sigma is None):
        raise ValueError("smooth_field: give coarse (spline) or sigma (Gaussian), not both")
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    if sigma is not None:
        if unit_channels:
            raise ValueError("smooth_field: unit_channels is for the spline field only")
        channels = [ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
                    for _ in range(3)]
    elif unit_channels:
        channels = [_smooth_noise(rng, shape, coarse=tuple(coarse)) for _ in range(3)]
    else:
        channels = [_spline_upsample(rng.standard_normal(tuple(coarse)), shape)
                    for _ in range(3)]
    field = np.stack(channels, axis=-1)
    field *= max_disp / np.linalg.norm(field, axis=-1).max()
    if max_derivative is not None:
        grads = max(np.abs(np.gradient(field[..., i], axis=j)).max()
                    for i in range(3) for j in range(3))
        if grads > max_derivative:
            field *= max_derivative / grads
    return field.astype(np.float32)


def _phantom_field(seed, shape, *, amplitude: float) -> np.ndarray:
    """The phantom's field: a coarse grid every 16 voxels (at least 3), unit channels."""
    shape = tuple(int(s) for s in shape)
    return smooth_field(shape, max_disp=amplitude, seed=seed, unit_channels=True,
                        coarse=tuple(max(3, s // 16) for s in shape))


def random_field(shape: tuple[int, int, int], *, amplitude: float = 5.0,
                 seed: int = 0) -> np.ndarray:
    """A seeded smooth random displacement ``(H, W, D, 3)`` in voxels without folding.

    Cubic interpolation of a coarse normal grid, scaled to a largest displacement of
    ``amplitude`` voxels (less where that would make a derivative exceed 0.5):
    :func:`smooth_field` with the phantom's settings.
    """
    return _phantom_field([seed, 7], shape, amplitude=amplitude)


def _render(labels: np.ndarray, table: np.ndarray, texture: np.ndarray) -> np.ndarray:
    image = table[labels] * (1.0 + 0.06 * texture)
    return ndimage.gaussian_filter(image, 0.6)  # partial volume at tissue borders


def breast_pair(task: str, *, shape: tuple[int, int, int] = (112, 80, 48),
                seed: int = 0, amplitude: float = 5.0) -> dict:
    """A fixed/moving breast MRI pair with its ground-truth deformation.

    Args:
      task: one of :data:`TASKS`. ``"date"``: same T1-like contrast, smooth bias field and
        global intensity drift; ``"sequence"``: fat-suppressed moving image (fat dark, FGT
        bright); ``"modality"``: a nonlinear, partly inverted intensity remap with blur;
        ``"lesion"``: an enhancing lesion added in the moving image's FGT. All tasks
        deform the anatomy by the same smooth random field.
      shape: grid (H, W, D); axis 0 left-right, axis 1 posterior->anterior, axis 2
        inferior->superior.
      seed: the anatomy, field, noise and lesion are a deterministic function of it.
      amplitude: largest displacement in voxels (lowered if needed to avoid folding).

    Returns:
      A dict with ``fixed``, ``moving`` (float32 (H, W, D)); ``fixed_breast``,
      ``moving_breast``, ``fixed_fgt``, ``moving_fgt`` (uint8 0/1 masks);
      ``fixed_tissues``, ``moving_tissues`` (uint8 labels, see :data:`TISSUES`);
      ``moving_lesion`` (uint8 mask, empty unless the task is ``"lesion"``);
      ``true_field`` (float32 (H, W, D, 3) voxel displacement, pull convention on the
      fixed grid: ``moving(x + true_field(x))`` matches ``fixed(x)``); ``affine``
      ((4, 4) voxel -> RAS mm, 2 x 2 x 2.5 mm voxels, centred); ``task``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes of at least 8, got {shape}")
    anatomy = _Anatomy(shape, np.random.default_rng([seed, 0]))
    field = _phantom_field([seed, 1], shape, amplitude=amplitude)
    noise_rng = np.random.default_rng([seed, 2, TASKS.index(task)])

    grid = np.indices(shape, dtype=np.float32)
    moving_tissues = anatomy.tissues(grid)  # first: sets the FGT level, undeformed
    warped = grid + np.moveaxis(field, -1, 0)
    fixed_tissues = anatomy.tissues(warped)
    moving_lesion = np.zeros(shape, np.uint8)
    if task == "lesion":
        moving_lesion = _lesion(moving_tissues, np.random.default_rng([seed, 3]))
        moving_tissues = np.where(moving_lesion > 0, LESION, moving_tissues).astype(np.uint8)
    fixed, moving = _images(task, fixed_tissues, _sample(anatomy.texture, warped),
                            moving_tissues, anatomy.texture, noise_rng)
    return {
        "fixed": fixed.astype(np.float32),
        "moving": moving.astype(np.float32),
        "fixed_breast": _breast_mask(fixed_tissues),
        "moving_breast": _breast_mask(moving_tissues),
        "fixed_fgt": _fgt_mask(fixed_tissues),
        "moving_fgt": _fgt_mask(moving_tissues),
        "fixed_tissues": fixed_tissues,
        "moving_tissues": moving_tissues,
        "moving_lesion": moving_lesion,
        "true_field": field,
        "affine": _affine(shape),
        "task": task,
    }


def _images(task: str, fixed_tissues: np.ndarray, fixed_texture: np.ndarray,
            moving_tissues: np.ndarray, moving_texture: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The fixed (T1-like) and moving (the task's contrast) images of two tissue maps,
    each with a little positive noise from ``rng``."""
    fixed = _render(fixed_tissues, _T1, fixed_texture)
    moving = _moving_contrast(task, moving_tissues, moving_texture, rng)
    fixed = fixed + np.abs(rng.normal(0, 0.015, fixed.shape))
    moving = moving + np.abs(rng.normal(0, 0.015, moving.shape))
    return fixed, moving


def _moving_contrast(task: str, tissues: np.ndarray, texture: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """The moving image of ``task`` before noise: T1-like (fat-suppressed for
    ``"sequence"``), with a bias field and drift (``"date"``, drawn from ``rng``) or a
    nonlinear remap and blur (``"modality"``)."""
    table = _FAT_SUPPRESSED if task == "sequence" else _T1
    moving = _render(tissues, table, texture)
    if task == "date":
        bias = 1.0 + 0.15 * _smooth_noise(rng, tissues.shape, coarse=(3, 3, 3))
        moving = 1.1 * moving * bias
    elif task == "modality":
        body = ndimage.gaussian_filter((tissues != AIR).astype(np.float32), 0.6)
        moving = body * (0.15 + 0.8 * np.clip(1.0 - moving / 0.9, 0, 1) ** 1.5)
        moving = ndimage.gaussian_filter(moving, 1.0)  # lower resolution
    return moving


def _affine(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel -> RAS mm of the phantom's grid: 2 x 2 x 2.5 mm voxels, centred."""
    affine = np.diag(_VOXEL_MM + (1.0,))
    affine[:3, 3] = -0.5 * (np.array(shape) - 1) * np.array(_VOXEL_MM)
    return affine


def _breast_mask(tissues: np.ndarray) -> np.ndarray:
    """0/1 uint8: the breast (fat, FGT, skin, lesion)."""
    return np.isin(tissues, (FAT, FGT, SKIN, LESION)).astype(np.uint8)


def _fgt_mask(tissues: np.ndarray) -> np.ndarray:
    """0/1 uint8: fibroglandular tissue (the lesion included)."""
    return np.isin(tissues, (FGT, LESION)).astype(np.uint8)


def _lesion(tissues: np.ndarray, rng: np.random.Generator, radius: float = 3.0) -> np.ndarray:
    """A ball of ``radius`` voxels centred in a random deep FGT voxel."""
    deep = ndimage.binary_erosion(tissues == FGT, iterations=2)
    candidates = np.argwhere(deep if deep.any() else tissues == FGT)
    if not len(candidates):
        raise ValueError("phantom has no FGT to place a lesion in")
    centre = candidates[rng.integers(len(candidates))]
    grid = np.indices(tissues.shape).transpose(1, 2, 3, 0)
    ball = np.linalg.norm(grid - centre, axis=-1) <= radius
    return (ball & np.isin(tissues, (FGT, FAT))).astype(np.uint8)
