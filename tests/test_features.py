"""The feature pipeline stage by stage against numpy, on a small linear patch encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg import features as F
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.features import encoding
from jaxreg.features.encoding import encoder_input

from helpers import PATCH, patch_encoder


def make_encoder(image_size=32, resize="square", chunk=3, layers=("features",)):
    """A linear patch embedding (tests/helpers.py), 6 channels."""
    return patch_encoder("patch", channels=6, image_size=image_size, resize=resize,
                         chunk=chunk, layers=layers)


def volume(shape=(20, 16, 14), seed=0):
    rng = np.random.default_rng(seed)
    v = rng.random(shape).astype(np.float32)
    v[..., :2] = 0.5  # two uniform slices along the last axis
    return v


def test_slice_plan_drops_uniform_slices_and_encodes_last():
    plan = F.slice_plan(volume(), axis=2, gap=5)
    assert not plan.kept[:2].any() and plan.kept[2:].all()
    np.testing.assert_array_equal(plan.encoded, [2, 7, 12, 13])
    with pytest.raises(ValueError, match="uniform"):
        F.slice_plan(np.ones((4, 4, 4)), gap=2)


def test_interpolation_matrix_matches_numpy_interp():
    plan = F.slice_plan(volume(), axis=2, gap=4)
    w = F.interpolation_matrix(plan)
    values = np.random.default_rng(1).normal(size=plan.encoded.size)
    expected = np.interp(np.arange(14), plan.encoded, values)
    expected[~plan.kept] = 0.0
    np.testing.assert_allclose(w @ values, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("resize", ["square", "longest_side_pad"])
def test_encoder_input_geometry(resize):
    prep = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(2.0, 2.0, 2.0),
                         value_range=(0.0, 10.0), resize=resize)
    x = F.encoder_input(np.ones((2, 16, 8), np.float32), prep, image_size=32)
    assert x.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(x[:, :16, :16], (10.0 - 0.5) / 2.0, rtol=1e-6)
    if resize == "longest_side_pad":  # 16x8 -> 32x16, zeros (before mean/std) on the right
        np.testing.assert_allclose(x[:, :, 16:], (0.0 - 0.5) / 2.0)
        assert F.token_geometry((16, 8), prep, image_size=32, patch_size=4) == ((32, 16), (8, 4))


def test_fit_pca_matches_numpy_with_weights():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 1.0
    wa, wb = rng.random(300) > 0.3, rng.random(200) > 0.5
    pca = F.fit_pca([a, b], dims=3, weights=[wa, wb], scale=False)
    rows = np.concatenate([a[wa], b[wb]])
    mean = rows.mean(0)
    values, vectors = np.linalg.eigh(np.cov(rows.T, bias=True))
    values, vectors = values[::-1][:3], vectors[:, ::-1][:, :3]
    vectors *= np.sign(vectors[np.abs(vectors).argmax(0), range(3)])
    np.testing.assert_allclose(pca.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pca.variances, values, rtol=1e-4)
    np.testing.assert_allclose(pca.components, vectors, atol=1e-4)
    np.testing.assert_allclose(F.project(rows, pca), (rows - mean) @ vectors, atol=1e-3)
    scaled = F.fit_pca([a, b], dims=3, weights=[wa, wb])
    np.testing.assert_allclose(np.std(F.project(rows, scaled)[:, 0]), 1.0, rtol=1e-4)


def test_to_image_grid_places_token_centres():
    # Tokens holding their own row index: pixel i must read (i + 1/2) / ppt - 1/2.
    plan = F.slice_plan(np.random.default_rng(0).random((24, 20, 3)), axis=2, gap=1)
    tokens = np.broadcast_to(np.arange(6, dtype=np.float32)[None, :, None, None], (3, 6, 5, 1))
    out = np.asarray(F.to_image_grid(tokens, plan, (24, 20, 3), pixels_per_token=(4.0, 4.0)))
    i = np.arange(2, 22)
    np.testing.assert_allclose(out[i, 10, 1, 0], (i + 0.5) / 4.0 - 0.5, atol=1e-5)


def test_slice_encoder_compiles_once_per_slice_shape():
    encoding._encode_chunk.clear_cache()
    enc = make_encoder(chunk=3)
    slices = np.random.default_rng(0).random((7, 16, 12)).astype(np.float32)
    out = enc(slices)["features"]
    enc(slices[:5])
    assert out.shape == (7, 8, 8, 6)
    assert encoding._encode_chunk._cache_size() == 1
    make_encoder(chunk=3)(slices[:4])  # another encoder of the same architecture
    assert encoding._encode_chunk._cache_size() == 1
    # Fewer slices than a chunk run in the next power-of-two chunk: one more compilation.
    np.testing.assert_allclose(enc(slices[3:4])["features"][0], out[3], rtol=1e-5, atol=1e-5)
    assert encoding._encode_chunk._cache_size() == 2


class TwoStrideEncoder(nnx.Module):
    """Maps at strides 2 and 4 (as TinyViT's stage_1 and its later stages): 2x2 and 4x4
    means of channel 0, times a per-map weight."""

    def __init__(self):
        self.weight = nnx.Param(jnp.asarray([[1.0, -2.0]], jnp.float32))

    def __call__(self, images):
        pool = lambda k: jax.lax.reduce_window(images[..., :1], 0.0, jax.lax.add,
                                               (1, k, k, 1), (1, k, k, 1), "VALID") / k ** 2
        return {"stage_1": pool(2) * self.weight[...], "features": pool(4) * self.weight[...]}


@pytest.mark.parametrize("resize", ["longest_side_pad", "square"])
def test_each_map_is_cropped_at_its_own_stride(resize):
    spec = EncoderSpec(name="strides", config=None, patch_size=PATCH, channels=2,
                       preprocessing=Preprocessing(image_size=32, resize=resize))
    enc = F.SliceEncoder(TwoStrideEncoder(), spec, layers=("stage_1", "features"), chunk=2)
    slices = np.random.default_rng(0).random((3, 24, 12)).astype(np.float32)
    out = enc(slices)
    full = TwoStrideEncoder()(encoder_input(slices, spec.preprocessing, image_size=32))
    # longest_side_pad: the slice fills 32 x 16 input pixels, the rest is padding.
    rows, cols = (32, 16) if resize == "longest_side_pad" else (32, 32)
    assert out["stage_1"].shape == (3, rows // 2, cols // 2, 2)
    assert out["features"].shape == (3, rows // 4, cols // 4, 2)
    for layer, stride in (("stage_1", 2), ("features", 4)):
        np.testing.assert_allclose(out[layer], full[layer][:, :rows // stride, :cols // stride],
                                   rtol=1e-5, atol=1e-6)
        assert enc.strides()[layer] == (stride, stride)
        assert enc.token_scale((24, 12), layer) == (stride * 24 / rows, stride * 12 / cols)
    assert enc.token_scale((24, 12)) == enc.token_scale((24, 12), "features")  # patch size 4
    assert encoding.map_cells((32, 15), (16, 16), 32) == (16, 8)  # a partly covered cell counts


def _single_axis(fixed, moving, enc, axis, pca=None):
    """numpy-side reference of one axis: encode, joint PCA, project, grid."""
    cfg = F.FeatureConfig(axes=(axis,), gap=3, pca_dims=2, scale=False)
    nf = F.normalise_intensity(fixed)
    nm = F.normalise_intensity(moving)
    plan = F.slice_plan(nf, axis=axis, gap=3)
    tok = [enc(np.moveaxis(v, axis, 0)[plan.encoded])["features"] for v in (nf, nm)]
    return cfg, plan, tok


def test_triplanar_fusion_against_numpy():
    fixed, moving = volume(seed=0), volume(seed=1)
    enc = make_encoder()
    single = {}
    for axis in range(3):
        cfg = F.FeatureConfig(axes=(axis,), gap=3, pca_dims=2, scale=False)
        single[axis] = F.pair_features(fixed, moving, enc, config=cfg)["features"]
    concat = F.pair_features(fixed, moving, enc, config=F.FeatureConfig(
        axes=(0, 1, 2), gap=3, pca_dims=2, scale=False))["features"]
    for j in range(2):
        np.testing.assert_allclose(
            concat[j], np.concatenate([single[a][j] for a in range(3)], -1), atol=1e-5)

    # "mean": one PCA fitted on the tokens of all axes (numpy), projected volumes averaged.
    tokens, plans = [], []
    for axis in range(3):
        _, plan, tok = _single_axis(fixed, moving, enc, axis)
        tokens.append(tok)
        plans.append(plan)
    rows = np.concatenate([t.reshape(-1, 6) for tok in tokens for t in tok])
    mean = rows.mean(0)
    values, vectors = np.linalg.eigh(np.cov(rows.T, bias=True))
    vectors = vectors[:, ::-1][:, :2]
    vectors *= np.sign(vectors[np.abs(vectors).argmax(0), range(2)])
    expected = []
    for j in range(2):
        acc = 0
        for axis, (plan, tok) in enumerate(zip(plans, tokens)):
            in_plane = tuple(s for i, s in enumerate(fixed.shape) if i != axis)
            acc = acc + np.asarray(F.to_image_grid(
                (tok[j] - mean) @ vectors, plan, fixed.shape,
                pixels_per_token=enc.token_scale(in_plane)))
        expected.append(acc / 3)
    mean_fused = F.pair_features(fixed, moving, enc, config=F.FeatureConfig(
        axes=(0, 1, 2), fusion="mean", gap=3, pca_dims=2, scale=False))["features"]
    for j in range(2):
        np.testing.assert_allclose(mean_fused[j], expected[j], atol=1e-4)


def test_pca_mask_and_pyramid_layers():
    fixed, moving = volume(seed=0), volume(seed=1)
    enc = make_encoder(layers=("shallow", "features"))
    cfg = F.FeatureConfig(layers=("shallow", "features"), gap=2, pca_dims=2)
    mask = np.zeros(fixed.shape, bool)
    mask[4:16, 4:12] = True
    plain = F.pair_features(fixed, moving, enc, config=cfg)
    masked = F.pair_features(fixed, moving, enc, config=cfg, fixed_mask=mask, moving_mask=mask)
    assert set(plain) == {"shallow", "features"}
    assert plain["features"][0].shape == (20, 16, 14, 2)
    assert not np.allclose(plain["features"][0], masked["features"][0])
    with pytest.raises(ValueError, match="no sample inside the mask"):
        F.pair_features(fixed, moving, enc, config=cfg, fixed_mask=np.zeros_like(mask),
                        moving_mask=np.zeros_like(mask))


def test_cached_tokens_are_reused(tmp_path):
    fixed, moving = volume(seed=0), volume(seed=1)
    enc = make_encoder()
    cache = F.FeatureCache(str(tmp_path))
    cfg = F.FeatureConfig(gap=2, pca_dims=2)
    first = F.pair_features(fixed, moving, enc, config=cfg, cache=cache)
    calls = enc.calls
    assert calls > 0 and len(list(tmp_path.glob("*.safetensors"))) == 2
    again = F.pair_features(fixed, moving, enc, config=cfg, cache=cache)
    assert enc.calls == calls  # no second encoding
    np.testing.assert_array_equal(first["features"][0], again["features"][0])
    assert not list(tmp_path.glob("*.tmp"))


def test_pipeline_is_equivariant_to_a_shift_along_the_slice_axis():
    # Encoding every slice, a moving image shifted by whole slices along the slicing axis
    # gives the fixed features shifted the same way (away from the borders).
    rng = np.random.default_rng(3)
    fixed = rng.random((16, 16, 20)).astype(np.float32)
    moving = np.roll(fixed, 2, axis=2)
    feats = F.pair_features(fixed, moving, make_encoder(), config=F.FeatureConfig(
        gap=1, pca_dims=3))["features"]
    np.testing.assert_allclose(np.roll(feats[0], 2, axis=2)[:, :, 2:],
                               feats[1][:, :, 2:], atol=1e-4)


def test_maps_of_another_stride_land_on_the_image_grid_where_they_belong():
    """A stride-2 map (stage_1) and a stride-4 map of the same local means must agree on
    the image grid; placed at the patch size's scale, the stride-2 map came out stretched."""
    spec = EncoderSpec(name="strides", config=None, patch_size=PATCH, channels=2,
                       preprocessing=Preprocessing(image_size=32, resize="longest_side_pad"))
    enc = F.SliceEncoder(TwoStrideEncoder(), spec, layers=("stage_1", "features"), chunk=4)
    x = np.linspace(0.0, 1.0, 24, dtype=np.float32)
    vol = np.broadcast_to((x[:, None, None] ** 2), (24, 12, 8)).copy()
    cfg = F.FeatureConfig(layers=("stage_1", "features"), pca_dims=1, gap=1, scale=False)
    out = F.pair_features(vol, vol, enc, config=cfg)
    s1, s4 = (np.asarray(out[k][0])[..., 0] for k in ("stage_1", "features"))
    inner = (slice(4, -4), slice(None), slice(None))  # away from the edge effects of the pools
    r = np.corrcoef(s1[inner].ravel(), s4[inner].ravel())[0, 1]
    assert abs(r) > 0.99, r
    np.testing.assert_allclose(np.abs(s1[inner]), np.abs(s4[inner]), atol=0.05 * np.abs(s4).max())


def test_gradient_render_is_blind_to_contrast_inversion():
    # A T1/T2-like pair: the same tissues with their brightness order reversed. The
    # gradient magnitude (what render="gradient" feeds the encoder) is the same for both.
    rng = np.random.default_rng(3)
    tissue = (rng.random((20, 16, 14)) > 0.5).astype(np.float32)
    from scipy import ndimage

    tissue = ndimage.gaussian_filter(tissue, 1.5)
    t1, t2 = 100.0 * tissue + 20.0, 300.0 - 200.0 * tissue
    g1, g2 = F.render(t1, "gradient"), F.render(t2, "gradient")
    assert g1.dtype == np.float32 and 0.0 <= g1.min() and g1.max() <= 1.0
    np.testing.assert_allclose(g1, g2, atol=1e-4)
    assert np.corrcoef(F.render(t1).ravel(), F.render(t2).ravel())[0, 1] < -0.99
    np.testing.assert_array_equal(F.render(t1), F.normalise_intensity(t1))
    with pytest.raises(ValueError, match="render"):
        F.FeatureConfig(render="edges")
    with pytest.raises(ValueError, match="render"):
        F.render(t1, "edges")


def test_pair_features_encode_the_rendered_images():
    fixed, moving = volume(seed=0), volume(seed=1)
    enc = make_encoder()
    # Percentiles 0 / 100: normalising an image already in [0, 1] again changes nothing.
    cfg = F.FeatureConfig(gap=2, pca_dims=2, render="gradient", percentiles=(0.0, 100.0))
    got = F.pair_features(fixed, moving, enc, config=cfg)["features"]
    rendered = [F.render(v, "gradient", percentiles=(0.0, 100.0)) for v in (fixed, moving)]
    want = F.pair_features(*rendered, enc, config=F.FeatureConfig(
        gap=2, pca_dims=2, percentiles=(0.0, 100.0)))["features"]
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def _tissues(shape=(40, 36, 32), seed=3):
    """Three tissues in an ellipsoid of anatomy against air (labels 1-3, air 0)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid ** 2).sum(0) < 0.8
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    tissue = 1 + np.digitize(noise, np.quantile(noise, [1 / 3, 2 / 3]))
    return np.where(body, tissue, 0)


def _contrast(labels, values):
    return np.asarray(values, np.float32)[labels] + 0.0


@pytest.mark.parametrize("moving_values,same", [
    ((0, 60, 120, 200), True),       # the fixed image's order, other levels
    ((0, 200, 120, 60), False),      # tissues reordered (T1 against T2)
    ((0, 120, 200, 60), False),      # another order
])
def test_choose_render_tells_cross_contrast_pairs(moving_values, same):
    labels = _tissues()
    fixed = _contrast(labels, (0, 50, 100, 150))
    moving = np.roll(_contrast(labels, moving_values), 2, axis=0)  # misaligned too
    kind, rho = F.choose_render(fixed, moving)
    assert kind == ("intensity" if same else "gradient"), rho
    assert (rho > 0.7) if same else (rho < F.AUTO_THRESHOLD)


def test_choose_render_without_common_anatomy_picks_the_gradient():
    fixed = np.zeros((12, 12, 12), np.float32)
    fixed[:3] = 1.0
    moving = np.zeros_like(fixed)
    moving[-3:] = 1.0
    kind, rho = F.choose_render(fixed, moving)
    assert kind == "gradient" and np.isnan(rho)


def test_auto_render_is_the_chosen_render_and_is_reported():
    labels = _tissues((24, 20, 16))  # small: the erosion is cut to one block
    fixed = _contrast(labels, (0, 50, 100, 150))
    moving = np.roll(_contrast(labels, (0, 150, 100, 50)), 1, axis=1)
    enc = make_encoder()
    choices = {}
    got = F.pair_features(fixed, moving, enc, config=F.FeatureConfig(
        gap=2, pca_dims=2, render="auto"), choices=choices)["features"]
    assert choices["render"] == "gradient" and choices["contrast_agreement"] < 0.5
    want = F.pair_features(fixed, moving, enc, config=F.FeatureConfig(
        gap=2, pca_dims=2, render="gradient"))["features"]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="render"):
        F.render(fixed, "auto")  # a choice for a pair, not a render of one image


def test_encoders_register_with_the_automatic_render():
    from jaxreg import registration

    for method in ("litemedsam", "mobilesam+mind", "dinov2"):
        assert registration.default_config(method).features.render == "auto"
    assert registration.default_config("mind").features is None
