"""Principal component analysis of feature tokens, in JAX: step 5 of :mod:`jaxreg.features`.

:func:`fit_pca` fits one basis jointly on several blocks of tokens (the moving and fixed
ones, optionally weighted by a foreground mask); :func:`project` applies it. All three
names are re-exported by :mod:`jaxreg.features`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["PCA", "fit_pca", "project"]


@dataclasses.dataclass(frozen=True)
class PCA:
    """A fitted PCA: ``project(x) = (x - mean) @ components / scale``."""

    mean: jax.Array  # (C,)
    components: jax.Array  # (C, k), unit columns, largest variance first
    variances: jax.Array  # (k,)
    scale: float = 1.0


@jax.jit
def _moments(x, w):
    return jnp.sum(w), w @ x


@jax.jit
def _scatter(x, w, mean):
    xc = (x - mean) * jnp.sqrt(w)[:, None]
    return xc.T @ xc


def fit_pca(samples: Sequence[ArrayLike], *, dims: int,
            weights: Sequence[ArrayLike] | None = None, scale: bool = True) -> PCA:
    """Principal components of the rows of several ``(N_i, C)`` arrays together.

    The mean and covariance are accumulated block by block (two passes, float32), then
    ``jnp.linalg.eigh`` of the ``C x C`` covariance. Signs are fixed so that each
    component's entry of largest magnitude is positive.

    Args:
      samples: blocks of feature rows (e.g. the fixed and moving tokens).
      dims: components kept (at most ``C``).
      weights: per-row weights of each block (e.g. a 0/1 foreground mask); None: all 1.
      scale: set :attr:`PCA.scale` to the first component's standard deviation.

    Raises:
      ValueError: no row has weight, or ``dims`` exceeds the channel count.
    """
    samples = [jnp.asarray(s, jnp.float32).reshape(-1, np.shape(s)[-1]) for s in samples]
    c = samples[0].shape[-1]
    if dims > c:
        raise ValueError(f"PCA to {dims} dims from {c} channels")
    if weights is None:
        weights = [jnp.ones(s.shape[0], jnp.float32) for s in samples]
    weights = [jnp.asarray(w, jnp.float32).reshape(-1) for w in weights]
    count, total = 0.0, jnp.zeros(c, jnp.float32)
    for s, w in zip(samples, weights):
        n, t = _moments(s, w)
        count, total = count + n, total + t
    if float(count) <= 0:
        raise ValueError("PCA: no sample inside the mask")
    mean = total / count
    cov = sum(_scatter(s, w, mean) for s, w in zip(samples, weights)) / count
    values, vectors = jnp.linalg.eigh(cov)
    values, vectors = values[::-1][:dims], vectors[:, ::-1][:, :dims]
    pick = jnp.argmax(jnp.abs(vectors), axis=0)
    vectors = vectors * jnp.sign(vectors[pick, jnp.arange(dims)])
    values = jnp.maximum(values, 0.0)
    s = float(jnp.sqrt(values[0])) if scale and float(values[0]) > 0 else 1.0
    return PCA(mean=mean, components=vectors, variances=values, scale=s)


def project(x: ArrayLike, pca: PCA) -> jax.Array:
    """``(..., C)`` features -> ``(..., k)`` principal components (scaled)."""
    return (jnp.asarray(x, jnp.float32) - pca.mean) @ pca.components / pca.scale
