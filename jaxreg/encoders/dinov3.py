"""DINOv3 ViT in Flax NNX.

Follows transformers' ``DINOv3ViTModel``: no learned position embeddings; queries and
keys of the patch tokens are rotated (RoPE) by the patch-centre coordinates scaled to
[-1, 1] along each axis of the token grid, so any grid works, square or not. The
class and 4 register tokens are not rotated. Weights load from Hugging Face
``DINOv3ViTModel`` files (``layer.N.*`` as on the hub or ``model.layer.N.*`` as in
memory).

>>> model = create("dinov3_vitb16", rngs=nnx.Rngs(0))  # doctest: +SKIP
>>> model(jnp.zeros((1, 224, 320, 3)))["features"].shape  # doctest: +SKIP
(1, 14, 20, 768)
"""

from __future__ import annotations

import math
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

__all__ = ["Dinov3", "VARIANTS", "IMAGENET_PREPROCESSING", "create", "convert", "load",
           "rope_tables"]

# The reference runs DINOv3 ViT-B/16 at 1536 px (a 96x96 token grid).
IMAGENET_PREPROCESSING = Preprocessing(
    image_size=1536, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    value_range=(0.0, 1.0))


def _config(width: int, depth: int, heads: int) -> vit.ViTConfig:
    return vit.ViTConfig(
        patch_size=16, hidden_size=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
        num_registers=4, qkv_bias=(True, False, True), layer_scale=True, act="gelu",
        norm_eps=1e-5, rope_theta=100.0)


VARIANTS: dict[str, EncoderSpec] = {
    name: EncoderSpec(name=name, config=_config(w, d, h),
                      preprocessing=IMAGENET_PREPROCESSING, patch_size=16, channels=w)
    for name, (w, d, h) in {"dinov3_vits16": (384, 12, 6), "dinov3_vitb16": (768, 12, 12),
                            "dinov3_vitl16": (1024, 24, 16)}.items()
}


def rope_tables(grid: tuple[int, int], *, head_dim: int,
                theta: float) -> tuple[jax.Array, jax.Array]:
    """DINOv3's rotary tables for a token grid.

    Patch centres ``(i + 0.5) / n`` mapped to [-1, 1] per axis; head_dim / 4
    frequencies ``theta ** -(4k / head_dim)``; angles ``2 pi coord freq`` for y then x,
    repeated twice to cover the rotate-half layout.

    Args:
      grid: (h, w) tokens.
      head_dim: channels per head (a multiple of 4).
      theta: RoPE base.

    Returns:
      (cos, sin), each (h*w, head_dim) float32.
    """
    h, w = grid
    inv_freq = 1.0 / theta ** jnp.arange(0, 1, 4 / head_dim, dtype=jnp.float32)
    ys = 2.0 * (jnp.arange(0.5, h, dtype=jnp.float32) / h) - 1.0
    xs = 2.0 * (jnp.arange(0.5, w, dtype=jnp.float32) / w) - 1.0
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)
    angles = (2 * math.pi * coords[:, :, None] * inv_freq).reshape(h * w, -1)
    angles = jnp.tile(angles, (1, 2))
    return jnp.cos(angles), jnp.sin(angles)


class Dinov3(nnx.Module):
    """DINOv3 ViT.

    Args:
      config: the architecture (``VARIANTS[name].config``).
      dtype: compute dtype; parameters stay float32, outputs are float32.
      rngs: initialisation randomness.
    """

    def __init__(self, config: vit.ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if config.rope_theta <= 0 or config.head_dim % 4:
            raise ValueError(f"{config}: DINOv3 needs rope_theta > 0 and head_dim % 4 == 0")
        self.config = config
        self.dtype = dtype
        c = config.hidden_size
        init = jax.nn.initializers.truncated_normal(0.02)
        self.patch_embed = vit.PatchEmbed(patch_size=config.patch_size, hidden_size=c,
                                          dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (c,), jnp.float32))
        self.register_tokens = (nnx.Param(init(rngs.params(), (config.num_registers, c),
                                               jnp.float32))
                                if config.num_registers else None)
        self.blocks = nnx.List([vit.Block(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.depth)])
        self.norm = nnx.LayerNorm(c, epsilon=config.norm_eps, dtype=dtype,
                                  param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array, *,
                 blocks: Sequence[int] | None = None) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: (B, H, W, 3), ImageNet-normalised.
          blocks: which ``"block_i"`` maps to return (counted from 1); None: all.

        Returns:
          ``{"block_i": (B, h, w, C), "features": (B, h, w, C) final normed patch tokens,
          "cls": (B, C) final normed class token}``, float32; registers left out.
        """
        cfg = self.config
        x = self.patch_embed(images.astype(self.dtype))
        b, h, w, c = x.shape
        regs = None if self.register_tokens is None else self.register_tokens[...]
        x = vit.prepend_tokens(x.reshape(b, h * w, c), self.cls_token[...], regs)
        rope = rope_tables((h, w), head_dim=cfg.head_dim, theta=cfg.rope_theta)
        n = 1 + cfg.num_registers
        x, out = vit.run_blocks(self.blocks, x, grid=(h, w), num_prefix=n, keep=blocks,
                                rope=rope)
        x = self.norm(x)
        out["features"] = vit.tokens_to_maps(x[:, n:], (h, w))
        out["cls"] = x[:, 0].astype(jnp.float32)
        return out


def create(variant: str | vit.ViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> Dinov3:
    """A randomly initialised model.

    Args:
      variant: a ``VARIANTS`` name, or a :class:`~jaxreg.encoders.vit.ViTConfig` (small
        test models).
      rngs: initialisation randomness.
      dtype: compute dtype.
    """
    return Dinov3(_base.variant_config(VARIANTS, variant, "DINOv3"), dtype=dtype, rngs=rngs)


_L = r"(?:model\.)?layer\.(\d+)"
_RULES = (
    [tn.rename(r"embeddings\.cls_token", "cls_token", "vector"),
     tn.rename(r"embeddings\.register_tokens", "register_tokens", "rows")]
    + tn.conv_rules(r"embeddings\.patch_embeddings", "patch_embed.proj")
    + tn.norm_rules(_L + r"\.norm1", r"blocks.\1.norm1")
    + tn.norm_rules(_L + r"\.norm2", r"blocks.\1.norm2")
    + tn.linear_rules(_L + r"\.attention\.q_proj", r"blocks.\1.attn.q")
    + tn.linear_rules(_L + r"\.attention\.k_proj", r"blocks.\1.attn.k")
    + tn.linear_rules(_L + r"\.attention\.v_proj", r"blocks.\1.attn.v")
    + tn.linear_rules(_L + r"\.attention\.o_proj", r"blocks.\1.attn.out")
    + [tn.rename(_L + r"\.layer_scale1\.lambda1", r"blocks.\1.ls1"),
       tn.rename(_L + r"\.layer_scale2\.lambda1", r"blocks.\1.ls2")]
    + tn.norm_rules(r"norm", "norm")
)
_PLAIN_MLP = (tn.linear_rules(_L + r"\.mlp\.up_proj", r"blocks.\1.mlp.fc1")
              + tn.linear_rules(_L + r"\.mlp\.down_proj", r"blocks.\1.mlp.fc2"))
_GATED_MLP = (tn.linear_rules(_L + r"\.mlp\.gate_proj", r"blocks.\1.mlp.gate")
              + tn.linear_rules(_L + r"\.mlp\.up_proj", r"blocks.\1.mlp.up")
              + tn.linear_rules(_L + r"\.mlp\.down_proj", r"blocks.\1.mlp.down"))
_IGNORED = (r"embeddings\.mask_token", r"rope_embeddings\.inv_freq")


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A Hugging Face ``DINOv3ViTModel`` state dict to jaxreg's flat params (numpy).

    Args:
      sd: the state dict (hub names ``layer.N.*`` or in-memory ``model.layer.N.*``).

    Returns:
      ``{"blocks.0.attn.q.kernel": array, ...}``; unknown entries keep their names so
      that loading lists them as unexpected.

    Raises:
      CheckpointError: ``sd`` is not a DINOv3 ViT state dict.
    """
    if "embeddings.patch_embeddings.weight" not in sd:
        raise CheckpointError(
            "not a DINOv3 ViT checkpoint: 'embeddings.patch_embeddings.weight' "
            "is missing; first keys: " + ", ".join(sorted(sd)[:8]))
    # Models without registers still carry an empty (1, 0, C) register tensor.
    sd = {k: v for k, v in sd.items()
          if not (k == "embeddings.register_tokens" and np.size(v) == 0)}
    gated = any(".mlp.gate_proj." in k for k in sd)
    mlp = _GATED_MLP if gated else _PLAIN_MLP
    return tn.convert_by_rules(sd, _RULES + mlp, _IGNORED)


def load(variant: str | vit.ViTConfig, path: str | os.PathLike, *,
         dtype=jnp.float32) -> Dinov3:
    """A model with weights from a local checkpoint, strictly (:func:`_base.load_checkpoint`).

    Args:
      variant: as :func:`create`, e.g. ``"dinov3_vitb16"``.
      path: a ``.safetensors`` file, a Hugging Face model folder, or an offline cache
        folder ``models--facebook--dinov3-*``.
      dtype: compute dtype.
    """
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)
