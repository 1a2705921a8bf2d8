"""Losses, regularisers and the Jacobian against numpy; the fused warp + SSD kernel against
the composition it replaces."""

import os

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


# --- warped_ssd: the fine stage's fused similarity (compiled CPU kernel) ----------------

def _warp_case(channels, seed=0, shape=(7, 8, 6)):
    rng = np.random.default_rng(seed)
    moving = rng.random(shape + (channels,)).astype(np.float32)
    fixed = rng.random(shape + (channels,)).astype(np.float32)
    disp = (2.0 * rng.normal(size=shape + (3,))).astype(np.float32)  # some points outside
    return moving, fixed, disp


@pytest.mark.parametrize("channels", [12, 5, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_warped_ssd_kernel_matches_the_composition(channels, masked):
    from jaxreg.kernels import cpu as cpu_kernels
    from jaxreg import warping

    if not cpu_kernels.usable():
        pytest.skip("no C++ compiler: the kernel is not built")
    moving, fixed, disp = _warp_case(channels)
    mask = None
    if masked:
        mask = np.zeros(disp.shape[:3], np.float32)
        mask[:5, 1:, :4] = 1.0

    def composed(m, u, f):
        return losses.ssd(warping.warp(m, u), f, mask=mask)

    fused = lambda m, u, f: losses.warped_ssd(m, u, f, mask=mask)
    for fn in (fused, jax.jit(fused)):
        np.testing.assert_allclose(fn(moving, disp, fixed), composed(moving, disp, fixed),
                                   rtol=1e-5)
    grads = jax.grad(fused, argnums=(0, 1, 2))(moving, disp, fixed)
    refs = jax.grad(composed, argnums=(0, 1, 2))(moving, disp, fixed)
    for got, ref in zip(grads, refs):  # moving, field, fixed
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    plain = losses.warped_ssd(moving, disp, fixed, mask=mask, kernel=False)
    assert float(plain) == float(composed(moving, disp, fixed))  # exactly the old path


def test_warped_ssd_kernel_batches_under_vmap():
    from jaxreg.kernels import cpu as cpu_kernels

    if not cpu_kernels.usable():
        pytest.skip("no C++ compiler: the kernel is not built")
    cases = [_warp_case(12, seed=s) for s in range(3)]
    moving, fixed, disp = (np.stack(x) for x in zip(*cases))
    fn = lambda u, m, f: losses.warped_ssd(m, u, f)
    batched = jax.vmap(jax.value_and_grad(fn))(disp, moving, fixed)
    for i in range(3):
        value, grad = jax.value_and_grad(fn)(disp[i], moving[i], fixed[i])
        np.testing.assert_allclose(batched[0][i], value, rtol=1e-6)
        np.testing.assert_allclose(batched[1][i], grad, rtol=1e-5, atol=1e-7)


def test_warped_ssd_without_the_kernel_is_the_composition(monkeypatch):
    from jaxreg.kernels import cpu as cpu_kernels
    from jaxreg import warping

    monkeypatch.setattr(cpu_kernels, "usable", lambda: False)
    moving, fixed, disp = _warp_case(4)
    got = losses.warped_ssd(moving, disp, fixed)
    assert float(got) == float(losses.ssd(warping.warp(moving, disp), fixed))


def test_cpu_kernels_off_without_a_compiler_or_when_asked(monkeypatch, tmp_path, caplog):
    from jaxreg.kernels import cpu as cpu_kernels

    check = cpu_kernels._load  # not the process's cached answer
    monkeypatch.setenv("JAXREG_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("JAXREG_CPU_KERNEL", "0")
    assert not check()
    monkeypatch.setenv("JAXREG_CPU_KERNEL", "1")
    monkeypatch.setenv("CXX", "/bin/false")  # a "compiler" that always fails
    assert not check()
    assert "did not build" in caplog.text
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert not check()
    assert "no C++ compiler" in caplog.text
    assert os.listdir(tmp_path / "kernels") == []  # no half-written library left behind


@pytest.mark.parametrize("width,times", [(3, 3), (5, 2), (1, 1), (3, 0)])
def test_box_smooth_kernel_is_repeated_box_filters_and_self_adjoint(width, times):
    from jaxreg.kernels import cpu as cpu_kernels
    from jaxreg import filters

    if not cpu_kernels.usable():
        pytest.skip("no C++ compiler: the kernel is not built")
    x = np.random.default_rng(0).normal(size=(2, 9, 7, 5, 3)).astype(np.float32)
    ref = x
    for _ in range(times):
        ref = jax.vmap(lambda a: filters.box_filter(a, width))(ref)
    np.testing.assert_allclose(cpu_kernels.box_smooth(x, width, times), ref, rtol=1e-5,
                               atol=1e-6)
    weights = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    grad = jax.grad(lambda a: (cpu_kernels.box_smooth(a, width, times) * weights).sum())(x)
    np.testing.assert_allclose(grad, cpu_kernels.box_smooth(weights, width, times),
                               rtol=1e-6)
    vmapped = jax.vmap(lambda a: cpu_kernels.box_smooth(a, width, times))(x)
    np.testing.assert_allclose(vmapped, ref, rtol=1e-5, atol=1e-6)
