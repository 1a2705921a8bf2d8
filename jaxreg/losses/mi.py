"""Mutual information of two images from a Parzen-window joint histogram, as a loss.

Each voxel spreads a unit weight over ``bins`` intensity bins with a smooth kernel
(Gaussian, or the cubic B-spline of Mattes et al. 2003), for both images; the joint
histogram is the product of the two ``(N, bins)`` weight matrices, ``Wa^T diag(m) Wb``,
accumulated over chunks of voxels in a ``lax.scan`` (memory ``chunk * bins`` whatever
the image size, never ``N * bins * bins``; each chunk is recomputed in the backward
pass). The marginals are the joint's sums, so the estimate is consistent.

Intensities are mapped to bin coordinates ``[0, bins - 1]`` per image: between two
percentiles (robust min/max; ``(0, 100)`` is the plain min/max), or between a fixed
given range. The range is held constant for the gradient (``stop_gradient``), as
registration packages do.

Losses are to be minimised, like :func:`jaxreg.losses.ncc`: :func:`mutual_information`
returns minus the MI (nats) or minus the normalised MI ``(H(a) + H(b)) / H(a, b)``
(Studholme), in ``[-2, -1]``. Everything is pure, jit- and vmap-able and differentiable;
images may have any shape (2D, 3D, or a list of sampled values)::

    loss = mutual_information(warp(moving, u), fixed, config=MIConfig(bins=32))

:func:`fine_similarity` adapts it to :func:`jaxreg.solver.fine_stage`'s
``similarity=(warped, fixed) -> scalar`` on channels-last feature volumes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxreg.filters import PERCENTILES

__all__ = ["MIConfig", "intensity_range", "bin_coords", "parzen_weights", "joint_histogram",
           "mutual_information", "loss_from_table", "fine_similarity"]

_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class MIConfig:
    """Settings of the Parzen-window MI estimate (static under jit).

    Attributes:
      bins: intensity bins per image (>= 4).
      kernel: ``"gaussian"`` (width ``sigma`` bins) or ``"bspline"`` (cubic B-spline,
        support 4 bins).
      sigma: standard deviation of the Gaussian kernel, in bins (> 0).
      normalised: return minus the normalised MI ``(H(a) + H(b)) / H(a, b)`` instead of
        minus the MI.
      percentiles: ``(low, high)`` percentiles of each image (inside the mask) mapped to
        the first and last bin when no range is given; ``(0.0, 100.0)`` is min/max (no
        sort). Values outside are clipped to the end bins.
      chunk: voxels per step of the histogram accumulation (memory ``chunk * bins``).

    Raises:
      ValueError: a field is out of range (named in the message).
    """

    bins: int = 32
    kernel: str = "gaussian"
    sigma: float = 0.5
    normalised: bool = False
    percentiles: tuple[float, float] = PERCENTILES
    chunk: int = 32768

    def __post_init__(self):
        if not isinstance(self.bins, int) or isinstance(self.bins, bool) or self.bins < 4:
            raise ValueError(f"MIConfig.bins must be an integer >= 4, got {self.bins!r}")
        if self.kernel not in ("gaussian", "bspline"):
            raise ValueError(f"MIConfig.kernel must be 'gaussian' or 'bspline', got "
                             f"{self.kernel!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)
                and self.sigma > 0):
            raise ValueError(f"MIConfig.sigma must be a finite number > 0, got {self.sigma!r}")
        lo, hi = (tuple(self.percentiles) + (None, None))[:2]
        if (len(self.percentiles) != 2 or not all(isinstance(p, (int, float)) for p in (lo, hi))
                or not 0.0 <= lo < hi <= 100.0):
            raise ValueError("MIConfig.percentiles must be (low, high) with "
                             f"0 <= low < high <= 100, got {self.percentiles!r}")
        if not isinstance(self.chunk, int) or isinstance(self.chunk, bool) or self.chunk < 1:
            raise ValueError(f"MIConfig.chunk must be an integer >= 1, got {self.chunk!r}")


def intensity_range(image: ArrayLike, *, mask: ArrayLike | None = None,
                    percentiles: tuple[float, float] = PERCENTILES) -> jax.Array:
    """Robust ``(low, high)`` intensities of an image, inside an optional mask.

    Args:
      image: any shape.
      mask: optional weights of ``image``'s shape; voxels with weight > 0 count.
      percentiles: the two percentiles; ``(0, 100)`` gives min and max without a sort.

    Returns:
      ``(2,)`` float32, ``high >= low + 1e-6`` (a constant image gets a tiny range).
    """
    x = jnp.asarray(image, jnp.float32).ravel()
    inside = jnp.ones_like(x, bool) if mask is None else jnp.asarray(mask).ravel() > 0
    if tuple(percentiles) == (0.0, 100.0):
        lo = jnp.min(jnp.where(inside, x, jnp.inf))
        hi = jnp.max(jnp.where(inside, x, -jnp.inf))
    elif mask is None:
        lo, hi = jnp.percentile(x, jnp.asarray(percentiles, jnp.float32))
    else:
        lo, hi = jnp.nanpercentile(jnp.where(inside, x, jnp.nan),
                                   jnp.asarray(percentiles, jnp.float32))
    return jnp.stack([lo, jnp.maximum(hi, lo + 1e-6)])


def parzen_weights(values: ArrayLike, *, bins: int, kernel: str = "gaussian",
                   sigma: float = 0.5) -> jax.Array:
    """Each value's kernel weights over the bins, summing to 1 per value.

    Args:
      values: ``(N,)`` bin coordinates in ``[0, bins - 1]``.
      bins: number of bins (bin ``k`` is centred at ``k``).
      kernel: ``"gaussian"`` or ``"bspline"`` (cubic).
      sigma: the Gaussian's standard deviation in bins.

    Returns:
      ``(N, bins)`` float32.
    """
    v = jnp.asarray(values, jnp.float32)
    d = v[:, None] - jnp.arange(bins, dtype=jnp.float32)
    if kernel == "gaussian":
        w = jnp.exp(-0.5 * (d / sigma) ** 2)
    else:
        a = jnp.abs(d)
        w = jnp.where(a < 1.0, (4.0 - 6.0 * a**2 + 3.0 * a**3) / 6.0,
                      jnp.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))
    return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), _EPS)


def bin_coords(x: ArrayLike, rng: ArrayLike, bins: int) -> jax.Array:
    """Intensities -> bin coordinates in ``[0, bins - 1]`` (range held constant)."""
    rng = jax.lax.stop_gradient(jnp.asarray(rng, jnp.float32))
    v = (x - rng[0]) / (rng[1] - rng[0]) * (bins - 1)
    return jnp.clip(v, 0.0, bins - 1.0)


def joint_histogram(a: ArrayLike, b: ArrayLike, *, mask: ArrayLike | None = None,
                    config: MIConfig = MIConfig(), a_range: ArrayLike | None = None,
                    b_range: ArrayLike | None = None) -> jax.Array:
    """The Parzen joint probability table of two images, ``(bins, bins)``, summing to 1.

    Args:
      a, b: images of one shape (any number of dimensions).
      mask: optional non-negative voxel weights of that shape.
      config: bins, kernel, percentiles and chunk size.
      a_range, b_range: fixed ``(low, high)`` intensity ranges; default: the
        ``config.percentiles`` of each image inside the mask.

    Returns:
      ``p[i, j]``: weight of voxels with ``a`` in bin ``i`` and ``b`` in bin ``j``.

    Raises:
      ValueError: the shapes differ.
    """
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"mutual information: shapes differ: {a.shape} vs {b.shape}")
    m = jnp.ones(a.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if m.shape != a.shape:
        raise ValueError(f"mutual information: mask shape {m.shape} does not match {a.shape}")
    if a_range is None:
        a_range = intensity_range(a, mask=mask, percentiles=config.percentiles)
    if b_range is None:
        b_range = intensity_range(b, mask=mask, percentiles=config.percentiles)
    n = a.size
    chunk = min(config.chunk, n)
    steps = -(-n // chunk)
    pad = steps * chunk - n
    rows = [jnp.pad(x.ravel(), (0, pad)).reshape(steps, chunk)
            for x in (bin_coords(a, a_range, config.bins),
                      bin_coords(b, b_range, config.bins), m)]
    weights = lambda v: parzen_weights(v, bins=config.bins, kernel=config.kernel,
                                       sigma=config.sigma)

    @jax.checkpoint
    def step(total, row):
        va, vb, w = row
        return total + weights(va).T @ (weights(vb) * w[:, None]), None

    zero = jnp.zeros((config.bins, config.bins), jnp.float32)
    total, _ = jax.lax.scan(step, zero, tuple(rows))
    return total / jnp.maximum(jnp.sum(total), _EPS)


def _entropy(p):
    return -jnp.sum(p * jnp.log(jnp.maximum(p, _EPS)))


def mutual_information(a: ArrayLike, b: ArrayLike, *, mask: ArrayLike | None = None,
                       config: MIConfig = MIConfig(), a_range: ArrayLike | None = None,
                       b_range: ArrayLike | None = None) -> jax.Array:
    """Minus the (normalised) mutual information of two images: a loss, lower is better.

    Symmetric in ``a`` and ``b``; unchanged by any monotonic (or inverting) intensity
    map up to the binning. MI is in nats, ``MI = H(a) + H(b) - H(a, b)``.

    Args:
      a, b: images of one shape (e.g. ``warp(moving, u)`` and ``fixed``).
      mask: optional non-negative voxel weights of that shape.
      config: :class:`MIConfig` (bins, kernel, normalised, percentiles, chunk).
      a_range, b_range: fixed ``(low, high)`` intensity ranges (else percentiles).

    Returns:
      Scalar float32: ``-MI``, or ``-NMI`` with ``config.normalised``.

    >>> import jax.numpy as jnp
    >>> x = jnp.linspace(0.0, 1.0, 1000)
    >>> bool(mutual_information(x, x) < mutual_information(x, jnp.zeros_like(x)))
    True
    """
    p = joint_histogram(a, b, mask=mask, config=config, a_range=a_range, b_range=b_range)
    return loss_from_table(p, normalised=config.normalised)


def loss_from_table(p: ArrayLike, *, normalised: bool = False) -> jax.Array:
    """Minus the MI (or normalised MI) of a joint probability table ``(bins, bins)``.

    For callers that build the table themselves, e.g. from ``parzen_weights`` of a
    fixed image computed once: ``p = wa.T @ (wb * mask[:, None])``, divided by its sum.
    """
    p = jnp.asarray(p, jnp.float32)
    ha = _entropy(jnp.sum(p, axis=1))
    hb = _entropy(jnp.sum(p, axis=0))
    hab = _entropy(p)
    if normalised:
        return -(ha + hb) / jnp.maximum(hab, _EPS)
    return -(ha + hb - hab)


def fine_similarity(*, config: MIConfig = MIConfig(percentiles=(0.0, 100.0)),
                    weight: float = 1.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """MI as :func:`jaxreg.solver.fine_stage`'s ``similarity`` on feature volumes.

    Args:
      config: MI settings; the default maps each channel's min/max to the bins (no sort
        per iteration).
      weight: factor on the loss (the fine stage adds ``lambda_weight * diffusion``).

    Returns:
      ``similarity(warped, fixed)``: ``weight`` times the mean over channels of
      :func:`mutual_information` of ``warped[..., c]`` and ``fixed[..., c]``, for
      channels-last ``(..., C)`` volumes.
    """

    def similarity(warped: jax.Array, fixed: jax.Array) -> jax.Array:
        warped = jnp.asarray(warped, jnp.float32)
        fixed = jnp.asarray(fixed, jnp.float32)
        if warped.shape != fixed.shape:
            raise ValueError(f"mutual information: shapes differ: {warped.shape} vs "
                             f"{fixed.shape}")
        per_channel = jax.vmap(lambda w, f: mutual_information(w, f, config=config),
                               in_axes=-1)(warped, fixed)
        return weight * jnp.mean(per_channel)

    return similarity
