"""SAM2 Hiera image encoder: parity with transformers' Sam2VisionModel on random weights,
the Hugging Face and original sam2 checkpoint layouts, the registry entry."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxreg.encoders import _base, _hiera_parts, hiera, registry
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.encoders import convert as convert_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import apply, numpy_state_dict, random_images, randomise_  # noqa: E402

TOL = 1e-4  # max |jaxreg - transformers| / max |transformers|, per map

# 96 px: token grid 24. The first block of stage 4 windows a 6x6 grid by 4 (padding),
# pools the queries to windows of 2 and crops to 3x3; stage 3 pads 6 to 8; block 4 is
# global; the background embedding is resized 5 -> 24.
BACKBONE = dict(hidden_size=16, num_attention_heads=1, blocks_per_stage=[1, 2, 3, 1],
                embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 2, 2, 4],
                window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[4],
                window_positional_embedding_background_size=[5, 5])
SMALL = hiera.HieraConfig(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 2, 4),
                          blocks_per_stage=(1, 2, 3, 1), window_sizes=(4, 4, 4, 2),
                          global_attn_blocks=(4,), pos_embed_bkg_size=(5, 5), fpn_dim=32)
SIZE = 96


def _hf_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.Sam2VisionConfig(
        backbone_config=transformers.Sam2HieraDetConfig(**BACKBONE),
        backbone_channel_list=[128, 64, 32, 16], fpn_hidden_size=32)
    model = transformers.Sam2VisionModel(config).eval()
    return randomise_(model, 0.1)  # HF initialises the position embeddings to zero


def _hf_run(model, images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(x)
        stages = model.backbone(x).intermediate_hidden_states
    expected = {f"fpn_{i}": f.permute(0, 2, 3, 1).numpy()
                for i, f in enumerate(out.fpn_hidden_states, start=1)}
    expected["features"] = expected["fpn_3"]
    expected.update({f"stage_{i}": s.numpy() for i, s in enumerate(stages, start=1)})
    return expected


def _random_model(config, seed=0):
    """``hiera.create(config)`` with random weights, built without eager initialisation
    (which compiles one small program per parameter shape)."""
    abstract = nnx.eval_shape(lambda: hiera.create(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    params = {".".join(map(str, path)): (rng.standard_normal(v.get_value().shape) * 0.1
                                         ).astype(np.float32) for path, v in flat}
    return _base.abstract_with(hiera.create, config, params, source="random")


def _hf_to_original(sd):
    """The sam2 .pt names of a Sam2VisionModel state dict, renamed back by hand."""
    out = {}
    for k, v in sd.items():
        if k.startswith("neck.convs."):
            idx, leaf = k[len("neck.convs."):].split(".")
            k = f"image_encoder.neck.convs.{idx}.conv.{leaf}"
        else:
            k = "image_encoder.trunk." + k.removeprefix("backbone.")
            for old, new in (("patch_embed.projection.", "patch_embed.proj."),
                             (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
                             (".mlp.proj_in.", ".mlp.layers.0."),
                             (".mlp.proj_out.", ".mlp.layers.1.")):
                k = k.replace(old, new)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def small():
    model = _hf_model()
    images = random_images(SIZE, SIZE, batch=2)
    return model, images, _hf_run(model, images)


def test_small_config_parity_trunk_stages_and_fpn_levels(small):
    hf, images, expected = small
    model = _base.abstract_with(hiera.create, SMALL, hiera.convert(numpy_state_dict(hf)),
                                source="hf")
    got = apply(model, images)
    assert sorted(got) == sorted(expected)
    shapes = {k: v.shape for k, v in got.items()}
    assert shapes["fpn_1"] == (2, 24, 24, 32) and shapes["features"] == (2, 6, 6, 32)
    assert shapes["stage_4"] == (2, 3, 3, 128)
    for name, e in expected.items():
        assert got[name].dtype == np.float32
        rel = float(np.abs(got[name] - e).max() / np.abs(e).max())
        assert rel <= TOL, f"{name}: max relative error {rel:.3g}"


def test_bicubic_matrix_is_torch_interpolate():
    for n_in, n_out in ((7, 256), (14, 256), (5, 24), (8, 8), (9, 4)):
        x = np.random.RandomState(n_in).randn(n_in, 3).astype(np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x.T)[None, :, :, None], size=(n_out, 1), mode="bicubic")
        np.testing.assert_allclose(_hiera_parts.bicubic_matrix(n_in, n_out) @ x,
                                   want[0, :, :, 0].numpy().T, rtol=0, atol=1e-5)


def test_hf_folder_and_original_pt_load_identically(small, tmp_path):
    hf, images, expected = small
    hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors, HF names
    from_folder = hiera.load(SMALL, tmp_path / "hf")
    ref = _checkpoint.flat_params(from_folder)
    # The original sam2 .pt: {"model": {...}} with the other SAM2 parts, which are dropped.
    orig = _hf_to_original(numpy_state_dict(hf))
    assert "image_encoder.trunk.blocks.1.mlp.layers.0.weight" in orig
    assert "image_encoder.neck.convs.3.conv.bias" in orig
    orig["sam_mask_decoder.conv_s0.weight"] = np.zeros((32, 32, 1, 1), np.float32)
    orig["memory_encoder.fuser.layers.0.gamma"] = np.zeros(4, np.float32)
    orig["no_mem_embed"] = np.zeros((1, 1, 32), np.float32)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in orig.items()}},
               tmp_path / "sam2_small.pt")
    from_pt = _checkpoint.flat_params(hiera.load(SMALL, tmp_path / "sam2_small.pt"))
    # A whole Sam2Model's names (vision_encoder.*) convert to the same.
    whole = {"vision_encoder." + k: v for k, v in numpy_state_dict(hf).items()}
    whole["mask_decoder.iou_token.weight"] = np.zeros((1, 32), np.float32)
    from_whole = hiera.convert(whole)
    # python -m jaxreg.encoders.convert: the .pt to jaxreg-named safetensors, loaded unconverted.
    out = tmp_path / "sam2_small.safetensors"
    assert convert_cli.main(["--encoder", "sam2.1_hiera_tiny", "--input",
                             str(tmp_path / "sam2_small.pt"), "--output", str(out)]) == 1
    assert not out.exists()  # the small model is not Hiera-T: nothing written
    _checkpoint.write_safetensors(from_pt, out)
    from_converted = _checkpoint.flat_params(hiera.load(SMALL, out))
    for params in (from_pt, from_whole, from_converted):
        assert params.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(params[k], ref[k])
    got = apply(from_folder, images)
    for name, e in expected.items():
        assert float(np.abs(got[name] - e).max() / np.abs(e).max()) <= TOL, name


def test_folder_config_and_checkpoint_mismatches(small, tmp_path):
    hf = small[0]
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["backbone_config"]["global_attention_blocks"] = [3]  # invisible in the shapes
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(_checkpoint.CheckpointError, match=r"global_attention_blocks \[3\]"):
        hiera.load(SMALL, folder)
    (folder / "config.json").unlink()
    with pytest.raises(_checkpoint.CheckpointError) as e:
        hiera.load("sam2.1_hiera_tiny", folder)  # a 7-block, 16-wide model is not Hiera-T
    assert "missing" in str(e.value) and "blocks.11.attn.qkv.kernel" in str(e.value)
    with pytest.raises(_checkpoint.CheckpointError, match="not a SAM2 checkpoint"):
        hiera.convert({"vision_encoder.layers.0.attn.qkv.weight": np.zeros((6, 2))})


def test_input_checks_other_size_and_bfloat16():
    def shapes(*shape):  # traced only: nothing initialised or computed
        model = lambda x: hiera.create(SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
        return jax.eval_shape(model, jax.ShapeDtypeStruct(shape, jnp.float32))

    out = shapes(1, 128, 64, 3)
    assert out["features"].shape == (1, 8, 4, 32) and out["fpn_1"].shape == (1, 32, 16, 32)
    assert all(v.dtype == jnp.float32 for v in out.values())
    with pytest.raises(ValueError, match="multiple of the first window"):
        shapes(1, 72, 64, 3)
    with pytest.raises(ValueError, match=r"must be \(B, H, W, 3\)"):
        shapes(1, 64, 64)
    with pytest.raises(ValueError, match="one entry per stage"):
        hiera.HieraConfig(embed_dims=(8, 16))


def test_variants_match_transformers_and_sam2_configs():
    """Hiera-T is transformers' default; the others as in sam2/configs/sam2.1/*.yaml."""
    default = transformers.Sam2VisionConfig()
    backbone, neck = hiera.hf_config(hiera.VARIANTS["sam2.1_hiera_tiny"].config)
    assert all(getattr(default.backbone_config, k) == v for k, v in backbone.items())
    assert all(getattr(default, k) == v for k, v in neck.items())
    base = hiera.VARIANTS["sam2.1_hiera_base_plus"].config
    assert (base.embed_dims, base.blocks_per_stage, base.global_attn_blocks) == (
        (112, 224, 448, 896), (2, 3, 16, 3), (12, 16, 20))
    blocks = hiera._block_specs(hiera.VARIANTS["sam2.1_hiera_large"].config)
    assert len(blocks) == 48 and [i for i, b in enumerate(blocks) if b["q_stride"]] == [2, 8, 44]
    assert blocks[44] == dict(dim=576, dim_out=1152, num_heads=16, window_size=16,
                              q_stride=(2, 2))
    assert [i for i, b in enumerate(blocks) if not b["window_size"]] == [23, 33, 43]


def test_registry_entry_preprocessing_and_missing_weights(monkeypatch, tmp_path):
    from experiments.configs import breast
    from jaxreg.features.encoding import encoder_input
    from jaxreg.experiment import settings

    entry = registry.ENCODERS["sam2"]
    assert entry.module is hiera and entry.needs_weights
    assert entry.pyramid == ("fpn_1", "fpn_2", "features") and entry.spec.channels == 256
    x = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    image = np.asarray(encoder_input(x, entry.spec.preprocessing, image_size=32))
    mean, std = np.asarray([0.485, 0.456, 0.406]), np.asarray([0.229, 0.224, 0.225])
    np.testing.assert_allclose(image, (x[..., None] - mean) / std, rtol=1e-4, atol=1e-4)
    for var in ("JAXREG_WEIGHTS_DIR", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(registry.WeightsNotFoundError,
                       match=r"no weights for encoder 'sam2'.*sam2\.1_hiera_tiny\.pt.*--weights"):
        registry.load_encoder("sam2")
    study = settings.from_configdict(breast.get_config("sam2"))
    assert study.registration.features.layers == ("features",)


def test_fpn_pyramid_through_the_slice_encoder():
    """The registry's pyramid (strides 4, 8, 16) from raw slices, as the pipeline takes it."""
    import dataclasses

    from jaxreg.features import encoding

    layers = registry.ENCODERS["sam2"].pyramid
    spec = dataclasses.replace(registry.ENCODERS["sam2"].spec, config=SMALL)
    model = _random_model(SMALL)
    encoder = encoding.SliceEncoder(model, spec, layers=layers, image_size=64, chunk=2)
    assert encoder.strides() == {"fpn_1": (4.0, 4.0), "fpn_2": (8.0, 8.0),
                                 "features": (16.0, 16.0)}
    slices = np.random.default_rng(0).random((2, 20, 12)).astype(np.float32)
    got = encoder(slices)
    for name, side in zip(layers, (16, 8, 4)):  # square resize: every cell covers the slice
        assert got[name].shape == (2, side, side, 32) and np.isfinite(got[name]).all()
        assert np.abs(got[name][0] - got[name][1]).max() > 1e-3


@pytest.mark.slow  # about 60 s on a shared 2-core CPU
def test_full_tiny_1024_parity_through_the_registry(tmp_path, monkeypatch):
    """Hiera-T (transformers' default config) at 1024 px, random weights, an HF-named
    safetensors file found by the registry in $JAXREG_WEIGHTS_DIR."""
    from safetensors.numpy import save_file

    torch.manual_seed(1)
    hf = transformers.Sam2VisionModel(transformers.Sam2VisionConfig()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if is_norm_scale else 0.0))
    save_file(numpy_state_dict(hf), str(tmp_path / "sam2.1_hiera_tiny.safetensors"))
    monkeypatch.setenv("JAXREG_WEIGHTS_DIR", str(tmp_path))
    model, spec = registry.load_encoder("sam2")
    images = random_images(1024, 1024)
    expected = _hf_run(hf, images)
    got = apply(model, images)
    assert got["features"].shape == (1, 64, 64, 256) and got["fpn_1"].shape == (1, 256, 256, 256)
    for name, e in expected.items():
        rel = float(np.abs(got[name] - e).max() / np.abs(e).max())
        assert rel <= TOL, f"{name}: max relative error {rel:.3g}"
