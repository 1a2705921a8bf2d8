"""SAM image encoder: parity with transformers' SamVisionModel on random weights, loaders."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.encoders import convert as convert_cli
from jaxreg.encoders import registry, sam

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _parity import float32_bound, relative_errors  # noqa: E402
from helpers import apply, numpy_state_dict, random_images, randomise_  # noqa: E402

# Grid 10 with window 4: windows need padding, block 1 is global.
SMALL_HF = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=80,
                patch_size=8, window_size=4, global_attn_indexes=[1], output_channels=16)
SMALL = sam.SamConfig(image_size=80, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                      window_size=4, global_attn_indexes=(1,), out_chans=16)


def _hf_model(seed=0, **config):
    torch.manual_seed(seed)
    model = transformers.SamVisionModel(transformers.SamVisionConfig(**config)).eval()
    return randomise_(model, 0.05)  # HF initialises rel-pos and pos-embed to zero


def _hf_run(model, images):
    with torch.no_grad():
        out = model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    expected = {"features": out.last_hidden_state.permute(0, 2, 3, 1).numpy()}
    for i, h in enumerate(out.hidden_states[1:], start=1):  # [0] is the embedding output
        expected[f"block_{i}"] = h.numpy()
    return expected


def _bound(config: sam.SamConfig, tokens: int) -> float:
    """The float32 bound (tests/_parity.py): the blocks, then the neck as one more block whose
    longest sum is its 3x3 convolution over ``out_chans`` channels."""
    reduction = max(int(config.mlp_ratio * config.embed_dim), tokens, 9 * config.out_chans)
    return float32_bound(config.depth + 1, reduction)


def _hf_to_original(sd):
    """The segment_anything layout of an HF vision-encoder state dict, renamed by hand."""
    out = {}
    for k, v in sd.items():
        k = k.replace("vision_encoder.", "image_encoder.")
        k = k.replace("patch_embed.projection.", "patch_embed.proj.")
        k = k.replace(".layers.", ".blocks.")
        k = k.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
        k = k.replace("neck.conv1.", "neck.0.").replace("neck.norm1.", "neck.1.")
        k = k.replace("neck.conv2.", "neck.2.").replace("neck.norm2.", "neck.3.")
        out[k] = v
    return out


@pytest.fixture(scope="module")
def small():
    model = _hf_model(**SMALL_HF)
    images = random_images(80, 80, batch=2)
    return model, images, _hf_run(model, images)


def test_small_config_parity_all_outputs(small):
    hf, images, expected = small
    model = sam.create(SMALL, rngs=nnx.Rngs(0))
    _checkpoint.assign_params(model, sam.convert(numpy_state_dict(hf)))
    got = apply(model, images)
    assert sorted(got) == sorted(expected)
    assert all(g.dtype == np.float32 for g in got.values())
    errors, bound = relative_errors(expected, got), _bound(SMALL, (80 // 8) ** 2)
    assert max(errors.values()) <= bound, (bound, errors)


def test_original_and_hf_layouts_give_identical_params(small, tmp_path):
    hf_sd = numpy_state_dict(small[0])
    orig = _hf_to_original(hf_sd)
    assert "image_encoder.neck.0.weight" in orig and "image_encoder.blocks.2.norm1.bias" in orig
    orig["prompt_encoder.point_embeddings.0.weight"] = np.zeros((1, 256), np.float32)
    orig["mask_decoder.iou_token.weight"] = np.zeros((1, 256), np.float32)
    from_hf = sam.convert(hf_sd)
    from_orig = sam.convert(orig)
    assert from_hf.keys() == from_orig.keys()
    for k in from_hf:
        np.testing.assert_array_equal(from_hf[k], from_orig[k])
    # A DataParallel checkpoint wrapped in {"model": ...}, read from a .pth file.
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module." + k: torch.from_numpy(v) for k, v in orig.items()},
                "epoch": 3}, path)
    from_file = sam.convert(_checkpoint.read_state_dict(path))
    for k in from_hf:
        np.testing.assert_array_equal(from_hf[k], from_file[k])
    # Loading takes the .pth as it is, and jaxreg's own layout (python -m jaxreg.encoders.convert)
    # unconverted.
    _checkpoint.write_safetensors(from_hf, tmp_path / "converted.safetensors")
    for source in (path, tmp_path / "converted.safetensors"):
        loaded = _checkpoint.flat_params(sam.load(SMALL, source))
        assert loaded.keys() == from_hf.keys()
        for k in from_hf:
            np.testing.assert_array_equal(from_hf[k], loaded[k])


def test_wrong_architecture_and_truncated_file(small, tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "small_sam.safetensors"
    save_file(numpy_state_dict(small[0]), str(path))
    with pytest.raises(_checkpoint.CheckpointError) as e:
        sam.load("sam_vitb", path)  # a 3-block, 32-wide SAM is not ViT-B
    msg = str(e.value)
    assert "missing" in msg and "mis-shaped" in msg and "blocks.3.attn.qkv.kernel" in msg
    assert convert_cli.main(["--encoder", "sam_vitb", "--input", str(path),
                             "--output", str(tmp_path / "out.safetensors")]) == 1
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(_checkpoint.CheckpointError, match="not a SAM checkpoint"):
        sam.convert({"layers.0.blocks.0.conv1.c.weight": np.zeros((2, 2, 1, 1))})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(_checkpoint.CheckpointError, match="not a readable safetensors"):
        sam.load("sam_vitb", truncated)


def test_other_input_size_and_bfloat16():
    model = sam.create(SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 96, 64, 3), jnp.float32))
    assert out["features"].shape == (1, 12, 8, 16)  # pos-embed and rel-pos resized
    assert all(v.dtype == jnp.float32 for v in out.values())
    with pytest.raises(ValueError, match="multiples"):
        model(jnp.zeros((1, 81, 80, 3)))
    assert sam.VARIANTS["medsam_vitb"].config == sam.VARIANTS["sam_vitb"].config



def test_preprocessing_as_the_references_feed_each_model():
    """SAM and SSL-SAM: ImageNet mean/std on [0, 1] images (the reference's configs), which is
    SAM's 0-255 pixel mean/std; MedSAM: min-max [0, 1] and nothing else (MedSAM_Inference.py
    and the reference's config-medsam-task1.py both skip Sam.preprocess)."""
    from jaxreg.features.encoding import encoder_input

    x = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    image = lambda name: np.asarray(encoder_input(
        x, sam.VARIANTS[name].preprocessing, image_size=16))
    imagenet = (np.asarray([0.485, 0.456, 0.406]), np.asarray([0.229, 0.224, 0.225]))
    for name in ("sam_vitb", "sslsam_vitb", "medsam_vitb_samnorm"):
        np.testing.assert_allclose(image(name), (x[..., None] - imagenet[0]) / imagenet[1],
                                   rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(image("medsam_vitb"), np.repeat(x[..., None], 3, -1), atol=1e-6)
    assert registry.ENCODERS["medsam"].variant == "medsam_vitb"
    assert sam.VARIANTS["medsam_vitb"].preprocessing == sam.MEDSAM_PREPROCESSING

@pytest.mark.slow  # about 95 s on a shared 2-core CPU
def test_full_vit_b_1024_parity(tmp_path, monkeypatch, record_property):
    """ViT-B at 1024 px, random weights, an HF safetensors found by the registry in
    $JAXREG_WEIGHTS_DIR; the registry's pyramid blocks are checked with the others."""
    from safetensors.numpy import save_file

    t0 = time.perf_counter()
    hf = _hf_model(seed=1)  # SamVisionConfig() defaults: ViT-B, 1024, window 14
    save_file(numpy_state_dict(hf), str(tmp_path / "sam_vitb.safetensors"))
    monkeypatch.setenv("JAXREG_WEIGHTS_DIR", str(tmp_path))
    model, _ = registry.load_encoder("sam")
    images = random_images(1024, 1024)
    with torch.no_grad():
        out = hf(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    got = apply(model, images)
    expected = {"features": out.last_hidden_state.permute(0, 2, 3, 1).numpy()}
    pyramid = [int(k.split("_")[1]) for k in registry.ENCODERS["sam"].pyramid[:-1]]
    for i in sorted({1, 3, 12, *pyramid}):
        expected[f"block_{i}"] = out.hidden_states[i].numpy()
    errors, bound = relative_errors(expected, got), _bound(model.config, 64 * 64)
    record_property("max_relative_error", errors)
    record_property("seconds", time.perf_counter() - t0)
    assert got["features"].shape == (1, 64, 64, 256)
    assert max(errors.values()) <= bound, (bound, errors)


def test_registry_pyramid_follows_the_2nd_and_3rd_global_blocks():
    """Block names count from 1, SamConfig.global_attn_indexes from 0."""
    for name in ("sam", "medsam", "sslsam"):
        entry = registry.ENCODERS[name]
        glob = entry.spec.config.global_attn_indexes
        assert entry.pyramid == (f"block_{glob[1] + 1}", f"block_{glob[2] + 1}", "features")
