"""DINOv2 (with and without registers) in Flax NNX.

Architecture and position-embedding resampling follow transformers' ``Dinov2Model``
and ``Dinov2WithRegistersModel``: learned embeddings on a 37x37 grid, resampled
bicubically to any token grid (anti-aliased for the register models, as
transformers does it), so any input size works, square or not (pixels past the last
whole 14-px patch are dropped).

Weights load from Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` files
(old ``attention.attention.query`` or new ``attention.q_proj`` names) or from the
original ``.pth`` releases (``dinov2_vitl14_reg4_pretrain.pth``: ``blocks.N.attn.qkv``,
``ls1.gamma`` ...).

>>> model = create("dinov2_vits14", rngs=nnx.Rngs(0))  # doctest: +SKIP
>>> out = model(jnp.zeros((1, 224, 308, 3)))  # doctest: +SKIP
>>> out["features"].shape, out["cls"].shape  # doctest: +SKIP
((1, 16, 22, 384), (1, 384))
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _base, vit
from jaxreg.encoders import _torch_names as tn
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders.checkpoint import CheckpointError

__all__ = ["Dinov2", "VARIANTS", "IMAGENET_PREPROCESSING", "create", "convert", "load"]

# The reference runs DINOv2 at 1792 px (a 128x128 token grid); any multiple of 14 works.
IMAGENET_PREPROCESSING = Preprocessing(
    image_size=1792, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    value_range=(0.0, 1.0))


def _config(width: int, depth: int, heads: int, *, registers: int = 0,
            giant: bool = False) -> vit.ViTConfig:
    mlp = 4 * width
    if giant:  # SwiGLU hidden width as DINOv2 computes it: 2/3 of 4C, rounded up to 8
        mlp = (int(mlp * 2 / 3) + 7) // 8 * 8
    return vit.ViTConfig(
        patch_size=14, hidden_size=width, depth=depth, num_heads=heads, mlp_dim=mlp,
        num_registers=registers, layer_scale=True, act="silu" if giant else "gelu",
        gated_mlp=giant, norm_eps=1e-6, pos_grid=37, pos_antialias=registers > 0)


_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "g": (1536, 40, 24)}

VARIANTS: dict[str, EncoderSpec] = {}
for _s, (_w, _d, _h) in _SIZES.items():
    for _reg in (0, 4):
        _name = f"dinov2_vit{_s}14" + ("_reg" if _reg else "")
        VARIANTS[_name] = EncoderSpec(
            name=_name, config=_config(_w, _d, _h, registers=_reg, giant=_s == "g"),
            preprocessing=IMAGENET_PREPROCESSING, patch_size=14, channels=_w)


class Dinov2(nnx.Module):
    """DINOv2 ViT.

    Args:
      config: the architecture (``VARIANTS[name].config``).
      dtype: compute dtype of the activations; parameters stay float32 and outputs
        are float32.
      rngs: initialisation randomness.
    """

    def __init__(self, config: vit.ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if config.pos_grid <= 0:
            raise ValueError(f"pos_grid={config.pos_grid}: DINOv2 needs a learned grid")
        self.config = config
        self.dtype = dtype
        c = config.hidden_size
        init = jax.nn.initializers.truncated_normal(0.02)
        self.patch_embed = vit.PatchEmbed(patch_size=config.patch_size, hidden_size=c,
                                          dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (c,), jnp.float32))
        self.register_tokens = (nnx.Param(jnp.zeros((config.num_registers, c), jnp.float32))
                                if config.num_registers else None)
        self.pos_embed = nnx.Param(init(rngs.params(), (config.pos_grid ** 2 + 1, c),
                                        jnp.float32))
        self.blocks = nnx.List([vit.Block(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.depth)])
        self.norm = nnx.LayerNorm(c, epsilon=config.norm_eps, dtype=dtype,
                                  param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array, *,
                 blocks: Sequence[int] | None = None) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: (B, H, W, 3), ImageNet-normalised (see ``VARIANTS[name].preprocessing``).
          blocks: which ``"block_i"`` maps to return (counted from 1); None: all.

        Returns:
          ``{"block_i": (B, h, w, C), "features": (B, h, w, C) final layer-normed patch
          tokens, "cls": (B, C) final layer-normed class token}``, float32; registers
          are left out of the maps.
        """
        cfg = self.config
        x = self.patch_embed(images.astype(self.dtype))
        h, w = x.shape[1:3]
        x, cls_pos = vit.learned_positions(x, self.pos_embed[...], cfg)
        regs = None if self.register_tokens is None else self.register_tokens[...]
        x = vit.prepend_tokens(x, self.cls_token[...] + cls_pos, regs)
        n = 1 + cfg.num_registers
        x, out = vit.run_blocks(self.blocks, x, grid=(h, w), num_prefix=n, keep=blocks)
        x = self.norm(x)
        out["features"] = vit.tokens_to_maps(x[:, n:], (h, w))
        out["cls"] = x[:, 0].astype(jnp.float32)
        return out


def create(variant: str | vit.ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> Dinov2:
    """A randomly initialised model.

    Args:
      variant: a ``VARIANTS`` name, or a :class:`~jaxreg.encoders.vit.ViTConfig` (small
        test models, a different ``pos_offset``).
      rngs: initialisation randomness.
      dtype: compute dtype.
    """
    return Dinov2(_base.variant_config(VARIANTS, variant, "DINOv2"), dtype=dtype, rngs=rngs)


_HF_RULES = (
    [tn.rename(r"embeddings\.cls_token", "cls_token", "vector"),
     tn.rename(r"embeddings\.register_tokens", "register_tokens", "rows"),
     tn.rename(r"embeddings\.position_embeddings", "pos_embed", "rows")]
    + tn.conv_rules(r"embeddings\.patch_embeddings\.projection", "patch_embed.proj")
    + tn.norm_rules(r"encoder\.layer\.(\d+)\.norm1", r"blocks.\1.norm1")
    + tn.norm_rules(r"encoder\.layer\.(\d+)\.norm2", r"blocks.\1.norm2")
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.attention\.(?:attention\.query|q_proj)",
                      r"blocks.\1.attn.q")
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.attention\.(?:attention\.key|k_proj)",
                      r"blocks.\1.attn.k")
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.attention\.(?:attention\.value|v_proj)",
                      r"blocks.\1.attn.v")
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)",
                      r"blocks.\1.attn.out")
    + [tn.rename(r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1"),
       tn.rename(r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2")]
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.mlp\.fc1", r"blocks.\1.mlp.fc1")
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.mlp\.fc2", r"blocks.\1.mlp.fc2")
    + [tn.split_rule(r"encoder\.layer\.(\d+)\.mlp\.weights_in\.weight",
                     [r"blocks.\1.mlp.gate.kernel", r"blocks.\1.mlp.up.kernel"]),
       tn.split_rule(r"encoder\.layer\.(\d+)\.mlp\.weights_in\.bias",
                     [r"blocks.\1.mlp.gate.bias", r"blocks.\1.mlp.up.bias"], "copy")]
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.mlp\.gate_proj", r"blocks.\1.mlp.gate")
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.mlp\.up_proj", r"blocks.\1.mlp.up")
    + tn.linear_rules(r"encoder\.layer\.(\d+)\.mlp\.(?:down_proj|weights_out)",
                      r"blocks.\1.mlp.down")
    + tn.norm_rules(r"layernorm", "norm")
)

_ORIGINAL_RULES = (
    [tn.rename(r"cls_token", "cls_token", "vector"),
     tn.rename(r"register_tokens", "register_tokens", "rows"),
     tn.rename(r"pos_embed", "pos_embed", "rows")]
    + tn.conv_rules(r"patch_embed\.proj", "patch_embed.proj")
    + tn.norm_rules(r"blocks\.(\d+)\.norm1", r"blocks.\1.norm1")
    + tn.norm_rules(r"blocks\.(\d+)\.norm2", r"blocks.\1.norm2")
    + [tn.split_rule(r"blocks\.(\d+)\.attn\.qkv\.weight",
                     [rf"blocks.\1.attn.{p}.kernel" for p in "qkv"]),
       tn.split_rule(r"blocks\.(\d+)\.attn\.qkv\.bias",
                     [rf"blocks.\1.attn.{p}.bias" for p in "qkv"], "copy")]
    + tn.linear_rules(r"blocks\.(\d+)\.attn\.proj", r"blocks.\1.attn.out")
    + [tn.rename(r"blocks\.(\d+)\.ls1\.gamma", r"blocks.\1.ls1"),
       tn.rename(r"blocks\.(\d+)\.ls2\.gamma", r"blocks.\1.ls2")]
    + tn.linear_rules(r"blocks\.(\d+)\.mlp\.fc1", r"blocks.\1.mlp.fc1")
    + tn.linear_rules(r"blocks\.(\d+)\.mlp\.fc2", r"blocks.\1.mlp.fc2")
    + [tn.split_rule(r"blocks\.(\d+)\.mlp\.w12\.weight",
                     [r"blocks.\1.mlp.gate.kernel", r"blocks.\1.mlp.up.kernel"]),
       tn.split_rule(r"blocks\.(\d+)\.mlp\.w12\.bias",
                     [r"blocks.\1.mlp.gate.bias", r"blocks.\1.mlp.up.bias"], "copy")]
    + tn.linear_rules(r"blocks\.(\d+)\.mlp\.w3", r"blocks.\1.mlp.down")
    + tn.norm_rules(r"norm", "norm")
)

_IGNORED = (r"(?:embeddings\.)?mask_token",)


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A DINOv2 state dict (Hugging Face or original layout) to jaxreg's flat params (numpy).

    Entries no rule knows keep their name, so that loading lists them as unexpected; only
    the mask token (unused at inference) is dropped.

    Args:
      sd: the state dict (``Dinov2Model``, ``Dinov2WithRegistersModel``, optionally
        under a ``dinov2.`` / ``dinov2_with_registers.`` prefix, or an original
        ``dinov2_vit*14*_pretrain.pth``).

    Returns:
      ``{"blocks.0.attn.q.kernel": array, ...}`` in jaxreg's names.

    Raises:
      CheckpointError: ``sd`` is neither layout.
    """
    for prefix in ("dinov2.", "dinov2_with_registers."):
        if any(k.startswith(prefix + "embeddings.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "embeddings.patch_embeddings.projection.weight" in sd:
        rules = _HF_RULES
    elif "patch_embed.proj.weight" in sd:
        rules = _ORIGINAL_RULES
    else:
        raise CheckpointError(
            "not a DINOv2 checkpoint: neither "
            "'embeddings.patch_embeddings.projection.weight' (Hugging Face) nor "
            "'patch_embed.proj.weight' (original release) is in it; first keys: "
            + ", ".join(sorted(sd)[:8]))
    return tn.convert_by_rules(sd, rules, _IGNORED)


def load(variant: str | vit.ViTConfig, path: str | os.PathLike, *,
         dtype=jnp.float32) -> Dinov2:
    """A model with weights from a local checkpoint, strictly (:func:`_base.load_checkpoint`).

    Args:
      variant: as :func:`create`, e.g. ``"dinov2_vitl14_reg"``.
      path: a weight file (``.safetensors``, ``.pth``), a Hugging Face model folder, or
        an offline Hugging Face cache folder ``models--facebook--dinov2-*``.
      dtype: compute dtype.
    """
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)
