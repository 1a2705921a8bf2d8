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
from absl import logging
from flax import nnx

from jaxreg.encoders import vit
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders._checkpoint import CheckpointError, assign_params

__all__ = ["ClipConfig", "ClipVision", "VARIANTS", "OPENAI_PREPROCESSING", "create", "load",
           "convert_state_dict"]

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
                 layers: Sequence[int] | None = None) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: (B, H, W, 3), normalised with the OpenAI mean/std.
          layers: which blocks' patch tokens to return as ``"layer_i"`` (1-based,
            transformers' ``hidden_states[i]``); None: all.

        Returns:
          ``{"layer_i": (B, h, w, C), "features": (B, h, w, C) (see the module
          docstring), "cls": (B, C) the post-normed class token (transformers'
          ``pooler_output``)}``, float32.
        """
        cfg = self.config
        x = self.patch_embed(images.astype(self.dtype))
        b, h, w, c = x.shape
        pos = self.pos_embed[...]
        g = cfg.pos_grid
        patch_pos = vit.resample_pos_embed(pos[1:].reshape(g, g, c), (h, w),
                                           antialias=cfg.pos_antialias, offset=cfg.pos_offset)
        x = x.reshape(b, h * w, c) + patch_pos.reshape(1, h * w, c).astype(x.dtype)
        cls = jnp.broadcast_to((self.cls_token[...] + pos[0]).astype(x.dtype), (b, 1, c))
        x = self.pre_norm(jnp.concatenate([cls, x], axis=1))
        x, out = vit.run_blocks(self.blocks, x, grid=(h, w), num_prefix=1, layers=layers)
        patches = self.post_norm(x[:, 1:]) if cfg.features_post_norm else x[:, 1:]
        out["features"] = vit.tokens_to_maps(patches, (h, w))
        out["cls"] = self.post_norm(x[:, 0]).astype(jnp.float32)
        return out


def create(name: str, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
           config: vit.ViTConfig | None = None) -> ClipVision:
    """A randomly initialised variant.

    Args:
      name: a ``VARIANTS`` name.
      dtype: compute dtype.
      rngs: initialisation randomness (default ``nnx.Rngs(0)``).
      config: an architecture replacing ``VARIANTS[name].config`` (small test models,
        a different ``pos_offset``).

    Returns:
      The model.
    """
    if name not in VARIANTS:
        raise ValueError(f"{name!r}: not a CLIP variant; expected one of {sorted(VARIANTS)}")
    return ClipVision(config if config is not None else VARIANTS[name].config, dtype=dtype,
                      rngs=rngs if rngs is not None else nnx.Rngs(0))


_L = r"encoder\.layers\.(\d+)"
_RULES = (
    [vit.rename(r"embeddings\.class_embedding", "cls_token", "vector"),
     vit.rename(r"embeddings\.position_embedding\.weight", "pos_embed")]
    + vit.conv_rules(r"embeddings\.patch_embedding", "patch_embed.proj")
    + vit.norm_rules(r"pre_layrnorm", "pre_norm")
    + vit.norm_rules(r"post_layernorm", "post_norm")
    + vit.norm_rules(_L + r"\.layer_norm1", r"blocks.\1.norm1")
    + vit.norm_rules(_L + r"\.layer_norm2", r"blocks.\1.norm2")
    + vit.linear_rules(_L + r"\.self_attn\.q_proj", r"blocks.\1.attn.q")
    + vit.linear_rules(_L + r"\.self_attn\.k_proj", r"blocks.\1.attn.k")
    + vit.linear_rules(_L + r"\.self_attn\.v_proj", r"blocks.\1.attn.v")
    + vit.linear_rules(_L + r"\.self_attn\.out_proj", r"blocks.\1.attn.out")
    + vit.linear_rules(_L + r"\.mlp\.fc1", r"blocks.\1.mlp.fc1")
    + vit.linear_rules(_L + r"\.mlp\.fc2", r"blocks.\1.mlp.fc2")
)
_IGNORED = (r"embeddings\.position_ids",)


def convert_state_dict(sd: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """A Hugging Face CLIP vision state dict to jaxreg's flat params (numpy).

    Args:
      sd: ``CLIPVisionModel`` (names with or without ``vision_model.``) or ``CLIPModel``
        state dict (``vision_model.*`` taken, the text tower and projections dropped).
      name: the variant (``VARIANTS``).

    Returns:
      ``{"blocks.0.attn.q.kernel": array, ...}``; unknown entries keep their names so
      that loading lists them as unexpected.

    Raises:
      CheckpointError: no CLIP vision tower in ``sd``.
    """
    if vit.is_converted(sd):  # written by python -m jaxreg.convert
        return dict(sd)
    if name not in VARIANTS:
        raise ValueError(f"{name!r}: not a CLIP variant; expected one of {sorted(VARIANTS)}")
    if "vision_model.embeddings.patch_embedding.weight" in sd:
        sd = {k[len("vision_model."):]: v for k, v in sd.items()
              if k.startswith("vision_model.")}
    if "embeddings.patch_embedding.weight" not in sd:
        raise CheckpointError(
            f"not a CLIP vision checkpoint for {name}: "
            "'[vision_model.]embeddings.patch_embedding.weight' is missing; first keys: "
            + ", ".join(sorted(sd)[:8]))
    return vit.convert_by_rules(sd, _RULES, _IGNORED)


def load(name: str, path: str | os.PathLike, *, dtype=jnp.float32,
         config: vit.ViTConfig | None = None) -> ClipVision:
    """A variant with weights from a local checkpoint, strictly.

    Args:
      name: ``"clip_vitb16"`` or ``"biomedclip_vitb16"``.
      path: a ``.safetensors`` / ``.bin`` file, a Hugging Face model folder, or an
        offline cache folder ``models--org--name``.
      dtype: compute dtype.
      config: an architecture replacing ``VARIANTS[name].config``.

    Returns:
      The model.

    Raises:
      CheckpointError: unreadable file, or any parameter missing, unexpected or
        mis-shaped (all listed).
    """
    sd, source = vit.read_checkpoint(path)
    params = convert_state_dict(sd, name)
    model = vit.create_abstract(lambda: create(name, dtype=dtype, config=config))
    assign_params(model, params, source=source)
    logging.info("Loaded %s from %s (%d tensors).", name, source, len(params))
    return model
