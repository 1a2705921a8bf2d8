"""Pooling, box filtering and resizing of channels-last volumes.

All functions take a volume ``(H, W, D)`` or ``(H, W, D, C)`` (spatial axes first,
channels last) and are pure, jit- and vmap-able. Padding conventions follow PyTorch's
``avg_pool3d``/``interpolate`` so that the reference solver's numbers carry over.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["box_filter", "avg_pool", "resize", "replicate_pad", "extent_mask", "continue_edge"]


def _box_1d(x: jax.Array, axis: int, size: int, mode: str) -> jax.Array:
    # A 1-D reduce_window per axis: XLA:CPU runs each as one pass, where a sum of shifted
    # slices gets fused across the three axes and filters into one kernel that recomputes
    # its inputs (measured 6x slower for three chained 3-wide filters).
    half = size // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (half, size - 1 - half)
    window = [1] * x.ndim
    window[axis] = size
    if mode == "edge":
        x = jnp.pad(x, pad, mode="edge")
        pad = [(0, 0)] * x.ndim
    total = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, tuple(window),
                                  (1,) * x.ndim, pad)
    return total / size


def box_filter(x: ArrayLike, size: int, *, mode: str = "zeros") -> jax.Array:
    """Mean over a ``size``-cube around each voxel, same shape out (stride 1).

    Separable, so it costs ``3 * size`` additions per voxel instead of ``size**3``.

    Args:
      x: ``(H, W, D)`` or ``(H, W, D, C)``.
      size: odd window width.
      mode: ``"zeros"`` pads with zeros and still divides by ``size**3`` (PyTorch
        ``avg_pool3d(k, stride=1, padding=k//2)``, ``count_include_pad=True``);
        ``"edge"`` replicates the border (``ReplicationPad3d`` then ``avg_pool3d``).

    Returns:
      The filtered volume, same shape and dtype.
    """
    if size % 2 != 1:
        raise ValueError(f"box_filter: size must be odd, got {size}")
    if mode not in ("zeros", "edge"):
        raise ValueError(f"box_filter: mode must be 'zeros' or 'edge', got {mode!r}")
    x = jnp.asarray(x)
    for axis in range(3):
        x = _box_1d(x, axis, size, mode)
    return x


def avg_pool(x: ArrayLike, factor: int) -> jax.Array:
    """Non-overlapping mean pooling by ``factor`` (trailing voxels that do not fill a
    cell are dropped, as PyTorch's ``avg_pool3d(k, stride=k)`` does)."""
    x = jnp.asarray(x)
    if factor == 1:
        return x
    squeeze = x.ndim == 3
    if squeeze:
        x = x[..., None]
    window = (factor, factor, factor, 1)
    # reduce_window reads the input in place; slicing off the remainder first would copy it.
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID")
    x = total / factor**3
    return x[..., 0] if squeeze else x


def resize(x: ArrayLike, shape: Sequence[int], *, antialias: bool = False,
           extents: tuple[ArrayLike, ArrayLike] | None = None) -> jax.Array:
    """Trilinear resize of the spatial axes to ``shape`` (half-pixel centres).

    With ``antialias=False`` this equals PyTorch's
    ``interpolate(mode="trilinear", align_corners=False)``; with ``antialias=True`` a
    downsampling resize low-pass filters first (for feature volumes).

    ``extents=(extent, out_extent)`` resizes padded grids: the real part of ``x``
    (``[0, extent)`` on each axis, see :func:`continue_edge`) is mapped onto the real part
    ``[0, out_extent)`` of the output, whose voxels there get the values the unpadded
    resize gives; the extents may be traced.
    """
    x = jnp.asarray(x)
    out_shape = tuple(int(s) for s in shape) + tuple(x.shape[3:])
    if extents is None:
        if out_shape == x.shape:
            return x
        return jax.image.resize(x, out_shape, method="linear", antialias=antialias)
    extent, out_extent = (jnp.asarray(e, jnp.float32) for e in extents)
    return jax.image.scale_and_translate(
        continue_edge(x, extent.astype(jnp.int32)), out_shape, (0, 1, 2),
        out_extent / extent, jnp.zeros(3, jnp.float32), method="linear",
        antialias=antialias)


def replicate_pad(x: ArrayLike, width: int) -> jax.Array:
    """Pads the three spatial axes by ``width`` voxels, repeating the border."""
    x = jnp.asarray(x)
    pad = [(width, width)] * 3 + [(0, 0)] * (x.ndim - 3)
    return jnp.pad(x, pad, mode="edge")


# Padded grids. A pair padded at the end of each axis to a bucket's shape keeps its real
# voxels in ``[0, extent)`` along each axis; ``extent`` may be traced (one compiled
# program serves pairs of several sizes). The solver uses these two helpers to make a
# padded pair's result on its real voxels equal to the unpadded pair's.


def extent_mask(shape: Sequence[int], extent: ArrayLike) -> jax.Array:
    """Float32 ``shape`` mask: 1 where every index is below ``extent`` (3 ints), else 0."""
    inside = [jnp.arange(n) < extent[a] for a, n in enumerate(shape[:3])]
    return (inside[0][:, None, None] & inside[1][None, :, None]
            & inside[2][None, None, :]).astype(jnp.float32)


def continue_edge(x: ArrayLike, extent: ArrayLike) -> jax.Array:
    """Replaces the padding beyond ``extent`` by copies of the last real voxel.

    On a grid continued this way, filters and resizes with edge handling (``mode="edge"``,
    :func:`resize`) give the real voxels the values they have on the unpadded grid.
    """
    x = jnp.asarray(x)
    for a in range(3):
        idx = jnp.minimum(jnp.arange(x.shape[a]), jnp.asarray(extent[a]) - 1)
        x = jnp.take(x, idx, axis=a)
    return x
