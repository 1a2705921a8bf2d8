"""The verified file-reading layer under :mod:`jaxreg.io` (private; use jaxreg.io).

``read_file(path, limit)`` turns a ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.nhdr`` into a
voxel array and a RAS+ affine, trusting nothing it has not checked: compressed data are
read to the end of the stream (every gzip member's CRC-32 and length verified) before
the voxels are used; the size a header claims is compared with what the file holds,
and buffers grow only with the bytes present; a header's voxel count above ``limit``
is refused before anything is allocated. A DICOM series (a folder, or a file of it:
``is_dicom``) is handed to jaxreg.io.dicom, which reads it with SimpleITK.
``merge_segments`` decodes a 3D Slicer ``.seg.nrrd`` into one label map. Anything wrong
raises :class:`InputError` (one line, starting with the path). The plausibility checks
on what was read (3D, sides, spacing, values) are in jaxreg.io beside their public
constants; this module must not import jaxreg.io, which imports it.
"""

from __future__ import annotations

import contextlib
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

MAX_VOXELS_ENV = "JAXREG_MAX_VOXELS"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
# NRRD world spaces and the sign flips that take them to RAS.
SPACE_TO_RAS = {
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}
_CHUNK = 1 << 24  # bytes per read while decompressing


class InputError(ValueError):
    """An input file that is missing, unreadable or unfit for registration."""


# Public as jaxreg.io.InputError (the same class): name it so in reprs and tracebacks.
InputError.__module__ = "jaxreg.io"


def suffix(path: str) -> str:
    """The file type suffix jaxreg knows (``.nii.gz`` before ``.nii``), or ``""``."""
    lower = path.lower()
    for known in NIFTI_SUFFIXES[::-1] + NRRD_SUFFIXES:
        if lower.endswith(known):
            return known
    return ""


def is_dicom(path: str) -> bool:
    """Whether ``path`` is read as DICOM: a folder (of one series), a ``.dcm`` file, or a
    file of no known suffix whose bytes 128:132 are ``DICM`` (the DICOM preamble)."""
    if os.path.isdir(path) or path.lower().endswith(".dcm"):
        return True
    if suffix(path):
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def voxel_limit(max_voxels: int | None, default: int) -> int:
    """The voxel limit: ``max_voxels`` if given, else $JAXREG_MAX_VOXELS, else ``default``."""
    source = "max_voxels"
    if max_voxels is None:
        text = os.environ.get(MAX_VOXELS_ENV, "").strip()
        if not text:
            return default
        source = MAX_VOXELS_ENV
        try:
            max_voxels = int(text)
        except ValueError:
            raise ValueError(f"{source} must be a positive integer, got {text!r}") from None
    if isinstance(max_voxels, bool) or not isinstance(max_voxels, (int, np.integer)) \
            or max_voxels < 1:
        raise ValueError(f"{source} must be a positive integer, got {max_voxels!r}")
    return int(max_voxels)


def check_voxels(shape, limit: int, path: str) -> int:
    """Refuses a header's shape before anything is allocated for it; returns the voxels."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise InputError(f"{path}: header gives a negative size in shape {shape}")
    count = math.prod(shape)
    if count > limit:
        raise InputError(f"{path}: image has {count} voxels (shape {shape}), more than the "
                         f"limit of {limit}; to load it anyway pass max_voxels= or set the "
                         f"environment variable {MAX_VOXELS_ENV}")
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


def _scaled(raw: np.ndarray, slope, inter) -> np.ndarray:
    """As nibabel's ArrayProxy: slope/intercept in the slope's precision (upcast if needed)."""
    slope = np.asanyarray(1.0 if slope is None else slope)
    inter = np.asanyarray(0.0 if inter is None else inter)
    if np.can_cast(inter, slope.dtype):
        inter = inter.astype(slope.dtype)
    return apply_read_scaling(raw, slope, inter)


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
        check_voxels(shape, limit, path)
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
    return _scaled(raw, slope, inter), affine


def open_file(path: str, what: str = "file"):
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


def _nrrd_payload(source, path: str, *, encoding: str, byte_skip: int,
                  need: int) -> tuple[np.ndarray, int]:
    """Reads an NRRD's raw or gzip data from ``source`` (at its start, lines skipped).

    Returns the bytes read and where the ``need`` bytes of voxels start in them.
    """
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
        return buf, 0
    # gzip; NRRD's byte skip applies after decompression
    want = None if byte_skip == -1 else byte_skip + need
    isize = _gzip_isize(source)
    hinted = want is not None and isize is not None and want % 2**32 == isize
    with _gzip_damage(path):
        buf, holds = _read_stream(gzip.GzipFile(fileobj=source, mode="rb"), want=want,
                                  capacity=want if hinted else _CHUNK, drain=True)
    start = buf.size - need if byte_skip == -1 else byte_skip
    if start < 0 or buf.size - start < need:
        raise _size_error(path, need + max(byte_skip, 0), holds, compressed=True)
    return buf, start


def _read_nrrd(fh, path: str, *, limit: int) -> tuple[np.ndarray, dict]:
    """Reads a ``.nrrd``/``.nhdr``: header first, checked sizes, verified gzip data."""
    header = nrrd.read_header(fh)
    for field in ("type", "encoding", "sizes"):
        if field not in header:
            raise InputError(f"{path}: cannot read file (NRRD header has no {field!r} field)")
    sizes = [int(s) for s in np.atleast_1d(header["sizes"])]
    count = check_voxels(sizes, limit, path)
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
                source = stack.enter_context(open_file(data_path, "data file"))
            except InputError as err:
                raise InputError(f"{path}: {err}") from None
        for _ in range(line_skip):
            source.readline()
        buf, start = _nrrd_payload(source, path, encoding=encoding, byte_skip=byte_skip,
                                   need=need)
    data = buf[start:start + need].view(dtype).reshape(sizes, order="F")
    return data, header


def _nrrd_affine(header: Mapping, spatial_axes: list[int], path: str) -> np.ndarray:
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in SPACE_TO_RAS:
        raise InputError(f"{path}: NRRD space {space!r} is not supported")
    directions = header.get("space directions")
    if directions is None:
        raise InputError(f"{path}: NRRD header has no 'space directions'")
    directions = np.asarray(directions, dtype=np.float64)[spatial_axes]
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # row i of 'space directions' is axis i's step
    affine[:3, 3] = origin
    return np.diag(SPACE_TO_RAS[space] + (1.0,)) @ affine


def _nrrd_spatial(data: np.ndarray, header: Mapping, path: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Puts an NRRD's 3 spatial axes first (a non-spatial one, e.g. Slicer's segment
    layers, goes last) and gives their RAS+ affine."""
    directions = header.get("space directions")
    if directions is None:
        raise InputError(f"{path}: NRRD header has no 'space directions'")
    spatial = [i for i, row in enumerate(np.asarray(directions, dtype=np.float64))
               if np.all(np.isfinite(row))]
    if len(spatial) != 3:
        raise InputError(f"{path}: NRRD has {len(spatial)} spatial axes, expected 3")
    others = [i for i in range(data.ndim) if i not in spatial]
    data = np.transpose(data, spatial + others)
    return data, _nrrd_affine(header, spatial, path)


def read_file(path: str, limit: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Reads a volume file into (data, affine, NRRD header or {}), verified as above.

    The file must exist, be a readable regular file of a known type, not be empty,
    hold no more than ``limit`` voxels and be complete and undamaged. The affine is the
    NIfTI's best affine or the NRRD's, converted to RAS+, with the NRRD's spatial axes
    first; it is not yet checked (see jaxreg.io). A DICOM folder or file (:func:`is_dicom`)
    is read as a series by jaxreg.io.dicom.read_series (SimpleITK's geometry, in RAS+).
    """
    kind = suffix(path)
    header: dict = {}
    if is_dicom(path):
        if not os.path.isdir(path):
            open_file(path).close()  # missing or unreadable: the same messages as any file
        from jaxreg.io import dicom as _dicom  # imports SimpleITK only when DICOM is read

        data, affine = _dicom.read_series(path, limit)
        return data, affine, header
    with open_file(path) as fh:
        if kind not in NIFTI_SUFFIXES + NRRD_SUFFIXES:
            raise InputError(f"{path}: unknown file type (expected .nii, .nii.gz, .nrrd, "
                             f".nhdr, a DICOM file (.dcm) or a folder of one DICOM series)")
        if os.fstat(fh.fileno()).st_size == 0:
            raise InputError(f"{path}: file is empty (0 bytes)")
        try:
            if kind in NIFTI_SUFFIXES:
                data, affine = _read_nifti(fh, path, compressed=kind == ".nii.gz",
                                           limit=limit)
            else:
                data, header = _read_nrrd(fh, path, limit=limit)
                affine = None
        except InputError:
            raise
        except Exception as err:  # nibabel/pynrrd raise many kinds for a bad file
            raise InputError(f"{path}: cannot read file ({type(err).__name__}: {err})") from err
    if header:
        data, affine = _nrrd_spatial(data, header, path)
    return data, affine, header


def _segment_fields(header: Mapping) -> dict[int, dict[str, str]]:
    segments: dict[int, dict[str, str]] = {}
    for key, value in header.items():
        match = re.fullmatch(r"Segment(\d+)_(\w+)", str(key))
        if match:
            segments.setdefault(int(match.group(1)), {})[match.group(2)] = str(value)
    return dict(sorted(segments.items()))


def merge_segments(data: np.ndarray, header: Mapping, path: str
                   ) -> tuple[np.ndarray, dict[int, str]]:
    """A 3D Slicer segmentation (``SegmentN_*`` header fields) as one int16 label map.

    Returns the label map and label value -> segment name; ``data`` unchanged and no
    names when the header has no segment fields. The rules are in jaxreg.io.load_labels.
    """
    names: dict[int, str] = {}
    segments = _segment_fields(header)
    if not segments:
        return data, names
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
    return out, names
