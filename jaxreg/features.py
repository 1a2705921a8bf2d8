"""Foundation-model features of a volume pair, stage by stage.

The reference method (Gu et al., "Are Vision Foundation Models Ready for Out-of-the-Box
Medical Image Registration?", arXiv 2507.11569: features of a frozen pretrained 2D encoder,
matched by DINO-Reg/ConvexAdam instance optimisation, no training) as separate functions,
each replaceable:

1. :func:`normalise_intensity`: robust min-max of a volume to [0, 1] (percentile clipping,
   0.5 / 99.5 by default), one mapping for the whole volume so every slice sees the same
   intensity scale.
2. :func:`slice_plan`: slices along an axis; slices of uniform intensity in the fixed image
   are dropped (in both images); every ``gap``-th remaining slice and the last one are
   encoded.
3. :func:`encoder_input`: each slice resized (linear, anti-aliased) to the encoder's input
   size (square, or longest side then zero padding as LiteMedSAM's preprocessing does),
   grey copied to 3 channels, the encoder's own scaling and mean/std.
4. :class:`SliceEncoder`: slices through the Flax encoder under ``jit`` in fixed-size chunks
   (one compilation per slice shape), any named output maps returned (the pyramid).
5. :func:`fit_pca` / :func:`project`: PCA fitted jointly on the moving and fixed tokens
   (optionally only tokens inside a foreground mask), in JAX.
6. :func:`interpolation_matrix`: features of slices not encoded are linear interpolations of
   their encoded neighbours. PCA is affine, so interpolating after the projection (cheap) is
   the same as before it (exact); the PCA itself is fitted on the encoded slices only.
7. :func:`to_image_grid`: the token maps resized back to the slice's pixels (linear; the
   token grid's geometry, padding included, is respected) and the slice axis put back.

:func:`pair_features` runs all of it for one pair, along one axis or all three (tri-planar)
and for one or several output maps (pyramid), with an optional on-disk cache of the encoded
tokens (:class:`FeatureCache`). It returns per output map a ``(fixed, moving)`` pair of
``(H, W, D, C)`` float32 feature volumes on the image grid, ready for
:func:`jaxreg.solver.convex_adam`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.typing import ArrayLike

from jaxreg import atomic
from jaxreg.encoders._base import EncoderSpec, Preprocessing

__all__ = [
    "FeatureConfig",
    "SlicePlan",
    "PCA",
    "normalise_intensity",
    "foreground_mask",
    "slice_plan",
    "interpolation_matrix",
    "encoder_input",
    "token_geometry",
    "SliceEncoder",
    "fit_pca",
    "project",
    "to_image_grid",
    "FeatureCache",
    "pair_features",
]


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """How features are made from a volume pair.

    Attributes:
      axes: slicing axes of the ``(H, W, D)`` volume; ``(2,)`` is the reference (slices
        along the third axis), ``(0, 1, 2)`` is tri-planar.
      fusion: how tri-planar features are fused: ``"concat"`` (a PCA per axis, channels
        concatenated: ``3 * pca_dims`` channels) or ``"mean"`` (one PCA basis fitted on the
        tokens of all three axes, the three projected volumes averaged).
      gap: encode every ``gap``-th slice (and the last); 1 encodes all.
      layers: encoder output maps to use (``"features"``: the reference's last layer).
      pca_dims: PCA channels per output map.
      image_size: encoder input side in pixels; 0 is the encoder's own.
      chunk: slices per encoder call; 0 chooses from the device memory.
      percentiles: intensity clipping of :func:`normalise_intensity`.
      uniform_tolerance: a slice whose normalised range is at most this is dropped.
      scale: divide PCA outputs by the standard deviation of the first component, so that
        the solver's similarity weight means the same for every encoder.
    """

    axes: tuple[int, ...] = (2,)
    fusion: str = "concat"
    gap: int = 6
    layers: tuple[str, ...] = ("features",)
    pca_dims: int = 3
    image_size: int = 0
    chunk: int = 0
    percentiles: tuple[float, float] = (0.5, 99.5)
    uniform_tolerance: float = 1e-6
    scale: bool = True

    def __post_init__(self):
        if not self.axes or any(a not in (0, 1, 2) for a in self.axes):
            raise ValueError(f"axes must be a non-empty subset of (0, 1, 2), got {self.axes}")
        if self.fusion not in ("concat", "mean"):
            raise ValueError(f"fusion must be 'concat' or 'mean', got {self.fusion!r}")
        if self.gap < 1 or self.pca_dims < 1 or not self.layers:
            raise ValueError(f"need gap >= 1, pca_dims >= 1 and some layers; got gap="
                             f"{self.gap}, pca_dims={self.pca_dims}, layers={self.layers}")


# 1. intensities ------------------------------------------------------------------------

def normalise_intensity(volume: ArrayLike, *,
                        percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clips a volume to two percentiles and scales it to [0, 1] (float32).

    A volume whose percentiles coincide falls back to its min and max; a constant volume
    becomes zeros.
    """
    volume = np.asarray(volume, np.float32)
    lo, hi = np.percentile(volume, percentiles)
    if hi <= lo:
        lo, hi = float(volume.min()), float(volume.max())
    return np.clip((volume - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def foreground_mask(volume: ArrayLike, *, threshold: float = 0.05,
                    percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Voxels brighter than ``threshold`` after :func:`normalise_intensity` (air is out).

    A cheap default for fitting the PCA on anatomy rather than on the background, which
    otherwise dominates the feature variance of skull-stripped or breast volumes.
    """
    return normalise_intensity(volume, percentiles=percentiles) > threshold


# 2. slices ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SlicePlan:
    """Which slices along ``axis`` are kept and which of those are encoded.

    Attributes:
      axis: slicing axis.
      kept: ``(n,)`` bool, slices that are not of uniform intensity.
      encoded: increasing indices of the slices sent to the encoder.
    """

    axis: int
    kept: np.ndarray
    encoded: np.ndarray


def slice_plan(fixed: ArrayLike, *, axis: int = 2, gap: int = 6,
               tolerance: float = 1e-6) -> SlicePlan:
    """Plans the slicing of a pair from its (normalised) fixed image.

    Slices whose intensity range is at most ``tolerance`` are dropped. Of the remaining
    slices, every ``gap``-th one (counting from the first) and the last one are encoded.

    Raises:
      ValueError: every slice is uniform.
    """
    fixed = np.moveaxis(np.asarray(fixed), axis, 0)
    flat = fixed.reshape(fixed.shape[0], -1)
    kept = (flat.max(axis=1) - flat.min(axis=1)) > tolerance
    idx = np.flatnonzero(kept)
    if idx.size == 0:
        raise ValueError(f"every slice along axis {axis} is of uniform intensity")
    encoded = np.unique(np.concatenate([idx[::gap], idx[-1:]]))
    return SlicePlan(axis=axis, kept=kept, encoded=encoded)


def interpolation_matrix(plan: SlicePlan) -> np.ndarray:
    """``(n, m)`` weights giving every slice from the ``m`` encoded ones.

    A kept slice between encoded slices ``a < i < b`` gets ``(b - i) / (b - a)`` of slice
    ``a`` and ``(i - a) / (b - a)`` of ``b``; an encoded slice is itself; dropped slices
    get zeros.
    """
    n, enc = plan.kept.size, plan.encoded
    weights = np.zeros((n, enc.size), np.float32)
    for i in np.flatnonzero(plan.kept):
        j = int(np.searchsorted(enc, i))
        if enc[j] == i:
            weights[i, j] = 1.0
        else:  # enc[j - 1] < i < enc[j]: the first and last kept slices are encoded
            a, b = enc[j - 1], enc[j]
            weights[i, j - 1] = (b - i) / (b - a)
            weights[i, j] = (i - a) / (b - a)
    return weights


# 3. encoder input -----------------------------------------------------------------------

def token_geometry(shape: tuple[int, int], preprocessing: Preprocessing, *, image_size: int,
                   patch_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a ``shape`` slice lands in the encoder input, in pixels and tokens.

    Returns:
      ``(resized, tokens)``: the slice's resized size in input pixels, and the number of
      token rows/columns that cover it (the rest of a padded input is left out).
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size "
                         f"{patch_size}")
    a, b = shape
    if preprocessing.resize == "square":
        resized = (image_size, image_size)
    elif preprocessing.resize == "longest_side_pad":
        s = image_size / max(a, b)
        resized = (max(1, round(a * s)), max(1, round(b * s)))
    else:
        raise ValueError(f"unknown resize mode {preprocessing.resize!r}")
    tokens = tuple(math.ceil(r / patch_size) for r in resized)
    return resized, tokens


def encoder_input(slices: ArrayLike, preprocessing: Preprocessing, *,
                  image_size: int) -> jax.Array:
    """``(B, h, w)`` slices in [0, 1] -> ``(B, S, S, 3)`` encoder input (``S = image_size``).

    Values go linearly to ``preprocessing.value_range``; the slice is resized (linear,
    anti-aliased when shrinking) to ``S x S``, or its longest side to ``S`` with zeros
    padded bottom/right; grey is copied to 3 channels and ``(x - mean) / std`` applied.
    """
    x = jnp.asarray(slices, jnp.float32)
    lo, hi = preprocessing.value_range
    x = lo + (hi - lo) * x
    (ra, rb), _ = token_geometry(x.shape[1:], preprocessing, image_size=image_size,
                                 patch_size=1)
    x = jax.image.resize(x, (x.shape[0], ra, rb), method="linear", antialias=True)
    x = jnp.pad(x, ((0, 0), (0, image_size - ra), (0, image_size - rb)))
    mean = jnp.asarray(preprocessing.mean, jnp.float32)
    std = jnp.asarray(preprocessing.std, jnp.float32)
    return (x[..., None] - mean) / std


# 4. encoding ----------------------------------------------------------------------------

def _auto_chunk(spec: EncoderSpec, image_size: int) -> int:
    """Slices per call so that activations stay within ~1/4 of the device memory."""
    device = jax.devices()[0]
    try:
        budget = device.memory_stats()["bytes_limit"] / 4
    except (AttributeError, KeyError, TypeError, RuntimeError):
        return 4  # host: batches gain the CPU nothing but memory
    cfg = spec.config
    tokens = (image_size // spec.patch_size) ** 2
    width = getattr(cfg, "hidden_size", None) or getattr(cfg, "embed_dim", None) or 256
    heads = getattr(cfg, "num_heads", 0)
    heads = heads if isinstance(heads, int) else 0  # TinyViT: windowed attention only
    per_slice = 4 * (32 * tokens * width + 2 * heads * tokens ** 2 + 8 * image_size ** 2)
    return int(max(1, min(64, budget // per_slice)))


@functools.partial(jax.jit, static_argnames=("graphdef", "preprocessing", "patch_size",
                                             "layers", "image_size"))
def _encode_chunk(state, slices, *, graphdef, preprocessing, patch_size, layers, image_size):
    """Preprocesses and encodes a chunk of slices (compiled once per architecture and shape,
    shared by every :class:`SliceEncoder` of that architecture)."""
    _, tokens = token_geometry(slices.shape[1:], preprocessing, image_size=image_size,
                               patch_size=patch_size)
    out = nnx.merge(graphdef, state)(encoder_input(slices, preprocessing, image_size=image_size))
    missing = [k for k in layers if k not in out]
    if missing:
        raise ValueError(f"the encoder has no output {missing}; it has {sorted(out)}")
    return {k: out[k][:, :tokens[0], :tokens[1]].astype(jnp.float32) for k in layers}


class SliceEncoder:
    """A frozen encoder applied to raw slices: preprocessing, the model, chosen outputs.

    Args:
      model: an encoder NNX module (``jaxreg.encoders.*``) returning a dict of maps.
      spec: its :class:`~jaxreg.encoders._base.EncoderSpec`.
      layers: names of the output maps to return.
      image_size: input side in pixels (0: ``spec.preprocessing.image_size``).
      chunk: slices per call (0: from the device memory, 4 on a CPU); the last chunk is
        padded, so one slice shape compiles once (fewer slices than a chunk use the next
        power of two).
      name: identifies the weights in cache keys (e.g. encoder name and checkpoint path).
      devices: several devices: each chunk of slices is sharded over them (the weights
        replicated), the chunk rounded up to a multiple of their number.
    """

    def __init__(self, model: nnx.Module, spec: EncoderSpec, *, layers: Sequence[str],
                 image_size: int = 0, chunk: int = 0, name: str = "",
                 devices: Sequence[jax.Device] | None = None):
        self.spec = spec
        self.layers = tuple(layers)
        self.image_size = image_size or spec.preprocessing.image_size
        self.chunk = chunk or _auto_chunk(spec, self.image_size)
        self.name = name or spec.name
        self.calls = 0  # encoder invocations (slices), for tests and logs
        self._graphdef, self._state = nnx.split(model)
        self._sharding = None
        if devices is not None and len(devices) > 1:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("slices",))
            P = jax.sharding.PartitionSpec
            self._sharding = jax.sharding.NamedSharding(mesh, P("slices"))
            self._state = jax.device_put(self._state, jax.sharding.NamedSharding(mesh, P()))
            self.chunk = -(-self.chunk // len(devices)) * len(devices)

    def _apply(self, state, slices):
        return _encode_chunk(state, slices, graphdef=self._graphdef,
                             preprocessing=self.spec.preprocessing,
                             patch_size=self.spec.patch_size, layers=self.layers,
                             image_size=self.image_size)

    def key(self) -> str:
        """What the features depend on besides the slices (for :class:`FeatureCache`)."""
        return json.dumps([self.name, self.spec.name, self.image_size, list(self.layers)])

    def __call__(self, slices: ArrayLike) -> dict[str, np.ndarray]:
        """``(m, h, w)`` slices in [0, 1] -> ``{layer: (m, th, tw, C)}`` float32 numpy."""
        slices = np.asarray(slices, np.float32)
        m = slices.shape[0]
        c = min(self.chunk, 1 << (m - 1).bit_length())  # few slices: a power-of-2 chunk
        if self._sharding is not None:
            n = self._sharding.mesh.size
            c = -(-c // n) * n
        pad = (-m) % c
        padded = np.concatenate([slices, np.repeat(slices[-1:], pad, axis=0)]) if pad else slices
        chunks = [padded[i:i + c] for i in range(0, m + pad, c)]
        if self._sharding is not None:
            chunks = [jax.device_put(x, self._sharding) for x in chunks]
        parts = [self._apply(self._state, x) for x in chunks]
        self.calls += m
        return {k: np.concatenate([np.asarray(p[k]) for p in parts])[:m] for k in self.layers}

    def token_scale(self, shape: tuple[int, int]) -> tuple[float, float]:
        """Slice pixels per token along each in-plane axis (for :func:`to_image_grid`)."""
        resized, _ = token_geometry(shape, self.spec.preprocessing, image_size=self.image_size,
                                    patch_size=self.spec.patch_size)
        p = self.spec.patch_size
        return p * shape[0] / resized[0], p * shape[1] / resized[1]


# 5. PCA ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PCA:
    """A fitted PCA: ``project(x) = (x - mean) @ components / scale``."""

    mean: jax.Array  # (C,)
    components: jax.Array  # (C, k), unit columns, largest variance first
    variances: jax.Array  # (k,)
    scale: float = 1.0


@jax.jit
def _moments(x, w):
    return jnp.sum(w), w @ x


@jax.jit
def _scatter(x, w, mean):
    xc = (x - mean) * jnp.sqrt(w)[:, None]
    return xc.T @ xc


def fit_pca(samples: Sequence[ArrayLike], *, dims: int,
            weights: Sequence[ArrayLike] | None = None, scale: bool = True) -> PCA:
    """Principal components of the rows of several ``(N_i, C)`` arrays together.

    The mean and covariance are accumulated block by block (two passes, float32), then
    ``jnp.linalg.eigh`` of the ``C x C`` covariance. Signs are fixed so that each
    component's entry of largest magnitude is positive.

    Args:
      samples: blocks of feature rows (e.g. the fixed and moving tokens).
      dims: components kept (at most ``C``).
      weights: per-row weights of each block (e.g. a 0/1 foreground mask); None: all 1.
      scale: set :attr:`PCA.scale` to the first component's standard deviation.

    Raises:
      ValueError: no row has weight, or ``dims`` exceeds the channel count.
    """
    samples = [jnp.asarray(s, jnp.float32).reshape(-1, np.shape(s)[-1]) for s in samples]
    c = samples[0].shape[-1]
    if dims > c:
        raise ValueError(f"PCA to {dims} dims from {c} channels")
    if weights is None:
        weights = [jnp.ones(s.shape[0], jnp.float32) for s in samples]
    weights = [jnp.asarray(w, jnp.float32).reshape(-1) for w in weights]
    count, total = 0.0, jnp.zeros(c, jnp.float32)
    for s, w in zip(samples, weights):
        n, t = _moments(s, w)
        count, total = count + n, total + t
    if float(count) <= 0:
        raise ValueError("PCA: no sample inside the mask")
    mean = total / count
    cov = sum(_scatter(s, w, mean) for s, w in zip(samples, weights)) / count
    values, vectors = jnp.linalg.eigh(cov)
    values, vectors = values[::-1][:dims], vectors[:, ::-1][:, :dims]
    pick = jnp.argmax(jnp.abs(vectors), axis=0)
    vectors = vectors * jnp.sign(vectors[pick, jnp.arange(dims)])
    values = jnp.maximum(values, 0.0)
    s = float(jnp.sqrt(values[0])) if scale and float(values[0]) > 0 else 1.0
    return PCA(mean=mean, components=vectors, variances=values, scale=s)


def project(x: ArrayLike, pca: PCA) -> jax.Array:
    """``(..., C)`` features -> ``(..., k)`` principal components (scaled)."""
    return (jnp.asarray(x, jnp.float32) - pca.mean) @ pca.components / pca.scale


# 6-7. back on the image grid ------------------------------------------------------------

def to_image_grid(tokens: ArrayLike, plan: SlicePlan, shape: tuple[int, int, int], *,
                  pixels_per_token: tuple[float, float]) -> jax.Array:
    """Encoded-slice token maps -> a feature volume on the image grid.

    Args:
      tokens: ``(m, th, tw, k)`` maps of the ``m`` encoded slices (``plan.encoded``).
      plan: the slicing.
      shape: the ``(H, W, D)`` image grid.
      pixels_per_token: slice pixels covered by one token along the two in-plane axes
        (:meth:`SliceEncoder.token_scale`).

    Returns:
      ``(H, W, D, k)``: slices interpolated between encoded ones (zeros for dropped
      slices), tokens resized linearly to pixels with token ``j`` centred on pixel
      ``(j + 1/2) * pixels_per_token - 1/2``.
    """
    tokens = jnp.asarray(tokens, jnp.float32)
    full = jnp.einsum("nm,m...->n...", jnp.asarray(interpolation_matrix(plan)), tokens)
    in_plane = tuple(s for i, s in enumerate(shape) if i != plan.axis)
    out = jax.image.scale_and_translate(
        full, (full.shape[0], *in_plane, full.shape[-1]), spatial_dims=(1, 2),
        scale=jnp.asarray(pixels_per_token, jnp.float32), translation=jnp.zeros(2),
        method="linear", antialias=True)
    return jnp.moveaxis(out, 0, plan.axis)


def _token_mask(mask: np.ndarray, plan: SlicePlan, encoder: SliceEncoder,
                tokens: tuple[int, int]) -> np.ndarray:
    """Foreground fraction of each token of the encoded slices, thresholded at 1/2."""
    sl = np.moveaxis(np.asarray(mask, np.float32), plan.axis, 0)[plan.encoded]
    scale = encoder.token_scale(sl.shape[1:])
    frac = jax.image.scale_and_translate(
        jnp.asarray(sl), (sl.shape[0], *tokens), spatial_dims=(1, 2),
        scale=1.0 / jnp.asarray(scale, jnp.float32), translation=jnp.zeros(2),
        method="linear", antialias=True)
    return np.asarray(frac > 0.5, np.float32)


# caching --------------------------------------------------------------------------------

class FeatureCache:
    """Encoded tokens on disk (safetensors), keyed by slice content and encoder settings.

    Args:
      directory: cache folder (created on first write).
    """

    def __init__(self, directory: str):
        self.directory = directory

    def path(self, slices: np.ndarray, encoder: SliceEncoder) -> str:
        h = hashlib.sha256()
        h.update(encoder.key().encode())
        h.update(str(slices.shape).encode())
        h.update(np.ascontiguousarray(slices, np.float32).tobytes())
        return os.path.join(self.directory, h.hexdigest()[:32] + ".safetensors")

    def load(self, path: str, layers: Sequence[str]) -> dict[str, np.ndarray] | None:
        if not os.path.isfile(path):
            return None
        from safetensors.numpy import load_file

        try:
            data = load_file(path)
        except Exception as e:  # a damaged entry is recomputed, not fatal
            logging.warning("feature cache %s unreadable (%s); re-encoding", path, e)
            return None
        return data if all(k in data for k in layers) else None

    def save(self, path: str, features: Mapping[str, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        os.makedirs(self.directory, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in features.items()}, tmp)


def _encode(volume: np.ndarray, plan: SlicePlan, encoder: SliceEncoder,
            cache: FeatureCache | None) -> dict[str, np.ndarray]:
    slices = np.ascontiguousarray(np.moveaxis(volume, plan.axis, 0)[plan.encoded])
    path = cache.path(slices, encoder) if cache else None
    if path:
        hit = cache.load(path, encoder.layers)
        if hit is not None:
            logging.info("features from cache %s", path)
            return {k: hit[k] for k in encoder.layers}
    features = encoder(slices)
    if path:
        cache.save(path, features)
    return features


# the whole pair -------------------------------------------------------------------------

def pair_features(fixed: ArrayLike, moving: ArrayLike, encoder: SliceEncoder, *,
                  config: FeatureConfig = FeatureConfig(),
                  fixed_mask: ArrayLike | None = None, moving_mask: ArrayLike | None = None,
                  cache: FeatureCache | None = None,
                  timings: dict[str, float] | None = None
                  ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Feature volumes of a pair on one grid, per output map of the encoder.

    Args:
      fixed, moving: ``(H, W, D)`` images on one voxel grid (any intensity range).
      encoder: the slice encoder; its ``layers`` must include ``config.layers``.
      config: slicing, PCA and fusion settings.
      fixed_mask, moving_mask: optional foreground masks; when given, PCA is fitted only
        on tokens mostly inside them.
      cache: reuse encoded tokens from disk.
      timings: if given, seconds spent are added under ``"slicing"``, ``"encoding"``,
        ``"pca"`` and ``"resizing"``.

    Returns:
      ``{layer: (fixed_features, moving_features)}``, each ``(H, W, D, C)`` float32 with
      ``C = pca_dims`` (``3 * pca_dims`` for tri-planar ``"concat"``).
    """
    times = timings if timings is not None else {}
    clock = time.perf_counter

    def add(stage, start):
        times[stage] = times.get(stage, 0.0) + clock() - start

    t = clock()
    fixed = normalise_intensity(fixed, percentiles=config.percentiles)
    moving = normalise_intensity(moving, percentiles=config.percentiles)
    if fixed.shape != moving.shape or fixed.ndim != 3:
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must be one 3-D grid")
    plans = [slice_plan(fixed, axis=a, gap=config.gap, tolerance=config.uniform_tolerance)
             for a in config.axes]
    add("slicing", t)

    encoded = []  # per axis: (fixed tokens, moving tokens) dicts
    for plan in plans:
        t = clock()
        encoded.append((_encode(fixed, plan, encoder, cache), _encode(moving, plan, encoder, cache)))
        add("encoding", t)

    out = {}
    for layer in config.layers:
        t = clock()
        weights = []
        for plan, (f, m) in zip(plans, encoded):
            grid = f[layer].shape[1:3]
            fw = _token_mask(fixed_mask, plan, encoder, grid) if fixed_mask is not None else None
            mw = _token_mask(moving_mask, plan, encoder, grid) if moving_mask is not None else None
            if fw is None and mw is not None:
                fw = mw
            if mw is None and fw is not None:
                mw = fw
            weights.append(None if fw is None else (fw, mw))

        def fit(axes):
            samples = [encoded[i][j][layer] for i in axes for j in (0, 1)]
            w = None if weights[axes[0]] is None else [weights[i][j] for i in axes for j in (0, 1)]
            return fit_pca(samples, dims=config.pca_dims, weights=w, scale=config.scale)

        if config.fusion == "mean" and len(plans) > 1:
            shared = fit(list(range(len(plans))))
            pcas = [shared] * len(plans)
        else:
            pcas = [fit([i]) for i in range(len(plans))]
        projected = [(project(f[layer], p), project(m[layer], p))
                     for (f, m), p in zip(encoded, pcas)]
        jax.block_until_ready(projected)
        add("pca", t)

        t = clock()
        volumes = []
        for plan, (pf, pm) in zip(plans, projected):
            in_plane = tuple(s for i, s in enumerate(fixed.shape) if i != plan.axis)
            ppt = encoder.token_scale(in_plane)
            volumes.append(tuple(to_image_grid(p, plan, fixed.shape, pixels_per_token=ppt)
                                 for p in (pf, pm)))
        if config.fusion == "mean":
            fused = tuple(sum(v[j] for v in volumes) / len(volumes) for j in (0, 1))
        else:
            fused = tuple(jnp.concatenate([v[j] for v in volumes], axis=-1) for j in (0, 1))
        out[layer] = jax.block_until_ready(fused)
        add("resizing", t)
    return out
