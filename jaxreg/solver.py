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
import inspect
import itertools
import math
import numbers

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
    "check_field",
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

    Raises:
      ValueError: a field is out of range (named in the message with what it accepts):
        ``grid_sp``, ``grid_sp_adam`` integers >= 1; ``disp_hw``, ``ic_iterations``,
        ``iterations``, ``smooth_num`` integers >= 0; ``smooth_kernel`` an odd integer
        >= 1 and ``final_smooth`` 0 or odd (centred box filters,
        :func:`jaxreg.filters.box_filter`); ``learning_rate``, ``similarity_weight``
        finite > 0; ``lambda_weight`` finite >= 0; ``coupling`` a non-empty tuple of
        finite numbers > 0; ``ic`` a bool. Bools are not accepted as numbers.
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
                               ("lambda_weight", False)):
            value = getattr(self, name)
            if not _is_finite(value) or value < 0 or (positive and value == 0):
                self._reject(name, f"a finite number {'>' if positive else '>='} 0")
        if (not isinstance(self.coupling, tuple) or not self.coupling
                or not all(_is_finite(c) and c > 0 for c in self.coupling)):
            self._reject("coupling", "a non-empty tuple of finite numbers > 0")
        if not isinstance(self.ic, (bool, np.bool_)):
            self._reject("ic", "a bool")

    def _reject(self, name, accepts):
        raise ValueError(f"ConvexAdamConfig.{name} must be {accepts}, "
                         f"got {getattr(self, name)!r}")


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
    ``(voxels, cells)`` real sizes (for :func:`filters.resize`'s ``extents``).

    A real side shorter than ``factor`` keeps one cell, the one that overlaps it (its
    mean includes some padding: pad with copies of the border, as :func:`convex_adam`
    does); without it the real grid would be empty."""
    extent = jnp.asarray(extent, jnp.int32)
    cells = jnp.maximum(extent // factor, 1)
    return filters.extent_mask(pooled_shape, cells), (extent, cells)


def _check_side(where, shape, factor, name):
    """Raises unless every spatial side of ``shape`` holds one cell of ``factor`` voxels."""
    if len(shape) < 3 or min(shape[:3]) < factor:
        raise ValueError(f"{where}: every side of the grid must be at least {name}={factor} "
                         f"voxels, got shape {tuple(shape)}; convex_adam pads smaller volumes")


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
    (:func:`jaxreg.batching.plan_buckets` does). A real side shorter than ``grid_sp``
    is one cell, padding included (pad it with copies of the border).

    Raises:
      ValueError: a side of the inputs is shorter than ``grid_sp`` (:func:`convex_adam`
        pads such volumes).
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    _check_side("coarse_stage", fixed.shape, config.grid_sp, "grid_sp")
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

    Raises:
      ValueError: a side of the inputs is shorter than ``grid_sp_adam``
        (:func:`convex_adam` pads such volumes).
    """
    fixed = jnp.asarray(fixed, jnp.float32)
    moving = jnp.asarray(moving, jnp.float32)
    g = config.grid_sp_adam
    _check_side("fine_stage", fixed.shape, g, "grid_sp_adam")
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


# Input checks of the entry points. They run on concrete arguments only, before the
# jitted function (a traced call, inside a user's jit, vmap or grad, skips them): a few
# reductions over the inputs on their device and one small transfer back (the inputs
# themselves go to the device once, then on to the jitted function).


@functools.partial(jax.jit, static_argnames=("ranges",))
def _input_stats(arrays, ranges):
    """Per array: whether all values are finite, and (``ranges``) the min and max."""
    finite = jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays])
    if not ranges:
        return finite, None, None
    lo = jnp.stack([jnp.min(a).astype(jnp.float32) for a in arrays])
    hi = jnp.stack([jnp.max(a).astype(jnp.float32) for a in arrays])
    return finite, lo, hi


@jax.jit
def _count_nonfinite(x):
    """How many values are NaN or Inf (for the message; a slower reduction)."""
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _as_arrays(where, arguments, names):
    """The named arguments that are given, as jax arrays (moved to a device once, then
    passed on to the jitted function), with the check that none is empty."""
    arrays = {}
    for name in names:
        if arguments.get(name) is None:
            continue
        x = jnp.asarray(arguments[name])
        if x.size == 0:
            raise ValueError(f"{where}: {name} is empty, shape {x.shape}")
        arrays[name] = x
    return arrays


class _Checked:
    """A :func:`jaxreg.jit` function that validates its arguments first when they are
    concrete; traced, it is the jitted function itself. Other attributes (``lower``,
    ``eval_shape``, ``_cache_size``, ...) are the jitted function's."""

    def __init__(self, jitted, check):
        self._jitted = jitted
        self._check = check
        # From the Python function itself: asking the jitted one would pick a backend at
        # import time (before a user's jax.distributed.initialize()).
        fun = inspect.unwrap(jitted)
        self._signature = inspect.signature(fun)
        functools.update_wrapper(self, fun, updated=())

    def __call__(self, *args, **kwargs):
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            try:
                bound = self._signature.bind(*args, **kwargs)
            except TypeError:  # a wrong call: the jitted function reports it
                bound = None
            if bound is not None:
                bound.arguments.update(self._check(dict(bound.arguments)))
                args, kwargs = bound.args, bound.kwargs
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name):  # lower, eval_shape, _cache_size, ... of the jit
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._jitted, name)


def _checked(check):
    """Decorator: ``check(arguments) -> replacements`` before the jitted function."""
    return lambda jitted: _Checked(jitted, check)


def _check_features(arguments):
    """:func:`convex_adam`'s concrete inputs: finite features, an extent within the grid."""
    names = ("fixed", "moving", "coarse_fixed", "coarse_moving")
    arrays = _as_arrays("convex_adam", arguments, names)
    stats, extent = jax.device_get((_input_stats(tuple(arrays.values()), ranges=False),
                                    arguments.get("extent")))
    for (name, x), finite in zip(arrays.items(), stats[0]):
        if not finite:
            raise ValueError(f"convex_adam: {name} features have {_count_nonfinite(x)} NaN or "
                             f"Inf value(s) (of {x.size}); replace or mask them first")
    if extent is not None and "fixed" in arrays and arrays["fixed"].ndim == 4:
        grid = arrays["fixed"].shape[:3]
        e = np.asarray(extent)
        if e.shape != (3,) or np.any(e < 1) or np.any(e > np.asarray(grid)):
            raise ValueError(f"convex_adam: extent must be 3 sizes in [1, {grid}], "
                             f"got {e.tolist()}")
    return arrays


def _check_images(arguments):
    """:func:`register_mind`'s concrete inputs: finite, non-constant images."""
    arrays = _as_arrays("register_mind", arguments, ("fixed", "moving"))
    finite, lo, hi = jax.device_get(_input_stats(tuple(arrays.values()), ranges=True))
    for i, (name, x) in enumerate(arrays.items()):
        if not finite[i]:
            raise ValueError(f"register_mind: {name} image has {_count_nonfinite(x)} NaN or "
                             f"Inf voxel(s) (of {x.size}); replace or mask them first")
        if lo[i] == hi[i]:
            raise ValueError(f"register_mind: {name} image is constant (all {float(lo[i])}); "
                             f"nothing to register")
    return arrays


@_checked(_check_features)
@compilation.jit(static_argnames=("config",))
def convex_adam(fixed: ArrayLike, moving: ArrayLike, *,
                config: ConvexAdamConfig = ConvexAdamConfig(),
                coarse_fixed: ArrayLike | None = None,
                coarse_moving: ArrayLike | None = None,
                extent: ArrayLike | None = None) -> jax.Array:
    """Registers two feature volumes: coarse convex stage, then Adam (if lambda > 0).

    A grid with a side shorter than one cell (``grid_sp`` voxels, or ``grid_sp_adam``
    with the fine stage on) is padded at the end with copies of its border, registered
    with the padding kept out (``extent``) and the field cropped back: a 5x5x5 pair, or a
    single slice, is registered as one coarse cell along its short sides.

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

    Raises:
      ValueError: the features are not two ``(H, W, D, C)`` of one shape (or the coarse
        ones not on their grid); with ``extent``, a side is shorter than one cell (the
        minimum is in the message); with concrete arguments (not under ``jit``/``vmap``/
        ``grad``), an input has NaN or Inf values or ``extent`` is outside ``[1, grid]``.
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
    grid = fixed.shape[:3]
    need = _min_side(config)
    crop = None
    if min(grid) < need:
        if extent is not None:
            raise ValueError(
                f"convex_adam: padded inputs {grid} (with extent=) must be at least {need} "
                f"voxels per side for this config (grid_sp={config.grid_sp}, and "
                f"grid_sp_adam={config.grid_sp_adam} with lambda_weight > 0); pad them to "
                f"{tuple(max(s, need) for s in grid)} or more")
        widths = [(0, max(0, need - s)) for s in grid] + [(0, 0)]
        fixed, moving, coarse_fixed, coarse_moving = (
            jnp.pad(jnp.asarray(x, jnp.float32), widths, mode="edge")
            for x in (fixed, moving, coarse_fixed, coarse_moving))
        extent = jnp.asarray(grid, jnp.int32)
        crop = tuple(slice(0, s) for s in grid)
    field = coarse_stage(coarse_fixed, coarse_moving, config=config, extent=extent)
    if config.lambda_weight > 0:
        field = fine_stage(fixed, moving, field, config=config, extent=extent)
    return field if crop is None else field[crop]


@_checked(_check_images)
@compilation.jit(static_argnames=("config", "radius", "dilation"))
def register_mind(fixed: ArrayLike, moving: ArrayLike, *,
                  config: ConvexAdamConfig = ConvexAdamConfig(),
                  radius: int = 1, dilation: int = 2) -> jax.Array:
    """ConvexAdam on MIND-SSC features of two ``(H, W, D)`` images: the classical baseline.

    Images of any size register, a single slice or a 5x5x5 cube included (see
    :func:`convex_adam`).

    Raises:
      ValueError: the images are not ``(H, W, D)`` of one shape; with concrete arguments
        (not under ``jit``/``vmap``/``grad``), an image has NaN or Inf voxels or is
        constant (one value everywhere: nothing to register).

    >>> import jax.numpy as jnp
    >>> img = jnp.zeros((24, 24, 24)).at[8:16, 8:16, 8:16].set(1.0)
    >>> register_mind(img, img, config=ConvexAdamConfig(iterations=2)).shape
    (24, 24, 24, 3)
    """
    f = mind.mind_ssc(fixed, radius=radius, dilation=dilation)
    m = mind.mind_ssc(moving, radius=radius, dilation=dilation)
    return convex_adam(f, m, config=config)


def check_field(field: ArrayLike, *, name: str = "field") -> None:
    """Raises if a displacement field has NaN or Inf values, e.g. before writing it.

    A diverged registration (too large a learning rate, bad inputs given to a traced
    solver, which cannot check them) gives such fields.

    Args:
      field: a concrete array (numpy, or jax: counted on its device), any shape.
      name: what the message calls it.

    Raises:
      ValueError: ``"field has 123 NaN/Inf values (of N): the registration diverged;
        ..."``.
      TypeError: ``field`` is traced (call this outside ``jit``/``vmap``).
    """
    if isinstance(field, jax.core.Tracer):
        raise TypeError(f"check_field: {name} is traced; check it outside jit/vmap")
    if isinstance(field, jax.Array):
        bad = int(_count_nonfinite(field))
    else:
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(field))))
    if bad:
        raise ValueError(f"{name} has {bad} NaN/Inf values (of {np.size(field)}): the "
                         f"registration diverged; check the learning rate and the inputs")
