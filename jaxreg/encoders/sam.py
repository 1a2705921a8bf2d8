"""SAM image encoder (ViT-B/L/H with windowed attention and a conv neck) in Flax NNX.

The architecture of "Segment Anything" (Kirillov et al., 2023), image encoder only:
a 16x16 patch embedding, an absolute position embedding, transformer blocks with
attention in 14x14 windows (global attention in a few blocks), decomposed relative
position biases, and a neck of two convolutions with channel LayerNorms down to 256
channels. MedSAM and SSL-SAM are the ViT-B architecture with other weights.

Parameters are float32; activations run in ``dtype`` (bfloat16 on accelerators); every
returned feature map is float32.

Checkpoints (see :func:`convert`): the original ``.pth`` layout
(``image_encoder.*``, as in ``sam_vit_b_01ec64.pth`` and ``medsam_vit_b.pth``, also with
a ``module.`` prefix or wrapped in ``{"model": ...}``), the Hugging Face ``SamModel`` /
``SamVisionModel`` layout (``vision_encoder.*``), and files written by
``python -m jaxreg.encoders.convert``.

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> from jaxreg.encoders import sam
>>> cfg = sam.SamConfig(image_size=64, embed_dim=32, depth=2, num_heads=2,
...                     window_size=2, global_attn_indexes=(1,), out_chans=16)
>>> model = sam.create(cfg, rngs=nnx.Rngs(0))
>>> out = model(jnp.zeros((1, 64, 64, 3)))
>>> out["features"].shape, out["block_2"].shape
((1, 4, 4, 16), (1, 4, 4, 32))
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _base
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders._sam_parts import (Neck, convert_image_encoder, strip_image_encoder,
                                        window_partition, window_unpartition)

__all__ = ["SamConfig", "SamImageEncoder", "VARIANTS", "PREPROCESSING", "MEDSAM_PREPROCESSING",
           "create", "convert", "load", "flops_per_image"]


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of a SAM image encoder.

    Attributes:
      image_size: input side the position embedding was trained for (pixels).
      patch_size: side of the square patches.
      embed_dim: token width.
      depth: number of transformer blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width / ``embed_dim``.
      window_size: side of the attention windows (tokens) of the windowed blocks.
      global_attn_indexes: blocks that attend over the whole token grid.
      out_chans: channels of the neck output.
      layer_norm_eps: epsilon of every LayerNorm (blocks and neck).
    """

    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256
    layer_norm_eps: float = 1e-6


VIT_B = SamConfig()
VIT_L = SamConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
VIT_H = SamConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))

# SAM's own preprocessing (segment_anything.modeling.Sam.pixel_mean / pixel_std): ImageNet
# mean and std on the 0-255 scale, applied to a 1024x1024 RGB image. A grey slice is
# min-max scaled to [0, 255] and copied to 3 channels by the pipeline.
PREPROCESSING = Preprocessing(
    image_size=1024,
    mean=(123.675, 116.28, 103.53),
    std=(58.395, 57.12, 57.375),
    value_range=(0.0, 255.0),
    resize="square",
)

# MedSAM's preprocessing: the slice min-max scaled to [0, 1] and given to the image encoder
# as it is, no mean/std; MedSAM is trained and run so, and the reference feeds it so:
#  * bowang-lab/MedSAM MedSAM_Inference.py: resize to 1024 (l. 121), min-max to [0, 1]
#    (l. 124), straight into ``medsam_model.image_encoder`` (l. 136), no Sam.preprocess;
#    train_one_gpu.py asserts [0, 1] images (l. 85-87) and encodes them as such (l. 223);
#  * mazurowski-lab/Foundation-based-reg: inference_reg.py applies the config's transform
#    (l. 90), then ``self.model.image_encoder`` (l. 99, no Sam.preprocess); the transform is
#    ``tt.Compose([])`` in config-medsam-task1.py (l. 29) but ImageNet's mean/std on [0, 1]
#    in config-sam-task1.py and config-sslsam-task1.py (l. 29), i.e. SAM's PREPROCESSING.
# ``medsam_vitb_samnorm``: MedSAM's weights with SAM's normalisation (jaxreg's old setting).
MEDSAM_PREPROCESSING = Preprocessing(image_size=1024, value_range=(0.0, 1.0), resize="square")

VARIANTS: dict[str, EncoderSpec] = {
    name: EncoderSpec(name=name, config=cfg, preprocessing=prep, patch_size=16, channels=256)
    for name, cfg, prep in (
        ("sam_vitb", VIT_B, PREPROCESSING),
        ("sam_vitl", VIT_L, PREPROCESSING),
        ("sam_vith", VIT_H, PREPROCESSING),
        # MedSAM (Ma et al., 2024): SAM ViT-B fine-tuned on medical images; see above.
        ("medsam_vitb", VIT_B, MEDSAM_PREPROCESSING),
        ("medsam_vitb_samnorm", VIT_B, PREPROCESSING),
        # SSL-SAM: SAM ViT-B, self-supervised breast MRI fine-tune; SAM's normalisation.
        ("sslsam_vitb", VIT_B, PREPROCESSING),
    )
}


def _resize_rel_pos(rel_pos: jax.Array, length: int) -> jax.Array:
    """Linear resize along the first axis, like ``F.interpolate(mode="linear")`` (half-pixel)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    return jax.image.resize(rel_pos, (length, rel_pos.shape[1]), method="linear",
                            antialias=False)


def _rel_pos_table(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings for every (query, key) pair along one axis.

    Args:
      q_size: query positions along the axis.
      k_size: key positions along the axis.
      rel_pos: ``(L, C)`` learnt embeddings of relative offsets.

    Returns:
      ``(q_size, k_size, C)``.
    """
    rel_pos = _resize_rel_pos(rel_pos, int(2 * max(q_size, k_size) - 1))
    q_coords = np.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = np.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    rel = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[rel.astype(np.int64)]


class Attention(nnx.Module):
    """Multi-head self-attention with decomposed relative position biases (MViTv2)."""

    def __init__(self, dim: int, *, num_heads: int, grid: int, dtype, rngs: nnx.Rngs):
        """Args:
          dim: token width.
          num_heads: heads.
          grid: side of the token grid the relative embeddings are sized for.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        self.num_heads = num_heads
        self.dtype = dtype
        head_dim = dim // num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.rel_pos_h = nnx.Param(jnp.zeros((2 * grid - 1, head_dim), jnp.float32))
        self.rel_pos_w = nnx.Param(jnp.zeros((2 * grid - 1, head_dim), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args:
          x: ``(B, h, w, C)`` tokens.

        Returns:
          ``(B, h, w, C)``.
        """
        b, h, w, c = x.shape
        nh = self.num_heads
        hd = c // nh
        qkv = self.qkv(x).reshape(b, h * w, 3, nh, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, hd)
        logits = jnp.einsum("bqnd,bknd->bnqk", q * (hd ** -0.5), k)
        rh = _rel_pos_table(h, h, self.rel_pos_h[...].astype(self.dtype))
        rw = _rel_pos_table(w, w, self.rel_pos_w[...].astype(self.dtype))
        rq = q.reshape(b, h, w, nh, hd)
        rel_h = jnp.einsum("byxnc,ykc->bnyxk", rq, rh)
        rel_w = jnp.einsum("byxnc,xkc->bnyxk", rq, rw)
        logits = logits.reshape(b, nh, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
        logits = logits.reshape(b, nh, h * w, h * w)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, h, w, c)
        return self.proj(out)


class Mlp(nnx.Module):
    """Two linear layers with an exact (erf) GELU between."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(jax.nn.gelu(self.lin1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float, window_size: int,
                 grid: int, eps: float, dtype, rngs: nnx.Rngs):
        self.window_size = window_size
        self.norm1 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads=num_heads,
                              grid=window_size if window_size > 0 else grid,
                              dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            size = x.shape[1:3]
            # As the reference: windows are padded with zeros after the norm and the padded
            # tokens take part in attention unmasked.
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """Non-overlapping ``patch x patch`` convolution."""

    def __init__(self, dim: int, *, patch: int, dtype, rngs: nnx.Rngs):
        self.proj = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), padding="VALID",
                             dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class SamImageEncoder(nnx.Module):
    """SAM image encoder.

    Outputs, all float32 ``(B, h, w, C)`` with ``h = H / patch_size``: ``"block_i"`` the
    tokens after block ``i``, counted from 1 (``C = embed_dim``), and ``"features"`` the
    neck output (``C = out_chans``), the reference's default.
    """

    def __init__(self, config: SamConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        """Args:
          config: architecture.
          dtype: compute dtype of the activations (parameters stay float32).
          rngs: random keys for initialisation.
        """
        self.config = config
        self.dtype = dtype
        c = config
        grid = c.image_size // c.patch_size
        self.patch_embed = PatchEmbed(c.embed_dim, patch=c.patch_size, dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, c.embed_dim), jnp.float32))
        self.blocks = nnx.List([
            Block(c.embed_dim, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio,
                  window_size=0 if i in c.global_attn_indexes else c.window_size,
                  grid=grid, eps=c.layer_norm_eps, dtype=dtype, rngs=rngs)
            for i in range(c.depth)
        ])
        self.neck = Neck(c.embed_dim, c.out_chans, eps=c.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: ``(B, H, W, 3)``, preprocessed as :data:`PREPROCESSING` says; ``H`` and
            ``W`` multiples of ``patch_size``. Another size than ``image_size`` resizes the
            position embedding (bicubic) and the global blocks' relative embeddings
            (linear), which the pretrained weights were not trained for.

        Returns:
          Dict of float32 feature maps, see the class docstring.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
        p = self.config.patch_size
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"image sides {images.shape[1:3]} are not multiples of {p}")
        x = self.patch_embed(images.astype(self.dtype))
        pos = self.pos_embed[...]
        if pos.shape[1:3] != x.shape[1:3]:
            pos = jax.image.resize(pos, (1, *x.shape[1:3], pos.shape[-1]), method="cubic",
                                   antialias=False)
        x = x + pos.astype(self.dtype)
        out = {}
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            out[f"block_{i}"] = x.astype(jnp.float32)
        out["features"] = self.neck(x).astype(jnp.float32)
        return out


def create(variant: str | SamConfig, *, rngs: nnx.Rngs,
           dtype=jnp.float32) -> SamImageEncoder:
    """A randomly initialised encoder.

    Args:
      variant: a key of :data:`VARIANTS`, or a :class:`SamConfig` (small test models).
      rngs: random keys.
      dtype: compute dtype.
    """
    return SamImageEncoder(_base.variant_config(VARIANTS, variant, "SAM"), dtype=dtype,
                           rngs=rngs)


# Hugging Face SamVisionEncoder names -> jaxreg's (whose neck is already conv1/norm1/...).
_HF_RENAMES = (("patch_embed.projection.", "patch_embed.proj."), ("layers.", "blocks."),
               (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."))


def _hf_name(name: str) -> str:
    for old, new in _HF_RENAMES:
        if old.startswith("."):
            name = name.replace(old, new)
        elif name.startswith(old):
            name = new + name[len(old):]
    return name


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converts a SAM image-encoder state dict to jaxreg parameter names and layouts.

    Accepts the original ``segment_anything`` layout (``image_encoder.*``; whole-model
    checkpoints such as ``sam_vit_b_01ec64.pth`` or ``medsam_vit_b.pth``, whose prompt
    encoder and mask decoder are ignored), the Hugging Face ``SamModel`` /
    ``SamVisionModel`` layout (``vision_encoder.*``) and a bare image-encoder state dict.
    Tensors it does not know keep their names, so loading reports them as unexpected.

    Args:
      sd: flat state dict of numpy arrays.

    Returns:
      Flat ``{"blocks.0.attn.qkv.kernel": array}`` dict for :class:`SamImageEncoder`.

    Raises:
      CheckpointError: no SAM image-encoder tensors in ``sd``.
    """
    enc = strip_image_encoder(sd)
    if enc is None and any(k.startswith("vision_encoder.") for k in sd):
        enc = {_hf_name(k): v for k, v in _checkpoint.strip_prefix(sd, "vision_encoder.").items()}
    elif enc is None and ("patch_embed.proj.weight" in sd or "pos_embed" in sd):
        enc = dict(sd)
    elif enc is None:
        some = ", ".join(sorted(sd)[:5])
        raise _checkpoint.CheckpointError(
            "not a SAM checkpoint: expected image_encoder.* (segment_anything .pth) or "
            f"vision_encoder.* (Hugging Face SamModel) tensors, found e.g. {some}")
    return convert_image_encoder(enc)


def load(variant: str | SamConfig, path: str | os.PathLike, *,
         dtype=jnp.float32) -> SamImageEncoder:
    """An encoder with weights from a local checkpoint, strictly (:func:`_base.load_checkpoint`).

    Args:
      variant: as :func:`create`, e.g. ``"sam_vitb"``.
      path: a checkpoint file (``.pth`` needs torch; ``.safetensors`` does not) or a
        Hugging Face model folder.
      dtype: compute dtype.
    """
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)


def flops_per_image(config: SamConfig, image_size: int | None = None) -> float:
    """Analytic multiply-add count x2 of one forward pass (matmuls and convs only).

    Args:
      config: architecture.
      image_size: input side (default ``config.image_size``).

    Returns:
      FLOPs for one image.
    """
    s = image_size or config.image_size
    g = s // config.patch_size
    d, n = config.embed_dim, g * g
    flops = 2 * n * 3 * config.patch_size ** 2 * d
    w = config.window_size
    nw = math.ceil(g / w) ** 2
    for i in range(config.depth):
        tokens = n if i in config.global_attn_indexes else nw * w * w
        seq = n if i in config.global_attn_indexes else w * w
        flops += 2 * tokens * d * 3 * d + 2 * tokens * d * d  # qkv, proj
        flops += 2 * 2 * tokens * seq * d  # q k^T and p v
        side = g if i in config.global_attn_indexes else w
        flops += 2 * tokens * d * 2 * side  # decomposed relative position terms
        flops += 2 * 2 * n * d * int(d * config.mlp_ratio)
    flops += 2 * n * d * config.out_chans + 2 * n * 9 * config.out_chans ** 2
    return float(flops)
