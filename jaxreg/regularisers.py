"""Regularisers of displacement fields ``(H, W, D, 3)`` (voxels), and the Jacobian.

Pure functions returning scalars (regularisers) or volumes (Jacobian determinant). A 2D
field ``(H, W, 2)`` (its last axis is the number of spatial dimensions) gets the same
definitions over two axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["diffusion", "bending_energy", "jacobian_determinant"]


def _field(disp):
    disp = jnp.asarray(disp, jnp.float32)
    nd = disp.shape[-1] if disp.ndim else 0
    if nd not in (2, 3) or disp.ndim != nd + 1:
        raise ValueError(f"displacement must be (H, W, D, 3) or, in 2D, (H, W, 2), "
                         f"got {disp.shape}")
    return disp


def diffusion(disp: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    """Diffusion regulariser: sum over axes of the mean squared forward difference.

    This is ConvexAdam's ``reg_loss`` without its weight. With an ``(H, W, D)`` 0/1
    ``mask``, only differences between two voxels inside it count, and each axis' mean
    is over those (on a padded grid: the unpadded field's value).

    Args:
      disp: ``(H, W, D, 3)`` field; in 2D ``(H, W, 2)`` (two axes summed).
      mask: optional ``(H, W, D)`` (2D: ``(H, W)``) 0/1 weights.

    Returns:
      The scalar regulariser.
    """
    u = _field(disp)
    nd = u.shape[-1]
    if mask is None:
        return sum(jnp.mean(jnp.diff(u, axis=a) ** 2) for a in range(nd))
    m = jnp.asarray(mask, jnp.float32)
    if m.shape != u.shape[:nd]:
        raise ValueError(f"diffusion: mask shape {m.shape} does not match the field's grid "
                         f"{u.shape[:nd]}")
    total = 0.0
    for a in range(nd):
        n = u.shape[a] - 1
        both = (jax.lax.slice_in_dim(m, 1, n + 1, axis=a)
                * jax.lax.slice_in_dim(m, 0, n, axis=a))[..., None]
        sq = jnp.sum(jnp.diff(u, axis=a) ** 2 * both)
        total = total + sq / jnp.maximum(float(nd) * jnp.sum(both), 1.0)
    return total


def bending_energy(disp: ArrayLike) -> jax.Array:
    """Mean bending energy: second derivatives (central), cross terms counted twice.

    Args:
      disp: ``(H, W, D, 3)`` field; in 2D ``(H, W, 2)``.

    Returns:
      The mean over the interior voxels (one voxel cut at each border) and components.
    """
    u = _field(disp)
    nd = u.shape[-1]

    def d2(x, a):
        return jnp.roll(x, -1, a) - 2 * x + jnp.roll(x, 1, a)

    def dxy(x, a, b):
        dx = 0.5 * (jnp.roll(x, -1, a) - jnp.roll(x, 1, a))
        return 0.5 * (jnp.roll(dx, -1, b) - jnp.roll(dx, 1, b))

    inner = (slice(1, -1),) * nd
    terms = []
    for a in range(nd):
        terms.append(d2(u, a)[inner] ** 2)
    for a, b in ((0, 1), (0, 2), (1, 2)) if nd == 3 else ((0, 1),):
        terms.append(2 * dxy(u, a, b)[inner] ** 2)
    return jnp.mean(sum(terms))


def jacobian_determinant(disp: ArrayLike) -> jax.Array:
    """Determinant of the Jacobian of ``x -> x + u(x)``, ``(H, W, D)``.

    Derivatives as ``numpy.gradient``: central differences inside, one-sided at the
    border. ``det <= 0`` marks folding.

    Args:
      disp: ``(H, W, D, 3)`` field; in 2D ``(H, W, 2)``.

    Returns:
      ``(H, W, D)`` determinants (2D: ``(H, W)``, of the 2x2 Jacobian).
    """
    u = _field(disp)
    if u.shape[-1] == 2:
        (a, b), (c, d) = (jnp.gradient(u[..., i], axis=(0, 1)) for i in range(2))
        return (a + 1.0) * (d + 1.0) - b * c
    grads = [jnp.gradient(u[..., i], axis=(0, 1, 2)) for i in range(3)]
    # J[i][j] = d(x_i + u_i)/dx_j
    J = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))
