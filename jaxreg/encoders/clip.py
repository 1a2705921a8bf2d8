"""CLIP vision tower (OpenAI CLIP, BiomedCLIP) in Flax NNX.

Follows transformers' ``CLIPVisionModel`` with ``interpolate_pos_encoding=True``:
learned position embeddings on the pretraining grid (14x14 at 224 px) resampled
bicubically (no anti-aliasing) to any token grid; a layer norm before the first
block (``pre_layrnorm``) and one on the pooled class token (``post_layernorm``).

Which patch tokens are the default ``"features"``:
  * ``clip_vitb16``: transformers' ``last_hidden_state`` (no final norm on patches);
  * ``biomedclip_vitb16``: the post-norm applied to the patch tokens too, since
    BiomedCLIP is a timm ViT whose final norm acts on every token (its
    ``forward_features``) and that norm is what a ``CLIPVisionModel`` layout stores as
    ``post_layernorm``.

Weights load from Hugging Face ``CLIPVisionModel`` or ``CLIPModel`` files (only
``vision_model.*`` is taken).
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
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders._checkpoint import CheckpointError

__all__ = ["ClipConfig", "ClipVision", "VARIANTS", "OPENAI_PREPROCESSING", "create", "convert",
           "load"]

# OpenAI CLIP's normalisation, also BiomedCLIP's (its open_clip preprocess config).
OPENAI_PREPROCESSING = Preprocessing(
    image_size=224, mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711), value_range=(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class ClipConfig(vit.ViTConfig):
    """:class:`~jaxreg.encoders.vit.ViTConfig` plus where ``"features"`` is taken.

    Attributes:
      features_post_norm: apply ``post_layernorm`` to the patch tokens of
        ``"features"`` (timm-style towers such as BiomedCLIP).
    """

    features_post_norm: bool = False


def _config(*, act: str, eps: float, post_norm: bool) -> ClipConfig:
    return ClipConfig(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072,
                      layer_scale=False, act=act, norm_eps=eps, pos_grid=14,
                      features_post_norm=post_norm)


VARIANTS: dict[str, EncoderSpec] = {
    "clip_vitb16": EncoderSpec(
        name="clip_vitb16", config=_config(act="quick_gelu", eps=1e-5, post_norm=False),
        preprocessing=OPENAI_PREPROCESSING, patch_size=16, channels=768),
    "biomedclip_vitb16": EncoderSpec(
        name="biomedclip_vitb16", config=_config(act="gelu", eps=1e-6, post_norm=True),
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
                                          bias=False, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (c,), jnp.float32))
        self.pos_embed = nnx.Param(init(rngs.params(), (config.pos_grid ** 2 + 1, c),
                                        jnp.float32))
        norm = lambda: nnx.LayerNorm(c, epsilon=config.norm_eps, dtype=dtype,
                                     param_dtype=jnp.float32, rngs=rngs)
        self.pre_norm = norm()
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
        x = self.pre_norm(vit.prepend_tokens(x, self.cls_token[...] + cls_pos))
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


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Hugging Face CLIP vision state dict to jaxreg's flat params (numpy).

    Args:
      sd: ``CLIPVisionModel`` (names with or without ``vision_model.``) or ``CLIPModel``
        state dict (``vision_model.*`` taken, the text tower and projections dropped).

    Returns:
      ``{"blocks.0.attn.q.kernel": array, ...}``; unknown entries keep their names so
      that loading lists them as unexpected.

    Raises:
      CheckpointError: no CLIP vision tower in ``sd``.
    """
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        sd = {k[len("vision_model."):]: v for k, v in sd.items()
              if k.startswith("vision_model.")}
    if "embeddings.patch_embedding.weight" not in sd:
        raise CheckpointError(
            "not a CLIP vision checkpoint: "
            "'[vision_model.]embeddings.patch_embedding.weight' is missing; first keys: "
            + ", ".join(sorted(sd)[:8]))
    return tn.convert_by_rules(sd, _RULES, _IGNORED)


def load(variant: str | ClipConfig, path: str | os.PathLike, *,
         dtype=jnp.float32) -> ClipVision:
    """A model with weights from a local checkpoint, strictly (:func:`_base.load_checkpoint`).

    Args:
      variant: as :func:`create`, e.g. ``"biomedclip_vitb16"``.
      path: a ``.safetensors`` / ``.bin`` file, a Hugging Face model folder, or an
        offline cache folder ``models--org--name``.
      dtype: compute dtype.
    """
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)
