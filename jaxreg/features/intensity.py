"""Step 1 of :mod:`jaxreg.features`: volumes as an encoder sees them, in [0, 1].

Robust min-max scaling (:func:`normalise_intensity`), the optional contrast-free rendering
(:func:`render`) and the foreground mask the PCA is fitted on (:func:`foreground_mask`).
:mod:`jaxreg.features` re-exports all three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxreg.filters import PERCENTILES

__all__ = ["PERCENTILES", "RENDERS", "normalise_intensity", "render", "foreground_mask"]


def normalise_intensity(volume: ArrayLike, *,
                        percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Clips a volume to two percentiles and scales it to [0, 1] (float32).

    A volume whose percentiles coincide falls back to its min and max; a constant volume
    becomes zeros. Concrete input is computed with numpy (a numpy array back); traced
    input (inside ``jit`` or ``vmap``) with the same formula in ``jax.numpy``, whose
    percentile sorts the whole volume (seconds for a large one on a CPU).
    """
    xp = jnp if isinstance(volume, jax.core.Tracer) else np
    volume = xp.asarray(volume, xp.float32)
    lo, hi = xp.percentile(volume, xp.asarray(percentiles, xp.float32))
    flat = hi <= lo
    lo, hi = xp.where(flat, volume.min(), lo), xp.where(flat, volume.max(), hi)
    return xp.clip((volume - lo) / xp.maximum(hi - lo, 1e-6), 0.0, 1.0).astype(xp.float32)


RENDERS = ("intensity", "gradient")


def render(volume: ArrayLike, kind: str = "intensity", *,
           percentiles: tuple[float, float] = PERCENTILES, sigma: float = 1.0) -> np.ndarray:
    """The volume as an encoder sees it, in [0, 1] (float32).

    ``"intensity"``: :func:`normalise_intensity`. ``"gradient"``: the gradient magnitude
    of that (Gaussian derivatives, ``sigma`` voxels), normalised the same way: tissue
    boundaries at the same places whichever way a sequence orders the tissues' brightness
    (T1 and T2 invert it), so the features of the two images agree far better (BUILD.md,
    "Real features"). Any rank (2D images too).
    """
    x = normalise_intensity(volume, percentiles=percentiles)
    if kind == "intensity":
        return x
    if kind != "gradient":
        raise ValueError(f"render must be one of {RENDERS}, got {kind!r}")
    from scipy import ndimage  # imported when used

    return normalise_intensity(ndimage.gaussian_gradient_magnitude(x, sigma),
                               percentiles=percentiles)


def foreground_mask(volume: ArrayLike, *, threshold: float = 0.05,
                    percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
    """Voxels brighter than ``threshold`` after :func:`normalise_intensity` (air is out).

    A cheap default for fitting the PCA on anatomy rather than on the background, which
    otherwise dominates the feature variance of skull-stripped or breast volumes.
    """
    return normalise_intensity(volume, percentiles=percentiles) > threshold
