"""DINOv3 against transformers' DINOv3ViTModel on random weights."""

import dataclasses
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import from_torch, hf_vit_errors, perturb_, random_images  # noqa: E402
from jaxreg.encoders import dinov3, vit  # noqa: E402
from jaxreg.encoders.checkpoint import (CheckpointError, flat_params, read_state_dict,  # noqa: E402
                                         write_safetensors)

SIZES = [(224, 224), (256, 352)]


def _hf_model(*, width=64, depth=2, heads=2, registers=4, gated=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.DINOv3ViTConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, num_register_tokens=registers, use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu", image_size=224, patch_size=16)
    return perturb_(transformers.DINOv3ViTModel(config))


def _config(hf):
    c = hf.config
    return vit.ViTConfig(patch_size=16, hidden_size=c.hidden_size, depth=c.num_hidden_layers,
                         num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
                         num_registers=c.num_register_tokens, qkv_bias=(True, False, True),
                         act=c.hidden_act, gated_mlp=c.use_gated_mlp, norm_eps=1e-5,
                         rope_theta=c.rope_theta)


def _errors(hf, model, x):
    """Relative error of every map (tests/_parity.py), and the bound it must meet."""
    return hf_vit_errors(hf, model, x, patch=16, prefix=1 + hf.config.num_register_tokens)


@pytest.mark.parametrize("registers,gated", [(4, False), (0, True)])
@pytest.mark.parametrize("size", SIZES)
def test_small_matches_transformers(registers, gated, size):
    hf = _hf_model(registers=registers, gated=gated)
    model = from_torch(dinov3, hf, _config(hf))
    errors, bound = _errors(hf, model, random_images(*size, batch=2))
    assert max(errors.values()) <= bound, (bound, errors)


def test_vitb_matches_transformers():
    """Full-size ViT-B/16; a RoPE theta of 10000 (the LLM default) instead of DINOv3's 100 is
    caught at ten times the bound."""
    hf = _hf_model(width=768, depth=12, heads=12)
    assert dinov3.VARIANTS["dinov3_vitb16"].config == _config(hf)
    model = from_torch(dinov3, hf, "dinov3_vitb16")
    for size in SIZES:
        errors, bound = _errors(hf, model, random_images(*size))
        print(f"DINOv3 ViT-B {size}: worst relative error {max(errors.values()):.2e}, "
              f"bound {bound:.2e}")  # shown by pytest -s (BUILD.md, parity tolerances)
        assert max(errors.values()) <= bound, (size, bound, errors)
    wrong = from_torch(dinov3, hf, dataclasses.replace(_config(hf), rope_theta=10000.0))
    errors, bound = _errors(hf, wrong, random_images(*SIZES[0]))
    print(f"DINOv3 ViT-B, the mistake: worst relative error {max(errors.values()):.2e}")
    assert max(errors.values()) > 10 * bound, (bound, errors)


def test_round_trip_folders_and_errors(tmp_path):
    hf = _hf_model()
    config = _config(hf)
    ref = from_torch(dinov3, hf, config)
    x = jnp.asarray(random_images(64, 96))
    expected = ref(x)
    hf.save_pretrained(tmp_path / "hf")  # hub names: layer.N.*
    assert "layer.0.norm1.weight" in read_state_dict(tmp_path / "hf" / "model.safetensors")
    snap = tmp_path / "models--facebook--dinov3-vits16" / "snapshots" / "abc"
    shutil.copytree(tmp_path / "hf", snap)
    write_safetensors(flat_params(ref), tmp_path / "converted.safetensors")
    for model in (dinov3.load(config, tmp_path / "hf"),
                  dinov3.load(config, snap.parent.parent),
                  dinov3.load(config, tmp_path / "converted.safetensors")):
        got = model(x)
        for k in expected:
            np.testing.assert_array_equal(expected[k], got[k], err_msg=k)
    with pytest.raises(CheckpointError, match=r"hf/config.json .*hidden_size 64 \(the "
                                              r"variant: 384\)"):
        dinov3.load("dinov3_vits16", tmp_path / "hf")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        dinov3.load("dinov3_vits16", tmp_path / "hf" / "model.safetensors")
    torch.save({"patch_embed.proj.weight": torch.zeros(3)}, tmp_path / "dinov2.pth")
    with pytest.raises(CheckpointError, match="not a DINOv3"):
        dinov3.load("dinov3_vits16", tmp_path / "dinov2.pth")
    data = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="not a readable"):
        dinov3.load("dinov3_vits16", tmp_path / "cut.safetensors")
