"""ConvexAdam in JAX: coupled convex discrete optimisation, then Adam instance optimisation.

Siebert, Grossbrohmer, Hansen, Heinrich, "ConvexAdam: self-configuring dual-optimisation-
based 3D multitask medical image registration", IEEE TMI 2024.

Everything works on one pair of channels-last feature volumes ``(H, W, D, C)`` on the same
voxel grid (MIND-SSC, or PCA-reduced foundation-model features) and returns a voxel
displacement field ``(H, W, D, 3)`` in jaxreg's pull convention
(``warped(x) = moving(x + u(x))``, see :mod:`jaxreg.warping`). Batch pairs with
``jax.vmap``; settings are a frozen (hashable) :class:`ConvexAdamConfig`, static under
``jax.jit``, so one compilation serves every pair of one shape.

2D pairs: features ``(H, W, C)`` (images ``(H, W)`` for :func:`register_mind`) give
``(H, W, 2)`` fields through the same functions; the rank of the features sets the
dimension. The settings mean the same in 2D (cells of ``grid_sp`` pixels, a square of
offsets, the diffusion over two axes); 2D always uses XLA (the CPU kernels are 3D).

Differences from the PyTorch reference, all deliberate: displacements are exact voxels at
every stage (the reference mixes ``align_corners`` conventions, scaling fine-stage steps
by ``n / (n - 1)``); without inverse consistency the coarse field is still upsampled to
full resolution; the result is the smoothed field of the final parameters.

Where the pieces are (every public name is importable from :mod:`jaxreg.solver`): :class:`ConvexAdamConfig`
and the padded-grid helpers both stages use in ``jaxreg/solver/config.py``; the coarse
stage (:func:`correlation_cost`, :func:`coupled_convex`, :func:`inverse_consistency`,
:func:`coarse_stage`) in ``jaxreg/solver/coarse.py``; the checks of concrete inputs and
:func:`check_field` in ``jaxreg/solver/checks.py``; the fine stage and the entry points
(:func:`convex_adam`, :func:`register_mind`) in this module.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jaxreg import compilation
from jaxreg import filters
from jaxreg import losses
from jaxreg import regularisers
from jaxreg import warping as warp_lib
from jaxreg.features import intensity
from jaxreg.features import mind
from jaxreg.features.intensity import PERCENTILES
from jaxreg.kernels import cpu as cpu_kernels
from jaxreg.solver.coarse import coarse_stage
from jaxreg.solver.config import (ConvexAdamConfig, _check_side, _masked, _min_side,
                                 _pooled_weights, _real_cells)
from jaxreg.solver.checks import _check_features, _check_images

__all__ = ["fine_stage", "convex_adam", "register_mind"]


Loss = Callable[[jax.Array, jax.Array], jax.Array]


def _smooth(field, config, mask=None):
    """``field`` box-filtered ``smooth_num`` times (zeroed outside ``mask`` before each);
    without a mask, with ``config.cpu_kernel``, by the compiled CPU kernel (3D only)."""
    nd = field.shape[-1]
    if (mask is None and nd == 3 and config.cpu_kernel and config.smooth_num
            and cpu_kernels.usable()):
        return cpu_kernels.box_smooth(field, config.smooth_kernel, config.smooth_num)
    for _ in range(config.smooth_num):
        field = filters.box_filter(_masked(field, mask), config.smooth_kernel, spatial_dims=nd)
    return field


def _adam(loss_fn: Callable[[jax.Array], jax.Array], params: jax.Array,
          config: ConvexAdamConfig, mask: jax.Array | None = None) -> jax.Array:
    """``config.iterations`` Adam steps on ``loss_fn`` from ``params``: one ``lax.scan``,
    or with ``config.stop_tolerance`` a ``lax.while_loop`` that also stops once the mean
    absolute update of the parameters (over ``mask``'s cells) is below the tolerance."""
    opt = optax.adam(config.learning_rate)

    def step(p, state):
        updates, state = opt.update(jax.grad(loss_fn)(p), state, p)
        return optax.apply_updates(p, updates), state, updates

    if not config.stop_tolerance:
        def scan_step(carry, _):
            p, state, _ = step(*carry)
            return (p, state), None

        (params, _), _ = jax.lax.scan(scan_step, (params, opt.init(params)), None,
                                      length=config.iterations)
        return params

    cells = params.size if mask is None else params.shape[-1] * jnp.maximum(jnp.sum(mask), 1.0)

    def keep_going(carry):
        i, _, _, change = carry
        return (i < config.iterations) & (change >= config.stop_tolerance)

    def body(carry):
        i, p, state, _ = carry
        p, state, updates = step(p, state)
        return i + 1, p, state, jnp.sum(jnp.abs(_masked(updates, mask))) / cells

    carry = (0, params, opt.init(params), jnp.asarray(jnp.inf, jnp.float32))
    return jax.lax.while_loop(keep_going, body, carry)[1]


def fine_stage(fixed: ArrayLike, moving: ArrayLike, init: ArrayLike, *,
               config: ConvexAdamConfig = ConvexAdamConfig(),
               similarity: Loss | None = None,
               extent: ArrayLike | None = None,
               fixed_mask: ArrayLike | None = None,
               moving_mask: ArrayLike | None = None) -> jax.Array:
    """Adam instance optimisation of a smoothed low-resolution displacement grid.

    Minimises ``similarity(warp(moving, u), fixed) + lambda_weight * diffusion(u)`` on a
    grid ``grid_sp_adam`` times coarser, ``u`` being the parameters average-pooled
    ``smooth_num`` times; the loop is one ``lax.scan``.

    Args:
      fixed, moving: ``(H, W, D, C)`` feature volumes; 2D ``(H, W, C)``.
      init: ``(H, W, D, 3)`` (2D: ``(H, W, 2)``) start, e.g. from :func:`coarse_stage`.
      config: settings.
      similarity: ``(warped, fixed) -> scalar`` on the pooled features; default
        ``similarity_weight * losses.ssd``, computed with :func:`losses.warped_ssd`
        (one fused pass on CPU, see ``config.cpu_kernel``). On a padded grid
        (``extent``), the padding of both reads zero: a custom similarity should mask it
        out itself.
      extent: real size of padded inputs, as in :func:`coarse_stage`; pad to a multiple
        of ``grid_sp_adam``.

    Returns:
      ``(H, W, D, 3)`` displacement in voxels; 2D ``(H, W, 2)``.

    Raises:
      ValueError: a side of the inputs is shorter than ``grid_sp_adam``
        (:func:`convex_adam` pads such volumes).
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    g = config.grid_sp_adam
    _check_side("fine_stage", fixed.shape, g, "grid_sp_adam")
    nd = fixed.ndim - 1
    pf = filters.avg_pool(fixed, g, spatial_dims=nd)
    pm = filters.avg_pool(moving, g, spatial_dims=nd)
    mask, down, up = None, None, None
    if extent is not None:
        mask, down = _real_cells(pf.shape, extent, g)
        up = down[::-1]
        pf, pm = _masked(pf, mask), _masked(pm, mask)
    weight, moving_weight = _fine_weights(fixed_mask, moving_mask, mask, g, nd)
    if similarity is None:
        def data(u):
            w = weight
            if moving_weight is not None:
                w = _times(w, jax.lax.stop_gradient(warp_lib.warp(moving_weight, u)))
            return config.similarity_weight * losses.warped_ssd(pm, u, pf, mask=w,
                                                                kernel=config.cpu_kernel)
    elif fixed_mask is not None or moving_mask is not None:
        raise ValueError("fine_stage: similarity masks apply to the default similarity; "
                         "a custom similarity must weight its residuals itself")
    else:
        data = lambda u: similarity(warp_lib.warp(pm, u), pf)
    params = filters.resize(jnp.asarray(init, jnp.float32), pf.shape[:nd], extents=down) / g

    def loss_fn(p):
        u = _smooth(p, config, mask)
        return data(u) + config.lambda_weight * regularisers.diffusion(u, mask=mask)

    params = _adam(loss_fn, params, config, mask)
    field = filters.resize(_smooth(params, config, mask) * g, fixed.shape[:nd], extents=up)
    if config.final_smooth > 0:
        full = None if extent is None else filters.extent_mask(fixed.shape, extent)
        for _ in range(3):
            field = filters.box_filter(_masked(field, full), config.final_smooth,
                                       spatial_dims=nd)
    return field


def _times(a, b):
    """``a * b`` where either may be None (no weight)."""
    return b if a is None else a if b is None else a * b


def _fine_weights(fixed_mask, moving_mask, extent_mask, factor, nd):
    """The fine grid's similarity weights: (fixed mask pooled, times the padded grid's
    real cells; moving mask pooled, or None)."""
    moving = _pooled_weights(moving_mask, factor, nd)
    if moving is not None and extent_mask is not None:
        moving = moving * extent_mask
    return _times(extent_mask, _pooled_weights(fixed_mask, factor, nd)), moving


def _coarse_pair(fixed: jax.Array, moving: jax.Array, coarse_fixed: ArrayLike | None,
                 coarse_moving: ArrayLike | None) -> tuple[ArrayLike, ArrayLike]:
    """Checks the shapes of :func:`convex_adam`'s features; returns the coarse stage's
    pair: ``coarse_fixed``, ``coarse_moving`` if given, else ``fixed``, ``moving``."""
    if fixed.shape != moving.shape or fixed.ndim not in (3, 4):
        raise ValueError(f"convex_adam: features must be two (H, W, D, C) (or, in 2D, two "
                         f"(H, W, C)) of one shape, got {fixed.shape} and {moving.shape}")
    if (coarse_fixed is None) != (coarse_moving is None):
        raise ValueError("convex_adam: give both coarse_fixed and coarse_moving, or neither")
    if coarse_fixed is None:
        return fixed, moving
    grid = fixed.shape[:-1]
    if np.ndim(coarse_fixed) != fixed.ndim or np.shape(coarse_fixed)[:-1] != grid or (
            np.shape(coarse_fixed) != np.shape(coarse_moving)):
        raise ValueError(f"convex_adam: coarse features {np.shape(coarse_fixed)} and "
                         f"{np.shape(coarse_moving)} must share the grid {grid}")
    return coarse_fixed, coarse_moving


def _pad_small_grid(arrays: tuple[ArrayLike, ...], config: ConvexAdamConfig,
                    extent: ArrayLike | None):
    """Pads ``(H, W, D, C)`` (2D: ``(H, W, C)``) arrays of a grid with a side shorter than one cell
    (:func:`_min_side`) at the end with copies of their border.

    Returns:
      ``(arrays, extent, crop)``: the padded arrays, their real size, and the slices that
      crop a field back to the grid; the arguments and ``crop=None`` when the grid is
      large enough.

    Raises:
      ValueError: the grid is too small and ``extent`` is given (already padded inputs).
    """
    grid = arrays[0].shape[:-1]
    need = _min_side(config)
    if min(grid) >= need:
        return arrays, extent, None
    if extent is not None:
        raise ValueError(
            f"convex_adam: padded inputs {grid} (with extent=) must be at least {need} "
            f"voxels per side for this config (grid_sp={config.grid_sp}, and "
            f"grid_sp_adam={config.grid_sp_adam} with lambda_weight > 0); pad them to "
            f"{tuple(max(s, need) for s in grid)} or more")
    widths = [(0, max(0, need - s)) for s in grid] + [(0, 0)]
    padded = tuple(None if x is None else jnp.pad(jnp.asarray(x, jnp.float32), widths,
                                                  mode="edge") for x in arrays)
    return padded, jnp.asarray(grid, jnp.int32), tuple(slice(0, s) for s in grid)


@compilation.jit(static_argnames=("config",), check=_check_features,
                  export=lambda: (cpu_kernels.usable(),))
def convex_adam(fixed: ArrayLike, moving: ArrayLike, *,
                config: ConvexAdamConfig = ConvexAdamConfig(),
                coarse_fixed: ArrayLike | None = None,
                coarse_moving: ArrayLike | None = None,
                extent: ArrayLike | None = None,
                fixed_mask: ArrayLike | None = None,
                moving_mask: ArrayLike | None = None) -> jax.Array:
    """Registers two feature volumes: coarse convex stage, then Adam (if lambda > 0).

    A grid with a side shorter than one cell (``grid_sp`` voxels, or ``grid_sp_adam``
    with the fine stage on) is padded at the end with copies of its border, registered
    with the padding kept out (``extent``) and the field cropped back: a 5x5x5 pair, or a
    single slice, is registered as one coarse cell along its short sides. 2D features
    ``(H, W, C)`` register in 2D (a ``(H, W, 2)`` field).

    Args:
      fixed, moving: ``(H, W, D, C)`` channels-last features on one voxel grid; 2D
        ``(H, W, C)``.
      config: settings (static: one compilation per config and shape).
      coarse_fixed, coarse_moving: other ``(H, W, D, C')`` features for the coarse stage
        only (coarse to fine, e.g. a deeper encoder layer); default ``fixed``, ``moving``.
      extent: for inputs padded at the end of each axis (batches of mixed sizes), the
        real size ``(h, w, d)`` (2D: ``(h, w)``; may be traced): the padding is kept out
        of every stage and the field on ``[:h, :w, :d]`` is the unpadded pair's. Pad to a
        multiple of ``lcm(grid_sp, grid_sp_adam)``.
      fixed_mask, moving_mask: optional ``(H, W, D)`` (2D ``(H, W)``) weights in [0, 1],
        both on the fixed grid (the moving image's mask as the moving image is given),
        that restrict the similarity to them in both stages (cost-function masking, as
        ANTs' ``-x`` and greedy's ``-gm``/``-mm``): :func:`coarse_stage`,
        :func:`fine_stage`. The regulariser still acts everywhere, so the field outside
        the masks follows from inside them.

    Returns:
      ``(H, W, D, 3)`` float32 voxel displacement (2D: ``(H, W, 2)``);
      ``warp(moving_image, u)`` aligns the moving image to the fixed one.

    Raises:
      ValueError: the features are not two ``(H, W, D, C)`` of one shape (or the coarse
        ones not on their grid); with ``extent``, a side is shorter than one cell (the
        minimum is in the message); with concrete arguments (not under ``jit``/``vmap``/
        ``grad``), an input has NaN or Inf values, ``extent`` is outside ``[1, grid]``,
        or a mask is not weights in [0, 1] on the fixed grid (or all zero).
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    coarse_fixed, coarse_moving = _coarse_pair(fixed, moving, coarse_fixed, coarse_moving)
    masks = tuple(None if m is None else jnp.asarray(m, jnp.float32)[..., None]
                  for m in (fixed_mask, moving_mask))  # channels-last, to pad like features
    (fixed, moving, coarse_fixed, coarse_moving, *masks), extent, crop = _pad_small_grid(
        (fixed, moving, coarse_fixed, coarse_moving, *masks), config, extent)
    fixed_mask, moving_mask = (None if m is None else m[..., 0] for m in masks)
    field = coarse_stage(coarse_fixed, coarse_moving, config=config, extent=extent,
                         fixed_mask=fixed_mask, moving_mask=moving_mask)
    if config.lambda_weight > 0:
        field = fine_stage(fixed, moving, field, config=config, extent=extent,
                           fixed_mask=fixed_mask, moving_mask=moving_mask)
    return field if crop is None else field[crop]


def register_mind(fixed: ArrayLike, moving: ArrayLike, *,
                  config: ConvexAdamConfig = ConvexAdamConfig(),
                  radius: int = 1, dilation: int = 2,
                  percentiles: tuple[float, float] | None = PERCENTILES,
                  fixed_mask: ArrayLike | None = None,
                  moving_mask: ArrayLike | None = None) -> jax.Array:
    """ConvexAdam on MIND-SSC features of two ``(H, W, D)`` images: the classical baseline.

    Each image is first clipped to ``percentiles`` and scaled to [0, 1]
    (:func:`jaxreg.features.intensity.normalise_intensity`), as :class:`jaxreg.features.sources.MindSource`
    and :func:`jaxreg.register` do, so that all three give the same field; None skips
    it (MIND-SSC itself ignores a linear change of intensity, not outliers).

    Images of any size register, a single slice or a 5x5x5 cube included (see
    :func:`convex_adam`). Two 2D images ``(H, W)`` register in 2D with the 2D MIND-SSC
    (4 channels, :func:`jaxreg.features.mind.mind_ssc`) and give a ``(H, W, 2)`` field; the
    settings are used as they are (``similarity_weight`` multiplies the channel mean).

    Args:
      fixed, moving: ``(H, W, D)`` images on one grid, or two ``(H, W)`` images.
      config: solver settings.
      radius, dilation: MIND-SSC's (:func:`jaxreg.features.mind.mind_ssc`).
      percentiles: intensity clipping, or None.
      fixed_mask, moving_mask: similarity masks (:func:`convex_adam`).

    Returns:
      ``(H, W, D, 3)`` float32 voxel displacement; 2D ``(H, W, 2)``.

    Raises:
      ValueError: the images are not ``(H, W, D)`` or ``(H, W)`` of one shape; with
        concrete arguments (not under ``jit``/``vmap``/``grad``), an image has NaN or Inf
        voxels or is constant (one value everywhere: nothing to register).

    >>> import jax.numpy as jnp
    >>> img = jnp.zeros((24, 24, 24)).at[8:16, 8:16, 8:16].set(1.0)
    >>> register_mind(img, img, config=ConvexAdamConfig(iterations=2)).shape
    (24, 24, 24, 3)
    """
    if not any(isinstance(x, jax.core.Tracer) for x in (fixed, moving)):
        checked = _check_images({"fixed": fixed, "moving": moving})  # the values as given
        if percentiles is None:  # on the device already: passed on as they are
            fixed, moving = checked["fixed"], checked["moving"]
    if percentiles is not None:
        fixed, moving = (intensity.normalise_intensity(x, percentiles=tuple(percentiles))
                         for x in (fixed, moving))
    return _register_mind(fixed, moving, config=config, radius=radius, dilation=dilation,
                          fixed_mask=fixed_mask, moving_mask=moving_mask)


@compilation.jit(static_argnames=("config", "radius", "dilation"))
def _register_mind(fixed, moving, *, config, radius, dilation, fixed_mask, moving_mask):
    """:func:`register_mind` after the intensity scaling: one compiled program."""
    f = mind.mind_ssc(fixed, radius=radius, dilation=dilation)
    m = mind.mind_ssc(moving, radius=radius, dilation=dilation)
    return convex_adam(f, m, config=config, fixed_mask=fixed_mask, moving_mask=moving_mask)
