"""SAM's mask decoder in Flax NNX: image embedding + prompt embeddings -> mask logits and IoU.

Learnt output tokens (one IoU token, ``num_multimask_outputs + 1`` mask tokens) are put
in front of the sparse prompt embeddings; the dense prompt embedding is added to the image
embedding; the two-way transformer (:mod:`jaxreg.segment._two_way`) updates both. The
image tokens are upscaled 4x (two 2x2 stride-2 transposed convolutions, channel LayerNorm
and GELU between them, GELU after) to ``dim / 8`` channels; each mask token goes through
its own 3-layer MLP (a hypernetwork) to ``dim / 8`` weights whose dot product with the
upscaled map gives that mask's logits; a 3-layer MLP on the IoU token predicts each mask's
IoU. ``multimask_output`` returns masks 1..3 (the ambiguity-aware ones) instead of mask 0.

Arrays are channels-last; masks come back ``(B, M, 4h, 4w)``. Names follow
``segment_anything/modeling/mask_decoder.py`` (``output_upscaling``'s ``nn.Sequential``
indices 0, 1, 3 become ``up1, norm, up2``; ``nn.Embedding`` weights become ``embedding``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxreg.segment._two_way import TwoWayTransformer

__all__ = ["MLP", "UpConv2x2", "MaskDecoder"]

_LN2D_EPS = 1e-6


class MLP(nnx.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, num_layers: int, *, dtype,
                 rngs: nnx.Rngs):
        """Args:
          dim_in: input channels.
          hidden: width of the hidden layers.
          dim_out: output channels.
          num_layers: number of Linear layers.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        dims = [dim_in] + [hidden] * (num_layers - 1) + [dim_out]
        self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class UpConv2x2(nnx.Module):
    """A 2x2 stride-2 transposed convolution (PyTorch's ``ConvTranspose2d(k=2, s=2)``).

    Each input pixel becomes a 2x2 output block, ``out[2i+a, 2j+b] = x[i, j] @ kernel[a, b]``
    + bias: the kernel is ``(2, 2, in, out)``, PyTorch's ``(in, out, 2, 2)`` moved.
    """

    def __init__(self, dim_in: int, dim_out: int, *, dtype, rngs: nnx.Rngs):
        scale = 1.0 / jnp.sqrt(4.0 * dim_out)
        self.kernel = nnx.Param(scale * jax.random.normal(rngs.params(), (2, 2, dim_in, dim_out)))
        self.bias = nnx.Param(jnp.zeros((dim_out,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, h, w, in)`` -> ``(B, 2h, 2w, out)``."""
        b, h, w, _ = x.shape
        y = jnp.einsum("nhwi,abio->nhawbo", x.astype(self.dtype),
                       self.kernel[...].astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(self.dtype)


class _OutputUpscaling(nnx.Module):
    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.up1 = UpConv2x2(dim, dim // 4, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(dim // 4, epsilon=_LN2D_EPS, dtype=dtype, rngs=rngs)
        self.up2 = UpConv2x2(dim // 4, dim // 8, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.norm(self.up1(x)), approximate=False)
        return jax.nn.gelu(self.up2(x), approximate=False)


class MaskDecoder(nnx.Module):
    """SAM's mask decoder (see the module docstring)."""

    def __init__(self, dim: int = 256, *, depth: int = 2, num_heads: int = 8,
                 mlp_dim: int = 2048, attention_downsample_rate: int = 2,
                 num_multimask_outputs: int = 3, iou_head_depth: int = 3,
                 iou_head_hidden_dim: int = 256, dtype=jnp.float32, rngs: nnx.Rngs):
        """Args:
          dim: channels of the transformer (the prompt and image embeddings).
          depth: two-way transformer blocks.
          num_heads: attention heads.
          mlp_dim: hidden width of the transformer's MLPs.
          attention_downsample_rate: channel reduction of the cross-attentions.
          num_multimask_outputs: masks returned with ``multimask_output``.
          iou_head_depth: Linear layers of the IoU head.
          iou_head_hidden_dim: their width.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim,
                                             downsample_rate=attention_downsample_rate,
                                             dtype=dtype, rngs=rngs)
        self.iou_token = nnx.Embed(1, dim, rngs=rngs)
        self.mask_tokens = nnx.Embed(self.num_mask_tokens, dim, rngs=rngs)
        self.output_upscaling = _OutputUpscaling(dim, dtype=dtype, rngs=rngs)
        self.output_hypernetworks_mlps = nnx.List([
            MLP(dim, dim, dim // 8, 3, dtype=dtype, rngs=rngs)
            for _ in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(dim, iou_head_hidden_dim, self.num_mask_tokens,
                                       iou_head_depth, dtype=dtype, rngs=rngs)

    def __call__(self, image_embeddings: ArrayLike, image_pe: ArrayLike,
                 sparse_prompt_embeddings: ArrayLike, dense_prompt_embeddings: ArrayLike, *,
                 multimask_output: bool) -> tuple[jax.Array, jax.Array]:
        """Predicts masks.

        Args:
          image_embeddings: ``(B, h, w, C)``, or ``(1, h, w, C)`` shared by all prompts.
          image_pe: ``(h, w, C)`` (``PromptEncoder.dense_pe()``) or ``(1, h, w, C)``.
          sparse_prompt_embeddings: ``(B, N, C)``.
          dense_prompt_embeddings: ``(B, h, w, C)``.
          multimask_output: return the 3 ambiguity-aware masks instead of the single one.

        Returns:
          ``(masks (B, M, 4h, 4w) float32 logits, iou (B, M))``, M = 3 or 1.
        """
        image = jnp.asarray(image_embeddings, jnp.float32)
        sparse = jnp.asarray(sparse_prompt_embeddings, jnp.float32)
        dense = jnp.asarray(dense_prompt_embeddings, jnp.float32)
        b, n_prompt, dim = sparse.shape
        if image.ndim != 4 or image.shape[0] not in (1, b) or dense.shape[0] != b:
            raise ValueError(f"image embeddings {image.shape} (batch 1 or {b}) and dense "
                             f"prompts {dense.shape} must match {b} sparse prompts")
        out_tokens = jnp.concatenate([self.iou_token.embedding[...],
                                      self.mask_tokens.embedding[...]], axis=0)
        tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b,) + out_tokens.shape),
                                  sparse], axis=1)
        src = jnp.broadcast_to(image, dense.shape) + dense
        pe = jnp.broadcast_to(jnp.asarray(image_pe, jnp.float32), src.shape)
        hs, keys = self.transformer(src, pe, tokens)
        _, h, w, _ = src.shape
        up = self.output_upscaling(keys.reshape(b, h, w, dim)).astype(jnp.float32)
        hyper = jnp.stack([mlp(hs[:, 1 + i]) for i, mlp in
                           enumerate(self.output_hypernetworks_mlps)], axis=1)
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper.astype(jnp.float32), up)
        iou = self.iou_prediction_head(hs[:, 0]).astype(jnp.float32)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]
