"""A model folder's config.json (open_clip_config.json) is read and must fit the variant.

Every family that loads Hugging Face folders (CLIP, DINOv2, DINOv3, SAM) goes through the
one check in jaxreg.encoders._base.load_checkpoint; the mismatches tested here (activation,
norm epsilon, head count) change no tensor shape, so the strict parameter check alone
let them through.
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxreg.encoders import clip, dinov2, dinov3, registry, sam, vit  # noqa: E402
from jaxreg.encoders._base import EncoderSpec  # noqa: E402
from jaxreg.encoders._folder_config import expected_fields  # noqa: E402
from jaxreg.encoders.checkpoint import CheckpointError  # noqa: E402

CASES = {
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
                 hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=64, image_size=32, patch_size=16)),
             clip.ClipConfig(patch_size=16, hidden_size=32, depth=1, num_heads=2, mlp_dim=64,
                             layer_scale=False, act="quick_gelu", norm_eps=1e-5, pos_grid=2),
             clip.load),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
                   hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                   patch_size=14)),
               vit.ViTConfig(patch_size=14, hidden_size=32, depth=1, num_heads=2, mlp_dim=128,
                             pos_grid=2),
               dinov2.load),
    "dinov3": (lambda: transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
                   hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=128, num_register_tokens=4, patch_size=16)),
               vit.ViTConfig(patch_size=16, hidden_size=32, depth=1, num_heads=2, mlp_dim=128,
                             num_registers=4, qkv_bias=(True, False, True), norm_eps=1e-5,
                             rope_theta=100.0),
               dinov3.load),
    "sam": (lambda: transformers.SamVisionModel(transformers.SamVisionConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                patch_size=8, window_size=4, global_attn_indexes=[1], output_channels=16)),
            sam.SamConfig(image_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                          window_size=4, global_attn_indexes=(1,), out_chans=16),
            sam.load),
}


def _edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("family", sorted(CASES))
def test_folder_config_must_fit_the_variant(family, tmp_path):
    make, config, load = CASES[family]
    torch.manual_seed(0)
    make().save_pretrained(tmp_path / "hf")
    assert load(config, tmp_path / "hf").config == config  # its own config.json fits
    # An offline cache folder: config.json read beside the snapshot's weights.
    snap = tmp_path / "models--org--name" / "snapshots" / "abc"
    shutil.copytree(tmp_path / "hf", snap)
    _edit_config(snap, num_attention_heads=4)
    # 4 heads of 8 channels or 2 of 16: the same tensors, another model.
    with pytest.raises(CheckpointError, match=r"snapshots/abc/config.json describes another "
                                              r"model.*num_attention_heads 4 \(the variant: 2\)"):
        load(config, tmp_path / "models--org--name")
    _edit_config(snap, num_attention_heads=2, layer_norm_eps=1e-3)
    with pytest.raises(CheckpointError, match=r"layer_norm_eps 0.001"):
        load(config, snap)


def test_openai_clip_folder_is_refused_as_medclip(tmp_path, monkeypatch):
    """An OpenAI CLIP (quick-GELU, eps 1e-5) folder given for BiomedCLIP (GELU, eps 1e-6)."""
    small = dict(patch_size=16, hidden_size=32, depth=1, num_heads=2, mlp_dim=64,
                 layer_scale=False, act="gelu", norm_eps=1e-6, pos_grid=2,
                 features_post_norm=True)
    for name, layout in (("biomedclip_vitb16", dict(pre_norm=False, patch_bias=True)),
                         ("biomedclip_vitb16_hf", {})):
        monkeypatch.setitem(clip.VARIANTS, name, EncoderSpec(
            name=name, config=clip.ClipConfig(**small, **layout),
            preprocessing=clip.OPENAI_PREPROCESSING, patch_size=16, channels=32))
    torch.manual_seed(0)
    CASES["clip"][0]().save_pretrained(tmp_path / "openai")
    with pytest.raises(CheckpointError, match=r"openai/config.json .*layer_norm_eps 1e-05 \(the "
                                              r"variant: 1e-06\); hidden_act 'quick_gelu' "
                                              r"\(the variant: 'gelu'\)"):
        registry.load_encoder("medclip", tmp_path / "openai")
    # Files saved with transformers' use_diff leave defaults out: CLIP's default is quick_gelu.
    _edit_config(tmp_path / "openai", hidden_act=None, layer_norm_eps=None)
    with pytest.raises(CheckpointError, match="hidden_act 'quick_gelu'"):
        registry.load_encoder("medclip", tmp_path / "openai")
    # The same architecture in BiomedCLIP's activation and epsilon loads.
    _edit_config(tmp_path / "openai", hidden_act="gelu", layer_norm_eps=1e-6)
    model, _ = registry.load_encoder("medclip", tmp_path / "openai")
    assert model.config == clip.VARIANTS["biomedclip_vitb16_hf"].config


def test_expected_fields_of_the_reference_variants():
    types, fields = expected_fields(clip.VARIANTS["clip_vitb16"].config)
    assert "clip_vision_model" in types and fields["hidden_act"] == "quick_gelu"
    types, fields = expected_fields(dinov2.VARIANTS["dinov2_vitl14_reg"].config)
    assert types == ("dinov2_with_registers",)
    assert (fields["image_size"], fields["num_register_tokens"], fields["mlp_ratio"]) == (518, 4, 4)
    types, fields = expected_fields(dinov2.VARIANTS["dinov2_vitg14"].config)
    assert fields["use_swiglu_ffn"] and "hidden_act" not in fields
    types, fields = expected_fields(dinov3.VARIANTS["dinov3_vitb16"].config)
    assert types == ("dinov3_vit",) and not fields["key_bias"]
    types, fields = expected_fields(sam.VARIANTS["medsam_vitb"].config)
    assert fields["global_attn_indexes"] == [2, 5, 8, 11] and fields["image_size"] == 1024
    assert np.isclose(fields["layer_norm_eps"], 1e-6)
