"""Warp, compose and resize against scipy, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jaxreg import filters
from jaxreg import warping as W


def _case(seed=0, shape=(9, 10, 11), channels=None, scale=3.0):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=shape + ((channels,) if channels else ())).astype(np.float32)
    u = (rng.normal(size=shape + (3,)) * scale).astype(np.float32)
    return m, u


def _scipy(m, u, order, mode):
    coords = np.indices(u.shape[:3]) + np.moveaxis(u, -1, 0)
    return ndimage.map_coordinates(m, coords, order=order, mode=mode)


@pytest.mark.parametrize("mode, scipy_mode", [("zeros", "grid-constant"), ("edge", "nearest")])
def test_warp_matches_scipy_order1(mode, scipy_mode):
    m, u = _case()
    out = jax.jit(lambda a, b: W.warp(a, b, mode=mode))(m, u)
    np.testing.assert_allclose(out, _scipy(m, u, 1, scipy_mode), atol=1e-5)


def test_warp_labels_matches_scipy_order0():
    _, u = _case(1)
    labels = np.random.default_rng(2).integers(0, 6, size=u.shape[:3]).astype(np.int16)
    out = W.warp_labels(labels, u)
    assert out.dtype == labels.dtype
    np.testing.assert_array_equal(out, _scipy(labels, u, 0, "grid-constant"))


def test_warp_channels_last_equals_per_channel():
    m, u = _case(3, channels=4)
    out = W.warp(m, u)
    for c in range(4):
        np.testing.assert_allclose(out[..., c], _scipy(m[..., c], u, 1, "grid-constant"), atol=1e-5)


def test_warp_vmap_equals_loop():
    pairs = [_case(s, channels=2) for s in range(3)]
    ms = np.stack([p[0] for p in pairs])
    us = np.stack([p[1] for p in pairs])
    batched = jax.vmap(W.warp)(ms, us)
    for i in range(3):
        np.testing.assert_allclose(batched[i], W.warp(ms[i], us[i]), atol=1e-6)


def test_custom_vjp_field_gradient_matches_autodiff():
    m, u = _case(4, channels=3)

    def plain(m_, u_):
        coords = (W.identity_grid(u_.shape[:3]) + u_).reshape(-1, 3)
        return W._trilinear(m_, coords)

    g = np.random.default_rng(5).normal(size=u.shape[:3] + (3,)).astype(np.float32)
    loss = lambda f: lambda m_, u_: jnp.sum(f(m_, u_).reshape(g.shape) * g)
    gm, gu = jax.grad(loss(W.warp), argnums=(0, 1))(m, u)
    rm, ru = jax.grad(loss(plain), argnums=(0, 1))(m, u)
    np.testing.assert_allclose(gu, ru, atol=1e-4)
    np.testing.assert_allclose(gm, rm, atol=1e-5)


def test_field_gradient_matches_finite_differences():
    m, u = _case(6, shape=(6, 7, 8), scale=1.0)
    m = ndimage.gaussian_filter(m, 1.0)
    f = lambda v: jnp.sum(W.warp(m, v) ** 2)
    grad = np.asarray(jax.grad(f)(u))
    v = u.astype(np.float64)
    for idx in [(2, 3, 4, 0), (1, 1, 1, 2), (4, 5, 3, 1)]:
        e = np.zeros_like(v)
        e[idx] = 1e-3
        fd = (float(f(jnp.asarray(v + e, jnp.float32))) - float(f(jnp.asarray(v - e, jnp.float32)))) / 2e-3
        assert grad[idx] == pytest.approx(fd, rel=2e-2, abs=2e-2)


def test_compose_equals_sequential_warps():
    shape = (16, 15, 14)
    rng = np.random.default_rng(7)
    smooth = lambda: np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 3) * 20
                               for _ in range(3)], -1).astype(np.float32)
    a, b = smooth(), smooth()
    m = ndimage.gaussian_filter(rng.normal(size=shape), 2).astype(np.float32)
    two_steps = W.warp(W.warp(m, a, mode="edge"), b, mode="edge")
    one_step = W.warp(m, W.compose(a, b), mode="edge")
    inner = (slice(3, -3),) * 3
    assert np.abs(np.asarray(two_steps - one_step)[inner]).max() < 0.05 * np.abs(m).max()


def test_resize_field_scales_vectors():
    u = np.ones((8, 8, 8, 3), np.float32) * np.array([1.0, 2.0, 3.0], np.float32)
    out = W.resize_field(u, (16, 4, 8))
    np.testing.assert_allclose(out[3, 2, 1], [2.0, 1.0, 3.0], atol=1e-6)


def test_identity_grid_and_zero_field_is_identity():
    m, _ = _case(8)
    np.testing.assert_array_equal(W.identity_grid((2, 3, 4))[1, 2, 3], [1, 2, 3])
    np.testing.assert_allclose(W.warp(m, np.zeros(m.shape + (3,), np.float32)), m, atol=1e-6)


def test_bad_field_shape_raises():
    with pytest.raises(ValueError, match=r"\(H, W, D, 3\)"):
        W.warp(np.zeros((4, 4, 4)), np.zeros((4, 4, 4, 2)))


def test_filters_match_numpy_references():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(7, 8, 9, 2)).astype(np.float32)
    # zeros mode = avg_pool3d(count_include_pad=True): a zero-padded uniform filter
    ref = ndimage.uniform_filter(x, size=(3, 3, 3, 1), mode="constant")
    np.testing.assert_allclose(filters.box_filter(x, 3), ref, atol=1e-5)
    ref = ndimage.uniform_filter(x, size=(5, 5, 5, 1), mode="nearest")
    np.testing.assert_allclose(filters.box_filter(x, 5, mode="edge"), ref, atol=1e-5)
    pooled = filters.avg_pool(x, 2)
    assert pooled.shape == (3, 4, 4, 2)
    np.testing.assert_allclose(pooled[1, 2, 3], x[2:4, 4:6, 6:8].mean(axis=(0, 1, 2)), atol=1e-6)


def test_warp_and_warp_labels_run_as_compiled_programs():
    # Called on concrete arrays they are one jitted program each (not op by op), with the
    # results they give inside a user's jit; argument errors are still ValueErrors.
    m, u = _case(channels=2)
    assert hasattr(W.warp, "lower") and hasattr(W.warp_labels, "lower")
    np.testing.assert_array_equal(W.warp(m, u, mode="edge"),
                                  jax.jit(lambda a, b: W.warp(a, b, mode="edge"))(m, u))
    labels = (np.random.default_rng(1).random((9, 10, 11)) * 4).astype(np.int16)
    out = W.warp_labels(labels, u)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, jax.jit(W.warp_labels)(labels, u))
    with pytest.raises(ValueError, match="mode must be"):
        W.warp(m, u, mode="wrap")
    with pytest.raises(ValueError, match="labels must be"):
        W.warp_labels(labels[0], u)
