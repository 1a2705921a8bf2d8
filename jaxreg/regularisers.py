"""Regularisers of displacement fields ``(H, W, D, 3)`` (voxels), and the Jacobian.

Pure functions returning scalars (regularisers) or volumes (Jacobian determinant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["diffusion", "bending_energy", "jacobian_determinant"]


def _field(disp):
    disp = jnp.asarray(disp, jnp.float32)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise ValueError(f"displacement must be (H, W, D, 3), got {disp.shape}")
    return disp


def diffusion(disp: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
    """Diffusion regulariser: sum over axes of the mean squared forward difference.

    This is ConvexAdam's ``reg_loss`` without its weight. With an ``(H, W, D)`` 0/1
    ``mask``, only differences between two voxels inside it count, and each axis' mean
    is over those (on a padded grid: the unpadded field's value).
    """
    u = _field(disp)
    if mask is None:
        return sum(jnp.mean(jnp.diff(u, axis=a) ** 2) for a in range(3))
    m = jnp.asarray(mask, jnp.float32)
    total = 0.0
    for a in range(3):
        n = u.shape[a] - 1
        both = (jax.lax.slice_in_dim(m, 1, n + 1, axis=a)
                * jax.lax.slice_in_dim(m, 0, n, axis=a))[..., None]
        sq = jnp.sum(jnp.diff(u, axis=a) ** 2 * both)
        total = total + sq / jnp.maximum(3.0 * jnp.sum(both), 1.0)
    return total


def bending_energy(disp: ArrayLike) -> jax.Array:
    """Mean bending energy: second derivatives (central), cross terms counted twice."""
    u = _field(disp)

    def d2(x, a):
        return jnp.roll(x, -1, a) - 2 * x + jnp.roll(x, 1, a)

    def dxy(x, a, b):
        dx = 0.5 * (jnp.roll(x, -1, a) - jnp.roll(x, 1, a))
        return 0.5 * (jnp.roll(dx, -1, b) - jnp.roll(dx, 1, b))

    terms = []
    for a in range(3):
        terms.append(d2(u, a)[1:-1, 1:-1, 1:-1] ** 2)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        terms.append(2 * dxy(u, a, b)[1:-1, 1:-1, 1:-1] ** 2)
    return jnp.mean(sum(terms))


def jacobian_determinant(disp: ArrayLike) -> jax.Array:
    """Determinant of the Jacobian of ``x -> x + u(x)``, ``(H, W, D)``.

    Derivatives as ``numpy.gradient``: central differences inside, one-sided at the
    border. ``det <= 0`` marks folding.
    """
    u = _field(disp)
    grads = [jnp.gradient(u[..., i], axis=(0, 1, 2)) for i in range(3)]
    # J[i][j] = d(x_i + u_i)/dx_j
    J = [[grads[i][j] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
            - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))
