"""Precise features (issue 27): sub-token shifts.

The shifts are checked against numpy on an encoder whose token is the mean of its patch:
the interleaved map must be the patch means at the shifted centres (an off-by-half-token
placement fails), and a ramp image must come back as the same ramp on the image grid.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg import features as F
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.features import subtoken

from helpers import PATCH
from test_features import TwoStrideEncoder


class MeanEncoder(nnx.Module):
    """One channel: each token is the mean of channel 0 over its 4x4 patch."""

    def __init__(self):
        self.unused = nnx.Param(jnp.zeros(1))

    def __call__(self, images):
        b, h, w, _ = images.shape
        x = images[..., 0].reshape(b, h // PATCH, PATCH, w // PATCH, PATCH)
        return {"features": x.mean(axis=(2, 4))[..., None]}


def mean_encoder(resize="square", image_size=32, shifts=1):
    spec = EncoderSpec(name="mean", config=None, patch_size=PATCH, channels=1,
                       preprocessing=Preprocessing(image_size=image_size, resize=resize))
    return F.SliceEncoder(MeanEncoder(), spec, layers=("features",), chunk=2, shifts=shifts)


def patch_means(x, starts_y, starts_x):
    """Means of the 4x4 windows of ``x`` starting at each (integer) pair of starts, zero
    outside ``x``."""
    pad = np.pad(x, PATCH)
    return np.array([[pad[a + PATCH:a + 2 * PATCH, b + PATCH:b + 2 * PATCH].mean()
                      for b in starts_x] for a in starts_y])


# sub-token shifts ----------------------------------------------------------------------

def test_shift_offsets_are_centred_fractions_of_a_token():
    assert subtoken.shift_offsets(1, 4.0) == (0.0,)
    assert subtoken.shift_offsets(2, 4.0) == (-1.0, 1.0)
    assert subtoken.shift_offsets(2, 16.0) == (-4.0, 4.0)
    np.testing.assert_allclose(subtoken.shift_offsets(3, 4.0), (-4 / 3, 0.0, 4 / 3))


def test_interleaved_map_is_the_patch_means_at_the_shifted_centres():
    slices = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    enc = mean_encoder(shifts=2)
    dense = enc(slices)["features"][..., 0]
    assert dense.shape == (3, 16, 16) and enc.calls == 3 * 4  # the cost: shifts**2
    x = np.asarray(F.encoder_input(slices, enc.spec.preprocessing, image_size=32))[..., 0]
    # Dense cell k covers input pixels [2k - 1, 2k + 3): centre 2k + 1 = (k + 1/2) * 2.
    starts = 2 * np.arange(16) - 1
    for i in range(3):
        np.testing.assert_allclose(dense[i], patch_means(x[i], starts, starts), atol=1e-6)
    # Shifting by 0 and +1/2 token instead puts every cell half a dense stride off.
    late = patch_means(x[0], starts + 1, starts + 1)
    assert np.abs(dense[0] - late).max() > 0.05
    assert enc.strides() == {"features": (2.0, 2.0)}
    assert enc.token_scale((32, 32)) == (2.0, 2.0)


def test_fractional_shifts_sample_a_ramp_at_the_dense_centres():
    # s = 3, stride 4: shifts of -4/3, 0, 4/3 pixels (bilinear). A ramp's patch mean is the
    # ramp at the patch centre, so every interior dense cell k holds the ramp at
    # (k + 1/2) * 4/3 - 1/2 (pixel indices).
    u = np.arange(32, dtype=np.float32)
    ramp = (0.01 * u[:, None] + 0.02 * u[None, :])[None]
    dense = mean_encoder(shifts=3)(ramp)["features"][0, ..., 0]
    assert dense.shape == (24, 24)
    centres = (np.arange(24) + 0.5) * 4 / 3 - 0.5
    expected = 0.01 * centres[:, None] + 0.02 * centres[None, :]
    np.testing.assert_allclose(dense[2:-2, 2:-2], expected[2:-2, 2:-2], atol=1e-5)


@pytest.mark.parametrize("shifts", [1, 2])
def test_shifted_maps_land_on_the_image_grid_where_they_belong(shifts):
    # A 24 x 12 slice padded into a 32 x 32 input (longest side 32): a ramp in slice pixels
    # must come back as the same ramp through the encoder, the dense map's cropping and
    # its token scale, and to_image_grid (a half-token error is 0.75 pixels here).
    u, v = np.arange(24, dtype=np.float32), np.arange(12, dtype=np.float32)
    ramp = 0.02 * u[:, None] + 0.03 * v[None, :]
    enc = mean_encoder(resize="longest_side_pad", shifts=shifts)
    tokens = enc(ramp[None])["features"]
    assert tokens.shape == (1, 8 * shifts, 4 * shifts, 1)
    ppt = enc.token_scale((24, 12))
    assert ppt == (3.0 / shifts, 3.0 / shifts)
    plan = F.slice_plan(np.stack([ramp, ramp + 0.1], -1), axis=2, gap=1)
    grid = np.asarray(F.to_image_grid(np.concatenate([tokens, tokens]), plan, (24, 12, 2),
                                      pixels_per_token=ppt))[..., 0, 0]
    np.testing.assert_allclose(grid[4:-4, 4:-4], ramp[4:-4, 4:-4], atol=1e-5)


def test_shifts_reach_pair_features_and_the_cache_key(tmp_path):
    u = np.arange(20, dtype=np.float32)
    vol = np.broadcast_to((0.02 * u[:, None] + 0.01 * u[None, :16])[..., None], (20, 16, 6))
    vol = vol + 0.001 * np.arange(6, dtype=np.float32)  # no uniform slice
    enc = mean_encoder(resize="longest_side_pad")
    cache = F.FeatureCache(str(tmp_path))
    cfg = F.FeatureConfig(shifts=2, gap=1, pca_dims=1, scale=False, percentiles=(0.0, 100.0))
    feats = np.asarray(F.pair_features(vol, vol, enc, config=cfg, cache=cache)["features"][0])
    assert enc.calls == 0  # the shifted copy encoded, sharing the weights
    inner = feats[4:-4, 4:-4, :, 0]
    ramp = vol[4:-4, 4:-4]
    sign = np.sign(np.corrcoef(inner.ravel(), ramp.ravel())[0, 1])
    scale = 1.0 / np.ptp(vol)  # min-max normalisation (percentiles 0 and 100)
    np.testing.assert_allclose(sign * (inner - inner.mean()), scale * (ramp - ramp.mean()),
                               atol=1e-4)
    shifted = enc.with_shifts(2)
    assert enc.with_shifts(1) is enc and shifted.shifts == 2 and enc.shifts == 1
    assert '"shifts": 2' in shifted.key() and "shifts" not in enc.key()
    sl = np.zeros((2, 8, 8), np.float32)
    assert cache.path(sl, enc) != cache.path(sl, shifted)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # fixed and moving: one content


def test_shifts_need_maps_of_one_stride_and_a_positive_count():
    spec = EncoderSpec(name="strides", config=None, patch_size=PATCH, channels=2,
                       preprocessing=Preprocessing(image_size=32))
    enc = F.SliceEncoder(TwoStrideEncoder(), spec, layers=("stage_1", "features"), chunk=2,
                         shifts=2)
    with pytest.raises(ValueError, match="one stride"):
        enc(np.zeros((1, 16, 16), np.float32))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="shifts"):
            F.FeatureConfig(shifts=bad)
        with pytest.raises(ValueError, match="shifts"):
            enc.with_shifts(bad)
