"""One pair through the pipeline: load and put on the fixed grid, make features, solve."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxreg import affine as affine_lib
from jaxreg import features as feat_lib
from jaxreg import io
from jaxreg import solver
from jaxreg import sources
from jaxreg import warping
from jaxreg.encoders import registry
from jaxreg.experiment import settings
from jaxreg.experiment.pairs import Pair

__all__ = ["LoadedPair", "load_pair", "make_source", "prealign", "register_volumes"]

# A label map whose grid covers less of its image than this gets a warning.
_MIN_LABEL_COVERAGE = 0.99


def make_source(config: settings.RegistrationConfig, *,
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
    """
    mind = sources.MindSource(radius=config.mind.radius, dilation=config.mind.dilation,
                              percentiles=config.percentiles)
    if config.model is None:
        return mind
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
    if dtype is None:  # "auto": bfloat16 on accelerators, float32 on CPU
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if config.attention == "cudnn" and (jax.default_backend() != "gpu" or dtype != jnp.bfloat16):
        raise settings.ConfigError(
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


def prealign(fixed: io.Volume, moving: io.Volume, *, config: settings.RegistrationConfig,
             moving_mask: np.ndarray | None = None, timings: dict[str, float] | None = None
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The moving image (and mask) resampled by ``config.affine``'s pre-alignment.

    ``moving`` must be on the fixed grid. With ``config.affine == "none"`` the inputs
    come back unchanged with no matrix.

    Returns:
      ``(moving data, moving mask, matrix)``: ``matrix`` maps fixed voxels to moving
      voxels (:func:`jaxreg.affine.register_affine`), or None.
    """
    if config.affine == "none":
        return moving.data, moving_mask, None
    start = time.perf_counter()
    shape = fixed.shape
    result = affine_lib.register_affine(
        fixed.data, moving.data, config=affine_lib.config_for_shape(shape, kind=config.affine))
    disp = affine_lib.displacement(result.matrix, shape)
    data = np.asarray(warping.warp(moving.data, disp))
    if moving_mask is not None:
        moving_mask = np.asarray(warping.warp_labels(moving_mask, disp))
    if timings is not None:
        timings["affine"] = timings.get("affine", 0.0) + time.perf_counter() - start
    return data, moving_mask, result.matrix


def register_volumes(fixed: io.Volume, moving: io.Volume, *,
                     config: settings.RegistrationConfig, source: sources.FeatureSource,
                     masks: tuple[np.ndarray, np.ndarray] | None = None,
                     timings: dict[str, float] | None = None,
                     transform: dict[str, np.ndarray] | None = None
                     ) -> tuple[np.ndarray, jax.Array]:
    """The displacement field (voxels of the fixed grid) aligning ``moving`` to ``fixed``.

    ``moving`` must already be on the fixed grid (see :func:`io.resample_to`).

    Args:
      config: the registration settings (its ``solver``).
      source: from :func:`make_source`.
      masks: ``(fixed, moving)`` foreground masks (an encoder's PCA fit).
      timings: seconds per stage are added to it (the source's stages, and solving).
      transform: with ``config.affine`` other than ``"none"``, receives the
        pre-alignment: ``"voxel"`` (fixed voxel -> moving voxel) and ``"world"`` (fixed
        world -> moving world, RAS) 4x4 matrices.

    Returns:
      ``(field, fixed_features)``: the ``(H, W, D, 3)`` field (with a pre-alignment, the
      total field: affine, then the deformable stage, :func:`jaxreg.affine.compose`),
      and the fixed image's features used by the fine stage, for QC pictures.
    """
    timings = {} if timings is None else timings
    fixed_mask, moving_mask = masks if masks is not None else (None, None)
    moving_data, moving_mask, matrix = prealign(fixed, moving, config=config,
                                                moving_mask=moving_mask, timings=timings)
    feats = source(fixed.data, moving_data, fixed_mask=fixed_mask, moving_mask=moving_mask,
                   timings=timings)
    start = time.perf_counter()
    field = solver.convex_adam(feats.fixed, feats.moving, config=config.solver,
                               coarse_fixed=feats.coarse_fixed,
                               coarse_moving=feats.coarse_moving)
    if matrix is not None:
        field = affine_lib.compose(matrix, field)
        if transform is not None:
            transform.update(voxel=matrix, world=affine_lib.world_matrix(
                matrix, fixed.affine, fixed.affine))
    field = np.asarray(jax.block_until_ready(field))
    timings["solving"] = timings.get("solving", 0.0) + time.perf_counter() - start
    return field, feats.fixed


@dataclasses.dataclass
class LoadedPair:
    """A pair read and put on the fixed grid: volumes, label maps, PCA masks."""

    pair: Pair
    fixed: io.Volume
    moving: io.Volume
    labels: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (moving, fixed)
    masks: tuple[np.ndarray, np.ndarray] | None  # (fixed, moving) foreground for the PCA


def _check_exists(pair: Pair) -> None:
    for column, path in pair.files().items():
        if not os.path.exists(path):
            raise io.InputError(f"{path}: file not found ({column} of {pair.source or pair.name})")


def _on_grid(volume: io.Volume, target: io.Volume, *, order: int) -> io.Volume:
    if io.same_grid(volume, target):
        return volume
    return io.resample_to(volume, target.shape, target.affine, order=order)


def _labels_on_fixed_grid(path: str, image: io.Volume, fixed: io.Volume) -> np.ndarray:
    """A label map read, checked against its image's extent, put on the fixed grid."""
    labels = io.load_labels(path)
    if not io.same_grid(labels, image):
        covered = io.coverage(labels, image.shape, image.affine)
        if covered < _MIN_LABEL_COVERAGE:
            logging.warning("%s: the label map covers only %.0f%% of its image %s; voxels "
                            "outside it count as background", path, 100 * covered, image.path)
    return _on_grid(labels, fixed, order=0).data


def load_pair(pair: Pair, *, config: settings.RegistrationConfig) -> LoadedPair:
    """Reads a pair, resamples the moving image and labels onto the fixed grid.

    Raises:
      io.InputError: a file is missing, unreadable or invalid, or the PCA mask is not
        in the pair.
    """
    _check_exists(pair)
    fixed = io.load_volume(pair.fixed)
    moving_own = io.load_volume(pair.moving)
    moving = _on_grid(moving_own, fixed, order=1)
    labels = {}
    for name, (mov_path, fix_path) in pair.labels.items():
        labels[name] = (_labels_on_fixed_grid(mov_path, moving_own, fixed),
                        _labels_on_fixed_grid(fix_path, fixed, fixed))

    masks = None
    mask_name = config.mask if config.model is not None else ""
    if mask_name == "auto":
        masks = (feat_lib.foreground_mask(fixed.data), feat_lib.foreground_mask(moving.data))
    elif mask_name:
        if mask_name not in labels:
            raise io.InputError(f"pair {pair.name}: features.mask={mask_name!r} but the pair "
                                f"has no mov_{mask_name}/fix_{mask_name} columns "
                                f"(it has {sorted(labels)})")
        masks = (labels[mask_name][1] > 0, labels[mask_name][0] > 0)

    return LoadedPair(pair, fixed, moving, labels, masks)
