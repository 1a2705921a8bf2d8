"""DICOM series for jaxreg.io (private; use jaxreg.io.load_volume), read with SimpleITK.

``read_series(path, limit)`` reads the one DICOM series in a folder, or the series of a
single DICOM file (its SeriesInstanceUID in its folder). GDCM, through SimpleITK's
``ImageSeriesReader``, finds the series and sorts its slices along their normal; ITK
builds the geometry and applies RescaleSlope/RescaleIntercept. Conventions:

* ``sitk.GetArrayFromImage`` is (z, y, x); the data are returned as (x, y, z) = (i, j, k):
  i along a row (columns), j down the columns (rows), k across slices.
* SimpleITK's world is LPS: ``world = origin + direction @ diag(spacing) @ (i, j, k)``;
  the affine returned is RAS+, ``diag(-1, -1, 1, 1)`` times that.

ITK only warns (and then spaces the slices evenly between the first and the last) when
slices are missing or irregular, and takes the first slice's orientation for all, so
each slice's own position and orientation (read from its header first, before any
pixels) are checked here: a volume built from such slices has the wrong geometry.
Anything wrong raises :class:`jaxreg.io.reading.InputError` (one line, starting with the
path). SimpleITK is imported only when DICOM is read.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from jaxreg.io.reading import InputError, check_voxels, is_dicom

TOLERANCE = 0.05
"""Most a slice may lie off the regular grid, as a fraction of the slice step.

Rounded positions in headers are off by far less; a missing slice by about half a step.
"""
ORIENTATION_TOLERANCE = 1e-3
"""Most the direction cosines of two slices of a series may differ."""
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_IO = "GDCMImageIO"


def _simpleitk(path: str):
    try:
        import SimpleITK
    except ImportError:
        raise InputError(f"{path}: reading DICOM needs SimpleITK: pip install SimpleITK") from None
    return SimpleITK


@contextlib.contextmanager
def _quiet(sitk):
    """ITK's warnings off (its non-uniform sampling warning is an error here)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _reason(err: Exception) -> str:
    """The last line of an ITK exception (the others name C++ source files)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__).replace("sitk::ERROR: ", "")[:300]


def _header(sitk, name: str, path: str):
    """An ImageFileReader holding one file's header (no pixels read)."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IO)
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        where = "" if name == path else f" {os.path.basename(name)}"
        raise InputError(f"{path}: cannot read DICOM file{where} ({_reason(err)})") from None
    return reader


def _count(files) -> str:
    return f"{len(files)} slice{'s' * (len(files) != 1)}"


def _unread(folder: str, files: list[str]) -> list[str]:
    """The DICOM files (``.dcm`` or ``DICM`` preamble) of a folder not among ``files``."""
    used = {os.path.realpath(name) for name in files}
    return [name for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name)) and name.upper() != "DICOMDIR"
            and os.path.realpath(os.path.join(folder, name)) not in used
            and is_dicom(os.path.join(folder, name))]


def _series_files(sitk, path: str) -> list[str]:
    """The sorted files of the folder's one series, or of the given file's series."""
    is_folder = os.path.isdir(path)
    folder = path if is_folder else os.path.dirname(path) or "."
    series = sitk.ImageSeriesReader
    try:
        if is_folder:
            uids = series.GetGDCMSeriesIDs(folder)
            if not uids:
                raise InputError(f"{path}: is a folder, expected a file or a folder holding "
                                 f"one DICOM series (found no DICOM series in it)")
            if len(uids) > 1:
                counts = ", ".join(f"{uid} ({_count(series.GetGDCMSeriesFileNames(folder, uid))})"
                                   for uid in uids)
                raise InputError(f"{path}: folder holds {len(uids)} DICOM series: {counts}; "
                                 f"pass one file of the wanted series or a folder with one series")
            uid = uids[0]
        else:
            reader = _header(sitk, path, path)
            key = "0020|000e"
            uid = reader.GetMetaData(key).strip(" \0") if reader.HasMetaDataKey(key) else ""
            if not uid:
                raise InputError(f"{path}: DICOM file has no SeriesInstanceUID")
        files = list(series.GetGDCMSeriesFileNames(folder, uid))
    except RuntimeError as err:
        raise InputError(f"{path}: cannot scan the DICOM files in {folder} ({_reason(err)}); "
                         f"is a file damaged? Put the series in a folder of its own") from None
    if not is_folder and not any(os.path.samefile(path, name) for name in files):
        raise InputError(f"{path}: GDCM finds no readable image of series {uid} in this file")
    # GDCM silently skips a damaged file: a slice would be missing.
    unread = _unread(folder, files) if is_folder else []
    if unread:
        raise InputError(f"{path}: GDCM cannot read {len(unread)} DICOM file(s) of the folder "
                         f"(damaged, or not an image?), e.g. {unread[0]}")
    return files


def _check_slices(sitk, files: list[str], path: str, limit: int) -> np.ndarray:
    """Checks sizes, the voxel limit and each slice's geometry from the headers alone.

    Returns the slices' positions (LPS, mm), in the order of ``files``.
    """
    first = _header(sitk, files[0], path)
    columns, rows, _ = first.GetSize()
    check_voxels((columns, rows, len(files)), limit, path)
    headers = [first] + [_header(sitk, name, path) for name in files[1:]]
    for name, reader in zip(files, headers):
        (width, height, frames), parts = reader.GetSize(), reader.GetNumberOfComponents()
        if (width, height, frames, parts) != (columns, rows, 1, 1):
            raise InputError(f"{path}: {os.path.basename(name)} is {width}x{height} with "
                             f"{frames} frame(s) of {parts} component(s); expected one "
                             f"greyscale {columns}x{rows} slice a file (multi-frame and "
                             f"colour DICOM are not supported)")
    directions = np.array([reader.GetDirection() for reader in headers])
    turn = float(np.abs(directions - directions[0]).max())
    if turn > ORIENTATION_TOLERANCE:
        raise InputError(f"{path}: DICOM slices have different orientations (direction "
                         f"cosines differ by up to {turn:.3g}); a localizer, or several "
                         f"series mixed?")
    positions = np.array([reader.GetOrigin() for reader in headers], dtype=np.float64)
    normal = directions[0].reshape(3, 3)[:, 2]
    places = 1 + int(np.count_nonzero(np.diff(np.sort(positions @ normal)) > 1e-2))
    if places < len(files):
        raise InputError(f"{path}: the {len(files)} DICOM images lie at {places} slice "
                         f"positions: several images per position (a dynamic, multi-echo or "
                         f"diffusion series?); put one image per position in a folder")
    if len(files) < 2:
        return positions
    step = (positions[-1] - positions[0]) / (len(files) - 1)
    size = float(np.linalg.norm(step))
    grid = positions[0] + np.arange(len(files))[:, None] * step
    off = np.linalg.norm(positions - grid, axis=1)
    if off.max() > TOLERANCE * size:
        gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
        k = int(np.argmax(np.abs(gaps - np.median(gaps))))
        raise InputError(
            f"{path}: DICOM slices are not evenly spaced: gaps between neighbours range from "
            f"{gaps.min():.4g} to {gaps.max():.4g} mm (median {np.median(gaps):.4g} mm; "
            f"{gaps[k]:.4g} mm between slices {k} and {k + 1}), a slice lies "
            f"{off.max():.3g} mm off a regular grid; slices missing, or series mixed?")
    shear = float(np.linalg.norm(step - (step @ normal) * normal))
    if shear * (len(files) - 1) > TOLERANCE * size:
        tilt = np.degrees(np.arctan2(shear, abs(step @ normal)))
        raise InputError(f"{path}: DICOM slices are not stacked along their normal (sheared "
                         f"by {tilt:.3g} degrees: gantry tilt?); resample the series first")
    return positions


def read_series(path: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads a DICOM series folder or file into (data (i, j, k), RAS+ affine).

    Data are float32 when SimpleITK gives floats (rescale slope applied), else the
    integer type it gives. Refused with an InputError: no or several series, unreadable
    files, more than ``limit`` voxels (before pixels are read), multi-frame or colour
    images, mixed orientations, missing, repeated or unevenly spaced slices, a tilt.
    """
    sitk = _simpleitk(path)
    with _quiet(sitk):
        files = _series_files(sitk, path)
        positions = _check_slices(sitk, files, path, limit)
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO(_IO)
        reader.SetFileNames(files)
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise InputError(f"{path}: cannot read DICOM series ({_reason(err)})") from None
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    if data.dtype.kind == "f":
        data = data.astype(np.float32)
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    # The geometry is SimpleITK's; every slice must lie where that geometry puts it.
    k = np.arange(len(files))
    placed = lps[:3, 3] + k[:, None] * lps[:3, 2]
    off = float(np.linalg.norm(placed - positions, axis=1).max())
    if len(files) > 1 and off > TOLERANCE * np.linalg.norm(lps[:3, 2]):
        raise InputError(f"{path}: SimpleITK places a DICOM slice {off:.3g} mm away from "
                         f"its ImagePositionPatient")
    return data, LPS_TO_RAS @ lps


def series_shape(path: str) -> tuple[int, int, int]:
    """The (columns, rows, slices) of a DICOM series from headers only (for bucketing)."""
    sitk = _simpleitk(path)
    with _quiet(sitk):
        files = _series_files(sitk, path)
        columns, rows, _ = _header(sitk, files[0], path).GetSize()
    return columns, rows, len(files)
