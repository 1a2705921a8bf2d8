"""Parzen-window mutual information: numpy reference, sklearn, jit/vmap, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import solver
from jaxreg import warping
from jaxreg.losses import mi as mi_lib
from jaxreg.losses.mi import MIConfig, mutual_information


def _reference_mi(a, b, mask, bins, kernel, sigma, a_range, b_range, normalised):
    """The same Parzen estimator written plainly in numpy (float64, N x bins arrays)."""
    def weights(x, rng):
        v = np.clip((x.ravel() - rng[0]) / (rng[1] - rng[0]) * (bins - 1), 0, bins - 1)
        d = v[:, None] - np.arange(bins)[None]
        if kernel == "gaussian":
            w = np.exp(-0.5 * (d / sigma) ** 2)
        else:
            t = np.abs(d)
            w = np.where(t < 1, (4 - 6 * t**2 + 3 * t**3) / 6,
                         np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
        return w / w.sum(axis=1, keepdims=True)

    m = np.ones(a.size) if mask is None else mask.ravel().astype(np.float64)
    joint = weights(a, a_range).T @ (weights(b, b_range) * m[:, None])
    p = joint / joint.sum()
    pa, pb = p.sum(1), p.sum(0)
    ent = lambda q: -np.sum(q[q > 0] * np.log(q[q > 0]))
    if normalised:
        return (ent(pa) + ent(pb)) / ent(p)
    return ent(pa) + ent(pb) - ent(p)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    a = rng.random((12, 10, 8)).astype(np.float32)
    b = (np.cos(3 * a) + 0.2 * rng.random(a.shape)).astype(np.float32)
    return a, b


@pytest.mark.parametrize("kernel", ["gaussian", "bspline"])
@pytest.mark.parametrize("normalised", [False, True])
def test_matches_numpy_reference(pair, kernel, normalised):
    a, b = pair
    mask = np.zeros(a.shape, np.float32)
    mask[2:10, 1:9, :6] = 1.0
    cfg = MIConfig(bins=16, kernel=kernel, sigma=0.7, normalised=normalised, chunk=100)
    ra, rb = (0.1, 0.9), (float(b.min()), float(b.max()))
    got = mutual_information(a, b, mask=mask, config=cfg, a_range=ra, b_range=rb)
    want = _reference_mi(a, b, mask, 16, kernel, 0.7, ra, rb, normalised)
    np.testing.assert_allclose(-float(got), want, rtol=2e-5)
    # Chunking does not change the estimate (one chunk vs 100-voxel chunks).
    whole = mutual_information(a, b, mask=mask, config=MIConfig(
        bins=16, kernel=kernel, sigma=0.7, normalised=normalised, chunk=10**6),
        a_range=ra, b_range=rb)
    np.testing.assert_allclose(float(whole), float(got), rtol=1e-5)


def test_percentile_ranges_match_numpy(pair):
    a, b = pair
    cfg = MIConfig(bins=24, percentiles=(2.0, 98.0))
    got = mutual_information(a, b, config=cfg)
    ra = np.percentile(a, [2.0, 98.0])
    rb = np.percentile(b, [2.0, 98.0])
    want = _reference_mi(a, b, None, 24, "gaussian", 0.5, ra, rb, False)
    np.testing.assert_allclose(-float(got), want, rtol=1e-4)
    mask = (a > 0.3).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(mi_lib.intensity_range(b, mask=mask, percentiles=(5.0, 95.0))),
        np.percentile(b[a > 0.3], [5.0, 95.0]), rtol=1e-5)


def test_hard_binned_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 8, 5000)
    y = (x + rng.integers(0, 3, 5000)) % 8  # dependent labels
    cfg = MIConfig(bins=8, sigma=0.05, percentiles=(0.0, 100.0))
    got = -float(mutual_information(x.astype(np.float32), y.astype(np.float32), config=cfg,
                                    a_range=(0, 7), b_range=(0, 7)))
    want = metrics.mutual_info_score(x, y)
    assert want > 0.3
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_self_beats_shuffled_and_inversion_invariant(pair):
    a, _ = pair
    img = np.asarray(jax.image.resize(jnp.asarray(a), (24, 20, 16), "linear"))
    shuffled = np.random.default_rng(2).permutation(img.ravel()).reshape(img.shape)
    for cfg in (MIConfig(), MIConfig(normalised=True, kernel="bspline")):
        self_mi = float(mutual_information(img, img, config=cfg))
        assert self_mi < float(mutual_information(img, shuffled, config=cfg)) - 0.3
        inverted = img.max() - img
        np.testing.assert_allclose(float(mutual_information(inverted, img, config=cfg)),
                                   self_mi, rtol=1e-4)


def test_jit_vmap_and_gradients(pair):
    a, b = pair
    cfg = MIConfig(bins=16, chunk=256)
    loss = lambda x, y: mutual_information(x, y, config=cfg)
    eager = loss(a, b)
    np.testing.assert_allclose(float(jax.jit(loss)(a, b)), float(eager), rtol=1e-5)
    batch_a, batch_b = np.stack([a, b, a]), np.stack([b, a, a])
    batched = jax.vmap(loss)(batch_a, batch_b)
    for i in range(3):
        np.testing.assert_allclose(float(batched[i]), float(loss(batch_a[i], batch_b[i])),
                                   rtol=1e-5)
    grad = jax.jit(jax.grad(loss))(a, b)
    assert grad.shape == a.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.max(jnp.abs(grad))) > 0
    # The gradient is the derivative: a small step along it lowers the loss.
    step = a - 1e-3 * np.asarray(grad) / float(jnp.max(jnp.abs(grad)))
    assert float(loss(step, b)) < float(eager)


def test_gradient_through_warp_is_finite_and_correct_sign():
    rng = np.random.default_rng(3)
    img = np.asarray(jax.image.resize(jnp.asarray(rng.random((5, 5, 5))), (16, 16, 16),
                                      "cubic"), np.float32)
    shift = jnp.zeros((16, 16, 16, 3)).at[..., 0].set(1.0)
    moving = np.asarray(warping.warp(img, -shift, mode="edge"))  # moving(x) = img(x - 1)
    loss = lambda s: mutual_information(
        warping.warp(moving, shift * s, mode="edge"), img, config=MIConfig(bins=16))
    value, slope = jax.value_and_grad(loss)(0.5)
    assert np.isfinite(float(slope)) and float(slope) < 0  # moving towards s = 1 helps
    assert float(loss(1.0)) < float(value)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="bins"):
        MIConfig(bins=2)
    with pytest.raises(ValueError, match="kernel"):
        MIConfig(kernel="box")
    with pytest.raises(ValueError, match="percentiles"):
        MIConfig(percentiles=(50.0, 10.0))
    with pytest.raises(ValueError, match="shapes differ"):
        mutual_information(np.zeros((3, 3)), np.zeros((3, 4)))


def test_fine_stage_similarity_runs():
    rng = np.random.default_rng(4)
    img = np.asarray(jax.image.resize(jnp.asarray(rng.random((6, 6, 6))), (24, 24, 24),
                                      "cubic"), np.float32)
    field = jnp.zeros((24, 24, 24, 3)).at[..., 1].set(1.5)
    moving = np.asarray(warping.warp(img, -field, mode="edge"))
    sim = mi_lib.fine_similarity(config=MIConfig(bins=16, percentiles=(0.0, 100.0)),
                                 weight=5.0)
    cfg = solver.ConvexAdamConfig(iterations=30, lambda_weight=0.1, learning_rate=0.5)
    out = jax.jit(lambda f, m: solver.fine_stage(f, m, jnp.zeros((24, 24, 24, 3)),
                                                 config=cfg, similarity=sim))(
        img[..., None], moving[..., None])
    assert out.shape == (24, 24, 24, 3) and bool(jnp.all(jnp.isfinite(out)))
    inner = (slice(6, 18),) * 3
    # The recovered field moves towards the true 1.5-voxel shift along axis 1.
    assert float(jnp.mean(out[inner][..., 1])) > 0.5
