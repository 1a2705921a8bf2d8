"""A model folder's own description of its architecture, checked against the variant loaded.

A Hugging Face model folder carries ``config.json`` (``model_type``, ``hidden_act``,
``hidden_size`` ...), an open_clip folder ``open_clip_config.json`` (the timm tower's
name). The strict parameter check of :func:`jaxreg.encoders.checkpoint.assign_params`
sees only shapes, so a folder whose activation, head count, norm epsilon or model type
differ from the variant would load silently and compute something else (an OpenAI CLIP,
quick-GELU, loaded as BiomedCLIP, GELU). :func:`check_folder` reads those files and
refuses such a folder, naming the file and every field that differs.

The expected values come from the variant's config (the families' config classes,
recognised by name, so this module imports no family): ``ClipConfig`` (transformers'
``clip`` / ``clip_vision_model``, or an open_clip timm tower), ``ViTConfig`` with RoPE
(``dinov3_vit``), ``ViTConfig`` with learned positions (``dinov2``,
``dinov2_with_registers``), ``SamConfig`` (``sam`` / ``sam_vision_model``). Other configs
(TinyViT) are not checked. A field missing from ``config.json`` takes transformers'
default for its model type (files saved with ``use_diff`` leave defaults out).
"""

from __future__ import annotations

import json
import math
import os
import re

from jaxreg.encoders.checkpoint import CheckpointError, resolve_checkpoint

__all__ = ["check_folder", "expected_fields"]

# transformers' defaults of the fields compared, per model type.
_DEFAULTS: dict[str, dict[str, object]] = {
    "clip_vision_model": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5, image_size=224, patch_size=32),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                   use_swiglu_ffn=False),
    "dinov2_with_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6,
                                  image_size=224, patch_size=16, use_swiglu_ffn=False,
                                  num_register_tokens=4),
    "dinov3_vit": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, hidden_act="gelu", layer_norm_eps=1e-5,
                       patch_size=16, num_register_tokens=0, rope_theta=100.0,
                       use_gated_mlp=False, query_bias=True, key_bias=False, value_bias=True),
    "sam_vision_model": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             mlp_ratio=4.0, hidden_act="gelu", layer_norm_eps=1e-6,
                             image_size=1024, patch_size=16, window_size=14,
                             global_attn_indexes=[2, 5, 8, 11], output_channels=256),
}
# Whole-model configs whose vision tower sits in "vision_config".
_NESTED = {"clip": "clip_vision_model", "sam": "sam_vision_model"}


def _vit_fields(c) -> dict[str, object]:
    return dict(hidden_size=c.hidden_size, num_hidden_layers=c.depth,
                num_attention_heads=c.num_heads, patch_size=c.patch_size,
                layer_norm_eps=c.norm_eps)


def expected_fields(config) -> tuple[tuple[str, ...], dict[str, object]] | None:
    """(the ``model_type`` values that fit ``config``, the ``config.json`` fields it
    implies), or None for a config this module does not check."""
    kind = type(config).__name__
    if kind == "SamConfig":
        return ("sam", "sam_vision_model"), dict(
            hidden_size=config.embed_dim, num_hidden_layers=config.depth,
            num_attention_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
            patch_size=config.patch_size, image_size=config.image_size,
            window_size=config.window_size, global_attn_indexes=list(config.global_attn_indexes),
            output_channels=config.out_chans, layer_norm_eps=config.layer_norm_eps,
            hidden_act="gelu")
    if kind == "ClipConfig":
        return ("clip", "clip_vision_model"), dict(
            _vit_fields(config), intermediate_size=config.mlp_dim, hidden_act=config.act,
            image_size=config.pos_grid * config.patch_size)
    if kind == "ViTConfig" and config.rope_theta:
        bias = config.qkv_bias
        return ("dinov3_vit",), dict(
            _vit_fields(config), intermediate_size=config.mlp_dim, hidden_act=config.act,
            num_register_tokens=config.num_registers, rope_theta=config.rope_theta,
            use_gated_mlp=config.gated_mlp, query_bias=bias[0], key_bias=bias[1],
            value_bias=bias[2])
    if kind == "ViTConfig":
        fields = dict(_vit_fields(config), image_size=config.pos_grid * config.patch_size,
                      use_swiglu_ffn=config.gated_mlp)
        if not config.gated_mlp:  # SwiGLU models: transformers keeps hidden_act "gelu"
            fields.update(hidden_act=config.act, mlp_ratio=config.mlp_dim / config.hidden_size)
        if config.num_registers:
            return ("dinov2_with_registers",), dict(fields,
                                                    num_register_tokens=config.num_registers)
        return ("dinov2",), fields
    return None


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)
    return a == b


def _hf_mismatches(data: dict, config) -> list[str]:
    expected = expected_fields(config)
    if expected is None:
        return []
    types, fields = expected
    model_type = data.get("model_type")
    if model_type in _NESTED and isinstance(data.get("vision_config"), dict):
        data = data["vision_config"]
        model_type = data.get("model_type", _NESTED[model_type])
    if model_type is not None and model_type not in types:
        return [f"model_type {model_type!r} (the variant: {' or '.join(map(repr, types))})"]
    defaults = _DEFAULTS.get(model_type, {})
    problems = []
    for name, want in fields.items():
        have = data.get(name, defaults.get(name))
        if have is not None and not _same(have, want):
            problems.append(f"{name} {have!r} (the variant: {want!r})")
    return problems


# timm's ViT sizes: width, depth, heads.
_TIMM_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
               "large": (1024, 24, 16), "huge": (1280, 32, 16)}


def _open_clip_mismatches(data: dict, config) -> list[str]:
    if type(config).__name__ != "ClipConfig":
        return [f"an open_clip model, not a {type(config).__name__} one"]
    vision = data.get("model_cfg", data).get("vision_cfg", {})
    name = vision.get("timm_model_name")
    if not name:
        return ["vision_cfg has no timm_model_name: only open_clip models with a timm "
                "image tower (BiomedCLIP) are supported"]
    m = re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)", name)
    if m is None:
        return []  # another timm tower: the strict parameter check judges it
    width, depth, heads = _TIMM_SIZES[m[1]]
    have = dict(hidden_size=width, depth=depth, num_heads=heads, patch_size=int(m[2]),
                image_size=vision.get("image_size", int(m[3])), pre_norm=False,
                patch_bias=True)
    want = dict(hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads,
                patch_size=config.patch_size, image_size=config.pos_grid * config.patch_size,
                pre_norm=config.pre_norm, patch_bias=config.patch_bias)
    return [f"{name}: {k} {have[k]!r} (the variant: {want[k]!r})"
            for k in want if not _same(have[k], want[k])]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a JSON object")
    return data


def check_folder(path: str | os.PathLike, config) -> None:
    """Refuses a model folder whose ``config.json`` / ``open_clip_config.json`` contradicts
    ``config``.

    Args:
      path: the folder given to the loader (a Hugging Face model folder or cache folder, an
        open_clip folder); the files are read beside the weights
        :func:`~jaxreg.encoders.checkpoint.resolve_checkpoint` picks.
      config: the architecture about to be built (the model's ``config``).

    Raises:
      CheckpointError: naming the file and every mismatching field (or an unreadable file).
    """
    folder = os.path.dirname(resolve_checkpoint(path)[0])
    for name, mismatches in (("config.json", _hf_mismatches),
                             ("open_clip_config.json", _open_clip_mismatches)):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        problems = mismatches(_read_json(file), config)
        if problems:
            raise CheckpointError(
                f"{file} describes another model than the variant asked for "
                f"({type(config).__name__}): " + "; ".join(problems))
