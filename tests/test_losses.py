"""Losses, regularisers and the Jacobian against numpy."""

import jax
import numpy as np
import pytest

from jaxreg import losses
from jaxreg import regularisers


def _pair(seed=0, shape=(8, 9, 10)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_ssd_and_mask():
    a, b = _pair()
    assert float(jax.jit(losses.ssd)(a, b)) == pytest.approx(np.mean((a - b) ** 2), rel=1e-5)
    mask = np.zeros(a.shape, np.float32)
    mask[2:5] = 1
    assert float(losses.ssd(a, b, mask=mask)) == pytest.approx(np.mean((a - b)[2:5] ** 2), rel=1e-5)


def test_ncc_matches_numpy_and_is_minus_one_for_affine_intensity():
    a, b = _pair(1)
    ref = -np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert float(losses.ncc(a, b)) == pytest.approx(ref, abs=1e-5)
    assert float(losses.ncc(a, 3 * a + 2)) == pytest.approx(-1.0, abs=1e-5)


def test_local_ncc_bounds():
    a, b = _pair(2)
    assert float(losses.local_ncc(a, 2 * a - 1, window=5)) == pytest.approx(-1.0, abs=1e-3)
    value = float(losses.local_ncc(a, b, window=5))
    assert -1.0 <= value < -0.0 and value > -0.5


def test_diffusion_matches_numpy():
    u = np.random.default_rng(3).normal(size=(6, 7, 8, 3)).astype(np.float32)
    ref = sum(np.mean(np.diff(u, axis=a) ** 2) for a in range(3))
    assert float(regularisers.diffusion(u)) == pytest.approx(ref, rel=1e-5)


def test_bending_energy_zero_for_affine_field_positive_otherwise():
    grid = np.stack(np.meshgrid(*[np.arange(8.0)] * 3, indexing="ij"), -1)
    affine = (grid @ np.array([[0.1, 0.2, 0], [0, -0.1, 0.3], [0.2, 0, 0.1]])).astype(np.float32)
    assert float(regularisers.bending_energy(affine)) == pytest.approx(0.0, abs=1e-8)
    assert float(regularisers.bending_energy((grid**2 * 0.01).astype(np.float32))) > 1e-6


def test_jacobian_determinant_of_affine_field():
    grid = np.stack(np.meshgrid(*[np.arange(6.0)] * 3, indexing="ij"), -1)
    a = np.array([[0.5, 0.1, 0.0], [0.0, -0.2, 0.3], [0.1, 0.0, 0.4]])
    u = (grid @ a.T).astype(np.float32)
    det = regularisers.jacobian_determinant(u)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + a), rtol=1e-5)
    folded = (grid * -2.0).astype(np.float32)  # x -> -x: det -1
    assert float(regularisers.jacobian_determinant(folded)[2, 2, 2]) == pytest.approx(-1.0)


def test_masked_diffusion_of_a_padded_field_is_the_unpadded_one():
    u = np.random.default_rng(1).normal(size=(6, 5, 4, 3)).astype(np.float32)
    padded = np.pad(u, ((0, 2), (0, 3), (0, 1), (0, 0)), constant_values=7.0)
    mask = np.zeros(padded.shape[:3], np.float32)
    mask[:6, :5, :4] = 1.0
    np.testing.assert_allclose(regularisers.diffusion(padded, mask=mask),
                               regularisers.diffusion(u), rtol=1e-6)
