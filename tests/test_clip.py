"""CLIP vision towers on random weights: transformers' CLIPVisionModel layout against
transformers, and BiomedCLIP's open_clip/timm layout against a PyTorch reference of timm's
ViT (tests/_timm_vit_reference.py)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _parity import relative_errors, vit_bound  # noqa: E402
from helpers import (apply, from_torch, hf_vit_errors, isolate_weights,  # noqa: E402
                     numpy_state_dict, perturb_, random_images)
from jaxreg.encoders import clip  # noqa: E402
from jaxreg.encoders.checkpoint import (CheckpointError, assign_params, flat_params,  # noqa: E402
                                         read_state_dict, write_safetensors)

SIZES = [(224, 224), (256, 352)]


def _vision_config(width=64, depth=2, heads=2, act="quick_gelu", eps=1e-5, image_size=224):
    return transformers.CLIPVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, image_size=image_size, patch_size=16, hidden_act=act,
        layer_norm_eps=eps)


def _hf_model(**kw):
    torch.manual_seed(0)
    return perturb_(transformers.CLIPVisionModel(_vision_config(**kw)), seed=0)


def _config(hf, post_norm=False):
    c = hf.config
    return clip.ClipConfig(patch_size=16, hidden_size=c.hidden_size, depth=c.num_hidden_layers,
                           num_heads=c.num_attention_heads, mlp_dim=c.intermediate_size,
                           layer_scale=False, act=c.hidden_act, norm_eps=c.layer_norm_eps,
                           pos_grid=c.image_size // 16, features_post_norm=post_norm)


def _errors(hf, model, x):
    """Relative error of every map (tests/_parity.py), and the bound it must meet."""
    final = hf.post_layernorm if model.config.features_post_norm else None
    return hf_vit_errors(hf, model, x, patch=16, final=final, interpolate_pos_encoding=True)


@pytest.mark.parametrize("act,post_norm", [("quick_gelu", False), ("gelu", True)])
@pytest.mark.parametrize("size", SIZES)
def test_small_matches_transformers(act, post_norm, size):
    hf = _hf_model(act=act)
    model = from_torch(clip, hf, _config(hf, post_norm))
    errors, bound = _errors(hf, model, random_images(*size, batch=2))
    assert max(errors.values()) <= bound, (bound, errors)


def test_vitb_matches_transformers():
    """Full-size ViT-B/16; the exact GELU in place of OpenAI CLIP's quick GELU is caught at
    ten times the bound."""
    hf = _hf_model(width=768, depth=12, heads=12)
    assert clip.VARIANTS["clip_vitb16"].config == _config(hf)
    model = from_torch(clip, hf, "clip_vitb16")
    for size in SIZES:
        errors, bound = _errors(hf, model, random_images(*size))
        print(f"CLIP ViT-B {size}: worst relative error {max(errors.values()):.2e}, "
              f"bound {bound:.2e}")  # shown by pytest -s (BUILD.md, parity tolerances)
        assert max(errors.values()) <= bound, (size, bound, errors)
    wrong = from_torch(clip, hf, dataclasses.replace(_config(hf), act="gelu"))
    errors, bound = _errors(hf, wrong, random_images(*SIZES[0]))
    print(f"CLIP ViT-B, the mistake: worst relative error {max(errors.values()):.2e}")
    assert max(errors.values()) > 10 * bound, (bound, errors)


def test_clip_model_layout_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=_vision_config().to_dict(),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)))
    perturb_(full, seed=0)
    hf = transformers.CLIPVisionModel(_vision_config()).eval()
    hf.load_state_dict(full.vision_model.state_dict())
    config = _config(hf)
    ref = from_torch(clip, hf, config)
    x = jnp.asarray(random_images(64, 96))
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
    # The folder's config.json says what it holds: a 2-block, 64-wide CLIP is not ViT-B/16.
    with pytest.raises(CheckpointError, match=r"vision/config.json .*hidden_size 64 "
                                              r"\(the variant: 768\)"):
        clip.load("clip_vitb16", tmp_path / "vision")
    # A file written by `python -m jaxreg.encoders.convert` loads as is, and is checked like any other.
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


# --------------------------------------------------------------------------------------
# BiomedCLIP's published layout: open_clip_pytorch_model.bin with a timm ViT tower.

from _timm_vit_reference import TimmViT  # noqa: E402  (tests/ is on sys.path under pytest)

from jaxreg.encoders import _base, registry  # noqa: E402
from jaxreg.encoders._base import EncoderSpec  # noqa: E402

# A 2-block, 64-wide, 64-px (4x4 grid) tower of timm's vit_base_patch16_224 design.
TIMM_SMALL = clip.ClipConfig(patch_size=16, hidden_size=64, depth=2, num_heads=2, mlp_dim=256,
                             layer_scale=False, act="gelu", norm_eps=1e-6, pos_grid=4,
                             pos_antialias=True, features_post_norm=True, pre_norm=False,
                             patch_bias=True)


def _timm_reference(seed=0, **tower):
    """timm's ViT design (random weights); by default 2 blocks, 64 wide, 64 px."""
    torch.manual_seed(seed)
    return perturb_(TimmViT(**(tower or dict(image_size=64, dim=64, depth=2, heads=2))),
                    seed=seed)


def _open_clip_state_dict(trunk):
    """open_clip's CustomTextCLIP names: the tower under visual.trunk, its projection, a text
    tower and the logit scale (all but the tower must be left out)."""
    sd = {"visual.trunk." + k: v for k, v in trunk.state_dict().items()}
    sd["visual.head.proj.weight"] = torch.randn(32, 64)
    sd["text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 16)
    sd["text.proj.0.weight"] = torch.randn(32, 16)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


def _open_clip_folder(path, trunk, timm_model_name):
    path.mkdir()
    torch.save(_open_clip_state_dict(trunk), path / "open_clip_pytorch_model.bin")
    config = {"model_cfg": {"embed_dim": 32, "vision_cfg": {
                  "timm_model_name": timm_model_name, "timm_model_pretrained": False,
                  "timm_pool": "", "timm_proj": "linear", "image_size": 64}},
              "preprocess_cfg": {"mean": list(clip.OPENAI_PREPROCESSING.mean),
                                 "std": list(clip.OPENAI_PREPROCESSING.std)}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    return path


def _timm_errors(trunk, model, x):
    """Relative error of every map against the timm reference, and the bound."""
    with torch.no_grad():
        tokens, hidden = trunk(torch.from_numpy(x).permute(0, 3, 1, 2))
    out = apply(model, x)
    b, h, w = x.shape[0], x.shape[1] // 16, x.shape[2] // 16
    maps = lambda t: t[:, 1:].reshape(b, h, w, -1).numpy()
    expected = {"features": maps(tokens), "cls": tokens[:, 0].numpy()}
    for i, t in enumerate(hidden, start=1):
        expected[f"block_{i}"] = maps(t)
    assert out["features"].shape == (b, h, w, model.config.hidden_size)
    return relative_errors(expected, out), vit_bound(model.config, 1 + h * w)


def test_open_clip_timm_layout_matches_timm_reference(tmp_path):
    trunk = _timm_reference()
    folder = _open_clip_folder(tmp_path / "biomedclip", trunk, "vit_small_test")
    model = clip.load(TIMM_SMALL, folder)
    for size in [(64, 64), (96, 128)]:  # the pretraining grid, then resampled positions
        errors, bound = _timm_errors(trunk, model, random_images(*size, batch=2))
        assert max(errors.values()) <= bound, (size, bound, errors)
    # A bare timm state dict (with a classifier head, dropped) converts the same way.
    sd = numpy_state_dict(trunk)
    sd.update({"head.weight": np.zeros((5, 64), np.float32), "head.bias": np.zeros(5, np.float32)})
    assert clip.convert(sd).keys() == clip.convert(
        {k: v.numpy() for k, v in _open_clip_state_dict(trunk).items()}).keys()


def test_open_clip_config_is_checked(tmp_path):
    folder = _open_clip_folder(tmp_path / "biomedclip", _timm_reference(), "vit_base_patch16_224")
    with pytest.raises(CheckpointError, match=r"open_clip_config.json .*vit_base_patch16_224: "
                                              r"hidden_size 768 \(the variant: 64\)"):
        clip.load(TIMM_SMALL, folder)


def test_biomedclip_variant_computes_timm_vit_base_patch16_224(tmp_path, monkeypatch):
    """``biomedclip_vitb16`` is the tower BiomedCLIP publishes, timm's vit_base_patch16_224
    (tests/_timm_vit_reference.py at its defaults: 224 px, patch 16, 768 wide, 12 blocks of
    12 heads, MLP 3072, exact GELU, LayerNorm eps 1e-6, a final norm on every token): its
    full-size weights fit the variant exactly, and the variant's first two blocks compute
    timm's maps at a size whose position grid is resampled.

    Catches each of the variant's constants set wrong: the width, depth, MLP width, patch
    size, position grid, a pre-norm, no patch bias or a layer scale (the weights do not
    fit: missing, unexpected or mis-shaped parameters), the quick GELU, 6 or 16 heads, eps
    1e-5, resampling without anti-aliasing, or "features" without the final norm (measured:
    each puts some map 100 to 500 000 times the float32 bound off timm's)."""
    spec = clip.VARIANTS["biomedclip_vitb16"]
    with torch.device("meta"):  # the full tower's parameter shapes, no memory
        full = TimmViT()
    zeros = {k: np.zeros(tuple(v.shape), np.float32) for k, v in full.state_dict().items()}
    _base.abstract_with(clip.create, "biomedclip_vitb16", clip.convert(zeros), source="timm")
    assert spec.preprocessing.image_size == spec.config.pos_grid * spec.patch_size == 224
    # Two blocks of it against timm's; 96 x 176 px: the 14 x 14 grid resampled to 6 x 11.
    trunk = _timm_reference(depth=2)  # vit_base_patch16_224's first two blocks
    model = _base.abstract_with(clip.create, dataclasses.replace(spec.config, depth=2),
                                clip.convert(numpy_state_dict(trunk)), source="timm")
    errors, bound = _timm_errors(trunk, model, random_images(96, 176))
    assert max(errors.values()) <= bound, (bound, errors)
    # BiomedCLIP's open_clip_config.json normalises as OpenAI CLIP does, and the registry
    # finds its open_clip file under the name the release uses.
    assert spec.preprocessing == clip.OPENAI_PREPROCESSING
    isolate_weights(monkeypatch, tmp_path)
    monkeypatch.setenv("JAXREG_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert registry.find_weights("medclip") == str(tmp_path / "open_clip_pytorch_model.bin")


def test_biomedclip_name_builds_the_checkpoints_layout(tmp_path, monkeypatch):
    """``biomedclip_vitb16`` from open_clip's layout is timm's ViT; from transformers'
    CLIPVisionModel layout (pre_layrnorm) it is built as ``biomedclip_vitb16_hf``."""
    hf_small = clip.ClipConfig(**{**TIMM_SMALL.__dict__, "pre_norm": True, "patch_bias": False,
                                  "pos_antialias": False})
    for name, config in (("biomedclip_vitb16", TIMM_SMALL), ("biomedclip_vitb16_hf", hf_small)):
        monkeypatch.setitem(clip.VARIANTS, name, EncoderSpec(
            name=name, config=config, preprocessing=clip.OPENAI_PREPROCESSING, patch_size=16,
            channels=64))
    trunk = _timm_reference()
    model = clip.load("biomedclip_vitb16", _open_clip_folder(tmp_path / "oc", trunk, "vit_x"))
    assert model.config == TIMM_SMALL
    errors, bound = _timm_errors(trunk, model, random_images(64, 64))
    assert max(errors.values()) <= bound, (bound, errors)
    hf = _hf_model(act="gelu", eps=1e-6, image_size=64)
    hf.save_pretrained(tmp_path / "hf")
    model = clip.load("biomedclip_vitb16", tmp_path / "hf")
    assert model.config == hf_small
    errors, bound = _errors(hf, model, random_images(64, 64))
    assert max(errors.values()) <= bound, (bound, errors)
