"""Rigid/affine registration: known motions on real anatomy, fields, ITK files."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import rotation as _rotation
from conftest import mni_path
from jaxreg import warping
from jaxreg.solver import affine
from jaxreg.solver.affine import AffineConfig

# Test-size settings (the defaults' coarsest level, 8, suits ~200-voxel images).
SMALL = AffineConfig(levels=(2, 1), iterations=(100, 30))


@pytest.fixture(scope="module")
def t1():
    """The MNI T1 cropped to 192x224x184 and block-averaged by 3: (64, 74, 61), 3 mm."""
    nib = pytest.importorskip("nibabel")
    img = np.asarray(nib.load(mni_path("t1")).dataobj, np.float32)[2:194, 4:226, 2:185]
    img = img.reshape(64, 3, 74, 3, 61, 3).mean(axis=(1, 3, 5))
    return img / img.max()


def _truth(shape, angles, shift, scale=1.0):
    """Fixed voxel -> moving voxel matrix: rotate/scale about the centre, then shift."""
    c = (np.asarray(shape) - 1) / 2.0
    lin = _rotation(angles) * scale
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = lin, c + np.asarray(shift, float) - lin @ c
    return m


def _moved(image, matrix):
    """moving with moving(matrix @ x) = image(x): image pulled through the inverse."""
    return np.asarray(warping.warp(image, affine.displacement(np.linalg.inv(matrix),
                                                              image.shape)))


def _error(found, true, shape, where):
    diff = affine.displacement(found, shape) - affine.displacement(true, shape)
    return float(jnp.mean(jnp.linalg.norm(diff, axis=-1)[where]))


def test_recovers_large_affine_motion_with_mind(t1):
    true = _truth(t1.shape, (10.0, 0.0, -12.0), (12.0, -9.0, 5.0), scale=1.05)
    head = t1 > 0.1
    result = affine.register_affine(t1, _moved(t1, true), config=SMALL)
    assert _error(np.eye(4), true, t1.shape, head) > 8.0  # a large motion to start with
    assert _error(result.matrix, true, t1.shape, head) < 0.6
    np.testing.assert_allclose(np.cbrt(np.linalg.det(result.matrix[:3, :3])), 1.05, atol=0.01)
    assert result.world is None and np.isfinite(result.loss)


def test_recovers_rigid_motion_with_mi(t1):
    true = _truth(t1.shape, (0.0, -11.0, 10.0), (-12.0, 4.0, 6.0))
    cfg = AffineConfig(kind="rigid", similarity="mi", levels=(2, 1), iterations=(100, 30))
    result = affine.register_affine(t1, _moved(t1, true), config=cfg)
    assert _error(result.matrix, true, t1.shape, t1 > 0.1) < 0.5
    lin = result.matrix[:3, :3]
    np.testing.assert_allclose(lin @ lin.T, np.eye(3), atol=1e-4)  # rigid stays rigid


def test_identity_pair_no_recompilation_and_world(t1):
    affine.register_affine(t1, t1[::-1].copy(), config=SMALL)
    compiled = affine._solve._cache_size()
    result = affine.register_affine(t1, t1, config=SMALL)
    disp = affine.displacement(result.matrix, t1.shape)
    assert float(jnp.max(jnp.linalg.norm(disp, axis=-1)[t1 > 0.1])) < 0.3
    # The same image placed 30 mm further along x in the world, 3 mm voxels, LPS-stored
    # axes: the voxel transform stays the identity, the world one is the 30 mm shift.
    fixed_affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    fixed_affine[:3, 3] = (90.0, 110.0, -70.0)
    moving_affine = fixed_affine.copy()
    moving_affine[0, 3] += 30.0
    placed = affine.register_affine(t1, t1, config=SMALL, fixed_affine=fixed_affine,
                                    moving_affine=moving_affine)
    assert affine._solve._cache_size() == compiled  # same shapes and config: no recompile
    np.testing.assert_allclose(placed.matrix, np.eye(4), atol=0.05)
    want = np.eye(4)
    want[0, 3] = 30.0
    np.testing.assert_allclose(placed.world, want, atol=0.15)
    np.testing.assert_allclose(placed.world, moving_affine @ placed.matrix
                               @ np.linalg.inv(fixed_affine), atol=1e-9)


def test_two_dimensional_rigid(t1):
    image = t1[:, :, 30]
    true = np.eye(3)
    c = (np.asarray(image.shape) - 1) / 2.0
    rot = _rotation((0.0, 0.0, 12.0))[:2, :2]
    true[:2, :2], true[:2, 2] = rot, c + np.array([8.0, -5.0]) - rot @ c
    moving = np.asarray(affine.displacement(np.linalg.inv(true), image.shape))
    assert moving.shape == image.shape + (2,)
    from scipy import ndimage
    coords = (np.indices(image.shape) + np.moveaxis(moving, -1, 0))
    moved = ndimage.map_coordinates(image, coords, order=1, mode="constant")
    cfg = AffineConfig(kind="rigid", similarity="ncc", levels=(2, 1), iterations=(100, 30))
    result = affine.register_affine(image, moved, config=cfg)
    assert result.matrix.shape == (3, 3)
    diff = affine.displacement(result.matrix, image.shape) - affine.displacement(
        true, image.shape)
    assert float(jnp.mean(jnp.linalg.norm(diff, axis=-1)[image > 0.1])) < 0.4


def test_compose_matches_warping_twice():
    rng = np.random.default_rng(0)
    shape = (24, 20, 16)
    coarse = rng.standard_normal((4, 4, 4))
    moving = np.asarray(jnp.asarray(warping.filters.resize(coarse, shape)))
    u = np.asarray(warping.filters.resize(rng.standard_normal((3, 3, 3, 3)), shape)) * 3.0
    m = _truth(shape, (15.0, -10.0, 0.0), (1.5, -2.0, 1.0), scale=1.05)
    twice = warping.warp(warping.warp(moving, affine.displacement(m, shape), mode="edge"),
                         u, mode="edge")
    once = warping.warp(moving, affine.compose(m, u), mode="edge")
    naive = warping.warp(moving, affine.displacement(m, shape) + u, mode="edge")
    inner = (slice(5, -5),) * 3
    err = float(jnp.mean(jnp.abs(twice - once)[inner]))
    assert err < 0.05 * float(jnp.std(moving))
    assert err < 0.2 * float(jnp.mean(jnp.abs(twice - naive)[inner]))
    # Exact form: A(x + u(x)) - x at one voxel.
    x = np.array([3.0, 7.0, 11.0])
    want = m[:3, :3] @ (x + u[3, 7, 11]) + m[:3, 3] - x
    np.testing.assert_allclose(np.asarray(affine.compose(m, u))[3, 7, 11], want, rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("name", ["out.tfm", "out.mat"])
def test_itk_file_maps_points_like_the_matrix(tmp_path, name):
    sitk = pytest.importorskip("SimpleITK")
    pytest.importorskip("nitransforms")
    world = np.eye(4)
    world[:3, :3] = _rotation((7.0, -4.0, 15.0)) @ np.diag([1.05, 0.97, 1.02])
    world[:3, 3] = (12.5, -3.0, 7.25)
    path = os.path.join(tmp_path, name)
    affine.save_itk(path, world)
    transform = sitk.ReadTransform(path)
    lps = np.diag([-1.0, -1.0, 1.0])
    for ras in ([10.0, -20.0, 30.0], [-55.0, 4.0, 0.5], [0.0, 0.0, 0.0]):
        want_ras = world[:3, :3] @ np.asarray(ras) + world[:3, 3]
        got_lps = np.asarray(transform.TransformPoint(tuple(lps @ np.asarray(ras))))
        # .mat holds doubles; nitransforms writes .tfm text with six significant digits.
        np.testing.assert_allclose(lps @ got_lps, want_ras,
                                   atol=1e-9 if name.endswith(".mat") else 1e-3)
    assert sorted(os.listdir(tmp_path)) == [name]  # nothing left over from the atomic write
    with pytest.raises(ValueError, match="4x4"):
        affine.save_itk(path, np.eye(3))


def test_bad_inputs_raise(t1):
    with pytest.raises(ValueError, match="kind"):
        AffineConfig(kind="similarity")
    with pytest.raises(ValueError, match="levels"):
        AffineConfig(levels=(4, 2), iterations=(10,))
    with pytest.raises(ValueError, match="both be 2D or both 3D"):
        affine.register_affine(t1, t1[..., 0])
    with pytest.raises(ValueError, match="mask shape"):
        affine.register_affine(t1, t1, mask=np.ones((3, 3, 3)))
    with pytest.raises(ValueError, match="both fixed_affine and moving_affine"):
        affine.register_affine(t1, t1, fixed_affine=np.eye(4))
    with pytest.raises(ValueError, match="too small"):
        affine.register_affine(t1[:20, :20, :20], t1[:20, :20, :20])
    with pytest.raises(ValueError, match="4x4"):
        affine.compose(np.eye(3), np.zeros((4, 4, 4, 3)))
