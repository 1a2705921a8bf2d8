"""Tests for jaxreg.io: round trips, resampling, validation and atomic writes."""

import gzip
import os
import time
import tracemalloc

import nibabel as nib
import nrrd
import numpy as np
import pytest

from jaxreg import io
from jaxreg.io import reading as _reading
from jaxreg.io import volumes
from jaxreg.io import writing as _writing

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


@pytest.mark.parametrize("level", [0, 6])
def test_compresslevel_writes_the_same_image(tmp_path, level):
    field = np.random.default_rng(3).normal(size=(6, 5, 4, 3)).astype(np.float32)
    io.save_volume(tmp_path / "d.nii.gz", field, _affine())
    io.save_volume(tmp_path / "c.nii.gz", field, _affine(), compresslevel=level)
    default, chosen = nib.load(tmp_path / "d.nii.gz"), nib.load(tmp_path / "c.nii.gz")
    np.testing.assert_array_equal(chosen.get_fdata(), default.get_fdata())
    np.testing.assert_array_equal(chosen.affine, default.affine)
    assert chosen.header.get_intent()[0] == "vector"
    assert gzip.open(tmp_path / "c.nii.gz").read() == gzip.open(tmp_path / "d.nii.gz").read()
    raw = (tmp_path / "c.nii.gz").stat().st_size
    assert raw > field.nbytes if level == 0 else raw < (tmp_path / "d.nii.gz").stat().st_size + 64


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
    (_truncated, "truncated"),
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
    (lambda t: t, "is a folder, expected a file"),
    (lambda t: (t / "empty.nii.gz").write_bytes(b"") or t / "empty.nii.gz", "file is empty"),
    (lambda t: _write_nifti(t / "bad.nii", _image(), np.diag([2e-23, 1.0, 1.0, 1.0])),
     r"spacing \(2e-23, 1, 1\) mm is implausible"),
    (lambda t: _write_nifti(t / "bad.nii", _image(), np.diag([1.0, 1.0, 5e3, 1.0])),
     "spacing .* implausible"),
    (lambda t: _write_nifti(t / "bad.nii", _image() * np.float32(7e13)),
     "values reach .* implausible for an image"),
    (lambda t: _write_nifti(t / "bad.nii", _image((7, 6, 1))),
     "needs at least 4 voxels along each axis"),
    (lambda t: _write_nifti(t / "bad.nii.gz", _image((3, 6, 5))),
     "needs at least 4 voxels along each axis"),
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


def test_labels_get_file_and_geometry_checks_but_no_value_bound(tmp_path):
    labels = np.zeros((7, 6, 5), np.int32)
    labels[2:5, 2:4, 1:4] = 2_000_000_000  # fine for labels, beyond MAX_ABS_VALUE
    vol = io.load_labels(_write_nifti(tmp_path / "l.nii", labels))
    assert vol.data.dtype == np.int32 and vol.data.max() == 2_000_000_000
    for path, problem in [
            (_write_nifti(tmp_path / "thin.nii", labels[:, :, :1]), "at least 4 voxels"),
            (_write_nifti(tmp_path / "tiny.nii", labels, np.diag([2e-23, 1, 1, 1.0])),
             "spacing"),
            (tmp_path, "is a folder")]:
        with pytest.raises(io.InputError, match=problem):
            io.load_labels(path)


def _random_nii_gz(tmp_path, shape=(24, 24, 24)):
    """A .nii.gz of random float32 voxels (any damage changes voxels); data and bytes."""
    data = _image(shape, seed=7)
    path = _write_nifti(tmp_path / "a.nii.gz", data)
    return path, data, open(path, "rb").read()


def _flip(raw, position):
    return raw[:position] + bytes([raw[position] ^ 0xFF]) + raw[position + 1:]


@pytest.mark.parametrize("where", ["nifti header", "data start", "middle", "last data",
                                   "crc", "isize"])
def test_damaged_gzip_is_refused_as_corrupt(tmp_path, where):
    path, _, raw = _random_nii_gz(tmp_path)
    position = {"nifti header": 20, "data start": 400, "middle": len(raw) // 2,
                "last data": len(raw) - 12, "crc": len(raw) - 6, "isize": len(raw) - 3}[where]
    open(path, "wb").write(_flip(raw, position))
    with pytest.raises(io.InputError, match=r"^\S+: file is (corrupt \(gzip|truncated)") as info:
        io.load_volume(path)
    assert str(info.value).startswith(f"{path}: file is ")
    assert "\n" not in str(info.value)


def test_no_byte_flip_loads_wrong_voxels(tmp_path):
    # Sweep the compressed bytes: every flip is refused as damage, or leaves the voxels
    # exactly as they were; only the gzip header's mtime, XFL and OS bytes (4-9), which
    # no checksum covers, may be harmless. Flips that garble the NIfTI header inside the
    # stream are reported as damage too, not as a bad header.
    path, data, raw = _random_nii_gz(tmp_path, (12, 12, 12))
    harmless = []
    for position in [*range(12), *range(12, len(raw), max(1, len(raw) // 150))]:
        open(path, "wb").write(_flip(raw, position))
        try:
            vol = io.load_volume(path)
        except io.InputError as err:
            assert str(err).startswith(f"{path}: file is corrupt (gzip") or \
                str(err).startswith(f"{path}: file is truncated"), (position, str(err))
        else:
            np.testing.assert_array_equal(vol.data, data, err_msg=f"flip at {position}")
            harmless.append(position)
    assert set(harmless) <= set(range(4, 10)), harmless


def test_crc_is_checked_even_when_nibabel_would_not(tmp_path):
    # Damage only the stored CRC: the voxels decompress correctly, yet the file is bad.
    path, data, raw = _random_nii_gz(tmp_path)
    open(path, "wb").write(_flip(raw, len(raw) - 8))
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), data)  # silent
    with pytest.raises(io.InputError, match="corrupt \\(gzip: CRC check failed"):
        io.load_volume(path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.99, -4, -8, -1])
def test_truncated_nii_gz_is_refused(tmp_path, keep):
    path, _, raw = _random_nii_gz(tmp_path)
    cut = int(len(raw) * keep) if keep > 0 else len(raw) + keep
    open(path, "wb").write(raw[:cut])
    with pytest.raises(io.InputError, match="truncated|corrupt"):
        io.load_volume(path)


def _lying_header(tmp_path, name, shape=(1000, 1000, 1000)):
    """A real 40^3 float32 file whose header claims ``shape``."""
    data = _image((40, 40, 40), seed=3)
    raw = bytearray(open(_write_nifti(tmp_path / "a.nii", data), "rb").read())
    raw[40:56] = np.array([3, *shape, 1, 1, 1, 1], "<i2").tobytes()  # dim[0..7]
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    return path


@pytest.mark.parametrize("name", ["big.nii.gz", "big.nii"])
def test_lying_header_is_refused_fast_without_big_allocation(tmp_path, name):
    path = _lying_header(tmp_path, name)
    claim = 1000**3 * 4 + 352
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(io.InputError) as info:
            io.load_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 64 * 2**20, peak  # the data is 256 KB; the header claims 4 GB
    held = 40**3 * 4 + 352
    assert f"header claims {claim} bytes of data, file holds {held}" in str(info.value)
    assert str(info.value).startswith(f"{path}: file is truncated or its header is wrong")


def test_voxel_limit_keyword_and_environment(tmp_path, monkeypatch):
    path = _write_nifti(tmp_path / "a.nii.gz", _image((8, 8, 8)))
    monkeypatch.delenv("JAXREG_MAX_VOXELS", raising=False)
    assert io.load_volume(path).shape == (8, 8, 8)  # 512 voxels, far below MAX_VOXELS
    with pytest.raises(io.InputError, match="512 voxels .*limit of 500.*max_voxels=.*"
                                            "JAXREG_MAX_VOXELS") as info:
        io.load_volume(path, max_voxels=500)
    assert str(info.value).startswith(str(path))
    with pytest.raises(io.InputError, match="limit of 500"):
        io.load_labels(_write_nifti(tmp_path / "l.nii", np.ones((8, 8, 8), np.uint8)),
                       max_voxels=500)
    monkeypatch.setenv("JAXREG_MAX_VOXELS", "500")
    with pytest.raises(io.InputError, match="limit of 500"):
        io.load_volume(path)
    assert io.load_volume(path, max_voxels=512).shape == (8, 8, 8)  # keyword wins
    monkeypatch.setattr(volumes, "MAX_VOXELS", 100)
    monkeypatch.setenv("JAXREG_MAX_VOXELS", "1000")
    assert io.load_volume(path).shape == (8, 8, 8)  # environment beats the constant
    monkeypatch.delenv("JAXREG_MAX_VOXELS")
    with pytest.raises(io.InputError, match="limit of 100"):
        io.load_volume(path)
    monkeypatch.setenv("JAXREG_MAX_VOXELS", "lots")
    with pytest.raises(ValueError, match="JAXREG_MAX_VOXELS must be a positive integer"):
        io.load_volume(path)
    with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
        io.load_volume(path, max_voxels=0)


def test_voxel_limit_is_checked_before_reading_the_data(tmp_path):
    path = _lying_header(tmp_path, "huge.nii.gz", shape=(30000, 30000, 30000))
    with pytest.raises(io.InputError, match="27000000000000 voxels .*more than the limit"):
        io.load_volume(path)


def _nrrd_gz(tmp_path, shape=(16, 16, 16)):
    data = _image(shape, seed=11)
    path = str(tmp_path / "a.nrrd")
    nrrd.write(path, data, {"encoding": "gzip", "space directions": np.eye(3),
                            "space": "left-posterior-superior"})
    raw = open(path, "rb").read()
    return path, data, raw, raw.index(b"\n\n") + 2


def test_nrrd_gzip_damage_and_truncation_are_refused(tmp_path):
    path, data, raw, start = _nrrd_gz(tmp_path)
    np.testing.assert_array_equal(io.load_volume(path).data, data)
    for position in [start + 1, start + 40, (start + len(raw)) // 2, len(raw) - 6,
                     len(raw) - 2]:
        open(path, "wb").write(_flip(raw, position))
        with pytest.raises(io.InputError, match="corrupt|truncated"):
            io.load_volume(path)
    # pynrrd alone accepts a file whose gzip trailer (CRC, length) is cut off.
    for cut in [4, 8, (len(raw) - start) // 2]:
        open(path, "wb").write(raw[:-cut])
        with pytest.raises(io.InputError, match="truncated"):
            io.load_volume(path)


def test_nrrd_sizes_are_checked_against_the_file(tmp_path):
    data = _image((8, 8, 8))
    header = {"encoding": "raw", "space directions": np.eye(3),
              "space": "left-posterior-superior"}
    path = str(tmp_path / "a.nrrd")
    nrrd.write(path, data, header)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw.replace(b"sizes: 8 8 8", b"sizes: 1000 1000 1000"))
    with pytest.raises(io.InputError, match="header claims 4000000000 bytes of data, "
                                            "file holds 2048"):
        io.load_volume(path)
    with pytest.raises(io.InputError, match="limit of 100"):
        io.load_labels(path, max_voxels=100)
    open(path, "wb").write(raw[:-10])
    with pytest.raises(io.InputError, match="claims 2048 bytes of data, file holds 2038"):
        io.load_volume(path)


def test_unreadable_file_says_so(tmp_path, monkeypatch):
    path = _write_nifti(tmp_path / "a.nii", _image())

    def denied(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", name)

    # Shadows the builtin in the private module that opens the files.
    monkeypatch.setattr(_reading, "open", denied, raising=False)
    with pytest.raises(io.InputError, match="not readable \\(permission denied\\)") as info:
        io.load_volume(path)
    assert str(info.value).startswith(str(path))


def test_unreadable_file_by_mode(tmp_path):
    path = _write_nifti(tmp_path / "a.nii", _image())
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running with privileges that read any file")
        with pytest.raises(io.InputError, match="not readable"):
            io.load_volume(path)
    finally:
        os.chmod(path, 0o644)


def test_coverage():
    vol = io.Volume(data=np.zeros((16, 16, 16), np.float32), affine=_affine())
    assert io.coverage(vol, vol.shape, vol.affine) == 1.0
    assert io.coverage(vol, vol.shape, vol.affine, step=1) == 1.0
    # Shifted by half the grid along axis 0: half the target lies outside.
    half = vol.affine @ np.array([[1, 0, 0, 8], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert io.coverage(vol, vol.shape, half) == pytest.approx(0.5, abs=0.07)
    assert io.coverage(vol, vol.shape, half, step=1) == 0.5
    # A finer target grid over the same extent, a flipped one, and one far away.
    fine = vol.affine @ np.diag([0.5, 0.5, 0.5, 1.0])
    assert io.coverage(vol, (31, 31, 31), fine) == 1.0
    flipped = vol.affine @ np.array([[-1, 0, 0, 15], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert io.coverage(vol, vol.shape, flipped) == 1.0
    far = vol.affine @ np.array([[1, 0, 0, 100], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert io.coverage(vol, vol.shape, far) == 0.0
    # Rotated 45 degrees in plane about the centre: the corners stick out.
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    centre = np.array([7.5, 7.5, 0])
    rot = np.eye(4)
    rot[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    rot[:3, 3] = centre - rot[:3, :3] @ centre
    frac = io.coverage(vol, vol.shape, vol.affine @ rot, step=1)
    assert 0.75 < frac < 0.9  # the inscribed octagon: 2 * (sqrt(2) - 1) ~ 0.83
    with pytest.raises(ValueError, match="shape"):
        io.coverage(vol, (4, 4), vol.affine)


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

    monkeypatch.setattr(_writing.nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_volume(tmp_path / "out.nii.gz", _image(), np.eye(4))
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    io.save_volume(tmp_path / "out.nii.gz", _image(), np.eye(4))
    before = open(tmp_path / "out.nii.gz", "rb").read()
    monkeypatch.setattr(_writing.nib, "save", lambda *a: (_ for _ in ()).throw(OSError("boom")))
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
