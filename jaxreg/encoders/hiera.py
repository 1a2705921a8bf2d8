"""SAM2 / SAM2.1 image encoder (Hiera trunk + FPN neck) in Flax NNX.

The image encoder of "SAM 2: Segment Anything in Images and Videos" (Ravi et al., 2024):
a Hiera trunk (Ryali et al., 2023; a 7x7 stride-4 patch embedding, a bicubically resized
background position embedding plus a tiled windowed one, four stages of multi-scale
blocks with windowed attention, global attention in a few blocks, and a 2x2 max pooling
of the queries with a doubling of width and heads at the first block of stages 2-4),
then an FPN neck of 1x1 convs to 256 channels with nearest-upsampled top-down features.
As the reference (``scalp=1``; transformers' ``num_feature_levels=3``) the neck's
lowest-resolution level is left out: its three levels are at strides 4, 8 and 16. The
sine position encodings the neck also returns belong to SAM2's mask decoder and are not
computed; nor are the mask decoder's ``conv_s0`` / ``conv_s1`` and ``no_mem_embed``.

Outputs (float32, ``(B, h, w, C)``): ``"stage_<i>"`` the trunk's stage ``i`` (strides 4,
8, 16, 32; the stage widths), ``"fpn_<i>"`` neck level ``i`` (strides 4, 8, 16; 256
channels) and ``"features"`` the stride-16 level ``fpn_3``, SAM2's ``vision_features``.

Parameters are float32; activations run in ``dtype``.

Checkpoints (see :func:`convert`): the original SAM2 ``.pt`` layout
(``image_encoder.trunk.*``, ``image_encoder.neck.*``; whole-model checkpoints such as
``sam2.1_hiera_tiny.pt``, ``{"model": ...}``), the Hugging Face ``Sam2Model``
(``vision_encoder.*``) and ``Sam2VisionModel`` (``backbone.*``, ``neck.*``) layouts, and
files written by ``python -m jaxreg.encoders.convert``.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> from jaxreg.encoders import hiera
>>> cfg = hiera.HieraConfig(embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 2, 4),
...                         blocks_per_stage=(1, 1, 2, 1), window_sizes=(4, 2, 2, 1),
...                         global_attn_blocks=(3,), fpn_dim=16)
>>> model = hiera.create(cfg, rngs=nnx.Rngs(0))
>>> out = model(jnp.zeros((1, 64, 64, 3)))
>>> out["fpn_1"].shape, out["features"].shape, out["stage_4"].shape
((1, 16, 16, 16), (1, 4, 4, 16), (1, 2, 2, 64))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from jaxreg.encoders import _base
from jaxreg.encoders import _torch_names as tn
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders._hiera_parts import (FpnNeck, MultiScaleBlock, bicubic_matrix,
                                          check_folder)

__all__ = ["HieraConfig", "Sam2ImageEncoder", "VARIANTS", "PREPROCESSING", "create", "convert",
           "load", "hf_config"]


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    """Hyper-parameters of a SAM2 image encoder (defaults: SAM2.1 Hiera-T).

    Attributes:
      image_size: input side the model was trained at (pixels; documentation only).
      embed_dims: width of each stage.
      num_heads: attention heads of each stage.
      blocks_per_stage: blocks of each stage.
      window_sizes: attention window side of each stage (tokens); a stage's first block
        uses the previous stage's.
      global_attn_blocks: blocks (0-based, counted over all stages) with global attention.
      pos_embed_bkg_size: grid of the background position embedding.
      num_query_pool_stages: stages after the first whose first block pools the queries.
      q_stride: that pooling's stride (= kernel).
      mlp_ratio: MLP hidden width / stage width.
      fpn_dim: channels of the neck's levels.
      fpn_top_down_levels: stages (0-based) whose level adds the deeper level.
      num_feature_levels: neck levels returned, from the highest resolution (3: the
        lowest-resolution level left out, SAM2's ``scalp=1``).
      layer_norm_eps: epsilon of every LayerNorm.
    """

    image_size: int = 1024
    embed_dims: tuple[int, ...] = (96, 192, 384, 768)
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    blocks_per_stage: tuple[int, ...] = (1, 2, 7, 2)
    window_sizes: tuple[int, ...] = (8, 4, 14, 7)
    global_attn_blocks: tuple[int, ...] = (5, 7, 9)
    pos_embed_bkg_size: tuple[int, int] = (7, 7)
    num_query_pool_stages: int = 3
    q_stride: tuple[int, int] = (2, 2)
    mlp_ratio: float = 4.0
    fpn_dim: int = 256
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    num_feature_levels: int = 3
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        n = len(self.embed_dims)
        per_stage = (self.num_heads, self.blocks_per_stage, self.window_sizes)
        if n < 1 or any(len(v) != n for v in per_stage):
            raise ValueError(f"embed_dims, num_heads, blocks_per_stage and window_sizes need "
                             f"one entry per stage; got {self.embed_dims}, {self.num_heads}, "
                             f"{self.blocks_per_stage}, {self.window_sizes}")
        if not 0 <= self.num_query_pool_stages < n or not 1 <= self.num_feature_levels <= n:
            raise ValueError(f"num_query_pool_stages {self.num_query_pool_stages} must be "
                             f"< {n} and num_feature_levels {self.num_feature_levels} in 1..{n}")


def _widths(c: int, h: int) -> dict:
    return dict(embed_dims=(c, 2 * c, 4 * c, 8 * c), num_heads=(h, 2 * h, 4 * h, 8 * h))


# sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml (the Hiera defaults where they say none).
TINY = HieraConfig()
SMALL = HieraConfig(blocks_per_stage=(1, 2, 11, 2), global_attn_blocks=(7, 10, 13))
BASE_PLUS = HieraConfig(**_widths(112, 2), blocks_per_stage=(2, 3, 16, 3),
                        global_attn_blocks=(12, 16, 20), pos_embed_bkg_size=(14, 14))
LARGE = HieraConfig(**_widths(144, 2), blocks_per_stage=(2, 6, 36, 4),
                    global_attn_blocks=(23, 33, 43), window_sizes=(8, 4, 16, 8))

# SAM2's own preprocessing (sam2.utils.transforms.SAM2Transforms; transformers'
# Sam2ImageProcessor): the RGB image scaled to [0, 1], resized to 1024 x 1024 (no aspect
# kept, no padding), ImageNet mean and std. A grey slice is copied to 3 channels.
PREPROCESSING = Preprocessing(image_size=1024, mean=(0.485, 0.456, 0.406),
                              std=(0.229, 0.224, 0.225), value_range=(0.0, 1.0),
                              resize="square")

# SAM2 and SAM2.1 share these architectures; only the weights differ.
VARIANTS: dict[str, EncoderSpec] = {
    name: EncoderSpec(name=name, config=cfg, preprocessing=PREPROCESSING, patch_size=16,
                      channels=256)
    for name, cfg in (("sam2.1_hiera_tiny", TINY), ("sam2.1_hiera_small", SMALL),
                      ("sam2.1_hiera_base_plus", BASE_PLUS), ("sam2.1_hiera_large", LARGE))
}


def _block_specs(c: HieraConfig) -> list[dict]:
    """Per block: dim, dim_out, heads, window, q_stride (as the reference builds them)."""
    specs, total = [], 0
    for stage, count in enumerate(c.blocks_per_stage):
        for i in range(count):
            first = stage > 0 and i == 0
            window = c.window_sizes[stage - 1 if first else stage]
            specs.append(dict(
                dim=c.embed_dims[stage - 1 if first else stage], dim_out=c.embed_dims[stage],
                num_heads=c.num_heads[stage],
                window_size=0 if total in c.global_attn_blocks else window,
                q_stride=tuple(c.q_stride)
                if first and stage <= c.num_query_pool_stages else None))
            total += 1
    return specs


class Sam2ImageEncoder(nnx.Module):
    """SAM2 image encoder: Hiera trunk and FPN neck (outputs: the module docstring)."""

    def __init__(self, config: HieraConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        """Args:
          config: architecture.
          dtype: compute dtype of the activations (parameters stay float32).
          rngs: random keys for initialisation.
        """
        self.config = config
        self.dtype = dtype
        c = config
        d0, w0 = c.embed_dims[0], c.window_sizes[0]
        self.patch_embed = nnx.Conv(3, d0, (7, 7), strides=(4, 4), padding=((3, 3), (3, 3)),
                                    dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, *c.pos_embed_bkg_size, d0), jnp.float32))
        self.pos_embed_window = nnx.Param(jnp.zeros((1, w0, w0, d0), jnp.float32))
        self.blocks = nnx.List([
            MultiScaleBlock(**spec, mlp_ratio=c.mlp_ratio, eps=c.layer_norm_eps, dtype=dtype,
                            rngs=rngs)
            for spec in _block_specs(c)])
        self.stage_ends = tuple(int(e) for e in np.cumsum(c.blocks_per_stage) - 1)
        self.neck = FpnNeck(c.embed_dims, c.fpn_dim, top_down_levels=c.fpn_top_down_levels,
                            dtype=dtype, rngs=rngs)

    def _pos_embed(self, h: int, w: int) -> jax.Array:
        """The background embedding resized (PyTorch bicubic) to ``h x w`` plus the window
        embedding tiled over it: ``(1, h, w, C)`` float32."""
        bkg = self.pos_embed[...][0]
        rows = bicubic_matrix(bkg.shape[0], h)
        cols = bicubic_matrix(bkg.shape[1], w)
        pos = jnp.einsum("yi,xj,ijc->yxc", rows, cols, bkg, precision=jax.lax.Precision.HIGHEST)
        window = self.pos_embed_window[...][0]
        s = window.shape[0]
        if h % s or w % s:
            raise ValueError(f"the token grid {h}x{w} (the image / 4) must be a multiple of "
                             f"the first window, {s}: image sides multiples of {4 * s}")
        return (pos + jnp.tile(window, (h // s, w // s, 1)))[None]

    def __call__(self, images: ArrayLike) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: ``(B, H, W, 3)``, preprocessed as :data:`PREPROCESSING` says; ``H`` and
            ``W`` multiples of ``4 * window_sizes[0]`` (32). Another size than 1024 resizes
            the background position embedding as the reference does.

        Returns:
          Dict of float32 maps, see the module docstring.
        """
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
        x = self.patch_embed(images.astype(self.dtype))
        x = x + self._pos_embed(*x.shape[1:3]).astype(self.dtype)
        stages = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                stages.append(x)
        out = {f"stage_{i}": s.astype(jnp.float32) for i, s in enumerate(stages, start=1)}
        levels = self.neck(stages)[: self.config.num_feature_levels]
        for i, level in enumerate(levels, start=1):
            out[f"fpn_{i}"] = level.astype(jnp.float32)
        out["features"] = out[f"fpn_{len(levels)}"]
        return out


def create(variant: str | HieraConfig, *, rngs: nnx.Rngs,
           dtype=jnp.float32) -> Sam2ImageEncoder:
    """A randomly initialised encoder.

    Args:
      variant: a key of :data:`VARIANTS`, or a :class:`HieraConfig` (small test models).
      rngs: random keys.
      dtype: compute dtype.
    """
    return Sam2ImageEncoder(_base.variant_config(VARIANTS, variant, "SAM2"), dtype=dtype,
                            rngs=rngs)


# Hugging Face Sam2VisionModel names -> jaxreg's: prefixes, then infixes.
_HF_PREFIXES = (("backbone.patch_embed.projection.", "patch_embed."), ("backbone.", ""))
_HF_INFIXES = ((".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
               (".mlp.proj_in.", ".mlp.layers.0."), (".mlp.proj_out.", ".mlp.layers.1."))
# Original sam2 ImageEncoder names -> jaxreg's (and neck.convs.<j>.conv. -> neck.convs.<j>.).
_ORIGINAL_PREFIXES = (("trunk.patch_embed.proj.", "patch_embed."), ("trunk.", ""))


def _renamed(sd: Mapping[str, np.ndarray], prefixes: tuple[tuple[str, str], ...],
             infixes: tuple[tuple[str, str], ...]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in tn.rename_prefixes(sd, prefixes).items():
        for old, new in infixes:
            k = k.replace(old, new)
        out[k] = v
    return out


def _image_encoder(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoder's tensors with jaxreg's module names, torch's layouts."""
    if any(k.startswith("image_encoder.") for k in sd):  # original whole-model sam2 .pt
        sd = _checkpoint.strip_prefix(sd, "image_encoder.")
    if any(k.startswith("trunk.") for k in sd):  # original ImageEncoder
        enc = {k.replace(".conv.", ".") if k.startswith("neck.convs.") else k: v
               for k, v in sd.items()}
        return _renamed(enc, _ORIGINAL_PREFIXES, ())
    if any(k.startswith("vision_encoder.") for k in sd):  # Hugging Face Sam2Model
        sd = _checkpoint.strip_prefix(sd, "vision_encoder.")
    if any(k.startswith("backbone.") for k in sd):  # Hugging Face Sam2VisionModel
        return _renamed(sd, _HF_PREFIXES, _HF_INFIXES)
    some = ", ".join(sorted(sd)[:5])
    raise _checkpoint.CheckpointError(
        "not a SAM2 checkpoint: expected image_encoder.trunk.* (sam2 .pt), "
        f"vision_encoder.backbone.* or backbone.* (Hugging Face Sam2Model / Sam2VisionModel) "
        f"tensors, found e.g. {some}")


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converts a SAM2 image-encoder state dict to jaxreg parameter names and layouts.

    The other parts of a whole-model checkpoint (mask decoder, prompt and memory encoders)
    are dropped; tensors of the encoder it does not know keep their names, so loading
    reports them as unexpected.

    Args:
      sd: flat state dict of numpy arrays, in one of the layouts of the module docstring.

    Returns:
      Flat ``{"blocks.0.attn.qkv.kernel": array}`` dict for :class:`Sam2ImageEncoder`.

    Raises:
      CheckpointError: no SAM2 image-encoder tensors in ``sd``.
    """
    out = tn.torch_to_nnx(_image_encoder(sd))
    for name in ("pos_embed", "pos_embed_window"):  # torch (1, C, h, w) -> (1, h, w, C)
        if name in out and np.ndim(out[name]) == 4:
            out[name] = np.asarray(out[name]).transpose(0, 2, 3, 1)
    return out


def hf_config(config: HieraConfig) -> tuple[dict, dict]:
    """transformers' ``Sam2HieraDetConfig`` and ``Sam2VisionConfig`` (neck) fields of
    ``config``: ``(backbone fields, neck fields)``."""
    c = config
    backbone = dict(
        hidden_size=c.embed_dims[0], num_attention_heads=c.num_heads[0],
        blocks_per_stage=list(c.blocks_per_stage), embed_dim_per_stage=list(c.embed_dims),
        num_attention_heads_per_stage=list(c.num_heads),
        window_size_per_stage=list(c.window_sizes),
        global_attention_blocks=list(c.global_attn_blocks),
        window_positional_embedding_background_size=list(c.pos_embed_bkg_size),
        num_query_pool_stages=c.num_query_pool_stages, query_stride=list(c.q_stride),
        patch_kernel_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3],
        mlp_ratio=c.mlp_ratio, hidden_act="gelu", layer_norm_eps=c.layer_norm_eps)
    neck = dict(backbone_channel_list=list(c.embed_dims[::-1]), fpn_hidden_size=c.fpn_dim,
                fpn_kernel_size=1, fpn_stride=1, fpn_padding=0,
                fpn_top_down_levels=list(c.fpn_top_down_levels),
                num_feature_levels=c.num_feature_levels)
    return backbone, neck


def load(variant: str | HieraConfig, path: str | os.PathLike, *,
         dtype=jnp.float32) -> Sam2ImageEncoder:
    """An encoder with weights from a local checkpoint, strictly (:func:`_base.load_checkpoint`).

    A Hugging Face folder's ``config.json`` must describe ``variant`` (window sizes and
    global blocks, which parameter shapes do not show, included).

    Args:
      variant: as :func:`create`, e.g. ``"sam2.1_hiera_tiny"``.
      path: a checkpoint file (``.pt`` needs torch; ``.safetensors`` does not), a Hugging
        Face model folder or an offline Hugging Face cache folder.
      dtype: compute dtype.

    Raises:
      CheckpointError: as :func:`_base.load_checkpoint`, or a ``config.json`` that
        describes another architecture (the file and fields named).
    """
    if os.path.isdir(path):
        check_folder(path, *hf_config(_base.variant_config(VARIANTS, variant, "SAM2")))
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)
