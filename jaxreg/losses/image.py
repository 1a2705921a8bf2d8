"""Image and feature similarity losses: pure functions of two volumes, lower is better.

Each takes ``(H, W, D)`` or channels-last ``(H, W, D, C)`` volumes and an optional
``mask`` ``(H, W, D)`` of weights (1 inside, 0 outside: padding, background), and
returns a scalar. 2D images ``(H, W)`` / ``(H, W, C)`` work too: the number of spatial
axes is the keyword ``spatial_dims`` if given, else the mask's rank if there is a mask,
else 2 for rank-2 images and 3 otherwise (so a multichannel 2D image ``(H, W, C)``
without a mask needs ``spatial_dims=2``); :func:`warped_ssd` takes it from the field.
Compose them freely with :mod:`jaxreg.regularisers` and :func:`jaxreg.warping.warp`::

    loss = ssd(warp(moving, u), fixed) + 2.0 * diffusion(u)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxreg import filters
from jaxreg import warping as warp_lib
from jaxreg.kernels import cpu as cpu_kernels

__all__ = ["ssd", "warped_ssd", "ncc", "local_ncc"]


def _prepare(a, b, mask, spatial_dims=None):
    """``a``, ``b`` with a channel axis and the ``(..., 1)`` mask; the number of spatial
    axes is ``spatial_dims``, else the mask's rank, else 2 for rank-2 images, else 3."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    m = None if mask is None else jnp.asarray(mask, jnp.float32)
    nd = spatial_dims or (m.ndim if m is not None else (2 if a.ndim == 2 else 3))
    if nd not in (2, 3) or a.ndim not in (nd, nd + 1):
        raise ValueError(f"images {a.shape} are not {nd}D (spatial_dims={spatial_dims}, "
                         f"mask {None if m is None else m.shape}): need (H, W, D) or "
                         f"(H, W, D, C), or in 2D (H, W) or (H, W, C)")
    if a.ndim == nd:
        a, b = a[..., None], b[..., None]
    if m is None:
        m = jnp.ones(a.shape[:nd] + (1,), jnp.float32)
    else:
        if m.shape != a.shape[:nd]:
            raise ValueError(f"mask shape {m.shape} does not match volume {a.shape[:nd]}")
        m = m[..., None]
    return a, b, m


def ssd(warped: ArrayLike, fixed: ArrayLike, *, mask: ArrayLike | None = None,
        spatial_dims: int | None = None) -> jax.Array:
    """Mean squared difference over voxels and channels (inside ``mask``).

    Args:
      warped, fixed: ``(H, W, D)`` or ``(H, W, D, C)`` of one shape; 2D ``(H, W)`` or
        ``(H, W, C)``.
      mask: optional voxel weights on the spatial grid.
      spatial_dims: 2 or 3 (see the module docstring for the default).

    Returns:
      The scalar loss.
    """
    a, b, m = _prepare(warped, fixed, mask, spatial_dims)
    sq = jnp.mean((a - b) ** 2, axis=-1, keepdims=True)
    return jnp.sum(sq * m) / jnp.maximum(jnp.sum(m), 1.0)


def warped_ssd(moving: ArrayLike, disp: ArrayLike, fixed: ArrayLike, *,
               mask: ArrayLike | None = None, kernel: bool = True) -> jax.Array:
    """``ssd(warp(moving, disp), fixed, mask=mask)``, fused into one pass on CPU.

    The fine stage's similarity. With ``kernel`` (default), on CPU, when ``moving`` lies
    on the field's grid and jaxreg's compiled kernel is available
    (:mod:`jaxreg.kernels.cpu`), one pass over the voxels computes the warped features'
    squared residuals and their derivative with respect to ``disp``, instead of eight
    gathered ``(N, C)`` arrays; the value and gradients agree with the XLA composition
    to float rounding (the summation order differs). Otherwise, or with
    ``kernel=False``, it is exactly that composition. Gradients with respect to
    ``moving`` and ``fixed`` come from the composition too (XLA drops them when unused).

    2D (a ``(H, W, 2)`` field) always takes the XLA composition (the kernel is 3D).

    Args:
      moving: ``(H', W', D')`` or ``(H', W', D', C)`` volume; 2D ``(H', W')`` or
        ``(H', W', C)``.
      disp: ``(H, W, D, 3)`` displacement in voxels (:func:`jaxreg.warping.warp`); 2D
        ``(H, W, 2)``.
      fixed: ``(H, W, D)`` or ``(H, W, D, C)``, the warped volume's shape.
      mask: optional ``(H, W, D)`` (2D: ``(H, W)``) voxel weights.
      kernel: allow the compiled CPU kernel.

    Returns:
      The scalar loss.
    """
    moving = jnp.asarray(moving, jnp.float32)
    disp = jnp.asarray(disp, jnp.float32)
    fixed = jnp.asarray(fixed, jnp.float32)
    if not (kernel and moving.ndim == 4 and fixed.shape == moving.shape
            and disp.shape == moving.shape[:3] + (3,) and cpu_kernels.usable()):
        nd = disp.shape[-1] if disp.ndim else None
        return ssd(warp_lib.warp(moving, disp), fixed, mask=mask, spatial_dims=nd)
    _, _, m = _prepare(fixed, fixed, mask)
    sq = _fused_sq(*cpu_kernels.match_varying(moving, fixed, disp))
    return jnp.sum(sq * m[..., 0]) / moving.shape[-1] / jnp.maximum(jnp.sum(m), 1.0)


@jax.custom_vjp
def _fused_sq(moving, fixed, disp):
    return cpu_kernels.warp_ssd_terms(moving, fixed, disp)[0]


def _fused_sq_fwd(moving, fixed, disp):
    sq, grad = cpu_kernels.warp_ssd_terms(moving, fixed, disp)
    return sq, (moving, fixed, disp, grad)


def _fused_sq_bwd(res, ct):
    moving, fixed, disp, grad = res
    ct = cpu_kernels.match_varying(ct, disp)[0]  # inside shard_map: typed like the output
    # The features' cotangents from the XLA composition (XLA drops them when unused):
    # d/dfixed = -2 ct r, d/dmoving = the warp's transpose applied to 2 ct r.
    weighted = 2.0 * ct[..., None] * (warp_lib.warp(moving, disp) - fixed)
    _, warp_vjp = jax.vjp(lambda m: warp_lib.warp(m, disp), moving)
    (g_moving,) = warp_vjp(weighted)
    return g_moving, -weighted, 2.0 * ct[..., None] * grad


_fused_sq.defvjp(_fused_sq_fwd, _fused_sq_bwd)


def ncc(warped: ArrayLike, fixed: ArrayLike, *, mask: ArrayLike | None = None,
        eps: float = 1e-5, spatial_dims: int | None = None) -> jax.Array:
    """Negative global normalised cross-correlation, averaged over channels (-1 best).

    Args:
      warped, fixed: ``(H, W, D)`` or ``(H, W, D, C)`` of one shape; 2D ``(H, W)`` or
        ``(H, W, C)``.
      mask: optional voxel weights on the spatial grid.
      eps: stabiliser of the denominator.
      spatial_dims: 2 or 3 (see the module docstring for the default).

    Returns:
      The scalar loss.
    """
    a, b, m = _prepare(warped, fixed, mask, spatial_dims)
    axes = tuple(range(a.ndim - 1))
    n = jnp.maximum(jnp.sum(m), 1.0)
    ma = jnp.sum(a * m, axis=axes) / n
    mb = jnp.sum(b * m, axis=axes) / n
    da, db = (a - ma) * m, (b - mb) * m
    cov = jnp.sum(da * db, axis=axes)
    var = jnp.sqrt(jnp.sum(da**2, axis=axes) * jnp.sum(db**2, axis=axes))
    return -jnp.mean(cov / (var + eps))


def local_ncc(warped: ArrayLike, fixed: ArrayLike, *, window: int = 9,
              mask: ArrayLike | None = None, eps: float = 1e-5,
              spatial_dims: int | None = None) -> jax.Array:
    """Negative local (windowed) squared NCC, as in VoxelMorph's LNCC (-1 best).

    Args:
      warped, fixed: volumes of one shape (2D images too).
      window: odd width of the cubic (2D: square) window.
      mask: optional voxel weights for the average of the local scores.
      eps: stabiliser of the local variances.
      spatial_dims: 2 or 3 (see the module docstring for the default).

    Returns:
      The scalar loss.
    """
    a, b, m = _prepare(warped, fixed, mask, spatial_dims)
    nd = a.ndim - 1
    box = lambda x: filters.box_filter(x, window, mode="edge", spatial_dims=nd)
    mu_a, mu_b = box(a), box(b)
    cov = box(a * b) - mu_a * mu_b
    var_a = box(a * a) - mu_a**2
    var_b = box(b * b) - mu_b**2
    cc = cov**2 / (var_a * var_b + eps)
    return -jnp.sum(jnp.mean(cc, axis=-1, keepdims=True) * m) / jnp.maximum(jnp.sum(m), 1.0)
