"""Transformer pieces shared by the ViT encoder families (DINOv2, DINOv3, CLIP).

The families differ in their position encoding (learned and bicubically
interpolated for DINOv2 and CLIP, rotary for DINOv3), in layer scale and in where
the layer norms sit; the pre-norm block, the attention, the MLPs, the patch
embedding, the position-embedding resampling and the checkpoint helpers are here.

Conventions: parameters float32, activations in the compute ``dtype``, images
``(B, H, W, 3)`` channels-last, tokens ``(B, T, C)``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders._checkpoint import CheckpointError, read_state_dict

__all__ = [
    "ViTConfig",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "GatedMlp",
    "Block",
    "bicubic_matrix",
    "resample_pos_embed",
    "tokens_to_maps",
    "resolve_checkpoint",
    "read_checkpoint",
    "rename",
    "linear_rules",
    "norm_rules",
    "conv_rules",
    "split_rule",
    "run_blocks",
    "create_abstract",
    "convert_by_rules",
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


class Attention(nnx.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention``."""

    def __init__(self, *, hidden_size: int, num_heads: int,
                 qkv_bias: Sequence[bool] = (True, True, True), proj_bias: bool = True,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
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
        o = jax.nn.dot_product_attention(q, k, v)
        return self.out(o.reshape(b, t, c))


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


def tokens_to_maps(tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, h*w, C) patch tokens to float32 (B, h, w, C) maps."""
    return tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).astype(jnp.float32)


# --------------------------------------------------------------------------------------
# Checkpoint files and the numpy layout helpers of the converters.


def resolve_checkpoint(path: str | os.PathLike) -> list[str]:
    """The weight file(s) behind ``path``.

    Args:
      path: a weight file (``.safetensors``, ``.pth``, ``.bin``); a Hugging Face model
        folder (``config.json`` + ``model.safetensors``, sharded or not, or
        ``pytorch_model.bin``); or an offline Hugging Face cache folder
        ``models--org--name`` (its newest ``snapshots/*/``).

    Returns:
      The files to read, in order.

    Raises:
      CheckpointError: nothing loadable at ``path``.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    snapshots = sorted(glob.glob(os.path.join(path, "snapshots", "*")), key=os.path.getmtime)
    for folder in [path] + snapshots[::-1]:
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(folder, name)):
                return [os.path.join(folder, name)]
    raise CheckpointError(
        f"{path}: a folder without model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin (nor a Hugging Face cache folder with snapshots/*/ holding one)")


def is_converted(sd: Mapping[str, np.ndarray]) -> bool:
    """Whether a state dict is already in jaxreg's names (as ``python -m jaxreg.convert``
    writes them: Flax ``kernel``/``scale``, never PyTorch's ``weight``)."""
    return (any(k.endswith(".kernel") for k in sd)
            and not any(k.endswith(".weight") for k in sd))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], str]:
    """Reads every file :func:`resolve_checkpoint` finds into one state dict.

    Returns:
      (state dict, the path to quote in errors).
    """
    files = resolve_checkpoint(path)
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update(read_state_dict(f))
    return sd, files[0] if len(files) == 1 else os.fspath(path)


def rename(pattern: str, dst: str, kind: str = "copy") -> tuple[str, Callable]:
    """A converter rule: entries matching ``pattern`` go to ``dst`` (``\\1`` groups allowed).

    ``kind``: ``"copy"``; ``"linear"`` (transpose a torch (out, in) weight);
    ``"conv"`` (torch (O, I, kh, kw) to (kh, kw, I, O)); ``"vector"`` ((1, 1, C) to
    (C,)); ``"rows"`` ((1, N, C) to (N, C)).
    """
    transforms = {
        "copy": lambda v: v,
        "linear": lambda v: v.T,
        "conv": lambda v: v.transpose(2, 3, 1, 0),
        "vector": lambda v: v.reshape(-1),
        "rows": lambda v: v.reshape(-1, v.shape[-1]),
    }
    transform = transforms[kind]

    def fn(m, value, out):
        out[m.expand(dst)] = transform(value)

    return pattern, fn


def linear_rules(src: str, dst: str) -> list[tuple[str, Callable]]:
    """Rules for a torch Linear at regex ``src`` going to NNX Linear ``dst``."""
    return [rename(src + r"\.weight", dst + ".kernel", "linear"),
            rename(src + r"\.bias", dst + ".bias")]


def norm_rules(src: str, dst: str) -> list[tuple[str, Callable]]:
    """Rules for a torch LayerNorm at regex ``src`` going to NNX LayerNorm ``dst``."""
    return [rename(src + r"\.weight", dst + ".scale"), rename(src + r"\.bias", dst + ".bias")]


def conv_rules(src: str, dst: str) -> list[tuple[str, Callable]]:
    """Rules for a torch Conv2d at regex ``src`` going to NNX Conv ``dst``."""
    return [rename(src + r"\.weight", dst + ".kernel", "conv"),
            rename(src + r"\.bias", dst + ".bias")]


def split_rule(pattern: str, dsts: Sequence[str], kind: str = "linear") -> tuple[str, Callable]:
    """A rule splitting a fused torch weight (q|k|v, gate|up) along its output axis."""
    def fn(m, value, out):
        for d, part in zip(dsts, np.split(value, len(dsts), axis=0)):
            out[m.expand(d)] = part.T if kind == "linear" else part

    return pattern, fn


def run_blocks(blocks: Sequence[Block], x: jax.Array, *, grid: tuple[int, int],
               num_prefix: int, layers: Sequence[int] | None,
               rope: tuple[jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the blocks, collecting patch-token maps ``"layer_i"`` (1-based) on the way.

    Args:
      blocks: the transformer blocks.
      x: tokens (B, num_prefix + h*w, C).
      grid: (h, w).
      num_prefix: class + register tokens before the patch tokens.
      layers: which block outputs to return (1-based); None: all.
      rope: passed to every block.

    Returns:
      (last tokens, {"layer_i": (B, h, w, C) float32}).
    """
    wanted = set(range(1, len(blocks) + 1)) if layers is None else set(layers)
    bad = sorted(i for i in wanted if not 1 <= i <= len(blocks))
    if bad:
        raise ValueError(f"layers={sorted(wanted)}: {bad} outside 1..{len(blocks)}")
    maps = {}
    for i, block in enumerate(blocks, start=1):
        x = block(x, rope=rope)
        if i in wanted:
            maps[f"layer_{i}"] = tokens_to_maps(x[:, num_prefix:], grid)
    return x, maps


def create_abstract(build: Callable[[], nnx.Module]) -> nnx.Module:
    """Builds a module without computing its initial values (they are set by loading)."""
    return nnx.eval_shape(build)


def convert_by_rules(sd: Mapping[str, np.ndarray],
                     rules: Sequence[tuple[str, Callable]],
                     ignore: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Applies ``rules`` (regex, fn(match, value, out)) to every entry of ``sd``.

    An entry no rule matches and ``ignore`` does not name keeps its own name, so the
    strict assignment lists it as unexpected.
    """
    import re

    out: dict[str, np.ndarray] = {}
    compiled = [(re.compile(p), fn) for p, fn in rules]
    ignored = [re.compile(p) for p in ignore]
    for key, value in sd.items():
        for pattern, fn in compiled:
            m = pattern.fullmatch(key)
            if m:
                fn(m, np.asarray(value), out)
                break
        else:
            if not any(p.fullmatch(key) for p in ignored):
                out[key] = np.asarray(value)
    return out
