"""Tests for jaxreg.metrics against hand-computed cases and scipy."""

import math

import numpy as np
import pytest
from scipy import ndimage

from jaxreg import metrics


def test_dice_hand_computed():
    a = np.zeros((4, 4, 4), np.int16)
    b = np.zeros((4, 4, 4), np.int16)
    a[0, :, :2] = 1   # 8 voxels
    b[0, :, :1] = 1   # 4 voxels, all inside a
    a[3, 3, 3] = 2    # label 2 only in a
    b[2, 2, 2] = 5    # label 5 only in b
    out = metrics.dice(a, b)
    assert out == {1: pytest.approx(2 * 4 / 12), 2: 0.0, 5: 0.0}
    assert metrics.dice(a, b, labels=[1]) == {1: pytest.approx(2 / 3)}
    assert math.isnan(metrics.dice(a, b, labels=[7])[7])
    assert metrics.dice(a > 0, a > 0) == {1: 1.0}
    assert metrics.dice(np.array([[[0, 1, 1]]]), np.array([[[1, 1, 0]]])) == {1: 0.5}


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def _ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def test_hd95_shifted_cube_anisotropic():
    a = np.zeros((20, 20, 20), np.uint8)
    b = np.zeros((20, 20, 20), np.uint8)
    a[5:12, 5:12, 5:12] = 1
    b[8:15, 5:12, 5:12] = 1  # shifted by 3 voxels along axis 0
    # Spacing 2 mm along axis 0: every surface distance is at most 6 mm; the faces that
    # move along axis 0 are at exactly 6 mm and are more than 5 % of the surface.
    out = metrics.hd95(a, b, spacing=(2.0, 1.0, 1.0))
    assert out[1] == pytest.approx(6.0)
    assert metrics.hd95(a, a, spacing=(1, 1, 1)) == {1: 0.0}


def test_hd95_matches_brute_force():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.normal(size=(18, 16, 14)), 2) > 0.05
    b = ndimage.gaussian_filter(rng.normal(size=(18, 16, 14)), 2) > 0.05
    spacing = (1.5, 0.8, 2.5)

    def surface(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.linalg.norm(sa[:, None] - sb[None], axis=-1)
    expected = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    out = metrics.hd95(a.astype(np.uint8), b.astype(np.uint8), spacing=spacing)
    assert out[1] == pytest.approx(expected, rel=1e-9)


def test_hd95_concentric_balls():
    a = _ball((31, 31, 31), (15, 15, 15), 10).astype(np.uint8)
    b = _ball((31, 31, 31), (15, 15, 15), 7).astype(np.uint8)
    out = metrics.hd95(a, b, spacing=(1, 1, 1))[1]
    assert 2.5 <= out <= 3.7  # radii differ by 3 voxels (voxelised: sqrt(13))


def test_hd95_empty_cases():
    a = np.zeros((5, 5, 5), np.uint8)
    b = a.copy()
    b[2, 2, 2] = 1
    assert math.isinf(metrics.hd95(a, b, spacing=(1, 1, 1))[1])
    assert math.isnan(metrics.hd95(a, a, spacing=(1, 1, 1), labels=[1])[1])
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(a, b, spacing=(1, 1))


def test_jacobian_stats_identity_and_affine():
    zero = np.zeros((8, 8, 8, 3), np.float32)
    assert metrics.jacobian_stats(zero) == {"folding_percent": 0.0, "std_log_jac": 0.0}
    # u = 0.5 x along axis 0: det 1.5 everywhere, no spread.
    scale = zero.copy()
    scale[..., 0] = 0.5 * np.arange(8)[:, None, None]
    stats = metrics.jacobian_stats(scale)
    assert stats["folding_percent"] == 0.0
    assert stats["std_log_jac"] == pytest.approx(0.0, abs=1e-6)


def test_jacobian_stats_known_folding():
    # u_0 = -2 x_0 on the first half of axis 0 (det = -1: folded), 0 on the second half.
    disp = np.zeros((10, 4, 4, 3), np.float32)
    disp[:5, ..., 0] = -2.0 * np.arange(5)[:, None, None]
    det = np.ones(10)
    grad = np.gradient(disp[:, 0, 0, 0])
    det = 1 + grad
    expected = 100.0 * np.mean(det <= 0)
    stats = metrics.jacobian_stats(disp)
    assert stats["folding_percent"] == pytest.approx(expected)
    assert 40.0 <= stats["folding_percent"] <= 60.0
    log = np.log(np.maximum(det, 1e-9))
    assert stats["std_log_jac"] == pytest.approx(np.std(log), rel=1e-4)


def test_tre_translation():
    spacing = (2.0, 1.0, 3.0)
    fixed = np.array([[3.0, 4.0, 5.0], [1.5, 2.25, 0.5], [7.0, 7.0, 6.0]])
    moving = fixed + np.array([1.0, -2.0, 0.5])
    disp = np.zeros((8, 8, 7, 3), np.float32)
    # No registration: the initial landmark distance.
    initial = np.linalg.norm(np.array([1.0, -2.0, 0.5]) * spacing)
    np.testing.assert_allclose(metrics.tre(fixed, moving, disp, spacing=spacing), initial)
    disp[...] = [1.0, -2.0, 0.5]  # the exact translation
    np.testing.assert_allclose(metrics.tre(fixed, moving, disp, spacing=spacing), 0.0,
                               atol=1e-6)
    disp[...] = [1.0, -2.0, 0.0]  # 0.5 voxel short along axis 2: 1.5 mm
    np.testing.assert_allclose(metrics.tre(fixed, moving, disp, spacing=spacing), 1.5,
                               rtol=1e-6)


def test_tre_interpolates_field():
    disp = np.zeros((4, 4, 4, 3), np.float32)
    disp[..., 0] = np.arange(4)[:, None, None]  # u_0 = x_0
    fixed = np.array([[1.5, 1.0, 1.0]])
    moving = np.array([[3.0, 1.0, 1.0]])  # x + u(x) = 1.5 + 1.5
    assert metrics.tre(fixed, moving, disp, spacing=(1, 1, 1))[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="landmarks"):
        metrics.tre(fixed, np.zeros((2, 3)), disp, spacing=(1, 1, 1))


def test_field_error():
    true = np.zeros((4, 5, 6, 3), np.float32)
    disp = true.copy()
    disp[..., 0] = 3.0
    disp[..., 1] = 4.0
    assert metrics.field_error(disp, true) == pytest.approx(5.0)
    assert metrics.field_error(disp, true, spacing=(2.0, 0.5, 1.0)) == pytest.approx(
        math.hypot(6.0, 2.0), rel=1e-5)
    mask = np.zeros((4, 5, 6), bool)
    mask[0] = True
    disp[1:] = 0.0
    assert metrics.field_error(disp, true) == pytest.approx(5.0 / 4)
    assert metrics.field_error(disp, true, mask=mask) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="empty"):
        metrics.field_error(disp, true, mask=np.zeros_like(mask))


def test_field_error_shapes_must_match():
    disp = np.zeros((4, 5, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(4, 5, 6, 3\) and \(4, 5, 7, 3\)"):
        metrics.field_error(disp, np.zeros((4, 5, 7, 3), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        metrics.field_error(disp, disp, mask=np.ones((4, 5, 5), bool))


def test_hd95_matches_distance_transforms_on_real_sized_labels():
    # The k-d tree gives the exact Euclidean distances the distance transform gives.
    rng = np.random.default_rng(3)
    a = (ndimage.gaussian_filter(rng.normal(size=(40, 36, 30)), 3) > 0).astype(np.uint8)
    b = (ndimage.gaussian_filter(rng.normal(size=(40, 36, 30)), 3) > 0).astype(np.uint8) * 2
    a[a == 1] = 2
    spacing = (0.9, 1.2, 2.0)
    sa = a == 2
    sa = sa & ~ndimage.binary_erosion(sa, border_value=0)
    sb = b == 2
    sb = sb & ~ndimage.binary_erosion(sb, border_value=0)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    expected = max(np.percentile(to_b, 95), np.percentile(to_a, 95))
    assert metrics.hd95(a, b, spacing=spacing)[2] == pytest.approx(expected, rel=1e-9)


def test_dice_counted_path_matches_masks():
    # Integer maps are scored by counting every label at once; float maps (and labels
    # outside the counted range) by per-label masks: the two must agree.
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (12, 13, 14)).astype(np.uint8)
    b = rng.integers(0, 6, (12, 13, 14)).astype(np.int16)
    counted = metrics.dice(a, b, labels=[1, 2, 5, 9])
    masked = metrics.dice(a.astype(float), b.astype(float), labels=[1, 2, 5, 9])
    assert counted[5] == 0.0 and math.isnan(counted[9])
    np.testing.assert_equal(counted, masked)
    assert metrics.dice(a, b) == metrics.dice(a.astype(float), b.astype(float))


@pytest.mark.parametrize("values", [[0, 3], [1, 2, 4], [0], [0, 1, 5, 77], [-1, 2], [0.5, 2.0]])
def test_present_values_are_numpys_unique(values):
    rng = np.random.default_rng(1)
    for dtype in (np.int16, np.uint8, np.float32, bool):
        if dtype in (np.uint8, bool) and min(values) < 0 or dtype is bool and max(values) > 1:
            continue
        x = rng.choice(np.asarray(values), size=(7, 6, 5)).astype(dtype)
        np.testing.assert_array_equal(metrics._present(x), np.unique(x))
