"""ConvexAdam in JAX: stage pieces against numpy, recovery on real anatomy, compilation
once per shape, vmap equal to a loop, and parity of outcome with the convexadam package."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from jaxreg import metrics
from jaxreg import mind
from jaxreg import phantom
from jaxreg import solver
from jaxreg import warping as W

FAST = solver.ConvexAdamConfig(iterations=5)


def test_correlation_cost_matches_brute_force():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(5, 6, 4, 2)).astype(np.float32)
    m = rng.normal(size=(5, 6, 4, 2)).astype(np.float32)
    cost = np.asarray(solver.correlation_cost(f, m, disp_hw=1))
    padded = np.pad(m, [(1, 1)] * 3 + [(0, 0)])
    for k, off in enumerate(solver._offsets(1).astype(int)):
        o = off + 1
        shifted = padded[o[0]:o[0] + 5, o[1]:o[1] + 6, o[2]:o[2] + 4]
        raw = np.sum((f - shifted) ** 2, axis=-1)
        ref = ndimage.uniform_filter(ndimage.uniform_filter(raw, 3, mode="constant"), 3,
                                     mode="constant")
        np.testing.assert_allclose(cost[k], ref, rtol=1e-4, atol=1e-5)


def test_coupled_convex_without_coupling_is_smoothed_argmin():
    cost = np.random.default_rng(1).random((27, 4, 5, 3)).astype(np.float32)
    out = solver.coupled_convex(cost, disp_hw=1, coupling=())
    chosen = solver._offsets(1)[np.argmin(cost, axis=0)]
    ref = ndimage.uniform_filter(chosen, size=(3, 3, 3, 1), mode="constant")
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_coupled_convex_finds_a_translation():
    rng = np.random.default_rng(2)
    f = ndimage.gaussian_filter(rng.normal(size=(14, 14, 14, 3)), (1, 1, 1, 0)).astype(np.float32)
    m = np.roll(f, shift=(2, -1, 1), axis=(0, 1, 2))  # m(x + (2, -1, 1)) == f(x)
    soft = np.asarray(solver.coupled_convex(solver.correlation_cost(f, m, disp_hw=3), disp_hw=3))
    np.testing.assert_allclose(soft[5:9, 5:9, 5:9], np.broadcast_to([2, -1, 1], (4, 4, 4, 3)),
                               atol=1e-5)


def test_inverse_consistency_keeps_a_consistent_pair():
    t = np.zeros((10, 10, 10, 3), np.float32)
    t[...] = [1.0, 0.0, -1.0]
    f, b = solver.inverse_consistency(t, -t, iterations=5)
    np.testing.assert_allclose(np.asarray(f)[2:-2, 2:-2, 2:-2], t[2:-2, 2:-2, 2:-2], atol=1e-5)
    np.testing.assert_allclose(np.asarray(b)[2:-2, 2:-2, 2:-2], -t[2:-2, 2:-2, 2:-2], atol=1e-5)


def _mni_pair(mni_small, seed=0, amplitude=3.0):
    t1, labels = mni_small
    v = phantom.random_field(t1.shape, amplitude=amplitude, seed=seed)
    moving = np.asarray(W.warp(t1, v, mode="edge"))
    moving_labels = np.asarray(W.warp_labels(labels, v))
    return t1, moving, labels, moving_labels, v


def test_register_mind_recovers_a_known_deformation_on_real_anatomy(mni_small):
    fixed, moving, fixed_labels, moving_labels, v = _mni_pair(mni_small)
    u = np.asarray(solver.register_mind(moving, fixed))  # align fixed to moving ...
    # ... so warping the fixed labels by u should reproduce the moving labels.
    before = metrics.dice(moving_labels, fixed_labels)
    after = metrics.dice(moving_labels, np.asarray(W.warp_labels(fixed_labels, u)))
    assert after[1] > before[1] + 0.05 and after[2] > before[2] + 0.05, (before, after)
    assert metrics.jacobian_stats(u)["folding_percent"] < 0.5
    brain = fixed_labels > 0
    assert metrics.field_error(u, v, mask=brain) < 0.5 * metrics.field_error(0 * v, v, mask=brain)


def test_second_pair_of_same_shape_does_not_recompile():
    rng = np.random.default_rng(3)
    shape = (18, 18, 18)
    a, b, c, d = (rng.random(shape).astype(np.float32) for _ in range(4))
    solver.register_mind(a, b, config=FAST).block_until_ready()
    size = solver.register_mind._cache_size()
    solver.register_mind(c, d, config=FAST).block_until_ready()
    assert solver.register_mind._cache_size() == size


def test_vmap_over_pairs_equals_loop():
    rng = np.random.default_rng(4)
    shape = (18, 18, 18, 4)
    fixed = ndimage.gaussian_filter(rng.normal(size=(2,) + shape), (0, 1, 1, 1, 0)).astype(np.float32)
    moving = np.roll(fixed, 1, axis=1)
    batched = jax.jit(jax.vmap(lambda f, m: solver.convex_adam(f, m, config=FAST)))(fixed, moving)
    for i in range(2):
        single = solver.convex_adam(fixed[i], moving[i], config=FAST)
        np.testing.assert_allclose(batched[i], single, atol=1e-4)


def test_fine_stage_accepts_a_custom_similarity():
    from jaxreg import losses
    rng = np.random.default_rng(5)
    f = ndimage.gaussian_filter(rng.normal(size=(16, 16, 16, 2)), (1, 1, 1, 0)).astype(np.float32)
    m = np.roll(f, 1, axis=0)
    init = np.zeros((16, 16, 16, 3), np.float32)
    u = solver.fine_stage(f, m, init, config=FAST,
                          similarity=lambda a, b: losses.ncc(a, b))
    assert u.shape == (16, 16, 16, 3) and np.all(np.isfinite(u))


def test_dice_at_least_as_high_as_convexadam_package(mni_small):
    torch = pytest.importorskip("torch")
    mind_pkg = pytest.importorskip("convexAdam.convex_adam_MIND")
    fixed, moving, fixed_labels, moving_labels, _ = _mni_pair(mni_small, seed=1)
    ours = np.asarray(solver.register_mind(moving, fixed))
    theirs = mind_pkg.convex_adam_pt(img_fixed=moving, img_moving=fixed,
                                     device=torch.device("cpu")).astype(np.float32)
    score = lambda u: np.mean(list(metrics.dice(
        moving_labels, np.asarray(W.warp_labels(fixed_labels, u))).values()))
    assert score(ours) >= score(theirs) - 0.01, (score(ours), score(theirs))
