"""Pieces of the SAM2 Hiera image encoder (:mod:`jaxreg.encoders.hiera`).

Multi-scale blocks (windowed or global attention, with a 2x2 max pooling of the queries
and a change of width and heads at the first block of a stage), the FPN neck, PyTorch's
bicubic resize of the background position embedding as a matrix, and the check of a
Hugging Face folder's ``config.json`` against the architecture.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders._sam_parts import window_partition, window_unpartition
from jaxreg.encoders.checkpoint import CheckpointError, resolve_checkpoint

__all__ = ["bicubic_matrix", "max_pool", "MultiScaleAttention", "MultiScaleBlock", "FpnNeck",
           "check_folder"]


def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    """Keys' cubic convolution weights of the 4 taps around a point at fraction ``t``, with
    PyTorch's ``a = -0.75`` (``jax.image.resize``'s cubic uses -0.5)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``(out_size, in_size)`` matrix of ``F.interpolate(mode="bicubic")`` along one axis.

    PyTorch's convention: ``align_corners=False`` (half-pixel centres, the source position
    not clamped), taps outside the input clamped to its edge, no anti-aliasing.

    Args:
      in_size: input length.
      out_size: output length.

    Returns:
      float32 matrix; ``matrix @ x`` resizes ``x`` along its first axis.
    """
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        start = math.floor(src)
        for k, w in enumerate(_cubic_weights(src - start)):
            m[o, min(max(start - 1 + k, 0), in_size - 1)] += w
    return m.astype(np.float32)


def max_pool(x: jax.Array, stride: tuple[int, int]) -> jax.Array:
    """``(B, H, W, C)`` max pooling, kernel = stride, remainders dropped (``ceil_mode=False``)."""
    b, h, w, c = x.shape
    sh, sw = stride
    h2, w2 = h // sh, w // sw
    return x[:, :h2 * sh, :w2 * sw].reshape(b, h2, sh, w2, sw, c).max(axis=(2, 4))


class MultiScaleAttention(nnx.Module):
    """Multi-head attention over a ``(B, h, w, C)`` grid; the queries optionally max-pooled."""

    def __init__(self, dim: int, dim_out: int, *, num_heads: int,
                 q_stride: tuple[int, int] | None, dtype, rngs: nnx.Rngs):
        """Args:
          dim: input width.
          dim_out: output width (of q, k, v and the projection).
          num_heads: heads.
          q_stride: pooling of the queries (the first block of a stage), or None.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nnx.Linear(dim, 3 * dim_out, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim_out, dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, nh, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, hd)
        if self.q_stride:
            q = max_pool(q.reshape(b, h, w, -1), self.q_stride)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, nh, -1)
        hd = q.shape[-1]
        logits = jnp.einsum("bqnd,bknd->bnqk", q * (hd ** -0.5), k)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, h, w, -1)
        return self.proj(out)


class Mlp(nnx.Module):
    """Two linear layers with an exact (erf) GELU between (SAM2's ``MLP``, ``num_layers=2``)."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs),
                                nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers[1](jax.nn.gelu(self.layers[0](x), approximate=False))


class MultiScaleBlock(nnx.Module):
    """Hiera block: pre-norm attention (windowed, ``window_size`` 0: global) and MLP.

    The first block of a stage widens ``dim`` to ``dim_out`` (its shortcut through a linear
    projection of the normed input) and, at a pooling stage, max-pools the queries and the
    shortcut by ``q_stride``; its windows are those of the previous stage, halved on output.
    """

    def __init__(self, dim: int, dim_out: int, *, num_heads: int, window_size: int,
                 q_stride: tuple[int, int] | None, mlp_ratio: float, eps: float, dtype,
                 rngs: nnx.Rngs):
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads=num_heads, q_stride=q_stride,
                                        dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim_out, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim_out, dtype=dtype, rngs=rngs) if dim != dim_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.q_stride:
                shortcut = max_pool(shortcut, self.q_stride)
        window = self.window_size
        if window > 0:
            size = x.shape[1:3]
            x, padded = window_partition(x, window)
        x = self.attn(x)
        if window > 0:
            if self.q_stride:  # the windows shrank with the queries
                window //= self.q_stride[0]
                size = shortcut.shape[1:3]
                padded = tuple(s + (-s) % window for s in size)
            x = window_unpartition(x, window, padded, size)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class FpnNeck(nnx.Module):
    """SAM2's FPN neck: a 1x1 conv per stage to ``dim`` channels, plus nearest-upsampled
    top-down features at the stages in ``top_down_levels`` (0-based, shallow to deep).

    ``convs[j]`` is the lateral conv of stage ``n - j`` (deepest first), as in the
    reference's ``backbone_channel_list`` order.
    """

    def __init__(self, channels: tuple[int, ...], dim: int, *,
                 top_down_levels: tuple[int, ...], dtype, rngs: nnx.Rngs):
        """Args:
          channels: widths of the stages, shallow to deep.
          dim: output channels of every level.
          top_down_levels: stages (0-based) whose level adds the deeper level, upsampled.
          dtype: compute dtype.
          rngs: random keys for initialisation.
        """
        self.top_down_levels = tuple(top_down_levels)
        self.convs = nnx.List([nnx.Conv(c, dim, (1, 1), dtype=dtype, rngs=rngs)
                               for c in channels[::-1]])

    def __call__(self, stages: list[jax.Array]) -> list[jax.Array]:
        """Args:
          stages: the stage outputs, shallow to deep, each ``(B, h, w, C_i)``.

        Returns:
          One ``(B, h, w, dim)`` level per stage, shallow to deep.
        """
        n = len(self.convs) - 1
        levels: list[jax.Array | None] = [None] * (n + 1)
        prev = None
        for i in range(n, -1, -1):
            lateral = self.convs[n - i](stages[i])
            if i in self.top_down_levels and prev is not None:
                prev = lateral + jnp.repeat(jnp.repeat(prev, 2, axis=1), 2, axis=2)
            else:
                prev = lateral
            levels[i] = prev
        return levels


# transformers' Sam2HieraDetConfig / Sam2VisionConfig defaults of the fields compared.
_BACKBONE_DEFAULTS = dict(
    hidden_size=96, num_attention_heads=1, blocks_per_stage=[1, 2, 7, 2],
    embed_dim_per_stage=[96, 192, 384, 768],
    num_attention_heads_per_stage=[1, 2, 4, 8], window_size_per_stage=[8, 4, 14, 7],
    global_attention_blocks=[5, 7, 9], window_positional_embedding_background_size=[7, 7],
    num_query_pool_stages=3, query_stride=[2, 2], patch_kernel_size=[7, 7],
    patch_stride=[4, 4], patch_padding=[3, 3], mlp_ratio=4.0, hidden_act="gelu",
    layer_norm_eps=1e-6)
_NECK_DEFAULTS = dict(backbone_channel_list=[768, 384, 192, 96], fpn_hidden_size=256,
                      fpn_kernel_size=1, fpn_stride=1, fpn_padding=0, fpn_top_down_levels=[2, 3],
                      num_feature_levels=3)


def _same(a: object, b: object) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _mismatches(data: dict, backbone: dict, neck: dict) -> list[str]:
    if isinstance(data.get("vision_config"), dict):  # a whole Sam2Model
        data = data["vision_config"]
    model_type = data.get("model_type")
    if model_type not in (None, "sam2_vision_model"):
        return [f"model_type {model_type!r} (the variant: 'sam2_vision_model' or 'sam2')"]
    have_backbone = data.get("backbone_config") or {}
    problems = []
    for fields, have, defaults in ((backbone, have_backbone, _BACKBONE_DEFAULTS),
                                   (neck, data, _NECK_DEFAULTS)):
        for name, want in fields.items():
            value = have.get(name, defaults[name])
            if value is not None and not _same(value, want):
                problems.append(f"{name} {value!r} (the variant: {want!r})")
    return problems


def check_folder(path: str | os.PathLike, backbone: dict, neck: dict) -> None:
    """Refuses a Hugging Face folder whose ``config.json`` describes another architecture.

    Args:
      path: the folder given to the loader (model folder or offline cache folder); its
        ``config.json`` is read beside the weights the loader picks. No file: no check.
      backbone: expected ``backbone_config`` fields (transformers' names).
      neck: expected ``vision_config`` fields of the neck.

    Raises:
      CheckpointError: naming the file and every field that differs.
    """
    file = os.path.join(os.path.dirname(resolve_checkpoint(path)[0]), "config.json")
    if not os.path.isfile(file):
        return
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable JSON file ({e})") from e
    problems = _mismatches(data, backbone, neck) if isinstance(data, dict) else ["not an object"]
    if problems:
        raise CheckpointError(f"{file} describes another model than the SAM2 variant asked "
                              "for: " + "; ".join(problems))
