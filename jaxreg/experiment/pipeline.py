"""One pair of a study read and put on the fixed grid, with its label maps and masks.

Registering it is :func:`jaxreg.register` (:mod:`jaxreg.registration`), the same call a
user makes; this module only reads what the pairs CSV names."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from jaxreg import features as feat_lib
from jaxreg import io
from jaxreg import registration
from jaxreg.experiment import settings
from jaxreg.experiment.pairs import Pair

__all__ = ["LoadedPair", "load_pair"]

# A label map whose grid covers less of its image than this gets a warning.
_MIN_LABEL_COVERAGE = 0.99


@dataclasses.dataclass
class LoadedPair:
    """A pair read and put on the fixed grid: volumes, label maps, PCA masks."""

    pair: Pair
    fixed: io.Volume
    moving: io.Volume
    labels: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (moving, fixed)
    masks: tuple[np.ndarray, np.ndarray] | None  # (fixed, moving) foreground for the PCA
    # (fixed, moving) similarity weights on the fixed grid (the pair's similarity-mask
    # label maps), or None.
    similarity: tuple[np.ndarray, np.ndarray] | None = None
    # (fixed, moving) landmarks in RAS mm, checked to correspond row by row, or None.
    points: tuple[np.ndarray, np.ndarray] | None = None
    # The moving image's own grid, (shape, affine), before it was put on the fixed grid.
    moving_grid: tuple[tuple[int, ...], np.ndarray] | None = None


def _check_exists(pair: Pair) -> None:
    for column, path in pair.files().items():
        if not os.path.exists(path):
            raise io.InputError(f"{path}: file not found ({column} of {pair.source or pair.name})")


def _labels_on_fixed_grid(path: str, image: io.Volume, fixed: io.Volume) -> np.ndarray:
    """A label map read, checked against its image's extent, put on the fixed grid."""
    labels = io.load_labels(path)
    if not io.same_grid(labels, image):
        covered = io.coverage(labels, image.shape, image.affine)
        if covered < _MIN_LABEL_COVERAGE:
            logging.warning("%s: the label map covers only %.0f%% of its image %s; voxels "
                            "outside it count as background", path, 100 * covered, image.path)
    return registration.on_grid(labels, fixed, order=0).data


def load_pair(pair: Pair, *, config: settings.RegistrationConfig,
              similarity_mask: str = "") -> LoadedPair:
    """Reads a pair, resamples the moving image and labels onto the fixed grid.

    Args:
      pair: the pair.
      config: the registration settings (``mask``: the PCA's mask).
      similarity_mask: the label name whose maps restrict the similarity, when the pair
        has them (``mov_<name>``/``fix_<name>``); ``""``: none.

    Raises:
      io.InputError: a file is missing, unreadable or invalid (landmark files
        included, and their counts must agree), or the PCA mask is not in the pair.
    """
    _check_exists(pair)
    fixed = io.load_volume(pair.fixed)
    moving_own = io.load_volume(pair.moving)
    moving = registration.on_grid(moving_own, fixed, order=1)
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

    similarity = None
    if similarity_mask and similarity_mask in labels:
        moving_mask, fixed_mask = labels[similarity_mask]
        similarity = (registration.similarity_weights(fixed_mask),
                      registration.similarity_weights(moving_mask))
    return LoadedPair(pair, fixed, moving, labels, masks, similarity, _read_points(pair),
                      (moving_own.shape, moving_own.affine))


def _read_points(pair: Pair) -> tuple[np.ndarray, np.ndarray] | None:
    """The pair's (fixed, moving) landmarks, checked to correspond, or None."""
    if not pair.points:
        return None
    from jaxreg.io import points as points_lib

    fixed, moving = (points_lib.read_points(p) for p in pair.points)
    if len(fixed.ras) != len(moving.ras):
        raise io.InputError(f"{pair.points[0]}: {len(fixed.ras)} fixed landmarks but "
                            f"{pair.points[1]} has {len(moving.ras)}; they must correspond "
                            f"row by row")
    return fixed.ras, moving.ras
