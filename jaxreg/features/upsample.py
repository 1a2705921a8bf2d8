"""Guided upsampling of token maps to pixels: a training-free joint bilateral upsampling.

An encoder's token map is coarse (one token per 4 to 16 slice pixels), and resizing it
linearly blurs every organ boundary over a token or two. Joint bilateral upsampling
(Kopf et al. 2007; the JBU of FeatUp, Fu et al. 2024, without its learned parts) lets
the image itself say where the boundaries are: each output pixel averages the nearby
tokens, weighted by how close each token is *and* by how similar the image intensity
at that token is to the intensity at the pixel, so features do not leak across an
intensity edge.

The maths, for one slice. Token ``(a, b)`` of the ``(th, tw, C)`` map ``F`` is centred on
slice pixel ``((a + 1/2) p_y - 1/2, (b + 1/2) p_x - 1/2)`` (``p``: slice pixels per token,
the convention of :func:`jaxreg.features.to_image_grid`), so output pixel ``(u, v)`` lies
at token coordinates ``c = ((u + 1/2) / p_y - 1/2, (v + 1/2) / p_x - 1/2)``. With ``I`` the
guidance image (intensities in [0, 1]) and ``G`` its area average over each token's cell
(``[a p_y, (a + 1) p_y) x [b p_x, (b + 1) p_x)`` slice pixels, the part inside the slice),

    out(u, v) = sum_n w_n F[n] / sum_n w_n,
    w_n = exp(-|c - n|^2 / (2 sigma_s^2)) * exp(-(I(u, v) - G[n])^2 / (2 sigma_r^2)),

over the tokens ``n`` of the ``(2 R + 1)^2`` window centred on the token nearest ``c``
(``R = ceil(2 sigma_s)``, at least 1; tokens outside the map are left out). ``sigma_s`` is
in tokens, ``sigma_r`` in guidance intensity. ``sigma_r -> inf`` leaves a Gaussian-weighted
interpolation of the tokens; a constant map stays exactly constant, as the sum is taken
relative to the nearest token (``F[n0] + sum w (F[n] - F[n0]) / sum w``) and the weights
are scaled by their largest one (no underflow to 0/0 when every token's intensity is far
from the pixel's).

Everything is a pure function of arrays and static geometry: jittable, one slice at a
time (:func:`guided_upsample`) or a stack of them (:func:`guided_slices`, a ``vmap``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["window_radius", "area_matrix", "guided_upsample", "guided_slices"]


def window_radius(sigma_spatial: float) -> int:
    """``R``: the window spans ``2 R + 1`` tokens per axis, two spatial sigmas each side."""
    return max(1, math.ceil(2 * sigma_spatial))


def area_matrix(pixels: int, tokens: int, pixels_per_token: float) -> np.ndarray:
    """``(tokens, pixels)`` area averaging: row ``a`` holds the overlap of each pixel
    ``[u, u + 1)`` with the cell ``[a p, (a + 1) p)``, normalised over the slice (a cell
    partly past the slice's end averages the part inside it)."""
    edges = np.arange(pixels + 1, dtype=np.float64)
    lo = np.arange(tokens)[:, None] * pixels_per_token
    overlap = np.clip(np.minimum(edges[None, 1:], lo + pixels_per_token)
                      - np.maximum(edges[None, :-1], lo), 0.0, None)
    return (overlap / np.maximum(overlap.sum(1, keepdims=True), 1e-12)).astype(np.float32)


def _neighbours(pixels: int, tokens: int, pixels_per_token: float, radius: int):
    """Per output pixel along one axis: its token coordinate ``(pixels,)``, the nearest
    token plus each window offset ``(pixels, 2 R + 1)`` (clipped into the map) and
    whether that neighbour exists."""
    c = (np.arange(pixels) + 0.5) / pixels_per_token - 0.5
    index = np.round(c).astype(np.int64)[:, None] + np.arange(-radius, radius + 1)[None]
    valid = (index >= 0) & (index < tokens)
    return c.astype(np.float32), np.clip(index, 0, tokens - 1), valid


def _log_weights(guide, low, rows, cols, sigma_spatial, sigma_range):
    """``(h, w, K, K)`` log of the window's weights (``-inf`` for absent tokens)."""
    (cy, iy, vy), (cx, ix, vx) = rows, cols
    dy = (cy[:, None] - iy) ** 2  # (h, K)
    dx = (cx[:, None] - ix) ** 2  # (w, K)
    spatial = -(dy[:, None, :, None] + dx[None, :, None, :]) / (2 * sigma_spatial ** 2)
    at_tokens = low[iy][:, :, ix]  # (h, K, w, K)
    diff = guide[:, None, :, None] - at_tokens
    range_ = -(diff.transpose(0, 2, 1, 3) ** 2) / (2 * sigma_range ** 2)
    valid = vy[:, None, :, None] & vx[None, :, None, :]
    return jnp.where(valid, spatial + range_, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("pixels_per_token", "shape", "sigma_spatial",
                                             "sigma_range"))
def guided_upsample(tokens: jax.Array, guide: jax.Array, *,
                    pixels_per_token: tuple[float, float], shape: tuple[int, int],
                    sigma_spatial: float = 1.0, sigma_range: float = 0.1) -> jax.Array:
    """One slice's token map ``(th, tw, C)`` -> ``(h, w, C)`` pixels, guided by ``guide``.

    Args:
      tokens: the token map (``th x tw`` cells of ``pixels_per_token`` slice pixels).
      guide: ``(h, w)`` guidance intensities in [0, 1] (the slice's normalised image).
      pixels_per_token: slice pixels per token along the two axes.
      shape: ``(h, w)``, the slice's pixels (static, the guide's shape).
      sigma_spatial: spatial Gaussian's sigma, in tokens.
      sigma_range: range Gaussian's sigma, in guidance intensity (``inf``: none).

    Returns:
      ``(h, w, C)`` float32, the module docstring's ``out``.
    """
    (h, w), (th, tw) = shape, tokens.shape[:2]
    radius = window_radius(sigma_spatial)
    tokens = jnp.asarray(tokens, jnp.float32)
    guide = jnp.asarray(guide, jnp.float32)
    low = (jnp.asarray(area_matrix(h, th, pixels_per_token[0])) @ guide
           @ jnp.asarray(area_matrix(w, tw, pixels_per_token[1])).T)
    rows = _neighbours(h, th, pixels_per_token[0], radius)
    cols = _neighbours(w, tw, pixels_per_token[1], radius)
    logw = _log_weights(guide, low, rows, cols, sigma_spatial, sigma_range)
    weights = jnp.exp(logw - logw.max(axis=(2, 3), keepdims=True))  # (h, w, K, K)
    iy, ix = rows[1], cols[1]
    anchor = tokens[iy[:, radius]][:, ix[:, radius]]  # the nearest token, (h, w, C)
    total = jnp.zeros_like(anchor)
    for a in range(2 * radius + 1):  # one window offset at a time: memory of one (h, w, C)
        for b in range(2 * radius + 1):
            neighbour = tokens[iy[:, a]][:, ix[:, b]]
            total = total + weights[:, :, a, b, None] * (neighbour - anchor)
    return anchor + total / weights.sum(axis=(2, 3))[..., None]


def guided_slices(tokens: jax.Array, guides: jax.Array, *,
                  pixels_per_token: tuple[float, float], sigma_spatial: float = 1.0,
                  sigma_range: float = 0.1, batch: int = 16) -> jax.Array:
    """:func:`guided_upsample` of a stack: ``(n, th, tw, C)`` maps and ``(n, h, w)``
    guides -> ``(n, h, w, C)``, each slice guided by its own image (``vmap`` over
    ``batch`` slices at a time: the window's weights are ``(2 R + 1)^2`` floats a pixel)."""
    upsample = functools.partial(
        guided_upsample, pixels_per_token=tuple(float(p) for p in pixels_per_token),
        shape=tuple(guides.shape[1:]), sigma_spatial=float(sigma_spatial),
        sigma_range=float(sigma_range))
    pairs = (jnp.asarray(tokens, jnp.float32), jnp.asarray(guides, jnp.float32))
    return jax.lax.map(lambda tg: upsample(*tg), pairs, batch_size=min(batch, guides.shape[0]))
