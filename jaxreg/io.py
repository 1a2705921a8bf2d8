"""Reading, checking, resampling and writing volumes (NIfTI and NRRD).

Every loader returns a :class:`Volume`: the voxel array and the 4x4 affine that maps
voxel indices to world millimetres in RAS+ (NIfTI's convention; NRRD files written in
LPS are converted). Anything wrong with an input file raises :class:`InputError`, whose
one-line message starts with the file's path and names the problem, e.g.
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

Displacement fields elsewhere in jaxreg are in voxels of the fixed image;
:func:`field_to_mm` and :func:`field_to_voxels` convert them through the affine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import math
import os
import re
import zlib
from collections.abc import Mapping

import nibabel as nib
import nrrd
import numpy as np
from nibabel.volumeutils import apply_read_scaling
from scipy import ndimage

from jaxreg import atomic

__all__ = [
    "InputError",
    "Volume",
    "MAX_VOXELS",
    "MIN_SIDE",
    "MIN_SPACING_MM",
    "MAX_SPACING_MM",
    "MAX_ABS_VALUE",
    "load_volume",
    "load_labels",
    "save_volume",
    "resample_to",
    "same_grid",
    "coverage",
    "field_to_mm",
    "field_to_voxels",
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

_MAX_VOXELS_ENV = "JAXREG_MAX_VOXELS"
_CHUNK = 1 << 24  # bytes per read while decompressing
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


def _voxel_limit(max_voxels: int | None) -> int:
    """The voxel limit: ``max_voxels`` if given, else $JAXREG_MAX_VOXELS, else MAX_VOXELS."""
    source = "max_voxels"
    if max_voxels is None:
        text = os.environ.get(_MAX_VOXELS_ENV, "").strip()
        if not text:
            return MAX_VOXELS
        source = _MAX_VOXELS_ENV
        try:
            max_voxels = int(text)
        except ValueError:
            raise ValueError(f"{source} must be a positive integer, got {text!r}") from None
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, (int, np.integer)) \
            or max_voxels < 1:
        raise ValueError(f"{source} must be a positive integer, got {max_voxels!r}")
    return int(max_voxels)


def _check_voxels(shape, limit: int, path: str) -> int:
    """Refuses a header's shape before anything is allocated for it; returns the voxels."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(f"{path}: header gives a negative size in shape {shape}")
    count = math.prod(shape)
    if count > limit:
        raise InputError(f"{path}: image has {count} voxels (shape {shape}), more than the "
                         f"limit of {limit}; to load it anyway pass max_voxels= or set the "
                         f"environment variable {_MAX_VOXELS_ENV}")
    return count


def _size_error(path: str, claim: int, holds: int, compressed: bool) -> InputError:
    unit = " once decompressed" if compressed else ""
    return InputError(f"{path}: file is truncated or its header is wrong: header claims "
                      f"{claim} bytes of data, file holds {holds}{unit}")


@contextlib.contextmanager
def _gzip_damage(path: str):
    """Reports a damaged or cut gzip stream as an InputError naming the file."""
    try:
        yield
    except EOFError as err:
        raise InputError(f"{path}: file is truncated (gzip stream ends before its end "
                         f"marker)") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{path}: file is corrupt (gzip: {err})") from err


def _gzip_isize(fh) -> int | None:
    """The gzip trailer's ISIZE (uncompressed size mod 2**32 of the last member)."""
    start = fh.tell()
    end = fh.seek(0, os.SEEK_END)
    isize = None
    if end - start >= 18:  # smallest gzip member: 10 header + 2 deflate + 8 trailer
        fh.seek(-4, os.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")
    fh.seek(start)
    return isize


def _read_stream(stream, *, want: int | None, prefix: bytes = b"", capacity: int,
                 drain: bool) -> tuple[np.ndarray, int]:
    """Reads up to ``want`` bytes (all if None) into a uint8 array, ``prefix`` first.

    The array starts at ``capacity`` bytes and doubles as data arrives, so memory
    follows the bytes present, not what a header claims. With ``drain`` the rest of
    the stream is read and dropped (for gzip: every member's CRC and length are checked).
    Returns the array (``min(want, total)`` bytes) and the total bytes in the stream.
    """
    limit = math.inf if want is None else want
    buf = np.empty(int(max(min(limit, capacity), len(prefix), 1)), np.uint8)
    filled = len(prefix)
    buf[:filled] = np.frombuffer(prefix, np.uint8)
    while filled < limit:
        if filled == buf.size:
            bigger = np.empty(int(min(limit, 2 * buf.size)), np.uint8)
            bigger[:filled] = buf[:filled]
            buf = bigger
        with memoryview(buf) as view:
            count = stream.readinto(view[filled:min(buf.size, filled + _CHUNK)])
        if not count:
            break
        filled += count
    total = filled
    while drain and (chunk := stream.read(_CHUNK)):
        total += len(chunk)
    kept = int(min(filled, limit))
    return buf[:kept], total


def _drain(stream) -> None:
    """Reads a stream to its end, dropping the bytes (gzip checks every CRC on the way)."""
    while stream.read(_CHUNK):
        pass


def _nifti_header(head: bytes, path: str):
    """Parses the fixed NIfTI-1 or NIfTI-2 header of a single-file ``.nii``."""
    for header_class in (nib.Nifti2Header, nib.Nifti1Header):
        if header_class.may_contain_header(head):
            header = header_class(head[:header_class.sizeof_hdr], check=True)
            if header["magic"].item() == header_class.single_magic:
                return header
    hint = "; the file is gzip-compressed, name it .nii.gz" if head[:2] == b"\x1f\x8b" else ""
    raise InputError(f"{path}: cannot read file (no single-file NIfTI-1 or NIfTI-2 header{hint})")


def _read_nifti(fh, path: str, *, compressed: bool, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads a ``.nii``/``.nii.gz`` from an open file: checked sizes, verified gzip."""
    size = os.fstat(fh.fileno()).st_size
    isize = _gzip_isize(fh) if compressed else None
    stream = gzip.GzipFile(fileobj=fh, mode="rb") if compressed else fh
    with _gzip_damage(path):
        head = stream.read(nib.Nifti2Header.sizeof_hdr)
        try:
            header = _nifti_header(head, path)
            shape = header.get_data_shape()
            dtype = header.get_data_dtype()
            offset = int(header.get_data_offset())
            slope, inter = header.get_slope_inter()
            affine = header.get_best_affine()
            count = math.prod(int(s) for s in shape)
            claim = offset + count * dtype.itemsize
        except Exception:
            if compressed:  # damaged bytes explain a garbled header: report those first
                _drain(stream)
            raise
        # The trailer's ISIZE (size mod 2**32) agreeing with the header is good evidence
        # that the header is intact. It is only evidence: a multi-member (bgzip) or
        # truncated file makes it disagree, so it steers work, never decides.
        hinted = compressed and isize is not None and claim % 2**32 == isize
        if compressed and not hinted and (count > limit or min(shape, default=0) < 0):
            _drain(stream)  # verify the stream before blaming a size that may be garbled
        _check_voxels(shape, limit, path)
        if compressed:
            buf, holds = _read_stream(stream, want=claim, prefix=head, drain=True,
                                      capacity=claim if hinted else _CHUNK)
        else:
            if size < claim:
                raise _size_error(path, claim, size, compressed=False)
            buf, holds = _read_stream(stream, want=claim, prefix=head, capacity=claim,
                                      drain=False)
    if buf.size < claim:
        raise _size_error(path, claim, holds, compressed)
    raw = buf[offset:claim].view(dtype).reshape(shape, order="F")
    # As nibabel's ArrayProxy: slope/intercept in the slope's precision (upcast if needed).
    slope = np.asanyarray(1.0 if slope is None else slope)
    inter = np.asanyarray(0.0 if inter is None else inter)
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    return apply_read_scaling(raw, slope, inter), affine


def _open(path: str, what: str = "file"):
    """Opens a regular file for reading; a missing, folder or unreadable path is refused."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a file")
    if not os.path.exists(path):
        raise InputError(f"{path}: {what} not found")
    if not os.path.isfile(path):
        raise InputError(f"{path}: is not a regular file")
    try:
        return open(path, "rb")
    except PermissionError as err:
        raise InputError(f"{path}: {what} is not readable (permission denied)") from err


def _read_nrrd(fh, path: str, *, limit: int) -> tuple[np.ndarray, dict]:
    """Reads a ``.nrrd``/``.nhdr``: header first, checked sizes, verified gzip data."""
    header = nrrd.read_header(fh)
    for field in ("type", "encoding", "sizes"):
        if field not in header:
            raise InputError(f"{path}: cannot read file (NRRD header has no {field!r} field)")
    sizes = [int(s) for s in np.atleast_1d(header["sizes"])]
    count = _check_voxels(sizes, limit, path)
    dtype = nrrd.reader._determine_datatype(header)  # pynrrd's type + endian -> numpy
    need = count * dtype.itemsize
    encoding = str(header["encoding"]).lower()
    line_skip = int(header.get("lineskip", header.get("line skip", 0)))
    byte_skip = int(header.get("byteskip", header.get("byte skip", 0)))
    data_name = header.get("datafile", header.get("data file"))
    if encoding not in ("raw", "gzip", "gz") or line_skip < 0 or byte_skip < -1:
        # Text or bzip2 (self-checking) data, or skips pynrrd refuses: leave it to pynrrd.
        return nrrd.read_data(header, fh, path), header

    with contextlib.ExitStack() as stack:
        source = fh
        if data_name is not None:
            data_path = os.path.join(os.path.dirname(path), str(data_name))
            try:
                source = stack.enter_context(_open(data_path, "data file"))
            except InputError as err:
                raise InputError(f"{path}: {err}") from None
        for _ in range(line_skip):
            source.readline()
        if encoding == "raw":
            if byte_skip >= 0:
                source.seek(byte_skip, os.SEEK_CUR)
            available = os.fstat(source.fileno()).st_size - source.tell()
            if available < need:
                claim = need + max(byte_skip, 0)
                raise _size_error(path, claim, available + max(byte_skip, 0), compressed=False)
            if byte_skip == -1:
                source.seek(-need, os.SEEK_END)
            buf, _ = _read_stream(source, want=need, capacity=need, drain=False)
            start = 0
        else:  # gzip; NRRD's byte skip applies after decompression
            want = None if byte_skip == -1 else byte_skip + need
            isize = _gzip_isize(source)
            hinted = want is not None and isize is not None and want % 2**32 == isize
            with _gzip_damage(path):
                buf, holds = _read_stream(gzip.GzipFile(fileobj=source, mode="rb"), want=want,
                                          capacity=want if hinted else _CHUNK, drain=True)
            start = buf.size - need if byte_skip == -1 else byte_skip
            if start < 0 or buf.size - start < need:
                raise _size_error(path, need + max(byte_skip, 0), holds, compressed=True)
    data = buf[start:start + need].view(dtype).reshape(sizes, order="F")
    return data, header


def _read(path: str | os.PathLike, *, max_voxels: int | None = None
          ) -> tuple[np.ndarray, np.ndarray, dict, str]:
    """Reads a file into (data, affine, nrrd header or {}, path string) and checks it.

    Checks shared by images and labels: the file itself (exists, is a readable file,
    complete and, if compressed, undamaged), the voxel limit, 3 spatial axes of at
    least MIN_SIDE voxels, an invertible affine with plausible spacing.
    """
    path = os.fspath(path)
    limit = _voxel_limit(max_voxels)
    suffix = _suffix(path)
    header: dict = {}
    with _open(path) as fh:
        if suffix not in _NIFTI_SUFFIXES + _NRRD_SUFFIXES:
            raise InputError(f"{path}: unknown file type (expected .nii, .nii.gz, .nrrd or .nhdr)")
        if os.fstat(fh.fileno()).st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes)")
        try:
            if suffix in _NIFTI_SUFFIXES:
                data, affine = _read_nifti(fh, path, compressed=suffix == ".nii.gz",
                                           limit=limit)
            else:
                data, header = _read_nrrd(fh, path, limit=limit)
                affine = None
        except InputError:
            raise
        except Exception as err:  # nibabel/pynrrd raise many kinds for a bad file
            raise InputError(f"{path}: cannot read file ({type(err).__name__}: {err})") from err

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
    if min(data.shape[:3]) < MIN_SIDE:
        raise InputError(f"{path}: volume has shape {data.shape}; needs at least {MIN_SIDE} "
                         f"voxels along each axis")
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
      path: a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr`` file.
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
        values beyond :data:`MAX_ABS_VALUE` in magnitude, or is constant.
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


def _segment_fields(header: Mapping) -> dict[int, dict[str, str]]:
    segments: dict[int, dict[str, str]] = {}
    for key, value in header.items():
        match = re.fullmatch(r"Segment(\d+)_(\w+)", str(key))
        if match:
            segments.setdefault(int(match.group(1)), {})[match.group(2)] = str(value)
    return dict(sorted(segments.items()))


def load_labels(path: str | os.PathLike, *, max_voxels: int | None = None) -> Volume:
    """Reads a label map; a 3D Slicer segmentation (``.seg.nrrd``) becomes one label map.

    A ``.seg.nrrd`` with ``SegmentN_*`` header fields is read either as a labelmap
    (3D, or 4D with one layer per overlapping group, using ``SegmentN_LabelValue`` and
    ``SegmentN_Layer``) or as a 4D one-hot stack (one layer per segment). Segment N then
    gets label ``SegmentN_LabelValue`` when those values are distinct, else ``N + 1``;
    where segments overlap the later one wins. Names are kept in ``segment_names``.

    Args:
      path: a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.seg.nrrd`` file.
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

    with atomic.atomic_path(path, suffix=suffix) as temp:
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
