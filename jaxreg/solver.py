"""ConvexAdam in JAX: coupled convex discrete optimisation, then Adam instance optimisation.

Siebert, Grossbrohmer, Hansen, Heinrich, "ConvexAdam: self-configuring dual-optimisation-
based 3D multitask medical image registration", IEEE TMI 2024.

Everything works on one pair of channels-last feature volumes ``(H, W, D, C)`` on the same
voxel grid (MIND-SSC, or PCA-reduced foundation-model features) and returns a voxel
displacement field ``(H, W, D, 3)`` in jaxreg's pull convention
(``warped(x) = moving(x + u(x))``, see :mod:`jaxreg.warping`). Batch pairs with
``jax.vmap``; settings are a frozen (hashable) :class:`ConvexAdamConfig`, static under
``jax.jit``, so one compilation serves every pair of one shape.

Differences from the PyTorch reference, all deliberate: displacements are exact voxels at
every stage (the reference mixes ``align_corners`` conventions, scaling fine-stage steps
by ``n / (n - 1)``); without inverse consistency the coarse field is still upsampled to
full resolution; the result is the smoothed field of the final parameters.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jaxreg import compilation
from jaxreg import filters
from jaxreg import losses
from jaxreg import mind
from jaxreg import regularisers
from jaxreg import warping as warp_lib

__all__ = [
    "ConvexAdamConfig",
    "correlation_cost",
    "coupled_convex",
    "inverse_consistency",
    "coarse_stage",
    "fine_stage",
    "convex_adam",
    "register_mind",
]


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
        multiplies the channel mean by 12, MIND-SSC's channel count).
      final_smooth: width of three extra pools on the full-resolution field (0: none).
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


def _offsets(disp_hw: int) -> np.ndarray:
    """All integer displacements of the search cube, (K, 3), first axis slowest."""
    r = range(-disp_hw, disp_hw + 1)
    return np.array(list(itertools.product(r, r, r)), dtype=np.float32)


def _masked(x, mask):
    """``x`` zeroed outside ``mask`` (a ``(h, w, d)`` 0/1 grid); no-op without one."""
    if mask is None:
        return x
    return x * (mask if x.ndim == mask.ndim else mask[..., None])


def _real_cells(pooled_shape, extent, factor):
    """For a padded grid pooled by ``factor``: the 0/1 mask of its real cells and the
    ``(voxels, cells)`` real sizes (for :func:`filters.resize`'s ``extents``)."""
    extent = jnp.asarray(extent, jnp.int32)
    cells = extent // factor
    return filters.extent_mask(pooled_shape, cells), (extent, cells)


def correlation_cost(fixed: ArrayLike, moving: ArrayLike, *, disp_hw: int,
                     mask: ArrayLike | None = None) -> jax.Array:
    """Dense SSD cost of every integer displacement in a cube, box-filtered twice.

    ``cost[k, x] = box3(box3(sum_c (fixed[x, c] - moving[x + offset_k, c])^2))`` with
    ``moving`` zero outside its grid; offsets as in :func:`_offsets`.

    Args:
      fixed, moving: ``(h, w, d, C)`` pooled feature volumes.
      disp_hw: half-width of the cube; ``K = (2 * disp_hw + 1)**3``.
      mask: ``(h, w, d)`` 0/1 real cells of a padded grid (:func:`coarse_stage`'s
        ``extent``); the padding then counts as outside the grid everywhere.

    Returns:
      ``(K, h, w, d)`` float32.
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = _masked(jnp.asarray(moving, jnp.float32), mask)
    h, w, d, c = fixed.shape
    padded = jnp.pad(moving, [(disp_hw, disp_hw)] * 3 + [(0, 0)])
    starts = jnp.asarray(_offsets(disp_hw) + disp_hw, jnp.int32)

    def one(start):
        shifted = jax.lax.dynamic_slice(padded, (start[0], start[1], start[2], 0), (h, w, d, c))
        cost = jnp.sum((fixed - shifted) ** 2, axis=-1)
        return filters.box_filter(_masked(filters.box_filter(_masked(cost, mask), 3), mask), 3)

    return jax.lax.map(one, starts, batch_size=27)


def coupled_convex(cost: ArrayLike, *, disp_hw: int,
                   coupling: tuple[float, ...] = ConvexAdamConfig.coupling,
                   mask: ArrayLike | None = None) -> jax.Array:
    """Coupled convex optimisation over a discrete cost volume.

    Alternates a per-cell argmin of ``cost + coeff * |offset - smooth|^2`` with a 3x3x3
    average of the chosen offsets, for rising ``coeff``.

    Args:
      cost: ``(K, h, w, d)`` from :func:`correlation_cost`.
      disp_hw: the cube half-width the cost was computed with.
      coupling: the coupling weights, in order.
      mask: ``(h, w, d)`` 0/1 real cells of a padded grid; the padding's choices are
        kept out of the averages.

    Returns:
      ``(h, w, d, 3)`` displacement in cells (zero in the padding when masked).
    """
    cost = jnp.asarray(cost, jnp.float32)
    mesh = jnp.asarray(_offsets(disp_hw))  # (K, 3)

    def smooth_choice(index):
        return _masked(filters.box_filter(_masked(mesh[index], mask), 3), mask)

    soft = smooth_choice(jnp.argmin(cost, axis=0))
    for coeff in coupling:
        # Written per axis so that no (K, h, w, d, 3) array is formed: XLA fuses the
        # sum into the argmin.
        penalty = sum((mesh[:, a, None, None, None] - soft[None, ..., a]) ** 2 for a in range(3))
        soft = smooth_choice(jnp.argmin(cost + coeff * penalty, axis=0))
    return soft


def inverse_consistency(forward: ArrayLike, backward: ArrayLike, *,
                        iterations: int = 15,
                        mask: ArrayLike | None = None) -> tuple[jax.Array, jax.Array]:
    """Makes two opposite fields inverse consistent by fixed-point iteration.

    ``f <- (f - b(x + f)) / 2`` and ``b <- (b - f(x + b)) / 2``, simultaneously; fields
    read zero outside the grid (and outside ``mask``, the real cells of a padded grid).
    """
    def step(_, fb):
        f, b = fb
        return (_masked(0.5 * (f - warp_lib.warp(b, f)), mask),
                _masked(0.5 * (b - warp_lib.warp(f, b)), mask))

    fb = (jnp.asarray(forward, jnp.float32), jnp.asarray(backward, jnp.float32))
    return jax.lax.fori_loop(0, iterations, step, tuple(_masked(x, mask) for x in fb))


def coarse_stage(fixed: ArrayLike, moving: ArrayLike, *,
                 config: ConvexAdamConfig = ConvexAdamConfig(),
                 extent: ArrayLike | None = None) -> jax.Array:
    """Discrete coarse registration of two feature volumes; full-resolution field.

    ``extent`` (3 ints, may be traced): the inputs are padded at the end of each axis and
    their real voxels are ``[0, extent)``; the padding then never enters the costs, the
    averages or the inverse consistency, and the field on the real voxels is the one the
    unpadded pair gets (up to float rounding). Pad to a multiple of ``grid_sp``
    (:func:`jaxreg.batching.plan_buckets` does).
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    pf = filters.avg_pool(fixed, config.grid_sp)
    pm = filters.avg_pool(moving, config.grid_sp)
    mask, sizes = None, None
    if extent is not None:
        mask, sizes = _real_cells(pf.shape, extent, config.grid_sp)
        sizes = sizes[::-1]  # cells -> voxels
    solve = functools.partial(coupled_convex, disp_hw=config.disp_hw, coupling=config.coupling,
                              mask=mask)
    field = solve(correlation_cost(pf, pm, disp_hw=config.disp_hw, mask=mask))
    if config.ic:
        back = solve(correlation_cost(pm, pf, disp_hw=config.disp_hw, mask=mask))
        field, _ = inverse_consistency(field, back, iterations=config.ic_iterations, mask=mask)
    return filters.resize(field * config.grid_sp, fixed.shape[:3], extents=sizes)


Loss = Callable[[jax.Array, jax.Array], jax.Array]


def _smooth(field, config, mask=None):
    for _ in range(config.smooth_num):
        field = filters.box_filter(_masked(field, mask), config.smooth_kernel)
    return field


def fine_stage(fixed: ArrayLike, moving: ArrayLike, init: ArrayLike, *,
               config: ConvexAdamConfig = ConvexAdamConfig(),
               similarity: Loss | None = None,
               extent: ArrayLike | None = None) -> jax.Array:
    """Adam instance optimisation of a smoothed low-resolution displacement grid.

    Minimises ``similarity(warp(moving, u), fixed) + lambda_weight * diffusion(u)`` on a
    grid ``grid_sp_adam`` times coarser, ``u`` being the parameters average-pooled
    ``smooth_num`` times; the loop is one ``lax.scan``.

    Args:
      fixed, moving: ``(H, W, D, C)`` feature volumes.
      init: ``(H, W, D, 3)`` starting field (e.g. from :func:`coarse_stage`).
      config: settings.
      similarity: ``(warped, fixed) -> scalar`` on the pooled features; default
        ``similarity_weight * losses.ssd``. On a padded grid (``extent``), the padding
        of both reads zero: a custom similarity should mask it out itself.
      extent: real size of padded inputs, as in :func:`coarse_stage`; pad to a multiple
        of ``grid_sp_adam``.

    Returns:
      ``(H, W, D, 3)`` displacement in voxels.
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    g = config.grid_sp_adam
    pf = filters.avg_pool(fixed, g)
    pm = filters.avg_pool(moving, g)
    mask, down, up = None, None, None
    if extent is not None:
        mask, down = _real_cells(pf.shape, extent, g)
        up = down[::-1]
        pf, pm = _masked(pf, mask), _masked(pm, mask)
    if similarity is None:
        similarity = lambda a, b: config.similarity_weight * losses.ssd(a, b, mask=mask)
    params = filters.resize(jnp.asarray(init, jnp.float32), pf.shape[:3], extents=down) / g

    def loss_fn(p):
        u = _smooth(p, config, mask)
        return (similarity(warp_lib.warp(pm, u), pf)
                + config.lambda_weight * regularisers.diffusion(u, mask=mask))

    opt = optax.adam(config.learning_rate)

    def step(carry, _):
        p, state = carry
        loss, grad = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grad, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None,
                                  length=config.iterations)
    field = filters.resize(_smooth(params, config, mask) * g, fixed.shape[:3], extents=up)
    if config.final_smooth > 0:
        full = None if extent is None else filters.extent_mask(fixed.shape, extent)
        for _ in range(3):
            field = filters.box_filter(_masked(field, full), config.final_smooth)
    return field


@compilation.jit(static_argnames=("config",))
def convex_adam(fixed: ArrayLike, moving: ArrayLike, *,
                config: ConvexAdamConfig = ConvexAdamConfig(),
                coarse_fixed: ArrayLike | None = None,
                coarse_moving: ArrayLike | None = None,
                extent: ArrayLike | None = None) -> jax.Array:
    """Registers two feature volumes: coarse convex stage, then Adam (if lambda > 0).

    Args:
      fixed, moving: ``(H, W, D, C)`` channels-last features on one voxel grid.
      config: settings (static: one compilation per config and shape).
      coarse_fixed, coarse_moving: other ``(H, W, D, C')`` features for the coarse stage
        only (coarse to fine, e.g. a deeper encoder layer); default ``fixed``, ``moving``.
      extent: for inputs padded at the end of each axis (batches of mixed sizes), the
        real size ``(h, w, d)`` (may be traced): the padding is kept out of every stage
        and the field on ``[:h, :w, :d]`` is the unpadded pair's. Pad to a multiple of
        ``lcm(grid_sp, grid_sp_adam)``.

    Returns:
      ``(H, W, D, 3)`` float32 voxel displacement; ``warp(moving_image, u)`` aligns the
      moving image to the fixed one.
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    if fixed.shape != moving.shape or fixed.ndim != 4:
        raise ValueError(f"convex_adam: features must be two (H, W, D, C) of one shape, "
                         f"got {fixed.shape} and {moving.shape}")
    if (coarse_fixed is None) != (coarse_moving is None):
        raise ValueError("convex_adam: give both coarse_fixed and coarse_moving, or neither")
    if coarse_fixed is None:
        coarse_fixed, coarse_moving = fixed, moving
    elif np.shape(coarse_fixed)[:3] != fixed.shape[:3] or (
            np.shape(coarse_fixed) != np.shape(coarse_moving)):
        raise ValueError(f"convex_adam: coarse features {np.shape(coarse_fixed)} and "
                         f"{np.shape(coarse_moving)} must share the grid {fixed.shape[:3]}")
    field = coarse_stage(coarse_fixed, coarse_moving, config=config, extent=extent)
    if config.lambda_weight > 0:
        field = fine_stage(fixed, moving, field, config=config, extent=extent)
    return field


@compilation.jit(static_argnames=("config", "radius", "dilation"))
def register_mind(fixed: ArrayLike, moving: ArrayLike, *,
                  config: ConvexAdamConfig = ConvexAdamConfig(),
                  radius: int = 1, dilation: int = 2) -> jax.Array:
    """ConvexAdam on MIND-SSC features of two ``(H, W, D)`` images: the classical baseline.

    >>> import jax.numpy as jnp
    >>> img = jnp.zeros((24, 24, 24)).at[8:16, 8:16, 8:16].set(1.0)
    >>> register_mind(img, img, config=ConvexAdamConfig(iterations=2)).shape
    (24, 24, 24, 3)
    """
    f = mind.mind_ssc(fixed, radius=radius, dilation=dilation)
    m = mind.mind_ssc(moving, radius=radius, dilation=dilation)
    return convex_adam(f, m, config=config)
