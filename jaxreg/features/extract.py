"""Foundation-model features of a volume pair, stage by stage.

The reference method (Gu et al., "Are Vision Foundation Models Ready for Out-of-the-Box
Medical Image Registration?", arXiv 2507.11569: features of a frozen pretrained 2D encoder,
matched by DINO-Reg/ConvexAdam instance optimisation, no training) as separate functions,
each replaceable:

1. :func:`normalise_intensity`: robust min-max of a volume to [0, 1] (percentile clipping,
   0.5 / 99.5 by default), one mapping for the whole volume so every slice sees the same
   intensity scale; optionally (:func:`render`, not in the reference) the encoder sees the
   image's gradient magnitude instead, an edge map that differs less between MRI
   sequences than their intensities do.
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
   Optionally (``upsample="guided"``, :mod:`jaxreg.features.upsample`) in-plane by a joint
   bilateral upsampling guided by each slice's normalised intensities.

Optionally (``shifts > 1``, :mod:`jaxreg.features.subtoken`) step 4 encodes each slice
``shifts**2`` times, shifted by fractions of a token, for maps ``shifts`` times denser;
and (``adapter``, :mod:`jaxreg.finetune.features`) the tokens go through a trained adapter
between steps 4 and 5.

:func:`pair_features` runs all of it for one pair, along one axis or all three (tri-planar)
and for one or several output maps (pyramid), with an optional on-disk cache of the encoded
tokens (:class:`FeatureCache`). It returns per output map a ``(fixed, moving)`` pair of
``(H, W, D, C)`` float32 feature volumes on the image grid, ready for
:func:`jaxreg.solver.convex_adam`.

A 2D image pair ``(H, W)`` is its own slice: each image is encoded once (no slicing along
an axis, no interpolation between slices), and the token maps are resized to the image's
pixels as in 3D, giving ``(H, W, C)`` feature images for the 2D solver.

The settings (:class:`FeatureConfig`) live in :mod:`jaxreg.features.config`, steps 3-4 and
the cache in :mod:`jaxreg.features.encoding`, step 5 in :mod:`jaxreg.features.pca`; this
module imports their names, so every step is reachable from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxreg.features import upsample as upsampling
from jaxreg.features.config import FeatureConfig
from jaxreg.features.encoding import FeatureCache, SliceEncoder
from jaxreg.features.intensity import choose_render, normalise_intensity, render
from jaxreg.features.pca import PCA, fit_pca, project

__all__ = ["SlicePlan", "slice_plan", "interpolation_matrix", "to_image_grid",
           "pair_features"]


# 1. intensities: jaxreg/features/intensity.py (normalise_intensity, render, foreground_mask)

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


# 3-5. encoding, through the cache; foreground tokens for the PCA -------------------------

def _encode(volume: np.ndarray, plan: SlicePlan, encoder: SliceEncoder,
            cache: FeatureCache | None) -> dict[str, np.ndarray]:
    """The tokens of the plan's encoded slices of ``volume``: from ``cache`` when it has
    them, else from ``encoder`` (then stored in ``cache``)."""
    slices = np.ascontiguousarray(np.moveaxis(volume, plan.axis, 0)[plan.encoded])
    return cache.encode(slices, encoder) if cache else encoder(slices)


def _token_mask(mask: np.ndarray, plan: SlicePlan, encoder: SliceEncoder,
                tokens: tuple[int, int], layer: str) -> np.ndarray:
    """Foreground fraction of each cell of map ``layer`` of the encoded slices,
    thresholded at 1/2."""
    sl = np.moveaxis(np.asarray(mask, np.float32), plan.axis, 0)[plan.encoded]
    scale = encoder.token_scale(sl.shape[1:], layer)
    frac = jax.image.scale_and_translate(
        jnp.asarray(sl), (sl.shape[0], *tokens), spatial_dims=(1, 2),
        scale=1.0 / jnp.asarray(scale, jnp.float32), translation=jnp.zeros(2),
        method="linear", antialias=True)
    return np.asarray(frac > 0.5, np.float32)


# 6-7. back on the image grid ------------------------------------------------------------

def to_image_grid(tokens: ArrayLike, plan: SlicePlan, shape: tuple[int, int, int], *,
                  pixels_per_token: tuple[float, float], guide: ArrayLike | None = None,
                  sigmas: tuple[float, float] = (1.0, 0.1)) -> jax.Array:
    """Encoded-slice token maps -> a feature volume on the image grid.

    Args:
      tokens: ``(m, th, tw, k)`` maps of the ``m`` encoded slices (``plan.encoded``).
      plan: the slicing.
      shape: the ``(H, W, D)`` image grid.
      pixels_per_token: slice pixels covered by one token along the two in-plane axes
        (:meth:`SliceEncoder.token_scale`).
      guide: ``(H, W, D)`` intensities in [0, 1]: when given, each slice's tokens go to
        pixels by joint bilateral upsampling guided by that slice
        (:func:`jaxreg.features.upsample.guided_slices`) instead of linearly.
      sigmas: the guided upsampling's spatial (tokens) and range (intensity) sigmas.

    Returns:
      ``(H, W, D, k)``: slices interpolated between encoded ones (zeros for dropped
      slices), tokens resized linearly to pixels with token ``j`` centred on pixel
      ``(j + 1/2) * pixels_per_token - 1/2``.
    """
    tokens = jnp.asarray(tokens, jnp.float32)
    full = jnp.einsum("nm,m...->n...", jnp.asarray(interpolation_matrix(plan)), tokens)
    if guide is not None:
        guides = jnp.moveaxis(jnp.asarray(guide, jnp.float32), plan.axis, 0)
        out = upsampling.guided_slices(full, guides, pixels_per_token=pixels_per_token,
                                       sigma_spatial=sigmas[0], sigma_range=sigmas[1])
        return jnp.moveaxis(out, 0, plan.axis)
    in_plane = tuple(s for i, s in enumerate(shape) if i != plan.axis)
    out = jax.image.scale_and_translate(
        full, (full.shape[0], *in_plane, full.shape[-1]), spatial_dims=(1, 2),
        scale=jnp.asarray(pixels_per_token, jnp.float32), translation=jnp.zeros(2),
        method="linear", antialias=True)
    return jnp.moveaxis(out, 0, plan.axis)


# the whole pair -------------------------------------------------------------------------

@contextlib.contextmanager
def _timed(times: dict[str, float], stage: str):
    """Adds the seconds the ``with`` block takes to ``times[stage]`` (nothing if it raises)."""
    start = time.perf_counter()
    yield
    times[stage] = times.get(stage, 0.0) + time.perf_counter() - start


def _pca_weights(plan: SlicePlan, encoder: SliceEncoder, grid: tuple[int, int], layer: str,
                 fixed_mask: ArrayLike | None, moving_mask: ArrayLike | None
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(fixed, moving)`` 0/1 token weights of one axis for the PCA, None without masks;
    when only one mask is given, it stands for both images."""
    fw = (_token_mask(fixed_mask, plan, encoder, grid, layer)
          if fixed_mask is not None else None)
    mw = (_token_mask(moving_mask, plan, encoder, grid, layer)
          if moving_mask is not None else None)
    if fw is None:
        fw = mw
    if mw is None:
        mw = fw
    return None if fw is None else (fw, mw)


def _fit_pcas(tokens: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence,
              config: FeatureConfig) -> list[PCA]:
    """A PCA per axis, fitted on that axis's fixed and moving tokens together; for
    ``"mean"`` fusion of several axes, one PCA fitted on all of them, shared."""
    def fit(axes):
        samples = [tokens[i][j] for i in axes for j in (0, 1)]
        w = None if weights[axes[0]] is None else [weights[i][j] for i in axes for j in (0, 1)]
        return fit_pca(samples, dims=config.pca_dims, weights=w, scale=config.scale)

    if config.fusion == "mean" and len(tokens) > 1:
        return [fit(list(range(len(tokens))))] * len(tokens)
    return [fit([i]) for i in range(len(tokens))]


def _fused_volumes(projected: Sequence[tuple[jax.Array, jax.Array]], plans: Sequence[SlicePlan],
                   encoder: SliceEncoder, shape: tuple[int, int, int], config: FeatureConfig,
                   layer: str, guides: tuple[np.ndarray, np.ndarray] | tuple[None, None]
                   ) -> tuple[jax.Array, jax.Array]:
    """Projected tokens of every axis on the image grid (guided by ``guides``, the
    ``(fixed, moving)`` intensities, when given), then fused across the axes:
    ``(fixed, moving)`` volumes, channels averaged (``"mean"``) or concatenated."""
    volumes = []
    sigmas = (config.guide_sigma_spatial, config.guide_sigma_range)
    for plan, (pf, pm) in zip(plans, projected):
        in_plane = tuple(s for i, s in enumerate(shape) if i != plan.axis)
        ppt = encoder.token_scale(in_plane, layer)
        volumes.append(tuple(to_image_grid(p, plan, shape, pixels_per_token=ppt, guide=g,
                                           sigmas=sigmas)
                             for p, g in zip((pf, pm), guides)))
    fusion = config.fusion
    if fusion == "mean":
        return tuple(sum(v[j] for v in volumes) / len(volumes) for j in (0, 1))
    return tuple(jnp.concatenate([v[j] for v in volumes], axis=-1) for j in (0, 1))


def _guides(fixed: ArrayLike, moving: ArrayLike, config: FeatureConfig
            ) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """``(fixed, moving)`` guidance of ``upsample="guided"``: the normalised intensities
    (whatever the encoder sees), as ``(H, W, D)`` volumes (a 2D image as one slice);
    ``(None, None)`` for linear upsampling."""
    if config.upsample != "guided":
        return None, None
    norm = [normalise_intensity(v, percentiles=config.percentiles) for v in (fixed, moving)]
    return tuple(g[..., None] if g.ndim == 2 else g for g in norm)


def _as_volumes(fixed: np.ndarray, moving: np.ndarray, fixed_mask, moving_mask,
                config: FeatureConfig):
    """Checks a (normalised) pair's grid; a 2D pair becomes one-slice volumes ``(H, W, 1)``
    sliced along axis 2 (the image itself, encoded once).

    Returns:
      ``(fixed, moving, fixed_mask, moving_mask, axes)``: the 3D arrays and the axes to slice.
    """
    if fixed.shape != moving.shape or fixed.ndim not in (2, 3):
        raise ValueError(f"fixed {fixed.shape} and moving {moving.shape} must be one "
                         "3-D grid, or one 2-D grid")
    if fixed.ndim == 3:
        return fixed, moving, fixed_mask, moving_mask, config.axes
    if len(config.axes) != 1:
        raise ValueError(f"a 2-D pair {fixed.shape} is its own slice: give one axis "
                         f"(FeatureConfig.axes=(2,), the default), got axes={config.axes}")
    if np.ptp(fixed) <= config.uniform_tolerance:
        raise ValueError(f"the fixed 2-D image {fixed.shape} is of uniform intensity")
    as_3d = lambda x: None if x is None else np.asarray(x)[..., None]
    return (as_3d(fixed), as_3d(moving), as_3d(fixed_mask), as_3d(moving_mask), (2,))


def _adapter(config: FeatureConfig, encoder: SliceEncoder):
    """The loaded ``config.adapter`` (checked against the encoder), or None."""
    if not config.adapter:
        return None
    from jaxreg.finetune.features import load_adapter  # optax only with an adapter

    adapter = load_adapter(config.adapter)
    if adapter.info.get("spec") not in (None, encoder.spec.name):
        raise ValueError(f"{config.adapter}: an adapter for encoder {adapter.encoder!r} "
                         f"({adapter.info.get('spec')}), not for {encoder.spec.name}")
    return adapter


def _rendered(fixed, moving, config: FeatureConfig, choices: dict | None, adapter=None):
    """The pair as the encoder sees it (``config.render``; ``"auto"`` decided here and
    reported in ``choices``: with an adapter, what it was trained on)."""
    kind = config.render
    if kind == "auto" and adapter is not None:
        kind = adapter.render
        if choices is not None:
            choices.update(render=kind, render_from="adapter")
    elif kind == "auto":
        kind, rho = choose_render(fixed, moving, percentiles=config.percentiles)
        if choices is not None:
            choices.update(render=kind, contrast_agreement=round(rho, 4))
    return tuple(render(v, kind, percentiles=config.percentiles) for v in (fixed, moving))


def pair_features(fixed: ArrayLike, moving: ArrayLike, encoder: SliceEncoder, *,
                  config: FeatureConfig = FeatureConfig(),
                  fixed_mask: ArrayLike | None = None, moving_mask: ArrayLike | None = None,
                  cache: FeatureCache | None = None,
                  timings: dict[str, float] | None = None, choices: dict | None = None
                  ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Feature volumes of a pair on one grid, per output map of the encoder.

    Args:
      fixed, moving: ``(H, W, D)`` images on one voxel grid (any intensity range), or
        two ``(H, W)`` images (each encoded once as its own slice).
      encoder: the slice encoder; its ``layers`` must include ``config.layers``.
      config: slicing, shifts, adapter, PCA, fusion and upsampling settings.
      fixed_mask, moving_mask: optional foreground masks; when given, PCA is fitted only
        on tokens mostly inside them.
      cache: reuse encoded tokens from disk.
      timings: if given, seconds spent are added under ``"slicing"``, ``"encoding"``,
        ``"pca"`` and ``"resizing"``.
      choices: receives what ``config`` left to the pair (``render="auto"``: ``"render"``
        and ``"contrast_agreement"``, :func:`jaxreg.features.intensity.choose_render`).

    Returns:
      ``{layer: (fixed_features, moving_features)}``, each ``(H, W, D, C)`` float32 with
      ``C = pca_dims`` (``3 * pca_dims`` for tri-planar ``"concat"``); 2D: ``(H, W, C)``.

    Raises:
      ValueError: the images are not one 3-D or 2-D grid; a 2-D pair with several axes;
        the fixed image (every slice along an axis) is of uniform intensity.
    """
    times = timings if timings is not None else {}
    encoder, adapter = encoder.with_shifts(config.shifts), _adapter(config, encoder)
    with _timed(times, "slicing"):
        guides = _guides(fixed, moving, config)
        fixed, moving = _rendered(fixed, moving, config, choices, adapter)
        two_d = fixed.ndim == 2
        fixed, moving, fixed_mask, moving_mask, axes = _as_volumes(
            fixed, moving, fixed_mask, moving_mask, config)
        plans = [slice_plan(fixed, axis=a, gap=config.gap, tolerance=config.uniform_tolerance)
                 for a in axes]

    with _timed(times, "encoding"):  # per axis: (fixed tokens, moving tokens) dicts
        encoded = [(_encode(fixed, plan, encoder, cache), _encode(moving, plan, encoder, cache))
                   for plan in plans]

    out = {}
    for layer in config.layers:
        with _timed(times, "pca"):
            tokens = [tuple(x[layer] if adapter is None else adapter(layer, x[layer])
                            for x in pair) for pair in encoded]
            weights = [_pca_weights(plan, encoder, f.shape[1:3], layer, fixed_mask, moving_mask)
                       for plan, (f, _) in zip(plans, tokens)]
            pcas = _fit_pcas(tokens, weights, config)
            projected = [(project(f, p), project(m, p)) for (f, m), p in zip(tokens, pcas)]
            jax.block_until_ready(projected)
        with _timed(times, "resizing"):
            pair = _fused_volumes(projected, plans, encoder, fixed.shape, config, layer, guides)
            out[layer] = jax.block_until_ready(
                tuple(v[:, :, 0] for v in pair) if two_d else pair)
    return out
