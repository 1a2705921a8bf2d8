"""CLIP vision tower against transformers' CLIPVisionModel on random weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxreg.encoders import clip  # noqa: E402
from jaxreg.encoders._checkpoint import (CheckpointError, assign_params, flat_params,  # noqa: E402
                                         read_state_dict, write_safetensors)

TOL = 1e-4
SIZES = [(224, 224), (256, 352)]


def _vision_config(width=64, depth=2, heads=2, act="quick_gelu", eps=1e-5):
    return transformers.CLIPVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, image_size=224, patch_size=16, hidden_act=act,
        layer_norm_eps=eps)


def _perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _hf_model(**kw):
    torch.manual_seed(0)
    return _perturb(transformers.CLIPVisionModel(_vision_config(**kw)))


def _config(hf, post_norm=False):
    c = hf.config
    return clip.ClipConfig(patch_size=16, hidden_size=c.hidden_size, depth=c.num_hidden_layers,
                           num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
                           layer_scale=False, act=c.hidden_act, norm_eps=c.layer_norm_eps,
                           pos_grid=c.image_size // 16, features_post_norm=post_norm)


def _jax_model(hf, variant):
    model = clip.create(variant, rngs=nnx.Rngs(0))
    assign_params(model, clip.convert({k: v.numpy() for k, v in hf.state_dict().items()}))
    return model


def _images(h, w, batch=1):
    return np.random.RandomState(0).randn(batch, h, w, 3).astype(np.float32)


def _max_diffs(hf, model, x):
    with torch.no_grad():
        ref = hf(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True,
                 interpolate_pos_encoding=True)
    out = model(jnp.asarray(x))
    b, h, w = x.shape[0], x.shape[1] // 16, x.shape[2] // 16
    maps = lambda t: t[:, 1:].reshape(b, h, w, -1).numpy()
    last = ref.last_hidden_state
    if model.config.features_post_norm:
        with torch.no_grad():
            last = hf.post_layernorm(last)
    diffs = {"features": np.abs(maps(last) - out["features"]).max(),
             "cls": np.abs(ref.pooler_output.numpy() - out["cls"]).max()}
    for i in range(1, len(ref.hidden_states)):
        diffs[f"block_{i}"] = np.abs(maps(ref.hidden_states[i]) - out[f"block_{i}"]).max()
    assert out["features"].shape == (b, h, w, hf.config.hidden_size)
    return diffs


@pytest.mark.parametrize("act,post_norm", [("quick_gelu", False), ("gelu", True)])
@pytest.mark.parametrize("size", SIZES)
def test_small_matches_transformers(act, post_norm, size):
    hf = _hf_model(act=act)
    diffs = _max_diffs(hf, _jax_model(hf, _config(hf, post_norm)), _images(*size, batch=2))
    assert max(diffs.values()) <= TOL, diffs


def test_vitb_matches_transformers():
    hf = _hf_model(width=768, depth=12, heads=12)
    assert clip.VARIANTS["clip_vitb16"].config == _config(hf)
    model = _jax_model(hf, "clip_vitb16")
    for size in SIZES:
        diffs = _max_diffs(hf, model, _images(*size))
        assert max(diffs.values()) <= TOL, (size, diffs)


def test_clip_model_layout_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=_vision_config().to_dict(),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)))
    _perturb(full)
    hf = transformers.CLIPVisionModel(_vision_config()).eval()
    hf.load_state_dict(full.vision_model.state_dict())
    config = _config(hf)
    ref = _jax_model(hf, config)
    x = jnp.asarray(_images(64, 96))
    expected = ref(x)
    full.save_pretrained(tmp_path / "clipmodel")  # text tower and projections are dropped
    hf.save_pretrained(tmp_path / "vision")  # vision_model.* names
    write_safetensors(flat_params(ref), tmp_path / "converted.safetensors")
    converted = clip.create(config, rngs=nnx.Rngs(1))
    assign_params(converted, read_state_dict(tmp_path / "converted.safetensors"))
    for model in (clip.load(config, tmp_path / "clipmodel"),
                  clip.load(config, tmp_path / "vision"), converted):
        got = model(x)
        for k in expected:
            np.testing.assert_array_equal(expected[k], got[k], err_msg=k)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        clip.load("clip_vitb16", tmp_path / "vision")
    # A file written by `python -m jaxreg.convert` loads as is, and is checked like any other.
    got = clip.load(config, tmp_path / "converted.safetensors")(x)
    np.testing.assert_array_equal(expected["features"], got["features"])
    with pytest.raises(CheckpointError, match="mis-shaped"):
        clip.load("clip_vitb16", tmp_path / "converted.safetensors")
    write_safetensors({"encoder.layer.0.weight": np.zeros(3, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a CLIP vision"):
        clip.load("clip_vitb16", tmp_path / "other.safetensors")
    data = (tmp_path / "vision" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="not a readable"):
        clip.load("clip_vitb16", tmp_path / "cut.safetensors")
