"""One pair registered in one call: ``jaxreg.register(fixed, moving) -> Transform``.

>>> import jaxreg
>>> t = jaxreg.register("fixed.nii.gz", "moving.nii.gz")                # doctest: +SKIP
>>> t = jaxreg.register(fixed, moving, method="litemedsam+mind", affine="affine",
...                     fixed_mask="fixed_breast.nii.gz")               # doctest: +SKIP
>>> warped = t.apply("moving_phase2.nii.gz")                            # doctest: +SKIP
>>> t.export("out/", inverse=t.inverse(moving))                         # doctest: +SKIP

The stages, each a function here so that the study (``python -m experiments.breast``)
and its batched path run the very same ones:

1. the moving image (and its mask) put on the fixed grid through the two affines;
2. :func:`prealign`: the optional affine stage (:mod:`jaxreg.solver.affine`);
3. the feature source (:func:`make_source`: MIND-SSC, an encoder, or a hybrid) turns
   both images into feature volumes;
4. ConvexAdam (:func:`jaxreg.solver.convex_adam`) registers them, restricted to the
   similarity masks when given;
5. the result is a :class:`jaxreg.transform.Transform`.

Settings: :class:`RegistrationConfig` (frozen, typed); :func:`default_config` gives the
defaults of every method, the same as the CLI's (``experiments/configs/breast.py`` is
built from them).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxreg import features as feat_lib
from jaxreg import io
from jaxreg import solver
from jaxreg import warping
from jaxreg.encoders import registry
from jaxreg.features import sources
from jaxreg.features.intensity import PERCENTILES
from jaxreg.solver import affine as affine_lib
from jaxreg.transform import Transform

__all__ = ["HYBRID_SUFFIX", "METHODS", "AFFINES", "ConfigError", "MindSettings", "RegistrationConfig",
           "default_config", "make_source", "prealign", "register", "register_on_grid",
           "similarity_weights", "on_grid", "to_transform", "solver_defaults",
           "default_pyramid"]

HYBRID_SUFFIX = "+mind"
METHODS = (("mind",) + tuple(registry.ENCODERS)
           + tuple(name + HYBRID_SUFFIX for name in registry.ENCODERS))
Pyramid = Literal["none", "joint", "coarse_to_fine"]
Dtype = Literal["auto", "float32", "bfloat16"]
Attention = Literal["xla", "cudnn"]
Affine = Literal["none", "rigid", "affine"]
AFFINES = get_args(Affine)

# Fine-stage settings per method. "mind" (and every hybrid) uses the convexadam package's
# defaults (ConvexAdamConfig's); foundation features use the Adam settings of the
# reference paper's code (Gu et al., arXiv 2507.11569; github.com/mazurowski-lab/
# Foundation-based-reg): lr 3, 1000 iterations, lambda 2, grid 2, a width-7 pool applied 5
# times, SSD loss. Their PCA features are scaled to a unit first component
# (FeatureConfig.scale), so the similarity weight is 1 instead of MIND-SSC's 12 channels.
_REFERENCE_ADAM = dict(lambda_weight=2.0, iterations=1000, learning_rate=3.0,
                       smooth_kernel=7, smooth_num=5, similarity_weight=1.0)
# A hybrid "<encoder>+mind" adds the encoder's PCA channels with this weight beside
# MIND-SSC's objective. Measured on the real T1/T2 pair (BUILD.md, "Real features"):
# LiteMedSAM's channels lower mean CerebrA Dice as the weight grows (MIND alone 0.904;
# weight 0.1: 0.904, 0.25: 0.902, 0.5: 0.900, 2: 0.877), so the default is the small
# weight that costs nothing measurable; raise it where features are known to help.
HYBRID_WEIGHT = 0.1


class ConfigError(io.InputError):
    """A setting that cannot work; the message names the field and what it accepts."""


@dataclasses.dataclass(frozen=True)
class MindSettings:
    """MIND-SSC's patch radius and neighbour dilation (:func:`jaxreg.features.mind.mind_ssc`)."""

    radius: int = 1
    dilation: int = 2


@dataclasses.dataclass(frozen=True)
class RegistrationConfig:
    """How one pair is registered.

    Attributes:
      encoder: the method: ``"mind"`` (handcrafted MIND-SSC), an encoder of the
        registry, or a hybrid ``"<encoder>+mind"`` (MIND-SSC and the encoder's PCA
        channels in one objective, :class:`jaxreg.features.sources.HybridSource`).
      solver: the ConvexAdam settings.
      mind: MIND-SSC settings (used by ``"mind"`` and the hybrids).
      hybrid_weight: a hybrid's feature weight beside MIND-SSC (0: MIND-SSC alone).
      features: the encoder's slicing, PCA and output maps; None for MIND-SSC.
      pyramid: how an encoder's output maps are used: the last one (``"none"``, the
        reference), several at once (``"joint"``), or a deeper one for the coarse stage
        (``"coarse_to_fine"``).
      percentiles: intensity clipping before MIND-SSC or the encoder.
      weights: the encoder's checkpoint; ``""`` searches (``registry.find_weights``).
      mask: what an encoder's PCA is fitted on: ``"auto"`` (foreground), a label name
        of the pair (the study), or ``""`` (every token).
      dtype: the encoder's compute dtype (``"auto"``: bfloat16 on accelerators).
      attention: a ViT encoder's attention kernel: ``"xla"`` (XLA's composition) or
        ``"cudnn"`` (cuDNN's fused kernel; NVIDIA GPUs, bfloat16).
      cache: keep encoded slices on disk (the study).
      affine: pre-alignment before the deformable stage (:mod:`jaxreg.solver.affine`):
        ``"none"``, ``"rigid"`` or ``"affine"``.
    """

    encoder: str = "mind"
    solver: solver.ConvexAdamConfig = solver.ConvexAdamConfig()
    mind: MindSettings = MindSettings()
    hybrid_weight: float = 0.0
    features: feat_lib.FeatureConfig | None = None
    pyramid: Pyramid = "none"
    percentiles: tuple[float, float] = PERCENTILES
    weights: str = ""
    mask: str = "auto"
    dtype: Dtype = "auto"
    attention: Attention = "xla"
    cache: bool = True
    affine: Affine = "none"

    @property
    def model(self) -> str | None:
        """The registry encoder used (``"litemedsam"`` for ``"litemedsam+mind"``), or None."""
        name = self.encoder.removesuffix(HYBRID_SUFFIX)
        return None if name == "mind" else name

    @property
    def uses_mind(self) -> bool:
        """Whether MIND-SSC is (part of) the similarity."""
        return self.encoder == "mind" or self.encoder.endswith(HYBRID_SUFFIX)


def solver_defaults(method: str) -> solver.ConvexAdamConfig:
    """The solver settings of ``method`` (see ``_REFERENCE_ADAM`` above)."""
    if method == "mind" or method.endswith(HYBRID_SUFFIX):
        return solver.ConvexAdamConfig()
    return solver.ConvexAdamConfig(**_REFERENCE_ADAM)


def default_pyramid(method: str) -> str:
    """LiteMedSAM uses several depths at once (``"joint"``: better Dice and field error
    than its last layer on the phantom and MNI benchmarks at the same encoding cost,
    BUILD.md); the others the reference's last layer until measured with real weights."""
    return "joint" if method == "litemedsam" else "none"


def default_config(method: str = "mind", *, affine: str = "none",
                   weights: str = "") -> RegistrationConfig:
    """The settings ``method`` registers with by default (the CLI's, for every method).

    Raises:
      ValueError: an unknown method or affine kind (the message lists the known ones).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose from {', '.join(METHODS)}")
    if affine not in AFFINES:
        raise ValueError(f"affine={affine!r}: choose from {', '.join(AFFINES)}")
    model = method.removesuffix(HYBRID_SUFFIX)
    hybrid = model != method
    features = None
    pyramid = default_pyramid(method)
    if model != "mind":
        entry = registry.ENCODERS[model]
        # render="auto": the gradient input for cross-contrast pairs, where the
        # intensity input left a real T1->T2 pair worse than no registration
        features = feat_lib.FeatureConfig(
            layers=("features",) if pyramid == "none" else entry.pyramid,
            pca_dims=entry.pca_dims, render="auto")
    return RegistrationConfig(encoder=method, solver=solver_defaults(method),
                              hybrid_weight=HYBRID_WEIGHT if hybrid else 0.0,
                              features=features, pyramid=pyramid, weights=str(weights),
                              affine=affine)


def make_source(config: RegistrationConfig, *,
                devices: Sequence[jax.Device] | None = None,
                cache: feat_lib.FeatureCache | None = None) -> sources.FeatureSource:
    """The feature source of ``config``, loaded once: MIND-SSC, an encoder, or both.

    Args:
      config: the registration settings.
      devices: when several, an encoder's slice chunks are sharded over them.
      cache: encoded-slice cache for an encoder.

    Raises:
      registry.WeightsNotFoundError: no weights where they were looked for.
      CheckpointError: the weights do not fit the encoder.
      ConfigError: ``attention="cudnn"`` off an NVIDIA GPU or without bfloat16.
    """
    mind = sources.MindSource(radius=config.mind.radius, dilation=config.mind.dilation,
                              percentiles=config.percentiles)
    if config.model is None:
        return mind
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
    if dtype is None:  # "auto": bfloat16 on accelerators, float32 on CPU
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if config.attention == "cudnn" and (jax.default_backend() != "gpu" or dtype != jnp.bfloat16):
        raise ConfigError(
            f"features.attention='cudnn' needs an NVIDIA GPU and bfloat16 (backend "
            f"{jax.default_backend()}, dtype {jnp.dtype(dtype).name}); use 'xla'")
    path = registry.find_weights(config.model, config.weights or None)
    model, spec = registry.load_encoder(config.model, path, dtype=dtype)
    from jaxreg.encoders import vit  # with the encoders only: MIND-SSC runs never load flax

    if config.attention != "xla" and not vit.set_attention(model, config.attention):
        logging.warning("features.attention=%r: encoder %s has no ViT attention layers; "
                        "its own attention runs", config.attention, config.model)
    fc = config.features
    encoder = feat_lib.SliceEncoder(
        model, spec, layers=fc.layers, image_size=fc.image_size, chunk=fc.chunk,
        devices=devices, name=f"{config.model}:{path}")
    source = sources.EncoderSource(encoder, fc, cache=cache,
                                   coarse_to_fine=config.pyramid == "coarse_to_fine")
    if not config.uses_mind:
        return source
    return sources.HybridSource(mind, source, weight=config.hybrid_weight)


def prealign(fixed: io.Volume, moving: io.Volume, *, config: RegistrationConfig,
             fixed_mask: np.ndarray | None = None,
             moving_masks: Sequence[np.ndarray | None] = (),
             timings: dict[str, float] | None = None
             ) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray | None]:
    """The moving image (and masks) resampled by ``config.affine``'s pre-alignment.

    ``moving`` and its masks must be on the fixed grid. The affine stage's similarity is
    restricted to the similarity masks when given (``fixed_mask``, and the first of
    ``moving_masks``). With ``config.affine == "none"`` the inputs come back unchanged.

    Returns:
      ``(moving data, moving masks, matrix)``: ``matrix`` maps fixed voxels to moving
      voxels (:func:`jaxreg.solver.affine.register_affine`), or None.
    """
    moving_masks = list(moving_masks)
    if config.affine == "none":
        return moving.data, moving_masks, None
    start = time.perf_counter()
    shape = fixed.shape
    result = affine_lib.register_affine(
        fixed.data, moving.data, config=affine_lib.config_for_shape(shape, kind=config.affine),
        mask=fixed_mask, moving_mask=moving_masks[0] if moving_masks else None)
    disp = affine_lib.displacement(result.matrix, shape)
    data = np.asarray(warping.warp(moving.data, disp))
    # Boolean masks (the PCA's) stay masks (nearest); weights are interpolated.
    moving_masks = [None if m is None else np.asarray(warping.warp_labels(m, disp))
                    if m.dtype == bool else np.clip(np.asarray(warping.warp(m, disp)), 0, 1)
                    for m in moving_masks]
    if timings is not None:
        timings["affine"] = timings.get("affine", 0.0) + time.perf_counter() - start
    return data, moving_masks, result.matrix


def similarity_weights(mask) -> np.ndarray | None:
    """A mask (labels, bools or weights) as float32 weights: nonzero labels count 1."""
    if mask is None:
        return None
    m = np.asarray(mask)
    return (m > 0).astype(np.float32) if m.dtype.kind in "biu" else np.clip(
        m.astype(np.float32), 0.0, 1.0)


def register_on_grid(fixed: io.Volume, moving: io.Volume, *, config: RegistrationConfig,
                     source: sources.FeatureSource,
                     pca_masks: tuple[np.ndarray, np.ndarray] | None = None,
                     fixed_mask: np.ndarray | None = None,
                     moving_mask: np.ndarray | None = None,
                     timings: dict[str, float] | None = None,
                     choices: dict | None = None
                     ) -> tuple[Transform, jax.Array]:
    """Stages 2-5 for a moving image (and masks) already on the fixed grid.

    Args:
      config: the registration settings.
      source: from :func:`make_source`.
      pca_masks: ``(fixed, moving)`` foreground masks an encoder's PCA is fitted on.
      fixed_mask, moving_mask: similarity weights (:func:`similarity_weights`) on the
        fixed grid, or None.
      timings: seconds per stage are added to it (affine, the source's, solving).
      choices: receives what the source decided for the pair (``PairFeatures.choices``).

    Returns:
      ``(transform, fixed_features)``: the fixed image's features used by the fine
      stage, for QC pictures.
    """
    timings = {} if timings is None else timings
    fixed_pca, moving_pca = pca_masks if pca_masks is not None else (None, None)
    moving_data, (moving_mask, moving_pca), matrix = prealign(
        fixed, moving, config=config, fixed_mask=fixed_mask,
        moving_masks=(moving_mask, moving_pca), timings=timings)
    feats = source(fixed.data, moving_data, fixed_mask=fixed_pca, moving_mask=moving_pca,
                   timings=timings)
    if choices is not None and feats.choices:
        choices.update(feats.choices)
    start = time.perf_counter()
    field = solver.convex_adam(feats.fixed, feats.moving, config=config.solver,
                               coarse_fixed=feats.coarse_fixed,
                               coarse_moving=feats.coarse_moving,
                               fixed_mask=fixed_mask, moving_mask=moving_mask)
    field = np.asarray(jax.block_until_ready(field))
    timings["solving"] = timings.get("solving", 0.0) + time.perf_counter() - start
    return to_transform(field, fixed.affine, matrix), feats.fixed


def to_transform(deformable: np.ndarray, affine: np.ndarray,
                 matrix: np.ndarray | None) -> Transform:
    """The :class:`Transform` of a deformable field on the fixed grid after an optional
    pre-alignment ``matrix`` (fixed voxel -> moving voxel, both on the fixed grid).

    Raises:
      ValueError: the field has NaN or Inf values: the registration diverged
        (:func:`jaxreg.solver.check_field`'s message, rather than the Transform's).
    """
    solver.check_field(deformable)
    world = None if matrix is None else affine_lib.world_matrix(matrix, affine, affine)
    return Transform.from_stages(deformable, affine, world)


def _volume(value, what: str, *, labels: bool = False) -> io.Volume:
    """A :class:`jaxreg.io.Volume` from a Volume, a file, or an array (1 mm, identity)."""
    if isinstance(value, io.Volume):
        return value
    if isinstance(value, (str, os.PathLike)):
        return io.load_labels(value) if labels else io.load_volume(value)
    data = np.asarray(value)
    if data.ndim != 3:
        raise ValueError(f"{what}: expected a Volume, a file or an (H, W, D) array, got an "
                         f"array of shape {data.shape}")
    return io.Volume(data=data if labels else data.astype(np.float32), affine=np.eye(4))


def on_grid(volume: io.Volume, target: io.Volume, *, order: int) -> io.Volume:
    """``volume`` resampled onto ``target``'s grid (``order`` 1: images, 0: labels), or
    itself when already there."""
    if io.same_grid(volume, target):
        return volume
    return io.resample_to(volume, target.shape, target.affine, order=order)


def _mask_on_grid(value, image: io.Volume, fixed: io.Volume, what: str) -> np.ndarray | None:
    """A similarity mask (Volume, file, or array on ``image``'s grid) as weights on the
    fixed grid."""
    if value is None:
        return None
    m = _volume(value, what, labels=True)
    if not isinstance(value, (io.Volume, str, os.PathLike)):
        if m.shape != image.shape:
            raise ValueError(f"register: {what} {m.shape} is not its image's grid "
                             f"{image.shape}")
        m = dataclasses.replace(m, affine=image.affine)
    return similarity_weights(on_grid(m, fixed, order=0).data)


def register(fixed, moving, *, method: str = "mind", affine: str = "none",
             config: RegistrationConfig | None = None, weights: str = "",
             fixed_mask=None, moving_mask=None,
             source: sources.FeatureSource | None = None,
             pca_masks: tuple[np.ndarray, np.ndarray] | None = None,
             timings: dict[str, float] | None = None,
             extras: dict | None = None) -> Transform:
    """Registers ``moving`` to ``fixed``: the transform that maps fixed to moving space.

    Args:
      fixed, moving: :class:`jaxreg.io.Volume` s, files (NIfTI, NRRD, a DICOM series
        folder), or ``(H, W, D)`` arrays (1 mm voxels, identity affine; a moving array
        must then have the fixed array's shape). The moving image may lie on any grid and
        orientation: it is resampled onto the fixed grid through the affines first.
      method: ``"mind"``, an encoder (``"litemedsam"``, ``"sam"``, ... see
        :data:`METHODS`) or a hybrid ``"<encoder>+mind"``.
      affine: ``"none"``, ``"rigid"`` or ``"affine"`` pre-alignment.
      config: full settings instead of ``method``/``affine``/``weights`` (which must then
        be left at their defaults); see :func:`default_config`.
      weights: an encoder's checkpoint (file or Hugging Face folder); ``""`` searches.
      fixed_mask, moving_mask: restrict the similarity to these (cost-function masking,
        as ANTs' ``-x``): each a Volume, a file, or an array on its image's grid; label
        maps count where nonzero. The moving mask lies on the moving image's grid.
      source: a feature source from :func:`make_source` to reuse across calls (an
        encoder's weights are then loaded once).
      pca_masks: ``(fixed, moving)`` boolean masks on the fixed grid that an encoder's
        PCA is fitted on; default from ``config.mask`` (``"auto"``: the foreground).
      timings: seconds per stage are added to it.
      extras: receives ``"fixed_features"`` (the fine stage's, for QC) and ``"choices"``
        (what the settings left to the pair: ``render="auto"``'s choice).

    Returns:
      A :class:`jaxreg.transform.Transform` on the fixed grid; the same field the CLI
      (``jaxreg register``, ``python -m experiments.breast``) gives for these settings.

    Raises:
      ValueError: unknown method or affine kind, settings given twice, arrays of other
        shapes; jaxreg.io.InputError: an unreadable file.
    """
    if config is None:
        config = default_config(method, affine=affine, weights=weights)
    elif (method, affine, weights) != ("mind", "none", ""):
        raise ValueError("register: give either config or method/affine/weights, not both")
    fixed = _volume(fixed, "fixed")
    moving_own = _volume(moving, "moving")
    if not isinstance(moving, (io.Volume, str, os.PathLike)) and moving_own.shape != fixed.shape:
        raise ValueError(f"register: a moving array must have the fixed shape {fixed.shape} "
                         f"(give Volumes with affines for other grids), got {moving_own.shape}")
    moving_vol = on_grid(moving_own, fixed, order=1)
    masks = [_mask_on_grid(value, own, fixed, what) for value, own, what in (
        (fixed_mask, fixed, "fixed_mask"), (moving_mask, moving_own, "moving_mask"))]
    if pca_masks is None and config.model is not None and config.mask:
        if config.mask != "auto":
            raise ValueError(f"register: mask={config.mask!r} names a label map of a "
                             f"study's pair; give pca_masks, or use 'auto' or ''")
        pca_masks = tuple(feat_lib.foreground_mask(v.data) for v in (fixed, moving_vol))
    source = make_source(config) if source is None else source
    choices: dict = {}
    transform, fixed_features = register_on_grid(
        fixed, moving_vol, config=config, source=source, pca_masks=pca_masks,
        fixed_mask=masks[0], moving_mask=masks[1], timings=timings, choices=choices)
    if extras is not None:
        extras.update(fixed_features=fixed_features, choices=choices)
    return transform
