"""Pooling, box filtering and resizing of channels-last volumes and 2D images.

All functions take a volume ``(H, W, D)`` or ``(H, W, D, C)``, or a 2D image ``(H, W)`` or
``(H, W, C)`` (spatial axes first, channels last), and are pure, jit- and vmap-able.
Padding conventions follow PyTorch's ``avg_pool3d``/``interpolate`` (``avg_pool2d``/
bilinear in 2D) so that the reference solver's numbers carry over.

How many axes are spatial: :func:`resize` takes it from ``len(shape)``,
:func:`extent_mask` and :func:`continue_edge` from the length of ``extent``; the others
(:func:`box_filter`, :func:`avg_pool`, :func:`replicate_pad`) from the keyword
``spatial_dims`` (2 or 3), whose default ``None`` means 2 for a rank-2 array and 3
otherwise: a 2D image with channels, ``(H, W, C)``, needs ``spatial_dims=2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["PERCENTILES", "box_filter", "avg_pool", "resize", "replicate_pad", "extent_mask",
           "continue_edge"]

PERCENTILES = (0.5, 99.5)
"""The default robust intensity range (low, high percentiles) clipped before MIND-SSC, an
encoder or a histogram: every jaxreg default that clips intensities uses this one."""


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


def _spatial(x: jax.Array, spatial_dims: int | None, where: str) -> int:
    """The number of spatial axes of ``x``: ``spatial_dims``, else 2 for a rank-2 array
    and 3 otherwise; raises unless ``x`` has that many axes or one more (channels)."""
    nd = (2 if x.ndim == 2 else 3) if spatial_dims is None else spatial_dims
    if nd not in (2, 3):
        raise ValueError(f"{where}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if x.ndim not in (nd, nd + 1):
        names = "(H, W) or (H, W, C)" if nd == 2 else "(H, W, D) or (H, W, D, C)"
        raise ValueError(f"{where}: with {nd} spatial axes the input must be {names}, "
                         f"got shape {x.shape}")
    return nd


def box_filter(x: ArrayLike, size: int, *, mode: str = "zeros",
               spatial_dims: int | None = None) -> jax.Array:
    """Mean over a ``size``-cube (square in 2D) around each voxel, same shape out (stride 1).

    Separable, so it costs ``3 * size`` additions per voxel instead of ``size**3``.

    Args:
      x: ``(H, W, D)`` or ``(H, W, D, C)``; in 2D ``(H, W)`` or ``(H, W, C)``.
      size: odd window width.
      mode: ``"zeros"`` pads with zeros and still divides by ``size**3`` (``size**2`` in
        2D; PyTorch ``avg_pool3d(k, stride=1, padding=k//2)``, ``count_include_pad=True``);
        ``"edge"`` replicates the border (``ReplicationPad3d`` then ``avg_pool3d``).
      spatial_dims: 2 or 3 spatial axes; default 2 for a rank-2 ``x``, else 3.

    Returns:
      The filtered volume, same shape and dtype.
    """
    if size % 2 != 1:
        raise ValueError(f"box_filter: size must be odd, got {size}")
    if mode not in ("zeros", "edge"):
        raise ValueError(f"box_filter: mode must be 'zeros' or 'edge', got {mode!r}")
    x = jnp.asarray(x)
    for axis in range(_spatial(x, spatial_dims, "box_filter")):
        x = _box_1d(x, axis, size, mode)
    return x


def avg_pool(x: ArrayLike, factor: int, *, spatial_dims: int | None = None) -> jax.Array:
    """Non-overlapping mean pooling by ``factor`` (trailing voxels that do not fill a
    cell are dropped, as PyTorch's ``avg_pool3d(k, stride=k)`` does).

    Args:
      x: ``(H, W, D)`` or ``(H, W, D, C)``; in 2D ``(H, W)`` or ``(H, W, C)``.
      factor: cell side in voxels.
      spatial_dims: 2 or 3 spatial axes; default 2 for a rank-2 ``x``, else 3.

    Returns:
      ``(H // factor, W // factor, ...)`` cell means, channels kept.
    """
    x = jnp.asarray(x)
    nd = _spatial(x, spatial_dims, "avg_pool")
    if factor == 1:
        return x
    squeeze = x.ndim == nd
    if squeeze:
        x = x[..., None]
    window = (factor,) * nd + (1,)
    # reduce_window reads the input in place; slicing off the remainder first would copy it.
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID")
    x = total / factor**nd
    return x[..., 0] if squeeze else x


def resize(x: ArrayLike, shape: Sequence[int], *, antialias: bool = False,
           extents: tuple[ArrayLike, ArrayLike] | None = None) -> jax.Array:
    """Trilinear (bilinear in 2D) resize of the spatial axes to ``shape`` (half-pixel centres).

    With ``antialias=False`` this equals PyTorch's
    ``interpolate(mode="trilinear", align_corners=False)`` (``"bilinear"`` in 2D); with
    ``antialias=True`` a downsampling resize low-pass filters first (for feature volumes).

    ``extents=(extent, out_extent)`` resizes padded grids: the real part of ``x``
    (``[0, extent)`` on each axis, see :func:`continue_edge`) is mapped onto the real part
    ``[0, out_extent)`` of the output, whose voxels there get the values the unpadded
    resize gives; the extents may be traced.

    Args:
      x: ``(H, W, D)`` or ``(H, W, D, C)``; in 2D ``(H, W)`` or ``(H, W, C)``.
      shape: the new spatial shape; its length (3 or 2) is the number of spatial axes.
      antialias: low-pass filter when downsampling.
      extents: ``(extent, out_extent)``, each ``len(shape)`` sizes.

    Returns:
      ``x`` on ``shape`` (channels kept); ``x`` itself when the shape is unchanged.
    """
    x = jnp.asarray(x)
    nd = len(shape)
    if nd not in (2, 3) or x.ndim not in (nd, nd + 1):
        raise ValueError(f"resize: shape {tuple(shape)} must give 2 or 3 spatial axes of "
                         f"the input, which then has that many axes or one more (channels); "
                         f"got input shape {x.shape}")
    out_shape = tuple(int(s) for s in shape) + tuple(x.shape[nd:])
    if extents is None:
        if out_shape == x.shape:
            return x
        return jax.image.resize(x, out_shape, method="linear", antialias=antialias)
    extent, out_extent = (jnp.asarray(e, jnp.float32) for e in extents)
    return jax.image.scale_and_translate(
        continue_edge(x, extent.astype(jnp.int32)), out_shape, tuple(range(nd)),
        out_extent / extent, jnp.zeros(nd, jnp.float32), method="linear",
        antialias=antialias)


def replicate_pad(x: ArrayLike, width: int, *, spatial_dims: int | None = None) -> jax.Array:
    """Pads the spatial axes by ``width`` voxels, repeating the border.

    Args:
      x: ``(H, W, D)`` or ``(H, W, D, C)``; in 2D ``(H, W)`` or ``(H, W, C)``.
      width: voxels added at both ends of each spatial axis.
      spatial_dims: 2 or 3 spatial axes; default 2 for a rank-2 ``x``, else 3.

    Returns:
      The padded array.
    """
    x = jnp.asarray(x)
    nd = _spatial(x, spatial_dims, "replicate_pad")
    pad = [(width, width)] * nd + [(0, 0)] * (x.ndim - nd)
    return jnp.pad(x, pad, mode="edge")


# Padded grids. A pair padded at the end of each axis to a bucket's shape keeps its real
# voxels in ``[0, extent)`` along each axis; ``extent`` may be traced (one compiled
# program serves pairs of several sizes). The solver uses these two helpers to make a
# padded pair's result on its real voxels equal to the unpadded pair's.


def _extent_dims(extent: ArrayLike, where: str) -> int:
    """The number of spatial axes an ``extent`` (2 or 3 sizes, may be traced) gives."""
    shape = np.shape(extent)
    if len(shape) != 1 or shape[0] not in (2, 3):
        raise ValueError(f"{where}: extent must be 2 or 3 sizes, got shape {shape}")
    return shape[0]


def extent_mask(shape: Sequence[int], extent: ArrayLike) -> jax.Array:
    """Float32 mask of the spatial ``shape``: 1 where every index is below ``extent``
    (3 ints, or 2 in 2D: their number is the number of spatial axes), else 0.

    Args:
      shape: the grid's shape; axes beyond ``len(extent)`` (channels) are ignored.
      extent: the real sizes, may be traced.

    Returns:
      ``shape[:len(extent)]`` float32.
    """
    if _extent_dims(extent, "extent_mask") == 2:
        inside = [jnp.arange(n) < extent[a] for a, n in enumerate(shape[:2])]
        return (inside[0][:, None] & inside[1][None, :]).astype(jnp.float32)
    inside = [jnp.arange(n) < extent[a] for a, n in enumerate(shape[:3])]
    return (inside[0][:, None, None] & inside[1][None, :, None]
            & inside[2][None, None, :]).astype(jnp.float32)


def continue_edge(x: ArrayLike, extent: ArrayLike) -> jax.Array:
    """Replaces the padding beyond ``extent`` by copies of the last real voxel.

    On a grid continued this way, filters and resizes with edge handling (``mode="edge"``,
    :func:`resize`) give the real voxels the values they have on the unpadded grid.

    Args:
      x: ``(H, W, D)`` or ``(H, W, D, C)``; in 2D ``(H, W)`` or ``(H, W, C)``.
      extent: the real sizes (3, or 2 in 2D: the number of spatial axes), may be traced.

    Returns:
      ``x`` with the padding replaced, same shape.
    """
    x = jnp.asarray(x)
    for a in range(_extent_dims(extent, "continue_edge")):
        idx = jnp.minimum(jnp.arange(x.shape[a]), jnp.asarray(extent[a]) - 1)
        x = jnp.take(x, idx, axis=a)
    return x
