"""MIND-SSC: the modality independent neighbourhood descriptor, self-similarity context.

Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions
using self-similarity context", MICCAI 2013. Twelve channels, each the patch distance
between two voxels of the six-neighbourhood that are sqrt(2) apart, normalised by the
local variance. Written to match ConvexAdam's ``MINDSSC`` (convexadam 0.2.0) numerically,
channel order included.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxreg import filters

__all__ = ["mind_ssc"]

# Offsets of the six-neighbourhood around the centre (1, 1, 1) of a 3x3x3 stencil.
_SIX = np.array([[0, 1, 1], [1, 1, 0], [1, 0, 1], [1, 1, 2], [2, 1, 1], [1, 2, 1]])


def _pairs() -> tuple[np.ndarray, np.ndarray]:
    """The 12 neighbour pairs at squared distance 2, in ConvexAdam's channel order."""
    first, second = [], []
    for i, j in itertools.product(range(6), repeat=2):  # row-major over (i, j)
        if i > j and np.sum((_SIX[i] - _SIX[j]) ** 2) == 2:
            first.append(_SIX[i] - 1)
            second.append(_SIX[j] - 1)
    order = [6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3]  # the C++ implementation's order
    return np.array(first)[order], np.array(second)[order]


_FIRST, _SECOND = _pairs()


def mind_ssc(image: ArrayLike, *, radius: int = 1, dilation: int = 2,
             extent: ArrayLike | None = None) -> jax.Array:
    """MIND-SSC features of a 3D image.

    Args:
      image: ``(H, W, D)`` intensities.
      radius: half-width of the box filter over patch distances (``mind_r``).
      dilation: distance in voxels between the compared neighbours (``mind_d``).
      extent: for an image padded at the end of each axis, its real size (3 ints, may
        be traced): the real voxels then get the descriptor of the unpadded image (the
        padding is treated as the unpadded image's border, and kept out of the mean
        variance); the padding's values are meaningless.

    Returns:
      ``(H, W, D, 12)`` float32 descriptor in (0, 1]; all ones on a constant image.
      Any size works, down to one voxel along an axis (the border is replicated).

    >>> import jax.numpy as jnp
    >>> mind_ssc(jnp.zeros((4, 4, 4)).at[1, 2, 3].set(1.0)).shape
    (4, 4, 4, 12)
    """
    img = jnp.asarray(image, jnp.float32)
    if img.ndim != 3:
        raise ValueError(f"mind_ssc: image must be (H, W, D), got {img.shape}")
    # One channel at a time (lax.map), so that only the 12 patch distances and the
    # output are ever held: stacking all shifted differences first took 8x the output.
    if extent is not None:
        img = filters.continue_edge(img, extent)
    pad = int(np.max(np.abs(np.concatenate([_FIRST, _SECOND])))) * dilation
    padded = jnp.pad(img, pad, mode="edge")
    starts = jnp.asarray(np.stack([_FIRST, _SECOND], axis=1) * dilation + pad, jnp.int32)

    def patch_distance(start):  # start: (2, 3) offsets into ``padded``
        a = jax.lax.dynamic_slice(padded, start[0], img.shape)
        b = jax.lax.dynamic_slice(padded, start[1], img.shape)
        sq = (a - b) ** 2
        if extent is not None:
            sq = filters.continue_edge(sq, extent)
        return filters.box_filter(sq, 2 * radius + 1, mode="edge")

    ssd = jax.lax.map(patch_distance, starts)  # (12, H, W, D)
    # The channel min and mean as chains of elementwise ops (the same values, in the same
    # order): as reductions over the leading axis, XLA:CPU's default YNNPACK fusion took
    # them in a plain jax.jit and ran them 3x slower (2.4 s against 0.8 s at 192x224x184).
    channels = [ssd[i] for i in range(ssd.shape[0])]
    low = functools.reduce(jnp.minimum, channels)
    var = functools.reduce(jnp.add, [c - low for c in channels]) / len(channels)
    mind = ssd - low
    if extent is None:
        mean_var = jnp.mean(var)
    else:
        inside = filters.extent_mask(img.shape, extent)
        mean_var = jnp.sum(var * inside) / jnp.maximum(jnp.sum(inside), 1.0)
    var = jnp.clip(var, mean_var * 0.001, mean_var * 1000.0)
    # A constant image has no patch differences: mean_var is 0, and 0 / 0 would make
    # every channel NaN. The floor is below any clipped variance of a non-flat image,
    # so it changes nothing there; a flat image gets exp(-0 / tiny) = 1.
    var = jnp.maximum(var, jnp.finfo(jnp.float32).tiny)
    return jnp.moveaxis(jnp.exp(-mind / var), 0, -1)
