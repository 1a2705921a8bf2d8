"""Tests for DICOM series input (jaxreg.io.dicom through jaxreg.io.load_volume/load_labels)."""

import os
import random
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from jaxreg import io
from jaxreg.io import dicom as _dicom
from jaxreg.io import reading as _reading

sitk = pytest.importorskip("SimpleITK")
pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

TEST_FILES = os.path.dirname(get_testdata_file("CT_small.dcm"))
DICOMDIR_TESTS = os.path.join(TEST_FILES, "dicomdirtests")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(degrees, axis):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _oblique_affine(spacing=(0.7, 0.9, 2.5)):
    """RAS+ affine: 20 degrees about an oblique axis, anisotropic, shifted origin."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(20.0, (1.0, 2.0, 3.0)) @ np.diag(spacing)
    affine[:3, 3] = [-40.5, 30.25, -12.75]
    return affine


def _volume(shape=(20, 24, 12), seed=0):
    """Non-trivial int16 content: a smooth ramp per axis plus noise (every slice differs)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    noise = np.random.default_rng(seed).integers(-50, 50, shape)
    return (10 * i + 100 * j + 1000 * k + noise - 4000).astype(np.int16)


def _ds(value):
    return f"{value:.10g}"  # DICOM decimal strings hold at most 16 characters


def _write_series(folder, data, affine, *, uid=None, skip=(), seed=0, instance_offset=0):
    """Writes (x, y, z) int16 ``data`` on a RAS+ ``affine`` as one DICOM file per slice.

    SimpleITK's DicomSeriesFromArray recipe: each 2D slice gets its position,
    orientation, spacing and UIDs as tags. Files get random names without extension
    and are written in shuffled order. Returns the SeriesInstanceUID.
    """
    os.makedirs(folder, exist_ok=True)
    uid = uid or f"1.2.826.0.1.3680043.2.1125.{uuid.uuid4().int % 10**20}"
    lps = LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing  # columns: unit steps along i, j, k
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the names have no extension to guess it from
    order = [k for k in range(data.shape[2]) if k not in skip]
    random.Random(seed).shuffle(order)
    for k in order:
        position = lps[:3, 3] + lps[:3, 2] * k
        tags = {
            "0008|0016": MR_IMAGE_STORAGE, "0008|0018": f"{uid}.{instance_offset + k + 1}",
            "0008|0060": "MR", "0008|0008": "DERIVED\\SECONDARY",
            "0020|000d": f"{uid}.0", "0020|000e": uid,
            "0020|0013": str(instance_offset + k + 1),
            "0020|0032": "\\".join(_ds(v) for v in position),
            "0020|0037": "\\".join(_ds(v) for v in (*direction[:, 0], *direction[:, 1])),
            "0028|0030": f"{_ds(spacing[1])}\\{_ds(spacing[0])}",  # row, column spacing
            "0018|0050": _ds(spacing[2]),
        }
        piece = image[:, :, k]
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(os.path.join(folder, uuid.uuid4().hex))
        writer.Execute(piece)
    return uid


def _corners(shape, affine):
    index = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                      for k in (0, shape[2] - 1)])
    return (index @ affine.T)[:, :3]


def _no_pixels(monkeypatch):
    """Makes reading a series' pixels fail the test (checks must come before them)."""
    def execute(self):
        raise AssertionError("pixels were read")
    monkeypatch.setattr(sitk.ImageSeriesReader, "Execute", execute)


# 1. Round trip of a known oblique geometry --------------------------------------------

def test_oblique_series_round_trip_matches_nifti(tmp_path):
    data, affine = _volume(), _oblique_affine()
    io.save_volume(tmp_path / "ref.nii.gz", data, affine)
    folder = tmp_path / "series"
    _write_series(folder, data, affine)
    names = sorted(os.listdir(folder))
    assert len(names) == 12 and not any("." in name for name in names)
    head = pydicom.dcmread(folder / names[0], stop_before_pixels=True)
    assert head.SOPClassUID == MR_IMAGE_STORAGE and head.Modality == "MR"

    nifti = io.load_volume(tmp_path / "ref.nii.gz")
    for path in (folder, folder / names[5]):  # the folder, or one file of the series
        vol = io.load_volume(path)
        assert vol.path == str(path)
        assert vol.data.dtype == np.float32 and vol.shape == data.shape
        np.testing.assert_array_equal(vol.data, data)
        np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=1e-4)
        np.testing.assert_allclose(_corners(vol.shape, vol.affine),
                                   _corners(data.shape, affine), rtol=0, atol=1e-4)
        np.testing.assert_allclose(vol.spacing, [0.7, 0.9, 2.5], atol=1e-6)
        np.testing.assert_array_equal(vol.data, nifti.data)
        np.testing.assert_allclose(vol.affine, nifti.affine, rtol=0, atol=1e-4)
        assert io.same_grid(vol, nifti, atol=1e-4)


def test_file_of_series_is_read_with_its_series_only(tmp_path):
    data, affine = _volume(), _oblique_affine()
    folder = tmp_path / "mixed"
    _write_series(folder, data, affine, seed=1)
    first = set(os.listdir(folder))
    _write_series(folder, data[::-1, :, :6].copy(), _oblique_affine((1.0, 1.0, 3.0)), seed=2)
    mine = sorted(first)[3]
    os.rename(folder / mine, folder / "slice.dcm")  # any name; .dcm is fine too
    vol = io.load_volume(folder / "slice.dcm")
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=1e-4)
    assert _dicom.series_shape(str(folder / "slice.dcm")) == data.shape


def test_labels_series_keeps_integers(tmp_path):
    labels = np.zeros((16, 12, 8), np.int16)
    labels[3:10, 2:9, 1:6] = 1
    labels[5:8, 4:7, 2:4] = 3
    _write_series(tmp_path / "labels", labels, _oblique_affine())
    vol = io.load_labels(tmp_path / "labels")
    assert vol.data.dtype.kind == "i"
    np.testing.assert_array_equal(vol.data, labels)
    np.testing.assert_allclose(vol.affine, _oblique_affine(), rtol=0, atol=1e-4)


# 2. pydicom's test files -----------------------------------------------------------

def test_pydicom_ct_series_geometry_and_rescale_match_its_tags():
    folder = os.path.join(DICOMDIR_TESTS, "98892001", "CT5N")  # 5 CT slices, one series
    slices = [pydicom.dcmread(os.path.join(folder, name)) for name in os.listdir(folder)]
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1 and len(slices) == 5
    cosines = np.array(slices[0].ImageOrientationPatient, np.float64)
    row, column = cosines[:3], cosines[3:]  # along a row (i), down a column (j); LPS
    normal = np.cross(row, column)
    slices.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    positions = np.array([ds.ImagePositionPatient for ds in slices], np.float64)
    row_spacing, column_spacing = (float(v) for v in slices[0].PixelSpacing)
    step = float(np.linalg.norm(positions[1] - positions[0]))
    assert step == pytest.approx(2.5, abs=1e-4)

    vol = io.load_volume(folder)
    assert vol.shape == (int(slices[0].Columns), int(slices[0].Rows), 5) == (16, 16, 5)
    np.testing.assert_allclose(vol.spacing, [column_spacing, row_spacing, step], atol=1e-5)
    flip = np.diag([-1.0, -1.0, 1.0])  # LPS (DICOM) -> RAS (jaxreg)
    np.testing.assert_allclose(vol.affine[:3, 0], flip @ row * column_spacing, atol=1e-5)
    np.testing.assert_allclose(vol.affine[:3, 1], flip @ column * row_spacing, atol=1e-5)
    np.testing.assert_allclose(vol.affine[:3, 2], flip @ normal * step, atol=1e-4)
    np.testing.assert_allclose(vol.affine[:3, 3], flip @ positions[0], atol=1e-5)
    corners = [positions[k] + i * column_spacing * row + j * row_spacing * column
               for i in (0, 15) for j in (0, 15) for k in (0, 4)]
    np.testing.assert_allclose(_corners(vol.shape, vol.affine), np.array(corners) @ flip,
                               rtol=0, atol=1e-4)
    # Values: stored pixels times RescaleSlope plus RescaleIntercept (-1024 here).
    assert float(slices[0].RescaleIntercept) == -1024
    for k, ds in enumerate(slices):
        expected = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.data[:, :, k], expected)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_single_slice_is_not_a_volume(tmp_path, name):
    path = tmp_path / name
    shutil.copy(get_testdata_file(name), path)
    with pytest.raises(io.InputError, match=r"\(1 slice in the DICOM series\); needs at least "
                                            r"4 voxels along each axis") as info:
        io.load_volume(path)
    assert str(info.value).startswith(f"{path}: volume has shape ")
    # In place, its folder also holds files GDCM cannot scan: refused all the same.
    with pytest.raises(io.InputError) as info:
        io.load_volume(get_testdata_file(name))
    assert str(info.value).startswith(get_testdata_file(name) + ": ")


def test_pydicom_series_with_a_gap_or_mixed_orientations_are_refused(monkeypatch):
    _no_pixels(monkeypatch)
    gap = os.path.join(DICOMDIR_TESTS, "77654033", "CT2")  # z = -99.48, 103.02, 104.27, ...
    with pytest.raises(io.InputError, match=r"not evenly spaced: gaps between neighbours "
                                            r"range from 1\.25 to 202\.5 mm"):
        io.load_volume(gap)
    turning = os.path.join(DICOMDIR_TESTS, "98892003", "MR700")  # radial slices
    with pytest.raises(io.InputError, match="DICOM slices have different orientations"):
        io.load_volume(turning)


# 3. Errors --------------------------------------------------------------------------

def _series(tmp_path, name="s", **kwargs):
    folder = tmp_path / name
    _write_series(folder, _volume(), _oblique_affine(), **kwargs)
    return folder


def _nii(tmp_path):
    path = tmp_path / "x.nii.gz"
    io.save_volume(path, _volume(), np.eye(4))
    return tmp_path


@pytest.mark.parametrize("make, problem", [
    (lambda t: t, r"is a folder, expected a file or a folder holding one DICOM series "
                  r"\(found no DICOM series in it\)"),
    (lambda t: (t / "a.txt").write_text("hello") and _nii(t),
     "found no DICOM series in it"),
    (lambda t: t / "missing", "file not found"),
    (lambda t: t / "missing.dcm", "file not found"),
    (lambda t: (t / "a.dcm").write_text("not dicom") and t / "a.dcm", "cannot read DICOM file"),
    (lambda t: (t / "a.dcm").write_bytes(b"") or t / "a.dcm", "cannot read DICOM file"),
])
def test_bad_dicom_inputs(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(io.InputError, match=problem) as info:
        io.load_volume(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_two_series_in_a_folder_are_listed(tmp_path):
    folder = _series(tmp_path, uid="1.2.3.4.5")
    _write_series(folder, _volume((20, 24, 5)), _oblique_affine(), uid="1.2.3.4.6")
    with pytest.raises(io.InputError) as info:
        io.load_volume(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: folder holds 2 DICOM series: ")
    assert "1.2.3.4.5 (12 slices)" in message and "1.2.3.4.6 (5 slices)" in message
    assert "pass one file of the wanted series or a folder with one series" in message


def test_three_slices_are_too_few(tmp_path):
    folder = tmp_path / "three"
    _write_series(folder, _volume((20, 24, 3)), _oblique_affine())
    with pytest.raises(io.InputError, match=r"shape \(20, 24, 3\) \(3 slices in the DICOM "
                                            r"series\); needs at least 4 voxels"):
        io.load_volume(folder)


def test_missing_middle_slice_is_refused_naming_the_gap(tmp_path, monkeypatch):
    folder = _series(tmp_path, skip=(6,))
    _no_pixels(monkeypatch)
    with pytest.raises(io.InputError) as info:
        io.load_volume(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: DICOM slices are not evenly spaced: gaps between "
                              f"neighbours range from 2.5 to 5 mm")
    assert "5 mm between slices 5 and 6" in message and "1.25 mm off a regular grid" in message


@pytest.mark.parametrize("which", [0, 4, 11])
def test_damaged_file_is_named(tmp_path, which):
    folder = _series(tmp_path)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    name = os.path.basename(files[which])  # first, a middle or the last slice
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes(raw[:-300])  # pixel data cut short: GDCM skips the file
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # a DICOMDIR is no slice
    with pytest.raises(io.InputError, match=f"GDCM cannot read 1 DICOM file\\(s\\) of the "
                                            f"folder \\(damaged, or not an image\\?\\), "
                                            f"e.g. {name}$"):
        io.load_volume(folder)


def test_repeated_positions_are_refused(tmp_path):
    # A dynamic series: two time points of the same slices under one SeriesInstanceUID.
    folder = _series(tmp_path, uid="1.2.3.9")
    _write_series(folder, _volume(seed=1), _oblique_affine(), uid="1.2.3.9", instance_offset=100)
    with pytest.raises(io.InputError, match=r"the 24 DICOM images lie at 12 slice positions: "
                                            r"several images per position \(a dynamic"):
        io.load_volume(folder)


def test_sheared_stack_is_refused(tmp_path):
    affine = _oblique_affine()
    affine[:3, 2] += affine[:3, 0] / np.linalg.norm(affine[:3, 0]) * 0.3  # tilted gantry
    _write_series(tmp_path / "tilt", _volume(), affine)
    with pytest.raises(io.InputError, match=r"not stacked along their normal \(sheared by "
                                            r"6\.84 degrees: gantry tilt\?\)"):
        io.load_volume(tmp_path / "tilt")


def test_voxel_limit_is_checked_before_pixels(tmp_path, monkeypatch):
    folder = _series(tmp_path)
    _no_pixels(monkeypatch)
    with pytest.raises(io.InputError, match=r"image has 5760 voxels \(shape \(20, 24, 12\)\), "
                                            r"more than the limit of 5000"):
        io.load_volume(folder, max_voxels=5000)


def test_missing_simpleitk_is_named(tmp_path, monkeypatch):
    folder = _series(tmp_path)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import SimpleITK now fails
    with pytest.raises(io.InputError, match="reading DICOM needs SimpleITK: pip install "
                                            "SimpleITK"):
        io.load_volume(folder)


def test_dicom_detection_and_lazy_import(tmp_path):
    folder = _series(tmp_path)
    name = sorted(os.listdir(folder))[0]
    assert _reading.is_dicom(str(folder)) and _reading.is_dicom(str(folder / name))
    assert _reading.is_dicom(str(tmp_path / "x.dcm"))
    (tmp_path / "plain").write_bytes(b"\0" * 200)
    assert not _reading.is_dicom(str(tmp_path / "plain"))
    assert not _reading.is_dicom(str(tmp_path / "a.nii.gz"))
    with pytest.raises(io.InputError, match=r"unknown file type \(expected .nii, .nii.gz, "
                                            r".nrrd, .nhdr, a DICOM file \(.dcm\) or a folder"):
        io.load_volume(tmp_path / "plain")
    code = "import sys, jaxreg, jaxreg.io; assert 'SimpleITK' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
