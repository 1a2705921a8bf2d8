"""Transformer pieces shared by the ViT encoder families (DINOv2, DINOv3, CLIP).

The families differ in their position encoding (learned and bicubically
interpolated for DINOv2 and CLIP, rotary for DINOv3), in layer scale and in where
the layer norms sit; the pre-norm block, the attention, the MLPs, the patch
embedding, the class/register token prefix, the position-embedding resampling and
the block loop that names the ``"block_<i>"`` maps are here. (Their ``create`` and
``load`` are :mod:`jaxreg.encoders._base`'s; their converters use
:mod:`jaxreg.encoders._torch_names`.)

Conventions: parameters float32, activations in the compute ``dtype``, images
``(B, H, W, 3)`` channels-last, tokens ``(B, T, C)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ViTConfig",
    "PatchEmbed",
    "ATTENTION_IMPLEMENTATIONS",
    "Attention",
    "set_attention",
    "Mlp",
    "GatedMlp",
    "Block",
    "bicubic_matrix",
    "resample_pos_embed",
    "learned_positions",
    "prepend_tokens",
    "tokens_to_maps",
    "run_blocks",
]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a plain ViT encoder (hashable, static under ``jit``).

    Attributes:
      patch_size: square patch side in pixels.
      hidden_size: token channels.
      depth: number of transformer blocks.
      num_heads: attention heads.
      mlp_dim: hidden width of the MLP.
      num_registers: register tokens after the class token.
      qkv_bias: biases of the (query, key, value) projections.
      proj_bias: bias of the attention output projection.
      mlp_bias: biases of the MLP layers.
      layer_scale: whether each residual branch is scaled per channel.
      act: ``"gelu"`` (exact), ``"quick_gelu"``, ``"silu"``.
      gated_mlp: SwiGLU-style MLP (gate, up, down) instead of fc1/fc2.
      norm_eps: layer norm epsilon.
      pos_grid: side of the learned position-embedding grid (0: no learned ones).
      pos_antialias: bicubic resampling of the position grid with anti-aliasing.
      pos_offset: DINO's historical offset: the grid is resampled with scale factor
        ``(n + offset) / pos_grid`` instead of to size ``n`` (0: by size).
      rope_theta: RoPE base (0: no rotary embedding).
    """

    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_registers: int = 0
    qkv_bias: tuple[bool, bool, bool] = (True, True, True)
    proj_bias: bool = True
    mlp_bias: bool = True
    layer_scale: bool = True
    act: str = "gelu"
    gated_mlp: bool = False
    norm_eps: float = 1e-6
    pos_grid: int = 0
    pos_antialias: bool = False
    pos_offset: float = 0.0
    rope_theta: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
}


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"act={name!r}: expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class PatchEmbed(nnx.Module):
    """Non-overlapping patches to tokens: a stride-``patch`` convolution.

    Pixels past the last whole patch are dropped, as in the references.
    """

    def __init__(self, *, patch_size: int, hidden_size: int, bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = nnx.Conv(3, hidden_size, (patch_size, patch_size),
                             strides=(patch_size, patch_size), padding="VALID",
                             use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Args: images (B, H, W, 3). Returns: patch tokens (B, H // p, W // p, C)."""
        return self.proj(images)


ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


class Attention(nnx.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention``.

    ``implementation`` is that function's argument: None or ``"xla"``, XLA's composition
    (the attention weights materialised); ``"cudnn"``, cuDNN's fused kernel (NVIDIA GPUs,
    bfloat16 or float16 only). :func:`set_attention` sets it for a whole model.
    """

    def __init__(self, *, hidden_size: int, num_heads: int,
                 qkv_bias: Sequence[bool] = (True, True, True), proj_bias: bool = True,
                 dtype=jnp.float32, implementation: str | None = None, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.implementation = implementation
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.q = nnx.Linear(hidden_size, hidden_size, use_bias=qkv_bias[0], **kw)
        self.k = nnx.Linear(hidden_size, hidden_size, use_bias=qkv_bias[1], **kw)
        self.v = nnx.Linear(hidden_size, hidden_size, use_bias=qkv_bias[2], **kw)
        self.out = nnx.Linear(hidden_size, hidden_size, use_bias=proj_bias, **kw)

    def __call__(self, x: jax.Array, *,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Args:
          x: tokens (B, T, C).
          rope: optional (cos, sin), each (P, head_dim), rotating the last P tokens
            of queries and keys (the patch tokens; class and register tokens stay).

        Returns:
          (B, T, C).
        """
        b, t, c = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, c // self.num_heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        o = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return self.out(o.reshape(b, t, c))


def set_attention(model: nnx.Module, implementation: str | None) -> int:
    """Sets the ``implementation`` of every :class:`Attention` in ``model``; returns how
    many layers it set (0 for a model without them, e.g. SAM's). Raises ValueError for a
    name not in :data:`ATTENTION_IMPLEMENTATIONS`."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose from "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, Attention)]
    for layer in layers:
        layer.implementation = implementation
    return len(layers)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    p = cos.shape[0]
    prefix, patches = x[:, :-p], x[:, -p:]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
    cos = cos[None, :, None, :].astype(x.dtype)
    sin = sin[None, :, None, :].astype(x.dtype)
    return jnp.concatenate([prefix, patches * cos + rotated * sin], axis=1)


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, *, hidden_size: int, mlp_dim: int, act: str = "gelu",
                 bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.act = act
        self.fc1 = nnx.Linear(hidden_size, mlp_dim, use_bias=bias, **kw)
        self.fc2 = nnx.Linear(mlp_dim, hidden_size, use_bias=bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_activation(self.act)(self.fc1(x)))


class GatedMlp(nnx.Module):
    """down(act(gate(x)) * up(x)) (SwiGLU with ``act="silu"``)."""

    def __init__(self, *, hidden_size: int, mlp_dim: int, act: str = "silu",
                 bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.act = act
        self.gate = nnx.Linear(hidden_size, mlp_dim, use_bias=bias, **kw)
        self.up = nnx.Linear(hidden_size, mlp_dim, use_bias=bias, **kw)
        self.down = nnx.Linear(mlp_dim, hidden_size, use_bias=bias, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(_activation(self.act)(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm transformer block, optionally with per-channel layer scale."""

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config.hidden_size
        self.norm1 = nnx.LayerNorm(c, epsilon=config.norm_eps, dtype=dtype,
                                   param_dtype=jnp.float32, rngs=rngs)
        self.attn = Attention(hidden_size=c, num_heads=config.num_heads,
                              qkv_bias=config.qkv_bias, proj_bias=config.proj_bias,
                              dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(c, epsilon=config.norm_eps, dtype=dtype,
                                   param_dtype=jnp.float32, rngs=rngs)
        mlp_cls = GatedMlp if config.gated_mlp else Mlp
        self.mlp = mlp_cls(hidden_size=c, mlp_dim=config.mlp_dim, act=config.act,
                           bias=config.mlp_bias, dtype=dtype, rngs=rngs)
        if config.layer_scale:
            self.ls1 = nnx.Param(jnp.ones((c,), jnp.float32))
            self.ls2 = nnx.Param(jnp.ones((c,), jnp.float32))
        else:
            self.ls1 = self.ls2 = None

    def __call__(self, x: jax.Array, *,
                 rope: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """Args: x (B, T, C); rope: see :class:`Attention`. Returns: (B, T, C)."""
        y = self.attn(self.norm1(x), rope=rope)
        if self.ls1 is not None:
            y = y * self.ls1[...].astype(y.dtype)
        x = x + y
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = y * self.ls2[...].astype(y.dtype)
        return x + y


# --------------------------------------------------------------------------------------
# Position-embedding resampling, exactly as torch.nn.functional.interpolate(bicubic).


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    f = np.float32
    x = np.abs(x).astype(f)
    a = f(a)
    near = ((a + f(2)) * x - (a + f(3))) * x * x + f(1)
    far = ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a
    return np.where(x < 1, near, np.where(x < 2, far, f(0))).astype(f)


def bicubic_matrix(in_size: int, out_size: int, *, antialias: bool = False,
                   scale_factor: float | None = None) -> np.ndarray:
    """The (out_size, in_size) matrix of torch's 1-D bicubic resampling.

    Matches ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``
    on float32 input along one axis, in torch's float32 arithmetic: without
    anti-aliasing Keys' kernel with a=-0.75 and clamped border taps; with it
    (``antialias=True``) the a=-0.5 kernel stretched by the downscaling factor and
    normalised per output.

    Args:
      in_size: input length.
      out_size: output length.
      antialias: torch's ``antialias`` flag.
      scale_factor: torch's ``scale_factor`` when the call gives one (the source
        coordinate then uses ``1 / scale_factor`` rather than ``in / out``).

    Returns:
      float32 matrix ``m`` so that ``out = m @ in``.
    """
    f = np.float32
    scale = f(1.0 / scale_factor) if scale_factor else f(in_size) / f(out_size)
    m = np.zeros((out_size, in_size), np.float32)
    if antialias:
        support = f(2) * scale if scale >= 1 else f(2)
        inv = f(1) / scale if scale >= 1 else f(1)
        for i in range(out_size):
            center = scale * f(i + 0.5)
            lo = max(int(center - support + f(0.5)), 0)
            hi = min(int(center + support + f(0.5)), in_size)
            j = np.arange(lo, hi).astype(f)
            w = _cubic((j - center + f(0.5)) * inv, -0.5)
            total = w.sum(dtype=f)
            if total != 0:
                w = w / total
            m[i, lo:hi] = w
        return m
    for i in range(out_size):
        real = scale * f(i + 0.5) - f(0.5)
        base = math.floor(real)
        t = f(real - f(base))
        w = _cubic(np.array([t + f(1), t, f(1) - t, f(2) - t], f), -0.75)
        for tap, wt in zip(range(base - 1, base + 3), w):
            m[i, min(max(tap, 0), in_size - 1)] += wt
    return m


def resample_pos_embed(grid: jax.Array, size: tuple[int, int], *, antialias: bool = False,
                       offset: float = 0.0) -> jax.Array:
    """Resamples a learned (g, g, C) position-embedding grid to ``size`` bicubically.

    Args:
      grid: (g, g, C) embeddings of the patch tokens.
      size: (h, w) token grid wanted.
      antialias: torch's anti-aliased bicubic (transformers' Dinov2WithRegisters).
      offset: DINO's scale-factor offset (original DINOv2 code: 0.1); 0 resamples to
        the size directly (transformers' Dinov2 and CLIP).

    Returns:
      (h, w, C) float32.
    """
    g = grid.shape[0]
    mats = []
    for n in size:
        sf = (n + offset) / g if offset else None
        mats.append(jnp.asarray(bicubic_matrix(g, n, antialias=antialias, scale_factor=sf),
                                jnp.float32))
    return jnp.einsum("hi,wj,ijc->hwc", mats[0], mats[1], grid.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------------------
# Token sequences: positions, class and register tokens, the block loop.


def learned_positions(x: jax.Array, pos_embed: jax.Array,
                      config: ViTConfig) -> tuple[jax.Array, jax.Array]:
    """Adds learned position embeddings, resampled to the token grid, to patch tokens.

    Args:
      x: patch tokens (B, h, w, C).
      pos_embed: (1 + g*g, C): the class token's embedding, then the g x g grid's.
      config: ``pos_grid`` (g), ``pos_antialias`` and ``pos_offset`` say how to resample.

    Returns:
      (tokens (B, h*w, C) with their positions added, the class token's embedding (C,)).
    """
    b, h, w, c = x.shape
    g = config.pos_grid
    patch_pos = resample_pos_embed(pos_embed[1:].reshape(g, g, c), (h, w),
                                   antialias=config.pos_antialias, offset=config.pos_offset)
    return x.reshape(b, h * w, c) + patch_pos.reshape(1, h * w, c).astype(x.dtype), pos_embed[0]


def prepend_tokens(x: jax.Array, cls: jax.Array,
                   registers: jax.Array | None = None) -> jax.Array:
    """(B, T, C) tokens behind the class token (C,) and the register tokens (R, C), if any."""
    b, _, c = x.shape
    prefix = [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c))]
    if registers is not None:
        regs = registers.astype(x.dtype)
        prefix.append(jnp.broadcast_to(regs, (b, *regs.shape)))
    return jnp.concatenate(prefix + [x], axis=1)


def tokens_to_maps(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, h*w, C) patch tokens to float32 (B, h, w, C) maps."""
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).astype(jnp.float32)


def run_blocks(blocks: Sequence[Block], x: jax.Array, *, grid: tuple[int, int],
               num_prefix: int, keep: Sequence[int] | None,
               rope: tuple[jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the blocks, collecting patch-token maps ``"block_i"`` (counted from 1) on the way.

    Args:
      blocks: the transformer blocks.
      x: tokens (B, num_prefix + h*w, C).
      grid: (h, w).
      num_prefix: class + register tokens before the patch tokens.
      keep: which block outputs to return (counted from 1); None: all.
      rope: passed to every block.

    Returns:
      (last tokens, {"block_i": (B, h, w, C) float32}).
    """
    wanted = set(range(1, len(blocks) + 1)) if keep is None else set(keep)
    bad = sorted(i for i in wanted if not 1 <= i <= len(blocks))
    if bad:
        raise ValueError(f"blocks={sorted(wanted)}: {bad} outside 1..{len(blocks)}")
    maps = {}
    for i, block in enumerate(blocks, start=1):
        x = block(x, rope=rope)
        if i in wanted:
            maps[f"block_{i}"] = tokens_to_maps(x[:, num_prefix:], grid)
    return x, maps
