"""Batching: bucket planning, padding, vmap and sharded batches equal to a loop of
the one-pair function, one compilation per bucket, memory estimate against XLA's own
accounting, and a four-device run in a subprocess."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxreg import phantom
from jaxreg import solver
from jaxreg.features import mind
from jaxreg.features import sources
from jaxreg.solver import batching

FAST = solver.ConvexAdamConfig(iterations=5)
SMALL = (24, 30, 18)  # already a multiple of 6
OTHER = (20, 28, 16)  # rounds up to (24, 30, 18): same bucket
LARGE = (30, 36, 24)  # a bucket of its own


def _pairs(shapes, seed=0):
    """MIND-SSC features of phantom pairs of these shapes."""
    out = []
    for i, s in enumerate(shapes):
        p = phantom.breast_pair("date", shape=s, seed=seed + i, amplitude=2.0)
        feats = sources.MindSource()(p["fixed"], p["moving"])
        out.append((np.asarray(feats.fixed), np.asarray(feats.moving)))
    return out


def _stack(pairs, shape):
    fixed = np.stack([batching.pad_to(f, shape) for f, _ in pairs])
    moving = np.stack([batching.pad_to(m, shape) for _, m in pairs])
    return fixed, moving, np.array([f.shape[:3] for f, _ in pairs])


def _loop(fixed, moving, extents, config=FAST):
    return np.stack([np.asarray(batching.register_padded(f, m, e, config=config))
                     for f, m, e in zip(fixed, moving, extents)])


def test_plan_buckets_rounds_and_merges():
    shapes = [SMALL, LARGE, OTHER, (23, 29, 17)]
    buckets = batching.plan_buckets(shapes, multiple=6)
    assert buckets == [batching.Bucket((30, 36, 24), (1,)),
                       batching.Bucket((24, 30, 18), (0, 2, 3))]
    # Generous waste merges everything into the largest shape; none keeps rounded shapes.
    assert batching.plan_buckets(shapes, max_waste=1.0) == [
        batching.Bucket((30, 36, 24), (0, 1, 2, 3))]
    assert len(batching.plan_buckets([SMALL, (24, 30, 24)], max_waste=0.0)) == 2
    for bucket in batching.plan_buckets([(7, 50, 13), (12, 44, 18), (40, 9, 9)]):
        assert all(s % 6 == 0 for s in bucket.shape)
    with pytest.raises(ValueError, match="three positive sizes"):
        batching.plan_buckets([(24, 30)])


def test_pad_to_pads_at_the_end():
    vol = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    padded = batching.pad_to(vol, (4, 3, 6))
    np.testing.assert_array_equal(padded[:2, :, :4], vol)
    assert padded.shape == (4, 3, 6) and padded.sum() == vol.sum()
    feats = batching.pad_to(jax.numpy.ones((2, 3, 4, 5)), (4, 3, 6))
    assert isinstance(feats, jax.Array) and float(feats[:2, :, :4].sum()) == feats.sum() == 120
    with pytest.raises(ValueError, match="does not fit"):
        batching.pad_to(vol, (1, 3, 4))


def test_pad_batch_repeats_the_last_pair():
    x = np.arange(3)[:, None] * np.ones((3, 2))
    padded, n = batching.pad_batch(x, 4)
    assert n == 3 and padded.shape == (4, 2)
    np.testing.assert_array_equal(padded[3], x[2])
    assert batching.pad_batch(x, 3)[0].shape == (3, 2)


@pytest.fixture(scope="module")
def small_bucket():
    pairs = _pairs([SMALL, OTHER, SMALL])
    stacked = _stack(pairs, SMALL)
    return pairs, stacked, _loop(*stacked)


def test_vmap_batch_equals_loop(small_bucket):
    _, stacked, looped = small_bucket
    batched = batching.register_batch(*stacked, config=FAST)
    assert batched.shape == looped.shape == (3,) + SMALL + (3,)
    np.testing.assert_allclose(batched, looped, atol=1e-5)


@pytest.mark.parametrize("shape,bucket", [(OTHER, SMALL), ((23, 29, 17), LARGE)])
def test_padded_pair_equals_unpadded(shape, bucket):
    # The padding is outside the image for the costs, every average, the inverse
    # consistency and the resizes: the same field on the pair's own voxels, whether or
    # not its sides are multiples of the pooling factors.
    config = solver.ConvexAdamConfig(iterations=20, final_smooth=3)
    p = phantom.breast_pair("date", shape=shape, seed=1, amplitude=3.0)
    plain = np.asarray(solver.register_mind(p["fixed"], p["moving"], config=config,
                                            percentiles=None))  # MIND of the raw images
    f, m = (np.asarray(mind.mind_ssc(p[k])) for k in ("fixed", "moving"))
    crop = tuple(slice(0, s) for s in shape)
    padded = np.asarray(batching.register_padded(batching.pad_to(f, bucket),
                                                 batching.pad_to(m, bucket), shape,
                                                 config=config))
    assert np.abs(plain).max() > 1.0
    np.testing.assert_allclose(padded[crop], plain, atol=1e-5)
    # With the whole grid as extent the padding is image content: the field differs.
    unmasked = np.asarray(batching.register_padded(batching.pad_to(f, bucket),
                                                   batching.pad_to(m, bucket), bucket,
                                                   config=config))
    assert np.abs(unmasked[crop] - plain).max() > 1e-2


def test_padded_features_equal_unpadded():
    rng = np.random.default_rng(0)
    shape, bucket = (22, 26, 14), (24, 30, 18)
    base = rng.normal(size=shape + (4,)).astype(np.float32)
    fixed = base
    moving = np.roll(base, 1, axis=0) + 0.1 * rng.normal(size=base.shape).astype(np.float32)
    config = solver.ConvexAdamConfig(iterations=10, similarity_weight=1.0)
    plain = np.asarray(solver.convex_adam(fixed, moving, config=config))
    padded = np.asarray(batching.register_padded(batching.pad_to(fixed, bucket),
                                                 batching.pad_to(moving, bucket), shape,
                                                 config=config))
    np.testing.assert_allclose(padded[:22, :26, :14], plain, atol=1e-5)


def test_sharded_mixed_sizes_equal_sequential():
    mesh = jax.make_mesh((2,), ("pairs",), devices=jax.devices()[:2])
    shapes = [SMALL, LARGE, OTHER]  # two buckets, the small one of 2, the large of 1
    pairs = _pairs(shapes, seed=10)
    for bucket in batching.plan_buckets(shapes):
        stacked = _stack([pairs[i] for i in bucket.indices], bucket.shape)
        out = batching.register_batch(*stacked, config=FAST, mesh=mesh)
        assert out.shape == (len(bucket.indices),) + bucket.shape + (3,)
        np.testing.assert_allclose(out, _loop(*stacked), atol=1e-5)


def test_a_bucket_compiles_once(small_bucket):
    _, (fixed, moving, extents), _ = small_bucket
    mesh = jax.make_mesh((2,), ("pairs",), devices=jax.devices()[:2])
    fn = batching._batched(FAST, mesh, "pairs")
    batching.register_batch(fixed[:2], moving[:2], extents[:2], config=FAST, mesh=mesh)
    size = fn._cache_size()
    # Other pairs of the same bucket shape and batch size: no new compilation.
    batching.register_batch(fixed[1:3], moving[1:3], extents[1:3], config=FAST, mesh=mesh)
    batching.register_batch(fixed[::-1][:2], moving[:2], extents[:2], config=FAST, mesh=mesh)
    assert fn._cache_size() == size
    assert batching._batched(FAST, mesh, "pairs") is fn


def test_plan_batch_fits_and_refuses_clearly():
    per = batching.estimate_pair_bytes(SMALL, config=FAST)
    assert batching.plan_batch(SMALL, config=FAST, device_bytes=10 * per) == 10
    assert batching.plan_batch(SMALL, config=FAST, device_bytes=10 * per,
                               batch_per_device=4) == 4
    with pytest.raises(ValueError, match=r"one pair of shape \(192, 224, 184\) needs ~.* GiB, "
                                         r"the device has 0.50 GiB"):
        batching.plan_batch((192, 224, 184), config=FAST, device_bytes=2**29)
    assert batching.device_memory_bytes(jax.devices()[0]) > 2**28


@pytest.mark.parametrize("shape,config", [
    (SMALL, FAST),
    ((48, 42, 30), FAST),
    ((36, 36, 36), solver.ConvexAdamConfig(iterations=5, disp_hw=6, grid_sp_adam=1)),
])
def test_memory_estimate_bounds_xla_accounting(shape, config):
    x = jax.ShapeDtypeStruct(shape + (12,), np.float32)
    extent = jax.ShapeDtypeStruct((3,), np.int32)
    compiled = batching.register_padded.lower(x, x, extent, config=config).compile()
    m = compiled.memory_analysis()
    measured = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    estimate = batching.estimate_pair_bytes(shape, config=config)
    assert measured <= estimate <= 1.5 * measured, (estimate, measured)


_CHILD = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    import sys
    sys.path.insert(0, {tests!r})
    import test_batching as t
    from jaxreg.solver import batching
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("pairs",))
    shapes = [t.SMALL, t.LARGE, t.OTHER, t.SMALL, t.OTHER]
    pairs = t._pairs(shapes, seed=20)
    for bucket in batching.plan_buckets(shapes):
        stacked = t._stack([pairs[i] for i in bucket.indices], bucket.shape)
        out = batching.register_batch(*stacked, config=t.FAST, mesh=mesh)
        assert len(out.sharding.device_set) == 4
        np.testing.assert_allclose(out, t._loop(*stacked), atol=1e-5)
    print("ok", [b.shape for b in batching.plan_buckets(shapes)])
""")


def test_four_devices_in_a_subprocess():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok" in proc.stdout


def test_continue_edge_and_extent_mask():
    from jaxreg import filters

    x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    out = np.asarray(filters.continue_edge(np.pad(x, ((0, 2), (0, 1), (0, 1))), (4, 3, 2)))
    np.testing.assert_array_equal(out, np.pad(x, ((0, 2), (0, 1), (0, 1)), mode="edge"))
    mask = np.asarray(filters.extent_mask((6, 4, 3), (4, 3, 2)))
    assert mask.sum() == 24 and mask[:4, :3, :2].all()
