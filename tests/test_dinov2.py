"""DINOv2 against transformers' Dinov2Model / Dinov2WithRegistersModel on random weights."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import from_torch, hf_vit_errors, perturb_, random_images  # noqa: E402
from jaxreg.encoders import dinov2, vit  # noqa: E402
from jaxreg.encoders.checkpoint import (CheckpointError, assign_params, flat_params,  # noqa: E402
                                         write_safetensors)

SIZES = [(224, 224), (280, 364)]


def _hf_model(*, width=32, depth=2, heads=2, registers=0, swiglu=False, image_size=98, seed=0):
    torch.manual_seed(seed)
    kw = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
              image_size=image_size, patch_size=14, use_swiglu_ffn=swiglu)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    return perturb_(model)


def _config(hf, *, registers=0, swiglu=False):
    c = hf.config
    mlp = dinov2._config(c.hidden_size, 1, 1, giant=swiglu).mlp_dim if swiglu else 4 * c.hidden_size
    return vit.ViTConfig(patch_size=14, hidden_size=c.hidden_size, depth=c.num_hidden_layers,
                         num_heads=c.num_attention_heads, mlp_dim=mlp, num_registers=registers,
                         act="silu" if swiglu else "gelu", gated_mlp=swiglu,
                         pos_grid=c.image_size // 14, pos_antialias=registers > 0)


def _errors(hf, model, x, registers):
    """Relative error of every map (tests/_parity.py), and the bound it must meet."""
    return hf_vit_errors(hf, model, x, patch=14, prefix=1 + registers)


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
@pytest.mark.parametrize("size", SIZES)
def test_small_matches_transformers(registers, swiglu, size):
    hf = _hf_model(registers=registers, swiglu=swiglu)
    model = from_torch(dinov2, hf, _config(hf, registers=registers, swiglu=swiglu))
    errors, bound = _errors(hf, model, random_images(*size, batch=2), registers)
    assert max(errors.values()) <= bound, (bound, errors)


def test_vitb_reg_matches_transformers():
    """Full-size ViT-B/14 with registers, on the 37x37 learned grid, at 224 and 280x364;
    a position grid shifted by one token is caught at ten times the bound."""
    hf = _hf_model(width=768, depth=12, heads=12, registers=4, image_size=518)
    model = from_torch(dinov2, hf, "dinov2_vitb14_reg")
    for size in SIZES:
        errors, bound = _errors(hf, model, random_images(*size), 4)
        print(f"DINOv2 ViT-B {size}: worst relative error {max(errors.values()):.2e}, "
              f"bound {bound:.2e}")  # shown by pytest -s (BUILD.md, parity tolerances)
        assert max(errors.values()) <= bound, (size, bound, errors)
    grid = jnp.asarray(model.pos_embed[...])  # a copy: the parameter may share torch's memory
    model.pos_embed.value = jnp.concatenate([grid[:1], jnp.roll(grid[1:], 1, axis=0)])
    errors, bound = _errors(hf, model, random_images(*SIZES[0]), 4)
    print(f"DINOv2 ViT-B, the mistake: worst relative error {max(errors.values()):.2e}")
    assert max(errors.values()) > 10 * bound, (bound, errors)


def _original_layout(sd):
    """The HF in-memory state dict renamed to the original facebookresearch release."""
    out = {}
    for k, v in sd.items():
        k2 = (k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
              .replace("encoder.layer.", "blocks.").replace("layer_scale1.lambda1", "ls1.gamma")
              .replace("layer_scale2.lambda1", "ls2.gamma").replace("attention.o_proj", "attn.proj")
              .replace("mlp.down_proj", "mlp.w3"))
        k2 = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
              "embeddings.register_tokens": "register_tokens", "embeddings.mask_token": "mask_token",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}.get(k2, k2)
        out[k2] = v
    for k in [k for k in out if ".attention.q_proj." in k]:
        parts = [out.pop(k.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
        out[k.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts, 0)
    for k in [k for k in out if ".mlp.gate_proj." in k]:
        parts = [out.pop(k), out.pop(k.replace("gate_proj", "up_proj"))]
        out[k.replace("gate_proj", "w12")] = torch.cat(parts, 0)
    return out


@pytest.mark.parametrize("swiglu", [False, True])
def test_original_pth_layout_loads_same_params(tmp_path, swiglu):
    hf = _hf_model(registers=4, swiglu=swiglu)
    config = _config(hf, registers=4, swiglu=swiglu)
    sd = dict(hf.state_dict())
    orig = _original_layout(sd)
    assert "blocks.0.attn.qkv.weight" in orig and "blocks.1.ls2.gamma" in orig
    from_hf = dinov2.convert({k: v.numpy() for k, v in sd.items()})
    from_orig = dinov2.convert({k: v.numpy() for k, v in orig.items()})
    assert sorted(from_hf) == sorted(from_orig)
    for k in from_hf:
        np.testing.assert_array_equal(from_hf[k], from_orig[k], err_msg=k)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(orig, path)
    loaded = dinov2.load(config, path)
    ref = from_torch(dinov2, hf, config)
    for k, v in flat_params(ref).items():
        np.testing.assert_array_equal(v, flat_params(loaded)[k], err_msg=k)


def test_round_trip_and_folders(tmp_path):
    hf = _hf_model(registers=4)
    config = _config(hf, registers=4)
    ref = from_torch(dinov2, hf, config)
    x = jnp.asarray(random_images(98, 126))
    expected = ref(x)
    # Converter round trip: jaxreg names written once, read back.
    write_safetensors(flat_params(ref), tmp_path / "converted.safetensors")
    # A Hugging Face folder (hub names, as save_pretrained writes them) and an offline cache.
    hf.save_pretrained(tmp_path / "hf")
    snap = tmp_path / "models--facebook--dinov2-with-registers-small" / "snapshots" / "0123abc"
    shutil.copytree(tmp_path / "hf", snap)
    for path in (tmp_path / "hf", snap.parent.parent):
        got = dinov2.load(config, path)(x)
        for k in expected:
            np.testing.assert_array_equal(expected[k], got[k], err_msg=f"{path}: {k}")
    got = dinov2.load(config, tmp_path / "converted.safetensors")(x)
    for k in expected:
        np.testing.assert_array_equal(expected[k], got[k], err_msg=k)


def test_wrong_architecture_and_truncated_file(tmp_path):
    hf = _hf_model(registers=4)
    hf.save_pretrained(tmp_path / "small")
    # A small DINOv2 folder into the ViT-S variant: its config.json says what differs.
    with pytest.raises(CheckpointError, match=r"small/config.json .*hidden_size 32 \(the "
                                              r"variant: 384\); num_hidden_layers 2"):
        dinov2.load("dinov2_vits14_reg", tmp_path / "small")
    # Its weight file alone: every mis-shaped tensor listed.
    with pytest.raises(CheckpointError, match="mis-shaped") as err:
        dinov2.load("dinov2_vits14_reg", tmp_path / "small" / "model.safetensors")
    assert "blocks.0.attn.q.kernel" in str(err.value)
    # Without registers: the folder is another model type, the file has unexpected tokens.
    with pytest.raises(CheckpointError, match="model_type 'dinov2_with_registers'"):
        dinov2.load(_config(hf, registers=0), tmp_path / "small")
    with pytest.raises(CheckpointError, match="unexpected.*register_tokens"):
        dinov2.load(_config(hf, registers=0), tmp_path / "small" / "model.safetensors")
    # A CLIP vision tower is not a DINOv2 checkpoint at all.
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=16))
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(CheckpointError, match="not a DINOv2 checkpoint"):
        dinov2.load("dinov2_vits14", tmp_path / "clip")
    # A truncated download.
    data = (tmp_path / "small" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        dinov2.load("dinov2_vits14_reg", tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no such"):
        dinov2.load("dinov2_vits14_reg", tmp_path / "absent.safetensors")


def test_jit_bfloat16_and_block_selection():
    hf = _hf_model()
    config = _config(hf)
    model = from_torch(dinov2, hf, config)
    model_bf16 = dinov2.create(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assign_params(model_bf16, flat_params(model))
    graphdef, state = nnx.split(model_bf16)

    @jax.jit
    def run(state, x):
        return nnx.merge(graphdef, state)(x, blocks=[2])

    x = jnp.asarray(random_images(98, 126))
    out = run(state, x)
    assert sorted(out) == ["block_2", "cls", "features"]
    assert out["features"].dtype == jnp.float32 and out["features"].shape == (1, 7, 9, 32)
    assert jax.tree.leaves(nnx.state(model_bf16, nnx.Param))[0].dtype == jnp.float32
    ref = model(x)["features"]
    assert float(jnp.abs(out["features"] - ref).max()) < 0.1
    run(state, x + 1.0)
    assert run._cache_size() == 1
    with pytest.raises(ValueError, match="outside"):
        model(x, blocks=[3])


def test_hub_layout_swiglu(tmp_path):
    """ViT-g's hub files store the SwiGLU as fused ``mlp.weights_in`` / ``weights_out``."""
    hf = _hf_model(swiglu=True)
    config = _config(hf, swiglu=True)
    hf.save_pretrained(tmp_path / "g")
    from jaxreg.encoders.checkpoint import read_state_dict

    keys = read_state_dict(tmp_path / "g" / "model.safetensors")
    assert "encoder.layer.0.mlp.weights_in.weight" in keys
    x = jnp.asarray(random_images(98, 98))
    expected = from_torch(dinov2, hf, config)(x)
    got = dinov2.load(config, tmp_path / "g")(x)
    for k in expected:
        np.testing.assert_array_equal(expected[k], got[k], err_msg=k)
