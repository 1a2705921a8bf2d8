"""SAM's prompt encoder in Flax NNX: points, boxes and masks to the mask decoder's inputs.

Sparse prompts (points, box corners) become one token each: a random Fourier encoding of
the position (:class:`PositionEmbeddingRandom`: coordinates scaled to [0, 1] by the
encoder's input size, mapped to [-1, 1], multiplied by a fixed Gaussian ``(2, C/2)``
matrix and by 2 pi, then sin and cos) plus a learnt embedding of its kind: label 1
(foreground point), 0 (background point), the top-left and bottom-right box corners; a
padding point (label -1) has no position, only its own embedding. A dense prompt (a
low-resolution mask logit map, 4x the image embedding's size) goes through two 2x2
stride-2 convolutions with channel LayerNorm and GELU and a 1x1 convolution; without one,
a learnt "no mask" embedding fills the image embedding's grid.

Coordinates are ``(x, y)`` = (column, row) in pixels of the encoder's input (after the
resize, before padding matters), as SAM's; every pixel index is shifted by 0.5 to its
centre. Arrays are channels-last: the dense outputs are ``(B, h, w, C)``.

Names follow ``segment_anything/modeling/prompt_encoder.py`` (``mask_downscaling``'s
``nn.Sequential`` indices 0, 1, 3, 4, 6 become ``conv1, norm1, conv2, norm2, conv3``;
``nn.Embedding`` weights become ``embedding``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]

_LN2D_EPS = 1e-6  # segment_anything's LayerNorm2d


class PositionEmbeddingRandom(nnx.Module):
    """Random Fourier features of 2D positions (a fixed Gaussian matrix, part of the weights)."""

    def __init__(self, num_feats: int, *, rngs: nnx.Rngs):
        """Args:
          num_feats: frequencies; the encoding has ``2 * num_feats`` channels.
          rngs: random keys (the reference draws the matrix from a unit normal).
        """
        self.positional_encoding_gaussian_matrix = nnx.Param(
            jax.random.normal(rngs.params(), (2, num_feats), jnp.float32))

    def encode(self, coords: jax.Array) -> jax.Array:
        """``(..., 2)`` coordinates in [0, 1] -> ``(..., 2 * num_feats)`` sin/cos features."""
        proj = (2.0 * coords - 1.0) @ self.positional_encoding_gaussian_matrix[...]
        proj = 2.0 * math.pi * proj
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)

    def grid(self, size: tuple[int, int]) -> jax.Array:
        """The encoding of every cell centre of an ``(h, w)`` grid: ``(h, w, C)``."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        xy = jnp.stack(jnp.meshgrid(x, y, indexing="xy"), axis=-1)  # (h, w, 2) as (x, y)
        return self.encode(xy)

    def points(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """``(..., 2)`` pixel coordinates ``(x, y)`` of an ``image_size = (H, W)`` input."""
        scale = jnp.asarray([image_size[1], image_size[0]], jnp.float32)
        return self.encode(coords.astype(jnp.float32) / scale)


class _MaskDownscaling(nnx.Module):
    """Two 2x2 stride-2 convs with channel LayerNorm + GELU, then a 1x1 conv to ``dim``."""

    def __init__(self, hidden: int, dim: int, *, dtype, rngs: nnx.Rngs):
        conv = lambda a, b, k: nnx.Conv(a, b, (k, k), strides=k, padding="VALID",  # noqa: E731
                                        dtype=dtype, rngs=rngs)
        self.conv1 = conv(1, hidden // 4, 2)
        self.norm1 = nnx.LayerNorm(hidden // 4, epsilon=_LN2D_EPS, dtype=dtype, rngs=rngs)
        self.conv2 = conv(hidden // 4, hidden, 2)
        self.norm2 = nnx.LayerNorm(hidden, epsilon=_LN2D_EPS, dtype=dtype, rngs=rngs)
        self.conv3 = conv(hidden, dim, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.norm1(self.conv1(x)), approximate=False)
        x = jax.nn.gelu(self.norm2(self.conv2(x)), approximate=False)
        return self.conv3(x)


def _embedding(n: int, dim: int, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(n, dim, rngs=rngs)


class PromptEncoder(nnx.Module):
    """SAM's prompt encoder (see the module docstring)."""

    def __init__(self, embed_dim: int, image_embedding_size: tuple[int, int],
                 input_image_size: tuple[int, int], mask_in_chans: int, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        """Args:
          embed_dim: channels of every embedding (the mask decoder's width).
          image_embedding_size: ``(h, w)`` of the image embedding.
          input_image_size: ``(H, W)`` of the (padded) encoder input, in pixels.
          mask_in_chans: hidden channels of the mask downscaling.
          dtype: compute dtype of the mask convolutions.
          rngs: random keys for initialisation.
        """
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, rngs=rngs)
        # labels 0 (background), 1 (foreground), box top-left, box bottom-right
        self.point_embeddings = nnx.List([_embedding(1, embed_dim, rngs) for _ in range(4)])
        self.not_a_point_embed = _embedding(1, embed_dim, rngs)
        self.mask_downscaling = _MaskDownscaling(mask_in_chans, embed_dim, dtype=dtype, rngs=rngs)
        self.no_mask_embed = _embedding(1, embed_dim, rngs)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """``(4h, 4w)``: the size of a dense mask prompt."""
        return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

    def dense_pe(self) -> jax.Array:
        """The positional encoding of the image embedding's grid: ``(h, w, C)``."""
        return self.pe_layer.grid(self.image_embedding_size)

    def embed_points(self, coords: ArrayLike, labels: ArrayLike, *, pad: bool) -> jax.Array:
        """``(B, N, 2)`` pixel coordinates ``(x, y)`` and ``(B, N)`` labels (1 foreground, 0
        background, -1 padding) -> ``(B, N (+1 if pad), C)``; ``pad`` appends a padding point
        (the reference does when no box is given)."""
        coords = jnp.asarray(coords, jnp.float32) + 0.5
        labels = jnp.asarray(labels, jnp.int32)
        if pad:
            coords = jnp.concatenate([coords, jnp.zeros_like(coords[:, :1])], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones_like(labels[:, :1])], axis=1)
        emb = self.pe_layer.points(coords, self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, self.not_a_point_embed.embedding[0], emb)
        emb = emb + jnp.where(lab == 0, self.point_embeddings[0].embedding[0], 0.0)
        return emb + jnp.where(lab == 1, self.point_embeddings[1].embedding[0], 0.0)

    def embed_boxes(self, boxes: ArrayLike) -> jax.Array:
        """``(B, 4)`` boxes ``(x0, y0, x1, y1)`` in pixels (corners inclusive) -> ``(B, 2, C)``."""
        corners = (jnp.asarray(boxes, jnp.float32) + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.points(corners, self.input_image_size)
        corner_kind = jnp.stack([self.point_embeddings[2].embedding[0],
                                 self.point_embeddings[3].embedding[0]])
        return emb + corner_kind

    def embed_masks(self, masks: ArrayLike) -> jax.Array:
        """``(B, 4h, 4w)`` mask logits -> ``(B, h, w, C)``."""
        masks = jnp.asarray(masks, jnp.float32)
        if masks.shape[1:] != self.mask_input_size:
            raise ValueError(f"mask prompts must be (B, {self.mask_input_size[0]}, "
                             f"{self.mask_input_size[1]}), got {masks.shape}")
        return self.mask_downscaling(masks[..., None]).astype(jnp.float32)

    def __call__(self, *, points: tuple[ArrayLike, ArrayLike] | None = None,
                 boxes: ArrayLike | None = None,
                 masks: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
        """Embeds the prompts; at least one must be given, all with the same batch size.

        Args:
          points: ``(coords (B, N, 2), labels (B, N))``, see :meth:`embed_points`.
          boxes: ``(B, 4)``, see :meth:`embed_boxes`.
          masks: ``(B, 4h, 4w)`` low-resolution mask logits.

        Returns:
          ``(sparse (B, N', C), dense (B, h, w, C))``: N' counts points (plus a padding
          point without a box) and 2 per box.
        """
        parts = []
        if points is not None:
            parts.append(self.embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = None
        if not parts and dense is None:
            raise ValueError("give at least one prompt: points, boxes or masks")
        batch = parts[0].shape[0] if parts else dense.shape[0]
        sparse = (jnp.concatenate(parts, axis=1) if parts
                  else jnp.zeros((batch, 0, self.embed_dim), jnp.float32))
        if dense is None:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(self.no_mask_embed.embedding[0], (batch, h, w, self.embed_dim))
        return sparse, dense
