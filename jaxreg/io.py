"""Reading, checking, resampling and writing volumes (NIfTI and NRRD).

Every loader returns a :class:`Volume`: the voxel array and the 4x4 affine that maps
voxel indices to world millimetres in RAS+ (NIfTI's convention; NRRD files written in
LPS are converted). Anything wrong with an input file raises :class:`InputError`, whose
message names the file and the problem.

Displacement fields elsewhere in jaxreg are in voxels of the fixed image;
:func:`field_to_mm` and :func:`field_to_voxels` convert them through the affine.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Mapping

import nibabel as nib
import nrrd
import numpy as np
from scipy import ndimage

__all__ = [
    "InputError",
    "Volume",
    "load_volume",
    "load_labels",
    "save_volume",
    "resample_to",
    "same_grid",
    "field_to_mm",
    "field_to_voxels",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_NRRD_SUFFIXES = (".nrrd", ".nhdr")
# NRRD world spaces and the sign flips that take them to RAS.
_SPACE_TO_RAS = {
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}


class InputError(ValueError):
    """An input file that is missing, unreadable or unfit for registration."""


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


def _suffix(path: str) -> str:
    lower = path.lower()
    for suffix in _NIFTI_SUFFIXES[::-1] + _NRRD_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return ""


def _check_affine(affine: np.ndarray, path: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: affine is not a finite 4x4 matrix")
    det = np.linalg.det(affine[:3, :3])
    scale = np.prod(np.linalg.norm(affine[:3, :3], axis=0))
    if not scale > 0 or abs(det) < 1e-6 * scale:
        raise InputError(f"{path}: affine is not invertible (det of its 3x3 part is {det:g})")
    return affine


def _nrrd_affine(header: Mapping, spatial_axes: list[int], path: str) -> np.ndarray:
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _SPACE_TO_RAS:
        raise InputError(f"{path}: NRRD space {space!r} is not supported")
    directions = header.get("space directions")
    if directions is None:
        raise InputError(f"{path}: NRRD header has no 'space directions'")
    directions = np.asarray(directions, dtype=np.float64)[spatial_axes]
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # row i of 'space directions' is axis i's step
    affine[:3, 3] = origin
    return np.diag(_SPACE_TO_RAS[space] + (1.0,)) @ affine


def _read(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict, str]:
    """Reads a file into (data, affine, nrrd header or {}, path string), checks the axes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    suffix = _suffix(path)
    header: dict = {}
    try:
        if suffix in _NIFTI_SUFFIXES:
            image = nib.load(path)
            data = np.asanyarray(image.dataobj)
            affine = image.affine
        elif suffix in _NRRD_SUFFIXES:
            data, header = nrrd.read(path)
            affine = None
        else:
            raise InputError(f"{path}: unknown file type (expected .nii, .nii.gz, .nrrd or .nhdr)")
    except InputError:
        raise
    except Exception as err:  # nibabel/pynrrd/gzip raise many kinds for a bad file
        raise InputError(f"{path}: cannot read file ({type(err).__name__}: {err})") from err

    data = np.asarray(data)
    if header:
        # An NRRD may carry a non-spatial axis (e.g. Slicer's segment layers); it goes last.
        directions = header.get("space directions")
        if directions is None:
            raise InputError(f"{path}: NRRD header has no 'space directions'")
        spatial = [i for i, row in enumerate(np.asarray(directions, dtype=np.float64))
                   if np.all(np.isfinite(row))]
        if len(spatial) != 3:
            raise InputError(f"{path}: NRRD has {len(spatial)} spatial axes, expected 3")
        others = [i for i in range(data.ndim) if i not in spatial]
        data = np.transpose(data, spatial + others)
        affine = _nrrd_affine(header, spatial, path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3:
        raise InputError(f"{path}: volume is {data.ndim}D with shape {data.shape}, expected 3D")
    return data, _check_affine(affine, path), header, path


def load_volume(path: str | os.PathLike) -> Volume:
    """Reads a 3D image and checks that it can be registered.

    Args:
      path: a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr`` file.

    Returns:
      A :class:`Volume` with float32 data (scaling slopes applied) and a RAS+ affine.

    Raises:
      InputError: the file is missing or unreadable, the image is not 3D (a trailing
        singleton 4th axis is dropped), holds NaN or Inf voxels, is constant, or its
        affine is not invertible.
    """
    data, affine, _, path = _read(path)
    if data.ndim != 3:
        raise InputError(f"{path}: volume is {data.ndim}D with shape {data.shape}, expected 3D")
    try:
        data = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}: voxels of type {data.dtype} are not numbers") from err
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise InputError(f"{path}: {bad} voxels are NaN or Inf")
    if data.size == 0 or data.min() == data.max():
        raise InputError(f"{path}: image is constant (empty), nothing to register")
    return Volume(data=data, affine=affine, path=path)


def _segment_fields(header: Mapping) -> dict[int, dict[str, str]]:
    segments: dict[int, dict[str, str]] = {}
    for key, value in header.items():
        match = re.fullmatch(r"Segment(\d+)_(\w+)", str(key))
        if match:
            segments.setdefault(int(match.group(1)), {})[match.group(2)] = str(value)
    return dict(sorted(segments.items()))


def load_labels(path: str | os.PathLike) -> Volume:
    """Reads a label map; a 3D Slicer segmentation (``.seg.nrrd``) becomes one label map.

    A ``.seg.nrrd`` with ``SegmentN_*`` header fields is read either as a labelmap
    (3D, or 4D with one layer per overlapping group, using ``SegmentN_LabelValue`` and
    ``SegmentN_Layer``) or as a 4D one-hot stack (one layer per segment). Segment N then
    gets label ``SegmentN_LabelValue`` when those values are distinct, else ``N + 1``;
    where segments overlap the later one wins. Names are kept in ``segment_names``.

    Args:
      path: a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.seg.nrrd`` file.

    Returns:
      A :class:`Volume` with integer data (int16 or wider if needed; an empty map is
      allowed) and a RAS+ affine.

    Raises:
      InputError: the file is missing or unreadable, not 3D, holds NaN/Inf or
        non-integer values, or its affine is not invertible.
    """
    data, affine, header, path = _read(path)
    names: dict[int, str] = {}
    segments = _segment_fields(header)
    if segments:
        stack = data if data.ndim == 4 else data[..., None]
        one_hot = data.ndim == 4 and all("Layer" not in s for s in segments.values())
        values = [int(s.get("LabelValue", 1)) for s in segments.values()]
        distinct = len(set(values)) == len(values) and min(values) > 0
        out = np.zeros(stack.shape[:3], dtype=np.int16)
        for n, (index, fields) in enumerate(segments.items()):
            layer = n if one_hot else int(fields.get("Layer", 0))
            if layer >= stack.shape[3]:
                raise InputError(f"{path}: Segment{index} is in layer {layer}, "
                                 f"file has {stack.shape[3]}")
            mask = stack[..., layer] == (1 if one_hot else values[n])
            label = values[n] if distinct else n + 1
            out[mask] = label
            names[label] = fields.get("Name", f"Segment{index}")
        data = out
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


def _storage_dtype(data: np.ndarray) -> np.dtype:
    if data.dtype.kind in "biu":
        if data.size == 0:
            return np.dtype(np.uint8)
        low, high = int(data.min()), int(data.max())
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return np.dtype(dtype)
        raise ValueError(f"label values {low}..{high} do not fit int32")
    if data.dtype.kind == "f":
        return np.dtype(np.float32)
    raise ValueError(f"cannot save data of type {data.dtype}")


def save_volume(path: str | os.PathLike, data, affine: np.ndarray) -> None:
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

    Raises:
      ValueError: unknown file type, bad shape, non-invertible affine or unsupported dtype.
    """
    path = os.fspath(path)
    data = np.asarray(data)
    suffix = _suffix(path)
    if suffix not in _NIFTI_SUFFIXES + (".nrrd",):
        raise InputError(f"{path}: unknown file type (expected .nii, .nii.gz or .nrrd)")
    if not (data.ndim == 3 or (data.ndim == 4 and data.shape[3] == 3)):
        raise ValueError(f"{path}: data must be (H, W, D) or (H, W, D, 3), got {data.shape}")
    if suffix == ".nrrd" and data.ndim != 3:
        raise ValueError(f"{path}: only 3D volumes are written as NRRD")
    affine = _check_affine(affine, path)
    data = data.astype(_storage_dtype(data), copy=False)

    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                    suffix=suffix)
    os.close(handle)
    try:
        if suffix == ".nrrd":
            lps = np.diag(_SPACE_TO_RAS["lps"] + (1.0,)) @ affine
            header = {"space": "left-posterior-superior",
                      "space directions": lps[:3, :3].T,
                      "space origin": lps[:3, 3],
                      "kinds": ["domain"] * 3}
            nrrd.write(temp, data, header)
        else:
            image = nib.Nifti1Image(data, affine)
            image.header.set_xyzt_units("mm")
            image.set_sform(affine, code=1)
            image.set_qform(affine, code=1)
            if data.ndim == 4:
                image.header.set_intent("vector")
            nib.save(image, temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


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
