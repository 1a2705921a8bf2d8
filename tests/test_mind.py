"""MIND-SSC against convexadam's PyTorch implementation (when installed), and on
constant and tiny images."""

import numpy as np
import pytest

from jaxreg.features import mind


@pytest.mark.parametrize("radius, dilation", [(1, 2), (2, 2), (1, 1), (2, 3)])
def test_mind_ssc_matches_convexadam(radius, dilation):
    torch = pytest.importorskip("torch")
    convex_utils = pytest.importorskip("convexAdam.convex_adam_utils")
    img = np.random.default_rng(radius * 10 + dilation).normal(size=(14, 17, 12)).astype(np.float32)
    ref = convex_utils.MINDSSC(torch.from_numpy(img)[None, None], radius, dilation, device="cpu")
    ref = ref[0].permute(1, 2, 3, 0).numpy()
    out = np.asarray(mind.mind_ssc(img, radius=radius, dilation=dilation))
    assert out.shape == ref.shape == (14, 17, 12, 12)
    np.testing.assert_allclose(out, ref, atol=5e-5)


def test_mind_ssc_is_contrast_invariant():
    img = np.random.default_rng(0).normal(size=(10, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(mind.mind_ssc(img), mind.mind_ssc(3.0 * img + 7.0), atol=1e-4)


def test_mind_ssc_rejects_non_3d():
    # 2D images (H, W) are valid since the 2D MIND-SSC (tests/test_2d.py); a channel axis is not
    with pytest.raises(ValueError, match="must be"):
        mind.mind_ssc(np.zeros((4, 4, 4, 1)))


def test_padded_image_with_its_extent_gets_the_unpadded_descriptor():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(11, 9, 7)).astype(np.float32)
    img[:, :, :2] = 0.0  # a flat region, where the clipped mean variance matters
    padded = np.pad(img, ((0, 5), (0, 3), (0, 4)))
    got = np.asarray(mind.mind_ssc(padded, extent=(11, 9, 7)))[:11, :9, :7]
    np.testing.assert_allclose(got, np.asarray(mind.mind_ssc(img)), atol=1e-6)
    assert not np.allclose(np.asarray(mind.mind_ssc(padded))[:11, :9, :7], got, atol=1e-3)


def test_mind_ssc_of_a_constant_image_is_all_ones():
    for value in (0.0, 3.0):
        out = np.asarray(mind.mind_ssc(np.full((6, 5, 4), value, np.float32)))
        np.testing.assert_array_equal(out, np.ones((6, 5, 4, 12), np.float32))


@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("axis", [0, 2])
def test_mind_ssc_on_tiny_sizes(size, axis):
    shape = [7, 8, 6]
    shape[axis] = size
    img = np.random.default_rng(size).normal(size=shape).astype(np.float32)
    out = np.asarray(mind.mind_ssc(img))
    assert out.shape == tuple(shape) + (12,)
    assert np.all(np.isfinite(out)) and out.min() > 0 and out.max() <= 1


def _numpy_mind(img, radius=1, dilation=2):
    """MIND-SSC written out in numpy: the channel min and mean as reductions."""
    from scipy import ndimage

    pad = 2 * dilation
    padded = np.pad(img, pad, mode="edge")
    ssd = []
    for a, b in zip(mind._FIRST, mind._SECOND):
        sa = padded[tuple(slice(pad + o * dilation, pad + o * dilation + n)
                          for o, n in zip(a, img.shape))]
        sb = padded[tuple(slice(pad + o * dilation, pad + o * dilation + n)
                          for o, n in zip(b, img.shape))]
        ssd.append(ndimage.uniform_filter((sa - sb) ** 2, 2 * radius + 1, mode="nearest"))
    ssd = np.stack(ssd)
    d = ssd - ssd.min(axis=0)
    var = d.mean(axis=0)
    var = np.clip(var, var.mean() * 0.001, var.mean() * 1000.0)
    return np.moveaxis(np.exp(-d / var), 0, -1)


def test_mind_ssc_in_a_plain_jit_is_the_reference_formula():
    # The channel min and mean are written as elementwise chains (XLA:CPU's YNNPACK
    # fusion ran them as reductions 3x slower in a plain jit); same values.
    import jax

    from jaxreg import compilation

    img = np.random.default_rng(3).random((12, 11, 10)).astype(np.float32)
    plain = np.asarray(jax.jit(mind.mind_ssc)(img))
    np.testing.assert_array_equal(plain, np.asarray(compilation.jit(mind.mind_ssc)(img)))
    np.testing.assert_allclose(plain, _numpy_mind(img.astype(np.float64)), rtol=2e-5,
                               atol=2e-6)
