"""Precise features (issue 27): sub-token shifts and guided upsampling of the token maps.

The shifts are checked against numpy on an encoder whose token is the mean of its patch:
the interleaved map must be the patch means at the shifted centres (an off-by-half-token
placement fails), and a ramp image must come back as the same ramp on the image grid.
The guided upsampling is checked against a slow numpy loop of its formula.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg import features as F
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.features import subtoken
from jaxreg.features import upsample

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


# guided upsampling --------------------------------------------------------------------

def _reference(tokens, guide, ppt, sigma_s, sigma_r):
    """The module docstring's formula, one pixel and one token at a time."""
    (th, tw, c), (h, w) = tokens.shape, guide.shape
    low = np.zeros((th, tw))
    for a in range(th):
        for b in range(tw):
            acc = area = 0.0
            for y in range(h):
                for x in range(w):
                    oy = max(0.0, min(y + 1, (a + 1) * ppt[0]) - max(y, a * ppt[0]))
                    ox = max(0.0, min(x + 1, (b + 1) * ppt[1]) - max(x, b * ppt[1]))
                    acc, area = acc + oy * ox * guide[y, x], area + oy * ox
            low[a, b] = acc / area
    r = max(1, int(np.ceil(2 * sigma_s)))
    out = np.zeros((h, w, c))
    for y in range(h):
        for x in range(w):
            cy, cx = (y + 0.5) / ppt[0] - 0.5, (x + 0.5) / ppt[1] - 0.5
            num, den = np.zeros(c), 0.0
            for a in range(int(np.round(cy)) - r, int(np.round(cy)) + r + 1):
                for b in range(int(np.round(cx)) - r, int(np.round(cx)) + r + 1):
                    if 0 <= a < th and 0 <= b < tw:
                        wgt = np.exp(-((cy - a) ** 2 + (cx - b) ** 2) / (2 * sigma_s ** 2)
                                     - (guide[y, x] - low[a, b]) ** 2 / (2 * sigma_r ** 2))
                        num, den = num + wgt * tokens[a, b], den + wgt
            out[y, x] = num / den
    return out


@pytest.mark.parametrize("sigmas", [(1.0, 0.1), (0.6, 0.3)])
def test_guided_upsampling_matches_a_numpy_loop(sigmas):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(5, 4, 3)).astype(np.float32)
    guide = rng.random((13, 11)).astype(np.float32)
    ppt = (13 / 5, 11 / 4)  # cells of 2.6 x 2.75 pixels
    got = upsample.guided_upsample(tokens, guide, pixels_per_token=ppt, shape=(13, 11),
                                   sigma_spatial=sigmas[0], sigma_range=sigmas[1])
    np.testing.assert_allclose(got, _reference(tokens, guide, ppt, *sigmas), atol=1e-5)


def test_guided_upsampling_without_range_term_is_spatial_gaussian_interpolation():
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(4, 6, 2)).astype(np.float32)
    guide = rng.random((12, 17)).astype(np.float32)
    ppt = (3.0, 17 / 6)
    spatial = _reference(tokens, np.zeros_like(guide), ppt, 0.8, 1.0)  # no intensity contrast
    for sigma_r in (np.inf, 1e6):
        got = upsample.guided_upsample(tokens, guide, pixels_per_token=ppt, shape=(12, 17),
                                       sigma_spatial=0.8, sigma_range=sigma_r)
        np.testing.assert_allclose(got, spatial, atol=1e-5)


def test_guided_upsampling_keeps_a_constant_map_exactly_and_its_edges():
    rng = np.random.default_rng(2)
    guide = rng.random((10, 9)).astype(np.float32)
    const = np.full((4, 3, 2), 0.37, np.float32)
    got = upsample.guided_upsample(const, guide, pixels_per_token=(2.5, 3.0), shape=(10, 9),
                                   sigma_spatial=1.0, sigma_range=0.01)
    np.testing.assert_array_equal(got, np.full((10, 9, 2), 0.37, np.float32))
    # A step between pixels 9 and 10 (inside token 2 of 4-pixel tokens): the features
    # (area means of the step) come back sharper guided than linearly.
    step = np.zeros((24, 8), np.float32)
    step[10:] = 1.0
    tokens = (upsample.area_matrix(24, 6, 4.0) @ step @ upsample.area_matrix(8, 2, 4.0).T)
    guided = upsample.guided_upsample(tokens[..., None], step, pixels_per_token=(4.0, 4.0),
                                      shape=(24, 8), sigma_spatial=1.0, sigma_range=0.1)
    linear = jax.image.scale_and_translate(
        jnp.asarray(tokens[..., None]), (24, 8, 1), (0, 1), jnp.asarray([4.0, 4.0]),
        jnp.zeros(2), method="linear")
    err = lambda f: float(np.abs(np.asarray(f)[..., 0] - step).mean())  # noqa: E731
    assert err(guided) < 0.5 * err(linear), (err(guided), err(linear))


def test_guided_pair_features_in_3d_and_2d():
    rng = np.random.default_rng(4)
    fixed = rng.random((20, 16, 7)).astype(np.float32)
    fixed[..., 0] = 0.5  # a uniform slice: dropped, zero features
    moving = np.roll(fixed, 1, axis=0)
    enc = mean_encoder(resize="longest_side_pad")
    cfg = F.FeatureConfig(gap=2, pca_dims=1, upsample="guided", guide_sigma_range=0.2)
    f, m = F.pair_features(fixed, moving, enc, config=cfg)["features"]
    lin = F.pair_features(fixed, moving, enc, config=F.FeatureConfig(
        gap=2, pca_dims=1))["features"][0]
    assert f.shape == m.shape == (20, 16, 7, 1) and np.isfinite(f).all()
    assert not np.asarray(f[..., 0, :]).any()
    assert float(np.abs(f - lin).max()) > 1e-3
    two_d = F.pair_features(fixed[..., 3], moving[..., 3], enc, config=cfg)["features"]
    assert two_d[0].shape == (20, 16, 1) and np.isfinite(two_d[0]).all()
    for bad in ({"upsample": "cubic"}, {"guide_sigma_spatial": 0.0},
                {"guide_sigma_range": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            F.FeatureConfig(**bad)


# settings from the command line ----------------------------------------------------------

def test_command_line_settings_reach_feature_config(monkeypatch):
    from absl import flags
    from ml_collections import config_flags

    from experiments import breast as cli
    from experiments.configs import breast as breast_config
    from jaxreg import experiment

    argv = cli._with_encoder_config(["prog", "--encoder=litemedsam",
                                     "--config.features.shifts=2",
                                     "--config.features.upsample=guided",
                                     "--config.features.guide_sigma_range=0.25"])
    cli._check_overrides(argv)
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides as it is defined
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", cli._DEFAULT_CONFIG, flag_values=values)
    flags.DEFINE_string("encoder", None, "", flag_values=values)
    values(argv)
    features = experiment.from_configdict(values.config).registration.features
    assert (features.shifts, features.upsample) == (2, "guided")
    assert features.guide_sigma_range == 0.25 and features.guide_sigma_spatial == 1.0
    default = experiment.from_configdict(breast_config.get_config("litemedsam"))
    assert default.registration.features.shifts == 1
    assert default.registration.features.upsample == "linear"
