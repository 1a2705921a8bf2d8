"""Tests for jaxreg.io: round trips, resampling, validation and atomic writes."""

import gzip
import os

import nibabel as nib
import nrrd
import numpy as np
import pytest

from jaxreg import io

MNI_T1 = os.path.join(
    os.path.dirname(__import__("nilearn").__file__), "datasets", "data",
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def _image(shape=(7, 6, 5), seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32) + 1.0


def _affine():
    # A rotated, anisotropic, shifted grid (det != 0).
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.5, 2.0, 3.0])
    affine[:3, 3] = [-10.0, 4.0, 7.5]
    return affine


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz", "a.nrrd"])
def test_image_round_trip(tmp_path, name):
    data, affine = _image(), _affine()
    path = tmp_path / name
    io.save_volume(path, data, affine)
    vol = io.load_volume(path)
    assert vol.data.dtype == np.float32 and vol.data.shape == data.shape
    np.testing.assert_allclose(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, [1.5, 2.0, 3.0], atol=1e-6)
    assert vol.path == str(path)
    assert sorted(os.listdir(tmp_path)) == [name]


def test_real_mni_template_loads():
    vol = io.load_volume(MNI_T1)
    assert vol.shape == (197, 233, 189)
    np.testing.assert_allclose(vol.spacing, 1.0)
    np.testing.assert_allclose(vol.affine, nib.load(MNI_T1).affine)


def test_nrrd_lps_header_is_converted_to_ras(tmp_path):
    data = _image()
    header = {"space": "left-posterior-superior",
              "space directions": np.diag([0.5, 0.6, 2.0]),
              "space origin": np.array([10.0, 20.0, -30.0])}
    nrrd.write(str(tmp_path / "a.nrrd"), data, header)
    vol = io.load_volume(tmp_path / "a.nrrd")
    expected = np.diag([-0.5, -0.6, 2.0, 1.0])
    expected[:3, 3] = [-10.0, -20.0, -30.0]
    np.testing.assert_allclose(vol.affine, expected)
    np.testing.assert_allclose(vol.data, data)


def test_labels_round_trip_and_dtype(tmp_path):
    labels = np.random.default_rng(1).integers(0, 4, (6, 5, 4)).astype(np.int64)
    io.save_volume(tmp_path / "l.nii.gz", labels, np.eye(4))
    assert nib.load(tmp_path / "l.nii.gz").get_data_dtype() == np.uint8
    vol = io.load_labels(tmp_path / "l.nii.gz")
    assert vol.data.dtype.kind == "i"
    np.testing.assert_array_equal(vol.data, labels)
    io.save_volume(tmp_path / "m.nii.gz", labels - 300, np.eye(4))
    assert nib.load(tmp_path / "m.nii.gz").get_data_dtype() == np.int16


def test_field_saved_as_vector_nifti(tmp_path):
    field = np.random.default_rng(2).normal(size=(4, 5, 6, 3)).astype(np.float64)
    io.save_volume(tmp_path / "f.nii.gz", field, _affine())
    image = nib.load(tmp_path / "f.nii.gz")
    assert image.shape == (4, 5, 6, 3)
    assert image.get_data_dtype() == np.float32
    assert image.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(image.get_fdata(), field, rtol=1e-6)


def _seg_header(spacing=(1.0, 1.0, 2.0)):
    return {"space": "left-posterior-superior",
            "space origin": np.array([1.0, 2.0, 3.0]),
            "Segment0_Name": "breast", "Segment1_Name": "fgt"}


def test_seg_nrrd_labelmap_with_layers(tmp_path):
    # Two overlapping segments in two layers, label value 1 in each (Slicer 5 style).
    layers = np.zeros((2, 6, 5, 4), np.uint8)
    layers[0, 1:5, 1:4, 1:3] = 1
    layers[1, 2:4, 2:3, 1:2] = 1
    header = _seg_header()
    header.update({"space directions": np.array([[np.nan] * 3, [1.0, 0, 0], [0, 1.0, 0],
                                                 [0, 0, 2.0]]),
                   "kinds": ["list", "domain", "domain", "domain"],
                   "Segment0_LabelValue": "1", "Segment0_Layer": "0",
                   "Segment1_LabelValue": "1", "Segment1_Layer": "1"})
    nrrd.write(str(tmp_path / "s.seg.nrrd"), layers, header)
    vol = io.load_labels(tmp_path / "s.seg.nrrd")
    expected = layers[0].astype(np.int16)
    expected[layers[1] == 1] = 2
    np.testing.assert_array_equal(vol.data, expected)
    assert dict(vol.segment_names) == {1: "breast", 2: "fgt"}
    np.testing.assert_allclose(vol.affine[:3, 3], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(vol.spacing, [1.0, 1.0, 2.0])


def test_seg_nrrd_single_layer_keeps_label_values(tmp_path):
    data = np.zeros((6, 5, 4), np.uint8)
    data[1:3] = 3
    data[4:] = 7
    header = _seg_header()
    header.update({"space directions": np.diag([1.0, 1.0, 2.0]),
                   "Segment0_LabelValue": "3", "Segment0_Layer": "0",
                   "Segment1_LabelValue": "7", "Segment1_Layer": "0"})
    nrrd.write(str(tmp_path / "s.seg.nrrd"), data, header)
    vol = io.load_labels(tmp_path / "s.seg.nrrd")
    np.testing.assert_array_equal(vol.data, data)
    assert dict(vol.segment_names) == {3: "breast", 7: "fgt"}


def test_seg_nrrd_one_hot_stack(tmp_path):
    one_hot = np.zeros((2, 6, 5, 4), np.uint8)
    one_hot[0, :3] = 1
    one_hot[1, 4:] = 1
    header = _seg_header()
    header["space directions"] = np.array([[np.nan] * 3, [1.0, 0, 0], [0, 1.0, 0],
                                           [0, 0, 2.0]])
    nrrd.write(str(tmp_path / "s.seg.nrrd"), one_hot, header)
    vol = io.load_labels(tmp_path / "s.seg.nrrd")
    np.testing.assert_array_equal(vol.data, one_hot[0] + 2 * one_hot[1])
    assert dict(vol.segment_names) == {1: "breast", 2: "fgt"}


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    data = _image()
    nib.save(nib.Nifti1Image(data[..., None], np.eye(4)), tmp_path / "a.nii")
    assert io.load_volume(tmp_path / "a.nii").shape == data.shape


def _write_nifti(path, data, affine=None):
    if affine is None:
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        return path
    header = nib.Nifti1Header()  # raw srows: nibabel refuses to build a singular qform
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = affine[row]
    header["sform_code"] = 1
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return path


def _truncated(tmp_path):
    path = _write_nifti(tmp_path / "bad.nii.gz", _image((20, 20, 20)))
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    return path


def _garbage(tmp_path):
    path = tmp_path / "bad.nii.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"not a nifti header" * 10)
    return path


@pytest.mark.parametrize("make, problem", [
    (lambda t: t / "missing.nii.gz", "not found"),
    (_truncated, "cannot read"),
    (_garbage, "cannot read"),
    (lambda t: _write_nifti(t / "bad.nii", _image((5, 6))), "expected 3D"),
    (lambda t: _write_nifti(t / "bad.nii", _image((5, 6, 4, 2))), "expected 3D"),
    (lambda t: _write_nifti(t / "bad.nii", np.where(_image() > 1.5, np.nan, 1.0)),
     "NaN or Inf"),
    (lambda t: _write_nifti(t / "bad.nii", np.full((5, 6, 4), np.inf, np.float32)),
     "NaN or Inf"),
    (lambda t: _write_nifti(t / "bad.nii", np.zeros((5, 6, 4), np.float32)), "constant"),
    (lambda t: _write_nifti(t / "bad.nii", _image(), np.diag([1.0, 1.0, 0.0, 1.0])),
     "not invertible"),
    (lambda t: (t / "bad.txt").write_text("x") and t / "bad.txt", "unknown file type"),
])
def test_bad_inputs_raise_input_error_naming_file(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(io.InputError, match=problem) as info:
        io.load_volume(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_labels(tmp_path):
    path = _write_nifti(tmp_path / "l.nii", np.full((4, 4, 4), 1.5, np.float32))
    with pytest.raises(io.InputError, match="non-integer") as info:
        io.load_labels(path)
    assert str(path) in str(info.value)


def test_resample_shift_and_flip():
    data = _image((8, 7, 6))
    source = io.Volume(data=data, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    # Target: first axis flipped and shifted by one source voxel (2 mm).
    target = np.diag([-2.0, 2.0, 2.0, 1.0])
    target[0, 3] = 2.0 * 6  # target i -> world 12 - 2i -> source index 6 - i
    out = io.resample_to(source, (7, 7, 6), target)
    np.testing.assert_allclose(out.data, data[6::-1], rtol=1e-6)
    assert out.data.dtype == np.float32
    np.testing.assert_array_equal(out.affine, target)
    # Half-voxel shift along axis 2 interpolates linearly; outside is 0.
    shifted = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted[2, 3] = 1.0
    out = io.resample_to(source, (8, 7, 6), shifted)
    np.testing.assert_allclose(out.data[..., :5], 0.5 * (data[..., :5] + data[..., 1:]),
                               rtol=1e-5)


def test_resample_labels_nearest_keeps_dtype_and_values():
    labels = np.random.default_rng(3).integers(0, 5, (6, 6, 6)).astype(np.int16)
    source = io.Volume(data=labels, affine=np.eye(4))
    target = np.diag([0.5, 0.5, 0.5, 1.0])  # twice as fine
    out = io.resample_to(source, (12, 12, 12), target, order=0)
    assert out.data.dtype == np.int16
    assert set(np.unique(out.data)) <= set(np.unique(labels))
    np.testing.assert_array_equal(out.data[::2, ::2, ::2], labels)


def test_resample_identity_and_same_grid():
    vol = io.Volume(data=_image(), affine=_affine())
    out = io.resample_to(vol, vol.shape, vol.affine)
    np.testing.assert_allclose(out.data, vol.data, rtol=1e-6)
    assert io.same_grid(vol, out)
    assert not io.same_grid(vol, io.Volume(data=vol.data, affine=np.eye(4)))
    assert not io.same_grid(vol, io.Volume(data=vol.data[1:], affine=vol.affine))


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(image, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(io.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_volume(tmp_path / "out.nii.gz", _image(), np.eye(4))
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    io.save_volume(tmp_path / "out.nii.gz", _image(), np.eye(4))
    before = open(tmp_path / "out.nii.gz", "rb").read()
    monkeypatch.setattr(io.nib, "save", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        io.save_volume(tmp_path / "out.nii.gz", _image(seed=5), np.eye(4))
    assert os.listdir(tmp_path) == ["out.nii.gz"]
    assert open(tmp_path / "out.nii.gz", "rb").read() == before


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="must be"):
        io.save_volume(tmp_path / "a.nii", np.zeros((3, 3)), np.eye(4))
    with pytest.raises(ValueError, match="not invertible"):
        io.save_volume(tmp_path / "a.nii", np.ones((3, 3, 3)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="file type"):
        io.save_volume(tmp_path / "a.png", np.ones((3, 3, 3)), np.eye(4))
    assert os.listdir(tmp_path) == []


def test_field_mm_round_trip():
    affine = _affine()
    disp = np.random.default_rng(4).normal(size=(3, 4, 5, 3)).astype(np.float32)
    mm = io.field_to_mm(disp, affine)
    # A voxel step e_i is column i of the affine in world space.
    np.testing.assert_allclose(io.field_to_mm(np.eye(3, dtype=np.float32), affine),
                               affine[:3, :3].T, rtol=1e-6)
    np.testing.assert_allclose(io.field_to_voxels(mm, affine), disp, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(io.field_to_mm(
        np.array([0, 0, 1.0], np.float32), affine)), 3.0, rtol=1e-6)
