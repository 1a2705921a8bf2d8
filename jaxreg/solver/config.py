"""ConvexAdam's settings and the grid helpers both stages share (private; use jaxreg.solver).

:class:`ConvexAdamConfig` is public as ``jaxreg.solver.ConvexAdamConfig`` (the same
class). The helpers handle grids padded at the end of each axis, whose real voxels are
``[0, extent)`` (batches of mixed sizes): masking the padding out, the real cells of a
pooled grid, and the smallest side each stage accepts. Grids are 3D ``(H, W, D, C)`` or
2D ``(H, W, C)`` (features are always channels-last: the rank less one is the number of
spatial axes).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax.numpy as jnp
import numpy as np

from jaxreg import filters


@dataclasses.dataclass(frozen=True)
class ConvexAdamConfig:
    """Settings of both stages; defaults are those of the ``convexadam`` package.

    Attributes:
      grid_sp: coarse-stage pooling factor (cells of ``grid_sp`` voxels).
      disp_hw: half-width of the displacement cube searched, in coarse cells.
      coupling: coupling weights of the successive convex steps.
      ic: make the coarse field inverse consistent with the backward one.
      ic_iterations: fixed-point iterations of the inverse consistency.
      grid_sp_adam: fine-stage grid spacing (the field is optimised at 1/grid_sp_adam).
      lambda_weight: weight of the diffusion regulariser (0 skips the fine stage).
      iterations: Adam iterations.
      learning_rate: Adam step size, in fine-grid voxels.
      smooth_kernel: width of the average pool applied to the field each iteration.
      smooth_num: how many times that pool is applied.
      similarity_weight: factor on the mean squared feature difference (the reference
        multiplies the channel mean by 12, MIND-SSC's channel count; 2D pairs keep 12,
        though 2D MIND-SSC has 4 channels).
      final_smooth: width of three extra pools on the full-resolution field (0: none).
      stop_tolerance: stop the Adam iterations early once the mean absolute update of
        the parameters (fine-grid voxels) falls below this; 0 (default) always runs
        ``iterations`` (one ``lax.scan``; with a tolerance, a ``lax.while_loop``, which
        reverse-mode autodiff cannot go through).
      cpu_kernel: on CPU, compute the fine stage's default similarity and its gradient
        with jaxreg's compiled kernel (:func:`jaxreg.losses.warped_ssd`) where it
        builds; results agree with ``False`` (XLA's gathers, the behaviour before) to
        float rounding. No effect on other backends or with a custom similarity.

    Raises:
      ValueError: a field is out of range (named in the message with what it accepts):
        ``grid_sp``, ``grid_sp_adam`` integers >= 1; ``disp_hw``, ``ic_iterations``,
        ``iterations``, ``smooth_num`` integers >= 0; ``smooth_kernel`` an odd integer
        >= 1 and ``final_smooth`` 0 or odd (centred box filters,
        :func:`jaxreg.filters.box_filter`); ``learning_rate``, ``similarity_weight``
        finite > 0; ``lambda_weight``, ``stop_tolerance`` finite >= 0; ``coupling`` a
        non-empty tuple of finite numbers > 0; ``ic``, ``cpu_kernel`` bools. Bools are
        not accepted as numbers.
    """

    grid_sp: int = 6
    disp_hw: int = 4
    coupling: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    ic: bool = True
    ic_iterations: int = 15
    grid_sp_adam: int = 2
    lambda_weight: float = 1.25
    iterations: int = 80
    learning_rate: float = 1.0
    smooth_kernel: int = 3
    smooth_num: int = 3
    similarity_weight: float = 12.0
    final_smooth: int = 0
    stop_tolerance: float = 0.0
    cpu_kernel: bool = True

    def __post_init__(self):
        for name, low in (("grid_sp", 1), ("grid_sp_adam", 1), ("disp_hw", 0),
                          ("ic_iterations", 0), ("iterations", 0), ("smooth_num", 0)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                self._reject(name, f"an integer >= {low}")
        if not _is_int(self.smooth_kernel) or self.smooth_kernel < 1 or self.smooth_kernel % 2 != 1:
            self._reject("smooth_kernel", "an odd integer >= 1 (the width of a centred box "
                                          "filter: 1, 3, 5, ...)")
        if not _is_int(self.final_smooth) or self.final_smooth < 0 or (
                self.final_smooth > 0 and self.final_smooth % 2 != 1):
            self._reject("final_smooth", "0 (off) or an odd integer >= 1 (the width of a "
                                         "centred box filter: 1, 3, 5, ...)")
        for name, positive in (("learning_rate", True), ("similarity_weight", True),
                               ("lambda_weight", False), ("stop_tolerance", False)):
            value = getattr(self, name)
            if not _is_finite(value) or value < 0 or (positive and value == 0):
                self._reject(name, f"a finite number {'>' if positive else '>='} 0")
        if (not isinstance(self.coupling, tuple) or not self.coupling
                or not all(_is_finite(c) and c > 0 for c in self.coupling)):
            self._reject("coupling", "a non-empty tuple of finite numbers > 0")
        for name in ("ic", "cpu_kernel"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                self._reject(name, "a bool")

    def _reject(self, name, accepts):
        raise ValueError(f"ConvexAdamConfig.{name} must be {accepts}, "
                         f"got {getattr(self, name)!r}")


# Public as jaxreg.solver.ConvexAdamConfig (the same class): name it so in reprs and pickles.
ConvexAdamConfig.__module__ = "jaxreg.solver"


def _is_int(value) -> bool:
    """An integer that is not a bool (``True`` would pass as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_finite(value) -> bool:
    """A finite real number that is not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def _min_side(config: ConvexAdamConfig) -> int:
    """The smallest grid side the stages run on: one coarse cell (``grid_sp`` voxels)
    and, with the fine stage on, one fine cell (``grid_sp_adam``). Box filters, the cost
    search and the resizes work on grids of one cell."""
    return max(config.grid_sp, config.grid_sp_adam if config.lambda_weight > 0 else 1)


def _masked(x, mask):
    """``x`` zeroed outside ``mask`` (a ``(h, w, d)`` 0/1 grid); no-op without one."""
    if mask is None:
        return x
    return x * (mask if x.ndim == mask.ndim else mask[..., None])


def _pooled_weights(mask, factor, nd):
    """A ``(H, W, D)`` (2D ``(H, W)``) similarity mask average-pooled to cells of
    ``factor`` voxels (the fraction of each cell inside it), or None."""
    if mask is None:
        return None
    return filters.avg_pool(jnp.asarray(mask, jnp.float32), factor, spatial_dims=nd)


def _real_cells(pooled_shape, extent, factor):
    """For a padded grid pooled by ``factor``: the 0/1 mask of its real cells and the
    ``(voxels, cells)`` real sizes (for :func:`filters.resize`'s ``extents``).

    A real side shorter than ``factor`` keeps one cell, the one that overlaps it (its
    mean includes some padding: pad with copies of the border, as
    :func:`jaxreg.solver.convex_adam` does); without it the real grid would be empty."""
    extent = jnp.asarray(extent, jnp.int32)
    cells = jnp.maximum(extent // factor, 1)
    return filters.extent_mask(pooled_shape, cells), (extent, cells)


def _check_side(where, shape, factor, name):
    """Raises unless every spatial side of the channels-last ``shape`` (3D or 2D) holds
    one cell of ``factor`` voxels."""
    if len(shape) not in (3, 4) or min(shape[:-1]) < factor:
        raise ValueError(f"{where}: every side of the grid must be at least {name}={factor} "
                         f"voxels, got shape {tuple(shape)}; convex_adam pads smaller volumes")

