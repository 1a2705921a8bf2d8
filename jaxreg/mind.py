"""MIND-SSC: the modality independent neighbourhood descriptor, self-similarity context.

Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions
using self-similarity context", MICCAI 2013. Twelve channels, each the patch distance
between two voxels of the six-neighbourhood that are sqrt(2) apart, normalised by the
local variance. Written to match ConvexAdam's ``MINDSSC`` (convexadam 0.2.0) numerically,
channel order included.
"""

from __future__ import annotations

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


def _shift(img: jax.Array, offset: np.ndarray) -> jax.Array:
    """``img[clamp(x + offset)]`` with the border repeated."""
    pad = int(np.max(np.abs(offset)))
    padded = jnp.pad(img, pad, mode="edge")
    h, w, d = img.shape
    o = offset + pad
    return padded[o[0]:o[0] + h, o[1]:o[1] + w, o[2]:o[2] + d]


def mind_ssc(image: ArrayLike, *, radius: int = 1, dilation: int = 2) -> jax.Array:
    """MIND-SSC features of a 3D image.

    Args:
      image: ``(H, W, D)`` intensities.
      radius: half-width of the box filter over patch distances (``mind_r``).
      dilation: distance in voxels between the compared neighbours (``mind_d``).

    Returns:
      ``(H, W, D, 12)`` float32 descriptor in (0, 1].

    >>> import jax.numpy as jnp
    >>> mind_ssc(jnp.zeros((4, 4, 4)).at[1, 2, 3].set(1.0)).shape
    (4, 4, 4, 12)
    """
    img = jnp.asarray(image, jnp.float32)
    if img.ndim != 3:
        raise ValueError(f"mind_ssc: image must be (H, W, D), got {img.shape}")
    channels = [
        (_shift(img, a * dilation) - _shift(img, b * dilation)) ** 2
        for a, b in zip(_FIRST, _SECOND)
    ]
    ssd = filters.box_filter(jnp.stack(channels, axis=-1), 2 * radius + 1, mode="edge")
    mind = ssd - jnp.min(ssd, axis=-1, keepdims=True)
    var = jnp.mean(mind, axis=-1, keepdims=True)
    mean_var = jnp.mean(var)
    var = jnp.clip(var, mean_var * 0.001, mean_var * 1000.0)
    return jnp.exp(-mind / var)
