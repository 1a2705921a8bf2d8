"""Reading, checking, resampling and writing volumes (NIfTI, NRRD; DICOM series in).

Every loader returns a :class:`Volume`: the voxel array and the 4x4 affine that maps
voxel indices to world millimetres in RAS+ (NIfTI's convention; NRRD files written in
LPS are converted).

Wherever a volume path is accepted, a DICOM series may be given instead: a folder
holding one series (files of any or no extension), or one file of it (``.dcm``, or any
file with the ``DICM`` preamble), whose series (same SeriesInstanceUID) in the same
folder is read. It is read with SimpleITK (``pip install SimpleITK``), whose
``ImageSeriesReader`` (GDCM) sorts the slices along their normal and gives the
geometry and the rescaled values; the voxel axes are (column, row, slice) and the LPS
geometry becomes RAS+. Before any pixel is read, every slice's position and orientation
are checked: several series in the folder, mixed orientations, missing, repeated or
unevenly spaced slices and gantry tilt are refused (ITK would build a volume with the
wrong geometry from them), as are multi-frame and colour images.

Anything wrong with an input file raises :class:`InputError`, whose one-line message
starts with the file's path and names the problem, e.g.
``/x/a.nii.gz: file is corrupt (gzip: CRC check failed ...)``.

Loading verifies before it trusts:

* Compressed data (``.nii.gz``, gzip-encoded NRRD) is decompressed once and checked to
  the end of the stream (every member's CRC-32 and length), so damaged bytes are
  reported as a corrupt or truncated file instead of loading as wrong voxels.
* The size the header claims (voxels x bytes per voxel + data offset) is compared with
  what the file holds before the voxels are used, and memory grows only with the data
  actually present, so a small file with a lying header fails fast.
* Plausibility limits, all module constants:

  - :data:`MAX_VOXELS` (``2**30``, about 1.07e9 voxels, 4 GiB as float32): the most
    voxels (all axes) a file may hold. Raise it per call with ``max_voxels=`` or for
    the process with the environment variable ``JAXREG_MAX_VOXELS``.
  - :data:`MIN_SIDE` (4): every spatial axis needs at least this many voxels; a side one
    voxel thick is a 2D image, not a volume.
  - :data:`MIN_SPACING_MM`, :data:`MAX_SPACING_MM` (1e-3 and 1e3 mm): the plausible
    range of voxel spacing (column norms of the affine's 3x3 part).
  - :data:`MAX_ABS_VALUE` (1e9): the largest plausible image voxel magnitude, after
    scaling. CT is about -1024..3071 HU (raw uint16 at most 65535), MRI and PET
    (Bq/ml) stay below about 1e7; only a broken header or scaling factor gets near
    1e9. Label maps are not held to it.

Displacement fields (:func:`load_field`) are in voxels of the fixed image;
:func:`field_to_mm` and :func:`field_to_voxels` convert them through the affine.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from jaxreg.io import atomic
from jaxreg.io import reading as _reading
from jaxreg.io import writing as _writing
from jaxreg.io.reading import InputError

__all__ = [
    "InputError", "Volume",
    "MAX_VOXELS", "MIN_SIDE", "MIN_SPACING_MM", "MAX_SPACING_MM", "MAX_ABS_VALUE",
    "load_volume", "load_labels", "load_field", "save_volume",
    "resample_to", "same_grid", "coverage", "field_to_mm", "field_to_voxels",
]

MAX_VOXELS = 2**30
"""Default limit on the voxels of a file; see ``max_voxels`` and ``JAXREG_MAX_VOXELS``."""
MIN_SIDE = 4
"""Fewest voxels along each spatial axis of a volume."""
MIN_SPACING_MM = 1e-3
"""Smallest plausible voxel spacing, millimetres."""
MAX_SPACING_MM = 1e3
"""Largest plausible voxel spacing, millimetres."""
MAX_ABS_VALUE = 1e9
"""Largest plausible magnitude of an image voxel (after scaling); not applied to labels."""


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array on a voxel grid placed in the world.

    Attributes:
      data: the voxels, (H, W, D); float32 for images, an integer type for labels.
      affine: (4, 4) float64, voxel index -> world millimetres, RAS+.
      path: the file it came from, or None.
      segment_names: label value -> segment name (label maps read from a ``.seg.nrrd``),
        empty otherwise.
    """

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None
    segment_names: Mapping[int, str] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in millimetres along each array axis (column norms of the affine)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def _check_affine(affine: np.ndarray, path: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: affine is not a finite 4x4 matrix")
    det = np.linalg.det(affine[:3, :3])
    scale = np.prod(np.linalg.norm(affine[:3, :3], axis=0))
    if not scale > 0 or abs(det) < 1e-6 * scale:
        raise InputError(f"{path}: affine is not invertible (det of its 3x3 part is {det:g})")
    return affine


def _read(path: str | os.PathLike, *, max_voxels: int | None = None
          ) -> tuple[np.ndarray, np.ndarray, dict, str]:
    """Reads a file into (data, affine, nrrd header or {}, path string) and checks it.

    Checks shared by images and labels: the file itself (exists, is a readable file,
    complete and, if compressed, undamaged), the voxel limit, 3 spatial axes of at
    least MIN_SIDE voxels, an invertible affine with plausible spacing.
    """
    path = os.fspath(path)
    # MAX_VOXELS is looked up here, at call time, so that changing it takes effect.
    limit = _reading.voxel_limit(max_voxels, MAX_VOXELS)
    data, affine, header = _reading.read_file(path, limit)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3:
        raise InputError(f"{path}: volume is {data.ndim}D with shape {data.shape}, expected 3D")
    if min(data.shape[:3]) < MIN_SIDE:
        slices = (f" ({data.shape[2]} slice{'s' * (data.shape[2] != 1)} in the DICOM series)"
                  if _reading.is_dicom(path) else "")
        raise InputError(f"{path}: volume has shape {data.shape}{slices}; needs at least "
                         f"{MIN_SIDE} voxels along each axis")
    affine = _check_affine(affine, path)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all((spacing >= MIN_SPACING_MM) & (spacing <= MAX_SPACING_MM)):
        shown = ", ".join(f"{s:.3g}" for s in spacing)
        raise InputError(f"{path}: voxel spacing ({shown}) mm is implausible; each must be "
                         f"between {MIN_SPACING_MM:g} and {MAX_SPACING_MM:g} mm")
    return data, affine, header, path


def load_volume(path: str | os.PathLike, *, max_voxels: int | None = None) -> Volume:
    """Reads a 3D image and checks that it can be registered.

    Args:
      path: a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr`` file, or a DICOM series: a
        folder of one series or one file of it (``.dcm`` or with the ``DICM``
        preamble; its series in its folder is read). The DICOM geometry (orientation,
        spacing, slice order) is SimpleITK's ``ImageSeriesReader``'s, converted from LPS
        to RAS+, with the axes (column, row, slice); see the module docstring.
      max_voxels: the most voxels the file may hold; None means the environment
        variable ``JAXREG_MAX_VOXELS`` if set, else :data:`MAX_VOXELS` (``2**30``).

    Returns:
      A :class:`Volume` with float32 data (scaling slopes applied) and a RAS+ affine.

    Raises:
      InputError: the path is missing, a folder or unreadable; the file is corrupt or
        truncated (compressed data are checked to the end), its header claims more data
        than the file holds or more than ``max_voxels`` voxels; the image is not 3D (a
        trailing singleton 4th axis is dropped) or has a side shorter than
        :data:`MIN_SIDE` voxels; its affine is not invertible or its spacing is outside
        :data:`MIN_SPACING_MM`..:data:`MAX_SPACING_MM`; it holds NaN or Inf voxels or
        values beyond :data:`MAX_ABS_VALUE` in magnitude, or is constant. For DICOM: no
        series or several in the folder, fewer than :data:`MIN_SIDE` slices, unreadable
        files, mixed orientations, missing or unevenly spaced slices, multi-frame or
        colour images, or SimpleITK not installed.
      ValueError: ``max_voxels`` or ``JAXREG_MAX_VOXELS`` is not a positive integer.
    """
    data, affine, _, path = _read(path, max_voxels=max_voxels)
    if data.ndim != 3:
        raise InputError(f"{path}: volume is {data.ndim}D with shape {data.shape}, expected 3D")
    try:
        data = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: voxels of type {data.dtype} are not numbers") from err
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or Inf")
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if low == high:
        raise InputError(f"{path}: image is constant (empty), nothing to register")
    peak = max(-low, high)
    if peak > MAX_ABS_VALUE:
        raise InputError(f"{path}: voxel values reach {peak:.3g} in magnitude, implausible for "
                         f"an image (limit {MAX_ABS_VALUE:.3g}; broken header or scaling?)")
    return Volume(data=data, affine=affine, path=path)


def load_field(path: str | os.PathLike, *, max_voxels: int | None = None) -> np.ndarray:
    """Reads a voxel displacement field, verified like every volume (see the module).

    Returns:
      ``(H, W, D, 3)`` float32, from a 4D file or ITK's 5D ``(H, W, D, 1, 3)``.

    Raises:
      InputError: as :func:`load_volume` for the file, or not 3 finite values a voxel.
    """
    data, _, _, path = _read(path, max_voxels=max_voxels)
    data = np.asarray(data, np.float32).reshape(data.shape[:3] + (-1,))
    if data.shape[-1] != 3 or not np.all(np.isfinite(data)):
        raise InputError(f"{path}: a field must be (H, W, D, 3) and finite, got {data.shape}")
    return data


def load_labels(path: str | os.PathLike, *, max_voxels: int | None = None) -> Volume:
    """Reads a label map; a 3D Slicer segmentation (``.seg.nrrd``) becomes one label map.

    A ``.seg.nrrd`` with ``SegmentN_*`` header fields is read either as a labelmap
    (3D, or 4D with one layer per overlapping group, using ``SegmentN_LabelValue`` and
    ``SegmentN_Layer``) or as a 4D one-hot stack (one layer per segment). Segment N then
    gets label ``SegmentN_LabelValue`` when those values are distinct, else ``N + 1``;
    where segments overlap the later one wins. Names are kept in ``segment_names``.

    Args:
      path: a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.seg.nrrd`` file, or a DICOM series
        (folder or file) as in :func:`load_volume`.
      max_voxels: the most voxels the file may hold (all layers of a ``.seg.nrrd``
        counted); None means ``JAXREG_MAX_VOXELS`` if set, else :data:`MAX_VOXELS`.

    Returns:
      A :class:`Volume` with integer data (int16 or wider if needed; an empty map is
      allowed) and a RAS+ affine.

    Raises:
      InputError: the file fails the same file, size, shape (3D, sides of at least
        :data:`MIN_SIDE`) and geometry checks as in :func:`load_volume`, or holds
        NaN/Inf or non-integer values (label values have no magnitude bound).
      ValueError: ``max_voxels`` or ``JAXREG_MAX_VOXELS`` is not a positive integer.
    """
    data, affine, header, path = _read(path, max_voxels=max_voxels)
    data, names = _reading.merge_segments(data, header, path)
    if data.ndim != 3:
        raise InputError(f"{path}: label map is {data.ndim}D with shape {data.shape}, expected 3D")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise InputError(f"{path}: label map holds NaN or Inf")
        if not np.array_equal(data, np.round(data)):
            raise InputError(f"{path}: label map holds non-integer values")
    elif data.dtype.kind not in "biu":
        raise InputError(f"{path}: voxels of type {data.dtype} are not labels")
    data = np.asarray(data)
    fits16 = data.size == 0 or (data.min() >= -32768 and data.max() <= 32767)
    dtype = np.int16 if fits16 else np.int32
    return Volume(data=data.astype(dtype), affine=affine, path=path, segment_names=names)


def resample_to(volume: Volume, shape: tuple[int, int, int], affine: np.ndarray, *,
                order: int = 1) -> Volume:
    """Resamples a volume onto another voxel grid through the two affines.

    Target voxel j takes the value of the source at ``inv(volume.affine) @ affine @ j``;
    outside the source the value is 0. Use ``order=1`` (trilinear) for images and
    ``order=0`` (nearest) for labels, whose dtype is kept.

    Args:
      volume: the source volume.
      shape: the target grid's shape (H, W, D).
      affine: the target grid's (4, 4) voxel -> world affine.
      order: spline order, 0 or 1.

    Returns:
      A :class:`Volume` with the target shape and affine (same path and segment names).
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    affine = _check_affine(affine, "target grid")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must have 3 entries, got {shape}")
    matrix = np.linalg.inv(volume.affine) @ affine
    # Snap round-off so that identical or axis-swapped grids sample voxel centres exactly.
    matrix = np.where(np.abs(matrix - np.round(matrix)) < 1e-9, np.round(matrix), matrix)
    dtype = volume.data.dtype if order == 0 else np.float32
    data = ndimage.affine_transform(volume.data, matrix, output_shape=shape, order=order,
                                    mode="constant", cval=0, output=dtype)
    return dataclasses.replace(volume, data=data, affine=affine)


def same_grid(a: Volume, b: Volume, *, atol: float = 1e-3) -> bool:
    """Whether two volumes share shape and affine (to ``atol`` mm)."""
    return a.shape[:3] == b.shape[:3] and bool(np.allclose(a.affine, b.affine, atol=atol, rtol=0))


def coverage(volume: Volume, shape: tuple[int, int, int], affine: np.ndarray, *,
             step: int = 4) -> float:
    """Fraction of a target grid's voxels that lie inside a volume's grid.

    Target voxel j is covered when ``inv(volume.affine) @ affine @ j`` falls within the
    source's voxel centres, index 0 to n - 1 along every axis: where :func:`resample_to`
    returns source values rather than its zero fill. Use it to notice a label map that
    covers only part of its image. Every ``step``-th target voxel along each axis is
    tested (a lattice centred in the grid), which is exact to about ``step`` voxels at
    the edges of the overlap and cheap for any grid size.

    Args:
      volume: the source volume (its shape and affine are used, not its data).
      shape: the target grid's shape (H, W, D).
      affine: the target grid's (4, 4) voxel -> world affine.
      step: lattice spacing in target voxels; 1 tests every voxel.

    Returns:
      The covered fraction, between 0.0 and 1.0.
    """
    affine = _check_affine(affine, "target grid")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive sizes, got {shape}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}")
    matrix = np.linalg.inv(_check_affine(volume.affine, "volume")) @ affine
    lattice = [np.arange((n - 1) % step // 2, n, step, dtype=np.float64) for n in shape]
    top = np.asarray(volume.shape[:3], np.float64)[:, None, None] - 1
    tolerance = 1e-6  # voxels; resample_to snaps round-off of this order
    covered = 0
    for i in lattice[0]:  # one plane of the lattice at a time keeps memory small
        index = (matrix[:3, 0, None, None] * i + matrix[:3, 3, None, None]
                 + matrix[:3, 1, None, None] * lattice[1][None, :, None]
                 + matrix[:3, 2, None, None] * lattice[2][None, None, :])
        inside = (index >= -tolerance) & (index <= top + tolerance)
        covered += int(np.count_nonzero(np.all(inside, axis=0)))
    return covered / math.prod(len(axis) for axis in lattice)


def save_volume(path: str | os.PathLike, data, affine: np.ndarray, *,
                compresslevel: int | None = None) -> None:
    """Writes a volume or displacement field atomically (all or nothing).

    The file is written to a temporary name in the same folder and then moved over
    ``path`` with ``os.replace``; on any failure the temporary file is removed and an
    existing ``path`` is left untouched. Integer/bool data (labels) are stored as the
    smallest of uint8, int16, int32 that fits; float data as float32. An (H, W, D, 3)
    field is stored as a 4D NIfTI with intent ``vector``.

    Args:
      path: ``.nii``/``.nii.gz`` (NIfTI, RAS) or ``.nrrd`` (3D only, written in LPS).
      data: the array (numpy or jax), (H, W, D) or (H, W, D, 3).
      affine: (4, 4) voxel -> world (RAS+) affine.
      compresslevel: zlib level 0-9 of a ``.nii.gz`` (``None``: nibabel's default, 1).
        Level 0 still writes a valid ``.nii.gz`` (stored blocks): worth it for float
        displacement fields, which zlib shrinks by ~8 % at ~3 s per 95 MB field.

    Raises:
      ValueError: unknown file type, bad shape, non-invertible affine or unsupported dtype.
    """
    path = os.fspath(path)
    data = np.asarray(data)
    suffix = _reading.suffix(path)
    if suffix not in _reading.NIFTI_SUFFIXES + (".nrrd",):
        raise InputError(f"{path}: unknown file type (expected .nii, .nii.gz or .nrrd)")
    if not (data.ndim == 3 or (data.ndim == 4 and data.shape[3] == 3)):
        raise ValueError(f"{path}: data must be (H, W, D) or (H, W, D, 3), got {data.shape}")
    if suffix == ".nrrd" and data.ndim != 3:
        raise ValueError(f"{path}: only 3D volumes are written as NRRD")
    affine = _check_affine(affine, path)
    data = data.astype(_writing.storage_dtype(data), copy=False)

    with atomic.atomic_path(path, suffix=suffix) as temp:
        if suffix == ".nrrd":
            _writing.write_nrrd(temp, data, affine)
        else:
            _writing.write_nifti(temp, data, affine, compresslevel=compresslevel,
                                 gz=suffix == ".nii.gz")


def field_to_mm(disp, affine: np.ndarray):
    """Converts a voxel displacement field to world millimetres (RAS+).

    Each vector is multiplied by the affine's 3x3 linear part, so spacing, axis flips and
    rotations are accounted for.

    Args:
      disp: (..., 3) displacements in voxels, component i along array axis i (numpy or jax).
      affine: (4, 4) voxel -> world affine of the grid the field lives on.

    Returns:
      (..., 3) float32 displacements in millimetres along world x, y, z.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return disp @ linear.T.astype(np.float32)


def field_to_voxels(disp_mm, affine: np.ndarray):
    """Inverse of :func:`field_to_mm`: world millimetres -> voxel displacements.

    Args:
      disp_mm: (..., 3) displacements in millimetres (world x, y, z; numpy or jax).
      affine: (4, 4) voxel -> world affine of the grid the field lives on.

    Returns:
      (..., 3) float32 displacements in voxels along the array axes.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return disp_mm @ np.linalg.inv(linear).T.astype(np.float32)
