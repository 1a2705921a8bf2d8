"""Feature sources: what the solver registers.

A source turns two images on one voxel grid into two channels-last feature volumes
``(H, W, D, C)`` (two ``(H, W)`` images into ``(H, W, C)`` feature images: every source
here works on 2D pairs, which :func:`jaxreg.solver.convex_adam` registers in 2D); the
solver and the batched solver (:func:`jaxreg.solver.batching.register_batch`, 3D) only ever see
those. Handcrafted MIND-SSC is a
source like any foundation-model encoder, so one code path serves both, and
:class:`HybridSource` mixes their channels in one objective.

>>> import numpy as np
>>> img = np.zeros((24, 24, 24), np.float32); img[8:16, 8:16, 8:16] = 1
>>> feats = MindSource()(img, np.roll(img, 1, axis=0))
>>> feats.fixed.shape, MindSource().channels
((24, 24, 24, 12), 12)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxreg.features import encoding
from jaxreg.features import extract as feat_lib
from jaxreg.features import intensity
from jaxreg.features import mind
from jaxreg.features.intensity import PERCENTILES

__all__ = ["PairFeatures", "FeatureSource", "MindSource", "EncoderSource", "HybridSource",
           "hybrid_scales"]


class PairFeatures(NamedTuple):
    """A pair's features on the fixed grid, ``(H, W, D, C)`` (2D: ``(H, W, C)``) float32 each.

    ``coarse_fixed`` / ``coarse_moving``: other features for the solver's coarse stage
    only (a coarse-to-fine pyramid), or None. ``choices``: what the source decided for
    this pair (an encoder's ``render="auto"``: ``{"render": ..., "contrast_agreement":
    ...}``), recorded in the pair's ``metrics.json``; None when nothing was decided.
    """

    fixed: jax.Array
    moving: jax.Array
    coarse_fixed: jax.Array | None = None
    coarse_moving: jax.Array | None = None
    choices: Mapping[str, Any] | None = None


class FeatureSource(Protocol):
    """What every source provides.

    Attributes:
      name: for logs and QC titles.
      channels: ``C`` of the features it makes of 3D images (memory planning).
    """

    name: str
    channels: int

    def __call__(self, fixed: ArrayLike, moving: ArrayLike, *,
                 fixed_mask: ArrayLike | None = None, moving_mask: ArrayLike | None = None,
                 timings: dict[str, float] | None = None) -> PairFeatures:
        """Features of ``(H, W, D)`` (or ``(H, W)``) images on one grid; masks mark the
        foreground (a source may use them, e.g. for the PCA fit); seconds are added to
        ``timings``."""


@functools.partial(jax.jit, static_argnames=("radius", "dilation"))
def _mind_pair(fixed, moving, *, radius, dilation):
    return (mind.mind_ssc(fixed, radius=radius, dilation=dilation),
            mind.mind_ssc(moving, radius=radius, dilation=dilation))


@dataclasses.dataclass(frozen=True)
class MindSource:
    """MIND-SSC of both images, after clipping each to two percentiles and scaling to
    [0, 1] (:func:`jaxreg.features.normalise_intensity`), 12 channels (2D images: the
    2D MIND-SSC's 4, :func:`jaxreg.features.mind.mind_ssc`; ``channels`` is the 3D count).

    Attributes:
      radius, dilation: as in :func:`jaxreg.features.mind.mind_ssc`.
      percentiles: intensity clipping.
    """

    radius: int = 1
    dilation: int = 2
    percentiles: tuple[float, float] = PERCENTILES
    name = "mind"
    channels = 12

    def __call__(self, fixed, moving, *, fixed_mask=None, moving_mask=None, timings=None):
        start = time.perf_counter()
        norm = functools.partial(intensity.normalise_intensity, percentiles=self.percentiles)
        f, m = jax.block_until_ready(_mind_pair(norm(fixed), norm(moving), radius=self.radius,
                                                dilation=self.dilation))
        if timings is not None:
            timings["features"] = timings.get("features", 0.0) + time.perf_counter() - start
        return PairFeatures(f, m)


class EncoderSource:
    """PCA-reduced features of a frozen encoder, slice by slice
    (:func:`jaxreg.features.pair_features`), the output maps of ``config.layers``
    concatenated along channels.

    Args:
      encoder: the slice encoder.
      config: slicing, PCA, fusion and the output maps to use.
      cache: reuse encoded slices from disk.
      coarse_to_fine: the solver's coarse stage gets the last of ``config.layers`` alone
        (a deeper map), the fine stage all of them.
    """

    def __init__(self, encoder: encoding.SliceEncoder, config: feat_lib.FeatureConfig, *,
                 cache: encoding.FeatureCache | None = None, coarse_to_fine: bool = False):
        self.encoder, self.config, self.cache = encoder, config, cache
        self.coarse_to_fine = coarse_to_fine
        self.name = encoder.name
        per_map = config.pca_dims * (len(config.axes) if config.fusion == "concat" else 1)
        self.channels = len(config.layers) * per_map

    def __call__(self, fixed, moving, *, fixed_mask=None, moving_mask=None, timings=None):
        choices: dict = {}
        layers = feat_lib.pair_features(fixed, moving, self.encoder, config=self.config,
                                        fixed_mask=fixed_mask, moving_mask=moving_mask,
                                        cache=self.cache, timings=timings, choices=choices)
        names = self.config.layers
        f = jnp.concatenate([layers[k][0] for k in names], axis=-1)
        m = jnp.concatenate([layers[k][1] for k in names], axis=-1)
        coarse = layers[names[-1]] if self.coarse_to_fine else (None, None)
        return PairFeatures(f, m, *coarse, choices=choices or None)


def _concat(a: jax.Array, b: jax.Array, scale_a: float, scale_b: float) -> jax.Array:
    return jnp.concatenate([a * scale_a, b * scale_b], axis=-1)


def hybrid_scales(weight: float, mind_channels: int, feature_channels: int
                  ) -> tuple[float, float]:
    """Factors on MIND-SSC's and the features' channels such that ``12 x`` the channel mean
    of the concatenation's squared difference is MIND-SSC's objective (``12 x`` its channel
    mean, the solver's default ``similarity_weight``) plus ``weight`` x the features' mean
    squared difference (:class:`HybridSource`). ``mind_channels`` is 12 for 3D images, 4
    for 2D ones."""
    total = mind_channels + feature_channels
    return (math.sqrt(total / mind_channels),
            math.sqrt(weight * total / (12 * feature_channels)))


class HybridSource:
    """MIND-SSC channels and an encoder's PCA channels in one objective.

    The solver's similarity is ``similarity_weight`` times the mean over channels of the
    squared difference. The channels are scaled so that, with the MIND-SSC solver settings
    (``similarity_weight=12``, convexadam's), the objective is MIND-SSC's own plus
    ``weight`` times the mean squared difference of the feature channels:
    ``12 * mean(mind^2) + weight * mean(feat^2)``. ``weight=0`` is MIND-SSC alone.

    The coarse stage sees the same mix (with the encoder's coarse map when it has one).

    Args:
      mind: the MIND-SSC source.
      encoder: the encoder source (its PCA channels scaled to a unit first component).
      weight: the features' weight beside MIND-SSC (>= 0).
    """

    def __init__(self, mind: MindSource, encoder: EncoderSource, *, weight: float):
        if not weight >= 0:
            raise ValueError(f"hybrid weight must be >= 0, got {weight}")
        self.mind, self.encoder, self.weight = mind, encoder, float(weight)
        self.parts = (mind, encoder)
        self.name = f"{encoder.name}+mind"
        self.channels = mind.channels + encoder.channels

    def scales(self, feature_channels: int, mind_channels: int | None = None
               ) -> tuple[float, float]:
        """The factors on the MIND-SSC and the feature channels (:func:`hybrid_scales`);
        ``mind_channels`` defaults to ``mind.channels`` (12; 4 for 2D images)."""
        mind_channels = self.mind.channels if mind_channels is None else mind_channels
        return hybrid_scales(self.weight, mind_channels, feature_channels)

    def __call__(self, fixed, moving, *, fixed_mask=None, moving_mask=None, timings=None):
        m = self.mind(fixed, moving, timings=timings)
        e = self.encoder(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask,
                         timings=timings)
        mc = m.fixed.shape[-1]  # 12, or 4 for 2D images
        a, b = self.scales(e.fixed.shape[-1], mc)
        out = [_concat(m.fixed, e.fixed, a, b), _concat(m.moving, e.moving, a, b)]
        if e.coarse_fixed is not None:
            ac, bc = self.scales(e.coarse_fixed.shape[-1], mc)
            out += [_concat(m.fixed, e.coarse_fixed, ac, bc),
                    _concat(m.moving, e.coarse_moving, ac, bc)]
        return PairFeatures(*out, choices=e.choices)
