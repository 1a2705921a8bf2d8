"""SAM's two-way transformer in Flax NNX: prompt tokens and image tokens attend to each other.

Each block (Kirillov et al., "Segment Anything", ICCV 2023, fig. 14) runs four steps on
the sparse tokens (output tokens + prompt embeddings) and the dense image tokens:
self-attention of the tokens, cross-attention tokens -> image, an MLP on the tokens,
cross-attention image -> tokens; each step adds its output and applies a LayerNorm. The
positional encodings are added to queries and keys before every attention (the first
block's self-attention takes none and has no residual). The cross-attentions project to
``dim // downsample_rate`` channels. A last token -> image attention and LayerNorm close it.

Names follow ``segment_anything/modeling/transformer.py`` so that a checkpoint converts by
the layout rules of :mod:`jaxreg.encoders._torch_names`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Attention", "TwoWayBlock", "TwoWayTransformer"]

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the reference uses


class Attention(nnx.Module):
    """Multi-head attention whose projections may shrink the channels by ``downsample_rate``."""

    def __init__(self, dim: int, num_heads: int, *, downsample_rate: int = 1, dtype,
                 rngs: nnx.Rngs):
        """Args:
          dim: channels of queries, keys, values and output.
          num_heads: attention heads; must divide ``dim // downsample_rate``.
          downsample_rate: internal channels are ``dim // downsample_rate``.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide {inner} channels")
        self.num_heads = num_heads
        lin = lambda a, b: nnx.Linear(a, b, dtype=dtype, rngs=rngs)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj = lin(dim, inner), lin(dim, inner), lin(dim, inner)
        self.out_proj = lin(inner, dim)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """``(B, Nq, C)`` queries attend to ``(B, Nk, C)`` keys / values: ``(B, Nq, C)``."""
        def heads(x):
            b, n, c = x.shape
            return x.reshape(b, n, self.num_heads, c // self.num_heads)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
        out = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class MLPBlock(nnx.Module):
    """Linear, ReLU, Linear (the two-way transformer's MLP)."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(jax.nn.relu(self.lin1(x)))


class TwoWayBlock(nnx.Module):
    """Self-attention, token -> image attention, MLP, image -> token attention."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, downsample_rate: int,
                 skip_first_pe: bool, dtype, rngs: nnx.Rngs):
        """Args:
          dim: channels.
          num_heads: attention heads.
          mlp_dim: hidden width of the MLP.
          downsample_rate: channel reduction of the two cross-attentions.
          skip_first_pe: the first block's self-attention: no positional encoding, no
            residual.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        norm = lambda: nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)  # noqa: E731
        self.skip_first_pe = skip_first_pe
        self.self_attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm1 = norm()
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=downsample_rate,
                                                   dtype=dtype, rngs=rngs)
        self.norm2 = norm()
        self.mlp = MLPBlock(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.norm3 = norm()
        self.norm4 = norm()
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=downsample_rate,
                                                   dtype=dtype, rngs=rngs)

    def __call__(self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array,
                 key_pe: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Updates ``(B, N, C)`` tokens and ``(B, hw, C)`` image tokens."""
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """``depth`` two-way blocks, then a final token -> image attention and LayerNorm."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, *,
                 downsample_rate: int = 2, dtype, rngs: nnx.Rngs):
        """Args:
          depth: number of blocks.
          dim: channels of tokens and image embedding.
          num_heads: attention heads.
          mlp_dim: hidden width of the blocks' MLPs.
          downsample_rate: channel reduction of the cross-attentions.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        self.layers = nnx.List([
            TwoWayBlock(dim, num_heads, mlp_dim, downsample_rate=downsample_rate,
                        skip_first_pe=i == 0, dtype=dtype, rngs=rngs) for i in range(depth)])
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=downsample_rate,
                                                   dtype=dtype, rngs=rngs)
        self.norm_final_attn = nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, image: jax.Array, image_pe: jax.Array,
                 tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Runs the transformer.

        Args:
          image: ``(B, h, w, C)`` image embedding (prompt masks already added).
          image_pe: ``(B, h, w, C)`` its positional encoding.
          tokens: ``(B, N, C)`` output tokens and prompt embeddings.

        Returns:
          ``(tokens (B, N, C), image tokens (B, h * w, C))``.
        """
        b, h, w, c = image.shape
        keys = image.reshape(b, h * w, c)
        key_pe = jnp.broadcast_to(image_pe, image.shape).reshape(b, h * w, c)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys
