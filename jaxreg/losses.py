"""Image and feature similarity losses: pure functions of two volumes, lower is better.

Each takes ``(H, W, D)`` or channels-last ``(H, W, D, C)`` volumes and an optional
``mask`` ``(H, W, D)`` of weights (1 inside, 0 outside: padding, background), and
returns a scalar. Compose them freely with :mod:`jaxreg.regularisers` and
:func:`jaxreg.warping.warp`::

    loss = ssd(warp(moving, u), fixed) + 2.0 * diffusion(u)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxreg import filters

__all__ = ["ssd", "ncc", "local_ncc"]


def _prepare(a, b, mask):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]
    if mask is None:
        m = jnp.ones(a.shape[:3] + (1,), jnp.float32)
    else:
        m = jnp.asarray(mask, jnp.float32)
        if m.shape != a.shape[:3]:
            raise ValueError(f"mask shape {m.shape} does not match volume {a.shape[:3]}")
        m = m[..., None]
    return a, b, m


def ssd(warped: ArrayLike, fixed: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    """Mean squared difference over voxels and channels (inside ``mask``)."""
    a, b, m = _prepare(warped, fixed, mask)
    sq = jnp.mean((a - b) ** 2, axis=-1, keepdims=True)
    return jnp.sum(sq * m) / jnp.maximum(jnp.sum(m), 1.0)


def ncc(warped: ArrayLike, fixed: ArrayLike, *, mask: ArrayLike | None = None,
        eps: float = 1e-5) -> jax.Array:
    """Negative global normalised cross-correlation, averaged over channels (-1 best)."""
    a, b, m = _prepare(warped, fixed, mask)
    n = jnp.maximum(jnp.sum(m), 1.0)
    ma = jnp.sum(a * m, axis=(0, 1, 2)) / n
    mb = jnp.sum(b * m, axis=(0, 1, 2)) / n
    da, db = (a - ma) * m, (b - mb) * m
    cov = jnp.sum(da * db, axis=(0, 1, 2))
    var = jnp.sqrt(jnp.sum(da**2, axis=(0, 1, 2)) * jnp.sum(db**2, axis=(0, 1, 2)))
    return -jnp.mean(cov / (var + eps))


def local_ncc(warped: ArrayLike, fixed: ArrayLike, *, window: int = 9,
              mask: ArrayLike | None = None, eps: float = 1e-5) -> jax.Array:
    """Negative local (windowed) squared NCC, as in VoxelMorph's LNCC (-1 best).

    Args:
      warped, fixed: volumes of one shape.
      window: odd width of the cubic window.
      mask: optional voxel weights for the average of the local scores.
      eps: stabiliser of the local variances.
    """
    a, b, m = _prepare(warped, fixed, mask)
    box = lambda x: filters.box_filter(x, window, mode="edge")
    mu_a, mu_b = box(a), box(b)
    cov = box(a * b) - mu_a * mu_b
    var_a = box(a * a) - mu_a**2
    var_b = box(b * b) - mu_b**2
    cc = cov**2 / (var_a * var_b + eps)
    return -jnp.sum(jnp.mean(cc, axis=-1, keepdims=True) * m) / jnp.maximum(jnp.sum(m), 1.0)
