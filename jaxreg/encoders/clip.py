"""CLIP vision towers (OpenAI CLIP, BiomedCLIP) in Flax NNX.

Two layouts of the same ViT-B/16:

* transformers' ``CLIPVisionModel`` (``clip_vitb16``, ``biomedclip_vitb16_hf``): a layer
  norm before the first block (``pre_layrnorm``), no bias on the patch convolution, one
  norm on the pooled class token (``post_layernorm``); position embeddings resampled as
  with ``interpolate_pos_encoding=True`` (bicubic, no anti-aliasing);
* timm's ``vit_base_patch16_224`` (``biomedclip_vitb16``), which is what BiomedCLIP's
  published release holds (``open_clip_pytorch_model.bin``: open_clip's ``TimmModel`` with
  ``timm_model_name`` ``vit_base_patch16_224``, ``timm_pool`` "" and ``timm_proj``
  "linear"): no norm before the blocks, a bias on the patch convolution, exact GELU, layer
  norm epsilon 1e-6, a final norm over every token, fused q|k|v weights, and position
  embeddings resampled as timm does (bicubic, anti-aliased). open_clip's image embedding
  is that final-normed class token times ``visual.head.proj`` (768 -> 512); the
  projection and the text tower (``text.*``) are not loaded.

Which patch tokens are the default ``"features"``:
  * ``clip_vitb16``: transformers' ``last_hidden_state`` (no final norm on patches);
  * the BiomedCLIP variants: the final norm applied to the patch tokens too (timm's
    ``forward_features``), kept as ``post_norm`` in either layout.

BiomedCLIP's preprocessing (its ``open_clip_config.json``, ``preprocess_cfg``): 224 px,
OpenAI CLIP's mean and std on [0, 1] pixels.

Weights load from Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` files (only
``vision_model.*`` is taken), open_clip files with a timm tower (only ``visual.trunk.*``
is taken) and bare timm ViT state dicts. ``biomedclip_vitb16`` given a
``CLIPVisionModel``-layout checkpoint is built as ``biomedclip_vitb16_hf``
(:func:`variant_for`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _base, vit
from jaxreg.encoders import _torch_names as tn
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders.checkpoint import CheckpointError

__all__ = ["ClipConfig", "ClipVision", "VARIANTS", "OPENAI_PREPROCESSING", "create", "convert",
           "variant_for", "load"]

# OpenAI CLIP's normalisation, also BiomedCLIP's (its open_clip preprocess config).
OPENAI_PREPROCESSING = Preprocessing(
    image_size=224, mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711), value_range=(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class ClipConfig(vit.ViTConfig):
    """:class:`~jaxreg.encoders.vit.ViTConfig` plus the layout switches and ``"features"``.

    Attributes:
      features_post_norm: apply ``post_layernorm`` to the patch tokens of
        ``"features"`` (timm-style towers such as BiomedCLIP).
      pre_norm: a layer norm before the first block (transformers' ``pre_layrnorm``;
        timm's ViT-B/16 has none).
      patch_bias: a bias on the patch convolution (timm: yes; transformers: no).
    """

    features_post_norm: bool = False
    pre_norm: bool = True
    patch_bias: bool = False


def _config(*, act: str, eps: float, post_norm: bool, timm: bool = False) -> ClipConfig:
    return ClipConfig(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072,
                      layer_scale=False, act=act, norm_eps=eps, pos_grid=14,
                      features_post_norm=post_norm, pre_norm=not timm, patch_bias=timm,
                      pos_antialias=timm)


VARIANTS: dict[str, EncoderSpec] = {
    "clip_vitb16": EncoderSpec(
        name="clip_vitb16", config=_config(act="quick_gelu", eps=1e-5, post_norm=False),
        preprocessing=OPENAI_PREPROCESSING, patch_size=16, channels=768),
    # BiomedCLIP as published (timm's vit_base_patch16_224 inside open_clip).
    "biomedclip_vitb16": EncoderSpec(
        name="biomedclip_vitb16",
        config=_config(act="gelu", eps=1e-6, post_norm=True, timm=True),
        preprocessing=OPENAI_PREPROCESSING, patch_size=16, channels=768),
    # BiomedCLIP re-saved in transformers' CLIPVisionModel layout.
    "biomedclip_vitb16_hf": EncoderSpec(
        name="biomedclip_vitb16_hf", config=_config(act="gelu", eps=1e-6, post_norm=True),
        preprocessing=OPENAI_PREPROCESSING, patch_size=16, channels=768),
}


class ClipVision(nnx.Module):
    """CLIP ViT vision tower.

    Args:
      config: the architecture (``VARIANTS[name].config``).
      dtype: compute dtype; parameters stay float32, outputs are float32.
      rngs: initialisation randomness.
    """

    def __init__(self, config: ClipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if config.pos_grid <= 0:
            raise ValueError(f"pos_grid={config.pos_grid}: CLIP needs a learned grid")
        self.config = config
        self.dtype = dtype
        c = config.hidden_size
        init = jax.nn.initializers.normal(0.02)
        self.patch_embed = vit.PatchEmbed(patch_size=config.patch_size, hidden_size=c,
                                          bias=config.patch_bias, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (c,), jnp.float32))
        self.pos_embed = nnx.Param(init(rngs.params(), (config.pos_grid ** 2 + 1, c),
                                        jnp.float32))
        norm = lambda: nnx.LayerNorm(c, epsilon=config.norm_eps, dtype=dtype,
                                     param_dtype=jnp.float32, rngs=rngs)
        self.pre_norm = norm() if config.pre_norm else None
        self.blocks = nnx.List([vit.Block(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.depth)])
        self.post_norm = norm()

    def __call__(self, images: jax.Array, *,
                 blocks: Sequence[int] | None = None) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: (B, H, W, 3), normalised with the OpenAI mean/std.
          blocks: which ``"block_i"`` maps to return (counted from 1); None: all.

        Returns:
          ``{"block_i": (B, h, w, C), "features": (B, h, w, C) (see the module
          docstring), "cls": (B, C) the post-normed class token (transformers'
          ``pooler_output``)}``, float32.
        """
        cfg = self.config
        x = self.patch_embed(images.astype(self.dtype))
        h, w = x.shape[1:3]
        x, cls_pos = vit.learned_positions(x, self.pos_embed[...], cfg)
        x = vit.prepend_tokens(x, self.cls_token[...] + cls_pos)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x, out = vit.run_blocks(self.blocks, x, grid=(h, w), num_prefix=1, keep=blocks)
        patches = self.post_norm(x[:, 1:]) if cfg.features_post_norm else x[:, 1:]
        out["features"] = vit.tokens_to_maps(patches, (h, w))
        out["cls"] = self.post_norm(x[:, 0]).astype(jnp.float32)
        return out


def create(variant: str | ClipConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> ClipVision:
    """A randomly initialised model.

    Args:
      variant: a ``VARIANTS`` name, or a :class:`ClipConfig` (small test models).
      rngs: initialisation randomness.
      dtype: compute dtype.
    """
    return ClipVision(_base.variant_config(VARIANTS, variant, "CLIP"), dtype=dtype, rngs=rngs)


_L = r"encoder\.layers\.(\d+)"
_RULES = (
    [tn.rename(r"embeddings\.class_embedding", "cls_token", "vector"),
     tn.rename(r"embeddings\.position_embedding\.weight", "pos_embed")]
    + tn.conv_rules(r"embeddings\.patch_embedding", "patch_embed.proj")
    + tn.norm_rules(r"pre_layrnorm", "pre_norm")
    + tn.norm_rules(r"post_layernorm", "post_norm")
    + tn.norm_rules(_L + r"\.layer_norm1", r"blocks.\1.norm1")
    + tn.norm_rules(_L + r"\.layer_norm2", r"blocks.\1.norm2")
    + tn.linear_rules(_L + r"\.self_attn\.q_proj", r"blocks.\1.attn.q")
    + tn.linear_rules(_L + r"\.self_attn\.k_proj", r"blocks.\1.attn.k")
    + tn.linear_rules(_L + r"\.self_attn\.v_proj", r"blocks.\1.attn.v")
    + tn.linear_rules(_L + r"\.self_attn\.out_proj", r"blocks.\1.attn.out")
    + tn.linear_rules(_L + r"\.mlp\.fc1", r"blocks.\1.mlp.fc1")
    + tn.linear_rules(_L + r"\.mlp\.fc2", r"blocks.\1.mlp.fc2")
)
_IGNORED = (r"embeddings\.position_ids",)

# timm's VisionTransformer names (open_clip's visual.trunk.*).
_B = r"blocks\.(\d+)"
_TIMM_RULES = (
    [tn.rename(r"cls_token", "cls_token", "vector"),
     tn.rename(r"pos_embed", "pos_embed", "rows")]
    + tn.conv_rules(r"patch_embed\.proj", "patch_embed.proj")
    + tn.norm_rules(r"norm_pre", "pre_norm")
    + tn.norm_rules(_B + r"\.norm1", r"blocks.\1.norm1")
    + tn.norm_rules(_B + r"\.norm2", r"blocks.\1.norm2")
    + [tn.split_rule(_B + r"\.attn\.qkv\.weight", [rf"blocks.\1.attn.{p}.kernel" for p in "qkv"]),
       tn.split_rule(_B + r"\.attn\.qkv\.bias", [rf"blocks.\1.attn.{p}.bias" for p in "qkv"],
                     "copy")]
    + tn.linear_rules(_B + r"\.attn\.proj", r"blocks.\1.attn.out")
    + tn.linear_rules(_B + r"\.mlp\.fc1", r"blocks.\1.mlp.fc1")
    + tn.linear_rules(_B + r"\.mlp\.fc2", r"blocks.\1.mlp.fc2")
    + tn.norm_rules(r"norm", "post_norm")
)
_TIMM_IGNORED = (r"head\.(?:weight|bias)",)  # a timm classifier; jaxreg returns maps only


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A CLIP vision state dict to jaxreg's flat params (numpy).

    Args:
      sd: one of
        * a transformers ``CLIPVisionModel`` (names with or without ``vision_model.``) or
          ``CLIPModel`` state dict (``vision_model.*`` taken, the text tower and
          projections dropped);
        * an open_clip state dict with a timm image tower, as BiomedCLIP's
          ``open_clip_pytorch_model.bin`` (``visual.trunk.*`` taken; the projection
          ``visual.head.*``, the text tower ``text.*`` and ``logit_scale`` dropped);
        * a timm ``VisionTransformer`` state dict (``patch_embed.proj.weight``,
          ``blocks.N.attn.qkv.weight`` ...; a classifier ``head`` is dropped).

    Returns:
      ``{"blocks.0.attn.q.kernel": array, ...}``; unknown entries keep their names so
      that loading lists them as unexpected.

    Raises:
      CheckpointError: no CLIP vision tower in ``sd``.
    """
    for prefix in ("visual.trunk.", "trunk."):
        if prefix + "patch_embed.proj.weight" in sd:
            sd = _checkpoint.strip_prefix(sd, prefix)
            break
    if "patch_embed.proj.weight" in sd:
        return tn.convert_by_rules(sd, _TIMM_RULES, _TIMM_IGNORED)
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        sd = _checkpoint.strip_prefix(sd, "vision_model.")
    if "embeddings.patch_embedding.weight" not in sd:
        raise CheckpointError(
            "not a CLIP vision checkpoint: neither '[vision_model.]embeddings."
            "patch_embedding.weight' (transformers) nor '[visual.trunk.]patch_embed.proj."
            "weight' (open_clip with a timm tower, timm) is in it; first keys: "
            + ", ".join(sorted(sd)[:8]))
    return tn.convert_by_rules(sd, _RULES, _IGNORED)


# BiomedCLIP read from transformers' CLIPVisionModel layout (which has pre_layrnorm).
_HF_LAYOUT = {"biomedclip_vitb16": "biomedclip_vitb16_hf"}


def variant_for(variant: str | ClipConfig,
                params: Mapping[str, np.ndarray]) -> str | ClipConfig:
    """The variant to build for converted ``params``.

    ``"biomedclip_vitb16"`` (timm's layout, BiomedCLIP's release) becomes
    ``"biomedclip_vitb16_hf"`` when ``params`` come from a ``CLIPVisionModel`` layout
    (they hold ``pre_norm``); any other variant is returned as it is.
    """
    if isinstance(variant, str) and variant in _HF_LAYOUT and "pre_norm.scale" in params:
        return _HF_LAYOUT[variant]
    return variant


def load(variant: str | ClipConfig, path: str | os.PathLike, *,
         dtype=jnp.float32) -> ClipVision:
    """A model with weights from a local checkpoint, strictly (:func:`_base.load_checkpoint`).

    Args:
      variant: as :func:`create`, e.g. ``"biomedclip_vitb16"`` (see :func:`variant_for`).
      path: a ``.safetensors`` / ``.bin`` file, a Hugging Face or open_clip model folder
        (BiomedCLIP's ``open_clip_pytorch_model.bin``), or an offline cache folder
        ``models--org--name``.
      dtype: compute dtype.
    """
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype,
                                 variant_for=variant_for)
